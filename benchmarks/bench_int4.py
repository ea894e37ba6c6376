"""Int4 experts: bytes, Scout's memory, CPU speed of the MoE block, quality (RTN and GPTQ), load-time peak memory.

    python benchmarks/bench_int4.py                  # all tables below (~3 minutes on 2 CPU cores)
    python benchmarks/bench_int4.py --quick          # fewer tokens and repeats
    python benchmarks/bench_int4.py --checkpoint DIR [--problems 1000]   # quality on a trained model (see below)

Tables (markdown), each measured in this one run:
1. bytes of the int4 experts (packed + float32 scales) against their bf16 bytes, from hub_configs/scout;
2. the Scout-shaped model's memory with int4 experts (meta device, nothing allocated) and the KV-cache room
   left on an 80 GB H100;
3. MoE block forward (scaled-down Scout: 16 experts, top-1, shared expert) at 1, 8, 64 and 4096 tokens: fp32,
   bf16, int4 (fp32 and bf16 activations), medians of the same run;
4. logit KL to full precision and held-out loss on the synthetic task's text, RTN and GPTQ, on a small random
   model (group 128) and the tiny one (group 32);
5. peak RSS of `from_pretrained` of a 4-shard checkpoint: full precision against quantize-while-loading, each in
   a fresh process.
`--checkpoint DIR` (a trained model, e.g. the pipeline's DPO or SFT output) adds held-out accuracy on
`--problems` synthetic test problems for full precision, int4 RTN and int4 GPTQ (paired against full
precision: solved / lost and the sign test) and the logit KL on held-out text. It generates 3 x problems
answers: hours on this CPU for 1000, minutes on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from modeling_llama4 import Int4Config, Llama4ForCausalLM, Llama4TextConfig, Llama4TextMoe, quantize_model
from modeling_llama4.configuration_llama4 import Llama4Config
from modeling_llama4.int4 import Int4Linear, Int4TextExperts, check_group_size, replace_with_int4_modules
from modeling_llama4.int4_gptq import gptq_quantize
from modeling_llama4.modeling_llama4 import Llama4ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_text import median_seconds  # noqa: E402
from cli_types import model_dir, positive_int  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


# --------------------------------------------------------------------------------------------------------------
# 1-2. Bytes and Scout's memory
# --------------------------------------------------------------------------------------------------------------


def scout_memory(group_size: int = 128) -> list[str]:
    config = Llama4Config.from_pretrained(ROOT / "hub_configs" / "scout")
    with torch.device("meta"):
        model = Llama4ForConditionalGeneration(config)
        float_bytes = {}
        for name, module in model.named_modules():
            if type(module).__name__ in ("Llama4TextExperts", "Llama4TextMLP") and "language_model" in name:
                kind = "routed" if type(module).__name__ == "Llama4TextExperts" else "shared"
                float_bytes[kind] = float_bytes.get(kind, 0) + sum(p.numel() * 2 for p in module.parameters())
        replace_with_int4_modules(model, Int4Config(group_size), quantize_weights=False)
    groups = {"routed experts (int4)": 0, "shared experts (int4)": 0, "attention (bf16)": 0}
    groups |= {"embeddings + lm_head (bf16)": 0, "vision + projector (bf16)": 0, "norms + routers (bf16)": 0}
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        # int8 / float32 as stored; every other float parameter counted in bf16
        stored = isinstance(module, (Int4Linear, Int4TextExperts))
        nbytes = sum(p.numel() * (p.element_size() if stored else 2) for p in own)
        if isinstance(module, Int4TextExperts):
            groups["routed experts (int4)"] += nbytes
        elif isinstance(module, Int4Linear):
            groups["shared experts (int4)"] += nbytes
        elif "vision_model" in name or "multi_modal_projector" in name:
            groups["vision + projector (bf16)"] += nbytes
        elif ".self_attn." in name:
            groups["attention (bf16)"] += nbytes
        elif "embed_tokens" in name or "lm_head" in name:
            groups["embeddings + lm_head (bf16)"] += nbytes
        else:
            groups["norms + routers (bf16)"] += nbytes
    total = sum(groups.values())
    text = config.text_config
    routed, shared = groups["routed experts (int4)"], groups["shared experts (int4)"]
    lines = [
        f"Scout (hub_configs/scout), int4 group {group_size}: expert bytes against bf16",
        "",
        "| weights | bf16 GB | int4 + scales GB | ratio |",
        "|---|---|---|---|",
        f"| routed experts | {float_bytes['routed'] / GB:.2f} | {routed / GB:.2f} | {routed / float_bytes['routed']:.1%} |",
        f"| shared experts | {float_bytes['shared'] / GB:.2f} | {shared / GB:.2f} | {shared / float_bytes['shared']:.1%} |",
        "",
        "Scout-shaped model with int4 experts (parameters only):",
        "",
        "| part | GB |",
        "|---|---|",
    ]
    lines += [f"| {part} | {nbytes / GB:.2f} |" for part, nbytes in groups.items()]
    lines.append(f"| **total** | **{total / GB:.2f}** |")
    # bf16 KV cache: chunked layers keep at most one chunk, global (NoPE) layers every token
    per_token_layer = 2 * text.num_key_value_heads * text.head_dim * 2
    chunked = sum(t == "chunked_attention" for t in text.layer_types)
    full = len(text.layer_types) - chunked
    room = 80e9 - total - 4e9  # 4 GB kept for activations, CUDA context and fragmentation
    chunk_kv = chunked * text.attention_chunk_size * per_token_layer
    tokens = (
        (room - chunk_kv) / (full * per_token_layer)
        if room > chunk_kv
        else room / (len(text.layer_types) * per_token_layer)
    )
    lines += [
        "",
        f"On an 80 GB H100: {80 - total / GB:.1f} GB left; keeping 4 GB for activations, the bf16 KV cache holds "
        f"~{tokens / 1e3:.0f}k tokens (batch x context: {chunked} chunked layers keep <= {text.attention_chunk_size} "
        f"tokens, {full} global layers all of them).",
    ]
    return lines


# --------------------------------------------------------------------------------------------------------------
# 3. Speed of the MoE block
# --------------------------------------------------------------------------------------------------------------


def moe_speed(quick: bool) -> list[str]:
    config = Llama4TextConfig(
        vocab_size=256, hidden_size=512, intermediate_size=1024, intermediate_size_mlp=2048, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=128, num_local_experts=16, num_experts_per_tok=1,
    )  # fmt: skip
    torch.manual_seed(0)
    moe = Llama4TextMoe(config).eval()
    for p in moe.parameters():
        nn.init.normal_(p, std=0.02)
    bf16 = copy.deepcopy(moe).to(torch.bfloat16)
    holder = nn.Module()
    holder.config = config
    holder.moe = copy.deepcopy(moe)
    replace_with_int4_modules(holder, Int4Config(128), quantize_weights=True)
    int4 = holder.moe
    int4_bf16 = copy.deepcopy(int4)
    int4_bf16.router.to(torch.bfloat16)  # the router runs in the model dtype; int4 weights and scales stay as stored
    token_counts = [1, 8, 64, 1024] if quick else [1, 8, 64, 4096]
    lines = [
        f"MoE block forward, scaled-down Scout (hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
        f"16 experts, top-1, shared expert), torch {torch.__version__}, {torch.get_num_threads()} threads; "
        "median ms (ratio to fp32)",
        "",
        "| tokens | fp32 | bf16 | int4, fp32 act. | int4, bf16 act. |",
        "|---|---|---|---|---|",
    ]
    with torch.inference_mode():
        for tokens in token_counts:
            x = torch.randn(tokens, config.hidden_size)
            xb = x.bfloat16()
            repeats = 3 if tokens >= 1024 else (10 if quick else 30)
            fp32 = median_seconds(lambda x=x: moe(x), repeats)
            b16 = median_seconds(lambda xb=xb: bf16(xb), repeats)
            i4 = median_seconds(lambda x=x: int4(x), repeats)
            i4b = median_seconds(lambda xb=xb: int4_bf16(xb), repeats)
            cells = [f"{t * 1e3:.2f} ({t / fp32:.2f}x)" for t in (fp32, b16, i4, i4b)]
            lines.append(f"| {tokens} | " + " | ".join(cells) + " |")
    return lines


# --------------------------------------------------------------------------------------------------------------
# 4. Quality: RTN vs GPTQ
# --------------------------------------------------------------------------------------------------------------


def task_text_batches(tokenizer, split: str, problems: int, batch: int, length: int) -> list[torch.Tensor]:
    from recipes.synthetic import arithmetic_problems

    rows = arithmetic_problems(split, problems, seed=0)
    text = "\n".join(tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False) for row in rows)
    ids = torch.tensor(tokenizer(text).input_ids)
    usable = ids.numel() // length * length
    sequences = ids[:usable].view(-1, length)
    return [sequences[i : i + batch] for i in range(0, sequences.shape[0], batch)]


@torch.no_grad()
def kl_and_loss(reference: nn.Module, model: nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    kls, losses = [], []
    for ids in batches:
        p = reference(ids).logits.float().log_softmax(-1)
        out = model(input_ids=ids, labels=ids)
        q = out.logits.float().log_softmax(-1)
        kls.append((p.exp() * (p - q)).sum(-1).mean().item())
        losses.append(out.loss.item())
    return statistics.mean(kls), statistics.mean(losses)


def quality(quick: bool) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "hub_configs" / "tiny")
    calibration = task_text_batches(tokenizer, "train", 64 if quick else 256, 8, 64)
    held_out = task_text_batches(tokenizer, "test", 32 if quick else 128, 8, 64)
    small = dict(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=256, intermediate_size_mlp=512,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=16,
        num_experts_per_tok=1, initializer_range=0.1,
    )  # fmt: skip
    shapes = [("small random (H 256, 16 experts)", Llama4TextConfig(**small), 128)]
    tiny = Llama4TextConfig.from_pretrained(ROOT / "hub_configs" / "tiny", initializer_range=0.1)
    shapes.append(("tiny random (hub_configs/tiny)", tiny, 32))
    lines = [
        "Quality on held-out synthetic-task text, random-init models (initializer_range 0.1): logit KL(full || int4)"
        " and next-token loss; GPTQ calibrated on train-split text",
        "",
        "| model | group | full-precision loss | RTN KL | GPTQ KL | RTN loss | GPTQ loss | GPTQ: RTN fallbacks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, config, group in shapes:
        torch.manual_seed(0)
        base = Llama4ForCausalLM(config).eval()
        _, full_loss = kl_and_loss(base, base, held_out)
        rtn = quantize_model(copy.deepcopy(base), Int4Config(group))
        gptq = copy.deepcopy(base)
        counts = gptq_quantize(gptq, calibration, Int4Config(group))
        rtn_kl, rtn_loss = kl_and_loss(base, rtn, held_out)
        gptq_kl, gptq_loss = kl_and_loss(base, gptq, held_out)
        lines.append(
            f"| {name} | {group} | {full_loss:.4f} | {rtn_kl:.2e} | {gptq_kl:.2e} | {rtn_loss:.4f} | "
            f"{gptq_loss:.4f} | {counts['rtn_fallback']} |"
        )
    return lines


# --------------------------------------------------------------------------------------------------------------
# 5. Load-time peak memory
# --------------------------------------------------------------------------------------------------------------

_LOAD = """
import os, sys, threading, time, torch
from modeling_llama4 import Int4Config, Llama4ForCausalLM
def rss():  # (anonymous, file-backed) resident bytes
    fields = dict(line.split(":") for line in open("/proc/self/status"))
    return tuple(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))
peak, done = [rss()], []
def watch():
    while not done:
        peak.append(rss())
        time.sleep(0.002)
thread = threading.Thread(target=watch)
before = rss()
thread.start()
kwargs = {"quantization_config": Int4Config(128)} if sys.argv[2] == "int4" else {}
model = Llama4ForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, **kwargs)
done.append(1)
thread.join()
resident = sum(t.numel() * t.element_size() for t in model.state_dict().values())
anon = max(p[0] for p in peak) - before[0]
total = max(p[0] + p[1] for p in peak) - sum(before)
print(anon, total, resident)
"""


def load_memory(quick: bool) -> list[str]:
    config = Llama4TextConfig(
        vocab_size=256, hidden_size=1024, intermediate_size=1024, intermediate_size_mlp=2048,
        num_hidden_layers=2 if quick else 8, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
        num_local_experts=16, num_experts_per_tok=1,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        model = Llama4ForCausalLM(config).to(torch.bfloat16)
        checkpoint_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        model.save_pretrained(folder, max_shard_size=f"{checkpoint_bytes // 4 // 2**20 + 1}MB")
        shards = len(list(Path(folder).glob("*.safetensors")))
        del model
        gc.collect()
        rows = []
        for mode in ("bf16", "int4"):
            out = subprocess.run(
                [sys.executable, "-c", _LOAD, folder, mode], capture_output=True, text=True, check=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )  # fmt: skip
            anon, total, resident = map(int, out.stdout.split()[-3:])
            rows.append((mode, anon / GB, total / GB, resident / GB))
    lines = [
        f"Peak RSS added by from_pretrained of a {checkpoint_bytes / GB:.2f} GB bf16 checkpoint in {shards} shards "
        "(fresh process each; /proc/self/status sampled every 2 ms, minus the values before the call). A bf16 load "
        "leaves the weights in the memory-mapped file (file-backed pages, read on first use); int4 holds its packed "
        "weights in anonymous memory.",
        "",
        "| load | peak anonymous GB added | peak anonymous + file-backed GB added | model bytes GB |",
        "|---|---|---|---|",
    ]
    lines += [f"| {mode} | {anon:.2f} | {total:.2f} | {resident:.2f} |" for mode, anon, total, resident in rows]
    return lines


# --------------------------------------------------------------------------------------------------------------
# --checkpoint: quality on a trained model
# --------------------------------------------------------------------------------------------------------------


def checkpoint_quality(path: str, problems: int, max_new_tokens: int, group_size: int) -> list[str]:
    from recipes.common import TaskArguments, heldout_accuracy, load_tokenizer, task_datasets
    from recipes.pipeline import paired_change

    tokenizer = load_tokenizer(path)
    _, test = task_datasets(TaskArguments(heldout_problems=problems, train_problems=256))
    calibration = task_text_batches(tokenizer, "train", 256, 8, 128)
    held_out = task_text_batches(tokenizer, "test", 128, 8, 128)
    full = Llama4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rtn = Llama4ForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=Int4Config(group_size))
    gptq = Llama4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    counts = gptq_quantize(gptq, calibration, Int4Config(group_size))
    results = {}
    for name, model in (("full precision", full), ("int4 RTN", rtn.eval()), ("int4 GPTQ", gptq.eval())):
        accuracy = heldout_accuracy(model, tokenizer, test, max_new_tokens=max_new_tokens, progress=False)
        kl, loss = kl_and_loss(full, model, held_out)
        results[name] = (accuracy, kl, loss)
    base = results["full precision"][0]["correct"]
    lines = [
        f"{path}: held-out accuracy on {len(base)} synthetic problems (greedy), group {group_size}; GPTQ RTN "
        f"fallbacks: {counts['rtn_fallback']}",
        "",
        "| model | accuracy | vs full precision: solved / lost (p) | logit KL | held-out loss |",
        "|---|---|---|---|---|",
    ]
    for name, (accuracy, kl, loss) in results.items():
        change = paired_change(base, accuracy["correct"])
        paired = (
            "-" if name == "full precision" else f"+{change['gained']} / -{change['lost']} (p={change['p_value']:.2g})"
        )
        lines.append(f"| {name} | {accuracy['accuracy']:.1%} | {paired} | {kl:.2e} | {loss:.4f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--checkpoint", type=model_dir, help="a trained Llama 4 model directory: adds held-out accuracy"
    )
    parser.add_argument("--problems", type=positive_int, default=1000)
    parser.add_argument("--max-new-tokens", type=positive_int, default=48)
    parser.add_argument("--group-size", type=positive_int, help="for --checkpoint (default: 128 if it divides)")
    parser.add_argument("--only", nargs="*", choices=["bytes", "speed", "quality", "memory"])
    args = parser.parse_args()
    # The tables and --checkpoint are separate runs: a flag of the other one would be ignored without a word.
    if args.checkpoint is None and args.group_size is not None:
        parser.error("--group-size applies to --checkpoint only (the tables use their own group sizes)")
    if args.checkpoint is not None and args.only is not None:
        parser.error("--only picks tables, which --checkpoint does not print: run them separately")
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads\n")
    if args.checkpoint:
        config = json.loads(Path(args.checkpoint, "config.json").read_text())
        text = config.get("text_config", config)
        widths = [text[k] for k in ("hidden_size", "intermediate_size")]
        group = args.group_size or max((g for g in (32, 64, 128) if all(w % g == 0 for w in widths)), default=128)
        try:  # before the three model loads, with the divisors to pick from
            for width in widths:
                check_group_size(width, group, f"{args.checkpoint}'s layers")
        except ValueError as error:
            parser.error(f"{error} Pass it as --group-size.")
        print("\n".join(checkpoint_quality(args.checkpoint, args.problems, args.max_new_tokens, group)))
        return
    sections = {"bytes": lambda: scout_memory(), "speed": lambda: moe_speed(args.quick)}
    sections |= {"quality": lambda: quality(args.quick), "memory": lambda: load_memory(args.quick)}
    for name in args.only or sections:
        print("\n".join(sections[name]()) + "\n", flush=True)


if __name__ == "__main__":
    main()
