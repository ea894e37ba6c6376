"""Online RL with hard-prompt sampling, adaptive filtering and a curriculum (Llama 4's second post-training stage).

    accelerate launch recipes/online_rl.py --config recipes/configs/online_rl_tiny.yaml --model_name_or_path PATH
    accelerate launch recipes/online_rl.py --config recipes/configs/online_rl_capabilities_tiny.yaml ...

GRPO (TRL) with the extensions in `recipes/rl.py`: prompts are drawn by their running pass rate, groups whose
rewards all agree are dropped and refilled, and a difficulty cap rises over training. Rewards: answer correctness
(math-verify through `eval.grading`) and format (one `\\boxed{}` answer at the end). With `--capabilities` (the
capability mixture, `capability_reward`) the batches follow a mixture over the capabilities, prompts can get a
system instruction sampled from the train pool, and the policy can re-filter the prompt pool by pass@k every few
steps (docs/rl_strategies.md). Re-running a killed command resumes from the last complete checkpoint, pass-rate
statistics and prompt pool included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig

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
from recipes.rl import OnlineRLConfig, OnlineRLTrainer
from recipes.validation import InputError, run_recipe
from recipes.visual import (
    VisualArguments,
    check_single_tile,
    is_visual,
    refuse_images_without_processor,
    visual_datasets,
    visual_model_and_processor,
    visual_online_rl_trainer,
)


@dataclass
class OnlineRLScriptArguments(VisualArguments, MetaPArguments, TaskArguments):
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy_reward", "format_reward"],
        metadata={"help": f"Reward functions: {sorted(REWARD_FUNCTIONS)} or dotted import paths."},
    )


def check_rewards(script_args: Any, training_args: Any) -> None:
    """`accuracy_reward` grades arithmetic only: neither other capabilities' answers nor a system instruction's
    constraint. Refuse the pairings that would train on a silently wrong reward, before a model loads. Also used
    by the DPO recipe, whose config has no `pass_rate_reward` or `system_instructions`."""
    pass_rate_reward = getattr(training_args, "pass_rate_reward", None)
    system_instructions = getattr(training_args, "system_instructions", "none")
    math_only = "accuracy_reward" in script_args.reward_funcs or pass_rate_reward == "accuracy_reward"
    if math_only and (script_args.capabilities or system_instructions != "none"):
        flag = "--capabilities" if script_args.capabilities else f"--system_instructions {system_instructions}"
        fix = "--reward_funcs capability_reward"
        if pass_rate_reward is not None:
            fix += " --pass_rate_reward capability_reward"
        raise InputError(
            f"{flag}: accuracy_reward checks arithmetic answers only (not the other capabilities or an instruction's "
            f"constraint); use {fix}"
        )
    if pass_rate_reward is not None:
        # TRL names reward functions by `__name__`: a dotted path is matched by its function name.
        names = [getattr(reward_function(name), "__name__", name) for name in script_args.reward_funcs]
        bare = pass_rate_reward.rpartition(".")[2]
        if bare not in names:
            raise InputError(
                f"--pass_rate_reward {pass_rate_reward}: the pass rate is read from one of --reward_funcs {names}; "
                f"name one of them (e.g. --pass_rate_reward {names[0]})"
            )
        training_args.pass_rate_reward = bare


def check_visual(script_args: OnlineRLScriptArguments, training_args: OnlineRLConfig) -> None:
    """The strategies the image task does not support: the refilter generates without images, its reward checks
    no constraint and it has one capability. Refused before a model loads rather than silently wrong."""
    if not is_visual(script_args):
        return
    reasons = {
        "--refilter_steps": (training_args.refilter_steps, "the re-scoring generates from text prompts only"),
        "--system_instructions": (
            training_args.system_instructions != "none",
            "visual_accuracy_reward does not check an instruction's constraint",
        ),
        "--capabilities": (script_args.capabilities, "the image task is its own single capability"),
    }
    for flag, (given, why) in reasons.items():
        if given:
            raise InputError(f"{flag} is not supported with --task visual ({why}); leave it unset for that task")


def main(
    script_args: OnlineRLScriptArguments, training_args: OnlineRLConfig, model_args: ModelConfig
) -> dict[str, Any]:
    check_visual(script_args, training_args)
    check_rewards(script_args, training_args)
    rewards = [reward_function(name) for name in script_args.reward_funcs]
    with_metap_overrides(script_args)
    if is_visual(script_args):  # image prompts: the multimodal model, its processor as the processing class
        model, tokenizer = visual_model_and_processor(model_args, script_args, training_args)
        tokenizer.tokenizer.padding_side = "left"
        train, heldout = visual_datasets(script_args)
        check_single_tile(train, tokenizer)
        # `level` (the curriculum's column) only where the dataset has one: a user's image set may not.
        train = train.select_columns([c for c in ("prompt", "images", "answer", "level") if c in train.column_names])
        trainer_class = visual_online_rl_trainer()
    else:
        model, tokenizer = model_and_tokenizer(model_args, script_args, training_args)
        tokenizer.padding_side = "left"
        train, heldout = task_datasets(script_args)
        refuse_images_without_processor(train, script_args)
        trainer_class = OnlineRLTrainer
    defer_hub_push(training_args)
    trainer = metap_trainer(trainer_class, script_args.metap)(
        model=model,
        reward_funcs=rewards,
        args=training_args,
        train_dataset=train.remove_columns([c for c in ("completion",) if c in train.column_names]),
        processing_class=tokenizer,
        peft_config=peft_config_for(model_args, model),
    )
    train_resumably(trainer, training_args)
    return finish_recipe(trainer, tokenizer, heldout, script_args, training_args, "online_rl")


if __name__ == "__main__":
    run_recipe(main, (OnlineRLScriptArguments, OnlineRLConfig, ModelConfig))
