"""The pipeline end to end on a micro budget: every stage runs from the previous one's model, results.json /
report.md / results.png are written, and a second run skips the finished stages."""

import json

import pytest
import torch
import yaml
from trl import TrlParser

from recipes import pipeline

pytestmark = pytest.mark.slow


def test_pipeline_runs_every_stage_writes_results_and_skips_finished_stages(tmp_path, monkeypatch):
    config = yaml.safe_load(open("recipes/configs/pipeline_tiny.yaml"))
    config["output_dir"] = str(tmp_path / "run")
    config["torch_threads"] = 0  # setting it would leak a thread count into the tests that run after this one
    config["shared"] = {
        "heldout_problems": 8, "train_problems": 16, "max_steps": 2, "save_steps": 2, "logging_steps": 1,
        "per_device_train_batch_size": 8, "heldout_max_new_tokens": 8, "seed": 0,
    }  # fmt: skip
    micro = {
        # Merged over pretrain_tiny.yaml's overrides: back to hub_configs/tiny's own (smaller) sizes.
        "pretrain": {"corpus_documents": 32, "model_config_overrides": {"hidden_size": 64, "head_dim": 16,
                     "intermediate_size": 64, "intermediate_size_mlp": 128, "attention_chunk_size": 32}},
        "sft": {"judge_samples": 2, "judge_max_new_tokens": 8},
        # A random model never answers right: rewards with variance keep GRPO and the DPO pair builder busy.
        "online_rl": {"reward_funcs": ["tests.recipe_rewards.digit_share_reward"], "reward_weights": [1.0],
                      "pass_rate_reward": "digit_share_reward", "num_generations": 4, "max_completion_length": 8},
        "dpo": {"reward_funcs": ["tests.recipe_rewards.digit_share_reward"], "pair_samples": 2,
                "pair_max_new_tokens": 8},
    }  # fmt: skip
    for stage in config["stages"]:
        stage.update(micro[stage["name"]])
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    (args,) = TrlParser((pipeline.PipelineArguments,)).parse_args_and_config(["--config", str(path)])
    threads = torch.get_num_threads()
    pipeline.main(args)
    assert torch.get_num_threads() == threads

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [stage["name"] for stage in results["stages"]] == ["pretrain", "sft", "online_rl", "dpo"]
    for stage in results["stages"]:
        assert 0.0 <= stage["accuracy"] <= 1.0 and stage["loss_curve"], stage["name"]
        assert (tmp_path / "run" / stage["name"] / "model.safetensors").is_file()
    assert results["stages"][1]["filter"]["total"] == 16
    for before, after in zip(results["stages"], results["stages"][1:]):  # paired change on the same 8 problems
        change = after["vs_previous"]
        assert change["gained"] + change["lost"] <= 8 and 0.0 < change["p_value"] <= 1.0
        assert after["accuracy"] - before["accuracy"] == pytest.approx((change["gained"] - change["lost"]) / 8)
    assert "vs_previous" not in results["stages"][0]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| dpo |" in report and "judge filter kept" in report
    assert (tmp_path / "run" / "results.png").stat().st_size > 10_000

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for name, (script_cls, config_cls, _) in list(pipeline.STAGES.items()):
        monkeypatch.setitem(pipeline.STAGES, name, (script_cls, config_cls, must_not_run))
    again = pipeline.main(args)
    assert [stage["accuracy"] for stage in again] == [stage["accuracy"] for stage in results["stages"]]
