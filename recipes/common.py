"""What every recipe shares, written once: task arguments, model loading, rewards, held-out evaluation, and
training with crash-safe resume and a one-commit Hub push."""

from __future__ import annotations

import importlib
import json
import os
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, set_seed

import modeling_llama4
from eval.generation import generate_completions
from eval.grading import extract_boxed, math_answer_correct
from modeling_llama4 import Int4Config, Llama4ForCausalLM, Llama4TextConfig, quantize_model

from .synthetic import LANGUAGES, LEVELS, arithmetic_problems

LLAMA4_MODEL_TYPES = ("llama4", "llama4_text")


@dataclass
class TaskArguments:
    """Where a recipe's prompts come from and how it evaluates. The default is the bundled synthetic task."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A dataset (Hub id or local path/json) with `prompt` (chat messages) and `answer` columns, and "
            "`completion` for SFT. Empty: the bundled synthetic arithmetic task."
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split of `dataset_name` to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split of `dataset_name` to evaluate on."})
    train_problems: int = field(default=2000, metadata={"help": "Synthetic train problems."})
    heldout_problems: int = field(default=200, metadata={"help": "Held-out problems for evaluation (0: skip)."})
    task_seed: int = field(default=0, metadata={"help": "Seed of the synthetic task."})
    languages: list[str] = field(default_factory=lambda: list(LANGUAGES), metadata={"help": "Synthetic languages."})
    levels: list[int] = field(default_factory=lambda: list(LEVELS), metadata={"help": "Synthetic difficulty levels."})
    heldout_max_new_tokens: int = field(default=48, metadata={"help": "Generation budget per held-out answer."})
    heldout_batch_size: int = field(default=64, metadata={"help": "Sequences per generate call in evaluation."})
    model_config_overrides: dict | str | None = field(
        default=None,
        metadata={"help": "Config fields (JSON or YAML mapping) to override when building a model from a config."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use; empty: the one saved with the model."}
    )
    from_scratch: bool = field(
        default=False,
        metadata={"help": "Build a freshly initialised model from the config at model_name_or_path (pretraining)."},
    )
    load_in_int4: bool = field(
        default=False,
        metadata={"help": "Quantize the experts to int4 while loading (QLoRA with --use_peft; see docs/int4.md)."},
    )
    int4_group_size: int = field(default=128, metadata={"help": "Input features per int4 scale."})


def task_datasets(args: TaskArguments) -> tuple[Dataset, Dataset | None]:
    """(train, held-out test) splits: the synthetic task, or `dataset_name` in the same columns."""
    if args.dataset_name:
        train = load_dataset(args.dataset_name, split=args.dataset_train_split)
        test = load_dataset(args.dataset_name, split=args.dataset_test_split) if args.heldout_problems else None
        missing = {"prompt", "answer"} - set(train.column_names)
        if missing:
            raise ValueError(
                f"dataset {args.dataset_name!r} lacks columns {sorted(missing)}: recipes need `prompt` (chat messages) "
                "and `answer` (the gold final answer), plus `completion` for SFT"
            )
        if test is not None and args.heldout_problems < len(test):
            test = test.select(range(args.heldout_problems))
        return train, test
    kwargs = dict(seed=args.task_seed, languages=args.languages, levels=args.levels)
    train = arithmetic_problems("train", args.train_problems, **kwargs)
    test = arithmetic_problems("test", args.heldout_problems, **kwargs) if args.heldout_problems else None
    return train, test


def _overrides(args: TaskArguments) -> dict[str, Any]:
    if not args.model_config_overrides:
        return {}
    if isinstance(args.model_config_overrides, str):
        return json.loads(args.model_config_overrides)
    return dict(args.model_config_overrides)


def load_model(
    path: str, args: TaskArguments | None = None, *, dtype: str | torch.dtype | None = None, trust_remote_code=False
) -> PreTrainedModel:
    """Our `Llama4ForCausalLM` for any Llama 4 repo (ours, transformers' or an official multimodal one: its text
    half), built fresh from the config when `from_scratch`; any other causal LM through the Auto classes."""
    overrides = _overrides(args) if args is not None else {}
    dtype = _torch_dtype(dtype)
    int4 = Int4Config(group_size=args.int4_group_size) if args is not None and args.load_in_int4 else None
    if args is not None and args.from_scratch:
        config = Llama4TextConfig.from_pretrained(path, **overrides)
        model = Llama4ForCausalLM(config)
        model = model.to(dtype) if dtype is not None else model
        return quantize_model(model, int4) if int4 is not None else model
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    kwargs |= {"quantization_config": int4} if int4 is not None else {}
    if config.model_type in LLAMA4_MODEL_TYPES:
        return Llama4ForCausalLM.from_pretrained(path, **overrides, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **overrides, **kwargs)


def peft_config_for(model_args, model: PreTrainedModel):
    """TRL's `get_peft_config(model_args)`, fitted to an int4 model (`--load_in_int4`): its LoRA layers."""
    from trl import get_peft_config

    from modeling_llama4.int4_lora import lora_config_for_model

    return lora_config_for_model(get_peft_config(model_args), model)


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype in (None, "auto"):
        return None
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)


def load_tokenizer(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_and_tokenizer(model_args, task_args: TaskArguments, training_args):
    """The policy and its tokenizer for a recipe, seeded so a from-scratch model is the same every run."""
    set_seed(training_args.seed)
    path = model_args.model_name_or_path
    trust_remote_code = getattr(training_args, "trust_remote_code", False)
    model = load_model(path, task_args, dtype=model_args.dtype, trust_remote_code=trust_remote_code)
    return model, load_tokenizer(task_args.tokenizer_name_or_path or path)


# ---------------------------------------------------------------------------------------------------------------
# Rewards (TRL reward-function signature: completions plus dataset columns as keyword lists)
# ---------------------------------------------------------------------------------------------------------------


def _completion_text(completion: str | list[dict]) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def accuracy_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 where the completion's final answer equals the gold `answer` (math-verify, via `eval.grading`)."""
    return [float(math_answer_correct(_completion_text(c), str(a))) for c, a in zip(completions, answer)]


_FORMAT_RE = re.compile(r"\\boxed\{[^{}]+\}\.?\s*$")


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 where the completion ends with exactly one `\\boxed{...}` answer (nothing rambles on after it)."""
    scores = []
    for completion in completions:
        text = _completion_text(completion)
        scores.append(float(text.count("\\boxed") == 1 and bool(_FORMAT_RE.search(text))))
    return scores


REWARD_FUNCTIONS = {"accuracy_reward": accuracy_reward, "format_reward": format_reward}


def reward_function(name: str):
    """A reward by name (`accuracy_reward`, `format_reward`) or dotted import path (`my_pkg.rewards.f`), as in
    TRL's GRPO script."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    module_name, _, attribute = name.rpartition(".")
    if not module_name:
        raise ValueError(f"unknown reward function {name!r}: use one of {sorted(REWARD_FUNCTIONS)} or a dotted path")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import reward function {name!r}: {error}") from error


# ---------------------------------------------------------------------------------------------------------------
# Held-out evaluation
# ---------------------------------------------------------------------------------------------------------------


def heldout_accuracy(
    model: PreTrainedModel,
    tokenizer,
    dataset: Dataset,
    *,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "held-out eval",
) -> dict[str, Any]:
    """Greedy pass@1 on `dataset` (`prompt`, `answer`), overall and per `level` / `language` when present, plus
    the share of answers that carry a `\\boxed{}`."""
    completions = generate_completions(
        model, tokenizer, list(dataset["prompt"]), max_new_tokens=max_new_tokens, batch_size=batch_size,
        progress=progress, desc=desc,
    )  # fmt: skip
    correct = [math_answer_correct(samples[0], str(gold)) for samples, gold in zip(completions, dataset["answer"])]
    result: dict[str, Any] = {
        "accuracy": sum(correct) / len(correct),
        "boxed_rate": sum(extract_boxed(samples[0]) is not None for samples in completions) / len(completions),
        "num_problems": len(correct),
        "correct": [int(ok) for ok in correct],  # per problem, for paired comparisons between stages
    }
    for column in ("level", "language"):
        if column in dataset.column_names:
            groups = defaultdict(list)
            for key, ok in zip(dataset[column], correct):
                groups[key].append(ok)
            result[f"accuracy_by_{column}"] = {str(k): sum(v) / len(v) for k, v in sorted(groups.items())}
    result["examples"] = [
        {"prompt": p[-1]["content"], "answer": str(a), "output": c[0]}
        for p, a, c in list(zip(dataset["prompt"], dataset["answer"], completions))[:3]
    ]
    return result


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, resume, saving, Hub
# ---------------------------------------------------------------------------------------------------------------


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` that finished writing. The Trainer writes `trainer_state.json` last, so a
    checkpoint cut off by a crash (no state file) is skipped rather than resumed from half-written files."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    done = [
        path
        for path in folder.glob("checkpoint-*")
        if path.name.split("-")[-1].isdigit() and (path / "trainer_state.json").is_file()
    ]
    return str(max(done, key=lambda path: int(path.name.split("-")[-1]))) if done else None


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        temporary = handle.name
    os.replace(temporary, path)


def train_resumably(trainer, training_args) -> None:
    """`trainer.train()`, resuming from `--resume_from_checkpoint` or else the last complete checkpoint in
    `output_dir`, so re-running a killed command picks up where it stopped."""
    resume = training_args.resume_from_checkpoint or last_complete_checkpoint(training_args.output_dir)
    if resume:
        print(f"resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)


def save_and_push(trainer, training_args, recipe: str, eval_results: dict[str, float] | None = None) -> None:
    """Save the final model and tokenizer to `output_dir`; with `--push_to_hub`, upload weights, code, tokenizer
    and model card in one commit through `modeling_llama4.push_to_hub` (our model) or the Trainer's own push."""
    trainer.save_model(training_args.output_dir)
    if not getattr(training_args, "push_to_hub_requested", training_args.push_to_hub):
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.accelerator.is_main_process:
        repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
        if isinstance(model, modeling_llama4.Llama4PreTrainedModel):
            url = modeling_llama4.push_to_hub(
                model, repo_id, processor=trainer.processing_class, recipe=recipe, eval_results=eval_results,
                private=bool(training_args.hub_private_repo), token=training_args.hub_token,
            )  # fmt: skip
        else:
            url = trainer.push_to_hub()
        print(f"pushed to {url}")


def finish_recipe(
    trainer,
    tokenizer,
    heldout: Dataset | None,
    script_args: TaskArguments,
    training_args,
    recipe: str,
    results: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """After training: held-out evaluation, save (and push) the final model, write `results.json` last; returns
    the results with the log history."""
    results = dict(results or {})
    if heldout is not None:
        results["heldout"] = heldout_accuracy(
            trainer.model, tokenizer, heldout, max_new_tokens=script_args.heldout_max_new_tokens,
            batch_size=script_args.heldout_batch_size,
        )  # fmt: skip
        print(f"held-out accuracy after {recipe}: {results['heldout']['accuracy']:.1%}")
    accuracy = results.get("heldout", {}).get("accuracy")
    save_and_push(trainer, training_args, recipe, {"heldout_accuracy": accuracy} if accuracy is not None else None)
    write_json_atomic(Path(training_args.output_dir) / "results.json", results)
    return {**results, "log_history": trainer.state.log_history}


def defer_hub_push(training_args) -> None:
    """Keep the Trainer from pushing every checkpoint on its own (without our code and card); `save_and_push`
    uploads once at the end."""
    training_args.push_to_hub_requested = training_args.push_to_hub
    training_args.push_to_hub = False
