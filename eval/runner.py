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

from modeling_llama4.fingerprint import prompting_fingerprint, weights_fingerprint

from .files import atomic_path, write_json_atomic, write_text_atomic
from .generation import generate_completions
from .grading import aggregate_scores, macro_scores
from .loading import InputError, load_causal_lm, load_tokenizer, torch_dtype
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
    multimodal: bool = False,
):
    """Model and tokenizer from a local directory or Hub id through `eval.loading.load_causal_lm` (Llama 4 into
    our sparse `Llama4ForCausalLM`, anything else through `AutoModelForCausalLM`). `device_map` (e.g. "auto")
    spreads a model too large for one GPU; otherwise it goes to `device`. `multimodal` (image tasks): the whole
    `Llama4ForConditionalGeneration` and its processor instead."""
    import torch

    kwargs = {"device_map": device_map} if device_map else {}
    if multimodal:
        from .loading import load_multimodal

        model, processor = load_multimodal(path, flag="--model", dtype=dtype, **kwargs)
        if not device_map:
            model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return model, processor
    model = load_causal_lm(path, flag="--model", dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    if not device_map:
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(path, "--model", trust_remote_code=trust_remote_code, pad_with_eos=False)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# One task
# ---------------------------------------------------------------------------------------------------------------


def load_examples(task: Task, source: DataSource, limit: int | None = None) -> list[Example]:
    """The task's examples, the first `limit` of them (per language for multilingual tasks). No examples, or a row
    without a field the task reads, is a `DataUnavailableError` naming the task and the fix."""
    try:
        examples = task.load(source)
    except KeyError as error:
        where = f"in {source.data_dir}" if source.data_dir is not None else "from the Hub"
        raise DataUnavailableError(
            f"{task.name}: a data row {where} lacks the field {error}; --data_dir files must keep the original "
            "format (see `python -m eval --help`)"
        ) from None
    if not examples:
        where = f"--data_dir {source.data_dir}" if source.data_dir is not None else "the Hub copy"
        raise DataUnavailableError(f"{task.name}: {where} holds no examples (an empty data file?)")
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
        "prompting": prompting_fingerprint(tokenizer, model),  # a fixed chat template regenerates
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
            images=[examples[i].images for i in todo] if "image" in task.modalities else None,
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
    lines = [json.dumps(record, ensure_ascii=False, default=str) + "\n" for record in records]
    write_text_atomic(output_dir / "samples" / f"{task.name}.jsonl", "".join(lines))

    scores = aggregate_scores(correct, answer_keys, ks)
    if task.macro_average:
        scores.update(macro_scores(correct, answer_keys, [example.subset for example in examples], ks))
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
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    with_subsets = [name for name, scores in tasks.items() if "subsets" in scores]
    fig, axes = plt.subplots(1, 1 + len(with_subsets), figsize=(4 + 5 * len(with_subsets), 3.5), squeeze=False)
    ax = axes[0][0]
    names = list(tasks)
    # A macro-averaged task (BBH) shows its headline number, the mean over its sub-tasks.
    labels = [f"{n} (macro)" if "macro_accuracy" in tasks[n] else n for n in names]
    ax.bar(labels, [100 * tasks[n].get("macro_accuracy", tasks[n]["accuracy"]) for n in names], color="tab:blue")
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
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=120, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (`--limit 0` would evaluate nothing and `--limit -2` all but two)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer (give N >= 1, or leave the flag out)")
    return value


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks argparse types cannot do alone; each failure exits through `parser.error` naming the flag."""
    import torch

    for flag, device in (("--device", args.device), ("--device_map", args.device_map)):
        if device in (None, "auto", "balanced", "balanced_low_0", "sequential"):  # accelerate's placement rules
            continue
        try:
            kind = torch.device(device).type
        except RuntimeError:
            parser.error(f"{flag} {device!r}: not a torch device; use cpu, cuda, cuda:1, mps, ...")
        if kind == "cuda" and not torch.cuda.is_available():
            parser.error(f"{flag} {device!r}: this machine has no CUDA GPU (torch {torch.__version__}); use cpu")
    if args.temperature is not None and args.temperature < 0:
        parser.error(f"--temperature {args.temperature}: must be >= 0 (0 is greedy)")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top_p {args.top_p}: must be in (0, 1]")
    if args.k:
        try:
            ks = [int(k) for k in args.k.split(",")]
        except ValueError:
            parser.error(f"--k {args.k!r}: give comma-separated integers, e.g. 1,2,4")
        if any(k < 1 or k > args.num_samples for k in ks):
            parser.error(f"--k {args.k}: each k must be between 1 and --num_samples ({args.num_samples})")
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data_dir: no such directory {str(args.data_dir)!r}")
    try:
        torch_dtype(args.dtype)
    except InputError as error:
        parser.error(str(error))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval",
        description="Chain-of-thought evaluation in the model's chat format: "
        + ", ".join(TASKS)
        + ". Per-example outputs are cached in OUTPUT_DIR/cache, so an interrupted run resumes where it stopped.",
        epilog="--data_dir layout (original formats): "
        + "; ".join(dict.fromkeys(task.layout for task in TASKS.values() if task.layout))
        + ". Without it, data comes from the Hub.",
    )
    parser.add_argument("--model", required=True, help="local directory or Hub id of a causal LM")
    parser.add_argument("--tasks", default="math500,gpqa_diamond,mgsm", help=f"comma-separated: {', '.join(TASKS)}")
    parser.add_argument("--data_dir", type=Path, help="offline copies of the datasets (layout below)")
    parser.add_argument("--output_dir", type=Path, help="default: outputs/eval/<model name>")
    parser.add_argument(
        "--limit", type=positive_int, help="first N examples per task (per language for mgsm, global_mmlu); N >= 1"
    )
    parser.add_argument("--num_samples", type=positive_int, default=1, help="samples per question (pass@k, maj@k)")
    parser.add_argument("--temperature", type=float, help="default: 0 (greedy) for 1 sample, 0.6 for several")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument(
        "--max_new_tokens",
        type=positive_int,
        help="default: per task (" + ", ".join(f"{task.name} {task.max_new_tokens}" for task in TASKS.values()) + ")",
    )
    parser.add_argument("--batch_size", type=positive_int, default=16, help="sequences per generate call")
    parser.add_argument("--seed", type=int, default=0, help="sampling and GPQA choice-shuffling seed")
    parser.add_argument("--k", default=None, help="comma-separated k for pass@k / maj@k (default: 1,2,4,... up to n)")
    parser.add_argument("--languages", help="comma-separated languages for mgsm / global_mmlu / synthetic")
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
    if not tasks:
        parser.error(f"--tasks {args.tasks!r} names no task; available: {', '.join(TASKS)}")
    check_args(parser, args)
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
    # Created by the first file written into it, so a failed start leaves no empty directory behind.
    output_dir = args.output_dir or Path("outputs") / "eval" / Path(args.model.rstrip("/")).name
    if output_dir.exists() and not output_dir.is_dir():
        raise SystemExit(f"error: --output_dir {str(output_dir)!r} is a file; give a directory for the results")

    # Data first: a missing dataset should fail in seconds, not after loading a 100B-parameter model.
    try:
        examples = {task.name: load_examples(task, source, args.limit) for task in tasks}
    except (DataUnavailableError, ValueError) as error:
        raise SystemExit(f"error: {error}") from error
    try:
        multimodal = any("image" in task.modalities for task in tasks)
        model, tokenizer = load_model(
            args.model, args.dtype, args.device, args.trust_remote_code, args.device_map, multimodal=multimodal
        )
    except InputError as error:
        raise SystemExit(f"error: {error}") from None
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
            # A multimodal run loads the processor; text tasks take its tokenizer.
            tokenizer if "image" in task.modalities else getattr(tokenizer, "tokenizer", tokenizer),
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
        write_json_atomic(output_dir / "results.json", results)
        write_markdown(results, output_dir / "results.md")
        write_plot(results, output_dir / "results.png")
        summary = {k: round(v, 4) for k, v in results["tasks"][task.name].items() if isinstance(v, float)}
        print(f"{task.name}: {summary}", file=sys.stderr)
    if any(task.name == "gpqa_diamond" for task in tasks):
        print(f"note: {output_dir} holds GPQA outputs; its terms forbid publishing them.", file=sys.stderr)
    print(f"results: {output_dir / 'results.json'}, results.md, results.png", file=sys.stderr)
    return results
