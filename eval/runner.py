"""`python -m eval`: generate with a model on each task, cache every finished example, grade, write results."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from modeling_llama4.fingerprint import weights_fingerprint

from .generation import generate_completions
from .grading import aggregate_scores
from .tasks import TASKS, DataSource, DataUnavailableError, Example, Task, get_task

__all__ = ["SampleCache", "build_parser", "evaluate_task", "load_examples", "load_model", "main"]


# ---------------------------------------------------------------------------------------------------------------
# Resumable per-example cache
# ---------------------------------------------------------------------------------------------------------------


class SampleCache:
    """Append-only JSONL of finished examples: `{"id", "key", "completions"}`, one line each, flushed and fsynced as
    it is written, so a crash loses at most the batch in flight. `key` hashes the prompt and the generation
    settings: changing either regenerates rather than reusing stale outputs. A torn last line (a crash
    mid-write) is ignored on reading."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, list[str]] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    self.entries[record["key"]] = record["completions"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def get(self, key: str) -> list[str] | None:
        return self.entries.get(key)

    def add(self, example_id: str, key: str, completions: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"id": example_id, "key": key, "completions": completions}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries[key] = completions


def cache_key(example: Example, settings: dict) -> str:
    payload = json.dumps({"id": example.id, "messages": example.messages, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def load_model(
    path: str,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | None = None,
):
    """Model and tokenizer from a local directory or Hub id. Llama 4 checkpoints (text or multimodal) load into
    `modeling_llama4.Llama4ForCausalLM` (sparse MoE); any other causal LM through `AutoModelForCausalLM`.
    `device_map` (e.g. "auto") spreads a model too large for one GPU; otherwise it goes to `device`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import modeling_llama4  # registers our classes for the Auto API

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if device_map:
        kwargs["device_map"] = device_map
    if getattr(config, "model_type", None) in ("llama4", "llama4_text"):
        model = modeling_llama4.Llama4ForCausalLM.from_pretrained(path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    if not device_map:
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# One task
# ---------------------------------------------------------------------------------------------------------------


def load_examples(task: Task, source: DataSource, limit: int | None = None) -> list[Example]:
    """The task's examples, the first `limit` of them (per language for multilingual tasks)."""
    examples = task.load(source)
    if limit is None:
        return examples
    if not task.limit_per_subset:
        return examples[:limit]
    seen: dict[str | None, int] = defaultdict(int)
    kept = []
    for example in examples:
        if seen[example.subset] < limit:
            seen[example.subset] += 1
            kept.append(example)
    return kept


def evaluate_task(
    task: Task,
    model,
    tokenizer,
    examples: list[Example],
    output_dir: Path,
    *,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    ks: Sequence[int] = (),
    progress: bool = True,
    model_name: str = "",
    device: str | None = None,
) -> dict:
    """Generate (skipping examples already in the cache), grade, and return the task's scores."""
    settings = {
        # The weights, not the --model string: a checkpoint retrained at the same path must be regenerated.
        "model": weights_fingerprint(model),
        "max_new_tokens": max_new_tokens or task.max_new_tokens,
        "num_samples": num_samples,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
    }
    cache = SampleCache(output_dir / "cache" / f"{task.name}.jsonl")
    keys = [cache_key(example, settings) for example in examples]
    todo = [i for i, key in enumerate(keys) if cache.get(key) is None]
    if todo:

        def save(position: int, completions: list[str]) -> None:
            index = todo[position]
            cache.add(examples[index].id, keys[index], completions)

        generate_completions(
            model,
            tokenizer,
            [examples[i].messages for i in todo],
            max_new_tokens=settings["max_new_tokens"],
            num_samples=num_samples,
            temperature=temperature,
            top_p=top_p,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            desc=task.name,
            on_prompt_done=save,
            device=device,
        )

    correct, answer_keys, by_subset = [], [], defaultdict(list)
    records = []
    for example, key in zip(examples, keys):
        completions = cache.get(key)
        graded = [task.grade(text, example) for text in completions]
        correct.append([ok for ok, _ in graded])
        answer_keys.append([answer for _, answer in graded])
        by_subset[example.subset].append(correct[-1])
        record = {"id": example.id, "gold": example.gold, "answers": answer_keys[-1], "correct": correct[-1]}
        record.update({"meta": example.meta} if example.meta else {})
        record.update({"prompt": example.messages} if task.save_prompts else {})
        records.append({**record, "completions": completions})
    (output_dir / "samples").mkdir(parents=True, exist_ok=True)
    with (output_dir / "samples" / f"{task.name}.jsonl").open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")

    scores = aggregate_scores(correct, answer_keys, ks)
    scores["num_examples"] = len(examples)
    scores["num_samples"] = num_samples
    scores["generated"] = len(todo)
    if len(by_subset) > 1 or None not in by_subset:
        scores["subsets"] = {
            str(name): aggregate_scores(rows)["accuracy"] for name, rows in sorted(by_subset.items(), key=str)
        }
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------


def write_markdown(results: dict, path: Path) -> None:
    lines = [f"# Evaluation of `{results['model']}`", "", "| task | metric | value | examples | samples |"]
    lines.append("|---|---|---|---|---|")
    for name, scores in results["tasks"].items():
        for metric, value in scores.items():
            if isinstance(value, float):
                lines.append(
                    f"| {name} | {metric} | {100 * value:.1f} | {scores['num_examples']} | {scores['num_samples']} |"
                )
    for name, scores in results["tasks"].items():
        if "subsets" in scores:
            lines += ["", f"**{name}** accuracy by subset", "", "| subset | accuracy |", "|---|---|"]
            lines += [f"| {subset} | {100 * value:.1f} |" for subset, value in scores["subsets"].items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    with_subsets = [name for name, scores in tasks.items() if "subsets" in scores]
    fig, axes = plt.subplots(1, 1 + len(with_subsets), figsize=(4 + 5 * len(with_subsets), 3.5), squeeze=False)
    ax = axes[0][0]
    names = list(tasks)
    ax.bar(names, [100 * tasks[n]["accuracy"] for n in names], color="tab:blue")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("pass@1" if all(t["num_samples"] == 1 for t in tasks.values()) else "pass@1 (mean over samples)")
    ax.tick_params(axis="x", rotation=30)
    for ax, name in zip(axes[0][1:], with_subsets):
        subsets = tasks[name]["subsets"]
        ax.bar(list(subsets), [100 * v for v in subsets.values()], color="tab:orange")
        ax.set_ylim(0, 100)
        ax.set_title(f"{name} by subset")
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    fig.suptitle(results["model"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval",
        description="Zero-shot chain-of-thought evaluation in the model's chat format: "
        + ", ".join(TASKS)
        + ". Per-example outputs are cached in OUTPUT_DIR/cache, so an interrupted run resumes where it stopped.",
        epilog=(
            "--data_dir layout (original formats): math500/test.jsonl; gpqa/gpqa_diamond.csv or gpqa/dataset.zip; "
            "mgsm/mgsm_<lang>.tsv; global_mmlu/<lang>.parquet|.jsonl|.csv. Without it, data comes from the Hub."
        ),
    )
    parser.add_argument("--model", required=True, help="local directory or Hub id of a causal LM")
    parser.add_argument("--tasks", default="math500,gpqa_diamond,mgsm", help=f"comma-separated: {', '.join(TASKS)}")
    parser.add_argument("--data_dir", type=Path, help="offline copies of the datasets (layout below)")
    parser.add_argument("--output_dir", type=Path, help="default: outputs/eval/<model name>")
    parser.add_argument("--limit", type=int, help="first N examples per task (per language for mgsm, global_mmlu)")
    parser.add_argument("--num_samples", type=int, default=1, help="samples per question (pass@k, maj@k)")
    parser.add_argument("--temperature", type=float, help="default: 0 (greedy) for 1 sample, 0.6 for several")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, help="default: per task (4096 MATH/GPQA, 1024 MGSM)")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per generate call")
    parser.add_argument("--seed", type=int, default=0, help="sampling and GPQA choice-shuffling seed")
    parser.add_argument("--k", default=None, help="comma-separated k for pass@k / maj@k (default: 1,2,4,... up to n)")
    parser.add_argument("--languages", help="comma-separated languages for mgsm / global_mmlu")
    parser.add_argument("--gpqa_password", default=None, help="password of the GPQA dataset.zip (default: public one)")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--device_map", default=None, help='e.g. "auto" to spread a large model over GPUs')
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--no_progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        tasks = [get_task(name.strip()) for name in args.tasks.split(",") if name.strip()]
    except ValueError as error:
        parser.error(str(error))
    temperature = args.temperature if args.temperature is not None else (0.0 if args.num_samples == 1 else 0.6)
    if args.num_samples > 1 and temperature == 0:
        print("warning: --num_samples > 1 with --temperature 0 gives n identical greedy samples", file=sys.stderr)
    ks = [int(k) for k in args.k.split(",")] if args.k else [2**i for i in range(12) if 2**i <= args.num_samples]
    source = DataSource(
        data_dir=args.data_dir,
        languages=tuple(lang.strip() for lang in args.languages.split(",")) if args.languages else None,
        seed=args.seed,
        **({"gpqa_password": args.gpqa_password} if args.gpqa_password else {}),
    )
    output_dir = args.output_dir or Path("outputs") / "eval" / Path(args.model.rstrip("/")).name
    output_dir.mkdir(parents=True, exist_ok=True)

    # Data first: a missing dataset should fail in seconds, not after loading a 100B-parameter model.
    try:
        examples = {task.name: load_examples(task, source, args.limit) for task in tasks}
    except DataUnavailableError as error:
        raise SystemExit(f"error: {error}") from error
    model, tokenizer = load_model(args.model, args.dtype, args.device, args.trust_remote_code, args.device_map)
    results = {
        "model": args.model,
        "config": {
            "num_samples": args.num_samples,
            "temperature": temperature,
            "top_p": args.top_p,
            "seed": args.seed,
            "limit": args.limit,
            "data": str(args.data_dir) if args.data_dir else "hub",
        },
        "tasks": {},
    }
    for task in tasks:
        results["tasks"][task.name] = evaluate_task(
            task,
            model,
            tokenizer,
            examples[task.name],
            output_dir,
            num_samples=args.num_samples,
            temperature=temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            ks=ks,
            progress=not args.no_progress,
            model_name=args.model,
            device=args.device,
        )
        # Written after every task, so a crash in a later one keeps the finished scores.
        (output_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        write_markdown(results, output_dir / "results.md")
        write_plot(results, output_dir / "results.png")
        summary = {k: round(v, 4) for k, v in results["tasks"][task.name].items() if isinstance(v, float)}
        print(f"{task.name}: {summary}", file=sys.stderr)
    if any(task.name == "gpqa_diamond" for task in tasks):
        print(f"note: {output_dir} holds GPQA outputs; its terms forbid publishing them.", file=sys.stderr)
    print(f"results: {output_dir / 'results.json'}, results.md, results.png", file=sys.stderr)
    return results
