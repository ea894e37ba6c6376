"""Judge filtering: drop the prompts a judge model already solves ("we removed more than 50% of our data tagged
as easy by using Llama models as a judge").

The judge answers each prompt k times (`recipes.sampling.cached_samples`, cached and resumable); a prompt whose
pass rate reaches the threshold is easy and dropped.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

from datasets import Dataset

from .common import write_json_atomic

Grader = Callable[[str, str], bool]


def pass_rates(samples: list[list[str]], answers: list, grader: Grader) -> list[float]:
    """Share of each prompt's samples that `grader(sample, gold)` accepts."""
    return [sum(grader(text, str(gold)) for text in outputs) / len(outputs) for outputs, gold in zip(samples, answers)]


def filter_hard(
    dataset: Dataset, rates: list[float], threshold: float, report_path: str | os.PathLike | None = None
) -> tuple[Dataset, dict[str, Any]]:
    """Keep the rows whose pass rate is below `threshold`; report what was kept (overall and per `level`)."""
    keep = [i for i, rate in enumerate(rates) if rate < threshold]
    report: dict[str, Any] = {
        "total": len(dataset),
        "kept": len(keep),
        "kept_fraction": len(keep) / max(1, len(dataset)),
        "threshold": threshold,
        "pass_rate_histogram": {f"{rate:.2f}": n for rate, n in sorted(Counter(rates).items())},
    }
    if "level" in dataset.column_names:
        levels = dataset["level"]
        report["kept_by_level"] = {
            str(level): f"{sum(levels[i] == level for i in keep)}/{sum(x == level for x in levels)}"
            for level in sorted(set(levels))
        }
    if report_path is not None:
        write_json_atomic(report_path, report)
    return dataset.select(keep), report
