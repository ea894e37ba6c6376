"""GPU smoke run of the post-training recipes on the tiny model: SFT with the judge filter, GRPO with a KL term
(its reference rebuilt by TRL from the checkpoint path) and DPO, a few steps each, on one device.

    python scripts/gpu_smoke.py --device cuda --steps 4 --output_dir outputs/gpu_smoke   # scripts/gpu_smoke.sh
    python scripts/gpu_smoke.py --dry-run --output_dir /tmp/smoke                      # the same on CPU, 1 step

Prints, per stage, where its sampling / generation and its training ran and how long the stage took, and fails
if anything ran elsewhere than `--device` (e.g. sampling left on the CPU by `from_pretrained`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import DPOConfig, ModelConfig, SFTConfig, TrlParser  # noqa: E402

import eval.generation  # noqa: E402
from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig  # noqa: E402
from recipes import dpo, online_rl, sft  # noqa: E402
from recipes.rl import OnlineRLConfig  # noqa: E402

TINY = ROOT / "hub_configs" / "tiny"
# A random tiny model never solves a problem; its answers differ in digit count, so GRPO groups and DPO pairs
# have reward differences to learn from.
REWARD = "tests.recipe_rewards.digit_share_reward"


def record_generation_devices() -> Counter:
    """Count the device of every generation pass of the recipes' sampling and held-out evaluation."""
    devices: Counter = Counter()
    original = eval.generation.generation_device

    def recording(model, device=None):
        chosen = original(model, device)
        devices[str(chosen)] += 1
        return chosen

    eval.generation.generation_device = recording
    return devices


def stage_args(common: list[str], extra: list[str], config: str, dataclasses: tuple) -> tuple:
    argv = ["--config", str(ROOT / "recipes" / "configs" / config), *common, *extra]
    return TrlParser(dataclasses).parse_args_and_config(argv)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--problems", type=int, default=64, help="train problems per stage")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/gpu_smoke"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, 1 step, 16 problems: checks the script itself")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.steps, args.problems = "cpu", 1, 16
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU; run with --device cpu (DEVICE=cpu)")
    shutil.rmtree(args.output_dir, ignore_errors=True)  # a smoke run starts clean, it never resumes

    torch.manual_seed(0)
    policy = args.output_dir / "policy"
    Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY)).save_pretrained(policy)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(policy)

    on_cpu = "true" if args.device == "cpu" else "false"
    common = ["--max_steps", str(args.steps), "--save_steps", "1000", "--logging_steps", "1", "--use_cpu", on_cpu,
              "--train_problems", str(args.problems), "--heldout_problems", "16", "--heldout_batch_size", "16",
              "--report_to", "none", "--bf16", "false"]  # fmt: skip
    stages = [
        ("sft (judge filter)", sft.main, "sft_tiny.yaml", (sft.SFTScriptArguments, SFTConfig, ModelConfig),
         ["--judge_samples", "2", "--judge_max_new_tokens", "16", "--judge_threshold", "1.0",
          "--per_device_train_batch_size", "8", "--max_length", "128"]),
        ("grpo (beta 0.04)", online_rl.main, "online_rl_tiny.yaml",
         (online_rl.OnlineRLScriptArguments, OnlineRLConfig, ModelConfig),
         ["--beta", "0.04", "--reward_funcs", REWARD, "--reward_weights", "1.0",
          "--pass_rate_reward", "digit_share_reward", "--num_generations", "4", "--per_device_train_batch_size", "8",
          "--max_completion_length", "16"]),
        ("dpo (policy pairs)", dpo.main, "dpo_tiny.yaml", (dpo.DPOScriptArguments, DPOConfig, ModelConfig),
         ["--reward_funcs", REWARD, "--pair_samples", "4", "--pair_temperature", "1.0", "--pair_max_new_tokens", "16",
          "--per_device_train_batch_size", "4", "--max_length", "128"]),
    ]  # fmt: skip
    rows, model_path, failures = [], policy, []
    devices = record_generation_devices()
    for name, run, config, dataclasses, extra in stages:
        output = args.output_dir / name.split()[0]
        script_args, training_args, model_args = stage_args(
            common, ["--model_name_or_path", str(model_path), "--output_dir", str(output), *extra], config, dataclasses
        )
        devices.clear()
        start = time.perf_counter()
        run(script_args, training_args, model_args)
        seconds = time.perf_counter() - start
        trained_on = str(training_args.device)
        sampled_on = ", ".join(f"{device} x{count}" for device, count in sorted(devices.items()))
        rows.append((name, sampled_on, trained_on, seconds))
        wrong = [d for d in [*devices, trained_on] if torch.device(d).type != args.device]
        if wrong:
            failures.append(f"{name}: ran on {wrong}, expected {args.device}")
        model_path = output
    print("\n| stage | sampling / generation on | training on | time (s) |\n|---|---|---|---|")
    for name, sampled_on, trained_on, seconds in rows:
        print(f"| {name} | {sampled_on} | {trained_on} | {seconds:.1f} |")
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))  # fmt: skip
    if failures:
        raise SystemExit("error: " + "; ".join(failures))
    print("GPU SMOKE OK" if args.device == "cuda" else "SMOKE OK (cpu)")


if __name__ == "__main__":
    main()
