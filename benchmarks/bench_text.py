"""Speed and memory of our sparse Llama 4 against transformers' built-in, measured in one run.

    python benchmarks/bench_text.py            # full table (about 8 minutes on 2 CPU cores)
    python benchmarks/bench_text.py --quick    # fewer tokens and repeats, for a smoke run (flags given are kept)
    python benchmarks/bench_text.py --moe-only # the MoE block rows: built-in, CPU kernel, generic path

Prints one markdown table. Both models hold the same weights; times are medians of forward+backward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers.models.llama4 import modeling_llama4 as builtin_modeling

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig, Llama4TextMoe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_types import fill_unset, positive_int  # noqa: E402

SHAPES = {
    # Scaled-down Scout: 16 experts, top-1, shared expert, MoE every layer.
    "scout-like": dict(num_local_experts=16, interleave_moe_layer_step=1),
    # Scaled-down Maverick: 128 experts, MoE every 2nd layer, no QK norm.
    "maverick-like": dict(num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False),
}
COMMON = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=512,
    intermediate_size_mlp=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts_per_tok=1,
    attention_chunk_size=1024,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class DenseMatmulRate:
    """GFLOP/s of a plain (tokens, hidden) @ (hidden, 2*intermediate) fp32 matmul on this machine.

    `peak()` is the best of `matmuls` back-to-back runs: the machine's rate for this shape right now, not flattered
    by a slow run. On a shared machine the dense rate drifts within minutes, so the MoE's share of it is measured
    against the peak taken right before each MoE step."""

    def __init__(self, tokens: int, hidden: int, intermediate: int) -> None:
        self.a, self.b = torch.randn(tokens, hidden), torch.randn(hidden, 2 * intermediate)
        self.flops = 2 * tokens * hidden * 2 * intermediate
        for _ in range(3):
            self.a @ self.b

    def peak(self, matmuls: int = 10) -> float:
        times = []
        for _ in range(matmuls):
            start = time.perf_counter()
            self.a @ self.b
            times.append(time.perf_counter() - start)
        return self.flops / min(times) / 1e9


def moe_block_step(block: torch.nn.Module, x: torch.Tensor):
    def step():
        block.zero_grad(set_to_none=True)
        out, _ = block(x)
        out.backward(torch.ones_like(out))  # a contiguous gradient, like a real loss upstream

    return step


def model_step(model: torch.nn.Module, input_ids: torch.Tensor):
    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids, labels=input_ids, use_cache=False).loss.backward()

    return step


def bench_moe_block(name: str, tokens: int, repeats: int, dense: DenseMatmulRate) -> dict:
    kwargs = {**COMMON, **SHAPES[name]}
    ours = Llama4TextMoe(Llama4TextConfig(**kwargs))
    builtin = builtin_modeling.Llama4TextMoe(transformers.Llama4TextConfig(**kwargs))
    with torch.no_grad():
        for p in builtin.parameters():
            p.normal_(std=0.02)
    ours.load_state_dict(builtin.state_dict())
    x = torch.randn(tokens, kwargs["hidden_size"])
    t_builtin = median_seconds(moe_block_step(builtin, x), repeats)
    hidden, inter, top_k = kwargs["hidden_size"], kwargs["intermediate_size"], kwargs["num_experts_per_tok"]
    # Active parameters per token: top-k routed experts + shared expert (3 matrices of H x I each) + router.
    forward_flops = tokens * (2 * 3 * hidden * inter * (top_k + 1) + 2 * hidden * kwargs["num_local_experts"])
    # Each of our steps is paired with the dense peak measured just before it; the share is the median of the
    # pairs' ratios, so a slow spell of the machine moves both sides of a pair instead of one side of the ratio.
    step, times, shares, peaks = moe_block_step(ours, x), [], [], []
    step()  # warm-up
    for _ in range(3 * repeats):
        peaks.append(dense.peak())
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        shares.append(3 * forward_flops / times[-1] / 1e9 / peaks[-1])
    t_ours = statistics.median(times)
    # The generic path (torch's grouped GEMM under autograd), which CUDA and expert parallelism run, on the same
    # block and input: what the CPU kernel (cpu_experts.py) gains over it.
    ours.experts.use_cpu_kernel = False
    t_generic = median_seconds(moe_block_step(ours, x), repeats)
    ours.experts.use_cpu_kernel = True
    return dict(
        builtin=t_builtin,
        ours=t_ours,
        generic=t_generic,
        active_gflops=3 * forward_flops / t_ours / 1e9,
        dense_gflops=statistics.median(peaks),
        share_of_dense=statistics.median(shares),
    )


def bench_model(name: str, tokens: int, repeats: int) -> dict:
    kwargs = {**COMMON, **SHAPES[name]}
    builtin = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**kwargs))
    ours = Llama4ForCausalLM(Llama4TextConfig(**kwargs))
    ours.load_state_dict(builtin.state_dict())
    input_ids = torch.randint(0, kwargs["vocab_size"], (2, tokens // 2))
    repeats = max(1, repeats - 1)  # the built-in takes about a minute per step at 128 experts
    return dict(
        builtin=median_seconds(model_step(builtin, input_ids), repeats),
        ours=median_seconds(model_step(ours, input_ids), repeats),
    )


def kv_cache_bytes(decode_to: int, prefill_step: int = 1024) -> dict:
    """Bytes held by the KV cache after running a tiny model to `decode_to` tokens with its cache."""
    kwargs = dict(COMMON, vocab_size=256, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128)
    kwargs.update(num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_chunk_size=8192)
    kwargs.update(num_local_experts=4, max_position_embeddings=decode_to + 16)
    builtin = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**kwargs)).eval()
    ours = Llama4ForCausalLM(Llama4TextConfig(**kwargs)).eval()
    ours.load_state_dict(builtin.state_dict())
    result = {}
    tokens = torch.randint(0, 256, (1, decode_to))
    for label, model in (("builtin", builtin), ("ours", ours)):
        cache = None
        with torch.no_grad():
            # Chunked prefill then single-token decode: the cache sees every token, as in generation.
            for start in range(0, decode_to - 8, prefill_step):
                stop = min(start + prefill_step, decode_to - 8)
                cache = model(tokens[:, start:stop], cache=cache, use_cache=True).cache
            for t in range(decode_to - 8, decode_to):
                cache = model(tokens[:, t : t + 1], cache=cache, use_cache=True).cache
        result[label] = sum(
            layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            for layer in cache.layers
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=positive_int, help="default: 4096")
    parser.add_argument("--repeats", type=positive_int, help="default: 3")
    parser.add_argument("--kv-tokens", type=positive_int, help="default: 32768")
    parser.add_argument("--quick", action="store_true", help="512 tokens, 1 repeat, 4k-token KV cache")
    parser.add_argument("--moe-only", action="store_true", help="only the MoE block rows (no full model, no cache)")
    args = parser.parse_args()
    # --quick's sizes replace only the defaults: a flag given on the command line is kept
    fill_unset(
        args,
        dict(tokens=512, repeats=1, kv_tokens=4096) if args.quick else dict(tokens=4096, repeats=3, kv_tokens=32768),
    )
    torch.manual_seed(0)

    rows = []
    dense = DenseMatmulRate(args.tokens, COMMON["hidden_size"], COMMON["intermediate_size"])
    for name in SHAPES:
        block = bench_moe_block(name, args.tokens, args.repeats, dense)
        rows.append(
            (
                f"MoE block fwd+bwd, {name}, {args.tokens} tok",
                f"{block['builtin'] * 1e3:.0f} ms",
                f"{block['ours'] * 1e3:.0f} ms",
                f"{block['builtin'] / block['ours']:.1f}x faster",
            )
        )
        rows.append(
            (
                f"MoE block fwd+bwd, {name}, {args.tokens} tok, generic path (grouped_mm)",
                f"{block['builtin'] * 1e3:.0f} ms",
                f"{block['generic'] * 1e3:.0f} ms",
                f"{block['builtin'] / block['generic']:.1f}x faster (CPU kernel {block['generic'] / block['ours']:.2f}x it)",
            )
        )
        rows.append(
            (
                f"MoE active-parameter rate, {name}",
                "",
                f"{block['active_gflops']:.0f} GFLOP/s",
                f"{100 * block['share_of_dense']:.0f}% of dense",
            )
        )
        rows.append((f"dense fp32 matmul rate, paired with {name}", "", f"{block['dense_gflops']:.0f} GFLOP/s", ""))
    for name in [] if args.moe_only else SHAPES:
        model = bench_model(name, args.tokens, args.repeats)
        rows.append(
            (
                f"full model fwd+bwd, {name}, {args.tokens} tok",
                f"{model['builtin'] * 1e3:.0f} ms",
                f"{model['ours'] * 1e3:.0f} ms",
                f"{model['builtin'] / model['ours']:.1f}x faster",
            )
        )
    if not args.moe_only:
        kv = kv_cache_bytes(args.kv_tokens)
        rows.append(
            (
                f"KV cache after {args.kv_tokens} tokens (tiny, chunk 8192)",
                f"{kv['builtin'] / 2**20:.1f} MiB",
                f"{kv['ours'] / 2**20:.1f} MiB",
                f"{kv['ours'] / kv['builtin']:.2f}x of built-in",
            )
        )

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads\n")
    print("| measure | built-in | ours | ratio |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
