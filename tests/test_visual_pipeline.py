"""The multimodal job end to end on a micro budget (recipes/configs/pipeline_tiny_vision.yaml): early-fusion
pretraining > SFT > online RL > DPO on image prompts, killed in the RL stage and started again: the finished stages
are skipped, RL resumes from its checkpoint, and results.json / report.md carry the visual figures."""

import json

import pytest
import yaml
from transformers import TrainerCallback
from trl import TrlParser

pytest.importorskip("torchvision")

from recipes import online_rl, pipeline  # noqa: E402

pytestmark = pytest.mark.slow


class SimulatedCrash(Exception):
    pass


class CrashAfterCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 1:
            raise SimulatedCrash("killed after checkpoint-1")


def test_vision_pipeline_runs_every_stage_and_resumes_after_a_kill(tmp_path, monkeypatch, capsys):
    config = yaml.safe_load(open("recipes/configs/pipeline_tiny_vision.yaml"))
    config["output_dir"] = str(tmp_path / "run")
    config["torch_threads"] = 0
    config["shared"] = {
        "task": "visual", "heldout_problems": 6, "train_problems": 8, "max_steps": 2, "save_steps": 1,
        "logging_steps": 1, "per_device_train_batch_size": 4, "heldout_max_new_tokens": 4, "seed": 0,
    }  # fmt: skip
    digits = "tests.recipe_rewards.digit_share_reward"  # a random model never answers right: rewards with variance
    micro = {
        "pretrain": {"corpus_documents": 16, "model_config_overrides": {"hidden_size": 64, "head_dim": 16,
                     "intermediate_size": 64, "intermediate_size_mlp": 128, "attention_chunk_size": 32}},
        "sft": {"judge_samples": 2, "judge_max_new_tokens": 4},
        "online_rl": {"reward_funcs": [digits], "reward_weights": [1.0], "pass_rate_reward": "digit_share_reward",
                      "num_generations": 4, "max_completion_length": 4, "temperature": 1.0},
        "dpo": {"reward_funcs": [digits], "pair_samples": 2, "pair_max_new_tokens": 4, "pair_temperature": 1.0},
    }  # fmt: skip
    for stage in config["stages"]:
        stage.update(micro[stage["name"]])
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    (args,) = TrlParser((pipeline.PipelineArguments,)).parse_args_and_config(["--config", str(path)])

    original = online_rl.train_resumably

    def crashing(trainer, training_args):
        trainer.add_callback(CrashAfterCheckpoint())
        original(trainer, training_args)

    with monkeypatch.context() as patch:
        patch.setattr(online_rl, "train_resumably", crashing)
        with pytest.raises(SimulatedCrash):
            pipeline.main(args)
    assert (tmp_path / "run" / "online_rl" / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (tmp_path / "run" / "online_rl" / "model.safetensors").exists()
    capsys.readouterr()

    stages = pipeline.main(args)  # the same command again
    out = capsys.readouterr().out
    assert "[pretrain] finished before" in out and "[sft] finished before" in out
    assert "resuming from" in out and "checkpoint-1" in out
    assert [stage["name"] for stage in stages] == ["pretrain", "sft", "online_rl", "dpo"]
    rl_steps = [step for step, _ in stages[2]["loss_curve"]]
    assert rl_steps[-1] == 2

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for stage in results["stages"]:
        assert 0.0 <= stage["accuracy"] <= 1.0 and 0.0 <= stage["blind_accuracy"] <= 1.0, stage["name"]
        assert set(stage["accuracy_by_level"]) <= {"1", "2-4", "5-8"}
        assert (tmp_path / "run" / stage["name"] / "model.safetensors").is_file()
        assert (tmp_path / "run" / stage["name"] / "processor_config.json").is_file()
    for after in results["stages"][1:]:  # the same 6 held-out problems after every stage
        assert after["vs_previous"]["gained"] + after["vs_previous"]["lost"] <= 6
    report = (tmp_path / "run" / "report.md").read_text()
    assert "image-blind control" in report and "| dpo |" in report
