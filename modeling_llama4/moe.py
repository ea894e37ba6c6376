"""Llama 4 mixture of experts, computed sparsely.

transformers' built-in block multiplies every token by every expert (`hidden_states.repeat(E, 1)`),
so Scout pays 16x and Maverick 128x the expert FLOPs it needs. Here each token goes only to its top-k
experts: assignments are sorted by expert and two grouped GEMMs run the experts over their own rows.
Numerics are the built-in's: sigmoid of the raw top-k router logits scales the expert INPUT, the
shared expert is added unweighted, and the fused weights keep their layout
(`gate_up_proj` (E, H, 2I) used as `x @ W`, `down_proj` (E, I, H)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

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
        # Foreign rows sit after the last group; the grouped GEMM leaves their outputs (and input gradients)
        # unwritten, so they are zeroed on both sides. A mask, not a slice: no host sync per layer.
        foreign = (flat_experts[order] >= self.num_experts).unsqueeze(-1)  # (N*k, 1)

        expert_in = hidden_states[order // top_k].masked_fill(foreign, 0.0)  # (N*k, H)
        gate, up = grouped_matmul(expert_in, self.gate_up_proj, tokens_per_expert).chunk(2, dim=-1)  # (N*k, I) x2
        expert_out = grouped_matmul(up * self.act_fn(gate), self.down_proj, tokens_per_expert)  # (N*k, H)
        expert_out = expert_out.masked_fill(foreign, 0.0) * expert_weights.reshape(-1, 1)[order].to(expert_out.dtype)

        # Back to (row, k) order and sum over k: deterministic, unlike index_add_ on CUDA.
        unsorted = torch.empty_like(expert_out).index_copy_(0, order, expert_out)
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
        routed = routed.view(-1, self.top_k, self.hidden_dim).sum(dim=1)  # (T, H)
        return self.shared_expert(hidden_states) + routed, router_logits
