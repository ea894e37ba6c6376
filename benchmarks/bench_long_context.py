"""Long context: memory and time of prefill and decode at long lengths, the KV cache of Scout, and the iRoPE ablation.

    python benchmarks/bench_long_context.py --memory            # prefill + decode at 32k and 128k tokens (~6 min)
    python benchmarks/bench_long_context.py --memory --quick    # 8k and 32k, built-in up to 4k (~1 min)
    python benchmarks/bench_long_context.py --kv                # Scout's KV-cache bytes at 1M and 10M tokens
    python benchmarks/bench_long_context.py --ablation --quick  # retrieval by length and depth, four variants

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

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig  # noqa: E402

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


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


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
    model = tiny_models(which)
    ids = torch.randint(0, model.config.vocab_size - 128, (1, length), generator=torch.Generator().manual_seed(0))
    cache_kw = "cache" if which == "ours" else "past_key_values"

    def prefill():
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
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
    per_layer = [layer.keys.shape[-2] for layer in cache.layers]
    return dict(
        which=which, length=length, prefill_s=prefill_s, prefill_mib=prefill_mib, decode_ms=1e3 * decode_s,
        decode_mib=decode_mib, cache_mib=cache_bytes(cache) / 2**20, cached_tokens=per_layer,
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


def memory_table(lengths: list[int], builtin_lengths: list[int], decode_tokens: int) -> str:
    rows = []
    for length in lengths:
        print(f"measuring ours at {length} tokens ...", file=sys.stderr)
        rows.append(measure_in_subprocess("ours", length, decode_tokens))
    builtin = []
    for length in builtin_lengths:
        print(f"measuring the built-in at {length} tokens ...", file=sys.stderr)
        builtin.append(measure_in_subprocess("builtin", length, decode_tokens))
    by_length = {r["length"]: r for r in rows}
    for r in builtin:  # ours at the built-in's lengths too, for ratios measured in the same run
        if r["length"] not in by_length:
            by_length[r["length"]] = measure_in_subprocess("ours", r["length"], decode_tokens)
    lines = [
        "| tokens | model | prefill s | prefill peak MiB | decode ms/token | decode peak MiB | KV cache MiB "
        "| cached tokens per layer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(by_length.values(), key=lambda r: r["length"]) + builtin:
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
    parser.add_argument("--lengths", type=int, nargs="+", help="prefill lengths for ours (--memory)")
    parser.add_argument("--builtin_lengths", type=int, nargs="+", help="lengths the built-in is run at (--memory)")
    parser.add_argument("--decode_tokens", type=int, default=16)
    parser.add_argument("--_measure", nargs=3, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
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
        builtin_lengths = args.builtin_lengths or ([1024, 2048, 4096] if args.quick else [4096, 8192, 16384])
        print(memory_table(lengths, builtin_lengths, args.decode_tokens) + "\n")
    if args.ablation:
        raise SystemExit("--ablation: not built yet")


if __name__ == "__main__":
    main()
