"""MetaP evidence: a coordinate check and learning-rate transfer sweeps (width, depth, expert count), standard
parametrisation (SP) against MetaP, on the bundled synthetic pretraining corpus.

    OMP_NUM_THREADS=1 python benchmarks/bench_metap.py            # the full run (see docs/metap.md for its time)
    OMP_NUM_THREADS=1 python benchmarks/bench_metap.py --quick    # smoke run: 2 widths, 3 learning rates, 10 steps

Every run trains a fresh Llama 4 text model (MoE on every layer, top-1 routing + shared expert, as Scout) with
AdamW on `metap_param_groups` (SP: the same function on a config without a base shape, i.e. one learning rate,
no decay on norms) for the same number of tokens, then reports the held-out loss on token blocks never trained
on. Results are cached per run in `<out>/runs.json`, so a stopped sweep continues where it stopped. Prints one
markdown table per sweep and writes one PNG per sweep plus the coordinate-check PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_types import at_least, comma_list, fill_unset, names, positive_int  # noqa: E402

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig  # noqa: E402
from modeling_llama4.metap import metap_param_groups  # noqa: E402
from recipes.synthetic import pretraining_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEAD_DIM = 16


def model_config(width: int, depth: int, experts: int, base: dict | None, vocab: int, seq_len: int):
    heads = width // HEAD_DIM
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=width,
        intermediate_size_mlp=2 * width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=HEAD_DIM,
        num_local_experts=experts,
        num_experts_per_tok=1,
        moe_layers=list(range(depth)),
        attention_chunk_size=seq_len // 2,
        no_rope_layer_interval=4,
        max_position_embeddings=4 * seq_len,
        initializer_range=0.02,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    if base is not None:
        kwargs.update(
            metap_base_hidden_size=base["width"],
            metap_base_intermediate_size=base["width"],
            metap_base_num_hidden_layers=base["depth"],
            metap_base_num_local_experts=base["experts"],
        )
    return Llama4TextConfig(**kwargs)


def token_blocks(num_documents: int, seq_len: int) -> tuple[torch.Tensor, int]:
    """The synthetic corpus tokenized with the bundled tokenizer, packed into (N, seq_len) blocks."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "hub_configs" / "tiny")
    corpus = pretraining_corpus(tokenizer, num_documents, seed=0)
    ids: list[int] = []
    for text in corpus["text"]:
        ids.extend(tokenizer(text + tokenizer.eos_token)["input_ids"])
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len), len(tokenizer)


def train_run(config, lr: float, train: torch.Tensor, heldout: torch.Tensor, steps: int, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(config)
    optimizer = torch.optim.AdamW(metap_param_groups(model, lr, weight_decay=0.0), betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    model.train()
    for step in range(steps):
        rows = order[(step * batch + torch.arange(batch)) % len(train)]
        loss = model(input_ids=train[rows], labels=train[rows]).loss
        if not torch.isfinite(loss):
            return float("nan")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    model.eval()
    with torch.no_grad():
        losses = [
            model(input_ids=heldout[i : i + 16], labels=heldout[i : i + 16]).loss for i in range(0, len(heldout), 16)
        ]
    value = torch.stack(losses).mean().item()
    return value if math.isfinite(value) else float("nan")


def coordinate_check(widths, vocab, blocks, out: Path, steps: int = 3, lr: float = 1e-2) -> dict:
    """RMS of each layer's output and of the logits against width, at init and after `steps` AdamW steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth, seq_len = 2, blocks.shape[1]
    batch = blocks[:8]
    results = {}
    for label, base in (("SP", None), ("MetaP", dict(width=widths[0], depth=depth, experts=4))):
        for width in widths:
            torch.manual_seed(0)
            model = Llama4ForCausalLM(model_config(width, depth, 4, base, vocab, seq_len))
            optimizer = torch.optim.AdamW(metap_param_groups(model, lr))
            # Each decoder layer's own output (the residual stream it leaves); `hidden_states[-1]` would be the
            # final-normed state instead.
            captured = {}
            for i, layer in enumerate(model.model.layers):
                layer.register_forward_hook(
                    lambda _m, _i, output, i=i, captured=captured: captured.__setitem__(
                        i, output[0] if isinstance(output, tuple) else output
                    )
                )
            for t in range(steps + 1):
                with torch.no_grad():
                    out_t = model(input_ids=batch)
                if t in (0, steps):
                    rms = [captured[i].pow(2).mean().sqrt().item() for i in range(depth)]
                    rms.append(out_t.logits.pow(2).mean().sqrt().item())
                    results[(label, width, t)] = rms
                if t < steps:
                    model(input_ids=batch, labels=batch).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
    names = [f"layer {i} output" for i in range(depth)] + ["logits"]
    fig, axes = plt.subplots(2, 2, figsize=(8, 6), sharex=True, sharey="row")
    for col, label in enumerate(("SP", "MetaP")):
        for row, t in enumerate((0, steps)):
            ax = axes[row][col]
            for k, name in enumerate(names):
                ax.plot(widths, [results[(label, w, t)][k] for w in widths], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{label}, {'init' if t == 0 else f'after {t} steps'}", fontsize=9)
            ax.set_xlabel("width")
            ax.set_ylabel("RMS")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Coordinate check (AdamW lr {lr:g}, base width {widths[0]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "metap_coord_check.png", dpi=80)
    plt.close(fig)
    return results


def sweep_plot(name: str, sizes, lrs, table, out: Path, size_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, label in zip(axes, ("SP", "MetaP")):
        for size in sizes:
            ax.plot(lrs, [table[(label, size, lr)] for lr in lrs], marker="o", label=f"{size_label} {size}")
        ax.set_xscale("log", base=2)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("base learning rate")
    axes[0].set_ylabel("held-out loss")
    finite = [v for v in table.values() if math.isfinite(v)]
    if finite:
        low = min(finite)
        axes[0].set_ylim(low - 0.05, min(max(finite), low + 1.0))
    axes[1].legend(fontsize=8)
    fig.suptitle(f"LR transfer: {name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / f"metap_sweep_{name}.png", dpi=80)
    plt.close(fig)


def summarise(name: str, sizes, lrs, table, size_label: str) -> list[str]:
    lines = [
        f"\n### {name} sweep\n",
        f"| parametrisation | {size_label} | " + " | ".join(f"{lr:.2e}" for lr in lrs) + " | best lr |",
    ]
    lines.append("|---|---|" + "---|" * len(lrs) + "---|")
    best = {}
    for label in ("SP", "MetaP"):
        for size in sizes:
            row = [table[(label, size, lr)] for lr in lrs]
            finite = [(v, i) for i, v in enumerate(row) if math.isfinite(v)]
            best[(label, size)] = min(finite)[1] if finite else None
            cells = " | ".join(
                "diverged" if not math.isfinite(v) else f"**{v:.3f}**" if i == best[(label, size)] else f"{v:.3f}"
                for i, v in enumerate(row)
            )
            b = best[(label, size)]
            lines.append(
                f"| {label} | {size} | {cells} | {lrs[b]:.2e} |"
                if b is not None
                else f"| {label} | {size} | {cells} | - |"
            )
    for label in ("SP", "MetaP"):
        idx = [best[(label, s)] for s in sizes if best[(label, s)] is not None]
        shift = max(idx) - min(idx) if idx else None
        lines.append(
            f"\n{label}: best-LR grid index per {size_label} {[best[(label, s)] for s in sizes]}, spread {shift} grid step(s)"
        )
    small, large = sizes[0], sizes[-1]
    b_small = best[("MetaP", small)]
    b_sp_large = best[("SP", large)]
    if b_small is not None and b_sp_large is not None:
        transfer = table[("MetaP", large, lrs[b_small])]
        sp_best = table[("SP", large, lrs[b_sp_large])]
        verdict = "no worse" if transfer <= sp_best + 1e-3 else "WORSE"
        lines.append(
            f"MetaP at {size_label} {large} with the LR picked at {small} ({lrs[b_small]:.2e}): {transfer:.3f}; "
            f"SP's best at {large}: {sp_best:.3f} ({verdict})"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny grid, few steps")
    sweeps = ("coord", "width", "depth", "experts")
    parser.add_argument(
        "--sweeps", type=names(sweeps), default=",".join(sweeps), help=f"comma list of {','.join(sweeps)}"
    )
    parser.add_argument("--widths", type=comma_list(positive_int), help="default: 32,64,128 (--quick: 32,64)")
    parser.add_argument(
        "--coord_widths", type=comma_list(positive_int), help="default: 64,128,256,512 (--quick: 64,128)"
    )
    parser.add_argument("--lr_min_exp", type=int, help="grid: 2**e for e in [min, min + points) (default: -11)")
    parser.add_argument("--lr_points", type=positive_int, help="default: 7")
    parser.add_argument("--steps", type=positive_int, help="default: 100")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seq_len", type=at_least(2), default=64)  # the chunk is half of it
    parser.add_argument("--seed", type=int, default=0, help="init and data-order seed of every run")
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--cache", default=None, help="run cache (default: <out>/metap_runs.json)")
    args = parser.parse_args()
    # --quick's grid replaces only the defaults: a flag given on the command line is kept
    quick = dict(widths=[32, 64], coord_widths=[64, 128], lr_points=3, steps=10, lr_min_exp=-9)
    full = dict(widths=[32, 64, 128], coord_widths=[64, 128, 256, 512], lr_points=7, steps=100, lr_min_exp=-11)
    fill_unset(args, quick if args.quick else full)
    for flag, widths in (("--widths", args.widths), ("--coord_widths", args.coord_widths)):
        for width in widths:
            try:  # a width that makes no valid model is refused before the first of many runs
                model_config(width, 2, 4, None, 256, args.seq_len)
            except ValueError as error:
                parser.error(
                    f"{flag} {width}: {error} (the model has width // {HEAD_DIM} heads, half as many KV heads)"
                )
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = (
        Path(args.cache) if args.cache else out / ("metap_runs_quick.json" if args.quick else "metap_runs.json")
    )
    cache_path.parent.mkdir(parents=True, exist_ok=True)  # written after the first run, not only at the end
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}

    blocks, vocab = token_blocks(3000, args.seq_len)
    heldout, train = blocks[-64:], blocks[:-64]
    tokens = args.steps * args.batch * args.seq_len
    print(
        f"corpus: {len(train)} train / {len(heldout)} held-out blocks of {args.seq_len} tokens; {tokens} tokens per run"
    )
    lrs = [2.0**e for e in range(args.lr_min_exp, args.lr_min_exp + args.lr_points)]
    widths, sweeps = args.widths, args.sweeps
    started = time.time()

    def run(label: str, width: int, depth: int, experts: int, lr: float) -> float:
        base = dict(width=widths[0], depth=2, experts=4) if label == "MetaP" else None
        if base is not None and (width, depth, experts) == (base["width"], base["depth"], base["experts"]):
            label, base = "SP", None  # MetaP at its base shape is SP exactly (same init draws, same groups)
        key = f"{label}|w{width}|d{depth}|e{experts}|lr{lr:.6g}|s{args.steps}|b{args.batch}|t{args.seq_len}" + (
            f"|seed{args.seed}" if args.seed else ""
        )
        if key not in cache:
            t0 = time.time()
            config = model_config(width, depth, experts, base, vocab, args.seq_len)
            cache[key] = train_run(config, lr, train, heldout, args.steps, args.batch, seed=args.seed)
            with tempfile.NamedTemporaryFile("w", dir=cache_path.parent, delete=False) as f:
                json.dump(cache, f, indent=0)
            os.chmod(f.name, 0o644)
            os.replace(f.name, cache_path)
            print(f"  {key}: {cache[key]:.4f} ({time.time() - t0:.1f} s)", flush=True)
        return cache[key]

    report = [
        f"tokens per run: {tokens} ({args.steps} steps x {args.batch} x {args.seq_len}); AdamW betas (0.9, 0.95), wd 0, 10% warmup then constant"
    ]
    if "coord" in sweeps:
        coord_widths = args.coord_widths
        results = coordinate_check(coord_widths, vocab, train, out)
        report.append(f"\n### coordinate check (RMS; base width {coord_widths[0]})\n")
        report.append("| parametrisation | step | " + " | ".join(f"width {w}" for w in coord_widths) + " | max/min |")
        report.append("|---|---|" + "---|" * len(coord_widths) + "---|")
        for label in ("SP", "MetaP"):
            for t in (0, 3):
                for k, what in enumerate(["layer 0", "layer 1", "logits"]):
                    vals = [results[(label, w, t)][k] for w in coord_widths]
                    report.append(
                        f"| {label} {what} | {t} | "
                        + " | ".join(f"{v:.3g}" for v in vals)
                        + f" | {max(vals) / min(vals):.2f} |"
                    )
    for name, sizes, make in (
        ("width", widths, lambda s: (s, 2, 4)),
        ("depth", [2, 4], lambda s: (widths[0], s, 4)),
        ("experts", [4, 16] if not args.quick else [4, 8], lambda s: (widths[0], 2, s)),
    ):
        if name not in sweeps:
            continue
        table = {}
        for size in sizes:
            for label in ("SP", "MetaP"):
                for lr in lrs:
                    table[(label, size, lr)] = run(label, *make(size), lr)
        sweep_plot(name, sizes, lrs, table, out, name)
        report.extend(summarise(name, sizes, lrs, table, name))
    report.append(f"\nwall time {time.time() - started:.0f} s (runs already cached are not re-timed)")
    print("\n".join(report))


if __name__ == "__main__":
    main()
