"""The routed experts' SwiGLU on CPU: per-expert GEMMs with a hand-written backward, split across torch's threads.

Contract: `routed_swiglu(rows, gate_up_proj, down_proj, counts, memory)` takes `rows` (N, H) sorted by expert,
`counts` (host ints, rows per expert, sum <= N) and the fused weights `gate_up_proj` (E, H, 2I) and `down_proj`
(E, I, H), and returns (N, H): row r of expert e's block is `(silu(x @ Wg_e) * (x @ Wu_e)) @ Wd_e`; rows past
`sum(counts)` belong to no local expert and get zero (and a zero input gradient). Gradients flow to `rows` and both
weights. Results are deterministic: every output element is written by one GEMM, in a fixed order, whatever the
thread timing. `memory` is a `KeptMemory`, which keeps the large outputs and gradients between steps.

This module ships with the model as Hub remote code (moe.py imports it), but runs only where it was measured:
CPU tensors on Linux with torch's MKL and OpenMP. Its C entry points (libc's madvise, MKL's and OpenMP's thread
counts, torch's storage reference count) are looked up on first CPU use, never at import; `available()` is False
where the thread hooks are missing, and the experts then take the generic path (`moe.grouped_matmul`). Missing
madvise or reference count only cost speed (small pages, fresh buffers every step).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 * 1024 * 1024
# A helper thread costs a hand-off (submit, wake, wait); below this much work per thread one thread is faster.
_MIN_FLOPS_PER_THREAD = 8e6


@dataclass(frozen=True)
class PlatformHooks:
    """The C entry points the kernel uses; each None where this platform or torch build lacks it."""

    madvise: Callable | None = None
    mkl_set_num_threads_local: Callable | None = None
    omp_set_num_threads: Callable | None = None
    storage_use_count: Callable[[int], int] | None = None


def _libc_madvise():
    try:
        madvise = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def _torch_library_function(library: str, name: str, restype, *argtypes):
    """A C function from a library shipped in torch/lib (already loaded by torch), or None."""
    try:
        function = getattr(ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", library)), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = list(argtypes), restype
    return function


def _load_hooks() -> PlatformHooks:
    if not sys.platform.startswith("linux"):
        return PlatformHooks()
    return PlatformHooks(
        madvise=_libc_madvise(),
        # MKL's documented per-thread setting (torch.set_num_threads calls it too) and the calling thread's OpenMP
        # count, which at::parallel_for uses.
        mkl_set_num_threads_local=_torch_library_function(
            "libtorch_cpu.so", "MKL_Set_Num_Threads_Local", ctypes.c_int, ctypes.c_int
        )
        if torch.backends.mkl.is_available()
        else None,
        omp_set_num_threads=_torch_library_function("libgomp.so.1", "omp_set_num_threads", None, ctypes.c_int),
        # A storage's reference count (torch's own weak-reference helpers read it).
        storage_use_count=getattr(torch._C, "_storage_Use_Count", None),
    )


_hooks: PlatformHooks | None = None
_HOOKS_LOCK = threading.Lock()


def platform_hooks() -> PlatformHooks:
    """The hooks, looked up once, on first use."""
    global _hooks
    with _HOOKS_LOCK:
        if _hooks is None:
            _hooks = _load_hooks()
        return _hooks


def available() -> bool:
    """Whether the kernel runs here: it splits experts across threads through MKL's and OpenMP's per-thread counts."""
    hooks = platform_hooks()
    return hooks.mkl_set_num_threads_local is not None and hooks.omp_set_num_threads is not None


def _new_buffer(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised CPU tensor shaped `shape`, backed by transparent huge pages where the OS allows.

    glibc maps large blocks anew on every allocation, and first-touching them in 4 KiB pages costs a page fault per
    page; 2 MiB pages cut that 512-fold. Advising only the 2 MiB-aligned interior is harmless; where madvise is
    missing or refused, pages stay small.
    """
    buffer = like.new_empty(shape)
    nbytes = buffer.numel() * buffer.element_size()
    madvise = platform_hooks().madvise
    if madvise is not None and nbytes >= 2 * _HUGE_PAGE:
        start = buffer.data_ptr()
        first = -(-start // _HUGE_PAGE) * _HUGE_PAGE
        last = (start + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if last > first:
            madvise(first, last - first, _MADV_HUGEPAGE)
    return buffer


class KeptMemory:
    """The CPU experts' large buffers (activations, input and weight gradients), kept from one step to the next.

    With `zero_grad(set_to_none=True)`, torch's default, the weight gradients are freed after every optimizer step
    and the activation buffers after every backward; glibc returns blocks that large to the OS, so every step would
    fault in fresh zeroed pages. Keeping the storages, as CUDA's caching allocator keeps freed memory reserved,
    avoids that. A storage is reused only when nothing else holds it (no `.grad`, saved tensor, view or output
    alive), so memory someone still reads is never overwritten. Moving or casting the module (`.to()`, `.float()`)
    drops it; so does `release()`.
    """

    def __init__(self) -> None:
        self._storages: dict[str, torch.UntypedStorage] = {}

    def new(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor shaped `shape`: the kept memory under `name` when it is free and fits exactly,
        else new huge-page memory, kept in its place."""
        storage = self._storages.get(name)
        use_count = platform_hooks().storage_use_count
        if (
            storage is not None
            and use_count is not None
            and use_count(storage._cdata) == 1  # only this reference left
            and storage.nbytes() == math.prod(shape) * like.element_size()
            and storage.device == like.device
        ):
            return like.new_empty(0).set_(storage, 0, shape)
        buffer = _new_buffer(shape, like)
        if use_count is not None:  # without a reference count a kept storage could never be proven free
            self._storages[name] = buffer.untyped_storage()
        return buffer

    def release(self) -> None:
        self._storages.clear()

    def __getstate__(self) -> dict:
        return {"_storages": {}}  # memory, not state: never pickled or deep-copied


_POOL_LOCK = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)  # (workers, pid)


def _single_threaded_here() -> int:
    """Make this thread's MKL and OpenMP (at::parallel_for) run single-threaded; returns MKL's previous setting."""
    hooks = platform_hooks()
    torch.get_num_threads()  # torch's lazy per-thread init first, or it would reset the settings below later
    hooks.omp_set_num_threads(1)
    return hooks.mkl_set_num_threads_local(1)


def _worker_pool(workers: int) -> ThreadPoolExecutor:
    """Single-threaded helper threads; rebuilt after a fork or a change of torch's thread count."""
    global _pool, _pool_key
    with _POOL_LOCK:
        if _pool is None or _pool_key != (workers, os.getpid()):
            if _pool is not None and _pool_key[1] == os.getpid():
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(workers, "llama4-experts", initializer=_single_threaded_here)
            _pool_key = (workers, os.getpid())
        return _pool


def _no_grad_call(work: Callable[[int, int], None], first: int, stop: int, inference: bool) -> None:
    # Grad and inference mode are per thread: the buffers were made in the caller's mode (inference tensors under
    # `torch.inference_mode`, which only that mode may write), and the work only writes into them.
    with torch.inference_mode(inference), torch.no_grad():
        work(first, stop)


def _over_experts(work: Callable[[int, int], None], counts: list[int], flops_per_row: float) -> None:
    """Run `work(first, stop)` over all experts, split into contiguous expert ranges of about equal row counts,
    one per torch thread, each range single-threaded.

    MKL's own threading of GEMMs this small (tens of rows) scales poorly and collapses when another process holds
    a core (its threads spin-wait); one expert range per thread does not. Below `_MIN_FLOPS_PER_THREAD` of work per
    thread (decode steps) everything runs on the calling thread. Every output element is still written by exactly
    one thread in a fixed order, so results do not depend on thread timing.
    """
    threads = torch.get_num_threads()
    total = sum(counts)
    if threads < 2 or total < 2 * threads or total * flops_per_row < threads * _MIN_FLOPS_PER_THREAD:
        work(0, len(counts))
        return
    cuts, running, part = [0], 0, 1
    for expert, count in enumerate(counts):
        running += count
        if part < threads and running >= total * part / threads:
            cuts.append(expert + 1)
            part += 1
    cuts += [len(counts)] * (threads + 1 - len(cuts))
    hooks = platform_hooks()
    pool = _worker_pool(threads - 1)
    futures: list[Future] = []
    previous_mkl = _single_threaded_here()
    try:
        inference = torch.is_inference_mode_enabled()
        futures = [pool.submit(_no_grad_call, work, cuts[i], cuts[i + 1], inference) for i in range(1, threads)]
        work(cuts[0], cuts[1])
    finally:
        for future in futures:
            future.exception()  # wait for every helper before the buffers they write can be released
        hooks.mkl_set_num_threads_local(previous_mkl)
        hooks.omp_set_num_threads(threads)
    for future in futures:
        future.result()


def _starts(counts: list[int]) -> list[int]:
    """First row of each expert's block."""
    starts, running = [], 0
    for count in counts:
        starts.append(running)
        running += count
    return starts


def _swiglu_forward(
    rows: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, counts: list[int], gate_up, out
) -> None:
    """Fill `gate_up` (sum(counts), 2I) and `out` (N, H) expert by expert; only experts with rows are touched."""
    inter, largest, starts = down_proj.shape[1], max(counts, default=0), _starts(counts)
    flops_per_row = 2 * rows.shape[1] * 3 * inter

    def work(first: int, stop: int) -> None:
        act, hidden = rows.new_empty(largest, inter), rows.new_empty(largest, inter)
        for e in range(first, stop):
            if n := counts[e]:
                block = slice(starts[e], starts[e] + n)
                expert_gate_up = gate_up[block]
                torch.mm(rows[block], gate_up_proj[e], out=expert_gate_up)
                torch.ops.aten.silu.out(expert_gate_up[:, :inter], out=act[:n])
                torch.mul(act[:n], expert_gate_up[:, inter:], out=hidden[:n])
                torch.mm(hidden[:n], down_proj[e], out=out[block])

    _over_experts(work, counts, flops_per_row)
    out[sum(counts) :] = 0


class _RoutedSwiGLU(torch.autograd.Function):
    """`routed_swiglu` under autograd: one node, no split/cat copies, one pass over the experts each way.

    autograd's backward of `grouped_mm` on CPU computes the weight gradients with a slower kernel for `rows^T @ grad`
    into fresh small-page memory; here one `mm(..., out=)` per expert writes them into kept huge-page buffers, and
    per expert the GEMMs and elementwise steps run on cache-resident rows with small per-thread temporaries. A padded
    `bmm` would waste the FLOPs of padding every expert to the fullest. Saved for backward: the input rows and
    `x @ W_gate_up`; `silu(gate) * up` is recomputed per expert.
    """

    @staticmethod
    def forward(ctx, rows, gate_up_proj, down_proj, counts, memory):  # noqa: D102
        gate_up = memory.new("gate_up", (sum(counts), 2 * down_proj.shape[1]), rows)
        out = memory.new("out", (rows.shape[0], down_proj.shape[2]), rows)
        _swiglu_forward(rows, gate_up_proj, down_proj, counts, gate_up, out)
        ctx.save_for_backward(rows, gate_up_proj, down_proj, gate_up)
        ctx.counts, ctx.memory = counts, memory
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        rows, gate_up_proj, down_proj, gate_up = ctx.saved_tensors
        counts = ctx.counts
        total, inter, largest, starts = gate_up.shape[0], down_proj.shape[1], max(counts, default=0), _starts(counts)
        need_rows, need_gate_up, need_down = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous()
        memory = ctx.memory
        grad_rows = memory.new("grad_rows", tuple(rows.shape), grad_out) if need_rows else None
        grad_gate_up_proj = (
            memory.new("grad_gate_up_proj", tuple(gate_up_proj.shape), gate_up_proj) if need_gate_up else None
        )
        grad_down_proj = memory.new("grad_down_proj", tuple(down_proj.shape), down_proj) if need_down else None
        gate_up_wt, down_wt = gate_up_proj.transpose(1, 2), down_proj.transpose(1, 2)

        def work(first: int, stop: int) -> None:
            act, hidden = grad_out.new_empty(largest, inter), grad_out.new_empty(largest, inter)
            grad_hidden, grad_gate_up = grad_out.new_empty(largest, inter), grad_out.new_empty(largest, 2 * inter)
            for e in range(first, stop):
                n = counts[e]
                if not n:
                    for grad_w in (grad_gate_up_proj, grad_down_proj):
                        if grad_w is not None:
                            grad_w[e].zero_()
                    continue
                block = slice(starts[e], starts[e] + n)
                gate, up = gate_up[block, :inter], gate_up[block, inter:]
                torch.ops.aten.silu.out(gate, out=act[:n])
                torch.mm(grad_out[block], down_wt[e], out=grad_hidden[:n])
                if need_down:
                    torch.mul(act[:n], up, out=hidden[:n])  # the down GEMM's input, recomputed
                    torch.mm(hidden[:n].t(), grad_out[block], out=grad_down_proj[e])
                # hidden = silu(gate) * up: d up = d hidden * silu(gate), d gate = silu'(gate) * d hidden * up.
                torch.mul(grad_hidden[:n], act[:n], out=grad_gate_up[:n, inter:])
                grad_hidden[:n].mul_(up)
                torch.ops.aten.silu_backward.grad_input(grad_hidden[:n], gate, grad_input=grad_gate_up[:n, :inter])
                if need_rows:
                    torch.mm(grad_gate_up[:n], gate_up_wt[e], out=grad_rows[block])
                if need_gate_up:
                    torch.mm(rows[block].t(), grad_gate_up[:n], out=grad_gate_up_proj[e])

        _over_experts(work, counts, 2 * 2 * rows.shape[1] * 3 * inter)
        if grad_rows is not None:
            grad_rows[total:] = 0
        return grad_rows, grad_gate_up_proj, grad_down_proj, None, None


def routed_swiglu(
    rows: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, counts: list[int], memory: KeptMemory
) -> torch.Tensor:
    """(N, H) expert-sorted rows -> (N, H); see the module docstring for the contract."""
    if torch.is_grad_enabled() and (rows.requires_grad or gate_up_proj.requires_grad or down_proj.requires_grad):
        return _RoutedSwiGLU.apply(rows, gate_up_proj, down_proj, counts, memory)
    # Inference: no autograd node and no buffers kept for a backward that never comes.
    out = rows.new_empty(rows.shape[0], down_proj.shape[2])
    gate_up = rows.new_empty(sum(counts), 2 * down_proj.shape[1])
    _swiglu_forward(rows, gate_up_proj, down_proj, counts, gate_up, out)
    return out
