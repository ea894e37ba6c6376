"""Online RL for Llama 4: TRL's GRPO plus the three things Meta describes and TRL lacks.

1. Hard-prompt sampling. Every prompt keeps a running pass rate p = (successes + 1) / (attempts + 2) (a Beta(1, 1)
   prior: an unseen prompt counts as p = 0.5). Prompts are drawn with weight p(1 - p) + `min_prompt_weight`, which
   peaks at p = 0.5 and favours prompts the policy neither always nor never solves.
2. Adaptive filtering (trl#3708). A group whose rewards all agree has zero advantage and teaches nothing; it is
   dropped and refilled from freshly drawn prompts (up to `max_refill_rounds` extra generations) so that each
   batch carries signal. A refill draws as many groups as the missing ones need at the share with signal seen so
   far in the step, with a margin (`refill_oversample`), at most a full batch.
3. Curriculum. With a difficulty column (`curriculum_column`, e.g. the synthetic task's `level`), only prompts at
   or below a difficulty cap are drawn; the cap rises evenly from the easiest to the hardest level over the first
   `curriculum_fraction` of training. Each unlocked level gets an equal share of the draws (`balance_difficulty`).

4. Multi-capability batches. With a capability column (`mixture_column`), every draw follows a mixture over the
   capabilities: fixed shares (`mixture_shares`, default equal), or, with `mixture_rule: pass_rate`, shares that
   follow each capability's pass rate: share_c ∝ base_c * max(1 - P_c, `mixture_floor`), where P_c = (S_c + 1) /
   (A_c + 2) pools the successes S_c and attempts A_c of all the capability's prompts, so a weaker capability gets
   more of the batch and a mastered one keeps a floor. Within a capability the rules above apply unchanged (hard-
   prompt weights, curriculum cap, equal shares per unlocked level). A capability with nothing drawable (locked
   by the curriculum, filtered out of the pool) gives its share to the others.
5. System instructions (`system_instructions`): none, one fixed instruction for every prompt, or one sampled per
   prompt from the train pool of `eval.capabilities.SYSTEM_INSTRUCTIONS` (seeded by the draw counter). The held-out
   pool is for evaluation only and is never drawn.
6. Continuous filtering (`refilter_steps`): every N steps, starting at step 0, the policy answers a seeded sample
   of the train prompts (`refilter_prompts`, 0: all) `refilter_samples` times at the training temperature; a
   scored prompt stays in the pool iff its pass rate lies in [`refilter_min_pass_rate`, `refilter_max_pass_rate`]
   (the defaults drop the prompts it always or never solves). Only pool prompts are drawn.

The trainer draws the prompts itself when it generates (the dataloader only paces the steps), so the draw always
sees the latest pass rates and a resumed run draws exactly what an uninterrupted one would: the pass-rate table,
draw counter and prompt pool are saved in every checkpoint, and a `save_steps` that would checkpoint inside a
generation cycle (num_iterations > 1 or steps_per_generation > gradient_accumulation_steps) is refused, since TRL
regenerates on resume. Fractional `save_steps` and `save_strategy: epoch` are not checked.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import gather_object, is_peft_model
from datasets import Dataset
from torch.distributed.tensor import DTensor
from transformers import DynamicCache, Trainer
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer
from trl.extras.profiling import profiling_context
from trl.kernels import ChunkedLogProbFunction
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import pad

import modeling_llama4  # registers our classes for the reference GRPO reloads with beta > 0
from eval.capabilities import SYSTEM_INSTRUCTIONS, with_system_instruction
from eval.generation import generate_completions
from eval.loading import InputError

from .common import write_json_atomic
from .rl_generation import generate_sharing_prompts, prefill_distinct_rows
from .validation import parse_mapping

STATS_FILE = "prompt_stats.json"


@dataclass
class OnlineRLConfig(GRPOConfig):
    hard_prompt_sampling: bool = field(
        default=True, metadata={"help": "Draw prompts by running pass rate p with weight p(1-p) (else uniformly)."}
    )
    min_prompt_weight: float = field(
        default=0.02,
        metadata={"help": "Weight floor, so always- or never-solved prompts still come back now and then."},
    )
    pass_rate_reward: str = field(
        default="accuracy_reward", metadata={"help": "The reward function whose value counts as solved (1) or not."}
    )
    filter_zero_variance_groups: bool = field(
        default=True, metadata={"help": "Drop groups whose rewards all agree and refill the batch (trl#3708)."}
    )
    max_refill_rounds: int = field(
        default=2, metadata={"help": "Extra generations per step to refill dropped groups."}
    )
    refill_oversample: float = field(
        default=1.5,
        metadata={
            "help": "A refill draws the missing groups / the share with signal so far x this, at most a full "
            "batch (0: always a full batch)."
        },
    )
    curriculum_column: str | None = field(
        default="level", metadata={"help": "Difficulty column for the curriculum (missing column: no curriculum)."}
    )
    curriculum_fraction: float = field(
        default=0.5, metadata={"help": "Share of training over which the difficulty cap rises to the hardest level."}
    )
    balance_difficulty: bool = field(
        default=True,
        metadata={
            "help": "Give every unlocked difficulty level the same share of the draws (hard-prompt weights apply "
            "within a level). Without it the easy levels, whose pass rates sit nearer 0.5, take most draws."
        },
    )
    mixture_column: str | None = field(
        default="capability",
        metadata={"help": "Column naming each prompt's capability (missing column: no mixture, one pool)."},
    )
    mixture_shares: dict | str | None = field(
        default=None,
        metadata={
            "help": "Base share of each batch per capability (JSON/YAML mapping, e.g. '{math: 1.0}' for math-only "
            "batches); capabilities left out are never drawn. Empty: equal shares over the train set's capabilities."
        },
    )
    mixture_rule: str = field(
        default="fixed",
        metadata={
            "help": "'fixed': the base shares; 'pass_rate': base share x max(1 - capability pass rate, "
            "mixture_floor), renormalised, so the weaker capabilities get more of each batch."
        },
    )
    mixture_floor: float = field(
        default=0.1, metadata={"help": "'pass_rate' rule: the least factor a capability keeps, however well solved."}
    )
    system_instructions: str = field(
        default="none",
        metadata={
            "help": "'none': prompts as in the data; 'fixed': `system_instruction_id` on every prompt; 'sampled': one "
            "instruction per prompt from the train pool (eval.capabilities.SYSTEM_INSTRUCTIONS['train'])."
        },
    )
    system_instruction_id: str | None = field(
        default=None, metadata={"help": "'fixed' mode: the train-pool instruction to use (empty: the pool's first)."}
    )
    system_instruction_share: float = field(
        default=1.0, metadata={"help": "'sampled' mode: the share of prompts that get an instruction (the rest none)."}
    )
    refilter_steps: int = field(
        default=0,
        metadata={"help": "Continuous filtering: re-score the prompt pool with the policy every N steps (0: off)."},
    )
    refilter_prompts: int = field(
        default=0, metadata={"help": "Prompts re-scored each time, a seeded sample of the train set (0: all)."}
    )
    refilter_samples: int = field(default=4, metadata={"help": "Answers per re-scored prompt (the k of pass@k)."})
    refilter_min_pass_rate: float = field(
        default=0.1, metadata={"help": "Keep a re-scored prompt only if its pass rate over k answers is >= this."}
    )
    refilter_max_pass_rate: float = field(
        default=0.9, metadata={"help": "... and <= this (the defaults drop prompts always or never solved)."}
    )
    refilter_batch_size: int = field(default=64, metadata={"help": "Sequences per generate call when re-scoring."})

    def __post_init__(self):
        super().__post_init__()
        # Checked here, before a model loads; `mixture_shares` against the data when the trainer starts.
        choices = {"mixture_rule": ("fixed", "pass_rate"), "system_instructions": ("none", "fixed", "sampled")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"--{name} {getattr(self, name)!r}: choose one of {list(allowed)}")
        self.mixture_shares = parse_mapping(self.mixture_shares, "--mixture_shares") or None
        for name, value in (self.mixture_shares or {}).items():
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(
                    f"--mixture_shares: the share of {name!r} must be a finite number >= 0, got {value!r}"
                )
        if self.mixture_shares is not None and sum(self.mixture_shares.values()) <= 0:
            raise InputError("--mixture_shares: the shares sum to 0; give at least one capability a positive share")
        if not 0 <= self.mixture_floor <= 1 or not 0 <= self.system_instruction_share <= 1:
            raise InputError("--mixture_floor and --system_instruction_share must lie between 0 and 1")
        if self.refilter_steps < 0 or self.refilter_prompts < 0 or self.refilter_samples < 1:
            raise InputError("--refilter_steps and --refilter_prompts must be >= 0 and --refilter_samples >= 1")
        if not 0 <= self.refilter_min_pass_rate <= self.refilter_max_pass_rate <= 1:
            raise InputError(
                f"--refilter_min_pass_rate {self.refilter_min_pass_rate} / --refilter_max_pass_rate "
                f"{self.refilter_max_pass_rate}: need 0 <= min <= max <= 1"
            )
        if self.max_refill_rounds < 0 or not (self.refill_oversample >= 0 and math.isfinite(self.refill_oversample)):
            raise InputError(
                f"--max_refill_rounds {self.max_refill_rounds} / --refill_oversample {self.refill_oversample}: both "
                "must be >= 0 (refill_oversample 0: every refill draws a full batch)"
            )
        if self.system_instructions != "fixed" and self.system_instruction_id:
            raise InputError("--system_instruction_id is used only with --system_instructions fixed")
        # TRL regenerates on resume (its buffer is not checkpointed) and counts generation cycles from there: a
        # checkpoint inside a cycle would shift every later draw against an uninterrupted run.
        cycle = self.steps_per_generation * self.num_iterations  # micro-batches per generation
        strategy = getattr(self.save_strategy, "value", self.save_strategy)
        if (
            strategy == "steps"
            and self.save_steps >= 1
            and (self.save_steps * self.gradient_accumulation_steps) % cycle
        ):
            raise InputError(
                f"--save_steps {self.save_steps}: a checkpoint must fall at the end of a generation cycle "
                f"(steps_per_generation {self.steps_per_generation} x num_iterations {self.num_iterations} = {cycle} "
                f"micro-batches; gradient_accumulation_steps {self.gradient_accumulation_steps} per step) or a "
                "resumed run draws other prompts: make save_steps x gradient_accumulation_steps a multiple of it"
            )


class PromptPool:
    """Which train prompts may be drawn (continuous filtering), with each prompt's latest pass rate over k answers
    (NaN: never re-scored; an unscored prompt stays in the pool)."""

    def __init__(self, num_prompts: int):
        self.in_pool = torch.ones(num_prompts, dtype=torch.bool)
        self.pass_rates = torch.full((num_prompts,), float("nan"), dtype=torch.float64)
        self.refilters = 0
        self.last_step: int | None = None

    def update(
        self, indices: list[int], rates: list[float], low: float, high: float, groups: torch.Tensor | None = None
    ) -> dict[str, float]:
        """Record the re-scored prompts' pass rates and keep those in [low, high]; returns what changed. A group
        (capability; None: one group) the update would empty keeps its previous pool: it must stay drawable."""
        index = torch.tensor(indices, dtype=torch.long)
        rate = torch.tensor(rates, dtype=torch.float64)
        keep = (rate >= low) & (rate <= high)
        in_pool = self.in_pool.clone()
        in_pool[index] = keep
        self.pass_rates[index] = rate
        self.refilters += 1
        groups = torch.zeros(len(in_pool), dtype=torch.long) if groups is None else groups
        unchanged = 0
        for group in torch.unique(groups):
            members = groups == group
            if self.in_pool[members].any() and not in_pool[members].any():
                in_pool[members] = self.in_pool[members]
                unchanged += 1
        self.in_pool = in_pool
        return {
            "scored": float(len(indices)),
            "kept": float(keep.sum()),
            "too_easy": float((rate > high).sum()),
            "too_hard": float((rate < low).sum()),
            "mean_pass_rate": float(rate.mean()) if len(indices) else float("nan"),
            "pass_at_k": float((rate > 0).double().mean()) if len(indices) else float("nan"),
            "groups_left_unchanged": float(unchanged),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "in_pool": self.in_pool.tolist(),
            # JSON has no NaN: unscored prompts are null
            "pass_rates": [None if rate != rate else rate for rate in self.pass_rates.tolist()],
            "refilters": self.refilters,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["in_pool"]) != len(self.in_pool):
            raise ValueError(
                f"checkpoint's prompt pool covers {len(state['in_pool'])} prompts but the train set has "
                f"{len(self.in_pool)}: resume with the same dataset arguments"
            )
        self.in_pool = torch.tensor(state["in_pool"], dtype=torch.bool)
        self.pass_rates = torch.tensor(
            [float("nan") if rate is None else rate for rate in state["pass_rates"]], dtype=torch.float64
        )
        self.refilters = state["refilters"]
        self.last_step = state["last_step"]


def normalize_groups(weights: torch.Tensor, groups: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
    """`weights` rescaled so that the prompts of group g sum to `totals[g]` (groups 0..G-1, one per prompt); a group
    whose weights are all zero stays zero."""
    sums = torch.zeros(len(totals), dtype=weights.dtype).index_add_(0, groups, weights)
    scale = torch.where(sums > 0, totals.to(weights.dtype) / sums.clamp_min(1e-300), torch.zeros_like(sums))
    return weights * scale[groups]


class PromptStats:
    """Attempts and successes per prompt of the train set."""

    def __init__(self, num_prompts: int):
        self.attempts = torch.zeros(num_prompts, dtype=torch.float64)
        self.successes = torch.zeros(num_prompts, dtype=torch.float64)
        self.draws = 0

    def pass_rates(self) -> torch.Tensor:
        return (self.successes + 1) / (self.attempts + 2)

    def update(self, indices: list[int], solved: list[float]) -> None:
        for index, value in zip(indices, solved):
            self.attempts[index] += 1
            self.successes[index] += value

    def state_dict(self) -> dict[str, Any]:
        return {"attempts": self.attempts.tolist(), "successes": self.successes.tolist(), "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["attempts"]) != len(self.attempts):
            raise ValueError(
                f"checkpoint's prompt statistics cover {len(state['attempts'])} prompts but the train set has "
                f"{len(self.attempts)}: resume with the same dataset arguments"
            )
        self.attempts = torch.tensor(state["attempts"], dtype=torch.float64)
        self.successes = torch.tensor(state["successes"], dtype=torch.float64)
        self.draws = state["draws"]


# Tensors in GRPO's generation output that are padded on the left (prompts); the other 2-D ones are right padded.
_LEFT_PADDED = {"prompt_ids", "prompt_mask"}


class OnlineRLTrainer(GRPOTrainer):
    """`GRPOTrainer` with hard-prompt sampling, zero-variance group filtering and a difficulty curriculum."""

    def __init__(self, *args, train_dataset: Dataset, **kwargs):
        if "prompt_index" not in train_dataset.column_names:
            train_dataset = train_dataset.add_column("prompt_index", list(range(len(train_dataset))))
        # With beta > 0 GRPO reloads the reference from the policy's path; importing modeling_llama4 makes that
        # load build our sparse class (modeling_llama4/registration.py).
        super().__init__(*args, train_dataset=train_dataset, **kwargs)
        if self.ref_model is not None:  # frozen: TRL only runs it under no_grad, but leaves it trainable
            self.accelerator.unwrap_model(self.ref_model).requires_grad_(False)
        config: OnlineRLConfig = self.args
        local_rows = config.per_device_train_batch_size * config.steps_per_generation
        if local_rows % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size * steps_per_generation = {local_rows} must be a multiple of "
                f"num_generations = {self.num_generations}: each process draws whole groups of prompts"
            )
        if config.pass_rate_reward not in self.reward_func_names:
            raise ValueError(
                f"pass_rate_reward {config.pass_rate_reward!r} is not among the reward functions "
                f"{self.reward_func_names}"
            )
        self.prompt_stats = PromptStats(len(train_dataset))
        column = config.curriculum_column
        if column and column.lower() in ("none", "null"):  # the command line's way to say no curriculum
            column = None
        if column and column not in train_dataset.column_names:
            if column != OnlineRLConfig.curriculum_column:  # not the default: a typo must not turn the curriculum off
                raise InputError(
                    f"--curriculum_column {column!r}: the train set has no such column (it has "
                    f"{train_dataset.column_names}); name a numeric difficulty column, or pass --curriculum_column none "
                    "for no curriculum"
                )
            print(f"online RL: no curriculum (the train set has no {column!r} column)")
        self._difficulty = None
        if column and column in train_dataset.column_names:
            values = train_dataset[column]
            if odd := [v for v in values if isinstance(v, bool) or not isinstance(v, int | float)]:
                raise InputError(
                    f"--curriculum_column {column!r} holds {odd[0]!r} ({type(odd[0]).__name__}); the curriculum orders "
                    "prompts by a number (1 = easiest): map the levels to numbers, or pass --curriculum_column none"
                )
            self._difficulty = torch.tensor(values, dtype=torch.float64)
        self._last_rewards: torch.Tensor | None = None
        self.prompt_pool = PromptPool(len(train_dataset))
        self._setup_mixture(train_dataset)
        self._setup_system_instructions(train_dataset)
        if config.refilter_steps and isinstance(self.reward_funcs[self._pass_rate_func], torch.nn.Module):
            raise InputError("--refilter_steps needs a pass_rate_reward that is a function, not a reward model")

    @property
    def _pass_rate_func(self) -> int:
        return self.reward_func_names.index(self.args.pass_rate_reward)

    def _setup_mixture(self, train_dataset: Dataset) -> None:
        config: OnlineRLConfig = self.args
        column = config.mixture_column
        self._capability: torch.Tensor | None = None
        self._capability_names: tuple[str, ...] = ()
        if not column or column not in train_dataset.column_names:
            if config.mixture_shares:
                raise InputError(
                    f"--mixture_shares needs a {column!r} column in the train set (--mixture_column); it has "
                    f"{train_dataset.column_names}"
                )
            return
        values = train_dataset[column]
        names = tuple(sorted(set(values)))
        shares = config.mixture_shares or dict.fromkeys(names, 1.0)
        unknown = sorted(set(shares) - set(names))
        if unknown:
            raise InputError(f"--mixture_shares names {unknown}, which the train set lacks; it has {list(names)}")
        position = {name: k for k, name in enumerate(names)}
        self._capability = torch.tensor([position[value] for value in values], dtype=torch.long)
        self._capability_names = names
        base = torch.tensor([float(shares.get(name, 0.0)) for name in names], dtype=torch.float64)
        self._base_shares = base / base.sum()

    def _setup_system_instructions(self, train_dataset: Dataset) -> None:
        config: OnlineRLConfig = self.args
        self._instructions: tuple = ()
        self._heldout_instruction_ids: frozenset[str] = frozenset()
        if config.system_instructions == "none" and "system_instruction" not in train_dataset.column_names:
            return
        self._heldout_instruction_ids = frozenset(i.id for i in SYSTEM_INSTRUCTIONS["heldout"])
        columns = train_dataset.column_names
        carried = set(train_dataset["system_instruction"]) if "system_instruction" in columns else set()
        leaked = sorted(carried & self._heldout_instruction_ids)
        if leaked:
            raise InputError(f"the train set carries held-out system instructions {leaked}: they are for evaluation")
        pool = SYSTEM_INSTRUCTIONS["train"]
        if config.system_instructions == "fixed":
            wanted = config.system_instruction_id or pool[0].id
            if wanted in self._heldout_instruction_ids:
                raise InputError(f"--system_instruction_id {wanted!r} is in the held-out pool, kept for evaluation")
            chosen = [instruction for instruction in pool if instruction.id == wanted]
            if not chosen:
                raise InputError(f"--system_instruction_id {wanted!r}: the train pool has {[i.id for i in pool]}")
            self._instructions = tuple(chosen)
        elif config.system_instructions == "sampled":
            self._instructions = tuple(pool)
        drawn = {instruction.id for instruction in self._instructions}
        assert not drawn & self._heldout_instruction_ids, "a held-out system instruction in the training pool"

    # -- drawing prompts -----------------------------------------------------------------------------------------

    def difficulty_cap(self) -> float | None:
        """The hardest difficulty drawable now; None without a curriculum."""
        if self._difficulty is None:
            return None
        levels = torch.unique(self._difficulty)
        progress = self.state.global_step / max(1, self.state.max_steps)
        ramp = min(1.0, progress / self.args.curriculum_fraction) if self.args.curriculum_fraction > 0 else 1.0
        return levels[min(len(levels) - 1, int(ramp * len(levels)))].item()

    def prompt_weights(self) -> torch.Tensor:
        if self.args.hard_prompt_sampling:
            rates = self.prompt_stats.pass_rates()
            weights = rates * (1 - rates) + self.args.min_prompt_weight
        else:
            weights = torch.ones(len(self.prompt_stats.attempts), dtype=torch.float64)
        cap = self.difficulty_cap()
        if cap is not None:
            weights = weights * (self._difficulty <= cap)
            if self.args.balance_difficulty:
                # p(1-p) favours the easy levels (pass rates nearer 0.5) and the filter drops all-wrong hard groups.
                # Measured on the synthetic task without this: the policy learnt to stop after one equation (27 of
                # 60 two-step answers, against 8 before RL) and level-3 accuracy fell from 11.4% to 6.1%; with equal
                # shares per level it stayed at 10.6% while level 1 rose as much.
                for level in torch.unique(self._difficulty[self._difficulty <= cap]):
                    in_level = self._difficulty == level
                    weights[in_level] = weights[in_level] / weights[in_level].sum()
        return weights

    def capability_pass_rates(self) -> torch.Tensor:
        """Each capability's pass rate P_c = (S_c + 1) / (A_c + 2), pooling its prompts' successes and attempts."""
        count = len(self._capability_names)
        attempts = torch.zeros(count, dtype=torch.float64).index_add_(0, self._capability, self.prompt_stats.attempts)
        successes = torch.zeros(count, dtype=torch.float64).index_add_(
            0, self._capability, self.prompt_stats.successes
        )
        return (successes + 1) / (attempts + 2)

    def capability_shares(self) -> torch.Tensor:
        """Each capability's target share of a batch (`mixture_rule`; order `self._capability_names`)."""
        shares = self._base_shares.clone()
        if self.args.mixture_rule == "pass_rate":
            shares = shares * (1 - self.capability_pass_rates()).clamp_min(self.args.mixture_floor)
        return shares / shares.sum()

    def draw_weights(self) -> torch.Tensor:
        """The weights prompts are drawn with: `prompt_weights` (hard prompts, curriculum, level balance) on the
        filtered pool, then scaled so each capability carries its share and, with `balance_difficulty`, each of
        its unlocked levels an equal part of it."""
        weights = self.prompt_weights()
        if self.args.refilter_steps:
            weights = self._pool_weights(weights)
        balance = self._difficulty is not None and self.args.balance_difficulty
        if balance and (self._capability is not None or self.args.refilter_steps):
            levels = torch.unique(self._difficulty, return_inverse=True)[1]
            groups = levels if self._capability is None else self._capability * (int(levels.max()) + 1) + levels
            weights = normalize_groups(weights, groups, torch.ones(int(groups.max()) + 1, dtype=torch.float64))
        if self._capability is None:
            return weights
        count = len(self._capability_names)
        mass = torch.zeros(count, dtype=torch.float64).index_add_(0, self._capability, weights)
        shares = self.capability_shares() * (mass > 0)  # an undrawable capability's share goes to the others
        if shares.sum() <= 0:
            raise RuntimeError(
                "no prompt of a capability with a positive --mixture_shares entry can be drawn (curriculum or filter)"
            )
        return normalize_groups(weights, self._capability, shares / shares.sum())

    def _pool_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """`weights` on the filtered pool. A capability (no capability column: all prompts) whose drawable prompts
        (curriculum-unlocked) are all filtered out keeps its unfiltered weights: the pool update guards whole
        capabilities, not the levels the curriculum has unlocked so far. Logged as `refilter/unfiltered_fallbacks`."""
        pooled = weights * self.prompt_pool.in_pool
        groups = self._capability if self._capability is not None else torch.zeros(len(weights), dtype=torch.long)
        count = int(groups.max()) + 1
        before = torch.zeros(count, dtype=weights.dtype).index_add_(0, groups, weights)
        after = torch.zeros(count, dtype=weights.dtype).index_add_(0, groups, pooled)
        empty = (before > 0) & (after <= 0)
        self._metrics["train"]["refilter/unfiltered_fallbacks"].append(float(empty.sum()))
        return torch.where(empty[groups], weights, pooled)

    def _draw_prompts(self, num_groups: int) -> list[dict[str, Any]]:
        """`num_groups` prompts (each repeated `num_generations` times), distinct within the draw. Seeded by the
        draw counter and the process, so processes draw different prompts and a resumed run the same ones."""
        weights = self.draw_weights()
        generator = torch.Generator().manual_seed(
            self.args.seed * 1_000_003 + self.prompt_stats.draws * 101 + self.accelerator.process_index
        )
        self.prompt_stats.draws += 1
        replacement = int((weights > 0).sum()) < num_groups
        indices = torch.multinomial(weights, num_groups, replacement=replacement, generator=generator).tolist()
        rows = [dict(self.train_dataset[index]) for index in indices]
        if self._instructions:
            rows = self._with_system_instructions(rows, generator)
        if self._capability is not None:
            self._log_mixture(indices)
        return [dict(row) for row in rows for _ in range(self.num_generations)]

    def _with_system_instructions(self, rows: list[dict[str, Any]], generator: torch.Generator) -> list[dict]:
        """One system instruction per prompt (all answers of a group share it), drawn with the draw's generator, so
        a resumed run gives the same prompts the same instructions."""
        picks = torch.randint(len(self._instructions), (len(rows),), generator=generator).tolist()
        given = torch.rand(len(rows), generator=generator) < (
            self.args.system_instruction_share if self.args.system_instructions == "sampled" else 1.0
        )
        result = []
        for row, pick, give in zip(rows, picks, given.tolist()):
            if not give:
                # TRL builds the reward kwargs from the first row's keys: every row needs the same columns.
                result.append(
                    {
                        **row,
                        "constraint": row.get("constraint", ""),
                        "system_instruction": row.get("system_instruction", ""),
                    }
                )
                continue
            instruction = self._instructions[pick]
            if instruction.id in self._heldout_instruction_ids:  # never: the pools are disjoint, checked at start
                raise AssertionError(f"held-out system instruction {instruction.id!r} drawn in training")
            result.append(with_system_instruction(row, instruction))
        return result

    def _log_mixture(self, indices: list[int]) -> None:
        metrics = self._metrics["train"]
        drawn = self._capability[torch.tensor(indices, dtype=torch.long)]
        shares, pass_rates = self.capability_shares().tolist(), self.capability_pass_rates().tolist()
        for k, name in enumerate(self._capability_names):
            metrics[f"mixture/{name}/draw_share"].append((drawn == k).double().mean().item())
            metrics[f"mixture/{name}/target_share"].append(shares[k])
            metrics[f"mixture/{name}/pass_rate"].append(pass_rates[k])

    # -- continuous filtering --------------------------------------------------------------------------------

    def refilter_due(self) -> bool:
        last = self.prompt_pool.last_step
        return bool(self.args.refilter_steps) and (
            last is None or self.state.global_step - last >= self.args.refilter_steps
        )

    def refilter_pool(self) -> dict[str, float]:
        """Re-score a seeded sample of the train prompts with the policy (k answers each) and keep those whose pass
        rate lies in the band. Seeded by the refilter counter: a resumed run re-scores the same prompts."""
        size = len(self.prompt_pool.in_pool)
        seed = self.args.seed * 1_000_003 + 7_919 * self.prompt_pool.refilters + 17
        if 0 < self.args.refilter_prompts < size:
            generator = torch.Generator().manual_seed(seed)
            indices = torch.randperm(size, generator=generator)[: self.args.refilter_prompts].sort().values.tolist()
        else:
            indices = list(range(size))
        rates = self.prompt_pass_rates(indices, seed)
        report = self.prompt_pool.update(
            indices, rates, self.args.refilter_min_pass_rate, self.args.refilter_max_pass_rate, self._capability
        )
        self.prompt_pool.last_step = self.state.global_step
        metrics = self._metrics["train"]
        for key, value in report.items():
            metrics[f"refilter/{key}"].append(value)
        return report

    def prompt_pass_rates(self, indices: list[int], seed: int) -> list[float]:
        """Each prompt's pass rate over `refilter_samples` answers of the current policy at the training temperature
        (`pass_rate_reward` per answer). Generation runs batched through `eval.generation` under no_grad; the
        training RNG is forked, so re-scoring leaves the training samples as they were."""
        rows = [dict(self.train_dataset[index]) for index in indices]
        if self._instructions:  # scored as training draws them: with a system instruction sampled per prompt
            rows = self._with_system_instructions(rows, torch.Generator().manual_seed(seed + 1))
        k = self.args.refilter_samples
        prompts = [row["prompt"] for row in rows]
        model = self.accelerator.unwrap_model(self.model)
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            samples = generate_completions(
                model, self.processing_class, prompts, max_new_tokens=self.max_completion_length, num_samples=k,
                temperature=self.temperature, top_p=self.top_p, batch_size=self.args.refilter_batch_size, seed=seed,
                progress=False,
            )  # fmt: skip
        texts = [text for answers in samples for text in answers]
        # The format GRPO hands the rewards: chat prompts get message completions.
        completions = texts if isinstance(prompts[0], str) else [[{"role": "assistant", "content": t}] for t in texts]
        skipped = ("prompt", "completion")
        columns = {key: [row[key] for row in rows for _ in range(k)] for key in rows[0] if key not in skipped}
        values = self.reward_funcs[self._pass_rate_func](
            prompts=[row["prompt"] for row in rows for _ in range(k)], completions=completions, completion_ids=None,
            trainer_state=self.state, log_extra=lambda *a, **kw: None, log_metric=lambda *a, **kw: None, **columns,
        )  # fmt: skip
        solved = torch.tensor([0.0 if value is None else float(value) for value in values], dtype=torch.float64)
        return solved.view(len(rows), k).mean(dim=1).tolist()

    # -- generation, filtering, statistics ---------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if not self.model.training:
            return rewards_per_func
        # Gathered over processes (rows in process order): record the statistics for every process's prompts.
        indices = gather_object([row["prompt_index"] for row in inputs])
        solved = rewards_per_func[:, self.reward_func_names.index(self.args.pass_rate_reward)]
        self.prompt_stats.update(indices, solved.nan_to_num(0.0).tolist())
        start = self.accelerator.process_index * len(prompts)
        weights = self.reward_weights.to(rewards_per_func.device)
        self._last_rewards = (rewards_per_func[start : start + len(prompts)] * weights).nansum(dim=1)
        if self._capability is not None:
            capabilities = gather_object([row[self.args.mixture_column] for row in inputs])
            total = (rewards_per_func * weights).nansum(dim=1)
            for name in sorted(set(capabilities)):
                mask = torch.tensor([value == name for value in capabilities], device=total.device)
                self._metrics["train"][f"mixture/{name}/reward"].append(total[mask].mean().item())
        return rewards_per_func

    def _score(self, inputs: list[dict[str, Any]]) -> tuple[dict[str, Any], torch.Tensor]:
        """GRPO's generation and scoring, plus which local groups carry signal (rewards not all equal)."""
        output = super()._generate_and_score_completions(inputs)
        grouped = self._last_rewards.view(-1, self.num_generations)
        has_signal = (grouped.max(dim=1).values - grouped.min(dim=1).values) > 1e-6
        return output, has_signal

    def _generate_and_score_completions(self, inputs):
        if not self.model.training:
            return super()._generate_and_score_completions(inputs)
        num_groups = len(inputs) // self.num_generations
        if self.refilter_due():
            self.refilter_pool()
        if self._draws_prompts():
            inputs = self._draw_prompts(num_groups)
        output, has_signal = self._score(inputs)
        metrics = self._metrics["train"]
        metrics["adaptive_filter/groups_with_signal"].append(has_signal.float().mean().item())
        cap = self.difficulty_cap()
        if cap is not None:
            metrics["curriculum/difficulty_cap"].append(cap)
        metrics["hard_prompts/mean_pass_rate"].append(self.prompt_stats.pass_rates().mean().item())
        if self.args.refilter_steps:
            metrics["refilter/pool_size"].append(float(self.prompt_pool.in_pool.sum()))
            rates = self.prompt_pool.pass_rates[self.prompt_pool.in_pool]
            if not rates.isnan().all():  # the pool's difficulty: the mean k-sample pass rate of its scored prompts
                metrics["refilter/pool_pass_rate"].append(rates.nanmean().item())
        if not self.args.filter_zero_variance_groups:
            return output

        parts = [(output, has_signal.nonzero().flatten().tolist())]
        kept = len(parts[0][1])
        rounds, drawn, with_signal = 0, num_groups, kept
        # Every process runs the same number of rounds, of the same size (generation gathers across processes).
        while rounds < self.args.max_refill_rounds and self._max_over_processes(num_groups - kept) > 0:
            rounds += 1
            size = self._max_over_processes(self.refill_size(num_groups - kept, with_signal / drawn, num_groups))
            refill, refill_signal = self._score(self._draw_prompts(size))
            drawn, with_signal = drawn + size, with_signal + int(refill_signal.sum())
            take = refill_signal.nonzero().flatten().tolist()[: max(0, num_groups - kept)]
            parts.append((refill, take))
            kept += len(take)
        if kept < num_groups:  # still short: pad with signal-less groups so every batch keeps its shape
            silent = (~has_signal).nonzero().flatten().tolist()[: num_groups - kept]
            parts.append((output, silent))
        metrics["adaptive_filter/refill_rounds"].append(rounds)
        metrics["adaptive_filter/batch_signal_fraction"].append(min(kept, num_groups) / num_groups)
        return self._concat_groups(parts)

    def refill_size(self, missing: int, signal_rate: float, num_groups: int) -> int:
        """Groups a refill draws: the `missing` ones over the share of groups with signal so far this step, times
        `refill_oversample`, at most a full batch; a refill short of a few groups need not generate a batch."""
        if missing <= 0:
            return 0
        if self.args.refill_oversample <= 0:
            return num_groups
        rate = max(signal_rate, 1 / num_groups)  # no group with signal yet: as if one in the batch had it
        return min(num_groups, math.ceil(self.args.refill_oversample * missing / rate))

    def _draws_prompts(self) -> bool:
        """Whether the trainer draws each batch itself (else the dataloader's uniform shuffle stands)."""
        args = self.args
        return bool(
            args.hard_prompt_sampling or self._difficulty is not None or self._capability is not None
            or self._instructions or args.refilter_steps
        )  # fmt: skip

    def _max_over_processes(self, value: int) -> int:
        return int(self.accelerator.gather(torch.tensor([value], device=self.accelerator.device)).max())

    def _concat_groups(self, parts: list[tuple[dict[str, Any], list[int]]]) -> dict[str, Any]:
        """The chosen groups of several generation outputs as one output, re-padded to a common length."""
        size = self.num_generations
        rows = [[g * size + k for g in groups for k in range(size)] for _, groups in parts]
        merged: dict[str, Any] = {}
        for key, value in parts[0][0].items():
            if key in ("num_items_in_batch", "num_images"):
                continue
            if key == "pixel_values" and "num_images" in parts[0][0]:  # image prompts: rows are images, not prompts
                merged[key], merged["num_images"] = _select_images(parts, rows)
                continue
            if value is None:
                merged[key] = None
                continue
            if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.ndim > 2:
                raise NotImplementedError(f"adaptive filtering cannot merge GRPO output field {key!r}")
            pieces = [output[key][index] for (output, _), index in zip(parts, rows) if index]
            if value.ndim == 2:
                width = max(piece.shape[1] for piece in pieces)
                pad_value = self._tokenizer.pad_token_id if key.endswith("_ids") else 0
                left = key in _LEFT_PADDED
                pieces = [
                    torch.nn.functional.pad(
                        p, (width - p.shape[1], 0) if left else (0, width - p.shape[1]), value=pad_value
                    )
                    for p in pieces
                ]
            merged[key] = torch.cat(pieces)
        merged["num_items_in_batch"] = self.accelerator.gather(merged["completion_mask"].sum()).sum()
        return merged

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's `model.generate` path with each distinct prompt's prefill run once (`generate_sharing_prompts`);
        TRL's own path for vLLM, continuous batching, images and other models."""
        if (
            self.use_vllm
            or self.use_transformers_continuous_batching
            or images is not None
            or multimodal_fields
            or has_tool_images
            or not self._can_share_prompts(self.accelerator.unwrap_model(self.model), generation=True)
        ):
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        padding = dict(padding_side="left", pad_to_multiple_of=self.pad_to_multiple_of)
        inputs = Trainer._prepare_inputs(  # to the device, as TRL does (GRPOTrainer's own buffers generations)
            self,
            {
                "input_ids": pad(prompts, padding_value=self._tokenizer.pad_token_id, **padding),
                "attention_mask": pad([torch.ones_like(t) for t in prompts], padding_value=0, **padding),
            },
        )
        with (
            profiling_context(self, "transformers.generate"),
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            output = generate_sharing_prompts(unwrapped_model, **inputs, generation_config=self.generation_config)
        completion_ids = output[:, inputs["input_ids"].size(1) :]  # (B, C)
        # As TRL: each completion up to and including its first EOS.
        is_eos = torch.isin(completion_ids, torch.tensor(self.eos_token_ids, device=completion_ids.device))
        ends = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), is_eos.size(1))
        keep = torch.arange(is_eos.size(1), device=ends.device) <= ends.unsqueeze(1)
        return [ids[row].tolist() for ids, row in zip(completion_ids.cpu(), keep.cpu(), strict=True)], None

    # -- log-probabilities -------------------------------------------------------------------------------------

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal_inputs,
    ):
        """TRL's log-probs and entropies of the last `logits_to_keep` tokens, computed over the completions only.

        TRL's fused LM head scores every position (prompt included) on CPU, and the batch repeats each prompt
        `num_generations` times. Here each distinct prompt runs once (its key/value cache is then gathered to every
        row that shares it, a differentiable index), the completions run on top of that cache, and the LM head
        sees only the completion positions. Values, gradients and the load-balancing loss equal TRL's
        (tests/test_rl_logprobs.py); TRL's path is kept where this one cannot be used (see `_can_share_prompts`)."""
        if any(value is not None for value in multimodal_inputs.values()) or not self._can_share_prompts(model):
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
                **multimodal_inputs,
            )
        batch_size = batch_size or input_ids.size(0)
        logps, entropies, aux_losses = [], [], []
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            with self.accelerator.autocast():
                chunk = self._completion_logps(
                    model, input_ids[rows], attention_mask[rows], logits_to_keep, compute_aux_loss
                )
            logps.append(chunk[0])
            entropies.append(chunk[1])
            aux_losses.append(chunk[2])
        return (
            torch.cat(logps),
            torch.cat(entropies) if compute_entropy else None,
            torch.stack(aux_losses).mean() if compute_aux_loss else None,
        )

    def _can_share_prompts(self, model, generation: bool = False) -> bool:
        """Our text model called directly (its backbone takes a cache). A DDP wrapper must see one forward per
        backward, and checkpointed layers drop the cache (generation runs without either); multimodal models,
        prompt-learning adapters and sharded LM heads (ZeRO-3, FSDP2) keep TRL's path."""
        # Under a wrapper both log-prob passes take TRL's path: the training one must (DDP sees one forward per
        # backward), and the no-grad one for the old policy then matches it to the last bit (ratios exactly 1).
        wrapped = getattr(self, "model_wrapped", model)
        if not generation and (
            model is not self.accelerator.unwrap_model(model)
            or wrapped is not self.accelerator.unwrap_model(wrapped)
            or self.args.gradient_checkpointing
        ):
            return False
        if is_peft_model(model) and model.peft_config[model.active_adapter].is_prompt_learning:
            return False  # virtual tokens are prepended inside PEFT's forward: the backbone call here would skip them
        base = model.get_base_model() if is_peft_model(model) else model
        if not isinstance(base, modeling_llama4.Llama4ForCausalLM):
            return False
        # ZeRO-3 leaves each process an empty partition of lm_head.weight and FSDP2 a DTensor shard: the kernel
        # here reads the weight directly, TRL's path gathers it.
        return not is_deepspeed_zero3_enabled() and not isinstance(base.get_output_embeddings().weight, DTensor)

    def _completion_logps(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        compute_aux_loss: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(log-probs, entropies) of shape (B, logits_to_keep), zero at padding as in TRL, and the aux loss."""
        base = model.get_base_model() if is_peft_model(model) else model
        backbone, lm_head = base.model, base.get_output_embeddings()
        # The prompt but its last token runs once per distinct row; that last token's output predicts the first
        # completion token, so it runs with the completions.
        prefix_len = input_ids.size(1) - logits_to_keep - 1
        cache = DynamicCache()  # every layer keeps every token, so the suffix's chunked attention sees them
        prefix_logits: tuple[torch.Tensor, ...] = ()
        if prefix_len > 0:
            out, num_unique, inverse = prefill_distinct_rows(
                backbone, input_ids[:, :prefix_len], attention_mask[:, :prefix_len], cache, positions_from_mask=False,
                output_router_logits=compute_aux_loss,
            )  # fmt: skip
            if compute_aux_loss:  # (U * prefix_len, E) per layer -> the rows' (B, prefix_len, E)
                prefix_logits = tuple(r.view(num_unique, prefix_len, -1)[inverse] for r in out.router_logits)
        out = backbone(
            input_ids=input_ids[:, max(prefix_len, 0) :],
            attention_mask=attention_mask,
            cache=cache,
            use_cache=True,
            output_router_logits=compute_aux_loss,
        )
        hidden = out.last_hidden_state[:, -logits_to_keep - 1 : -1]  # (B, C, H): the states before each token
        labels = input_ids[:, -logits_to_keep:]
        mask = attention_mask[:, -logits_to_keep:].bool()  # TRL's labels are -100 where the attention mask is 0
        precision = nullcontext()
        if self.args.cast_lm_head_to_fp32:
            hidden, precision = hidden.float(), torch.autocast(hidden.device.type, enabled=False)
        with precision:
            # TRL's own kernel (the one its fused head runs), fed only the completion positions. Llama 4 has no
            # logit soft-capping and no logit scale.
            per_token = ChunkedLogProbFunction.apply(
                hidden[mask], lm_head.weight, lm_head.bias, labels[mask], self.temperature, 32768, None, 1.0,
                ("log_probs", "entropy"),
            )  # fmt: skip
        logps, entropy = (x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token[:2])
        aux_loss = None
        if compute_aux_loss:
            # TRL's loss over the whole batch, every token in its (B, S) place, as its fused head computes it.
            suffix_logits = [r.view(input_ids.size(0), -1, r.size(-1)) for r in out.router_logits]
            if prefix_logits:
                suffix_logits = [torch.cat(pair, dim=1) for pair in zip(prefix_logits, suffix_logits)]
            gate_logits = tuple(r.flatten(0, 1) for r in suffix_logits)  # (B * S, E) per layer
            aux_loss = load_balancing_loss_func(
                gate_logits, base.config.num_experts, base.config.num_experts_per_tok, attention_mask
            )
        return logps, entropy, aux_loss

    # -- checkpoints -----------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        # Written before the Trainer's files, which end with trainer_state.json: a checkpoint that counts as
        # complete always has its statistics.
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            state = {**self.prompt_stats.state_dict(), "pool": self.prompt_pool.state_dict()}
            write_json_atomic(os.path.join(folder, STATS_FILE), state)
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            path = os.path.join(checkpoint, STATS_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing: this checkpoint was not written by OnlineRLTrainer")
            with open(path) as handle:
                state = json.load(handle)
            self.prompt_stats.load_state_dict(state)
            if "pool" in state:
                self.prompt_pool.load_state_dict(state["pool"])


def _select_images(parts: list[tuple[dict[str, Any], list[int]]], rows: list[list[int]]):
    """The chosen rows' images of several GRPO outputs: `pixel_values` holds `num_images[r]` images per row r, in row
    order (one tile per image: `recipes/visual.py` refuses multi-tile images in online RL)."""
    pieces, counts = [], []
    for (output, _), chosen in zip(parts, rows):
        per_row = output["num_images"]
        starts = [0]
        for count in per_row:
            starts.append(starts[-1] + count)
        for row in chosen:
            pieces.append(output["pixel_values"][starts[row] : starts[row + 1]])
            counts.append(per_row[row])
    return torch.cat(pieces), counts
