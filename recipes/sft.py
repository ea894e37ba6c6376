"""Lightweight SFT on judge-filtered hard prompts (Llama 4's first post-training stage).

    accelerate launch recipes/sft.py --config recipes/configs/sft_tiny.yaml --model_name_or_path PATH

A judge (by default the policy itself) answers every training prompt `judge_samples` times; prompts it solves at
a rate >= `judge_threshold` are easy and dropped. The filter is cached under `<output_dir>/judge_cache` and its
report (how much was kept, per level) written to `<output_dir>/filter_report.json`. TRL's `SFTTrainer` then trains
on the remaining prompt-completion pairs (loss on the completions only). Re-running a killed command resumes
from the last complete checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import ModelConfig, SFTConfig, SFTTrainer

from eval.loading import InputError
from recipes.common import (
    TaskArguments,
    dataset_pass_rates,
    defer_hub_push,
    finish_recipe,
    load_model,
    load_tokenizer,
    model_and_tokenizer,
    peft_config_for,
    task_datasets,
    train_resumably,
)
from recipes.judge import filter_hard, pass_rates
from recipes.metap import MetaPArguments, metap_trainer, with_metap_overrides
from recipes.sampling import cached_samples
from recipes.validation import run_recipe
from recipes.visual import (
    VisualArguments,
    is_visual,
    refuse_images_without_processor,
    visual_answer_correct,
    visual_datasets,
    visual_model_and_processor,
)


@dataclass
class SFTScriptArguments(VisualArguments, MetaPArguments, TaskArguments):
    judge_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The judge model; empty: the policy being fine-tuned."}
    )
    judge_samples: int = field(default=4, metadata={"help": "Answers the judge gives per prompt (k)."})
    judge_threshold: float = field(
        default=0.75, metadata={"help": "Drop prompts the judge solves at this pass rate or above (1.1: keep all)."}
    )
    judge_temperature: float = field(default=1.0, metadata={"help": "Judge sampling temperature."})
    judge_max_new_tokens: int = field(default=48, metadata={"help": "Judge generation budget per answer."})


def main(script_args: SFTScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> dict[str, Any]:
    with_metap_overrides(script_args)
    visual = is_visual(script_args)
    if visual and script_args.judge_model_name_or_path and script_args.judge_threshold <= 1.0:
        raise InputError(
            "--judge_model_name_or_path with --task visual: the image prompts' judge is the policy itself"
        )
    if visual:  # the multimodal model; `tokenizer` is its processor, which SFTTrainer takes too
        model, tokenizer = visual_model_and_processor(model_args, script_args, training_args)
        train, heldout = visual_datasets(script_args, ("completion",))
    else:
        model, tokenizer = model_and_tokenizer(model_args, script_args, training_args)
        train, heldout = task_datasets(script_args, ("completion",))
        refuse_images_without_processor(train, script_args)
    output_dir = Path(training_args.output_dir)

    if script_args.judge_threshold <= 1.0:
        judge, judge_tokenizer = model, tokenizer
        if script_args.judge_model_name_or_path:
            path = script_args.judge_model_name_or_path
            flag = "--judge_model_name_or_path"
            judge = load_model(path, trust_remote_code=training_args.trust_remote_code, flag=flag)
            judge_tokenizer = load_tokenizer(path, flag)
        images = [list(row) for row in train["images"]] if visual else None
        samples = cached_samples(
            judge, judge_tokenizer, list(train["prompt"]), num_samples=script_args.judge_samples,
            cache_dir=output_dir / "judge_cache", temperature=script_args.judge_temperature,
            max_new_tokens=script_args.judge_max_new_tokens, batch_size=script_args.heldout_batch_size,
            seed=training_args.seed, desc="judge filter", images=images,
        )  # fmt: skip
        if visual:
            rates = pass_rates(samples, list(train["answer"]), visual_answer_correct)
        else:
            rates = dataset_pass_rates(samples, train)
        train, report = filter_hard(train, rates, script_args.judge_threshold, output_dir / "filter_report.json")
        print(f"judge filter kept {report['kept']}/{report['total']} prompts ({report['kept_fraction']:.0%})")
        if len(train) == 0:
            raise ValueError(
                f"the judge solves every prompt at >= {script_args.judge_threshold}: nothing is left to fine-tune on; "
                "raise --judge_threshold or use harder prompts"
            )
    else:
        report = {"total": len(train), "kept": len(train), "kept_fraction": 1.0}

    defer_hub_push(training_args)
    trainer = metap_trainer(SFTTrainer, script_args.metap)(
        model=model,
        args=training_args,
        train_dataset=train.select_columns(["prompt", "completion", *(["images"] if visual else [])]),
        processing_class=tokenizer,
        peft_config=peft_config_for(model_args, model),
    )
    train_resumably(trainer, training_args)
    return finish_recipe(trainer, tokenizer, heldout, script_args, training_args, "sft", {"filter": report})


if __name__ == "__main__":
    run_recipe(main, (SFTScriptArguments, SFTConfig, ModelConfig))
