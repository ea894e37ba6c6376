"""Which online-RL strategies help: one SFT model, equal RL steps, five ways of building the batches.

    python benchmarks/bench_rl_ablation.py --output_dir outputs/rl_ablation          # about an hour on 2 idle cores
    python benchmarks/bench_rl_ablation.py --output_dir /tmp/rl_ablation --smoke     # every code path, < 1 minute

The tiny Llama 4 is pretrained on the synthetic corpus (`recipes/configs/pretrain_tiny.yaml`) and fine-tuned on
the capability mixture (`recipes/configs/sft_capabilities_tiny.yaml`); from that one SFT model each arm runs
`recipes/online_rl.py` (`recipes/configs/online_rl_capabilities_tiny.yaml`) for `--rl_steps` steps:

- a: math-only batches (`mixture_shares: {math: 1}`), no system instructions
- b: mixed batches (equal shares over math, reasoning, instruction, coding)
- c: mixed batches, one fixed system prompt on every prompt
- d: mixed batches, a system instruction sampled per prompt from the train pool
- e: (d) plus continuous filtering (pass@k re-scoring of the prompt pool every few steps)

Every model (SFT and each arm) is evaluated greedily on the held-out problems of the capability tasks
(`eval.tasks`: capability_math, _reasoning, _instruction, _coding, and _instruction_unseen, whose system
instructions come from the held-out pool no training run ever sees), the first `--heldout_problems` of each. Each
arm is compared with the SFT model problem by problem: newly solved / newly failed and the exact sign test's
p-value (`recipes.pipeline.paired_change`). Prints a markdown table and writes `<output_dir>/ablation.json` and
`ablation.md`. The stages are the pipeline's (`recipes.pipeline.run_stage`): a killed run started again skips what
finished, resumes a stage from its last checkpoint, and reuses finished evaluations.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
import trl

from eval.files import write_json_atomic, write_text_atomic
from eval.generation import generate_completions
from eval.loading import load_causal_lm, load_tokenizer
from eval.tasks import DataSource, Example, get_task
from recipes.pipeline import paired_change, run_stage

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded from its file path (the tests)
from cli_types import names, nonnegative_int, positive_int  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
TASKS = (
    "capability_math",
    "capability_reasoning",
    "capability_instruction",
    "capability_coding",
    "capability_instruction_unseen",
)
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "a": ("math-only batches", {"mixture_shares": {"math": 1.0}, "system_instructions": "none", "refilter_steps": 0}),
    "b": ("mixed batches", {"system_instructions": "none", "refilter_steps": 0}),
    "c": ("mixed + one fixed system prompt", {"system_instructions": "fixed", "refilter_steps": 0}),
    "d": ("mixed + sampled system instructions", {"system_instructions": "sampled", "refilter_steps": 0}),
    "e": ("(d) + continuous filtering", {"system_instructions": "sampled", "refilter_steps": 8}),
}
# Tiny sizes: every code path (pretraining, SFT, each arm's RL with its refilter, evaluation) in seconds.
SMOKE = {
    "pretrain": {"max_steps": 2, "corpus_documents": 16, "per_device_train_batch_size": 8, "save_steps": 100},
    "sft": {"max_steps": 2, "train_problems": 32, "per_device_train_batch_size": 8, "save_steps": 100},
    "online_rl": {
        "train_problems": 32, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 8,
        "refilter_prompts": 8, "refilter_samples": 2, "save_steps": 100, "logging_steps": 1, "max_refill_rounds": 0,
    },
}  # fmt: skip


def heldout_examples(tasks: tuple[str, ...], limit: int) -> dict[str, list[Example]]:
    """The first `limit` held-out problems of each task (the tasks cycle through levels and languages, so any
    prefix is balanced)."""
    return {name: get_task(name).load(DataSource())[:limit] for name in tasks}


def evaluate(model_path: Path, examples: dict[str, list[Example]], max_new_tokens: int, batch_size: int) -> dict:
    """Greedy pass@1 on each task's `examples`, with the per-problem results the sign test pairs up. Cached next to
    the model (`ablation_eval.json`) under the settings it was made with."""
    settings = {"problems": {name: len(rows) for name, rows in examples.items()}, "max_new_tokens": max_new_tokens}
    cache = model_path / "ablation_eval.json"
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("settings") == settings:
            return saved["results"]
    model = load_causal_lm(str(model_path))
    tokenizer = load_tokenizer(str(model_path))
    results = {}
    for name, rows in examples.items():
        task = get_task(name)
        outputs = generate_completions(
            model, tokenizer, [example.messages for example in rows], max_new_tokens=max_new_tokens,
            batch_size=batch_size, desc=f"{model_path.name}: {name}",
        )  # fmt: skip
        correct = [int(task.grade(samples[0], example)[0]) for samples, example in zip(outputs, rows)]
        results[name] = {"accuracy": sum(correct) / len(correct), "num_problems": len(correct), "correct": correct}
    write_json_atomic(cache, {"settings": settings, "results": results})
    return results


def table(report: dict[str, Any]) -> list[str]:
    """Markdown: accuracy per task for the SFT model and each arm, with the arm's paired change against SFT."""
    tasks = report["tasks"]
    header = "| model | " + " | ".join(name.removeprefix("capability_") for name in tasks) + " | RL time (s) |"
    lines = [header, "|" + "---|" * (len(tasks) + 2)]
    sft = report["sft"]
    lines.append("| SFT | " + " | ".join(f"{sft[name]['accuracy']:.1%}" for name in tasks) + " | - |")
    for arm, result in report["arms"].items():
        cells = []
        for name in tasks:
            change = result["vs_sft"][name]
            cells.append(
                f"{result['heldout'][name]['accuracy']:.1%} "
                f"(+{change['gained']}/-{change['lost']}, p={change['p_value']:.2g})"
            )
        lines.append(f"| {arm}: {result['description']} | " + " | ".join(cells) + f" | {result['seconds']:.0f} |")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/rl_ablation")
    parser.add_argument("--rl_steps", type=positive_int, default=32, help="RL steps of every arm")
    parser.add_argument("--heldout_problems", type=positive_int, default=200, help="held-out problems per task")
    parser.add_argument(
        "--arms", type=names(ARMS), default=",".join(ARMS), help=f"comma-separated, among {','.join(ARMS)}"
    )
    parser.add_argument("--eval_max_new_tokens", type=positive_int, default=64)
    parser.add_argument("--eval_batch_size", type=positive_int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch_threads", type=nonnegative_int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks every code path in under a minute")
    args = parser.parse_args(argv)
    arms = args.arms
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    rl_steps, limit, max_new_tokens = args.rl_steps, args.heldout_problems, args.eval_max_new_tokens
    if args.smoke:
        rl_steps, limit, max_new_tokens = min(rl_steps, 2), min(limit, 4), min(max_new_tokens, 8)
    output_dir = Path(args.output_dir)
    # The stages evaluate nothing themselves: every model is scored here on the same capability tasks.
    shared = {"seed": args.seed, "heldout_problems": 0}
    smoke = SMOKE if args.smoke else {}

    model_path = str(ROOT / "hub_configs" / "tiny")
    for name, config in (("pretrain", "pretrain_tiny.yaml"), ("sft", "sft_capabilities_tiny.yaml")):
        spec = {"name": name, "config": str(CONFIGS / config), **smoke.get(name, {})}
        run_stage(spec, model_path, output_dir / name, shared)
        model_path = str(output_dir / name)
    sft_dir = output_dir / "sft"
    examples = heldout_examples(TASKS, limit)
    report: dict[str, Any] = {
        "tasks": list(TASKS),
        "rl_steps": rl_steps,
        "heldout_problems": limit,
        "smoke": args.smoke,
        "versions": {
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "python": platform.python_version(),
        },
        "sft": evaluate(sft_dir, examples, max_new_tokens, args.eval_batch_size),
        "arms": {},
    }  # fmt: skip
    for arm in arms:
        description, overrides = ARMS[arm]
        spec = {
            "name": "online_rl", "config": str(CONFIGS / "online_rl_capabilities_tiny.yaml"), **smoke.get("online_rl", {}),
            **overrides, "max_steps": rl_steps,
        }  # fmt: skip
        if args.smoke and spec["refilter_steps"]:
            spec["refilter_steps"] = 1
        arm_dir = output_dir / f"rl_{arm}"
        results = run_stage(spec, str(sft_dir), arm_dir, shared)
        heldout = evaluate(arm_dir, examples, max_new_tokens, args.eval_batch_size)
        report["arms"][arm] = {
            "description": description,
            "overrides": overrides,
            "seconds": results.get("seconds", 0.0),
            "heldout": {name: {k: v for k, v in heldout[name].items() if k != "correct"} for name in TASKS},
            "vs_sft": {
                name: paired_change(report["sft"][name]["correct"], heldout[name]["correct"]) for name in TASKS
            },
        }
        write_json_atomic(output_dir / "ablation.json", report)  # after every arm: a killed run keeps what it has
    lines = table(report)
    title = f"Held-out accuracy after {rl_steps} RL steps per arm, {limit} problems per task (greedy pass@1)."
    text = "\n".join([title, "Per arm against SFT: newly solved / newly failed, sign-test p.", "", *lines, ""])
    write_text_atomic(output_dir / "ablation.md", text)
    write_json_atomic(output_dir / "ablation.json", report)
    print("\n" + text)
    return report


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - started:.0f} s")
