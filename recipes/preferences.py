"""Preference pairs from the policy's own samples, graded by the reward: chosen correct, rejected wrong."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datasets import Dataset

Reward = Callable[..., list[float]]

# Not handed to the reward as columns: TRL passes the prompt as `prompts` and never the reference or the images.
_NOT_COLUMNS = ("prompt", "completion", "images", "answer")


def preference_pairs(dataset: Dataset, samples: list[list[str]], reward: Reward) -> tuple[Dataset, dict[str, int]]:
    """One (prompt, chosen, rejected) row per prompt whose samples include both a best- and a worse-scored answer.

    `reward(completions, answer, prompts=..., **columns)` scores sampled answers as TRL calls a reward function:
    the row's other columns (e.g. `capability`, `constraint`) as lists, one entry per answer. Chosen is the first
    sample with the prompt's highest score, rejected the first with its lowest. Prompts whose samples all score
    the same give no pair. Rows are conversational, as TRL's DPOTrainer takes them.
    """
    rows = []
    for row, outputs in zip(dataset, samples):
        count = len(outputs)
        columns = {key: [value] * count for key, value in row.items() if key not in _NOT_COLUMNS}
        scores = reward(outputs, [row["answer"]] * count, prompts=[row["prompt"]] * count, **columns)
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

    def score(completions: list, answer: list, **columns: Any) -> list[float]:
        parts = [reward(completions, answer=answer, **columns) for reward in rewards]
        return [sum(values) for values in zip(*parts)]

    return score
