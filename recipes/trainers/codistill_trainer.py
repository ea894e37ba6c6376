"""Codistillation: SFT whose per-token loss balances the teacher's soft targets against the hard labels.

Meta's Llama 4 blog: Behemoth taught Scout and Maverick with "a novel distillation loss function that dynamically
weights the soft and hard targets through training"; the formula is not published. Ours, per target token i at
training progress t in [0, 1]:

    loss_i = w_i * soft_i + (1 - w_i) * hard_i                   (+ the router losses, once per batch)
    soft_i = T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))
    hard_i = -log softmax(z_student)[y_i]
    w_i    = s(t)                                                  weighting="schedule"
    w_i    = s(t) * (1 - max_{v != y_i} p_teacher(v))              weighting="adaptive" (the default)
    w_i    = s(t) * 1[argmax p_teacher = y_i] * p_teacher(y_i)     weighting="adaptive_argmax" (0 where p_teacher(y_i)
                                                                   is below teacher_confidence_threshold)

with teacher probabilities p_teacher at T = 1, and s(t) moving from `soft_weight_start` to `soft_weight_end`
(constant, linear or cosine). This docstring is the one statement of the loss; the config, the YAML and the
benchmark refer to it.

"adaptive" trusts the soft target where the teacher is right and sure (no other token gets much probability:
w -> s(t)) and hands the token to the label where the teacher is confidently wrong (another token near probability
1: w -> 0). Where the teacher is unsure it keeps much of the soft target, because there its spread-out distribution
is the information the one-hot label lacks (a random name or number in a problem has no single right answer).
"adaptive_argmax" is the stricter reading, soft only where the teacher's argmax is the label, scaled by its
confidence, i.e. mostly on tokens where the soft target nearly equals the label. In `benchmarks/bench_codistill.py`
(one run per arm, two student corpus sizes) "adaptive" gave a lower held-out cross-entropy than hard labels alone
in both, while "adaptive_argmax" did not beat hard labels in either. Losses are summed over target tokens (labels != -100)
and divided by their number, like SFT's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedModel
from trl import SFTTrainer
from trl.models import prepare_deepspeed

from .codistill_config import WEIGHTINGS, CoDistillationConfig
from .teachers import (
    TOPK_KEYS,
    TeacherLogitsStore,
    TeacherTopKCollator,
    check_same_tokenizer,
    generate_teacher_targets,
    load_teacher,
    output_vocab_size,
    teacher_tokenizer_for,
)


def soft_weight_at(progress: float, start: float, end: float, schedule: str) -> float:
    """s(t): the soft-target weight at `progress` in [0, 1] of training."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown soft_weight_schedule {schedule!r}")


@dataclass
class TeacherTopK:
    """Precomputed teacher targets, positions aligned with the logits: (B, L, k) ids and log-probs at the
    distillation temperature (most likely first), (B, L) log-probs at T = 1 of the token that follows, and (B, L, 2)
    log-probs at T = 1 of the two most likely tokens (what the adaptive weights read)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    target_logprobs: torch.Tensor
    top2_logprobs: torch.Tensor


@dataclass
class CoDistillationLoss:
    """The loss to backpropagate and the sums the trainer logs (detached; divide by `num_tokens`)."""

    loss: torch.Tensor
    soft_sum: torch.Tensor
    hard_sum: torch.Tensor
    weight_sum: torch.Tensor
    teacher_correct: torch.Tensor
    student_correct: torch.Tensor
    num_tokens: torch.Tensor


def _soft_full(student_log_probs_t: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    teacher_log_probs_t = torch.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(student_log_probs_t, teacher_log_probs_t, reduction="none", log_target=True).sum(-1)


def _soft_topk(student_log_probs_t: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    # KL over the k stored tokens plus one "everything else" bucket: the teacher's tail mass 1 - sum(top-k) against
    # the student's mass outside the same k tokens. Exact for the coarsened distributions (no renormalisation, which
    # would let the student put mass outside the teacher's top-k for free); a lower bound on the full KL.
    teacher_p = logprobs.exp()
    student_k = student_log_probs_t.gather(-1, ids)
    student_tail = student_log_probs_t.scatter(-1, ids, float("-inf")).logsumexp(-1)
    tail_p = (1.0 - teacher_p.sum(-1)).clamp(min=0.0)
    tail = torch.where(tail_p > 0, tail_p * (tail_p.clamp(min=1e-30).log() - student_tail), torch.zeros_like(tail_p))
    return (teacher_p * (logprobs - student_k)).sum(-1) + tail


def codistillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    soft_weight: float,
    weighting: str = "adaptive",
    temperature: float = 1.0,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk: TeacherTopK | None = None,
    confidence_threshold: float = 0.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> CoDistillationLoss:
    """The codistillation loss (module docstring) of (B, L, V) student logits against (B, L) labels, where position j
    predicts label j + 1 (the causal-LM shift is done here) and -100 marks tokens without a target.

    The teacher is `teacher_logits` (B, L, V) (full-vocabulary KL) or `teacher_topk` (top-k KL with a tail bucket).
    `soft_weight` is s(t). The mean is over the target tokens, or over `num_items_in_batch` when given (gradient
    accumulation and multi-process token averaging, as in `SFTTrainer`).
    """
    if (teacher_logits is None) == (teacher_topk is None):
        raise ValueError("pass exactly one of teacher_logits and teacher_topk")
    labels = labels[:, 1:]
    mask = labels != -100
    targets = labels[mask]  # (N,)
    student = student_logits[:, :-1][mask].float()  # (N, V): only target positions, the rest costs nothing
    log_probs = torch.log_softmax(student, dim=-1)
    log_probs_t = log_probs if temperature == 1.0 else torch.log_softmax(student / temperature, dim=-1)
    hard = -log_probs.gather(-1, targets[:, None]).squeeze(-1)
    with torch.no_grad():
        if teacher_logits is not None:
            teacher = teacher_logits[:, :-1][mask].float()
            teacher_probs = torch.softmax(teacher, dim=-1)
            teacher_label_prob = teacher_probs.gather(-1, targets[:, None]).squeeze(-1)
            teacher_correct = teacher.argmax(-1) == targets
            best_other = teacher_probs.scatter(-1, targets[:, None], 0.0).max(-1).values
        else:
            ids = teacher_topk.ids[:, :-1][mask].long()
            teacher_logprobs = teacher_topk.logprobs[:, :-1][mask].float()
            teacher_label_prob = teacher_topk.target_logprobs[:, :-1][mask].float().exp()
            top2 = teacher_topk.top2_logprobs[:, :-1][mask].float().exp()
            teacher_correct = ids[:, 0] == targets
            # The ranking is the same at every temperature: the best other token is the second when the first is
            # the label, else the first.
            best_other = torch.where(teacher_correct, top2[:, 1], top2[:, 0])
        if weighting == "schedule":
            weight = torch.full_like(hard, soft_weight)
        elif weighting == "adaptive":
            weight = soft_weight * (1.0 - best_other)
        elif weighting == "adaptive_argmax":
            trusted = teacher_correct & (teacher_label_prob >= confidence_threshold)
            weight = soft_weight * trusted * teacher_label_prob
        else:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if teacher_logits is not None:
        soft = _soft_full(log_probs_t, teacher, temperature)
    else:
        soft = _soft_topk(log_probs_t, ids, teacher_logprobs)
    soft = soft * temperature**2
    num_tokens = mask.sum()
    denominator = num_tokens if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
    # Clamped so a batch without target tokens gives a finite zero rather than 0 / 0.
    loss = (weight * soft + (1.0 - weight) * hard).sum() / denominator.to(hard.device).clamp(min=1)
    return CoDistillationLoss(
        loss=loss,
        soft_sum=soft.detach().sum(),
        hard_sum=hard.detach().sum(),
        weight_sum=weight.sum(),
        teacher_correct=teacher_correct.sum(),
        student_correct=(student.detach().argmax(-1) == targets).sum(),
        num_tokens=num_tokens,
    )


class CoDistillationTrainer(SFTTrainer):
    """`SFTTrainer` (its data handling, completion-only / assistant-only masks, packing, PEFT) whose loss is the
    codistillation loss against a teacher:

    ```python
    trainer = CoDistillationTrainer(model=student, teacher_model=teacher, args=CoDistillationConfig(...),
                                    train_dataset=dataset, processing_class=tokenizer)
    ```

    The teacher is `teacher_model` (a model or a path; else `args.teacher_model_name_or_path`), run in eval mode
    without gradients and prepared by accelerate for evaluation (DeepSpeed-initialised under DeepSpeed), or the
    precomputed top-k log-probs in `args.teacher_logits_path` (then no teacher is loaded). With `args.seq_kd` the
    teacher first writes the completions the student learns from. The student's and teacher's tokenizers (or the
    store's) must match: a mismatch is a `ValueError`.

    Logged per step (in `state.log_history`): `loss`, `soft_loss`, `hard_loss`, `soft_weight` (the mean w over
    target tokens), `soft_weight_schedule` (s(t)), `teacher_token_accuracy`, `mean_token_accuracy` (the
    student's), `aux_loss` (router load balancing, when on), `num_tokens`.
    """

    _tag_names = ["trl", "sft", "codistillation", "llama4-hf"]
    _name = "CoDistillation"

    def __init__(
        self,
        model: str | PreTrainedModel,
        teacher_model: str | PreTrainedModel | None = None,
        args: CoDistillationConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | Mapping[str, Dataset] | None = None,
        processing_class=None,
        teacher_processing_class=None,
        **kwargs,
    ) -> None:
        if args is None:
            args = CoDistillationConfig(output_dir="codistillation")
        elif not isinstance(args, CoDistillationConfig):
            raise TypeError(f"args must be a CoDistillationConfig, got {type(args).__name__}")
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if (teacher_model is None) == (args.teacher_logits_path is None):
            raise ValueError(
                "give the trainer exactly one teacher: `teacher_model` (or `teacher_model_name_or_path`) for an "
                "online teacher, or `teacher_logits_path` for precomputed top-k logits"
            )
        if processing_class is None:
            # Needed before SFTTrainer's own loading: the store lookup and seq_kd run during dataset preparation.
            path = model if isinstance(model, str) else model.config._name_or_path
            processing_class = AutoTokenizer.from_pretrained(path)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)

        if isinstance(teacher_model, str):
            teacher_processing_class = teacher_processing_class or teacher_tokenizer_for(teacher_model)
            teacher_model = load_teacher(teacher_model, args.teacher_model_init_kwargs)
        if teacher_model is not None:
            teacher_processing_class = teacher_processing_class or teacher_tokenizer_for(teacher_model)
            if teacher_processing_class is not None:
                check_same_tokenizer(
                    tokenizer, getattr(teacher_processing_class, "tokenizer", teacher_processing_class)
                )

        self._teacher_store = None
        if args.teacher_logits_path is not None:
            if args.packing or args.eval_packing:
                raise ValueError(
                    "precomputed teacher logits are stored per dataset row; packing merges and cuts rows, so it "
                    "cannot be combined with teacher_logits_path (use padding_free=True to avoid padding instead)"
                )
            if args.seq_kd:
                raise ValueError("seq_kd generates new targets, which precomputed teacher logits cannot cover")
            store = TeacherLogitsStore(args.teacher_logits_path)
            store.check_tokenizer(tokenizer)
            if abs(store.temperature - args.temperature) > 1e-6:
                raise ValueError(
                    f"the teacher logits in {store.path} were stored at temperature {store.temperature} but the "
                    f"trainer distills at {args.temperature}: set temperature={store.temperature} or rewrite them"
                )
            self._teacher_store = store

        if args.seq_kd:
            device = args.device  # also sets up the multi-process state the generation is split over
            if train_dataset is None:
                raise ValueError("`train_dataset` is required")
            # Generation runs before accelerate prepares the teacher; DeepSpeed and device maps place it themselves.
            if not args.deepspeed and getattr(teacher_model, "hf_device_map", None) is None:
                teacher_model.to(device)
            train_dataset = generate_teacher_targets(
                teacher_model, tokenizer, train_dataset, max_new_tokens=args.seq_kd_max_new_tokens,
                temperature=args.seq_kd_temperature, batch_size=args.seq_kd_batch_size, seed=args.seed,
                keep_gold_when_wrong=args.seq_kd_keep_gold_when_wrong,
            )  # fmt: skip

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )

        if self._teacher_store is not None:
            vocab = output_vocab_size(self.accelerator.unwrap_model(self.model))
            if self._teacher_store.metadata["vocab_size"] != vocab:
                raise ValueError(
                    f"the stored teacher logits cover a vocabulary of {self._teacher_store.metadata['vocab_size']} "
                    f"but the student predicts over {vocab}: they must share the vocabulary"
                )
            self.data_collator = TeacherTopKCollator(self.data_collator, self._teacher_store, self.padding_free)
            self.teacher_model = None
        else:
            student_vocab = output_vocab_size(self.accelerator.unwrap_model(self.model))
            if output_vocab_size(teacher_model) != student_vocab:
                raise ValueError(
                    f"the student predicts over {student_vocab} tokens but the teacher "
                    f"({type(teacher_model).__name__}) over {output_vocab_size(teacher_model)}: distillation compares "
                    "full next-token distributions, so they must share the tokenizer and vocabulary"
                )
            teacher_model.eval()
            teacher_model.requires_grad_(False)
            self._teacher_has_router = hasattr(teacher_model.config.get_text_config(), "output_router_logits")
            if self.is_deepspeed_enabled:
                self.teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
            else:
                self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)

    # Dataset preparation also attaches each row's stored teacher targets (train, eval and datasets passed to
    # `evaluate`), so a row the store does not hold fails here rather than mid-training.
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if self._teacher_store is not None and "teacher_row" not in dataset.column_names:
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            dataset = self._teacher_store.attach(dataset, dataset_name, tokenizer)
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._teacher_store is not None and "teacher_row" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "teacher_row"]

    def _progress(self) -> float:
        # The last step trains at exactly soft_weight_end.
        return self.state.global_step / (self.state.max_steps - 1) if self.state.max_steps > 1 else 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        teacher_topk = None
        if all(key in inputs for key in TOPK_KEYS):
            teacher_topk = TeacherTopK(*(inputs[key] for key in TOPK_KEYS))
        model_inputs = {k: v for k, v in inputs.items() if k != "labels" and k not in TOPK_KEYS}
        model_inputs["use_cache"] = False
        if self.aux_loss_enabled:
            model_inputs["output_router_logits"] = True
        # Not the fused LM head SFTTrainer installs: the soft loss needs the student's full distribution.
        outputs = model(**model_inputs)

        teacher_logits = None
        if teacher_topk is None:
            if self.teacher_model is None:
                raise ValueError("batch without precomputed teacher targets, and no online teacher")
            teacher_inputs = {k: v for k, v in model_inputs.items() if k != "output_router_logits"}
            if self._teacher_has_router:
                teacher_inputs["output_router_logits"] = False  # router losses of a frozen teacher are wasted work
            self.teacher_model.eval()
            with torch.no_grad():
                teacher_logits = self.teacher_model(**teacher_inputs).logits

        schedule = soft_weight_at(
            self._progress(), self.args.soft_weight_start, self.args.soft_weight_end, self.args.soft_weight_schedule
        )
        result = codistillation_loss(
            outputs.logits, labels, soft_weight=schedule, weighting=self.args.weighting,
            temperature=self.args.temperature, teacher_logits=teacher_logits, teacher_topk=teacher_topk,
            confidence_threshold=self.args.teacher_confidence_threshold, num_items_in_batch=num_items_in_batch,
        )  # fmt: skip
        loss = result.loss
        # As in SFTTrainer: `num_items_in_batch` counts every rank's tokens while DDP averages gradients over ranks.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        router_loss = self._router_loss(outputs)
        if router_loss is not None:
            # A per-micro-batch mean: with `num_items_in_batch` the loss itself carries gradient accumulation.
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + router_loss / steps

        self._log_codistillation(mode, result, schedule, outputs, inputs)
        return (loss, outputs) if return_outputs else loss

    def _router_loss(self, outputs) -> torch.Tensor | None:
        """`router_aux_loss_coef * aux_loss` plus our model's `router_z_loss_coef * z_loss`, as its own forward adds
        them to the loss when given labels (the soft/hard terms are computed here, so the model gets none)."""
        if not self.aux_loss_enabled or getattr(outputs, "aux_loss", None) is None:
            return None
        router_loss = self.router_aux_loss_coef * outputs.aux_loss
        z_loss = getattr(outputs, "z_loss", None)
        z_coef = getattr(self.accelerator.unwrap_model(self.model).config.get_text_config(), "router_z_loss_coef", 0.0)
        if z_loss is not None and z_coef:
            router_loss = router_loss + z_coef * z_loss
        return router_loss

    def _log_codistillation(self, mode: str, result: CoDistillationLoss, schedule: float, outputs, inputs) -> None:
        sums = torch.stack(
            [
                result.num_tokens.float(),
                result.soft_sum,
                result.hard_sum,
                result.weight_sum,
                result.teacher_correct.float(),
                result.student_correct.float(),
            ]
        )
        # `gather`, not `gather_for_metrics`: these are per-process sums, which the latter may drop at the end of
        # an uneven evaluation set.
        tokens, soft, hard, weight, teacher_ok, student_ok = self.accelerator.gather(sums[None]).sum(0).tolist()
        tokens = max(tokens, 1.0)
        metrics = self._metrics[mode]
        metrics["soft_loss"].append(soft / tokens)
        metrics["hard_loss"].append(hard / tokens)
        metrics["soft_weight"].append(weight / tokens)
        metrics["soft_weight_schedule"].append(schedule)
        metrics["teacher_token_accuracy"].append(teacher_ok / tokens)
        metrics["mean_token_accuracy"].append(student_ok / tokens)
        if self.aux_loss_enabled and getattr(outputs, "aux_loss", None) is not None:
            metrics["aux_loss"].append(self.accelerator.gather(outputs.aux_loss.detach()[None]).mean().item())
        if mode == "train":
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:
                local = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
            self._total_train_tokens += self.accelerator.gather(local[None]).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
