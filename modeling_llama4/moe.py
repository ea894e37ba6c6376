"""Llama 4 mixture of experts, computed sparsely.

transformers' built-in block multiplies every token by every expert (`hidden_states.repeat(E, 1)`),
so Scout pays 16x and Maverick 128x the expert FLOPs it needs. Here each token goes only to its top-k
experts: assignments are sorted by expert and two grouped GEMMs run the experts over their own rows
(on CUDA torch's grouped GEMM under autograd; on CPU `_RoutedSwiGLU`, per-expert GEMMs with a hand-written
backward, split across torch's threads by expert).
Numerics are the built-in's: sigmoid of the raw top-k router logits scales the expert INPUT, the
shared expert is added unweighted, and the fused weights keep their layout
(`gate_up_proj` (E, H, 2I) used as `x @ W`, `down_proj` (E, I, H)).
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

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN, SiLUActivation

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# (device type, dtype) pairs on which the grouped GEMM kernel raised once; those use the expert loop.
_GROUPED_MM_UNSUPPORTED: set[tuple[str, torch.dtype]] = set()


def _is_16_byte_aligned(tensor: torch.Tensor) -> bool:
    # The grouped GEMM kernels need 16-byte aligned base pointers and strides (memory-mapped
    # safetensors weights or odd tiny widths may not be).
    size = tensor.element_size()
    strides_ok = all(s * size % 16 == 0 for s, d in zip(tensor.stride(), tensor.shape) if s != 1 and d != 1)
    return tensor.data_ptr() % 16 == 0 and strides_ok


def grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Multiply expert-sorted rows by their expert's weight.

    rows: (N, in), sorted so expert e owns the next `tokens_per_expert[e]` rows; weight: (E, in, out).
    Returns (N, out). Rows after the last group (sum(tokens_per_expert) <= N) belong to no expert here: their
    output is unspecified and the caller masks them. Uses torch's grouped GEMM when the device, dtype and
    alignment allow it; otherwise a loop over the experts that received tokens (never over empty ones).
    """
    rows = rows.to(weight.dtype)
    key = (rows.device.type, rows.dtype)
    if (
        _GROUPED_MM is not None
        and key not in _GROUPED_MM_UNSUPPORTED
        and _is_16_byte_aligned(rows)
        and _is_16_byte_aligned(weight)
    ):
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        try:
            return _GROUPED_MM(rows, weight, offs=offsets)
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM_UNSUPPORTED.add(key)
    counts = tokens_per_expert.tolist()
    groups = rows.split([*counts, rows.shape[0] - sum(counts)])
    # unbind once: indexing weight[e] per expert would make autograd allocate a full (E, in, out) gradient per expert
    expert_weights = weight.unbind(0)
    outputs = [expert_rows @ expert_weights[e] for e, expert_rows in enumerate(groups[:-1]) if expert_rows.shape[0]]
    outputs.append(rows.new_zeros(groups[-1].shape[0], weight.shape[-1]))
    return torch.cat(outputs)


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _load_madvise()
_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 * 1024 * 1024


def _new_buffer(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised CPU tensor shaped `shape`, backed by transparent huge pages where the OS allows.

    glibc maps large blocks anew on every allocation, and first-touching one in 4 KiB pages cost more than the
    expert GEMMs writing it: on the benchmark machine filling a fresh 128 MiB tensor takes 90 ms, against 25 ms with
    2 MiB pages (13 ms for memory already mapped, which `_KeptMemory` reuses). Advising only the 2 MiB-aligned
    interior is harmless; where madvise is missing or refused, pages stay small.
    """
    buffer = like.new_empty(shape)
    nbytes = buffer.numel() * buffer.element_size()
    if _MADVISE is not None and nbytes >= 2 * _HUGE_PAGE:
        start = buffer.data_ptr()
        first = -(-start // _HUGE_PAGE) * _HUGE_PAGE
        last = (start + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if last > first:
            _MADVISE(first, last - first, _MADV_HUGEPAGE)
    return buffer


# A storage's reference count (torch's own weak-reference helpers read it); None where torch lacks it.
_STORAGE_USE_COUNT: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)


class _KeptMemory:
    """The CPU experts' large buffers (activations, input and weight gradients), kept from one step to the next.

    With `zero_grad(set_to_none=True)`, torch's default, the (E, H, 2I) and (E, I, H) weight gradients are freed
    after every optimizer step, and the activation buffers after every backward. glibc gives blocks that large back
    to the OS, so every step wrote fresh pages that the kernel zeroes first (1537 page faults a step for the
    Maverick-like experts; 1 with this). Keeping the storages, as CUDA's caching allocator keeps freed memory
    reserved, made the Maverick-like MoE block's forward+backward 4-6% faster (paired, same process). A storage is
    reused only when nothing else holds it (no `.grad`, saved tensor, view or output alive), so memory someone
    still reads is never overwritten. Moving or casting the module (`.to()`, `.float()`) drops it; so does
    `release()`.
    """

    def __init__(self) -> None:
        self._storages: dict[str, torch.UntypedStorage] = {}

    def new(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor shaped `shape`: the kept memory under `name` when it is free and fits exactly,
        else new huge-page memory, kept in its place."""
        storage = self._storages.get(name)
        if (
            storage is not None
            and _STORAGE_USE_COUNT is not None
            and _STORAGE_USE_COUNT(storage._cdata) == 1  # only this reference left
            and storage.nbytes() == math.prod(shape) * like.element_size()
            and storage.device == like.device
        ):
            return like.new_empty(0).set_(storage, 0, shape)
        buffer = _new_buffer(shape, like)
        self._storages[name] = buffer.untyped_storage()
        return buffer

    def release(self) -> None:
        self._storages.clear()

    def __getstate__(self) -> dict:
        return {"_storages": {}}  # memory, not state: never pickled or deep-copied


def _torch_library_function(library: str, name: str, restype, *argtypes):
    """A C function from a library shipped in torch/lib (already loaded by torch), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", library)), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = list(argtypes), restype
    return function


# Per-thread thread counts of torch's MKL (its documented C entry point; torch.set_num_threads calls it too)
# and of torch's OpenMP (the calling thread's ICV, which at::parallel_for uses). Both None where torch has neither.
_MKL_SET_NUM_THREADS_LOCAL = (
    _torch_library_function("libtorch_cpu.so", "MKL_Set_Num_Threads_Local", ctypes.c_int, ctypes.c_int)
    if torch.backends.mkl.is_available()
    else None
)
_OMP_SET_NUM_THREADS = _torch_library_function("libgomp.so.1", "omp_set_num_threads", None, ctypes.c_int)
_POOL_LOCK = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)  # (workers, pid)


def _single_threaded_here() -> int:
    """Make this thread's MKL and OpenMP (at::parallel_for) run single-threaded; returns MKL's previous setting."""
    torch.get_num_threads()  # torch's lazy per-thread init first, or it would reset the settings below later
    if _OMP_SET_NUM_THREADS is not None:
        _OMP_SET_NUM_THREADS(1)
    return _MKL_SET_NUM_THREADS_LOCAL(1)


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


def _over_experts(work: Callable[[int, int], None], counts: list[int]) -> None:
    """Run `work(first, stop)` over all experts, split into contiguous expert ranges of about equal row counts,
    one per torch thread, each range single-threaded.

    At 2 threads MKL's own threading of a ~32-row GEMM scales poorly (measured 26 -> 39 GFLOP/s for x @ W_gate_up,
    35 -> 40 for the input gradient) and collapses when another process holds a core (its threads spin-wait:
    2-9 GFLOP/s); one expert range per thread does not. Every output element is still written by exactly one
    thread in a fixed order, so results do not depend on thread timing.
    """
    threads = torch.get_num_threads()
    total = sum(counts)
    if threads < 2 or _MKL_SET_NUM_THREADS_LOCAL is None or total < 2 * threads:
        work(0, len(counts))
        return
    cuts, running, part = [0], 0, 1
    for expert, count in enumerate(counts):
        running += count
        if part < threads and running >= total * part / threads:
            cuts.append(expert + 1)
            part += 1
    cuts += [len(counts)] * (threads + 1 - len(cuts))
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
        _MKL_SET_NUM_THREADS_LOCAL(previous_mkl)
        if _OMP_SET_NUM_THREADS is not None:
            _OMP_SET_NUM_THREADS(threads)
    for future in futures:
        future.result()


def _groups(tensor: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, ...]:
    """Row blocks of `tensor` per expert (one split op, not one slice per expert); rows past the groups dropped."""
    return tensor.split([*counts, tensor.shape[0] - sum(counts)])[:-1]


class _RoutedSwiGLU(torch.autograd.Function):
    """The routed experts' SwiGLU on CPU, `(silu(x @ Wg) * (x @ Wu)) @ Wd` per expert, with a hand-written backward.

    Measured single-threaded on the benchmark machine (128 experts, ~32 rows each, H=256, I=512): autograd's
    backward of `grouped_mm` on CPU computes each weight gradient at 17-18 GFLOP/s (a slower kernel for
    `rows^T @ grad` and a fresh, small-page output); one `mm(..., out=)` per expert into a huge-page gradient runs
    it at ~40 GFLOP/s. The other four GEMMs run at 35-44 GFLOP/s either way; a padded `bmm` is slower for all six
    (padding to the fullest expert wastes ~45% of its FLOPs). One autograd node, no split/cat copies, and one pass
    over the experts each way: per expert its GEMMs and its elementwise steps on cache-resident rows, the
    temporaries in small per-thread buffers reused across experts. Saved for backward: the input rows and
    `x @ W_gate_up`; `silu(gate) * up` is recomputed per expert.

    rows: (N, H) sorted by expert; rows past `sum(counts)` belong to no local expert: their output and input
    gradient are zero. counts: rows per expert (host ints). memory: the module's `_KeptMemory`, which holds the
    large outputs and gradients between steps. Deterministic: every output element is written by
    exactly one GEMM, in a fixed order.
    """

    @staticmethod
    def forward(ctx, rows, gate_up_proj, down_proj, counts, memory):  # noqa: D102
        total, inter, largest = sum(counts), down_proj.shape[1], max(counts, default=0)
        gate_up = memory.new("gate_up", (total, 2 * inter), rows)
        out = memory.new("out", (rows.shape[0], down_proj.shape[2]), rows)
        rows_e, gate_up_e, out_e = _groups(rows, counts), _groups(gate_up, counts), _groups(out, counts)
        gate_up_w, down_w = gate_up_proj.unbind(0), down_proj.unbind(0)

        def work(first: int, stop: int) -> None:
            act, hidden = rows.new_empty(largest, inter), rows.new_empty(largest, inter)
            for e in range(first, stop):
                if n := counts[e]:
                    torch.mm(rows_e[e], gate_up_w[e], out=gate_up_e[e])
                    torch.ops.aten.silu.out(gate_up_e[e][:, :inter], out=act[:n])
                    torch.mul(act[:n], gate_up_e[e][:, inter:], out=hidden[:n])
                    torch.mm(hidden[:n], down_w[e], out=out_e[e])

        _over_experts(work, counts)
        out[total:] = 0
        ctx.save_for_backward(rows, gate_up_proj, down_proj, gate_up)
        ctx.counts, ctx.memory = counts, memory
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        rows, gate_up_proj, down_proj, gate_up = ctx.saved_tensors
        counts = ctx.counts
        total, inter, largest = gate_up.shape[0], down_proj.shape[1], max(counts, default=0)
        need_rows, need_gate_up, need_down = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous()
        memory = ctx.memory
        grad_rows = memory.new("grad_rows", tuple(rows.shape), grad_out) if need_rows else None
        grad_gate_up_proj = (
            memory.new("grad_gate_up_proj", tuple(gate_up_proj.shape), gate_up_proj) if need_gate_up else None
        )
        grad_down_proj = memory.new("grad_down_proj", tuple(down_proj.shape), down_proj) if need_down else None
        rows_e, gate_up_e, grad_out_e = _groups(rows, counts), _groups(gate_up, counts), _groups(grad_out, counts)
        grad_rows_e = _groups(grad_rows, counts) if need_rows else None
        gate_up_wt, down_wt = gate_up_proj.transpose(1, 2).unbind(0), down_proj.transpose(1, 2).unbind(0)
        grad_gate_up_w = grad_gate_up_proj.unbind(0) if need_gate_up else None
        grad_down_w = grad_down_proj.unbind(0) if need_down else None

        def work(first: int, stop: int) -> None:
            act, hidden = grad_out.new_empty(largest, inter), grad_out.new_empty(largest, inter)
            grad_hidden, grad_gate_up = grad_out.new_empty(largest, inter), grad_out.new_empty(largest, 2 * inter)
            for e in range(first, stop):
                n = counts[e]
                if not n:
                    for grad_w in (grad_gate_up_w, grad_down_w):
                        if grad_w is not None:
                            grad_w[e].zero_()
                    continue
                gate, up = gate_up_e[e][:, :inter], gate_up_e[e][:, inter:]
                torch.ops.aten.silu.out(gate, out=act[:n])
                torch.mm(grad_out_e[e], down_wt[e], out=grad_hidden[:n])
                if need_down:
                    torch.mul(act[:n], up, out=hidden[:n])  # the down GEMM's input, recomputed
                    torch.mm(hidden[:n].t(), grad_out_e[e], out=grad_down_w[e])
                # hidden = silu(gate) * up: d up = d hidden * silu(gate), d gate = silu'(gate) * d hidden * up.
                torch.mul(grad_hidden[:n], act[:n], out=grad_gate_up[:n, inter:])
                grad_hidden[:n].mul_(up)
                torch.ops.aten.silu_backward.grad_input(grad_hidden[:n], gate, grad_input=grad_gate_up[:n, :inter])
                if need_rows:
                    torch.mm(grad_gate_up[:n], gate_up_wt[e], out=grad_rows_e[e])
                if need_gate_up:
                    torch.mm(rows_e[e].t(), grad_gate_up[:n], out=grad_gate_up_w[e])

        _over_experts(work, counts)
        if grad_rows is not None:
            grad_rows[total:] = 0
        return grad_rows, grad_gate_up_proj, grad_down_proj, None, None


class Llama4TextExperts(nn.Module):
    """The routed experts, fused as in the checkpoints: `gate_up_proj` (E, H, 2I), `down_proj` (E, I, H)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.intermediate_size = config.intermediate_size
        self.hidden_size = config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.zeros(self.num_experts, self.hidden_size, 2 * self.intermediate_size))
        self.down_proj = nn.Parameter(torch.zeros(self.num_experts, self.intermediate_size, self.hidden_size))
        self.act_fn = ACT2FN[config.hidden_act]
        self.kept_memory = _KeptMemory()

    def _apply(self, fn, recurse=True):
        self.kept_memory.release()  # buffers of the old device or dtype
        return super()._apply(fn, recurse)

    def _hand_written_backward(self, rows: torch.Tensor, *weights: torch.Tensor) -> bool:
        # CPU only (CUDA keeps torch's grouped GEMM), SwiGLU only, and plain tensors only: DTensor or other
        # subclass weights (expert/tensor parallel plans, FSDP) keep the generic path that their dispatch handles.
        return (
            rows.device.type == "cpu"
            and isinstance(self.act_fn, (SiLUActivation, nn.SiLU))
            and all(type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" for t in (rows, *weights))
        )

    def forward(
        self, hidden_states: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        """(N, H) rows, (N, k) expert ids and output weights -> (N, H): sum_k weight * expert(row).

        transformers' experts contract, so its expert-parallel dispatch can call this with local expert ids;
        ids >= num_experts (another rank's experts) contribute nothing. Llama 4 scales the expert INPUT by the
        router score: `Llama4TextMoe` does that before calling here with unit weights."""
        num_rows, top_k = expert_indices.shape
        flat_experts = expert_indices.reshape(-1)  # (N*k,)
        order = torch.argsort(flat_experts, stable=True)  # (N*k,) assignments grouped by expert, foreign ids last
        tokens_per_expert = torch.bincount(flat_experts.clamp(max=self.num_experts), minlength=self.num_experts + 1)
        tokens_per_expert = tokens_per_expert[: self.num_experts]  # (E,)

        gate_up_proj, down_proj = self.gate_up_proj, self.down_proj
        if self._hand_written_backward(hidden_states, gate_up_proj, down_proj):
            # Rows of foreign experts come last and _RoutedSwiGLU leaves them (and their gradients) zero.
            expert_in = hidden_states[order // top_k].to(gate_up_proj.dtype)  # (N*k, H)
            counts = tokens_per_expert.tolist()  # a host copy, free on CPU
            expert_out = _RoutedSwiGLU.apply(expert_in, gate_up_proj, down_proj, counts, self.kept_memory)  # (N*k, H)
            # Llama4TextMoe passes unit weights (its scores went on the input): skip a multiply pass each way.
            if not expert_weights.requires_grad and bool((expert_weights == 1).all()):
                expert_weights = None
        else:
            # Foreign rows sit after the last group; the grouped GEMM leaves their outputs (and input gradients)
            # unwritten, so they are zeroed on both sides. A mask, not a slice: no host sync per layer.
            foreign = (flat_experts[order] >= self.num_experts).unsqueeze(-1)  # (N*k, 1)
            expert_in = hidden_states[order // top_k].masked_fill(foreign, 0.0)  # (N*k, H)
            gate, up = grouped_matmul(expert_in, gate_up_proj, tokens_per_expert).chunk(2, dim=-1)  # (N*k, I) x2
            expert_out = grouped_matmul(up * self.act_fn(gate), down_proj, tokens_per_expert)  # (N*k, H)
            expert_out = expert_out.masked_fill(foreign, 0.0)
        if expert_weights is not None:
            expert_out = expert_out * expert_weights.reshape(-1, 1)[order].to(expert_out.dtype)

        # Back to (row, k) order and sum over k: deterministic, unlike index_add_ on CUDA.
        unsorted = torch.empty_like(expert_out).index_copy_(0, order, expert_out)
        if top_k == 1:
            return unsorted  # (N, H); summing over one choice would only copy
        return unsorted.view(num_rows, top_k, self.hidden_size).sum(dim=1)  # (N, H)


class Llama4TextMLP(nn.Module):
    """SwiGLU feed-forward: the shared expert, and the dense layers' MLP (`intermediate_size_mlp`)."""

    def __init__(self, config, intermediate_size: int | None = None) -> None:
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.activation_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation_fn(self.gate_proj(x)) * self.up_proj(x))


class Llama4Router(nn.Module):
    """Router projection, (T, H) -> (T, E) logits; top-k selection happens in the MoE block.

    Deliberately not an `nn.Linear` (the built-in's is): PEFT's "all-linear" and the quantisation
    backends would otherwise adapt or quantise the router, which must stay exact. Same `weight` (E, H)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.weight)


def router_load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Load-balancing loss for sigmoid top-k routers, averaged over MoE layers.

    DeepSeek-V3 (arXiv:2412.19437, eqs. 17-20), which also routes with sigmoid affinities:
    `L = sum_e f_e * P_e`, with `f_e = E / (k T) * #tokens routed to e` (no gradient) and
    `P_e = mean_t s_te / sum_j s_tj`, the normalised sigmoid score. Equals 1 when perfectly balanced.
    Computed over the whole batch (not per sequence); `token_mask` (T,) drops padding.
    """
    losses = []
    for logits in router_logits:  # (T, E) per MoE layer
        logits = logits.float()
        if token_mask is not None:
            logits = logits[token_mask]
        num_tokens, num_experts = logits.shape
        scores = torch.sigmoid(logits)
        probability = (scores / scores.sum(-1, keepdim=True)).mean(0)  # (E,)
        routed = torch.zeros_like(scores).scatter_(1, logits.topk(top_k, dim=-1).indices, 1.0)
        fraction = routed.sum(0) * num_experts / (top_k * max(num_tokens, 1))  # (E,)
        losses.append((fraction * probability).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits: tuple[torch.Tensor, ...], token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, arXiv:2202.08906, eq. 5): mean of logsumexp(logits)^2."""
    losses = []
    for logits in router_logits:
        logits = logits.float() if token_mask is None else logits.float()[token_mask]
        losses.append(torch.logsumexp(logits, dim=-1).square().mean())
    return torch.stack(losses).mean()


def tokens_per_expert(
    router_logits: tuple[torch.Tensor, ...], top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(num MoE layers, E) counts of token assignments, for logging expert load."""
    counts = []
    for logits in router_logits:
        logits = logits if token_mask is None else logits[token_mask]
        indices = logits.topk(top_k, dim=-1).indices.reshape(-1)
        counts.append(torch.bincount(indices, minlength=logits.shape[-1]))
    return torch.stack(counts)


class Llama4TextMoe(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.hidden_dim = config.hidden_size
        self.num_experts = config.num_local_experts
        self.experts = Llama4TextExperts(config)
        self.router = Llama4Router(config)
        self.shared_expert = Llama4TextMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., H) -> ((T, H) output, (T, E) router logits) with T the number of tokens."""
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)  # (T, H)
        router_logits = self.router(hidden_states)  # (T, E)
        top_logits, expert_indices = torch.topk(router_logits, self.top_k, dim=-1)  # (T, k)
        expert_scores = torch.sigmoid(top_logits.float()).to(hidden_states.dtype)  # (T, k), not normalised
        # Score on the input, as the checkpoints were trained (moving it to the output changes the result):
        # one pre-scaled row per (token, expert) pair, each run by its one expert with unit weight.
        routed_in = hidden_states.repeat_interleave(self.top_k, dim=0) * expert_scores.reshape(-1, 1)  # (T*k, H)
        unit = torch.ones_like(expert_scores).reshape(-1, 1)
        routed = self.experts(routed_in, expert_indices.reshape(-1, 1), unit)  # (T*k, H)
        if self.top_k > 1:
            routed = routed.view(-1, self.top_k, self.hidden_dim).sum(dim=1)  # (T, H)
        return self.shared_expert(hidden_states) + routed, router_logits
