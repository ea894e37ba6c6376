"""What every recipe shares, written once: task arguments, model loading, rewards, held-out evaluation, and
training with crash-safe resume and a one-commit Hub push."""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, TrainerCallback, set_seed

import modeling_llama4
from eval.capabilities import CAPABILITIES, capability_group, capability_score, heldout_mixture
from eval.files import respect_umask, write_json_atomic
from eval.generation import generate_completions
from eval.grading import extract_boxed, math_answer_correct
from eval.loading import InputError, load_causal_lm
from eval.loading import load_tokenizer as _load_tokenizer
from eval.tasks import chat_examples, get_task
from modeling_llama4 import Int4Config, quantize_model

from .synthetic import LANGUAGES, LEVELS, arithmetic_problems, capability_sft_rows, mixed_problems
from .validation import check_arguments, check_run_manifest, load_task_dataset, parse_mapping, run_settings


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
        metadata={
            "help": "Config fields (JSON or YAML mapping) to override; given on the command line too, the two are "
            "merged (the command line wins per field)."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use; empty: the one saved with the model."}
    )
    from_scratch: bool = field(
        default=False,
        metadata={"help": "Build a freshly initialised model from the config at model_name_or_path (pretraining)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over in an output_dir that holds a run made with other settings (deletes its checkpoints "
            "and results); without it such a run is refused rather than resumed."
        },
    )
    fp8: bool = field(
        default=False,
        metadata={"help": "Train the policy with FP8-rowwise GEMMs in its experts and linear layers (Hopper GPU)."},
    )
    fp8_emulate: bool = field(
        default=False, metadata={"help": "FP8 emulated on any device (numerics checks; slower than bf16)."}
    )
    load_in_int4: bool = field(
        default=False,
        metadata={"help": "Quantize the experts to int4 while loading (QLoRA with --use_peft; see docs/int4.md)."},
    )
    int4_group_size: int = field(default=128, metadata={"help": "Input features per int4 scale."})
    # The capability mixture (eval/capabilities.py, docs/capabilities.md).
    capabilities: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Train and evaluate on a mixture of generated capabilities from {list(CAPABILITIES)}; empty: the "
            "synthetic arithmetic task alone. The held-out set then has equal parts of each (and of instruction "
            "following under unseen system instructions) and is scored per capability."
        },
    )
    capability_shares: dict | str | None = field(
        default=None,
        metadata={
            "help": "Share of each of --capabilities in the train split (JSON/YAML mapping); empty: equal. A "
            "capability the mapping leaves out gets 0, as in online RL's --mixture_shares."
        },
    )
    capability_system_fraction: float = field(
        default=0.25,
        metadata={
            "help": "SFT with --capabilities: share of the rows outside the instruction family that also get a "
            "train-pool system instruction (reference reply rewritten to satisfy it). RL samples its own."
        },
    )


def task_datasets(
    args: TaskArguments, columns: tuple[str, ...] = (), optional: tuple[str, ...] = ()
) -> tuple[Dataset, Dataset | None]:
    """(train, held-out test) splits: the synthetic task, or `dataset_name` in the same columns (`prompt`, `answer`
    unless `optional`, and the recipe's `columns`), checked by `recipes.validation.load_task_dataset`."""
    if args.dataset_name:
        needed = ("prompt", *(() if "answer" in optional else ("answer",)), *columns)
        train = load_task_dataset(
            args.dataset_name, args.dataset_train_split, needed, split_flag="--dataset_train_split", optional=optional
        )
        test = None
        if args.heldout_problems:
            test = load_task_dataset(
                args.dataset_name, args.dataset_test_split, ("prompt", "answer"), split_flag="--dataset_test_split"
            )
        if test is not None and args.heldout_problems < len(test):
            test = test.select(range(args.heldout_problems))
        return train, test
    kwargs = dict(seed=args.task_seed, languages=args.languages, levels=args.levels)
    if args.capabilities:
        shares = mixture_shares(args)
        if "completion" in columns:  # SFT: reference replies, some under a system instruction
            fraction = args.capability_system_fraction
            train = capability_sft_rows(shares, args.train_problems, system_fraction=fraction, **kwargs)
        else:
            train = mixed_problems(shares, "train", args.train_problems, **kwargs)
        test = heldout_mixture(args.capabilities, args.heldout_problems, **kwargs) if args.heldout_problems else None
        return train, test
    train = arithmetic_problems("train", args.train_problems, **kwargs)
    test = arithmetic_problems("test", args.heldout_problems, **kwargs) if args.heldout_problems else None
    return train, test


def mixture_shares(args: TaskArguments) -> dict[str, float]:
    """--capabilities with their --capability_shares (equal without a mapping, 0 where a mapping leaves one out, as
    --mixture_shares reads), checked (with
    --capability_system_fraction, so that a bad value is refused before a model loads)."""
    fraction = getattr(args, "capability_system_fraction", 0.25)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise InputError(f"--capability_system_fraction must be a number from 0 to 1, got {fraction!r}")
    unknown = sorted(set(args.capabilities or ()) - set(CAPABILITIES))
    if unknown:
        raise InputError(f"--capabilities: no capability {unknown}; choose from {list(CAPABILITIES)}")
    repeated = sorted({name for name in args.capabilities or () if list(args.capabilities).count(name) > 1})
    if repeated:
        raise InputError(f"--capabilities names {repeated} more than once; name each capability once")
    given = parse_mapping(args.capability_shares, "--capability_shares")
    extra = sorted(set(given) - set(args.capabilities or ()))
    if extra:
        raise InputError(f"--capability_shares names {extra}, which --capabilities {args.capabilities} lacks")
    shares = {name: given.get(name, 0.0 if given else 1.0) for name in args.capabilities}
    if any(
        not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0
        for v in shares.values()
    ):
        raise InputError(f"--capability_shares: shares are finite non-negative numbers, got {given}")
    if sum(shares.values()) <= 0:
        raise InputError(f"--capability_shares: at least one share must be above 0, got {given}")
    return shares


def load_model(
    path: str,
    args: TaskArguments | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    flag: str = "--model_name_or_path",
    overrides_flag: str = "--model_config_overrides",
) -> PreTrainedModel:
    """`eval.loading.load_causal_lm` with a recipe's `--model_config_overrides`, `--from_scratch` and
    `--load_in_int4` (experts quantized while loading; a fresh model is quantized once built)."""
    overrides = parse_mapping(args.model_config_overrides, overrides_flag) if args is not None else {}
    int4 = Int4Config(group_size=args.int4_group_size) if args is not None and args.load_in_int4 else None
    from_scratch = bool(args is not None and args.from_scratch)
    model = load_causal_lm(
        path, flag=flag, dtype=None if dtype == "auto" else dtype, trust_remote_code=trust_remote_code,
        config_overrides=overrides, overrides_flag=overrides_flag, from_scratch=from_scratch,
        **({"quantization_config": int4} if int4 is not None and not from_scratch else {}),
    )  # fmt: skip
    return quantize_model(model, int4) if int4 is not None and from_scratch else model


def load_tokenizer(path: str, flag: str = "--tokenizer_name_or_path"):
    """`eval.loading.load_tokenizer`: the tokenizer at `path`, EOS as its pad token where it has none."""
    return _load_tokenizer(path, flag)


# `--use_peft` without targets: PEFT has no defaults for Llama 4 (it raises). Attention, the shared expert and
# dense MLPs by name; the routed experts through `target_parameters` (int4 models: their `experts` module).
DEFAULT_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPERT_LORA_PARAMETERS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]


def peft_config_for(model_args, model: PreTrainedModel):
    """TRL's `get_peft_config(model_args)` with Llama 4 targets when none are given, fitted to an int4 model
    (`--load_in_int4`): its LoRA layers."""
    from trl import get_peft_config

    from modeling_llama4.int4 import Int4TextExperts
    from modeling_llama4.int4_lora import lora_config_for_model

    config = get_peft_config(model_args)
    if config is not None and not config.target_modules and not config.target_parameters:
        config.target_modules = list(DEFAULT_LORA_MODULES)
        int4 = any(isinstance(module, Int4TextExperts) for module in model.modules())
        if int4 or (not config.lora_dropout and not config.use_dora):
            config.target_parameters = list(EXPERT_LORA_PARAMETERS)
        else:  # PEFT's adapters on parameters take neither dropout nor DoRA
            print(f"LoRA: routed experts left out (PEFT adapts them only with --lora_dropout 0 and no DoRA; got "
                  f"dropout {config.lora_dropout}); attention, shared expert and dense MLPs adapted")  # fmt: skip
    return lora_config_for_model(config, model)


def prepare_run(model_args, task_args: TaskArguments, training_args, extra_check=None) -> None:
    """Every check before a model is built (`recipes.validation`): the arguments, the paths, a recipe's
    `extra_check(task_args, training_args, model_args)`, and that `output_dir` holds no run made with other
    settings (recorded in its run manifest, written only once everything passed)."""
    check_arguments(task_args, training_args, model_args)
    if extra_check is not None:
        extra_check(task_args, training_args, model_args)
    if getattr(task_args, "capabilities", None):
        mixture_shares(task_args)
    check_run_manifest(
        training_args.output_dir, run_settings(task_args, training_args, model_args),
        overwrite=task_args.overwrite_output_dir,
    )  # fmt: skip


def model_and_tokenizer(model_args, task_args: TaskArguments, training_args, extra_check=None):
    """The policy and its tokenizer for a recipe, after `prepare_run`'s checks (with `extra_check`), seeded so a
    from-scratch model is the same every run."""
    prepare_run(model_args, task_args, training_args, extra_check)
    set_seed(training_args.seed)
    path = model_args.model_name_or_path
    trust_remote_code = getattr(training_args, "trust_remote_code", False)
    model = load_model(path, task_args, dtype=model_args.dtype, trust_remote_code=trust_remote_code)
    if task_args.fp8 or task_args.fp8_emulate:
        from .fp8 import convert_model_to_fp8

        convert_model_to_fp8(model, emulate=task_args.fp8_emulate)
    if task_args.tokenizer_name_or_path:
        return model, load_tokenizer(task_args.tokenizer_name_or_path)
    return model, load_tokenizer(path, "--model_name_or_path")


# ---------------------------------------------------------------------------------------------------------------
# Rewards (TRL reward-function signature: completions plus dataset columns as keyword lists)
# ---------------------------------------------------------------------------------------------------------------


def _completion_text(completion: str | list[dict]) -> str:
    # Anything but a string or a non-empty message list (None, [], a malformed message) is graded as an empty
    # reply (scored 0) rather than raised: one bad completion must not end an RL run.
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        return content if isinstance(content, str) else ""
    return ""


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


def capability_reward(
    completions: list,
    answer: list[str],
    capability: list[str] | None = None,
    constraint: list[str] | None = None,
    **kwargs,
) -> list[float]:
    """1.0 where the completion is right for its row's capability AND satisfies the row's constraint (if any):
    `eval.capabilities.capability_score` on the `answer`, `capability` and `constraint` columns (math without
    them)."""
    n = len(completions)
    capability, constraint = capability or ["math"] * n, constraint or [""] * n
    if not len(answer) == len(capability) == len(constraint) == n:
        raise ValueError(
            f"capability_reward: {n} completions but {len(answer)} answers, {len(capability)} capabilities and "
            f"{len(constraint)} constraints; pass one of each per completion"
        )
    rows = [{"answer": a, "capability": c, "constraint": k} for a, c, k in zip(answer, capability, constraint)]
    return [capability_score(_completion_text(c), row) for c, row in zip(completions, rows, strict=True)]


def dataset_pass_rates(samples: list[list[str]], dataset: Dataset) -> list[float]:
    """Share of each row's samples that are right: math-verify on `answer`, or `capability_score` for rows with a
    `capability` column (the judge filter's grader)."""
    if "capability" not in dataset.column_names:
        grade = [lambda text, gold=str(gold): float(math_answer_correct(text, gold)) for gold in dataset["answer"]]
    else:
        grade = [lambda text, row=row: capability_score(text, row) for row in dataset]
    return [sum(map(g, outputs)) / len(outputs) for outputs, g in zip(samples, grade)]


REWARD_FUNCTIONS = {
    "accuracy_reward": accuracy_reward,
    "format_reward": format_reward,
    "capability_reward": capability_reward,
}


def reward_function(name: str):
    """A reward by name (`accuracy_reward`, `format_reward`) or dotted import path (`my_pkg.rewards.f`), as in
    TRL's GRPO script."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    module_name, _, attribute = name.rpartition(".")
    if not module_name:
        raise InputError(f"unknown reward function {name!r}: use one of {sorted(REWARD_FUNCTIONS)} or a dotted path")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise InputError(f"cannot import reward function {name!r}: {error}") from error
    _check_reward_signature(name, function)
    return function


# What TRL passes every reward function by keyword, besides the dataset's columns.
_TRL_REWARD_ARGUMENTS = {"prompts", "completions", "completion_ids", "trainer_state"}


def _check_reward_signature(name: str, function: Any) -> None:
    """TRL calls `f(prompts=..., completions=..., completion_ids=..., **columns)` and expects one float per
    completion; a function it cannot call that way would fail at the first step, deep inside TRL."""
    usage = "define it as def f(completions, **kwargs) -> list[float] (one score per completion)"
    if not callable(function):
        raise InputError(f"reward function {name!r} is a {type(function).__name__}, not a function: {usage}")
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # builtins and C functions: nothing to read
        return
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if "completions" not in names and not takes_any:
        raise InputError(
            f"reward function {name!r} takes ({', '.join(sorted(names))}), but TRL calls it with the keywords "
            f"{sorted(_TRL_REWARD_ARGUMENTS)} and the dataset's columns (e.g. answer): {usage}"
        )


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
    blind_control: bool = False,
) -> dict[str, Any]:
    """Greedy pass@1 on `dataset` (`prompt`, `answer`), overall and per `level` / `language` when present, plus
    the share of answers that carry a `\\boxed{}`. Graded by the eval harness's `synthetic` task, the same
    task `python -m eval --tasks synthetic` runs; rows with a `capability` column (`--capabilities`) by
    `eval.capabilities.capability_score`, also reported per capability (`accuracy_by_capability`)."""
    if "images" in dataset.column_names:  # the visual task: `tokenizer` is the processor (recipes/visual.py)
        from eval.visual import visual_heldout

        return visual_heldout(
            model, tokenizer, dataset, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
            desc=desc, blind_control=blind_control,
        )  # fmt: skip
    task = get_task("synthetic")
    examples = chat_examples(dataset)
    completions = generate_completions(
        model, tokenizer, [example.messages for example in examples], max_new_tokens=max_new_tokens,
        batch_size=batch_size, progress=progress, desc=desc,
    )  # fmt: skip
    if "capability" in dataset.column_names:
        correct = [bool(capability_score(samples[0], row)) for samples, row in zip(completions, dataset)]
    else:
        correct = [task.grade(samples[0], example)[0] for samples, example in zip(completions, examples)]
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
    if "capability" in dataset.column_names:
        groups = defaultdict(list)
        for row, ok in zip(dataset, correct):
            groups[capability_group(row)].append(ok)
        result["accuracy_by_capability"] = {k: sum(v) / len(v) for k, v in sorted(groups.items())}
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
    done = [path for path in folder.glob("checkpoint-*") if path.name.split("-")[-1].isdigit() and _complete(path)]
    return str(max(done, key=lambda path: int(path.name.split("-")[-1]))) if done else None


# What holds a checkpoint's weights: safetensors / torch files, or FSDP's and DeepSpeed's folders.
_CHECKPOINT_WEIGHTS = ("*.safetensors", "*.bin", "pytorch_model_fsdp*", "global_step*")


def _complete(checkpoint: Path) -> bool:
    """A readable `trainer_state.json` (written last), weights, and safetensors headers that parse: a checkpoint
    damaged after the fact (truncated or deleted files) is passed over for an older complete one."""
    from safetensors import safe_open

    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        if not any(any(checkpoint.glob(pattern)) for pattern in _CHECKPOINT_WEIGHTS):
            return False
        for file in checkpoint.glob("*.safetensors"):
            with safe_open(str(file), "pt"):
                pass
    except Exception:  # missing, unreadable or truncated: not a checkpoint to resume from
        return False
    return True


def train_resumably(trainer, training_args) -> None:
    """`trainer.train()`, resuming from `--resume_from_checkpoint` or else the last complete checkpoint in
    `output_dir`, so re-running a killed command picks up where it stopped."""
    resume = training_args.resume_from_checkpoint
    if resume is None or str(resume).lower() == "true":  # "true": the last complete one, as a re-run picks
        resume = last_complete_checkpoint(training_args.output_dir)
    if resume:
        _check_resumable(Path(resume))
        print(f"resuming from {resume}")
    trainer.add_callback(ReadableCheckpoints())
    trainer.train(resume_from_checkpoint=resume)


# Optimizer state as the Trainer, FSDP (accelerate) and DeepSpeed save it.
_OPTIMIZER_STATE = ("optimizer.pt", "optimizer.bin", "optimizer_*", "global_step*")


def _check_resumable(checkpoint: Path) -> None:
    """The Trainer resumes a checkpoint without optimizer state with a fresh optimizer, without a word: Adam's
    moments restart, a different run from the one resumed. Refuse it, with the ways out."""
    if checkpoint.is_dir() and not any(any(checkpoint.glob(pattern)) for pattern in _OPTIMIZER_STATE):
        raise InputError(
            f"{checkpoint} has no optimizer state (optimizer.pt; a checkpoint saved with --save_only_model, or the "
            "file was lost), so it cannot be resumed exactly. Restore the file, resume an older checkpoint with "
            f"--resume_from_checkpoint, or train on from its weights as a new run: --model_name_or_path {checkpoint} "
            "with another --output_dir."
        )


class ReadableCheckpoints(TrainerCallback):
    """Checkpoints get the umask's permissions: safetensors writes its files owner-only (see `eval.files`)."""

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            respect_umask(folder)


def push(trainer, training_args, recipe: str, eval_results: dict[str, float] | None = None) -> None:
    """With `--push_to_hub`: upload weights, code, tokenizer and model card in one commit through
    `modeling_llama4.push_to_hub` (our model) or the Trainer's own push. A failed upload (offline, no token) is one
    `InputError` saying the model is saved and how to push it later."""
    if not getattr(training_args, "push_to_hub_requested", training_args.push_to_hub):
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not trainer.accelerator.is_main_process:
        return
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
    try:
        if isinstance(model, modeling_llama4.Llama4PreTrainedModel):
            url = modeling_llama4.push_to_hub(
                model, repo_id, processor=trainer.processing_class, recipe=recipe, eval_results=eval_results,
                private=bool(training_args.hub_private_repo), token=training_args.hub_token,
            )  # fmt: skip
        else:
            url = trainer.push_to_hub()
    except Exception as error:  # the Hub client raises many types (connection, HTTP, offline mode, auth)
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(
            f"--push_to_hub: uploading to {repo_id!r} failed ({type(error).__name__}: {first[:300]}). The model is "
            f"saved in {training_args.output_dir} with its results.json; push it once online (and logged in, "
            "`hf auth login`) with modeling_llama4.push_to_hub, or rerun the same command."
        ) from error
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
    """After training: held-out evaluation, save the final model, write `results.json`, then push (with
    `--push_to_hub`); returns the results with the log history."""
    results = dict(results or {})
    if heldout is not None:
        results["heldout"] = heldout_accuracy(
            trainer.model, tokenizer, heldout, max_new_tokens=script_args.heldout_max_new_tokens,
            batch_size=script_args.heldout_batch_size, blind_control=getattr(script_args, "blind_control", False),
        )  # fmt: skip
        print(f"held-out accuracy after {recipe}: {results['heldout']['accuracy']:.1%}")
    accuracy = results.get("heldout", {}).get("accuracy")
    trainer.save_model(training_args.output_dir)
    respect_umask(training_args.output_dir)
    # Results before the push: a failed upload leaves a finished, evaluated run behind.
    write_json_atomic(Path(training_args.output_dir) / "results.json", results)
    push(trainer, training_args, recipe, {"heldout_accuracy": accuracy} if accuracy is not None else None)
    return {**results, "log_history": trainer.state.log_history}


def defer_hub_push(training_args) -> None:
    """Keep the Trainer from pushing every checkpoint on its own (without our code and card); `save_and_push`
    uploads once at the end."""
    training_args.push_to_hub_requested = training_args.push_to_hub
    training_args.push_to_hub = False
