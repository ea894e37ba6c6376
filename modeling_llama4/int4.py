"""Weight-only int4 for Llama 4's experts: Meta's `int4_mixed` format inside transformers.

What is quantized: the routed experts (fused `gate_up_proj` (E, H, 2I), `down_proj` (E, I, H)), the shared
expert and the dense layers' MLP. Router, norms, attention, embeddings and `lm_head` keep the model dtype.

Format (Meta's llama-models `int4_row_quantize` + `pack_int4`): each weight is seen as the [N, K] matrix of
`y = x @ W.T` (K = input features; for the fused `gate_up_proj` used as `x @ W` that is `W_e.T`, K = H; for
`down_proj`, K = I). Per group of `group_size` consecutive input features, `scale = absmax.clamp(min=1e-6) / 8`
(float32) and `q = round(w / scale).clamp(-8, 7)`, torch's round (half to even). Two values share a byte,
the even column in the low nibble (two's complement), stored int8 exactly as `pack_int4` writes them:
experts `gate_up_proj` (E, 2I, H/2) int8 + `gate_up_proj_scale` (E, 2I, H/g) float32, and likewise for
`down_proj`; Linears `weight` (N, K/2) int8 + `weight_scale` (N, K/g). Meta stores the scales transposed
([K/g, N]); the values are the same.

Mechanism: a registered `HfQuantizer` and `QuantizationConfigMixin` (method "llama4_int4"), because that is the
one route that serves all three users at once: `from_pretrained(..., quantization_config=Int4Config())` quantizes
each tensor as transformers' loader reads it (peak memory: the int4 model plus one bf16 tensor), a saved model
writes `quantization_config` into config.json, and `from_pretrained` of that directory (or of a Hub repo through
remote code, since this file travels with the modeling files and registers itself on import) rebuilds the
int4 modules before the packed weights load. A plain config field would need our own loading loop, and
transformers would still reject a `quantization_config` it cannot resolve.
"""

from __future__ import annotations

import json
import numbers
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .moe import Llama4TextExperts, Llama4TextMLP

QUANT_METHOD = "llama4_int4"
_KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4pack GEMMs accept


# ---------------------------------------------------------------------------------------------------------------
# Format: quantize, pack, unpack, dequantize
# ---------------------------------------------------------------------------------------------------------------


def quantize_int4(weight: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] weight -> ([..., N, K] int8 values in [-8, 7], [..., N, K / group_size] float32 scales).

    Meta's `int4_row_quantize`: per group of `group_size` input features, scale = absmax.clamp(1e-6) / 8."""
    *lead, rows, cols = weight.shape
    check_group_size(cols, group_size)
    groups = weight.to(torch.float32).reshape(*lead, rows, cols // group_size, group_size)
    scales = groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-6) / 8
    values = groups.div(scales).round().clamp_(-8, 7).to(torch.int8)
    return values.reshape(*lead, rows, cols), scales.squeeze(-1)


def check_group_size(in_features: int, group_size: int, what: str = "a weight") -> None:
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"Int4Config(group_size={group_size}): the group size must be a positive even number.")
    if in_features % group_size:
        divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
        raise ValueError(
            f"Int4Config(group_size={group_size}) does not divide the {in_features} input features of {what}. "
            f"Pick a group size that divides {in_features} (e.g. {divisors or 'a divisor of it'})."
        )


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[..., K] int8 values in [-8, 7] -> [..., K / 2] int8: even column in the low nibble (Meta's `pack_int4`)."""
    low, high = values[..., ::2], values[..., 1::2]
    return torch.bitwise_or(torch.bitwise_and(low, 0xF), torch.bitwise_left_shift(high, 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., K / 2] int8 -> [..., K] int8 values in [-8, 7] (sign-extending shifts)."""
    low = torch.bitwise_right_shift(torch.bitwise_left_shift(packed, 4), 4)
    high = torch.bitwise_right_shift(packed, 4)
    return torch.stack((low, high), dim=-1).flatten(-2)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., N, K/2] packed + [..., N, K/g] scales -> [..., N, K] weight in `dtype` (computed in float32)."""
    *lead, rows, half = packed.shape
    groups = scales.shape[-1]
    values = unpack_int4(packed).view(*lead, rows, groups, 2 * half // groups).to(torch.float32)
    return (values * scales.to(torch.float32).unsqueeze(-1)).view(*lead, rows, 2 * half).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Kernels: y = x @ W.T for one [N, K] int4 matrix
# ---------------------------------------------------------------------------------------------------------------


# torch's int4 GEMMs are decode kernels: with bf16 activations they beat dequantize-then-GEMM by far for a few
# rows (CPU, 2048x512 weight, 1 row: 0.06 ms against 17 ms) and lose past a few hundred rows (1024 rows: 105 ms
# against 25 ms); their float32 / float16 CPU paths are scalar (1 row: 3.5 ms, 1024 rows: 5.5 s). So: the kernel
# for bf16 and up to this many rows, else the one expert's weight dequantized for that call (exact in float32).
KERNEL_MAX_ROWS = 256


def _kernel_fits(out_features: int, in_features: int, group_size: int, x: torch.Tensor) -> bool:
    if x.dtype != torch.bfloat16 or group_size not in _KERNEL_GROUP_SIZES or not 0 < x.shape[0] <= KERNEL_MAX_ROWS:
        return False
    if x.device.type == "cpu":
        return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and out_features % 16 == 0
    if x.device.type == "cuda":  # tinygemm: N % 8, K % (innerKTiles * 16)
        return out_features % 8 == 0 and in_features % 128 == 0
    return False


def _to_kernel_layout(
    packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our [N, K/2] int8 + [N, K/g] scales -> torch's int4pack weight + [K/g, N, 2] scales-and-zeros.

    torch's int4pack kernels dequantize `(u - 8) * scale + zero` with u in [0, 15] (tinygemm's convention), so the
    symmetric value q = u - 8 is exact with zero = 0: the kernel multiplies the same q by the same scale."""
    unsigned = unpack_int4(packed).to(torch.int32) + 8  # (N, K) in [0, 15]
    scales_and_zeros = torch.stack((scales.t(), torch.zeros_like(scales.t())), dim=-1).to(dtype).contiguous()
    if packed.device.type == "cpu":
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 2)
    else:  # CUDA's converter takes uint8 [N, K/2] with the even column in the HIGH nibble
        pairs = (unsigned[:, ::2] << 4 | unsigned[:, 1::2]).to(torch.uint8)
        weight = torch.ops.aten._convert_weight_to_int4pack(pairs, 8 if unsigned.shape[1] % 256 == 0 else 4)
    return weight, scales_and_zeros


def _drop_kernels(cache: _KernelCache) -> None:
    if cache.resident_group_size is not None:
        raise RuntimeError("An int4 model made kernel-resident cannot be moved or cast; reload it instead.")
    cache.clear()


class _Int4Matmul(torch.autograd.Function):
    """x (M, K) @ W.T for an int4 W (N, K) through torch's int4 GEMM; backward gives x its gradient only (the
    int4 weight is frozen: QLoRA trains adapters), computed from W dequantized for that expert alone."""

    @staticmethod
    def forward(ctx, x, kernel_weight, scales_and_zeros, group_size, packed, scales):  # noqa: D102
        ctx.save_for_backward(packed, scales)
        return _kernel_mm(x, kernel_weight, group_size, scales_and_zeros)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        packed, scales = ctx.saved_tensors
        grad_x = grad_out @ dequantize_int4(packed, scales, grad_out.dtype)
        return grad_x, None, None, None, None, None


class _DequantizedMatmul(torch.autograd.Function):
    """x @ W.T with W dequantized for this call only; the fallback where torch's int4 GEMM does not apply."""

    @staticmethod
    def forward(ctx, x, packed, scales):  # noqa: D102
        ctx.save_for_backward(packed, scales)
        return x @ dequantize_int4(packed, scales, x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        packed, scales = ctx.saved_tensors
        return grad_out @ dequantize_int4(packed, scales, grad_out.dtype), None, None


class _KernelCache:
    """Each int4 matrix in torch's kernel layout, converted on first use and kept (per dtype and device).

    The checkpoint layout stays Meta's; the kernel layout is an internal blocked one, so it is derived, not
    stored. Costs one more int4 copy (the scales twice) of the experts that have run; moving or casting the
    module drops it."""

    def __init__(self) -> None:
        self.entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.resident_group_size: int | None = None  # set once the checkpoint layout is released

    def get(self, key: tuple, packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        key = (*key, dtype, packed.device)
        if key not in self.entries:
            self.entries[key] = _to_kernel_layout(packed, scales, dtype)
        return self.entries[key]

    def clear(self) -> None:
        self.entries.clear()

    def __getstate__(self) -> dict:
        if self.resident_group_size is not None:
            raise RuntimeError("An int4 model made kernel-resident cannot be copied or pickled; reload it instead.")
        return {"entries": {}, "resident_group_size": None}


def _kernel_mm(x: torch.Tensor, weight: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group_size, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm(x, weight, group_size, scales_and_zeros)


def int4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor | None,
    scales: torch.Tensor | None,
    cache: _KernelCache | None = None,
    key: tuple = (),
) -> torch.Tensor:
    """x (M, K) @ W.T -> (M, N) for W given as packed (N, K/2) + scales (N, K/g): torch's int4 GEMM for bf16 and
    at most `KERNEL_MAX_ROWS` rows (CPU `_weight_int4pack_mm_for_cpu`, CUDA `_weight_int4pack_mm`), else W
    dequantized for this call only."""
    if cache is not None and cache.resident_group_size is not None:
        entry = cache.entries.get((*key, x.dtype, x.device))
        if entry is None or not 0 < x.shape[0] <= KERNEL_MAX_ROWS:
            raise RuntimeError(
                f"This int4 model keeps only torch's kernel layout (make_kernel_resident): it runs "
                f"{[k[-2] for k in cache.entries][:1]} activations with 1 to {KERNEL_MAX_ROWS} rows per expert, got "
                f"{x.dtype} with {x.shape[0]} rows. Reload the model to run other dtypes or batch sizes."
            )
        return _kernel_mm(x.contiguous(), entry[0], cache.resident_group_size, entry[1])
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    group_size = in_features // scales.shape[-1]
    if cache is not None and _kernel_fits(out_features, in_features, group_size, x):
        weight, scales_and_zeros = cache.get(key, packed, scales, x.dtype)
        return _Int4Matmul.apply(x.contiguous(), weight, scales_and_zeros, group_size, packed, scales)
    return _DequantizedMatmul.apply(x, packed, scales)


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


def _frozen(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)


class Int4Linear(nn.Module):
    """`nn.Linear` without bias over an int4 weight: `weight` (out, in/2) int8 + `weight_scale` (out, in/g)."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128) -> None:
        super().__init__()
        check_group_size(in_features, group_size, f"a Linear({in_features}, {out_features})")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.weight = _frozen((out_features, in_features // 2), torch.int8)
        self.weight_scale = _frozen((out_features, in_features // group_size), torch.float32)
        self.kernel_cache = _KernelCache()

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> Int4Linear:
        module = cls(linear.in_features, linear.out_features, group_size)
        module.set_weight(linear.weight.detach())
        return module

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float (out, in) weight into this module (RTN, Meta's formula)."""
        values, scales = quantize_int4(weight, self.group_size)
        self.weight = nn.Parameter(pack_int4(values), requires_grad=False)
        self.weight_scale = nn.Parameter(scales, requires_grad=False)
        self.kernel_cache.clear()

    def _apply(self, fn, recurse=True):
        _drop_kernels(self.kernel_cache)
        return super()._apply(fn, recurse)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        out = int4_matmul(rows, self.weight, self.weight_scale, self.kernel_cache)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int4TextMLP(nn.Module):
    """`Llama4TextMLP` (SwiGLU) over `Int4Linear`s: the shared expert and the dense layers' MLP."""

    def __init__(self, config, intermediate_size: int | None = None, group_size: int = 128) -> None:
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = Int4Linear(config.hidden_size, intermediate_size, group_size)
        self.up_proj = Int4Linear(config.hidden_size, intermediate_size, group_size)
        self.down_proj = Int4Linear(intermediate_size, config.hidden_size, group_size)
        self.activation_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation_fn(self.gate_proj(x)) * self.up_proj(x))


class Int4TextExperts(nn.Module):
    """The routed experts in int4, with `Llama4TextExperts`' forward contract.

    gate_up_proj: (E, 2I, H/2) int8 packed [N, K] = W_e.T of the fused (E, H, 2I) weight, gate_up_proj_scale
    (E, 2I, H/g); down_proj: (E, H, I/2), down_proj_scale (E, H, I/g). Only experts that received tokens run,
    each through torch's int4 GEMM (or, where it does not apply, its own weight dequantized for that call):
    nothing dequantizes all experts per step."""

    def __init__(self, config, group_size: int = 128) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.intermediate_size = config.intermediate_size
        self.hidden_size = config.hidden_size
        self.group_size = group_size
        hidden, inter = self.hidden_size, self.intermediate_size
        check_group_size(hidden, group_size, f"the routed experts' gate_up_proj (hidden_size={hidden})")
        check_group_size(inter, group_size, f"the routed experts' down_proj (intermediate_size={inter})")
        self.gate_up_proj = _frozen((self.num_experts, 2 * inter, hidden // 2), torch.int8)
        self.gate_up_proj_scale = _frozen((self.num_experts, 2 * inter, hidden // group_size), torch.float32)
        self.down_proj = _frozen((self.num_experts, hidden, inter // 2), torch.int8)
        self.down_proj_scale = _frozen((self.num_experts, hidden, inter // group_size), torch.float32)
        self.hidden_act = config.hidden_act
        self.act_fn = ACT2FN[config.hidden_act]
        self.kernel_cache = _KernelCache()

    @classmethod
    def from_experts(cls, experts: Llama4TextExperts, config, group_size: int = 128) -> Int4TextExperts:
        module = cls(config, group_size)
        module.set_weights(experts.gate_up_proj.detach(), experts.down_proj.detach())
        return module

    def set_weights(self, gate_up_proj: torch.Tensor | None, down_proj: torch.Tensor | None) -> None:
        """Quantize the fused float weights (E, H, 2I) / (E, I, H) (either may be None) into this module (RTN)."""
        for name, fused in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
            if fused is not None:
                values, scales = quantize_int4(fused.transpose(1, 2), self.group_size)
                setattr(self, name, nn.Parameter(pack_int4(values), requires_grad=False))
                setattr(self, f"{name}_scale", nn.Parameter(scales, requires_grad=False))
        self.kernel_cache.clear()

    def _apply(self, fn, recurse=True):
        _drop_kernels(self.kernel_cache)
        return super()._apply(fn, recurse)

    def dequantized_weights(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused float weights in the checkpoint layout: (E, H, 2I), (E, I, H)."""
        gate_up = dequantize_int4(self.gate_up_proj, self.gate_up_proj_scale, dtype).transpose(1, 2)
        down = dequantize_int4(self.down_proj, self.down_proj_scale, dtype).transpose(1, 2)
        return gate_up.contiguous(), down.contiguous()

    def _matmul(self, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_cache.resident_group_size is not None:  # only the kernel layout is left
            return int4_matmul(x, None, None, self.kernel_cache, (name, expert))
        packed, scales = getattr(self, f"{name}_proj")[expert], getattr(self, f"{name}_proj_scale")[expert]
        return int4_matmul(x, packed, scales, self.kernel_cache, (name, expert))

    def project_gate_up(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        """(n, H) -> (n, 2I): rows @ W_gate_up[expert]."""
        return self._matmul("gate_up", expert, rows)

    def project_down(self, expert: int, hidden: torch.Tensor) -> torch.Tensor:
        """(n, I) -> (n, H): hidden @ W_down[expert]."""
        return self._matmul("down", expert, hidden)

    def expert_forward(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        """One expert's SwiGLU on its rows: (n, H) -> (n, H)."""
        gate, up = self.project_gate_up(expert, rows).chunk(2, dim=-1)  # (n, I) x2
        return self.project_down(expert, self.act_fn(gate) * up)

    def forward(
        self,
        hidden_states: torch.Tensor,
        expert_indices: torch.Tensor,
        expert_weights: torch.Tensor,
        expert_fn: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(N, H) rows, (N, k) expert ids and output weights -> (N, H): sum_k weight * expert(row).
        Ids >= num_experts (another rank's experts) contribute nothing. `expert_fn(e, rows)` replaces
        `expert_forward` (the LoRA layer adds its adapters there)."""
        expert_fn = expert_fn or self.expert_forward
        num_rows, top_k = expert_indices.shape
        flat_experts = expert_indices.reshape(-1)  # (N*k,)
        order = torch.argsort(flat_experts, stable=True)  # assignments grouped by expert, foreign ids last
        counts = torch.bincount(flat_experts.clamp(max=self.num_experts), minlength=self.num_experts + 1)
        counts = counts[: self.num_experts].tolist()
        expert_in = hidden_states[order // top_k]  # (N*k, H)
        outputs, start = [], 0
        for expert, count in enumerate(counts):
            if count:
                outputs.append(expert_fn(expert, expert_in[start : start + count]))
            start += count
        outputs.append(expert_in.new_zeros(expert_in.shape[0] - start, self.hidden_size))  # foreign rows
        expert_out = torch.cat(outputs)  # (N*k, H)
        expert_out = expert_out * expert_weights.reshape(-1, 1)[order].to(expert_out.dtype)
        unsorted = torch.empty_like(expert_out).index_copy_(0, order, expert_out)
        return unsorted.view(num_rows, top_k, self.hidden_size).sum(dim=1)  # (N, H)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, group_size={self.group_size}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Config and quantizer
# ---------------------------------------------------------------------------------------------------------------


class Int4Config(QuantizationConfigMixin):
    """Weight-only symmetric int4 (Meta's `int4_mixed`): routed experts, shared expert and dense MLPs.

    Args:
        group_size: input features per scale (it must divide hidden_size, intermediate_size and
            intermediate_size_mlp).
        modules_to_not_convert: module names (suffix match, e.g. "layers.0.feed_forward") kept in full precision.
    """

    def __init__(self, group_size: int = 128, modules_to_not_convert: list[str] | None = None, **kwargs: Any) -> None:
        quant_method = kwargs.pop("quant_method", QUANT_METHOD)
        if quant_method != QUANT_METHOD:
            raise ValueError(
                f"Int4Config got quant_method={quant_method!r}; it only describes {QUANT_METHOD!r}. Load a "
                f"{quant_method} checkpoint with its own config class, or a full-precision one with Int4Config."
            )
        if kwargs:
            raise ValueError(
                f"Int4Config got unknown settings {sorted(kwargs)}; it takes group_size and modules_to_not_convert."
            )
        self.quant_method = QUANT_METHOD
        if isinstance(group_size, str) and group_size.strip().isdigit():
            group_size = int(group_size)
        whole = isinstance(group_size, numbers.Integral) or (isinstance(group_size, float) and group_size.is_integer())
        if isinstance(group_size, bool) or not whole:
            raise ValueError(f"Int4Config(group_size={group_size!r}): give a whole number, e.g. 128.")
        self.group_size = int(group_size)
        if isinstance(modules_to_not_convert, str):  # one name, not its characters
            modules_to_not_convert = [modules_to_not_convert]
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        if self.group_size <= 0 or self.group_size % 2:
            raise ValueError(f"Int4Config(group_size={group_size}): the group size must be a positive even number.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "group_size": self.group_size,
            "modules_to_not_convert": self.modules_to_not_convert,
        }


def _names(skip: str, name: str) -> bool:
    """Whether `skip` names module `name` or one containing it: a run of whole dotted parts ("layers.0.feed_forward"
    names "model.layers.0.feed_forward.experts")."""
    return f".{skip}." in f".{name}."


def _skipped(name: str, config: Int4Config) -> bool:
    return any(_names(skip, name) for skip in config.modules_to_not_convert or [])


def replace_with_int4_modules(model: nn.Module, config: Int4Config, quantize_weights: bool) -> int:
    """Swap `Llama4TextExperts` and `Llama4TextMLP` (shared expert, dense MLP) for their int4 versions.

    quantize_weights: quantize the current float weights (a built model); False builds empty int4 modules (on
    the meta device inside `from_pretrained`, before the weights load). Returns the number of modules swapped."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if _float_kind(module) is not None and not _skipped(name, config)
    ]
    names = [name for name, _ in model.named_modules()]
    unmatched = [skip for skip in config.modules_to_not_convert or [] if not any(_names(skip, n) for n in names)]
    if unmatched:
        warnings.warn(
            f"Int4Config(modules_to_not_convert={unmatched}) names no module of this model, so nothing is kept in "
            "full precision for them; names match module paths by suffix, e.g. 'layers.0.feed_forward'.",
            stacklevel=2,
        )
    for name, module in targets:  # every shape first: a bad group size must not leave a half-swapped model
        if _float_kind(module) == "experts":
            check_group_size(module.hidden_size, config.group_size, f"{name}.gate_up_proj (hidden_size)")
            check_group_size(module.intermediate_size, config.group_size, f"{name}.down_proj (intermediate_size)")
        else:
            for proj in ("gate_proj", "down_proj"):
                width = getattr(module, proj).in_features
                check_group_size(width, config.group_size, f"{name}.{proj} (in_features={width})")
    text_config = _text_config_of(model)
    swapped = 0
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device(next(module.parameters()).device):
            if _float_kind(module) == "experts":
                new = (
                    Int4TextExperts.from_experts(module, text_config, config.group_size)
                    if quantize_weights
                    else Int4TextExperts(text_config, config.group_size)
                )
            else:
                inter = module.gate_proj.out_features
                new = Int4TextMLP(text_config, inter, config.group_size)
                if quantize_weights:
                    for proj in ("gate_proj", "up_proj", "down_proj"):
                        getattr(new, proj).set_weight(getattr(module, proj).weight.detach())
        setattr(parent, child, new)
        swapped += 1
    return swapped


def _float_kind(module: nn.Module) -> str | None:
    """ "experts" / "mlp" for llama4-hf's float experts and MLPs, else None.

    By class name and defining file (`moe.py`), not identity: a remote-code copy of this package defines its own
    classes, and the process may hold both. transformers' built-in classes share the names but not the forward
    contract, so their module (`transformers.models.llama4.modeling_llama4`) does not match."""
    cls = type(module)
    if cls.__module__.rpartition(".")[2] != "moe":
        return None
    return {Llama4TextExperts.__name__: "experts", Llama4TextMLP.__name__: "mlp"}.get(cls.__name__)


def _text_config_of(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class Int4Quantize(ConversionOps):
    """Load-time op: one float checkpoint tensor -> its packed int4 tensor and scales (Meta's formula)."""

    def __init__(self, hf_quantizer: Int4HfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None, **kwargs) -> dict:
        group_size = self.hf_quantizer.quantization_config.group_size
        result = {}
        for key, value in input_dict.items():
            tensor = value[0] if isinstance(value, list) else value
            target = full_layer_name or key
            if target.endswith(("gate_up_proj", "down_proj")) and tensor.ndim == 3:
                tensor = tensor.transpose(1, 2)  # fused (E, K, N) used as x @ W -> per expert [N, K]
            # one expert at a time: the float32 temporaries stay one expert's size, not the fused tensor's
            matrices = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor
            packed = torch.empty(*matrices.shape[:-1], matrices.shape[-1] // 2, dtype=torch.int8, device=tensor.device)
            scales = torch.empty(
                *matrices.shape[:-1], matrices.shape[-1] // group_size, dtype=torch.float32, device=tensor.device
            )
            for index, matrix in enumerate(matrices):
                values, scales[index] = quantize_int4(matrix, group_size)
                packed[index] = pack_int4(values)
            if tensor.ndim == 2:
                packed, scales = packed[0], scales[0]
            result[target] = packed
            result[target + "_scale"] = scales
        return result


class Int4HfQuantizer(HfQuantizer):
    """transformers' hooks for `Int4Config`: swap modules before loading, quantize tensors as they are read."""

    requires_calibration = False

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not replace_with_int4_modules(model, self.quantization_config, quantize_weights=False):
            raise ValueError(
                f"Int4Config found no llama4-hf experts in {type(model).__name__} ({type(model).__module__}). "
                "Load with modeling_llama4's classes, or AutoModel*.from_pretrained(..., trust_remote_code=True)."
            )
        if self.pre_quantized and checkpoint_files:
            check_int4_checkpoint(model, checkpoint_files)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module_name, _, tensor_name = param_name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        return (isinstance(module, Int4Linear) and tensor_name == "weight") or (
            isinstance(module, Int4TextExperts) and tensor_name in ("gate_up_proj", "down_proj")
        )

    def get_quantize_ops(self) -> Int4Quantize:
        return Int4Quantize(self)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters on top (QLoRA); the int4 weights themselves are frozen

    def _dequantize(self, model, dtype=None):
        return dequantize_model(model, dtype or torch.float32)


def _register() -> None:
    # Idempotent: the package and a remote-code copy of this file may both be imported in one process.
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, Int4Config)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, Int4HfQuantizer)


_register()


# ---------------------------------------------------------------------------------------------------------------
# Checks and whole-model helpers
# ---------------------------------------------------------------------------------------------------------------


def _expected_int4_shapes(model: nn.Module) -> dict[str, tuple[torch.Size, torch.dtype]]:
    return {
        name: (tensor.shape, tensor.dtype)
        for name, tensor in model.state_dict().items()
        if isinstance(model.get_submodule(name.rpartition(".")[0]), (Int4Linear, Int4TextExperts))
    }


def _layer_key(name: str) -> str:
    # checkpoints and models name the decoder differently (`model.` / `language_model.model.`): compare from
    # `layers.` on
    return "layers." + name.split("layers.", 1)[1] if "layers." in name else name


def check_int4_checkpoint(model: nn.Module, checkpoint_files: list[str]) -> None:
    """Raise if an int4 checkpoint lacks a packed weight or scale the int4 model needs, or has one mis-shaped."""
    from safetensors import safe_open

    found: dict[str, tuple[list[int], str]] = {}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            continue
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                found[_layer_key(key)] = (handle.get_slice(key).get_shape(), handle.get_slice(key).get_dtype())
    if not found:
        return
    problems = []
    for name, (shape, _) in _expected_int4_shapes(model).items():
        entry = found.get(_layer_key(name))
        if entry is None:
            problems.append(f"{name} is missing")
        elif tuple(entry[0]) != tuple(shape):
            problems.append(f"{name} has shape {tuple(entry[0])}, expected {tuple(shape)}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(
            f"This int4 checkpoint ({Path(checkpoint_files[0]).parent}) does not match its quantization_config: "
            f"{shown}. Re-save it from the int4 model (save_pretrained), or load the full-precision checkpoint "
            "with quantization_config=Int4Config(...) to quantize it again."
        )


def check_quantization_request(model_class: type, pretrained_model_name_or_path: Any, kwargs: dict) -> None:
    """Before `from_pretrained`: refuse `quantization_config=Int4Config(...)` for a checkpoint already quantized
    (with another method, or int4 with other settings), and let a text class load the text half of a multimodal
    int4 checkpoint (its `quantization_config` sits on the multimodal config, which the text config does not
    inherit). May set `kwargs["config"]`."""
    requested = kwargs.get("quantization_config")
    text_class = getattr(model_class.config_class, "model_type", None) == "llama4_text"
    if not isinstance(requested, Int4Config) and not (text_class and "config" not in kwargs):
        return
    from transformers import PretrainedConfig

    hub_kwargs = {
        k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder") if k in kwargs
    }
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
    except Exception:  # noqa: BLE001 - transformers' own loading reports an unreadable config
        return
    saved = config_dict.get("quantization_config") or (config_dict.get("text_config") or {}).get("quantization_config")
    if not saved:
        return
    method = saved.get("quant_method") or (
        "bitsandbytes" if saved.get("load_in_4bit") or saved.get("load_in_8bit") else None
    )
    if isinstance(requested, Int4Config) and method != QUANT_METHOD:
        raise ValueError(
            f"{pretrained_model_name_or_path} is already quantized ({method}); int4 quantization needs a "
            "full-precision checkpoint. Load it without quantization_config, or quantize the original bf16 weights."
        )
    if isinstance(requested, Int4Config) and saved.get("group_size") != requested.group_size:
        raise ValueError(
            f"{pretrained_model_name_or_path} is already int4 with group_size={saved.get('group_size')}; "
            f"re-quantizing it with group_size={requested.group_size} would compound the rounding. Load it without "
            "quantization_config, or quantize the full-precision checkpoint."
        )
    if method == QUANT_METHOD and text_class and "text_config" in config_dict and "config" not in kwargs:
        config = model_class.config_class.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        config.quantization_config = saved
        kwargs["config"] = config


def quantize_model(model: nn.Module, config: Int4Config | dict | None = None) -> nn.Module:
    """Quantize a built (float) Llama 4 model in place, as `from_pretrained(..., quantization_config=)` does."""
    if isinstance(config, dict):  # as config.json / from_pretrained carry it
        config = Int4Config.from_dict(config)
    elif config is not None and not isinstance(config, Int4Config):
        raise TypeError(f"quantize_model takes an Int4Config (or its dict), got {type(config).__name__}")
    config = config or Int4Config()
    if getattr(model, "is_quantized", False) or getattr(getattr(model, "config", None), "quantization_config", None):
        raise ValueError(
            "This model is already quantized; int4 needs a full-precision model. Quantize the bf16/fp32 model "
            "(or `dequantize_model` it first, accepting the compounded rounding)."
        )
    if not replace_with_int4_modules(model, config, quantize_weights=True):
        raise ValueError(
            "No Llama 4 experts or MLPs found to quantize (is this a Llama 4 model from modeling_llama4?)"
        )
    quantizer = Int4HfQuantizer(config, pre_quantized=True)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module.config, "to_dict"):
            module.config.quantization_config = config
            module.config._is_quantized = True
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Back to float modules (`Llama4TextExperts`, `Llama4TextMLP`) in place; the int4 rounding stays."""
    text_config = _text_config_of(model)
    for name, module in list(model.named_modules()):
        if not isinstance(module, (Int4TextExperts, Int4TextMLP)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        device = next(module.parameters()).device
        with torch.device(device):
            if isinstance(module, Int4TextExperts):
                new = Llama4TextExperts(text_config)
                gate_up, down = module.dequantized_weights(dtype)
                new.gate_up_proj, new.down_proj = nn.Parameter(gate_up), nn.Parameter(down)
            else:
                new = Llama4TextMLP(text_config, module.gate_proj.out_features).to(dtype)
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    old = getattr(module, proj)  # an nn.Linear already where a LoRA adapter was merged in
                    weight = old.dequantized_weight(dtype) if isinstance(old, Int4Linear) else old.weight.detach()
                    getattr(new, proj).weight = nn.Parameter(weight.to(dtype))
        setattr(parent, child, new)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict") and hasattr(config, "quantization_config"):
            del config.quantization_config
            config._is_quantized = False
    return model


def make_kernel_resident(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Convert every int4 matrix to torch's kernel layout and free the checkpoint layout, module by module, so an
    int4 model that fits once does not need room for two copies (Scout on one 80 GB GPU: 51 GB of experts). For
    inference only: afterwards the model runs `dtype` activations, at most `KERNEL_MAX_ROWS` rows per expert
    (decode, short prompts), and cannot be saved, moved, copied or trained. Returns the bytes now held."""
    held = 0
    for module in model.modules():
        if isinstance(module, Int4TextExperts):
            params = ("gate_up_proj", "down_proj")
            for param in params:
                packed, scales = getattr(module, param), getattr(module, f"{param}_scale")
                for expert in range(module.num_experts):
                    module.kernel_cache.get(
                        (param.removesuffix("_proj"), expert), packed[expert], scales[expert], dtype
                    )
            names = [*params, *(f"{p}_scale" for p in params)]
        elif isinstance(module, Int4Linear):
            module.kernel_cache.get((), module.weight, module.weight_scale, dtype)
            names = ["weight", "weight_scale"]
        else:
            continue
        for name in names:  # the checkpoint layout goes; its shape stays readable on the module's attributes
            old = getattr(module, name)
            setattr(module, name, nn.Parameter(old.new_empty(0), requires_grad=False))
        module.kernel_cache.resident_group_size = module.group_size
        held += sum(t.numel() * t.element_size() for entry in module.kernel_cache.entries.values() for t in entry)
    return held


def int4_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the int4 modules' packed weights and scales, and of everything else."""
    quantized = sum(
        t.numel() * t.element_size()
        for m in model.modules()
        if isinstance(m, (Int4Linear, Int4TextExperts))
        for t in m.parameters(recurse=False)
    )
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"int4_modules": quantized, "other": total - quantized, "total": total}


def read_quantization_config(folder: str | Path) -> dict | None:
    """The `quantization_config` of a saved model folder, or None."""
    config = json.loads(Path(folder, "config.json").read_text())
    return config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")


__all__ = [
    "Int4Config",
    "Int4HfQuantizer",
    "Int4Linear",
    "Int4TextExperts",
    "Int4TextMLP",
    "quantize_int4",
    "pack_int4",
    "unpack_int4",
    "dequantize_int4",
    "int4_matmul",
    "quantize_model",
    "dequantize_model",
    "int4_bytes",
    "make_kernel_resident",
    "KERNEL_MAX_ROWS",
]
