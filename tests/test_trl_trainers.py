"""Stock TRL trainers, unpatched, train our tiny Llama 4 (text and multimodal classes) for a few steps.

transformers' built-in Llama 4 crashes in them ("'MoeCausalLMOutputWithPast' object has no attribute
'last_hidden_state'"): TRL's fused LM head runs `model.base_model` and expects the backbone's output. Ours
exposes the backbone as `base_model` for both classes, and the text config's `num_experts` alias feeds TRL's
MoE auxiliary loss. Trainers that rebuild a reference or teacher from a checkpoint path get our class too
(`import modeling_llama4` registers it; modeling_llama4/registration.py). Each test checks that the requested steps ran, the logged losses are finite, the trained
weights moved and the frozen ones (reference, teacher, vision tower on text-only data, LoRA base) did not.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import trl
from datasets import Dataset
from peft import LoraConfig
from peft.tuners.lora import ParamWrapper
from transformers import AutoTokenizer
from trl.experimental.gkd import GKDConfig, GKDTrainer
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

from modeling_llama4 import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[1] / "hub_configs" / "tiny"
MAX_STEPS = 2
SUMS = [(1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9)]
EXPERT_PARAMETERS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]
LORA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

MODEL_CLASSES = [
    pytest.param(Llama4ForCausalLM, id="text"),
    pytest.param(Llama4ForConditionalGeneration, id="multimodal"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY)  # chat template with {% generation %}, left padding


def make_model(model_class):
    config_class = Llama4TextConfig if model_class is Llama4ForCausalLM else Llama4Config
    return model_class(config_class.from_pretrained(TINY))


def training_args(config_class, tmp_path, **overrides):
    defaults = dict(
        output_dir=str(tmp_path),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    return config_class(**{**defaults, **overrides})


def question(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {a}+{b}?"}]


def answer(value: int) -> list[dict]:
    return [{"role": "assistant", "content": f"\\boxed{{{value}}}"}]


def messages_dataset() -> Dataset:
    return Dataset.from_list([{"messages": question(a, b) + answer(a + b)} for a, b in SUMS])


def prompt_dataset() -> Dataset:
    return Dataset.from_list([{"prompt": question(a, b)} for a, b in SUMS])


def has_digit_reward(completions, **kwargs) -> list[float]:
    """1 for a completion with a digit, plus a small length term so that a group's rewards differ."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(any(ch.isdigit() for ch in text)) + 0.01 * len(text) for text in texts]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}


def is_vision(name: str) -> bool:
    return name.startswith(("vision_model.", "multi_modal_projector."))


def assert_trained(trainer, max_steps: int = MAX_STEPS) -> list[dict]:
    """The requested steps ran and every logged loss is finite; returns the per-step logs."""
    assert trainer.state.global_step == max_steps
    step_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(step_logs) == max_steps
    assert all(math.isfinite(log["loss"]) for log in step_logs), step_logs
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    return step_logs


def assert_full_finetune_moved(model, before: dict[str, torch.Tensor]) -> None:
    """Every text parameter moved (attention, routers, experts, shared experts, norms, embeddings, LM head);
    with text-only data the vision tower and projector get no gradient and stay put."""
    moved = changed(model, before)
    text = {name for name in before if not is_vision(name)}
    assert text - moved == set()
    assert moved - text == set()


def assert_frozen(model, before: dict[str, torch.Tensor]) -> None:
    assert changed(model, before) == set()


# ---------------------------------------------------------------------------------------------------------- SFT


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_sft_conversational_assistant_only(model_class, tokenizer, tmp_path):
    model = make_model(model_class)
    before = snapshot(model)
    args = training_args(trl.SFTConfig, tmp_path, max_length=64, assistant_only_loss=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=messages_dataset(), processing_class=tokenizer)
    # The chat template's {% generation %} markers give the loss mask: the answer and its <|eot|> only.
    row = trainer.train_dataset[0]
    answer_ids = [i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tokenizer.decode(answer_ids) == "\\boxed{3}<|eot|>"
    trainer.train()
    assert_trained(trainer)
    assert_full_finetune_moved(model, before)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_sft_prompt_completion(model_class, tokenizer, tmp_path):
    dataset = Dataset.from_list([{"prompt": question(a, b), "completion": answer(a + b)} for a, b in SUMS])
    model = make_model(model_class)
    before = snapshot(model)
    args = training_args(trl.SFTConfig, tmp_path, max_length=64)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    row = trainer.train_dataset[0]  # the loss covers the completion only, not the prompt
    completion_ids = [i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tokenizer.decode(completion_ids) == "\\boxed{3}<|eot|>"
    trainer.train()
    assert_trained(trainer)
    assert_full_finetune_moved(model, before)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_sft_lora_on_linears_and_fused_experts(model_class, tokenizer, tmp_path):
    # The vision tower has q/k/v/o_proj too; adapt only the language model's.
    target_modules = LORA_LINEARS
    if model_class is Llama4ForConditionalGeneration:
        target_modules = rf"language_model.*\.({'|'.join(LORA_LINEARS)})"
    peft_config = LoraConfig(target_modules=target_modules, target_parameters=EXPERT_PARAMETERS, lora_dropout=0.0, r=4)
    model = make_model(model_class)
    base_weights = dict(model.named_parameters())  # PEFT wraps the modules but keeps these tensors
    base_before = snapshot(model)
    args = training_args(trl.SFTConfig, tmp_path, max_length=64, learning_rate=1e-2, max_steps=3)
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=messages_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    peft_model = trainer.model
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert not any("vision_model" in name or "multi_modal_projector" in name for name in trainable)
    # 4 layers x 7 linears + 4 layers x 2 fused expert tensors, each with lora_A and lora_B
    assert len(trainable) == 2 * (4 * len(LORA_LINEARS) + 4 * len(EXPERT_PARAMETERS))
    expert_adapters = [m.parameter_name for m in peft_model.modules() if isinstance(m, ParamWrapper)]
    assert sorted(expert_adapters) == ["down_proj"] * 4 + ["gate_up_proj"] * 4
    lora_before = {name: p.detach().clone() for name, p in peft_model.named_parameters() if name in trainable}

    trainer.train()

    assert_trained(trainer, max_steps=3)
    lora_after = dict(peft_model.named_parameters())
    unchanged = {name for name, value in lora_before.items() if torch.equal(lora_after[name].detach(), value)}
    assert unchanged == set()  # every adapter moved, the experts' included
    assert {name for name, p in base_weights.items() if not torch.equal(p.detach(), base_before[name])} == set()


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_sft_moe_aux_loss(model_class, tokenizer, tmp_path):
    model = make_model(model_class)
    text_config = model.config.get_text_config()
    assert text_config.num_experts == text_config.num_local_experts  # the name TRL's aux loss reads
    before = snapshot(model)
    args = training_args(trl.SFTConfig, tmp_path, max_length=64, router_aux_loss_coef=0.01)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=messages_dataset(), processing_class=tokenizer)
    assert trainer.aux_loss_enabled
    assert text_config.output_router_logits and text_config.router_aux_loss_coef == 0.01
    trainer.train()
    step_logs = assert_trained(trainer)
    aux_losses = [log["aux_loss"] for log in step_logs]
    # A load-balancing loss is ~1 when balanced and at most num_experts; 4 experts here.
    assert all(math.isfinite(aux) and 0.5 < aux < text_config.num_local_experts for aux in aux_losses), aux_losses
    assert_full_finetune_moved(model, before)

    # A zero coefficient turns it off: no router logits requested, nothing logged.
    off = trl.SFTTrainer(
        model=make_model(model_class),
        args=training_args(trl.SFTConfig, tmp_path / "off", max_length=64, router_aux_loss_coef=0.0, max_steps=1),
        train_dataset=messages_dataset(),
        processing_class=tokenizer,
    )
    assert not off.aux_loss_enabled and not off.model.config.get_text_config().output_router_logits
    off.train()
    assert all("aux_loss" not in log for log in off.state.log_history)


# ------------------------------------------------------------------------------------------ preference and RL


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_dpo(model_class, tokenizer, tmp_path):
    dataset = Dataset.from_list(
        [{"prompt": question(a, b), "chosen": answer(a + b), "rejected": answer(a + b + 1)} for a, b in SUMS]
    )
    model = make_model(model_class)
    # An in-memory model has no checkpoint for TRL to reload the reference from, so pass it.
    ref_model = copy.deepcopy(model)
    before, ref_before = snapshot(model), snapshot(ref_model)
    args = training_args(trl.DPOConfig, tmp_path, max_length=64)
    trainer = trl.DPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    step_logs = assert_trained(trainer)
    assert step_logs[0]["loss"] == pytest.approx(math.log(2), abs=0.01)  # policy == reference at step 1
    assert_full_finetune_moved(model, before)
    assert_frozen(ref_model, ref_before)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
@pytest.mark.parametrize(
    ("trainer_class", "config_class"),
    [
        pytest.param(trl.GRPOTrainer, trl.GRPOConfig, id="grpo"),
        pytest.param(trl.RLOOTrainer, trl.RLOOConfig, id="rloo"),
    ],
)
def test_group_relative_rl(trainer_class, config_class, model_class, tokenizer, tmp_path):
    model = make_model(model_class)
    before = snapshot(model)
    args = training_args(
        config_class,
        tmp_path,
        num_generations=2,  # generation batch = 2 per device x 1 step: one group of 2 per step
        max_completion_length=8,
        use_vllm=False,
        # beta > 0 makes TRL reload a reference model from `config._name_or_path`, which an in-memory model
        # lacks; test_rl_with_a_reference_model runs beta > 0 from a checkpoint.
        beta=0.0,
    )
    trainer = trainer_class(
        model=model,
        reward_funcs=has_digit_reward,
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    step_logs = assert_trained(trainer)
    assert all(math.isfinite(log["reward"]) and log["reward"] > 0 for log in step_logs)
    assert all("aux_loss" in log for log in step_logs)  # the config's router_aux_loss_coef turns it on
    assert_full_finetune_moved(model, before)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_online_dpo(model_class, tokenizer, tmp_path):
    model = make_model(model_class)
    before = snapshot(model)
    args = training_args(OnlineDPOConfig, tmp_path, max_new_tokens=8, max_length=64)
    trainer = OnlineDPOTrainer(
        model=model,
        reward_funcs=has_digit_reward,
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    assert type(trainer.ref_model) is model_class
    ref_before = snapshot(trainer.ref_model)  # TRL copies the policy as its reference
    trainer.train()
    step_logs = assert_trained(trainer)
    assert all(math.isfinite(log["objective/scores"]) for log in step_logs)
    assert_full_finetune_moved(model, before)
    assert_frozen(trainer.ref_model, ref_before)


# --------------------------------------------------------------------------------------------------- distillation


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_on_policy_distillation(model_class, tokenizer, tmp_path):
    model, teacher = make_model(model_class), make_model(model_class)
    before, teacher_before = snapshot(model), snapshot(teacher)
    args = training_args(trl.DistillationConfig, tmp_path, max_completion_length=8)
    trainer = trl.DistillationTrainer(
        model=model, teacher_model=teacher, args=args, train_dataset=prompt_dataset(), processing_class=tokenizer
    )
    trainer.train()
    step_logs = assert_trained(trainer)
    assert all(log["loss"] > 0 for log in step_logs)  # two different random models disagree
    assert_full_finetune_moved(model, before)
    assert_frozen(teacher, teacher_before)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_gkd(model_class, tokenizer, tmp_path):
    model, teacher = make_model(model_class), make_model(model_class)
    before, teacher_before = snapshot(model), snapshot(teacher)
    # lmbda=1: every step trains on the student's own generations (the on-policy path)
    args = training_args(GKDConfig, tmp_path, max_new_tokens=8, max_length=64, lmbda=1.0)
    trainer = GKDTrainer(
        model=model, teacher_model=teacher, args=args, train_dataset=messages_dataset(), processing_class=tokenizer
    )
    trainer.train()
    step_logs = assert_trained(trainer)
    assert all(log["loss"] > 0 for log in step_logs)
    assert_full_finetune_moved(model, before)
    assert_frozen(teacher, teacher_before)


# --------------------------------------------- trainers that build their own reference or teacher from a path
# With `modeling_llama4` imported (see registration.py), the reference / teacher TRL loads from a Llama 4
# checkpoint is our sparse class, so the trainers need our model and nothing else: no ref_model, no beta=0.


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    for model_class in (Llama4ForCausalLM, Llama4ForConditionalGeneration):
        make_model(model_class).save_pretrained(root / model_class.__name__)
    return root


def load_saved(checkpoints, model_class):
    return model_class.from_pretrained(checkpoints / model_class.__name__)


def assert_ours(trainer, model) -> None:
    model = trainer.accelerator.unwrap_model(model)
    assert type(model) in (Llama4ForCausalLM, Llama4ForConditionalGeneration), type(model)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_dpo_without_ref_model(model_class, checkpoints, tokenizer, tmp_path):
    dataset = Dataset.from_list(
        [{"prompt": question(a, b), "chosen": answer(a + b), "rejected": answer(a + b + 1)} for a, b in SUMS]
    )
    model = load_saved(checkpoints, model_class)
    args = training_args(trl.DPOConfig, tmp_path, max_length=64)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert type(trainer.accelerator.unwrap_model(trainer.ref_model)) is model_class
    ref_before = snapshot(trainer.ref_model)
    trainer.train()
    step_logs = assert_trained(trainer)
    assert step_logs[0]["loss"] == pytest.approx(math.log(2), abs=0.01)  # the reference has the policy's weights
    assert_frozen(trainer.ref_model, ref_before)


def test_kto_without_ref_model(checkpoints, tokenizer, tmp_path):
    rows = [{"prompt": question(a, b), "completion": answer(a + b + (i % 2)), "label": i % 2 == 0}
            for i, (a, b) in enumerate(SUMS)]  # fmt: skip
    model = load_saved(checkpoints, Llama4ForCausalLM)
    args = training_args(trl.KTOConfig, tmp_path, max_length=64)
    trainer = trl.KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    assert_ours(trainer, trainer.ref_model)
    trainer.train()
    assert_trained(trainer)


@pytest.mark.parametrize(
    ("trainer_class", "config_class", "beta"),
    [
        pytest.param(trl.RLOOTrainer, trl.RLOOConfig, None, id="rloo-default-beta"),
        pytest.param(trl.GRPOTrainer, trl.GRPOConfig, 0.04, id="grpo-beta"),
    ],
)
def test_rl_with_a_reference_model(trainer_class, config_class, beta, checkpoints, tokenizer, tmp_path):
    model = load_saved(checkpoints, Llama4ForCausalLM)
    extra = {} if beta is None else {"beta": beta}
    args = training_args(config_class, tmp_path, num_generations=2, max_completion_length=8, use_vllm=False, **extra)
    assert args.beta > 0
    trainer = trainer_class(
        model=model,
        reward_funcs=has_digit_reward,
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    assert_ours(trainer, trainer.ref_model)
    trainer.train()
    step_logs = assert_trained(trainer)
    assert all(math.isfinite(log["kl"]) for log in step_logs)


@pytest.mark.parametrize(
    ("trainer_class", "config_class", "dataset", "extra"),
    [
        pytest.param(
            trl.DistillationTrainer, trl.DistillationConfig, prompt_dataset, {"max_completion_length": 8}, id="distill"
        ),
        pytest.param(GKDTrainer, GKDConfig, messages_dataset, {"max_new_tokens": 8, "max_length": 64}, id="gkd"),
    ],
)
def test_distillation_with_a_teacher_path(
    trainer_class, config_class, dataset, extra, checkpoints, tokenizer, tmp_path
):
    model = make_model(Llama4ForCausalLM)
    args = training_args(config_class, tmp_path, **extra)
    teacher_path = str(checkpoints / "Llama4ForCausalLM")
    trainer = trainer_class(
        model=model, teacher_model=teacher_path, args=args, train_dataset=dataset(), processing_class=tokenizer
    )
    assert_ours(trainer, trainer.teacher_model)
    trainer.train()
    assert_trained(trainer)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_reference_model_reloaded_from_a_checkpoint_is_ours(model_class, tokenizer, tmp_path):
    make_model(model_class).save_pretrained(tmp_path / "checkpoint")  # writes auto_map and our modeling files
    model = model_class.from_pretrained(tmp_path / "checkpoint")
    args = training_args(
        trl.RLOOConfig,
        tmp_path / "out",
        max_steps=1,
        num_generations=2,
        max_completion_length=8,
        beta=0.05,
        trust_remote_code=True,
    )
    trainer = trl.RLOOTrainer(
        model=model,
        reward_funcs=has_digit_reward,
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    assert type(trainer.ref_model) is model_class
    trainer.train()
    assert_trained(trainer, max_steps=1)
