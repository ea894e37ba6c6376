"""Trainers beside TRL's, for what TRL lacks (like `trl/trainer/` beside `trl/scripts/`); recipes import them."""

from .codistill_config import CoDistillationConfig
from .codistill_trainer import (
    CoDistillationLoss,
    CoDistillationTrainer,
    TeacherTopK,
    codistillation_loss,
    soft_weight_at,
)
from .teachers import (
    TeacherLogitsStore,
    check_same_tokenizer,
    generate_teacher_targets,
    load_teacher,
    teacher_fingerprint,
    tokenize_like_sft,
    tokenizer_fingerprint,
    write_teacher_topk,
)

__all__ = [
    "CoDistillationConfig",
    "CoDistillationLoss",
    "CoDistillationTrainer",
    "TeacherLogitsStore",
    "TeacherTopK",
    "check_same_tokenizer",
    "codistillation_loss",
    "generate_teacher_targets",
    "load_teacher",
    "soft_weight_at",
    "teacher_fingerprint",
    "tokenize_like_sft",
    "tokenizer_fingerprint",
    "write_teacher_topk",
]
