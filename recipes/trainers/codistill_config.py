"""Configuration of the codistillation trainer: TRL's `SFTConfig` plus the teacher and the soft/hard balance."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

WEIGHTINGS = ("schedule", "adaptive", "adaptive_argmax")
SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class CoDistillationConfig(SFTConfig):
    r"""
    Configuration for [`CoDistillationTrainer`]: every [`~trl.SFTConfig`] field (data handling, completion-only and
    assistant-only masks, packing, `router_aux_loss_coef`) plus the fields below.

    The per-token loss is `w * soft + (1 - w) * hard` (plus the router losses): a KL to the teacher's softened
    distribution against the cross-entropy to the label, with the weight w set per token by `weighting`. The formulas
    are written once, in the docstring of `recipes/trainers/codistill_trainer.py`.

    Parameters:
        temperature (`float`, defaults to `1.0`): softmax temperature T of the soft term (the KL is scaled by T^2 so
            that its gradients keep their size as T changes).
        weighting (`str`, defaults to `"adaptive"`): `"schedule"` (w = s(t)), `"adaptive"` (s(t) scaled down where
            the teacher is confidently wrong) or `"adaptive_argmax"` (soft only where the teacher's top token is the
            label).
        soft_weight_start / soft_weight_end (`float`, default `1.0` / `0.5`): s(t) at the first and last step.
        soft_weight_schedule (`str`, defaults to `"linear"`): `"constant"` (always `soft_weight_start`), `"linear"`
            or `"cosine"`.
        teacher_confidence_threshold (`float`, defaults to `0.0`): `adaptive_argmax` only; tokens where the teacher
            gives the label less probability than this get the hard target alone.
        teacher_model_name_or_path / teacher_model_init_kwargs: the online teacher when the trainer gets a path.
        teacher_logits_path (`str`, *optional*): a directory written by `write_teacher_topk`; replaces the online
            teacher.
        seq_kd (`bool`, defaults to `False`): sequence-level distillation: before training, the teacher's completions
            of the train prompts replace the dataset's completions as the targets.
        seq_kd_max_new_tokens / seq_kd_temperature / seq_kd_batch_size: generation settings for `seq_kd`
            (temperature 0: greedy).
        seq_kd_keep_gold_when_wrong (`bool`, defaults to `False`): with an `answer` column, keep the dataset's own
            completion where the teacher's final answer is wrong.
    """

    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the soft (KL) term."})
    weighting: str = field(
        default="adaptive",
        metadata={"help": "How w (the soft-target weight) is set: 'schedule', 'adaptive' or 'adaptive_argmax'."},
    )
    soft_weight_start: float = field(default=1.0, metadata={"help": "Soft-target weight s(t) at the first step."})
    soft_weight_end: float = field(default=0.5, metadata={"help": "Soft-target weight s(t) at the last step."})
    soft_weight_schedule: str = field(
        default="linear", metadata={"help": "Shape of s(t): 'constant', 'linear' or 'cosine'."}
    )
    teacher_confidence_threshold: float = field(
        default=0.0,
        metadata={"help": "adaptive_argmax: hard target alone where the teacher's p(label) is below this."},
    )
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Online teacher (path or Hub id) when the trainer is given none."}
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Keyword arguments for the teacher's `from_pretrained` (JSON on the CLI)."}
    )
    teacher_logits_path: str | None = field(
        default=None, metadata={"help": "Directory of precomputed top-k teacher log-probs (`write_teacher_topk`)."}
    )
    seq_kd: bool = field(
        default=False, metadata={"help": "Train on the teacher's own completions of the prompts (sequence-level)."}
    )
    seq_kd_max_new_tokens: int = field(default=128, metadata={"help": "Generation budget per seq_kd completion."})
    seq_kd_temperature: float = field(default=0.0, metadata={"help": "seq_kd sampling temperature (0: greedy)."})
    seq_kd_batch_size: int = field(default=16, metadata={"help": "Sequences per generate call for seq_kd."})
    seq_kd_keep_gold_when_wrong: bool = field(
        default=False,
        metadata={
            "help": "seq_kd: keep the dataset's completion where the teacher's answer is wrong (needs `answer`)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.teacher_model_init_kwargs, str):
            self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.soft_weight_schedule not in SCHEDULES:
            raise ValueError(f"soft_weight_schedule must be one of {SCHEDULES}, got {self.soft_weight_schedule!r}")
        for name in ("soft_weight_start", "soft_weight_end", "teacher_confidence_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
