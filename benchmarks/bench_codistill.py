"""Does codistillation beat hard labels? The same student, the same data and steps, with and without a teacher.

    python benchmarks/bench_codistill.py            # teacher trained once and cached in --output_dir
    python benchmarks/bench_codistill.py --quick    # a smoke run of every code path (minutes; numbers meaningless)
    python benchmarks/bench_codistill.py --quick --arms hard,topk --steps 10   # flags given replace --quick's sizes

On the bundled synthetic task (recipes/synthetic.py): a teacher wider than the student (hidden 256 vs 128) is
trained longer on a large corpus of worked problems; then one student initialisation is trained for the same steps
on a smaller corpus:

- `hard`: TRL's `SFTTrainer`, cross-entropy to the labels only;
- `adaptive`, `adaptive_argmax`, `schedule`: `CoDistillationTrainer` with that `weighting` (the formulas are in
  `recipes/trainers/codistill_trainer.py`), s(t): 1 -> 0.5 linearly;
- `topk`: adaptive, from the teacher's top-32 log-probs written to disk beforehand (no teacher in memory).

Each student corpus size in `--student_documents` is a regime: few documents (many epochs, where hard labels
overfit) and more.

Reported on held-out problems (never in any training split): greedy accuracy (generation + `math_answer_correct`)
per level and the cross-entropy of the reference completions. Writes `results.json` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer
from trl.trainer.utils import pad

from eval.generation import generate_completions
from eval.grading import math_answer_correct
from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from recipes.synthetic import arithmetic_problems
from recipes.trainers import (
    CoDistillationConfig,
    CoDistillationTrainer,
    teacher_fingerprint,
    tokenize_like_sft,
    write_teacher_topk,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_types import comma_list, fill_unset, names, positive_float, positive_int  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "hub_configs" / "tiny"
STUDENT = dict(
    attention_chunk_size=128, hidden_size=128, intermediate_size=128, intermediate_size_mlp=256, head_dim=32
)
TEACHER = dict(
    attention_chunk_size=128, hidden_size=256, intermediate_size=256, intermediate_size_mlp=512, head_dim=32,
    num_attention_heads=8, num_key_value_heads=4,
)  # fmt: skip
LEVELS = (1, 2)


def train_args(config_class, output_dir: Path, **overrides):
    defaults = dict(
        output_dir=str(output_dir), use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=25,
        max_length=160, learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=20, weight_decay=0.0, seed=0,
        disable_tqdm=True, router_aux_loss_coef=0.001, completion_only_loss=False,
    )  # fmt: skip
    return config_class(**{**defaults, **overrides})


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str))
    temporary.replace(path)


def corpus_of(num_problems: int, seed: int) -> Dataset:
    """Worked problems in the chat format the evaluation prompts with; trained on every token (prompt included,
    like pretraining: `completion_only_loss=False`), which teaches this tiny model arithmetic much faster than the
    completions alone."""
    return arithmetic_problems("train", num_problems, seed=seed, levels=LEVELS).select_columns(
        ["prompt", "completion"]
    )


def train_teacher(tokenizer, args, folder: Path) -> Llama4ForCausalLM:
    """The teacher, trained once and cached in `folder` (retrained when its settings change)."""
    settings = {"shape": TEACHER, "steps": args.teacher_steps, "batch": args.teacher_batch, "levels": LEVELS}
    settings["data"] = "chat prompt-completion, loss on every token"
    marker = folder / "bench_settings.json"
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(settings)):
        print(f"teacher: cached in {folder}")
        return Llama4ForCausalLM.from_pretrained(folder)
    torch.manual_seed(1)
    teacher = Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY, **TEACHER))
    corpus = corpus_of(args.teacher_steps * args.teacher_batch, seed=1)
    config = train_args(
        SFTConfig, folder / "run", max_steps=args.teacher_steps, per_device_train_batch_size=args.teacher_batch
    )
    start = time.time()
    SFTTrainer(model=teacher, args=config, train_dataset=corpus, processing_class=tokenizer).train()
    print(f"teacher: {args.teacher_steps} steps x {args.teacher_batch} in {time.time() - start:.0f} s")
    teacher.save_pretrained(folder)
    marker.write_text(json.dumps(settings))
    return teacher


@torch.no_grad()
def heldout_cross_entropy(model, tokenizer, test: Dataset) -> float:
    """Mean cross-entropy (nats/token) of the reference completions of held-out problems, prompts as context."""
    rows = tokenize_like_sft(test, tokenizer, train_args(SFTConfig, Path("unused"), completion_only_loss=True))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), 50):
        batch = rows[start : start + 50]
        ids = pad([torch.tensor(r) for r in batch["input_ids"]], padding_value=tokenizer.pad_token_id)
        labels = pad([torch.tensor(r) for r in batch["labels"]], padding_value=-100)[:, 1:]
        mask = pad([torch.ones(len(r), dtype=torch.long) for r in batch["input_ids"]], padding_value=0)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        keep = labels != -100
        total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        count += keep.sum().item()
    model.train(was_training)
    return total / count


def evaluate(model, tokenizer, test: Dataset) -> dict[str, Any]:
    outputs = generate_completions(
        model, tokenizer, list(test["prompt"]), max_new_tokens=40, batch_size=100, progress=False
    )
    correct = [math_answer_correct(samples[0], gold) for samples, gold in zip(outputs, test["answer"])]
    levels = list(test["level"])
    by_level = {  # nan: a small --heldout may draw no problem of a level
        level: sum(c for c, lv in zip(correct, levels) if lv == level) / levels.count(level)
        if level in levels
        else math.nan
        for level in LEVELS
    }
    return {
        "accuracy": sum(correct) / len(correct),
        "accuracy_by_level": by_level,
        "heldout_ce": heldout_cross_entropy(model, tokenizer, test),
    }


def train_student(arm: str, teacher, tokenizer, corpus: Dataset, args, out: Path) -> tuple[Any, dict[str, Any]]:
    torch.manual_seed(0)
    student = Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY, **STUDENT))
    common = dict(max_steps=args.steps, per_device_train_batch_size=args.batch)
    distill = dict(temperature=args.temperature, soft_weight_start=1.0, soft_weight_end=0.5)
    start = time.time()
    if arm == "hard":
        trainer = SFTTrainer(
            model=student, args=train_args(SFTConfig, out / arm, **common), train_dataset=corpus,
            processing_class=tokenizer,
        )  # fmt: skip
    elif arm == "topk":
        store = out / f"teacher_top{args.top_k}_{teacher_fingerprint(teacher)}"
        config = train_args(CoDistillationConfig, out / arm, teacher_logits_path=str(store), **common, **distill)
        write_teacher_topk(
            teacher, tokenizer, corpus, store, args=config, top_k=args.top_k, temperature=args.temperature
        )
        trainer = CoDistillationTrainer(model=student, args=config, train_dataset=corpus, processing_class=tokenizer)
    else:  # one of the weightings
        config = train_args(CoDistillationConfig, out / arm, weighting=arm, **common, **distill)
        trainer = CoDistillationTrainer(
            model=student, teacher_model=teacher, args=config, train_dataset=corpus, processing_class=tokenizer
        )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    summary = {"train_seconds": time.time() - start, "last_log": logs[-1] if logs else {}}
    return student, summary


ARMS = {
    "hard": "hard labels only (SFTTrainer)",
    "adaptive": "codistill, `adaptive`",
    "adaptive_argmax": "codistill, `adaptive_argmax`",
    "schedule": "codistill, `schedule`",
    "topk": "codistill, `adaptive`, top-32 files",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", help="default: outputs/bench_codistill (with --quick: ..._quick)")
    parser.add_argument("--teacher_steps", type=positive_int, help="default: 300")
    parser.add_argument("--teacher_batch", type=positive_int, default=32)
    parser.add_argument("--steps", type=positive_int, help="student steps, every arm (default: 150)")
    parser.add_argument("--batch", type=positive_int, default=16, help="student batch, every arm")
    parser.add_argument(
        "--student_documents",
        type=comma_list(positive_int),
        help="sizes of the students' corpus, comma-separated (default: 128,512)",
    )
    parser.add_argument("--temperature", type=positive_float, default=1.0)
    parser.add_argument("--top_k", type=positive_int, default=32)
    parser.add_argument("--heldout", type=positive_int, help="held-out problems (default: 200)")
    parser.add_argument(
        "--arms", type=names(ARMS), default=",".join(ARMS), help=f"comma-separated, among {','.join(ARMS)}"
    )
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the code paths, not the claim")
    args = parser.parse_args()
    # --quick's sizes replace only the defaults: a flag given on the command line is kept
    quick = dict(
        teacher_steps=4, steps=3, student_documents=[32], heldout=8, output_dir="outputs/bench_codistill_quick"
    )
    full = dict(
        teacher_steps=300, steps=150, student_documents=[128, 512], heldout=200, output_dir="outputs/bench_codistill"
    )
    fill_unset(args, quick if args.quick else full)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    start = time.time()
    teacher = train_teacher(tokenizer, args, out / "teacher")
    test = arithmetic_problems("test", args.heldout, levels=LEVELS)
    # Finished arms are kept in results.json and reused by a rerun with the same settings (a crash or a new arm
    # does not cost the others again).
    comparable = {k: v for k, v in vars(args).items() if k not in ("arms", "student_documents", "threads")}
    results_path = out / "results.json"
    previous = json.loads(results_path.read_text()) if results_path.exists() else {}
    if previous.get("comparable") != comparable:
        previous = {}
    results: dict[str, Any] = {**previous, "settings": vars(args), "comparable": comparable}
    results["teacher"] = evaluate(teacher, tokenizer, test)
    print(f"teacher: {results['teacher']}", flush=True)
    arms, sizes = args.arms, args.student_documents
    for documents in sizes:
        corpus = corpus_of(documents, seed=2)
        for arm in arms:
            key = f"{arm}@{documents}"
            if key not in previous:
                student, summary = train_student(arm, teacher, tokenizer, corpus, args, out / f"docs{documents}")
                results[key] = {**evaluate(student, tokenizer, test), **summary}
                write_json(results_path, results)
            shown = {k: v for k, v in results[key].items() if k != "last_log"}
            print(f"{arm} on {documents} documents{' (from results.json)' * (key in previous)}: {json.dumps(shown)}")
    results["total_seconds"] = time.time() - start
    write_json(results_path, results)

    print(f"\nstudents: {args.steps} steps x batch {args.batch}; held-out problems: {args.heldout}")
    print("\n| model | student corpus | held-out accuracy | level 1 | level 2 | held-out CE (nats/token) |")
    print("|---|---|---|---|---|---|")
    rows = [("teacher (hidden 256)", f"{args.teacher_steps * args.teacher_batch} documents", results["teacher"])]
    rows += [(ARMS[arm], f"{n} documents", results[f"{arm}@{n}"]) for n in sizes for arm in arms]
    for name, corpus_size, r in rows:
        levels = " | ".join(f"{r['accuracy_by_level'][lv]:.1%}" for lv in LEVELS)
        print(f"| {name} | {corpus_size} | {r['accuracy']:.1%} | {levels} | {r['heldout_ce']:.3f} |")
    print(f"\ntotal {results['total_seconds'] / 60:.1f} min")
    assert all(math.isfinite(results[f"{a}@{n}"]["heldout_ce"]) for a in arms for n in sizes)


if __name__ == "__main__":
    main()
