"""Lightweight DPO on pairs built from the policy's own samples (Llama 4's last post-training stage).

    accelerate launch recipes/dpo.py --config recipes/configs/dpo_tiny.yaml --model_name_or_path PATH

The policy answers each prompt `pair_samples` times (cached under `<output_dir>/pair_cache`); the answers are
graded by the rewards (correctness + format) and each prompt with a better and a worse answer gives a pair
(chosen = better, rejected = worse). Data that already has `chosen` and `rejected` replies (TRL's preference
format) is trained on as given, without sampling. TRL's `DPOTrainer` trains on the pairs against a frozen copy of
the starting policy as the reference. Re-running a killed command resumes from the last complete checkpoint.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import DPOConfig, DPOTrainer, ModelConfig

from recipes.common import (
    REWARD_FUNCTIONS,
    TaskArguments,
    defer_hub_push,
    finish_recipe,
    model_and_tokenizer,
    peft_config_for,
    reward_function,
    task_datasets,
    train_resumably,
)
from recipes.metap import MetaPArguments, metap_trainer, with_metap_overrides
from recipes.online_rl import check_rewards
from recipes.preferences import preference_pairs, total_reward
from recipes.sampling import cached_samples
from recipes.validation import InputError, run_recipe
from recipes.visual import (
    VisualArguments,
    is_visual,
    refuse_images_without_processor,
    visual_datasets,
    visual_model_and_processor,
)


@dataclass
class DPOScriptArguments(VisualArguments, MetaPArguments, TaskArguments):
    pair_samples: int = field(default=4, metadata={"help": "Policy samples per prompt to build pairs from."})
    pair_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature for the pair samples."})
    pair_max_new_tokens: int = field(default=48, metadata={"help": "Generation budget per sampled answer."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy_reward", "format_reward"],
        metadata={"help": f"Rewards grading the samples: {sorted(REWARD_FUNCTIONS)} or dotted import paths."},
    )


def main(script_args: DPOScriptArguments, training_args: DPOConfig, model_args: ModelConfig) -> dict[str, Any]:
    check_rewards(script_args, training_args)
    with_metap_overrides(script_args)
    visual = is_visual(script_args)
    if visual:  # image prompts: the multimodal model, its processor as the processing class
        model, tokenizer = visual_model_and_processor(model_args, script_args, training_args)
        train, heldout = visual_datasets(script_args)
    else:
        model, tokenizer = model_and_tokenizer(model_args, script_args, training_args)
        train, heldout = task_datasets(script_args, optional=("answer", *PAIR_COLUMNS))
        refuse_images_without_processor(train, script_args)
    if given_pairs(train, script_args.dataset_name):
        pairs = train.select_columns(
            ["prompt", *PAIR_COLUMNS, *(["images"] if "images" in train.column_names else [])]
        )
        report = {"prompts": len(train), "pairs": len(pairs), "given": True}
        print(f"training on the {len(pairs)} preference pairs of --dataset_name (no sampling)")
        return train_on_pairs(model, tokenizer, pairs, report, heldout, script_args, training_args, model_args)
    output_dir = Path(training_args.output_dir)
    samples = cached_samples(
        model, tokenizer, list(train["prompt"]), num_samples=script_args.pair_samples,
        cache_dir=output_dir / "pair_cache", temperature=script_args.pair_temperature,
        max_new_tokens=script_args.pair_max_new_tokens, batch_size=script_args.heldout_batch_size,
        seed=training_args.seed, desc="preference samples",
        images=[list(row) for row in train["images"]] if visual else None,
    )  # fmt: skip
    reward = total_reward(*(reward_function(name) for name in script_args.reward_funcs))
    pairs, report = preference_pairs(train, samples, reward)
    print(f"built {report['pairs']} preference pairs from {report['prompts']} prompts")
    if len(pairs) == 0:
        raise InputError(
            "no preference pairs: every prompt's samples score the same; sample more (--pair_samples) or at a "
            "higher --pair_temperature, or use prompts of mixed difficulty"
        )
    return train_on_pairs(model, tokenizer, pairs, report, heldout, script_args, training_args, model_args)


PAIR_COLUMNS = ("chosen", "rejected")


def given_pairs(train, dataset_name: str | None) -> bool:
    """Whether the data brings its own preference pairs; data with neither pairs nor answers is refused."""
    present = [column for column in PAIR_COLUMNS if column in train.column_names]
    if len(present) == 1:
        raise InputError(
            f"--dataset_name {dataset_name!r} has a `{present[0]}` column but no "
            f"`{({*PAIR_COLUMNS} - {present[0]}).pop()}`: preference pairs need both replies"
        )
    if not present and "answer" not in train.column_names:
        raise InputError(
            f"--dataset_name {dataset_name!r} (columns {train.column_names}) has neither `chosen` and `rejected` "
            "replies (preference pairs, trained on as given) nor an `answer` to grade the policy's own samples "
            "against (pairs built by sampling)"
        )
    return bool(present)


def train_on_pairs(model, tokenizer, pairs, report, heldout, script_args, training_args, model_args) -> dict[str, Any]:
    """TRL's DPOTrainer on `pairs`, resumably, then the held-out evaluation and the save."""
    defer_hub_push(training_args)
    peft_config = peft_config_for(model_args, model)
    # A frozen copy of the starting policy: no second load from disk, and it works for a policy built from scratch
    # (no path to reload). Not needed with PEFT: adapters off is the reference.
    ref_model = None if peft_config is not None else copy.deepcopy(model).eval().requires_grad_(False)
    trainer = metap_trainer(DPOTrainer, script_args.metap)(
        model=model,
        ref_model=ref_model,
        args=training_args,
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    train_resumably(trainer, training_args)
    return finish_recipe(trainer, tokenizer, heldout, script_args, training_args, "dpo", {"pairs": report})


if __name__ == "__main__":
    run_recipe(main, (DPOScriptArguments, DPOConfig, ModelConfig))
