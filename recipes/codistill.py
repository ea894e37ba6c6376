"""Codistillation: a student learns from a teacher's soft targets and the hard labels, balanced per token.

    accelerate launch recipes/codistill.py --config recipes/configs/codistill_tiny.yaml \
        --teacher_model_name_or_path PATH [--model_name_or_path PATH]

The loss and its w_t rule live in `recipes/trainers/codistill_trainer.py` (`CoDistillationTrainer`); this script is
glue. Teachers:

- online (`teacher_model_name_or_path`): a bigger model run beside the student on every batch;
- precomputed (`teacher_logits_path`): with a teacher given too, its top-k log-probs are first written there
  (resumable; `--write_teacher_logits_only true` stops after that, e.g. on the teacher's own machines), then the
  student trains from the files alone;
- sequence-level (`--seq_kd true`): the teacher's completions of the train prompts become the targets.

Re-running a killed command resumes from the last complete checkpoint; `--push_to_hub` uploads once at the end.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import ModelConfig

from recipes.common import (
    TaskArguments,
    defer_hub_push,
    finish_recipe,
    load_model,
    model_and_tokenizer,
    peft_config_for,
    task_datasets,
    train_resumably,
)
from recipes.trainers import CoDistillationConfig, CoDistillationTrainer, write_teacher_topk
from recipes.trainers.teachers import METADATA
from recipes.validation import InputError, parse_mapping, run_recipe


@dataclass
class CoDistillScriptArguments(TaskArguments):
    teacher_config_overrides: dict | str | None = field(
        default=None, metadata={"help": "Config fields (JSON or YAML mapping) for a teacher built from a config."}
    )
    teacher_from_scratch: bool = field(
        default=False,
        metadata={
            "help": "Build the teacher freshly initialised from its config (smoke runs only: it knows nothing)."
        },
    )
    teacher_logits_top_k: int = field(default=32, metadata={"help": "Top-k kept when writing teacher logits."})
    teacher_logits_shard_size: int = field(default=1024, metadata={"help": "Rows per teacher-logits shard."})
    write_teacher_logits_only: bool = field(
        default=False, metadata={"help": "Write the teacher logits to teacher_logits_path, then exit."}
    )


def _vocab_size(path: str, overrides: Any, flag: str, overrides_flag: str) -> int | None:
    """The vocabulary a model at `path` (with its config overrides) predicts over, read from its config alone."""
    from transformers import AutoConfig

    vocab = parse_mapping(overrides, overrides_flag).get("vocab_size")
    if vocab is None:
        try:
            vocab = AutoConfig.from_pretrained(path).get_text_config().vocab_size
        except (OSError, ValueError):  # a Hub id offline: the loading itself says so, with its own message
            return None
    return vocab


def check_teacher(script_args: CoDistillScriptArguments, training_args: CoDistillationConfig, model_args) -> None:
    """The teacher settings, checked from the configs before either model loads (the trainer's own checks run
    with both models in memory)."""
    teacher, logits = training_args.teacher_model_name_or_path, training_args.teacher_logits_path
    if not teacher and not logits:
        raise InputError(
            "codistillation needs a teacher: --teacher_model_name_or_path (a model run beside the student) or "
            "--teacher_logits_path (top-k logits written earlier, or to write with the teacher given too)"
        )
    if logits and not teacher and not (Path(logits).expanduser() / METADATA).is_file():
        raise InputError(
            f"--teacher_logits_path {logits!r} holds no teacher logits ({METADATA} missing): write them first with "
            "--teacher_model_name_or_path given too (and --write_teacher_logits_only true to stop after that)"
        )
    student = _vocab_size(
        model_args.model_name_or_path, script_args.model_config_overrides, "--model_name_or_path",
        "--model_config_overrides",
    )  # fmt: skip
    if teacher:
        teacher_vocab = _vocab_size(
            teacher, script_args.teacher_config_overrides, "--teacher_model_name_or_path", "--teacher_config_overrides"
        )
        if None not in (student, teacher_vocab) and student != teacher_vocab:
            raise InputError(
                f"the student predicts over {student} tokens but the teacher --teacher_model_name_or_path {teacher!r} "
                f"over {teacher_vocab}: distillation compares next-token distributions, so they must share the "
                "tokenizer and vocabulary"
            )
        top_k = script_args.teacher_logits_top_k
        if logits and teacher_vocab is not None and not 2 <= top_k < teacher_vocab:
            raise InputError(
                f"--teacher_logits_top_k {top_k}: must be from 2 to {teacher_vocab - 1} (below the teacher's "
                "vocabulary); 32 keeps almost all of a trained teacher's probability mass"
            )


def load_teacher_model(script_args: CoDistillScriptArguments, training_args: CoDistillationConfig, model_args):
    teacher_args = dataclasses.replace(
        script_args,
        model_config_overrides=script_args.teacher_config_overrides,
        from_scratch=script_args.teacher_from_scratch,
    )
    dtype = (training_args.teacher_model_init_kwargs or {}).get("dtype", model_args.dtype)
    return load_model(
        training_args.teacher_model_name_or_path,
        teacher_args,
        dtype=dtype,
        trust_remote_code=training_args.trust_remote_code,
        flag="--teacher_model_name_or_path",
        overrides_flag="--teacher_config_overrides",
    )


def main(
    script_args: CoDistillScriptArguments, training_args: CoDistillationConfig, model_args: ModelConfig
) -> dict[str, Any]:
    model, tokenizer = model_and_tokenizer(model_args, script_args, training_args, extra_check=check_teacher)
    train, heldout = task_datasets(script_args, ("completion",))
    train = train.select_columns(["prompt", "completion"] + (["answer"] if training_args.seq_kd else []))

    teacher = None
    if training_args.teacher_model_name_or_path:
        teacher = load_teacher_model(script_args, training_args, model_args)
    if training_args.teacher_logits_path and teacher is not None:
        counts = write_teacher_topk(
            teacher, tokenizer, train, training_args.teacher_logits_path, args=training_args,
            top_k=script_args.teacher_logits_top_k, temperature=training_args.temperature,
            shard_size=script_args.teacher_logits_shard_size,
        )  # fmt: skip
        print(f"teacher logits in {training_args.teacher_logits_path}: {counts}")
        if script_args.write_teacher_logits_only:
            return {"teacher_logits": counts}
        # From here the files are the teacher: the model need not stay in memory beside the student.
        teacher, training_args.teacher_model_name_or_path = None, None

    defer_hub_push(training_args)
    trainer = CoDistillationTrainer(
        model=model,
        teacher_model=teacher,
        args=training_args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_config_for(model_args, model),
    )
    train_resumably(trainer, training_args)
    return finish_recipe(trainer, tokenizer, heldout, script_args, training_args, "codistillation")


if __name__ == "__main__":
    run_recipe(main, (CoDistillScriptArguments, CoDistillationConfig, ModelConfig))
