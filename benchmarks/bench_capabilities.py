"""The generated capabilities (eval/capabilities.py) at a glance: sizes in tokens of the tiny tokenizer, how the
checker grades known-right and known-wrong replies, and what it costs per reply.

    python benchmarks/bench_capabilities.py [--num_problems 400] [--tokenizer hub_configs/tiny]

Per capability, on its held-out split (`instruction_unseen`: the instruction family under the held-out pool):
- prompt / reply tokens: the chat-templated prompt (system message included) and the reference reply.
- reference: the share of reference replies the checker accepts (must be 100%).
- wrong answer: the reference reply with its boxed answer swapped for another row's different one (must be 0%).
- broken constraint: rows with a constraint, the right answer in the reply the row would have without the
  system instruction, where that reply breaks the constraint (must be 0%: the constraint is checked, not only the
  answer).
- checker: microseconds per reply for `capability_score` over the reference and wrong replies, against
  `accuracy_reward` (math-verify's integer fast path) on the math rows in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_types import at_least  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from eval.capabilities import (  # noqa: E402
    CAPABILITIES,
    capability_problems,
    capability_score,
    constraint_holds,
    with_system_instruction,
)
from eval.grading import math_answer_correct  # noqa: E402


def _swap_answer(reply: str, old: str, new: str) -> str:
    marker = f"\\boxed{{{old}}}"
    if marker not in reply:
        raise ValueError(f"reference reply without its answer box: {reply!r}")
    return reply.replace(marker, f"\\boxed{{{new}}}")


def _timed(function, items) -> float:
    start = time.perf_counter()
    for item in items:
        function(*item)
    return (time.perf_counter() - start) / max(1, len(items)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # At least 2: each row's wrong answer is another row's different one.
    parser.add_argument("--num_problems", type=at_least(2), default=400)
    parser.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[1] / "hub_configs" / "tiny"))
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)

    groups = [(c, c, "train") for c in CAPABILITIES] + [("instruction_unseen", "instruction", "heldout")]
    lines = [
        "| capability | rows | prompt tokens (mean / max) | reply tokens (mean / max) | reference | wrong answer "
        "| broken constraint | checker µs/reply |",
        "|---|---|---|---|---|---|---|---|",
    ]
    math_baseline = None
    for name, capability, pool in groups:
        rows = capability_problems(capability, "test", args.num_problems, instructions=pool).to_list()
        prompts = [
            len(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"])
            for r in rows
        ]
        replies = [len(tokenizer(r["completion"][0]["content"], add_special_tokens=False)["input_ids"]) for r in rows]
        references = [(r["completion"][0]["content"], r) for r in rows]
        wrong = []
        for i, row in enumerate(rows):
            other = next(r["answer"] for r in rows[i + 1 :] + rows[:i] if r["answer"] != row["answer"])
            wrong.append((_swap_answer(row["completion"][0]["content"], row["answer"], other), row))
        broken = []
        for row in rows:
            if row["constraint"]:
                plain = with_system_instruction(row, None)["completion"][0]["content"]
                if not constraint_holds(plain, json.loads(row["constraint"])):
                    broken.append((plain, row))
        score = lambda pairs: sum(capability_score(text, row) for text, row in pairs) / max(1, len(pairs))  # noqa: E731
        micros = _timed(capability_score, references + wrong)
        if capability == "math":
            math_baseline = _timed(lambda text, row: math_answer_correct(text, row["answer"]), references + wrong)
        lines.append(
            f"| {name} | {len(rows)} | {statistics.mean(prompts):.1f} / {max(prompts)} | "
            f"{statistics.mean(replies):.1f} / {max(replies)} | {score(references):.0%} | {score(wrong):.0%} | "
            + (f"{score(broken):.0%} ({len(broken)} rows)" if broken else "-")
            + f" | {micros:.0f} |"
        )
    print("\n".join(lines))
    if math_baseline is not None:
        print(f"\naccuracy_reward's grader (math_answer_correct) on the math rows: {math_baseline:.0f} µs/reply")


if __name__ == "__main__":
    main()
