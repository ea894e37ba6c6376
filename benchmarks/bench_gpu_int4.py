"""Scout-shaped int4 text model on one GPU: peak memory and decode speed against the HBM roofline.

    python benchmarks/bench_gpu_int4.py                 # on a GPU (H100/H200); plan: < 8 minutes
    python benchmarks/bench_gpu_int4.py --dry-run       # CPU, tiny shapes: the same code path, for tests

Builds hub_configs/scout's text model on the meta device, allocates it on the GPU (bf16 attention, embeddings,
lm_head; int4 routed and shared experts), fills the int4 weights with random bytes made on the GPU (no bf16
copy ever exists), converts them module by module to torch's int4 GEMM layout (`make_kernel_resident`), checks
peak memory <= 75 GB, then decodes at batch 1 and 32 (`_weight_int4pack_mm` per expert that got tokens).
Roofline: the bytes one decode step must read (every non-embedding weight once, only the experts the batch
routes to, the KV cache) over the GPU's HBM bandwidth; the share is measured step time against that bound.
Random weights route arbitrarily but the set of experts read per layer is counted from the run itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

from modeling_llama4 import Int4Config, Llama4ForCausalLM, Llama4TextConfig
from modeling_llama4.int4 import (
    Int4Linear,
    Int4TextExperts,
    check_group_size,
    make_kernel_resident,
    replace_with_int4_modules,
)
from modeling_llama4.modeling_llama4 import Llama4TextRotaryEmbedding

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_types import positive_float, positive_int  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HBM_TBPS = {"H100": 3.35, "H200": 4.8, "A100": 2.0, "GH200": 4.0, "B200": 8.0}  # SXM parts, TB/s
TINY = dict(
    vocab_size=512, hidden_size=256, intermediate_size=256, intermediate_size_mlp=512, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=16, attention_chunk_size=64,
)  # fmt: skip


def build(config: Llama4TextConfig, device: torch.device, group_size: int) -> nn.Module:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # float parameters are born bf16; int4 ones set their own dtypes
    try:
        with torch.device("meta"):
            model = Llama4ForCausalLM(config)
            replace_with_int4_modules(model, Int4Config(group_size), quantize_weights=False)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dtype == torch.int8:  # packed int4: any byte is two valid values
                param.copy_(
                    torch.randint(-128, 128, param.shape, generator=generator, device=device, dtype=torch.int8)
                )
            elif name.endswith("_scale"):  # absmax / 8 of weights of std ~0.02
                param.copy_(torch.rand(param.shape, generator=generator, device=device) * 0.004 + 0.004)
            elif "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
        # to_empty leaves buffers uninitialised too: the RoPE frequencies come from a small CPU copy
        for name, buffer in Llama4TextRotaryEmbedding(config).named_buffers():
            model.model.rotary_emb.get_buffer(name).copy_(buffer)
    make_kernel_resident(model, torch.bfloat16)
    return model.eval()


def bytes_per_step(model: nn.Module, experts_read: list[int], batch: int, context: int, config) -> dict[str, float]:
    """Bytes one decode step reads: dense weights once, `experts_read[l]` experts of MoE layer l, the KV cache."""
    dense = expert_int4 = expert_bf16 = 0
    per_expert = None
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, Int4TextExperts):
            hidden, inter = module.hidden_size, module.intermediate_size
            weights = 3 * hidden * inter  # per expert
            per_expert = weights / 2 + weights / module.group_size * 4  # int4 + the scales' bytes
            per_expert_bf16 = weights * 2
        elif isinstance(module, Int4Linear):
            dense += module.in_features * module.out_features * (0.5 + 4 / module.group_size)
        elif "embed_tokens" not in name:
            dense += sum(p.numel() * p.element_size() for p in own)
    for count in experts_read:
        expert_int4 += count * per_expert
        expert_bf16 += count * per_expert_bf16
    chunk = config.attention_chunk_size
    kv_per_token_layer = 2 * config.num_key_value_heads * config.head_dim * 2
    kv = sum(
        batch * (min(context, chunk) if kind == "chunked_attention" else context) * kv_per_token_layer
        for kind in config.layer_types
    )
    return {"dense": dense, "experts": expert_int4, "experts_bf16": expert_bf16, "kv": kv}


def decode(model, config, batch: int, prompt: int, steps: int, device: torch.device) -> dict[str, float]:
    from transformers.cache_utils import DynamicCache

    experts_read: list[set[int]] = []

    def count(module, args):
        experts_read.append(set(args[1].reshape(-1).tolist()))

    handles = [m.register_forward_pre_hook(count) for m in model.modules() if isinstance(m, Int4TextExperts)]
    ids = torch.randint(3, config.vocab_size, (batch, prompt), device=device)
    cache = DynamicCache(config=config)
    with torch.inference_mode():
        # the prompt token by token: the kernel-resident experts take at most KERNEL_MAX_ROWS rows per call
        for position in range(prompt):
            out = model(input_ids=ids[:, position : position + 1], cache=cache, use_cache=True)
            cache = out.cache
        token = out.logits[:, -1:].argmax(-1)
        experts_read.clear()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, cache=out.cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
    for handle in handles:
        handle.remove()
    layers = sum(isinstance(m, Int4TextExperts) for m in model.modules())
    per_layer = [len(s) for s in experts_read]
    mean_read = [sum(per_layer[i::layers]) / max(1, len(per_layer[i::layers])) for i in range(layers)]
    return {"seconds": seconds, "experts_read": mean_read, "context": prompt + steps // 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the code path, no figures")
    parser.add_argument("--group-size", type=positive_int, help="default: 128 (dry run: 64)")
    parser.add_argument("--prompt", type=positive_int, default=8)
    parser.add_argument("--steps", type=positive_int, help="default: 32 (dry run: 3)")
    parser.add_argument("--hbm-tbps", type=positive_float, help="HBM bandwidth (default: from the GPU name)")
    parser.add_argument("--max-peak-gb", type=positive_float, default=75.0)
    args = parser.parse_args()
    if args.dry_run:
        device = torch.device("cpu")
        config = Llama4TextConfig(**TINY)
        group, steps, name, tbps = args.group_size or 64, args.steps or 3, "cpu (dry run)", args.hbm_tbps or 0.05
    else:
        if not torch.cuda.is_available():
            raise SystemExit("No GPU: run with --dry-run on CPU.")
        device = torch.device("cuda")
        config = Llama4TextConfig.from_pretrained(ROOT / "hub_configs" / "scout")
        group, steps, name = args.group_size or 128, args.steps or 32, torch.cuda.get_device_name()
        tbps = args.hbm_tbps or next((v for k, v in HBM_TBPS.items() if k in name), None)
        if tbps is None:
            raise SystemExit(f"Unknown HBM bandwidth for {name}: pass --hbm-tbps")
        torch.cuda.reset_peak_memory_stats()
    try:  # an odd group, or one that does not divide the model's widths, before anything is built
        for width in (config.hidden_size, config.intermediate_size, config.intermediate_size_mlp):
            check_group_size(width, group, "the model's layers")
    except ValueError as error:
        parser.error(f"--group-size {group}: {error}")
    start = time.perf_counter()
    model = build(config, device, group)
    build_seconds = time.perf_counter() - start
    rows = []
    for batch in (1, 32):
        result = decode(model, config, batch, args.prompt, steps, device)
        read = bytes_per_step(model, result["experts_read"], batch, result["context"], config)
        total = read["dense"] + read["experts"] + read["kv"]
        bound = total / (tbps * 1e12)
        rows.append(
            f"| {batch} | {batch / result['seconds']:.1f} | {result['seconds'] * 1e3:.2f} | {total / 1e9:.2f} | "
            f"{read['experts'] / 1e9:.2f} ({read['experts_bf16'] / read['experts']:.1f}x fewer than bf16) | "
            f"{bound / result['seconds']:.0%} |"
        )
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    print(f"{name}, torch {torch.__version__}, group {group}, HBM {tbps} TB/s, build {build_seconds:.0f} s")
    print(f"peak memory {peak:.1f} GB (limit {args.max_peak_gb} GB)\n")
    print("| batch | tokens/s | ms/step | GB read/step | expert GB read/step | share of HBM roofline |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if device.type == "cuda" and peak > args.max_peak_gb:
        raise SystemExit(f"peak memory {peak:.1f} GB exceeds {args.max_peak_gb} GB")


if __name__ == "__main__":
    main()
