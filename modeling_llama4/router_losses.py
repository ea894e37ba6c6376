"""Auxiliary router losses and load statistics for Llama 4's sigmoid top-k routers.

transformers' built-in Llama 4 never computes a load-balancing loss (`router_aux_loss_coef` is unused); these take
the per-layer (T, E) router logits that the model returns with `output_router_logits=True`.
"""

from __future__ import annotations

import torch


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
