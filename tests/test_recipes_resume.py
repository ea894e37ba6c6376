"""Each recipe, killed right after a checkpoint and started again with the same command, resumes from that
checkpoint and ends with exactly the weights of an uninterrupted run."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback
from trl import DPOConfig, ModelConfig, SFTConfig, TrlParser

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from recipes import dpo, online_rl, pretrain, sft
from recipes.rl import OnlineRLConfig

pytestmark = pytest.mark.slow

COMMON = [
    "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-3",
    "--heldout_problems", "0", "--train_problems", "32", "--use_cpu", "true", "--bf16", "false",
    "--report_to", "none", "--seed", "0",
]  # fmt: skip

RECIPES = {
    "pretrain": (
        pretrain, pretrain.PretrainScriptArguments, SFTConfig,
        ["--from_scratch", "true", "--corpus_documents", "64", "--per_device_train_batch_size", "8",
         "--max_length", "128"],
    ),
    "sft": (
        sft, sft.SFTScriptArguments, SFTConfig,
        ["--judge_samples", "2", "--judge_max_new_tokens", "8", "--per_device_train_batch_size", "8",
         "--max_length", "128"],
    ),
    "online_rl": (
        online_rl, online_rl.OnlineRLScriptArguments, OnlineRLConfig,
        ["--reward_funcs", "tests.recipe_rewards.digit_share_reward", "--pass_rate_reward", "digit_share_reward",
         "--num_generations", "4", "--per_device_train_batch_size", "8", "--max_completion_length", "8",
         "--beta", "0.0"],
    ),
    "dpo": (
        dpo, dpo.DPOScriptArguments, DPOConfig,
        ["--reward_funcs", "tests.recipe_rewards.digit_share_reward", "--pair_samples", "2",
         "--pair_max_new_tokens", "8", "--per_device_train_batch_size", "4", "--max_length", "128",
         "--loss_type", "sigmoid", "sft", "--loss_weights", "1.0", "5.0"],  # the shipped loss: DPO + NLL
    ),
}  # fmt: skip


class SimulatedCrash(Exception):
    pass


class CrashAfterCheckpoint(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise SimulatedCrash(f"killed after checkpoint-{self.step}")


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("policy")
    Llama4ForCausalLM(Llama4TextConfig.from_pretrained("hub_configs/tiny")).save_pretrained(folder)
    AutoTokenizer.from_pretrained("hub_configs/tiny").save_pretrained(folder)
    return str(folder)


def run(name: str, model_path: str, output_dir, monkeypatch, crash_at: int | None = None):
    module, script_cls, config_cls, extra = RECIPES[name]
    argv = ["--model_name_or_path", model_path, "--output_dir", str(output_dir), *COMMON, *extra]
    args = TrlParser((script_cls, config_cls, ModelConfig)).parse_args_and_config(argv)
    with monkeypatch.context() as patch:
        if crash_at is not None:
            original = module.train_resumably

            def crashing(trainer, training_args):
                trainer.add_callback(CrashAfterCheckpoint(crash_at))
                original(trainer, training_args)

            patch.setattr(module, "train_resumably", crashing)
        return module.main(*args)


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_resumes_after_a_crash_to_the_same_weights(name, tiny_policy, tmp_path, monkeypatch):
    model_path = "hub_configs/tiny" if name == "pretrain" else tiny_policy
    run(name, model_path, tmp_path / "straight", monkeypatch)
    with pytest.raises(SimulatedCrash):
        run(name, model_path, tmp_path / "resumed", monkeypatch, crash_at=2)
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    results = run(name, model_path, tmp_path / "resumed", monkeypatch)  # the same command again
    assert any(entry.get("step") == 3 for entry in results["log_history"]), "resumed run did not train on"
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    start = Llama4ForCausalLM.from_pretrained(model_path).state_dict() if name != "pretrain" else None
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    if start is not None:  # training moved the weights, so the equality above says something
        assert any(not torch.equal(straight[key], start[key]) for key in straight)


def test_online_rl_with_a_kl_term_uses_our_class_for_the_reference(tiny_policy, tmp_path, monkeypatch):
    # With beta > 0 TRL would load the reference as transformers' built-in class, whose fused log-prob forward
    # fails; the trainer has it loaded in ours (once), and the KL term is then computed and logged.
    references = []

    class Recording(online_rl.OnlineRLTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            references.append(self.accelerator.unwrap_model(self.ref_model))

    monkeypatch.setattr(online_rl, "OnlineRLTrainer", Recording)
    module, script_cls, config_cls, extra = RECIPES["online_rl"]
    argv = ["--model_name_or_path", tiny_policy, "--output_dir", str(tmp_path), *COMMON, *extra, "--beta", "0.04"]
    results = module.main(*TrlParser((script_cls, config_cls, ModelConfig)).parse_args_and_config(argv))
    assert type(references[0]) is Llama4ForCausalLM
    assert not references[0].training and not any(p.requires_grad for p in references[0].parameters())
    assert any("kl" in entry for entry in results["log_history"])
