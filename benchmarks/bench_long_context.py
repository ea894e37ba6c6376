"""Long context: memory and time of prefill and decode at long lengths, the KV cache of Scout, and the iRoPE ablation.

    python benchmarks/bench_long_context.py --memory            # prefill + decode at 32k and 128k tokens (~8 min)
    python benchmarks/bench_long_context.py --memory --quick    # 8k and 32k, built-in up to 4k (~1 min)
    python benchmarks/bench_long_context.py --kv                # Scout's KV-cache bytes at 1M and 10M tokens
    python benchmarks/bench_long_context.py --ablation --quick  # four variants trained at 64 tokens (~12 min)
    python benchmarks/bench_long_context.py --ablation          # trained at 512 tokens, tested to 32k (hours)

Memory is the peak resident set above the process's resident set before the call (Linux `VmHWM`, reset through
/proc/self/clear_refs), each measurement in a fresh process. Both models hold the same weights (hub_configs/tiny,
random init). The built-in masks a full S x S; past the lengths it is run at, its figures are extrapolated from the
measured ones (time and memory fitted as a + b S + c S^2) and marked as estimates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cli_types import at_least, positive_int  # noqa: E402

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig  # noqa: E402
from modeling_llama4.kv_cache import QuantizedNoPECache, kv_cache_nbytes  # noqa: E402

TINY = ROOT / "hub_configs" / "tiny"


# ---------------------------------------------------------------------------------------------------------------
# Peak memory of one call
# ---------------------------------------------------------------------------------------------------------------


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}: peak memory needs Linux")


def peak_memory_mib(fn) -> tuple[object, float]:
    """(fn(), peak resident MiB above the resident set before the call). Torch's CPU allocator is plain malloc,
    which tracemalloc does not see; the kernel's high-water mark does, and large blocks go back to it when freed."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _status_mib("VmRSS")
    result = fn()
    return result, _status_mib("VmHWM") - before


def tiny_models(which: str) -> torch.nn.Module:
    torch.manual_seed(0)
    ours = Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY)).eval()
    if which == "ours":
        return ours
    builtin = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig.from_pretrained(TINY)).eval()
    builtin.load_state_dict(ours.state_dict())
    return builtin


@torch.no_grad()
def measure(which: str, length: int, decode_tokens: int) -> dict:
    """Prefill `length` random tokens (logits of the last one only), then decode greedily."""
    model = tiny_models("builtin" if which == "builtin" else "ours")
    ids = torch.randint(0, model.config.vocab_size - 128, (1, length), generator=torch.Generator().manual_seed(0))
    cache_kw = "past_key_values" if which == "builtin" else "cache"
    # "ours-int8": the NoPE layers' cache in int8 (modeling_llama4/kv_cache.py); otherwise the default cache.
    first = {"cache": QuantizedNoPECache(model.config)} if which == "ours-int8" else {}

    def prefill():
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **first)
        return out, time.perf_counter() - start

    (out, prefill_s), prefill_mib = peak_memory_mib(prefill)
    cache = getattr(out, cache_kw)

    def decode():
        nonlocal cache
        token, start = out.logits[:, -1:].argmax(-1), time.perf_counter()
        for _ in range(decode_tokens):
            step = model(input_ids=token, **{cache_kw: cache}, use_cache=True)
            cache, token = getattr(step, cache_kw), step.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / decode_tokens

    decode_s, decode_mib = peak_memory_mib(decode)
    # Tokens each layer holds (a sliding-window layer's get_seq_length counts every token it has seen).
    per_layer = [
        (layer._quantized_keys[0] if hasattr(layer, "nbytes") else layer.keys).shape[-2] for layer in cache.layers
    ]
    return dict(
        which=which, length=length, prefill_s=prefill_s, prefill_mib=prefill_mib, decode_ms=1e3 * decode_s,
        decode_mib=decode_mib, cache_mib=kv_cache_nbytes(cache) / 2**20, cached_tokens=per_layer,
    )  # fmt: skip


def measure_in_subprocess(which: str, length: int, decode_tokens: int) -> dict:
    command = [sys.executable, __file__, "--_measure", which, str(length), str(decode_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def quadratic_fit(points: list[tuple[float, float]]):
    """Least-squares a + b x + c x^2 through (x, y) points (at least three), as a function of x."""
    xs = torch.tensor([[1.0, x, x * x] for x, _ in points], dtype=torch.float64)
    ys = torch.tensor([y for _, y in points], dtype=torch.float64)
    coef = torch.linalg.lstsq(xs, ys[:, None]).solution[:, 0].tolist()
    return lambda x: coef[0] + coef[1] * x + coef[2] * x * x


def memory_table(lengths: list[int], builtin_lengths: list[int], decode_tokens: int, int8: bool = False) -> str:
    rows, int8_rows = [], []
    for length in lengths:
        print(f"measuring ours at {length} tokens ...", file=sys.stderr)
        rows.append(measure_in_subprocess("ours", length, decode_tokens))
        if int8:
            int8_rows.append(measure_in_subprocess("ours-int8", length, decode_tokens))
    builtin = []
    for length in builtin_lengths:
        print(f"measuring the built-in at {length} tokens ...", file=sys.stderr)
        builtin.append(measure_in_subprocess("builtin", length, decode_tokens))
    by_length = {r["length"]: r for r in rows}
    for r in builtin:  # ours at the built-in's lengths too, for ratios measured in the same run
        if r["length"] not in by_length:
            by_length[r["length"]] = measure_in_subprocess("ours", r["length"], decode_tokens)
    lines = [
        "| tokens | model | prefill s | prefill peak MiB | decode ms/token | decode extra peak MiB | KV cache MiB "
        "| cached tokens per layer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(by_length.values(), key=lambda r: r["length"]) + int8_rows + builtin:
        lines.append(
            f"| {r['length']} | {r['which']} | {r['prefill_s']:.2f} | {r['prefill_mib']:.0f} | {r['decode_ms']:.1f} "
            f"| {r['decode_mib']:.0f} | {r['cache_mib']:.2f} | {r['cached_tokens']} |"
        )
    if len(builtin) >= 3:
        fits = {k: quadratic_fit([(r["length"], r[k]) for r in builtin]) for k in ("prefill_s", "prefill_mib")}
        for length in lengths:
            if length in {r["length"] for r in builtin}:
                continue
            mask_gib = length * length / 2**30  # one boolean S x S mask
            lines.append(
                f"| {length} | built-in (estimate) | ~{fits['prefill_s'](length):.0f} | "
                f"~{fits['prefill_mib'](length):.0f} | | | | (not run; one S x S bool mask alone is "
                f"{mask_gib:.2f} GiB) |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Scout's KV cache at 1M and 10M tokens
# ---------------------------------------------------------------------------------------------------------------


def kv_cache_bytes(config: Llama4TextConfig, tokens: int, nope_bytes: float = 2.0, rope_bytes: float = 2.0) -> dict:
    """Bytes of K and V held after `tokens` tokens: chunked layers keep the last chunk - 1 tokens (transformers'
    sliding-window cache), NoPE (global) layers keep every token. `*_bytes`: bytes per element, including the
    share of quantization scales."""
    per_token_layer = 2 * config.num_key_value_heads * config.head_dim  # K and V elements per token and layer
    nope = sum(1 for t in config.layer_types if t != "chunked_attention")
    chunked = config.num_hidden_layers - nope
    kept = min(tokens, config.attention_chunk_size - 1) if config.attention_chunk_size else tokens
    return {
        "chunked": chunked * kept * per_token_layer * rope_bytes,
        "nope": nope * tokens * per_token_layer * nope_bytes,
        "nope_layers": nope,
        "chunked_layers": chunked,
        "per_token_nope": nope * per_token_layer * nope_bytes,
    }


def int8_bytes_per_element(config: Llama4TextConfig, scale_bytes: int = 4) -> float:
    """int8 values plus one float32 scale per token and head (of K and of V), spread over head_dim elements: what
    `modeling_llama4.kv_cache.Int8KVLayer` stores."""
    return 1.0 + scale_bytes / config.head_dim


def kv_table(config_path: Path) -> str:
    full = json.loads((config_path / "config.json").read_text())
    config = Llama4TextConfig(**full.get("text_config", full))
    gib = 2**30
    int8 = int8_bytes_per_element(config)
    lines = [
        f"Scout ({config.num_hidden_layers} layers, {config.num_key_value_heads} KV heads x {config.head_dim}, "
        f"chunk {config.attention_chunk_size}), bf16 unless said:",
        "",
        "| tokens | chunked layers GiB | NoPE layers GiB | total GiB | NoPE share | NoPE int8 GiB | total, NoPE int8 "
        "| saved | all layers global (no chunking) GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for tokens in (1 << 20, 10 * (1 << 20)):
        bf16 = kv_cache_bytes(config, tokens)
        q = kv_cache_bytes(config, tokens, nope_bytes=int8)
        total, total_q = bf16["chunked"] + bf16["nope"], q["chunked"] + q["nope"]
        everything = config.num_hidden_layers * tokens * 2 * config.num_key_value_heads * config.head_dim * 2
        lines.append(
            f"| {tokens / (1 << 20):.0f}M | {bf16['chunked'] / gib:.2f} | {bf16['nope'] / gib:.1f} | {total / gib:.1f} "
            f"| {bf16['nope'] / total:.1%} | {q['nope'] / gib:.1f} | {total_q / gib:.1f} | {1 - total_q / total:.1%} "
            f"| {everything / gib:.0f} |"
        )
    bf16 = kv_cache_bytes(config, 1)
    lines += [
        "",
        f"Per token: {bf16['per_token_nope'] / 1024:.0f} KiB in the {bf16['nope_layers']} NoPE layers (bf16), "
        f"{bf16['per_token_nope'] * int8 / 2 / 1024:.1f} KiB in int8 with per-token-per-head float32 scales "
        f"(fp8 e4m3 with one scale per tensor: {bf16['per_token_nope'] / 2 / 1024:.0f} KiB); the "
        f"{bf16['chunked_layers']} chunked layers hold a constant "
        f"{kv_cache_bytes(config, 1 << 30)['chunked'] / gib:.2f} GiB whatever the length.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The iRoPE ablation: four attention variants trained identically at a short length, tested far past it
# ---------------------------------------------------------------------------------------------------------------

# Overrides of hub_configs/tiny. Dense MLPs (no MoE layers) to spend the CPU on attention, which is what differs;
# floor_scale = the chunk, as in Scout (8192 and 8192), so the temperature grows within the training length too.
VARIANTS = {
    "a: iRoPE + temperature": dict(attn_temperature_tuning=True),
    "b: iRoPE, no temperature": dict(attn_temperature_tuning=False),
    # The global layer keeps global attention but gets RoPE: what NoPE buys, alone.
    "c: RoPE on every layer": dict(no_rope_layers=[1, 1, 1, 1], attn_temperature_tuning=False),
    # Every layer global (RoPE on three, NoPE on one, temperature on): what chunking buys.
    "d: no chunking": dict(layer_types=["full_attention"] * 4, attn_temperature_tuning=True, chunk=None),
}
ABLATION_QUICK = dict(
    train_length=64, chunk=32, steps=2000, batch=8, lr=1e-3, eval_lengths=[64, 256, 1024, 4096],
    depths=[0.0, 0.25, 0.5, 0.75, 1.0], per_cell=4, seed=0,
)  # fmt: skip
ABLATION_FULL = dict(
    train_length=512, chunk=128, steps=4000, batch=8, lr=1e-3, eval_lengths=[512, 2048, 8192, 32768],
    depths=[0.0, 0.25, 0.5, 0.75, 1.0], per_cell=4, seed=0,
)  # fmt: skip


def variant_config(overrides: dict, chunk: int) -> Llama4TextConfig:
    overrides = dict(overrides)
    chunk = overrides.pop("chunk", chunk)
    return Llama4TextConfig.from_pretrained(
        TINY, moe_layers=[], attention_chunk_size=chunk, floor_scale=chunk or 64, max_position_embeddings=1 << 17,
        **overrides,
    )  # fmt: skip


def needle_batch(tokenizer, docs) -> tuple[torch.Tensor, list[list[int]]]:
    """(B, S) documents + answer tokens (teacher-forced), right-padded; each row's answer token ids."""
    answers = [tokenizer.encode(" " + doc.answer, add_special_tokens=False) for doc in docs]
    rows = [doc.input_ids + answer for doc, answer in zip(docs, answers)]
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id
    return torch.tensor([row + [pad] * (width - len(row)) for row in rows]), answers


def train_variant(
    config: Llama4TextConfig, tokenizer, train_length: int, steps: int, batch: int, lr: float, seed: int
):
    """AdamW on the answer tokens only (the filler is noise), needles at uniformly random depths, train keys. Rows
    are right-padded: positions before the answer never attend to the padding, which comes after it."""
    import random

    from eval.long_context import needle_document

    torch.manual_seed(seed)
    model = Llama4ForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    warmup = max(steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup)))
    )
    rng, losses = random.Random(seed), []
    for _ in range(steps):
        # Lengths uniform from a quarter of the training length (at least 48) up to it: short documents teach retrieval sooner.
        docs = [needle_document(tokenizer, rng.randint(max(train_length // 4, 48), train_length), rng.random(),
                                rng.randrange(1 << 30), "train") for _row in range(batch)]  # fmt: skip
        ids, answers = needle_batch(tokenizer, docs)
        labels = torch.full_like(ids, -100)
        for row, (doc, answer) in enumerate(zip(docs, answers)):
            labels[row, doc.length : doc.length + len(answer)] = torch.tensor(answer)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model.eval(), losses


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, docs, batch: int = 8) -> list[bool]:
    """Greedy exact match of the answer, teacher-forced: every answer token is the argmax after its prefix."""
    correct = []
    for start in range(0, len(docs), batch):
        part = docs[start : start + batch]
        ids, answers = needle_batch(tokenizer, part)
        hidden = model.model(input_ids=ids).last_hidden_state  # right padding is never attended by what precedes
        for row, (doc, answer) in enumerate(zip(part, answers)):
            logits = model.lm_head(hidden[row, doc.length - 1 : doc.length - 1 + len(answer)])
            correct.append(logits.argmax(-1).tolist() == answer)
    return correct


def run_ablation(train_length, chunk, steps, batch, lr, eval_lengths, depths, per_cell, seed) -> dict:
    from transformers import AutoTokenizer

    from eval.long_context import needle_grid

    tokenizer = AutoTokenizer.from_pretrained(TINY)
    tokenizer.model_max_length = 1 << 30  # documents are longer than the tiny config's 4096 positions
    docs = needle_grid(tokenizer, eval_lengths, depths, per_cell, seed=1000, split="test")
    results = {}
    for name, overrides in VARIANTS.items():
        config = variant_config(overrides, chunk)
        start = time.perf_counter()
        model, losses = train_variant(config, tokenizer, train_length, steps, batch, lr, seed)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        correct = retrieval_accuracy(model, tokenizer, docs)
        cells = {}
        for doc, ok in zip(docs, correct):
            cells.setdefault((doc.length, doc.depths[0]), []).append(ok)
        results[name] = dict(
            cells={k: sum(v) / len(v) for k, v in cells.items()},
            by_length={
                n: sum(sum(v) for (m, _), v in cells.items() if m == n) / (len(depths) * per_cell)
                for n in eval_lengths
            },  # fmt: skip
            final_loss=sum(losses[-20:]) / len(losses[-20:]),
            train_s=train_s,
            eval_s=time.perf_counter() - start,
        )
        print(f"{name}: loss {results[name]['final_loss']:.3f}, accuracy by length {results[name]['by_length']}, "
              f"train {train_s:.0f} s, eval {results[name]['eval_s']:.0f} s", file=sys.stderr)  # fmt: skip
    return results


def ablation_tables(results: dict, settings: dict) -> str:
    lengths, depths = settings["eval_lengths"], settings["depths"]
    lines = [
        f"Trained at {settings['train_length']} tokens (chunk {settings['chunk']}), {settings['steps']} steps x "
        f"{settings['batch']}, lr {settings['lr']}; tested on {settings['per_cell']} held-out documents per "
        "(length, depth): greedy exact match of the two-digit value.",
        "",
        "| variant | final train loss | " + " | ".join(f"{n} tok" for n in lengths) + " | train s | eval s |",
        "|---|---|" + "---|" * len(lengths) + "---|---|",
    ]
    for name, r in results.items():
        accs = " | ".join(f"{100 * r['by_length'][n]:.0f}%" for n in lengths)
        lines.append(f"| {name} | {r['final_loss']:.3f} | {accs} | {r['train_s']:.0f} | {r['eval_s']:.0f} |")
    lines += ["", "By depth (rows) at the longest length, " + f"{lengths[-1]} tokens:", ""]
    lines.append("| depth | " + " | ".join(results) + " |")
    lines.append("|---|" + "---|" * len(results))
    for depth in depths:
        row = " | ".join(f"{100 * r['cells'][(lengths[-1], depth)]:.0f}%" for r in results.values())
        lines.append(f"| {depth:.0%} | {row} |")
    return "\n".join(lines)


def plot_ablation(results: dict, settings: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = settings["eval_lengths"], settings["depths"]
    fig, axes = plt.subplots(1, len(results) + 1, figsize=(4 * (len(results) + 1), 3.6))
    for name, r in results.items():
        axes[0].plot(lengths, [100 * r["by_length"][n] for n in lengths], marker="o", label=name)
    axes[0].set(xscale="log", xlabel="document tokens", ylabel="retrieval accuracy (%)", ylim=(-5, 105))
    axes[0].axvline(settings["train_length"], color="gray", linestyle=":", label="training length")
    axes[0].legend(fontsize=7)
    for ax, (name, r) in zip(axes[1:], results.items()):
        grid = [[r["cells"][(n, d)] for n in lengths] for d in depths]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set(title=name, xticks=range(len(lengths)), xticklabels=lengths, yticks=range(len(depths)),
               yticklabels=[f"{d:.0%}" for d in depths], xlabel="tokens", ylabel="needle depth")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)  # atomic


def versions() -> str:
    return (
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", action="store_true", help="prefill/decode memory and time, ours and built-in")
    parser.add_argument("--kv", action="store_true", help="Scout's KV-cache bytes at 1M and 10M tokens")
    parser.add_argument("--ablation", action="store_true", help="retrieval accuracy of the four iRoPE variants")
    parser.add_argument("--quick", action="store_true", help="shorter lengths / smaller runs")
    parser.add_argument("--lengths", type=positive_int, nargs="+", help="prefill lengths for ours (--memory)")
    parser.add_argument(
        "--builtin_lengths", type=positive_int, nargs="*", help="lengths the built-in is run at (--memory)"
    )
    parser.add_argument("--int8", action="store_true", help="--memory: also ours with the int8 NoPE cache")
    parser.add_argument("--decode_tokens", type=positive_int, default=16)
    parser.add_argument("--seed", type=int, help="--ablation: training seed (initialisation and data order)")
    # At least 2: the schedule warms up for max(steps // 20, 1) steps and decays over the others (none for 1).
    parser.add_argument("--steps", type=at_least(2), help="--ablation: training steps")
    parser.add_argument("--eval_lengths", type=positive_int, nargs="+", help="--ablation: test lengths")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "long_context_ablation.png"))
    parser.add_argument("--_measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()  # not parse_known_args: a misspelt flag must not be ignored
    if args._measure:
        which, length, decode_tokens = args._measure
        print(json.dumps(measure(which, int(length), int(decode_tokens))))
        return
    if not (args.memory or args.kv or args.ablation):
        parser.error("choose at least one of --memory, --kv, --ablation")
    print(versions() + "\n")
    if args.kv:
        print(kv_table(ROOT / "hub_configs" / "scout") + "\n")
    if args.memory:
        lengths = args.lengths or ([8192, 32768] if args.quick else [32768, 131072])
        builtin_lengths = (
            args.builtin_lengths
            if args.builtin_lengths is not None
            else ([1024, 2048, 4096] if args.quick else [4096, 8192, 16384])
        )
        print(memory_table(lengths, builtin_lengths, args.decode_tokens, args.int8) + "\n")
    if args.ablation:
        settings = dict(ABLATION_QUICK if args.quick else ABLATION_FULL)
        if args.seed is not None:
            settings["seed"] = args.seed
        if args.steps is not None:
            settings["steps"] = args.steps
        if args.eval_lengths:
            settings["eval_lengths"] = args.eval_lengths
        results = run_ablation(**settings)
        print(ablation_tables(results, settings) + "\n")
        plot_ablation(results, settings, Path(args.plot))
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
