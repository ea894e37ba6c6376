"""Preference pairs from the policy's own samples, graded by the reward: chosen correct, rejected wrong."""

from __future__ import annotations

from collections.abc import Callable

from datasets import Dataset

Reward = Callable[[list, list], list[float]]


def preference_pairs(dataset: Dataset, samples: list[list[str]], reward: Reward) -> tuple[Dataset, dict[str, int]]:
    """One (prompt, chosen, rejected) row per prompt whose samples include both a best- and a worse-scored answer.

    `reward(completions, answer)` scores sampled answers (TRL reward-function signature); chosen is the first
    sample with the prompt's highest score, rejected the first with its lowest. Prompts whose samples all score
    the same give no pair. Rows are conversational, as TRL's DPOTrainer takes them.
    """
    rows = []
    for row, outputs in zip(dataset, samples):
        scores = reward(outputs, [row["answer"]] * len(outputs))
        best, worst = max(scores), min(scores)
        if best == worst:
            continue
        rows.append(
            {
                "prompt": row["prompt"],
                "chosen": [{"role": "assistant", "content": outputs[scores.index(best)]}],
                "rejected": [{"role": "assistant", "content": outputs[scores.index(worst)]}],
                **({"images": row["images"]} if "images" in row else {}),  # image prompts keep their images
            }
        )
    report = {"prompts": len(dataset), "pairs": len(rows)}
    return Dataset.from_list(rows) if rows else Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}), report


def total_reward(*rewards: Reward) -> Reward:
    """The sum of several reward functions, e.g. correctness plus format."""

    def score(completions: list, answer: list) -> list[float]:
        parts = [reward(completions, answer=answer) for reward in rewards]
        return [sum(values) for values in zip(*parts)]

    return score
