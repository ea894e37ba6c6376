"""Llama 4 mixture of experts, computed sparsely.

transformers' built-in block multiplies every token by every expert (`hidden_states.repeat(E, 1)`),
so Scout pays 16x and Maverick 128x the expert FLOPs it needs. Here each token goes only to its top-k
experts. Numerics are the built-in's: sigmoid of the raw top-k router logits scales the expert INPUT, the
shared expert is added unweighted, and the fused weights keep their layout
(`gate_up_proj` (E, H, 2I) used as `x @ W`, `down_proj` (E, I, H)).

The routed experts run one of four ways (`Llama4TextExperts.forward`), all with the same result:
- a handful of assignments on CUDA or in a traced graph (decode steps): each row's expert weights are gathered
  (`gate_up_proj[idx]`) and multiplied by a batched GEMM. Static shapes, no sort and no host sync, so it compiles
  in one graph (traced off CUDA, larger calls gather up to one row per expert and run every expert beyond that);
- small inference calls on small experts (the main job's model decoding): every expert on every row, as the
  built-in does, where that wastes fewer FLOPs than sorting costs in dispatch;
- on CPU (Linux, torch's MKL): rows sorted by expert through `cpu_experts.routed_swiglu`, per-expert GEMMs with a
  hand-written backward, split across torch's threads by expert;
- elsewhere (CUDA, expert parallelism, other platforms): rows sorted by expert and torch's grouped GEMM
  (`grouped_matmul`) under autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN, SiLUActivation

from .cpu_experts import KeptMemory, available, routed_swiglu
from .router_losses import router_load_balancing_loss, router_z_loss, tokens_per_expert

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# (device type, dtype) pairs on which the grouped GEMM kernel refused its inputs; those use the expert loop.
_GROUPED_MM_UNSUPPORTED: set[tuple[str, torch.dtype]] = set()


class Llama4Router(nn.Module):
    """Router projection, (T, H) -> (T, E) logits; top-k selection happens in the MoE block.

    Deliberately not an `nn.Linear` (the built-in's is): PEFT's "all-linear" and the quantisation
    backends would otherwise adapt or quantise the router, which must stay exact. Same `weight` (E, H)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.weight)


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


def _is_16_byte_aligned(tensor: torch.Tensor) -> bool:
    # The grouped GEMM kernels need 16-byte aligned base pointers and strides (memory-mapped
    # safetensors weights or odd tiny widths may not be).
    size = tensor.element_size()
    strides_ok = all(s * size % 16 == 0 for s, d in zip(tensor.stride(), tensor.shape) if s != 1 and d != 1)
    return tensor.data_ptr() % 16 == 0 and strides_ok


def _is_unsupported_kernel(error: BaseException) -> bool:
    """Whether the grouped GEMM refused these inputs (no kernel for the backend, or its dtype/stride checks), as
    opposed to a failure that must reach the caller and leave the kernel enabled: out of memory (CUDA's
    `OutOfMemoryError`; the CPU allocator raises a plain RuntimeError) or a device fault."""
    message = str(error).lower()
    if isinstance(error, torch.OutOfMemoryError) or type(error).__name__ == "AcceleratorError":
        return False
    return not ("out of memory" in message or "can't allocate memory" in message)


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
        # traced tensors have no address; parameters and fresh activations are aligned
        and (torch.compiler.is_compiling() or (_is_16_byte_aligned(rows) and _is_16_byte_aligned(weight)))
    ):
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        try:
            return _GROUPED_MM(rows, weight, offs=offsets)
        except (RuntimeError, NotImplementedError) as error:
            if not _is_unsupported_kernel(error):
                raise  # out of memory or a device fault: the caller's to handle, not a missing kernel
            _GROUPED_MM_UNSUPPORTED.add(key)
    counts = tokens_per_expert.tolist()
    groups = rows.split([*counts, rows.shape[0] - sum(counts)])
    # unbind once: indexing weight[e] per expert would make autograd allocate a full (E, in, out) gradient per expert
    expert_weights = weight.unbind(0)
    outputs = [expert_rows @ expert_weights[e] for e, expert_rows in enumerate(groups[:-1]) if expert_rows.shape[0]]
    outputs.append(rows.new_zeros(groups[-1].shape[0], weight.shape[-1]))
    return torch.cat(outputs)


class Llama4TextExperts(nn.Module):
    """The routed experts, fused as in the checkpoints: `gate_up_proj` (E, H, 2I), `down_proj` (E, I, H)."""

    # Off an eager CPU, up to this many (row, expert) assignments gather each row's expert weights into one
    # batched GEMM instead of sorting rows by expert: the routed experts' bytes, no sort, no host sync.
    gather_max_assignments = 2
    # Without autograd, running every expert on every row is cheaper than sorting while the wasted expert FLOPs
    # stay under about what sorting, counting and a GEMM per expert cost in dispatch (~100 us on a CPU).
    dense_max_wasted_flops = 5e6

    def __init__(self, config) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.intermediate_size = config.intermediate_size
        self.hidden_size = config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.zeros(self.num_experts, self.hidden_size, 2 * self.intermediate_size))
        self.down_proj = nn.Parameter(torch.zeros(self.num_experts, self.intermediate_size, self.hidden_size))
        self.act_fn = ACT2FN[config.hidden_act]
        self.kept_memory = KeptMemory()
        # False sends CPU tensors down the generic grouped-GEMM path too (tests and benchmarks compare the two).
        self.use_cpu_kernel = True

    def _apply(self, fn, recurse=True):
        self.kept_memory.release()  # buffers of the old device or dtype
        return super()._apply(fn, recurse)

    def _runs_cpu_kernel(self, rows: torch.Tensor, *weights: torch.Tensor) -> bool:
        # CPU only (CUDA keeps torch's grouped GEMM), SwiGLU only, and plain tensors only: DTensor or other
        # subclass weights (expert/tensor parallel plans, FSDP) keep the generic path that their dispatch handles.
        return (
            self.use_cpu_kernel
            and rows.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and isinstance(self.act_fn, (SiLUActivation, nn.SiLU))
            and all(type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" for t in (rows, *weights))
            and available()
        )

    def _path(self, rows: torch.Tensor, num_assignments: int) -> str:
        """Which way the experts run: "gather", "dense" (every expert on every row) or "sorted" (rows grouped by
        expert). benchmarks/bench_generate.py measures the choices at decode sizes."""
        eager_cpu = _eager_cpu(rows)
        if not eager_cpu and num_assignments <= self.gather_max_assignments:
            # On CUDA and in traced graphs the sorted path's argsort and counts are kernels of their own; on an
            # eager CPU they cost less than copying each row's expert weights, so the CPU sorts even one row.
            return "gather"
        flops_per_row = 2 * self.hidden_size * 3 * self.intermediate_size
        wasted = (self.num_experts - 1) * num_assignments * flops_per_row
        inference = not (torch.is_grad_enabled() and (rows.requires_grad or self.gate_up_proj.requires_grad))
        if inference and wasted <= self.dense_max_wasted_flops:
            return "dense"  # small experts, few rows (the main job's model decoding)
        traced_grouped_mm = rows.device.type == "cuda" and self.gate_up_proj.dtype == torch.bfloat16
        if torch.compiler.is_compiling() and not traced_grouped_mm:
            # Traced graphs need static shapes, and torch's grouped GEMM traces only for CUDA bf16: up to one row
            # per expert gather, beyond that run every expert on every row (the built-in's cost, no worse).
            return "dense" if num_assignments > self.num_experts else "gather"
        return "sorted"

    def _gathered(self, rows: torch.Tensor, flat_experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(M, H) rows, (M,) expert ids, (M,) output weights -> (M, H), each row through its own expert times its
        weight; foreign ids give 0. Reads one expert's weights per row (the routed experts' bytes), no grouping."""
        weights = weights * (flat_experts < self.num_experts)  # (M,), zero for another rank's experts
        experts = flat_experts.clamp(max=self.num_experts - 1)
        rows = rows.to(self.gate_up_proj.dtype).unsqueeze(1)  # (M, 1, H)
        gate, up = torch.bmm(rows, self.gate_up_proj[experts]).chunk(2, dim=-1)  # (M, 1, I) x2
        out = torch.bmm(up * self.act_fn(gate), self.down_proj[experts]).squeeze(1)  # (M, H)
        return out * weights.unsqueeze(-1).to(out.dtype)

    def _dense(self, rows: torch.Tensor, flat_experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(M, H) rows, (M,) expert ids, (M,) output weights -> (M, H): every expert on every row (the built-in's
        computation), summed with each row's weight on its own expert and zero elsewhere (foreign ids: all zero)."""
        rows = rows.to(self.gate_up_proj.dtype).expand(self.num_experts, *rows.shape)  # (E, M, H)
        gate, up = torch.bmm(rows, self.gate_up_proj).chunk(2, dim=-1)  # (E, M, I) x2
        out = torch.bmm(up * self.act_fn(gate), self.down_proj)  # (E, M, H)
        expert_ids = torch.arange(self.num_experts, device=flat_experts.device).unsqueeze(-1)  # (E, 1)
        picked = (flat_experts == expert_ids) * weights  # (E, M): the row's weight on its expert
        return (out * picked.unsqueeze(-1).to(out.dtype)).sum(0)  # (M, H); the other terms are exact zeros

    def _sorted(self, rows: torch.Tensor, flat_experts: torch.Tensor) -> torch.Tensor:
        """(M, H) rows, (M,) expert ids -> (M, H) in the same order: rows grouped by expert, each group by its expert's
        weights (a GEMM per expert instead of a GEMV per row); foreign ids give 0."""
        order = torch.argsort(flat_experts, stable=True)  # (M,) assignments grouped by expert, foreign ids last
        # Counts by comparison, not bincount: static shape (E,), whatever the ids.
        expert_ids = torch.arange(self.num_experts, device=flat_experts.device)
        tokens_per_expert = (flat_experts.unsqueeze(-1) == expert_ids).sum(0)  # (E,)
        gate_up_proj, down_proj = self.gate_up_proj, self.down_proj
        if self._runs_cpu_kernel(rows, gate_up_proj, down_proj):
            # Rows of foreign experts come last and the kernel leaves them (and their gradients) zero.
            expert_in = rows[order].to(gate_up_proj.dtype)  # (M, H)
            counts = tokens_per_expert.tolist()  # a host copy, free on CPU
            expert_out = routed_swiglu(expert_in, gate_up_proj, down_proj, counts, self.kept_memory)
        else:
            # Foreign rows sit after the last group; the grouped GEMM leaves their outputs (and input gradients)
            # unwritten, so they are zeroed on both sides. A mask, not a slice: no host sync per layer.
            foreign = (flat_experts[order] >= self.num_experts).unsqueeze(-1)  # (M, 1)
            expert_in = rows[order].masked_fill(foreign, 0.0)  # (M, H)
            gate, up = grouped_matmul(expert_in, gate_up_proj, tokens_per_expert).chunk(2, dim=-1)  # (M, I) x2
            expert_out = grouped_matmul(up * self.act_fn(gate), down_proj, tokens_per_expert)  # (M, H)
            expert_out = expert_out.masked_fill(foreign, 0.0)
        return torch.empty_like(expert_out).index_copy_(0, order, expert_out)  # back to the input order

    def forward(
        self, hidden_states: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        """(N, H) rows, (N, k) expert ids and output weights -> (N, H): sum_k weight * expert(row).

        transformers' experts contract, so its expert-parallel dispatch can call this with local expert ids;
        ids >= num_experts (another rank's experts) contribute nothing. Llama 4 scales the expert INPUT by the
        router score: `Llama4TextMoe` does that before calling here with unit weights."""
        num_rows, top_k = expert_indices.shape
        flat_experts = expert_indices.reshape(-1)  # (N*k,), row-major: assignment i is row i // k
        rows = hidden_states.repeat_interleave(top_k, dim=0) if top_k > 1 else hidden_states  # (N*k, H)
        flat_weights = expert_weights.reshape(-1)  # (N*k,)
        path = self._path(rows, flat_experts.shape[0])
        if path == "gather":
            expert_out = self._gathered(rows, flat_experts, flat_weights)  # (N*k, H)
        elif path == "dense":
            expert_out = self._dense(rows, flat_experts, flat_weights)  # (N*k, H)
        else:
            expert_out = self._sorted(rows, flat_experts)  # (N*k, H)
            # Llama4TextMoe passes unit weights (its scores went on the input): skip a multiply pass each way.
            if expert_weights.requires_grad or not _is_unit(expert_weights):
                expert_out = expert_out * flat_weights.unsqueeze(-1).to(expert_out.dtype)
        if top_k == 1:
            return expert_out  # (N, H); summing over one choice would only copy
        return expert_out.view(num_rows, top_k, self.hidden_size).sum(dim=1)  # (N, H)


def _eager_cpu(rows: torch.Tensor) -> bool:
    return rows.device.type == "cpu" and not torch.compiler.is_compiling()


def _is_unit(weights: torch.Tensor) -> bool:
    # A host check, so only where it is free: CPU tensors outside a traced graph (elsewhere multiply by 1).
    return weights.device.type == "cpu" and not torch.compiler.is_compiling() and bool((weights == 1).all())


class Llama4TextMoe(nn.Module):
    """Router -> top-k routed experts on score-scaled inputs, plus the always-on shared expert."""

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
        repeated = hidden_states.repeat_interleave(self.top_k, dim=0) if self.top_k > 1 else hidden_states
        routed_in = repeated * expert_scores.reshape(-1, 1)  # (T*k, H)
        unit = torch.ones_like(expert_scores).reshape(-1, 1)
        routed = self.experts(routed_in, expert_indices.reshape(-1, 1), unit)  # (T*k, H)
        if self.top_k > 1:
            routed = routed.view(-1, self.top_k, self.hidden_dim).sum(dim=1)  # (T, H)
        return self.shared_expert(hidden_states) + routed, router_logits


__all__ = [
    "Llama4Router",
    "Llama4TextExperts",
    "Llama4TextMLP",
    "Llama4TextMoe",
    "grouped_matmul",
    "router_load_balancing_loss",
    "router_z_loss",
    "tokens_per_expert",
]
