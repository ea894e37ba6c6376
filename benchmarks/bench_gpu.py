"""The GPU path measured on one H200 (Scout and Maverick shapes), bf16 and FP8, in one run of under 8 minutes.

    python benchmarks/bench_gpu.py             # on a Hopper GPU: one markdown table
    python benchmarks/bench_gpu.py --dry-run   # the same code paths on CPU at tiny shapes (FP8 emulated); CI runs it

Rows (forward+backward, medians of timed repeats after a warm-up, CUDA-synchronised wall time):
- the dense bf16 matmul rate of this GPU, measured here: (tokens, hidden) @ (hidden, 2 * expert width);
- the MoE block at Scout shape (hidden 5120, expert width 8192, 16 experts, top-1, shared expert, 8192 tokens) and
  at Maverick shape (128 experts): ours, its active-parameter TFLOP/s and share of the dense rate, and the built-in
  (transformers' Llama4TextMoe, which runs every expert on every token) where it fits in memory;
- the routed experts' grouped GEMMs alone and the same MoE blocks in FP8 (recipes/fp8.py, torchao) against bf16;
- a full Scout-shaped decoder layer (a one-layer model with a 2048-token vocabulary), bf16, FP8 and the built-in;
- tokens/s over a few AdamW training steps of a reduced-depth (4-layer) Scout-shaped model, bf16 and FP8.
Goals printed beside the figures: MoE active-parameter rate >= 50% of dense bf16; >= 10x the built-in at 16 experts;
FP8 expert GEMMs >= 1.3x bf16.

Needs transformers >= 5.24 and torchao >= 0.18 (FP8 rows). Where the GPU image has older ones, carry the wheels
(docs/fp8.md gives the commands); this script says so and stops if transformers is too old.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_types import positive_int  # noqa: E402

GPU_SHAPES = dict(hidden=5120, inter=8192, tokens=8192, heads=40, kv_heads=8, head_dim=128, vocab=202048)
CPU_SHAPES = dict(hidden=64, inter=64, tokens=64, heads=4, kv_heads=2, head_dim=16, vocab=1024)
EXPERTS = {"Scout": 16, "Maverick": 128}
DRY_EXPERTS = {"Scout": 4, "Maverick": 8}
MIN_TRANSFORMERS = (5, 24)
TIME_BUDGET_S = 420  # sections not started by then are skipped, so the run ends inside 8 minutes


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("+")[0].split(".")[:2] if x.isdigit())


def check_transformers() -> None:
    import transformers

    if _version(transformers.__version__) < MIN_TRANSFORMERS:
        sys.exit(
            f"transformers {transformers.__version__} is older than the 5.24 modeling_llama4 needs. Carry the wheel "
            "(docs/fp8.md, 'GPU benchmark'): pip download --no-deps --only-binary=:all: --python-version 3.12 "
            "-d .whl transformers==5.24.0 torchao==0.18.0, then on the GPU machine pip install --target /tmp/site "
            "--no-deps .whl/*.whl and export PYTHONPATH=/tmp/site:$PWD"
        )


class Timer:
    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device, self.repeats = device, repeats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median(self, fn: Callable[[], None], repeats: int | None = None) -> float:
        fn()  # warm-up (kernel selection, Triton compilation, allocator)
        self.sync()
        times = []
        for _ in range(repeats or self.repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def text_config(shape: dict, experts: int, layers: int = 1, vocab: int | None = None, builtin: bool = False):
    import transformers

    from modeling_llama4 import Llama4TextConfig

    kwargs = dict(
        vocab_size=vocab or shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["inter"],
        intermediate_size_mlp=2 * shape["inter"],
        num_hidden_layers=layers,
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        num_local_experts=experts,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        attention_chunk_size=8192,
        max_position_embeddings=max(8192, shape["tokens"]),
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    return (transformers.Llama4TextConfig if builtin else Llama4TextConfig)(**kwargs)


def randomise(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(std=0.02)
    return module


def moe_forward_flops(shape: dict, experts: int) -> float:
    """Active parameters' forward FLOPs: the top-1 routed expert and the shared expert (3 H x I matrices each), and
    the router."""
    hidden, inter = shape["hidden"], shape["inter"]
    return shape["tokens"] * (2 * 3 * hidden * inter * 2 + 2 * hidden * experts)


def block_step(block: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        block.zero_grad(set_to_none=True)
        out = block(x)[0]
        out.backward(torch.ones_like(out))

    return step


def as_decoder(block: nn.Module) -> nn.Module:
    # convert_model_to_fp8 converts linear layers inside decoder layers (`layers.N.`): hold the block there.
    holder = nn.Module()
    holder.layers = nn.ModuleList([block])
    return holder


def fp8_problem(device: torch.device) -> str | None:
    from recipes.fp8 import fp8_unavailable_reason

    return None if device.type == "cpu" else fp8_unavailable_reason(device)


def to_fp8(model: nn.Module, device: torch.device) -> nn.Module:
    from recipes.fp8 import convert_model_to_fp8

    return convert_model_to_fp8(model, emulate=device.type == "cpu")


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, name: str, figure: str, comparison: str = "", goal: str = "") -> None:
        self.rows.append((name, figure, comparison, goal))
        print(f"  {name}: {figure} {comparison} {goal}", flush=True)

    def markdown(self) -> str:
        lines = ["| row | figure | against | goal |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in self.rows]
        return "\n".join(lines)


DRY_RUN = False  # tiny CPU shapes: figures only show that the code runs


def goal(met: bool, text: str) -> str:
    return f"{text}: {'(dry run)' if DRY_RUN else 'met' if met else 'NOT met'}"


def dense_rate(shape: dict, device: torch.device, dtype: torch.dtype, timer: Timer) -> float:
    a = torch.randn(shape["tokens"], shape["hidden"], device=device, dtype=dtype)
    b = torch.randn(shape["hidden"], 2 * shape["inter"], device=device, dtype=dtype)
    seconds = timer.median(lambda: a @ b, repeats=3 * timer.repeats)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / seconds / 1e12


def bench_moe_blocks(shape, experts_by_name, device, dtype, timer, table, dense_tflops) -> None:
    from transformers.models.llama4 import modeling_llama4 as builtin_modeling

    from modeling_llama4 import Llama4TextMoe

    for name, experts in experts_by_name.items():
        label = f"MoE block {name}-shaped ({experts} experts, {shape['tokens']} tokens)"
        flops = 3 * moe_forward_flops(shape, experts)  # forward + backward
        x = torch.randn(shape["tokens"], shape["hidden"], device=device, dtype=dtype, requires_grad=True)
        with torch.device(device):
            ours = randomise(Llama4TextMoe(text_config(shape, experts)).to(dtype))
        t_ours = timer.median(block_step(ours, x))
        rate = flops / t_ours / 1e12
        share = rate / dense_tflops
        table.add(
            f"{label}, ours bf16",
            f"{t_ours * 1e3:.2f} ms, {rate:.3g} active TFLOP/s",
            f"{share:.0%} of dense bf16",
            goal(share >= 0.5, ">= 50% of dense"),
        )
        if (problem := fp8_problem(device)) is None:
            ours_fp8 = to_fp8(as_decoder(ours), device).layers[0]
            t_fp8 = timer.median(block_step(ours_fp8, x))
            kind = "FP8 (emulated)" if device.type == "cpu" else "FP8"
            table.add(f"{label}, ours {kind}", f"{t_fp8 * 1e3:.2f} ms", f"{t_ours / t_fp8:.2f}x bf16")
        else:
            table.add(f"{label}, ours FP8", f"n/a: {problem}")
        ours.zero_grad(set_to_none=True)
        state = {k: v.detach() for k, v in ours.state_dict().items()}  # the weights only, no second copy
        del ours
        free(device)
        try:
            with torch.device(device):
                builtin = builtin_modeling.Llama4TextMoe(text_config(shape, experts, builtin=True)).to(dtype)
            builtin.load_state_dict(state, strict=False)  # fused expert names are the same; what differs stays
            del state
            t_builtin = timer.median(block_step(builtin, x), repeats=max(2, timer.repeats // 2))
            speedup = t_builtin / t_ours
            table.add(
                f"{label}, built-in bf16",
                f"{t_builtin * 1e3:.2f} ms",
                f"ours at {speedup:.1f}x its speed",
                goal(speedup >= 10, ">= 10x built-in") if experts == 16 else "",
            )
        except torch.OutOfMemoryError:
            table.add(f"{label}, built-in bf16", "out of memory (it runs every expert on every token)")
        builtin = None
        free(device)


def bench_expert_gemms(shape, experts, device, dtype, timer, table) -> None:
    """The two routed-expert grouped GEMMs alone, forward+backward, balanced top-1 routing: bf16 vs FP8."""
    from modeling_llama4.moe import grouped_matmul
    from recipes import fp8

    tokens, hidden, inter = shape["tokens"], shape["hidden"], shape["inter"]
    counts = torch.full((experts,), tokens // experts, device=device)
    rows = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    gate_up = torch.randn(experts, hidden, 2 * inter, device=device, dtype=dtype) * 0.02
    down = torch.randn(experts, inter, hidden, device=device, dtype=dtype) * 0.02
    gate_up.requires_grad_(), down.requires_grad_()

    def step(weight_class):
        def run() -> None:
            g = gate_up if weight_class is None else gate_up.as_subclass(weight_class)
            d = down if weight_class is None else down.as_subclass(weight_class)
            hidden_rows = grouped_matmul(rows, g, counts)[:, :inter]
            out = grouped_matmul(hidden_rows.contiguous(), d, counts)
            torch.autograd.grad(out, (rows, gate_up, down), torch.ones_like(out))

        return run

    flops = 3 * 2 * tokens * hidden * inter * 3  # gate_up (2I) + down (I), forward + backward
    t_bf16 = timer.median(step(None))
    label = f"expert grouped GEMMs {experts} experts"
    table.add(f"{label}, bf16", f"{t_bf16 * 1e3:.2f} ms, {flops / t_bf16 / 1e12:.3g} TFLOP/s")
    if (problem := fp8_problem(device)) is None:
        weight_class = fp8._EmulatedFp8ExpertWeight if device.type == "cpu" else fp8._TorchaoFp8ExpertWeight
        t_fp8 = timer.median(step(weight_class))
        speedup = t_bf16 / t_fp8
        kind = "FP8 (emulated)" if device.type == "cpu" else "FP8"
        table.add(
            f"{label}, {kind}",
            f"{t_fp8 * 1e3:.2f} ms, {flops / t_fp8 / 1e12:.3g} TFLOP/s",
            f"{speedup:.2f}x bf16",
            goal(speedup >= 1.3, ">= 1.3x bf16"),
        )
    else:
        table.add(f"{label}, FP8", f"n/a: {problem}")
    free(device)


def model_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids, use_cache=False).loss.backward()

    return step


def bench_decoder_layer(shape, experts, device, dtype, timer, table) -> None:
    import transformers

    from modeling_llama4 import Llama4ForCausalLM

    ids = torch.randint(0, 2048, (1, shape["tokens"]), device=device)
    label = f"decoder layer Scout-shaped ({shape['tokens']} tokens, 1-layer model, vocab 2048)"
    with torch.device(device):
        ours = randomise(Llama4ForCausalLM(text_config(shape, experts, vocab=2048)).to(dtype))
    t_ours = timer.median(model_step(ours, ids))
    table.add(f"{label}, ours bf16", f"{t_ours * 1e3:.2f} ms")
    state = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    if (problem := fp8_problem(device)) is None:
        to_fp8(ours, device)
        t_fp8 = timer.median(model_step(ours, ids))
        kind = "FP8 (emulated)" if device.type == "cpu" else "FP8"
        table.add(f"{label}, ours {kind}", f"{t_fp8 * 1e3:.2f} ms", f"{t_ours / t_fp8:.2f}x bf16")
    else:
        table.add(f"{label}, ours FP8", f"n/a: {problem}")
    del ours
    free(device)
    try:
        with torch.device(device):
            builtin = transformers.Llama4ForCausalLM(text_config(shape, experts, vocab=2048, builtin=True)).to(dtype)
        builtin.load_state_dict(state, strict=False)
        del state
        t_builtin = timer.median(model_step(builtin, ids), repeats=max(2, timer.repeats // 2))
        table.add(
            f"{label}, built-in bf16", f"{t_builtin * 1e3:.2f} ms", f"ours at {t_builtin / t_ours:.1f}x its speed"
        )
    except torch.OutOfMemoryError:
        table.add(f"{label}, built-in bf16", "out of memory")
    builtin = None
    free(device)


def tokens_per_second(model: nn.Module, ids: torch.Tensor, steps: int, timer: Timer) -> tuple[float, list[float]]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    losses = []

    def step() -> None:
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    seconds = timer.median(step, repeats=steps)
    return ids.numel() / seconds, [loss.item() for loss in losses]


def bench_training(shape, experts, layers, steps, device, dtype, timer, table) -> None:
    from modeling_llama4 import Llama4ForCausalLM

    tokens = shape["tokens"]
    ids = torch.randint(0, shape["vocab"], (1, tokens), device=device)
    for use_fp8 in (False, True):
        kind = ("FP8 (emulated)" if device.type == "cpu" else "FP8") if use_fp8 else "bf16"
        label = f"training {layers}-layer Scout-shaped model, AdamW, {tokens} tokens/step, {kind}"
        if use_fp8 and (problem := fp8_problem(device)) is not None:
            table.add(label, f"n/a: {problem}")
            continue
        torch.manual_seed(0)
        with torch.device(device):
            model = randomise(Llama4ForCausalLM(text_config(shape, experts, layers=layers)).to(dtype))
        if use_fp8:
            to_fp8(model, device)
        rate, losses = tokens_per_second(model, ids, steps, timer)
        table.add(label, f"{rate:,.0f} tokens/s", f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        del model
        free(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, emulated FP8: checks the code paths")
    parser.add_argument("--repeats", type=positive_int, help="timed repeats per row (default 5 GPU, 1 dry run)")
    args = parser.parse_args()
    check_transformers()
    global DRY_RUN
    DRY_RUN = args.dry_run
    if args.dry_run:
        device, shape, experts, repeats, layers, steps = torch.device("cpu"), CPU_SHAPES, DRY_EXPERTS, 1, 2, 2
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run on a Hopper GPU, or pass --dry-run to check the code paths on CPU")
        device, shape, experts, repeats, layers, steps = torch.device("cuda"), GPU_SHAPES, EXPERTS, 5, 4, 4
    timer = Timer(device, args.repeats or repeats)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    started = time.perf_counter()
    table = Table()

    import transformers

    header = f"torch {torch.__version__}, transformers {transformers.__version__}"
    try:
        import torchao

        header += f", torchao {torchao.__version__}"
    except ImportError:
        header += ", torchao not installed"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run, tiny shapes)"
    print(f"{name}; {header}", flush=True)
    if args.dry_run:
        print("dry run: tiny shapes on CPU, FP8 emulated; the figures only show that every code path runs")

    dense = dense_rate(shape, device, dtype, timer)
    table.add(
        f"dense bf16 matmul ({shape['tokens']} x {shape['hidden']} @ {shape['hidden']} x {2 * shape['inter']})",
        f"{dense:.3g} TFLOP/s",
    )
    sections = [
        ("MoE blocks", lambda: bench_moe_blocks(shape, experts, device, dtype, timer, table, dense)),
        ("expert GEMMs", lambda: bench_expert_gemms(shape, experts["Scout"], device, dtype, timer, table)),
        ("decoder layer", lambda: bench_decoder_layer(shape, experts["Scout"], device, dtype, timer, table)),
        ("training", lambda: bench_training(shape, experts["Scout"], layers, steps, device, dtype, timer, table)),
    ]
    failures = 0
    for section, run in sections:
        if time.perf_counter() - started > TIME_BUDGET_S:
            table.add(f"{section}", f"skipped: past the {TIME_BUDGET_S} s budget")
            continue
        # One GPU run is precious: a section that fails is reported in the table and the next one still runs.
        try:
            run()
        except Exception as error:
            failures += 1
            traceback.print_exc()
            table.add(f"{section}", f"FAILED: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        free(device)

    print()
    print(f"{name}; {header}; {time.perf_counter() - started:.0f} s")
    print(table.markdown())
    if failures:
        sys.exit(f"{failures} section(s) failed (tracebacks above)")


if __name__ == "__main__":
    main()
