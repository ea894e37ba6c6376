"""The Llama 4 recipe end to end: pretraining, then lightweight SFT > online RL > lightweight DPO.

    python recipes/pipeline.py --config recipes/configs/pipeline_tiny.yaml --output_dir outputs/pipeline_tiny

Each stage is one of the recipes (`pretrain.py`, `sft.py`, `online_rl.py`, `dpo.py`) run with its own YAML plus
the overrides under `stages:` in the pipeline YAML, starting from the previous stage's model and writing to
`<output_dir>/<stage>`. After every stage the model is evaluated on the held-out split. The pipeline writes
`<output_dir>/results.json` (`{"stages": [{"name", "accuracy", ...}]}`), `report.md` and `results.png`
(accuracy per stage, each stage's loss curve, the online-RL reward curve) and prints the stage table at the end.
Killed and started again, it skips finished stages and the running stage resumes from its last checkpoint; a stage
whose settings changed since it ran is refused (naming what changed) unless `--overwrite_output_dir true` starts
every stage over.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from trl import DPOConfig, ModelConfig, SFTConfig

from eval.files import atomic_path, write_json_atomic, write_text_atomic
from recipes import dpo, online_rl, pretrain, sft
from recipes.rl import OnlineRLConfig
from recipes.validation import (
    InputError,
    check_arguments,
    check_run_manifest,
    parse_recipe_args,
    run_recipe,
    run_settings,
)

# name -> (script arguments, training config, entry point)
STAGES = {
    "pretrain": (pretrain.PretrainScriptArguments, SFTConfig, pretrain.main),
    "sft": (sft.SFTScriptArguments, SFTConfig, sft.main),
    "online_rl": (online_rl.OnlineRLScriptArguments, OnlineRLConfig, online_rl.main),
    "dpo": (dpo.DPOScriptArguments, DPOConfig, dpo.main),
}


@dataclass
class PipelineArguments:
    output_dir: str = field(default="outputs/pipeline_tiny", metadata={"help": "Where every stage writes."})
    model_name_or_path: str = field(
        default="hub_configs/tiny", metadata={"help": "Config (pretraining from scratch) or model to start from."}
    )
    stages: list[dict] | None = field(
        default=None,
        metadata={
            "help": "Ordered stages: each a mapping with `name` (pretrain, sft, online_rl, dpo), `config` (that "
            "recipe's YAML) and any of its arguments as overrides."
        },
    )
    shared: dict | None = field(
        default=None, metadata={"help": "Arguments given to every stage (e.g. the held-out split size, seed)."}
    )
    torch_threads: int = field(
        default=0, metadata={"help": "CPU threads for torch (0: torch's default, one per core)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Run every stage again from the start, discarding the checkpoints and results there."},
    )


def _flags(arguments: dict[str, Any]) -> list[str]:
    flags = []
    for key, value in arguments.items():
        if isinstance(value, dict):
            flags += [f"--{key}", yaml.safe_dump(value, default_flow_style=True).strip()]
        elif isinstance(value, list):
            flags += [f"--{key}", *map(str, value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags


def run_stage(
    spec: dict[str, Any], model_path: str, output_dir: Path, shared: dict[str, Any], overwrite: bool = False
) -> dict[str, Any]:
    """Run one recipe in this process; returns its results (read back from disk when it finished before with the
    same settings: the same recipe checks, `recipes.validation.check_run_manifest`, refuses changed ones)."""
    spec = dict(spec)
    name = spec.pop("name")
    if name not in STAGES:
        raise InputError(f"unknown stage {name!r}; stages are {list(STAGES)}")
    script_cls, config_cls, entry = STAGES[name]
    config_file = spec.pop("config", None)
    arguments = {**shared, **spec, "output_dir": str(output_dir)}
    arguments["model_name_or_path"] = model_path
    if overwrite:
        arguments["overwrite_output_dir"] = True
    argv = (["--config", config_file] if config_file else []) + _flags(arguments)
    script_args, training_args, model_args = parse_recipe_args((script_cls, config_cls, ModelConfig), argv)
    results_path = output_dir / "stage_results.json"
    if results_path.is_file() and not overwrite:
        check_arguments(script_args, training_args, model_args)
        settings = run_settings(script_args, training_args, model_args)
        try:
            check_run_manifest(output_dir, settings, write=False)
        except InputError as error:
            raise InputError(f"[{name}] {error}") from None
        print(f"[{name}] finished before: {results_path}")
        return json.loads(results_path.read_text(encoding="utf-8"))
    print(f"[{name}] {' '.join(argv)}")
    start = time.perf_counter()
    results = entry(script_args, training_args, model_args)
    results["seconds"] = time.perf_counter() - start
    write_json_atomic(results_path, results)
    return results


def summarize(name: str, results: dict[str, Any]) -> dict[str, Any]:
    heldout = results.get("heldout", {})
    losses = [(entry["step"], entry["loss"]) for entry in results.get("log_history", []) if "loss" in entry]
    summary = {
        "name": name,
        "accuracy": heldout.get("accuracy"),
        "accuracy_by_level": heldout.get("accuracy_by_level"),
        "accuracy_by_language": heldout.get("accuracy_by_language"),
        "boxed_rate": heldout.get("boxed_rate"),
        "seconds": round(results.get("seconds", 0.0), 1),
        "final_loss": losses[-1][1] if losses else None,
        "loss_curve": losses,
    }
    for key in ("filter", "pairs"):
        if key in results:
            summary[key] = results[key]
    for key in ("blind_accuracy", "accuracy_by_kind"):  # the visual task (eval/visual.py)
        if key in heldout:
            summary[key] = heldout[key]
    rewards = [entry["reward"] for entry in results.get("log_history", []) if "reward" in entry]
    if rewards:
        summary["reward_curve"] = rewards
    return summary


def paired_change(before: list[int], after: list[int]) -> dict[str, Any]:
    """Problems a stage newly solved and newly failed, with the two-sided sign-test p-value (McNemar's exact test):
    the probability of a split at least this uneven if the stage changed answers at random."""
    if len(before) != len(after):
        raise ValueError(f"stages were evaluated on different held-out sets ({len(before)} vs {len(after)} problems)")
    gained = sum(1 for b, a in zip(before, after) if a and not b)
    lost = sum(1 for b, a in zip(before, after) if b and not a)
    changed = gained + lost
    tail = sum(math.comb(changed, k) for k in range(min(gained, lost) + 1)) / 2**changed if changed else 1.0
    return {"gained": gained, "lost": lost, "p_value": min(1.0, 2 * tail)}


def stage_table(stages: list[dict[str, Any]]) -> list[str]:
    """The stage table (markdown): accuracy, the paired change against the previous stage, loss and time."""
    lines = [
        "| stage | accuracy | by level | vs previous stage: solved / lost (p) | boxed | final loss | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage in stages:
        levels = ", ".join(f"{k}: {v:.0%}" for k, v in (stage["accuracy_by_level"] or {}).items())
        loss = f"{stage['final_loss']:.3f}" if stage["final_loss"] is not None else "-"
        change = stage.get("vs_previous")
        change = f"+{change['gained']} / -{change['lost']} (p={change['p_value']:.2g})" if change else "-"
        accuracy = f"{stage['accuracy']:.1%}" if stage["accuracy"] is not None else "-"
        boxed = f"{stage['boxed_rate']:.0%}" if stage.get("boxed_rate") is not None else "-"
        lines.append(f"| {stage['name']} | {accuracy} | {levels} | {change} | {boxed} | {loss} | {stage['seconds']} |")
    return lines


def write_report(output_dir: Path, stages: list[dict[str, Any]]) -> None:
    write_json_atomic(output_dir / "results.json", {"stages": stages})
    lines = [
        "# Llama 4 pipeline report",
        "",
        "Held-out accuracy (greedy pass@1) after each stage. Against the previous stage: the problems it newly",
        "solved and newly failed, and the sign test's p-value for that split.",
        "",
        *stage_table(stages),
    ]
    if any("blind_accuracy" in stage for stage in stages):
        lines += [
            "",
            "Visual task: by level = by images per prompt. Image-blind control (every image grey) and per kind:",
            "",
        ]
        lines += ["| stage | image-blind control | by kind |", "|---|---|---|"]
        for stage in stages:
            kinds = ", ".join(f"{k}: {v:.0%}" for k, v in (stage.get("accuracy_by_kind") or {}).items())
            blind = f"{stage['blind_accuracy']:.1%}" if stage.get("blind_accuracy") is not None else "-"
            lines.append(f"| {stage['name']} | {blind} | {kinds} |")
    for stage in stages:
        if "filter" in stage:
            f = stage["filter"]
            lines += ["", f"SFT judge filter kept {f['kept']}/{f['total']} prompts ({f['kept_fraction']:.0%})."]
        if "pairs" in stage:
            lines += ["", f"DPO: {stage['pairs']['pairs']} pairs from {stage['pairs']['prompts']} prompts."]
    lines += ["", "![accuracy, losses and the RL reward](results.png)", ""]
    write_text_atomic(output_dir / "report.md", "\n".join(lines))
    plot(output_dir / "results.png", stages)


def plot(path: Path, stages: list[dict[str, Any]]) -> None:
    """Top row: held-out accuracy per stage (bars labelled with their values) and the online-RL reward per step;
    bottom row: each stage's training loss on its own axes (their steps and scales differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_loss = [stage for stage in stages if stage.get("loss_curve")]
    with_reward = [stage for stage in stages if stage.get("reward_curve")]
    columns = max(len(with_loss), 2)
    figure = plt.figure(figsize=(3.6 * columns, 7.2))
    grid = figure.add_gridspec(2, columns * 2)
    half = columns
    accuracy_axes = figure.add_subplot(grid[0, : half if with_reward else columns * 2])
    names = [stage["name"] for stage in stages]
    values = [100 * (stage["accuracy"] or 0) for stage in stages]
    colors = plt.get_cmap("tab10").colors
    bars = accuracy_axes.bar(names, values, color=[colors[i % 10] for i in range(len(stages))])
    accuracy_axes.bar_label(bars, labels=[f"{v:.1f}%" for v in values], padding=2, fontsize=10)
    accuracy_axes.set_ylim(0, min(100, max(values + [1]) * 1.25 + 5))
    accuracy_axes.set_ylabel("held-out accuracy (%)")
    accuracy_axes.set_title("accuracy after each stage (greedy pass@1)")
    accuracy_axes.grid(axis="y", alpha=0.3)
    if with_reward:
        reward_axes = figure.add_subplot(grid[0, half:])
        for stage in with_reward:
            rewards = stage["reward_curve"]
            reward_axes.plot(range(1, len(rewards) + 1), rewards, marker="o", markersize=3, label=stage["name"])
        reward_axes.set_xlabel("logged step")
        reward_axes.set_ylabel("mean reward")
        reward_axes.set_title("online RL reward")
        reward_axes.grid(alpha=0.3)
        if len(with_reward) > 1:
            reward_axes.legend()
    for index, stage in enumerate(with_loss):
        axes = figure.add_subplot(grid[1, 2 * index : 2 * index + 2])
        steps, losses = zip(*stage["loss_curve"])
        color = colors[names.index(stage["name"]) % 10]
        axes.plot(steps, losses, color=color, marker="o" if len(steps) < 30 else None, markersize=3)
        axes.set_title(f"{stage['name']} loss")
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if index == 0:
            axes.set_ylabel("training loss")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


def main(args: PipelineArguments) -> list[dict[str, Any]]:
    if not args.stages:
        raise InputError("no stages: give `stages:` in the pipeline YAML (see recipes/configs/pipeline_tiny.yaml)")
    for spec in args.stages:
        if not isinstance(spec, dict) or spec.get("name") not in STAGES:
            raise InputError(f"stages: each needs a `name` among {list(STAGES)}, got {spec!r}")
        # Found before the first stage runs, not after the earlier stages have trained.
        if spec.get("config") and not Path(spec["config"]).expanduser().is_file():
            raise InputError(f"stages: [{spec['name']}] config {spec['config']!r}: no such file")
        if "model_name_or_path" in spec:
            raise InputError(
                f"stages: [{spec['name']}] sets model_name_or_path, but each stage starts from the previous stage's "
                "model (the first from the pipeline's --model_name_or_path): drop it, or run that recipe on its own"
            )
    names = [spec["name"] for spec in args.stages]
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        raise InputError(
            f"stages: {repeated} appear more than once; each stage writes to <output_dir>/<name>, so a stage runs "
            "once per pipeline (run a second pipeline from the first one's output for another round)"
        )
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    output_dir = Path(args.output_dir)
    model_path = args.model_name_or_path
    summaries = []
    previous_correct = None
    for spec in args.stages:
        stage_dir = output_dir / spec["name"]
        results = run_stage(spec, model_path, stage_dir, dict(args.shared or {}), args.overwrite_output_dir)
        summaries.append(summarize(spec["name"], results))
        correct = results.get("heldout", {}).get("correct")
        if previous_correct is not None and correct is not None:
            summaries[-1]["vs_previous"] = paired_change(previous_correct, correct)
        previous_correct = correct
        write_report(output_dir, summaries)
        model_path = str(stage_dir)
        if summaries[-1]["accuracy"] is not None:
            print(f"[{spec['name']}] held-out accuracy {summaries[-1]['accuracy']:.1%}")
    print("\n".join(["", *stage_table(summaries), ""]))
    print(
        f"results: {output_dir / 'results.json'}, report: {output_dir / 'report.md'}, plot: {output_dir / 'results.png'}"
    )
    return summaries


if __name__ == "__main__":
    run_recipe(main, (PipelineArguments,))
