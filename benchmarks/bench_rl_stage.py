"""Where the online-RL stage's time goes, TRL's generation and log-prob paths against ours, in one run.

    python benchmarks/bench_rl_stage.py --model outputs/pipeline_tiny/sft --max_steps 3
    python benchmarks/bench_rl_stage.py --model PATH --threads 2 --variants trl ours trl ours

Each variant runs `recipes/online_rl.py` (recipes/configs/online_rl_tiny.yaml, no checkpoints, held-out
evaluation only with `--heldout_problems`) for `--max_steps` steps in a fresh subprocess under cProfile. "trl":
`OnlineRLTrainer` with its generation and log-prob overrides switched off, i.e. TRL's `generate` (generate()'s
default dynamic cache) and fused-head log-probs over every position, and every refill a full batch
(`--refill_oversample 0`); "ours": the shipped trainer and config. Times are CPU seconds of the process
(`time.process_time`, all threads), which a machine busy with other work inflates less than wall time; wall time is
printed too. Same seed; the two sample from the same distributions but not the same random stream, and refill
with different numbers of prompts, so the answers differ.

The whole stage as the main job runs it (32 steps, then 1000 held-out problems, 2 threads):

    python benchmarks/bench_rl_stage.py --model outputs/pipeline_tiny/sft --max_steps 32 --heldout_problems 1000 \
        --threads 2 --variants trl ours
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_types import model_dir, nonnegative_int, positive_int  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# (row, function as pstats names it: "file:function"); cumulative CPU seconds.
PARTS = [
    ("generation (all rounds)", "grpo_trainer.py:_generate"),
    ("  prefill inside generate()", "generation/utils.py:_prefill"),
    ("rewards and grading", "grpo_trainer.py:_calculate_rewards"),
    ("log-prob forward (training)", "grpo_trainer.py:compute_loss"),
    ("backward", "torch/autograd/__init__.py:backward"),
]
TOTAL = "trainer.py:_inner_training_loop"


def child(variant: str, model: str, max_steps: int, heldout: int, out: str) -> None:
    import cProfile
    import pstats

    sys.path.insert(0, str(ROOT))
    from trl import ModelConfig

    from recipes import online_rl
    from recipes.rl import OnlineRLConfig, OnlineRLTrainer
    from recipes.validation import run_recipe

    extra = []
    if variant == "trl":
        OnlineRLTrainer._can_share_prompts = lambda self, model, generation=False: False
        # generate()'s default cache (TRL's path without our static one); every refill a full batch
        extra = ["--cache_implementation", "dynamic", "--refill_oversample", "0"]
    with tempfile.TemporaryDirectory() as output_dir:
        argv = ["--config", str(ROOT / "recipes/configs/online_rl_tiny.yaml"), "--model_name_or_path", model,
                "--max_steps", str(max_steps), "--heldout_problems", str(heldout), "--output_dir", output_dir,
                "--save_strategy", "no", "--logging_steps", "1", *extra]  # fmt: skip
        profile = cProfile.Profile(time.process_time)
        wall, cpu = time.perf_counter(), time.process_time()
        results = profile.runcall(
            run_recipe, online_rl.main, (online_rl.OnlineRLScriptArguments, OnlineRLConfig, ModelConfig), argv
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stats = pstats.Stats(profile).stats
    cumulative: dict[str, float] = {}
    calls: dict[str, int] = {}
    for (path, _, name), (_, ncalls, _, cum, _) in stats.items():
        key = f"{path}:{name}"
        for _, pattern in [*PARTS, ("", TOTAL)]:
            if key.endswith(pattern):
                cumulative[pattern] = cumulative.get(pattern, 0.0) + cum
                calls[pattern] = calls.get(pattern, 0) + ncalls
    steps = [h for h in results["log_history"] if "reward" in h]
    summary = {
        "variant": variant,
        "wall": wall,
        "cpu": cpu,
        "parts": cumulative,
        "generate_calls": calls.get(PARTS[0][1], 0),
        "reward": sum(h["reward"] for h in steps) / max(1, len(steps)),
        "accuracy_reward": sum(h["rewards/accuracy_reward/mean"] for h in steps) / max(1, len(steps)),
        "heldout_accuracy": results.get("heldout", {}).get("accuracy"),
    }
    Path(out).write_text(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=model_dir, help="The SFT model the RL stage starts from.")
    parser.add_argument("--max_steps", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=1, help="OMP_NUM_THREADS of each run.")
    parser.add_argument(
        "--heldout_problems",
        type=nonnegative_int,
        default=0,
        help="Held-out evaluation after training (the main job: 1000).",
    )
    parser.add_argument("--variants", nargs="+", default=["trl", "ours"], choices=["trl", "ours"])
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        return child(args._child[0], args.model, args.max_steps, args.heldout_problems, args._child[1])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    rows = []
    for variant in args.variants:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [sys.executable, __file__, "--model", args.model, "--max_steps", str(args.max_steps),
                       "--heldout_problems", str(args.heldout_problems), "--_child", variant, out.name]  # fmt: skip
            run = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if run.returncode:
                raise SystemExit(f"error: the {variant!r} run failed:\n{run.stderr[-3000:]}")
            rows.append(json.loads(Path(out.name).read_text()))
    import torch
    import transformers
    import trl

    print(f"RL stage, {args.max_steps} steps of recipes/configs/online_rl_tiny.yaml from {args.model}, "
          f"OMP_NUM_THREADS={args.threads}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"trl {trl.__version__}. CPU seconds (wall seconds in the last rows).\n")  # fmt: skip
    header = "| part | " + " | ".join(row["variant"] for row in rows) + " |"
    print(header + "\n|---|" + "---|" * len(rows))
    for label, pattern in [("training loop", TOTAL), *PARTS]:
        print(f"| {label} | " + " | ".join(f"{row['parts'].get(pattern, 0.0):.1f}" for row in rows) + " |")
    print("| TRL generation rounds | " + " | ".join(str(row["generate_calls"]) for row in rows) + " |")
    print("| process CPU s | " + " | ".join(f"{row['cpu']:.1f}" for row in rows) + " |")
    print("| process wall s | " + " | ".join(f"{row['wall']:.1f}" for row in rows) + " |")
    print("| mean accuracy reward | " + " | ".join(f"{row['accuracy_reward']:.3f}" for row in rows) + " |")
    if args.heldout_problems:
        print("| held-out accuracy | " + " | ".join(f"{row['heldout_accuracy']:.1%}" for row in rows) + " |")


if __name__ == "__main__":
    main()
