"""GPTQ for Llama 4's int4 experts that keeps the model's routing semantics (score on the INPUT).

GPTQ (Frantar et al. 2022, arXiv:2210.17323) rounds a weight one input column at a time and spreads each
column's rounding error over the columns not yet rounded, weighted by the inverse Hessian H = sum x x^T of the
layer's calibration inputs. For a routed expert the inputs are what the model really feeds it: the rows of the
tokens routed to that expert, already multiplied by their sigmoid router score (Llama 4 scales the expert input;
llm-compressor and GPTQModel move the score to the output to avoid NaNs, which calibrates a different model).
The NaNs come from experts that get few or no calibration tokens (singular H); here H gets a damping floor and
an expert with fewer than `min_expert_tokens` rows keeps round-to-nearest, so no score is moved and nothing is
NaN. Layers are done in order, each calibrated on the outputs of the layers already quantized (as in GPTQ).
The int4 format is the RTN one (`int4.py`): per group, scale = absmax / 8 of the error-updated weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .int4 import Int4Config, Int4Linear, Int4TextExperts, Int4TextMLP, pack_int4, quantize_int4, quantize_model
from .moe import Llama4TextExperts, Llama4TextMLP


def gptq_quantize_weight(
    weight: torch.Tensor, hessian: torch.Tensor, group_size: int, damp: float = 0.01, block_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of one [N, K] weight with the [K, K] Hessian of its inputs -> (int8 values [N, K], scales [N, K/g]).

    Columns whose input never fired (zero diagonal) are rounded as they are; the damping is `damp` times the mean
    diagonal, floored at 1e-6 so an all-zero Hessian gives round-to-nearest instead of a failed Cholesky."""
    rows, cols = weight.shape
    block_size = max(group_size, block_size // group_size * group_size)  # groups never straddle blocks
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += torch.eye(cols, dtype=h.dtype) * max(damp * torch.diag(h).mean().item(), 1e-6)
    try:
        h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:  # numerically singular even after damping: round-to-nearest
        return quantize_int4(weight, group_size)
    values = torch.zeros(rows, cols, dtype=torch.int8)
    scales = torch.zeros(rows, cols // group_size, dtype=torch.float32)
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        block, errors, h_block = (
            w[:, start:stop].clone(),
            torch.zeros(rows, stop - start, dtype=w.dtype),
            h_inv[start:stop, start:stop],
        )
        for i in range(stop - start):
            col = start + i
            if col % group_size == 0:  # the scale of this group, from the weights as GPTQ has updated them
                scale = block[:, i : i + group_size].abs().amax(dim=1).clamp(min=1e-6).to(torch.float32) / 8
                scales[:, col // group_size] = scale
            scale = scales[:, col // group_size].to(w.dtype)
            q = torch.round(block[:, i] / scale).clamp_(-8, 7)
            values[:, col] = q.to(torch.int8)
            error = (block[:, i] - q * scale) / h_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * h_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, stop:] -= errors @ h_inv[start:stop, stop:]
    return values, scales


class _StopForward(Exception):
    pass


class _LayerStats:
    """Hessians of one decoder layer's quantized weights from the calibration forwards."""

    def __init__(self) -> None:
        self.hessians: dict[tuple, torch.Tensor] = {}
        self.tokens: dict[tuple, int] = {}

    def add(self, key: tuple, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64)
        if key not in self.hessians:
            self.hessians[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
            self.tokens[key] = 0
        self.hessians[key] += x.t() @ x
        self.tokens[key] += x.shape[0]


def _experts_hook(stats: _LayerStats, name: str):
    def hook(module: Llama4TextExperts, args):
        rows, expert_indices = args[0], args[1]  # rows already scaled by their router scores
        flat = expert_indices.reshape(-1)
        top_k = expert_indices.shape[1]
        for expert in flat.unique().tolist():
            if expert >= module.num_experts:
                continue
            x = rows[(flat == expert).nonzero().squeeze(1) // top_k].float()  # (n, H)
            stats.add((name, "gate_up_proj", expert), x)
            gate, up = (x @ module.gate_up_proj[expert].float()).chunk(2, dim=-1)
            stats.add((name, "down_proj", expert), module.act_fn(gate) * up)  # (n, I): the down GEMM's input

    return hook


def _mlp_hook(stats: _LayerStats, name: str):
    def hook(module: Llama4TextMLP, args):
        x = args[0].float()
        stats.add((name, "gate_up"), x)
        stats.add((name, "down_proj"), module.activation_fn(module.gate_proj(x)) * module.up_proj(x))

    return hook


@torch.no_grad()
def gptq_quantize(
    model: nn.Module,
    calibration: Iterable[torch.Tensor],
    config: Int4Config | None = None,
    damp: float = 0.01,
    min_expert_tokens: int = 16,
) -> dict[str, int]:
    """Quantize a float Llama 4 model in place with GPTQ (calibration: batches of input_ids), then swap in the
    int4 modules as `quantize_model` does. Returns {"gptq": weights done by GPTQ, "rtn_fallback": experts kept at
    round-to-nearest for having fewer than `min_expert_tokens` calibration rows}."""
    config = config or Int4Config()
    batches = list(calibration)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    results: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    counts = {"gptq": 0, "rtn_fallback": 0}
    was_training = model.training
    model.eval()
    for index, layer in enumerate(decoder.layers):
        stats, handles = _LayerStats(), []
        for name, module in layer.named_modules():
            if isinstance(module, Llama4TextExperts):
                handles.append(module.register_forward_pre_hook(_experts_hook(stats, name)))
            elif isinstance(module, Llama4TextMLP):
                handles.append(module.register_forward_pre_hook(_mlp_hook(stats, name)))

        def stop(*_):
            raise _StopForward

        handles.append(layer.register_forward_hook(stop))
        try:
            for input_ids in batches:
                try:
                    model(input_ids=input_ids)
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        # quantize this layer; later layers calibrate on its quantized outputs
        for name, module in layer.named_modules():
            if isinstance(module, Llama4TextExperts):
                for param in ("gate_up_proj", "down_proj"):
                    fused = getattr(module, param)  # (E, K, N) used as x @ W
                    for expert in range(module.num_experts):
                        weight = fused[expert].t()  # [N, K]
                        key = (name, param, expert)
                        if stats.tokens.get(key, 0) < min_expert_tokens:
                            values, scales = quantize_int4(weight, config.group_size)
                            counts["rtn_fallback"] += param == "gate_up_proj"
                        else:
                            values, scales = gptq_quantize_weight(weight, stats.hessians[key], config.group_size, damp)
                            counts["gptq"] += 1
                        results[(index, name, param, expert)] = (values, scales)
                        dequantized = values.float() * scales.repeat_interleave(config.group_size, dim=-1)
                        fused.data[expert] = dequantized.t().to(fused.dtype)
            elif isinstance(module, Llama4TextMLP):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    linear = getattr(module, proj)
                    hessian = stats.hessians.get((name, "down_proj" if proj == "down_proj" else "gate_up"))
                    if hessian is None:
                        values, scales = quantize_int4(linear.weight, config.group_size)
                    else:
                        values, scales = gptq_quantize_weight(linear.weight, hessian, config.group_size, damp)
                        counts["gptq"] += 1
                    results[(index, name, proj, None)] = (values, scales)
                    dequantized = values.float() * scales.repeat_interleave(config.group_size, dim=-1)
                    linear.weight.data = dequantized.to(linear.weight.dtype)
    quantize_model(model, config)
    for (index, name, param, expert), (values, scales) in results.items():
        module = decoder.layers[index].get_submodule(name)
        if isinstance(module, Int4TextExperts):
            getattr(module, param).data[expert] = pack_int4(values)
            getattr(module, f"{param}_scale").data[expert] = scales
            module.kernel_cache.clear()
        elif isinstance(module, Int4TextMLP):
            linear: Int4Linear = getattr(module, param)
            linear.weight.data, linear.weight_scale.data = pack_int4(values), scales
            linear.kernel_cache.clear()
    model.train(was_training)
    return counts
