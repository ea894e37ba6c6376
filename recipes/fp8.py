"""FP8 training that covers the routed experts: rowwise-scaled float8 GEMMs for the experts (forward and backward)
and for the linear layers of the decoder (attention, shared expert, dense MLPs).

`convert_model_to_fp8(model)` converts a model in place, on a Hopper GPU through torchao:
- the routed experts' grouped GEMMs go to torchao's FP8-rowwise grouped GEMM
  (`torchao.prototype.moe_training`, `torch._scaled_grouped_mm` on SM90). accelerate's torchao, Transformer Engine
  and MS-AMP backends convert only `nn.Linear`, so the fused 3-D experts, most of an MoE model's FLOPs, would stay
  bf16 there;
- the decoder's `nn.Linear` layers become torchao `Float8Linear` (its "rowwise" recipe).
The router (deliberately not an `nn.Linear`), norms, embeddings and `lm_head` stay in high precision.

`convert_model_to_fp8(model, emulate=True)` runs anywhere (CPU included, no torchao needed): every operand of every
converted GEMM is quantized to float8_e4m3fn and dequantized with the same scaling rules as the kernels, then the
normal GEMM runs in float32. CI checks the FP8 numerics with it.

The scaling rules (torchao's FP8-rowwise recipes, e4m3 for every operand): each operand of a GEMM gets one scale per
slice along the GEMM's contraction dimension, `scale = 2^floor(log2(448 / amax))` (a power of 2, so dequantizing is
exact), values saturated to +-448. For the experts' `out = x @ W` (x: (M, K) rows sorted by expert, W: (E, K, N)):
- forward `x @ W`: x per row (amax over K), W per expert and output column (amax over K);
- input gradient `dout @ W^T`: dout per row (amax over N), W per expert and input row (amax over N);
- weight gradient `x_e^T @ dout_e` per expert e: x and dout per expert and column (amax over that expert's tokens).
The linear layers follow the same rule with one group.

The experts' weights stay plain parameters at rest (optimizer, checkpoints and FSDP2 sharding see ordinary tensors).
On each forward the converted experts module hands its grouped GEMM a float8-aware view of each weight (a tensor
subclass whose `__torch_function__` intercepts `torch._grouped_mm`, as torchao's own weight wrapper does), so
`modeling_llama4.moe.grouped_matmul` runs unchanged; under FSDP2 the view wraps the all-gathered weight.
"""

from __future__ import annotations

import importlib.metadata
import re
from typing import Any

import torch
from torch import nn

from modeling_llama4.moe import Llama4TextExperts

FP8_DTYPE = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
_AMAX_EPS = 1e-12  # torchao's floor on amax, so all-zero slices get a finite scale
# FP8 GEMM kernels read operands with 16-byte TMA loads: one byte per float8 element.
ALIGNMENT = 16
# The first torchao release checked against this code (`_to_fp8_rowwise_then_scaled_grouped_mm`, `Float8LinearConfig`).
TORCHAO_MIN_VERSION = "0.18.0"


class Fp8UnsupportedError(RuntimeError):
    """FP8 was asked for where it cannot run: no FP8 GPU, missing torchao, or shapes the kernels cannot take."""


# ---------------------------------------------------------------------------------------------------------------
# Emulation: quantize-dequantize with the kernels' rowwise scales, then the GEMM in float32
# ---------------------------------------------------------------------------------------------------------------


def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    # torchao's amax_to_scale with round_scales_to_power_of_2: the division in float64, then rounded down to 2^n.
    scale = (_FP8_MAX / amax.double().clamp(min=_AMAX_EPS)).float()
    return torch.exp2(torch.floor(torch.log2(scale)))


def _quantize_dequantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (float32) through float8_e4m3fn with `scale` (broadcastable), back to float32."""
    quantized = (x * scale).clamp(-_FP8_MAX, _FP8_MAX).to(FP8_DTYPE)
    return quantized.float() / scale


def fp8_rowwise(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x as float8_e4m3fn with one scale per slice along `dim` (amax over `dim`), dequantized to float32."""
    x = x.float()
    return _quantize_dequantize(x, _scale_from_amax(x.abs().amax(dim=dim, keepdim=True)))


def fp8_per_group_colwise(x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (M, K) rows in groups ending at `offs` (E,): one scale per group and column (amax over the group's rows),
    dequantized to float32. Rows past the last group are returned as zeros."""
    x = x.float()
    rows = torch.arange(x.shape[0], device=x.device)
    group = torch.searchsorted(offs.to(torch.int64), rows, right=True)  # (M,) group id; E past the last group
    amax = x.new_zeros(offs.shape[0] + 1, x.shape[1])
    amax.scatter_reduce_(0, group[:, None].expand_as(x), x.abs(), reduce="amax")  # (E+1, K)
    result = _quantize_dequantize(x, _scale_from_amax(amax)[group])
    return result.masked_fill((group == offs.shape[0])[:, None], 0.0)


def _grouped_mm_fp32(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch's grouped GEMM in float32: (M, K) x (E, K, N) -> (M, N), or (K, M) x (M, N) -> (E, K, N).

    Where the kernel refuses (float32 on some CUDA builds, strides not a multiple of 16 bytes), one GEMM per
    group: the emulation may sync with the host."""
    with torch._C.DisableTorchFunctionSubclass():
        try:
            return torch._grouped_mm(a, b, offs=offs)
        except (RuntimeError, NotImplementedError):
            pass
        ends = offs.tolist()
        bounds = list(zip([0, *ends[:-1]], ends))
        if b.ndim == 3:
            out = a.new_zeros(a.shape[0], b.shape[-1])
            for e, (start, end) in enumerate(bounds):
                out[start:end] = a[start:end] @ b[e]
            return out
        out = a.new_zeros(len(ends), a.shape[0], b.shape[1])
        for e, (start, end) in enumerate(bounds):
            out[e] = a[:, start:end] @ b[start:end]
        return out


class _EmulatedFp8GroupedMM(torch.autograd.Function):
    """`x @ W[e]` over the row groups of x, every operand of the three GEMMs quantized as the FP8-rowwise kernel does.

    x: (M, K) rows sorted by group, W: (E, K, N), offs: (E,) int32 group ends. Returns (M, N) in x's dtype; rows
    past `offs[-1]` get zeros (and zero gradient)."""

    @staticmethod
    def forward(ctx, x, weight, offs):  # noqa: D102
        ctx.save_for_backward(x, weight, offs)
        x_q = fp8_rowwise(x, dim=-1)  # (M, K), one scale per row
        w_q = fp8_rowwise(weight, dim=-2)  # (E, K, N), one scale per (expert, output column)
        out = _grouped_mm_fp32(x_q, w_q, offs)
        return _zero_past_groups(out, offs).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, weight, offs = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g_q = fp8_rowwise(grad_out, dim=-1)  # (M, N), one scale per row
            w_q = fp8_rowwise(weight, dim=-1)  # (E, K, N), one scale per (expert, input row)
            grad_x = _zero_past_groups(_grouped_mm_fp32(g_q, w_q.transpose(-2, -1), offs), offs).to(x.dtype)
        if ctx.needs_input_grad[1]:
            x_q = fp8_per_group_colwise(x, offs)  # (M, K), one scale per (expert, column)
            g_q = fp8_per_group_colwise(grad_out, offs)  # (M, N)
            grad_w = _grouped_mm_fp32(x_q.t(), g_q, offs).to(weight.dtype)  # (E, K, N)
        return grad_x, grad_w, None


def _zero_past_groups(out: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    past = torch.arange(out.shape[0], device=out.device) >= offs[-1]
    return out.masked_fill(past[:, None], 0.0)


class _EmulatedFp8Linear(torch.autograd.Function):
    """`x @ W^T` with torchao's "rowwise" Float8Linear scaling, emulated: x (..., K), W (N, K) -> (..., N)."""

    @staticmethod
    def forward(ctx, x, weight):  # noqa: D102
        ctx.save_for_backward(x, weight)
        out = fp8_rowwise(x, dim=-1) @ fp8_rowwise(weight, dim=-1).t()
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, weight = ctx.saved_tensors
        grad_2d, x_2d = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (fp8_rowwise(grad_2d, dim=-1) @ fp8_rowwise(weight, dim=0)).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (fp8_rowwise(grad_2d, dim=0).t() @ fp8_rowwise(x_2d, dim=0)).to(weight.dtype)
        return grad_x, grad_w


class EmulatedFp8Linear(nn.Linear):
    """An `nn.Linear` whose three GEMMs see float8-rowwise operands (emulated). Same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _EmulatedFp8Linear.apply(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)


# ---------------------------------------------------------------------------------------------------------------
# The experts: a weight view that sends `torch._grouped_mm` to the FP8 GEMM
# ---------------------------------------------------------------------------------------------------------------


def _pad_token_groups(x: torch.Tensor, offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of x moved so every group starts at a multiple of 16 (the FP8 grouped GEMM's weight-gradient GEMM
    contracts over each group's tokens, whose count must be a multiple of 16). Zero rows fill the gaps, which
    changes neither amax nor any sum. No host sync: the padded length is the bound M + 16 E.

    Returns (padded x (M + 16E, K), padded group ends (E,), each row's padded position (M,))."""
    num_rows, num_groups = x.shape[0], offs.shape[0]
    ends = offs.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    padded_counts = (counts + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
    padded_ends = torch.cumsum(padded_counts, 0)
    rows = torch.arange(num_rows, device=x.device)
    group = torch.searchsorted(ends, rows, right=True).clamp(max=num_groups - 1)
    # Row i of group g keeps its offset from the group's start; rows past the last group follow the last padded one.
    shift = (padded_ends - padded_counts) - (ends - counts)  # (E,) how far each group's start moves
    position = torch.where(rows < ends[-1], rows + shift[group], rows + padded_ends[-1] - ends[-1])
    padded = x.new_zeros(num_rows + ALIGNMENT * num_groups, x.shape[1]).index_copy(0, position, x)
    return padded, padded_ends.to(torch.int32), position


def _column_major(weight: torch.Tensor) -> torch.Tensor:
    # torch._scaled_grouped_mm takes the right operand column-major per expert; our (E, K, N) weights are row-major
    # where FSDP2 all-gathered them (convert_model_to_fp8 lays out unsharded weights column-major once).
    if weight.stride(-2) == 1:
        return weight
    return weight.transpose(-2, -1).contiguous().transpose(-2, -1)


def _through_padded_groups(gemm, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`gemm(x, weight, offs)` run on token groups padded to multiples of 16, the result back on x's rows."""
    padded, padded_offs, position = _pad_token_groups(x, offs)
    return _zero_past_groups(gemm(padded, weight, padded_offs)[position], offs)


def _torchao_gemm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm

    out = _to_fp8_rowwise_then_scaled_grouped_mm(
        x.to(torch.bfloat16).contiguous(),
        _column_major(weight.to(torch.bfloat16)),
        offs,
        out_dtype=torch.bfloat16,
        float8_dtype=FP8_DTYPE,
        pad_token_groups_for_grouped_mm=False,  # padded here, without a host sync
    )
    return out.to(x.dtype)


def _torchao_fp8_grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _through_padded_groups(_torchao_gemm, x, weight, offs)


def _emulated_fp8_grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _EmulatedFp8GroupedMM.apply(x, weight, offs)


# Ops that would multiply the weight outside the grouped GEMM (moe.py's per-expert fallback loop): refused, so a
# converted model never silently runs its experts in high precision.
_REFUSED = {"unbind", "matmul", "__matmul__", "mm", "bmm", "einsum", "linear"}


class _Fp8ExpertWeight(torch.Tensor):
    """A view of an expert weight (E, K, N) whose `torch._grouped_mm(rows, weight, offs=...)` runs in FP8.

    Every other op sees the plain tensor and returns plain tensors. Only made inside the converted experts'
    forward; `emulate` is a class attribute of the two concrete subclasses."""

    emulate: bool = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "_grouped_mm":
            x, weight, offs = _grouped_mm_arguments(*args, **kwargs)
            with torch._C.DisableTorchFunctionSubclass():
                weight = weight.as_subclass(torch.Tensor)  # still attached to the autograd graph
            return (_emulated_fp8_grouped_mm if cls.emulate else _torchao_fp8_grouped_mm)(x, weight, offs)
        if name in _REFUSED:
            raise Fp8UnsupportedError(
                f"FP8 expert weights reached `{name}` instead of `torch._grouped_mm`: the experts fell back to the "
                "per-expert loop of modeling_llama4.moe.grouped_matmul (misaligned tensors, or a grouped GEMM that "
                "failed earlier in this process), which would run them in high precision."
            )
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


class _TorchaoFp8ExpertWeight(_Fp8ExpertWeight):
    emulate = False


class _EmulatedFp8ExpertWeight(_Fp8ExpertWeight):
    emulate = True


def _grouped_mm_arguments(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    if offs is None or mat_a.ndim != 2 or mat_b.ndim != 3 or bias is not None or out_dtype is not None:
        raise Fp8UnsupportedError(
            "FP8 expert weights support torch._grouped_mm(rows (M, K), weight (E, K, N), offs=...) only, "
            f"got rows {tuple(mat_a.shape)}, weight {tuple(mat_b.shape)}, offs={'set' if offs is not None else None}, "
            f"bias={'set' if bias is not None else None}, out_dtype={out_dtype}"
        )
    return mat_a, mat_b, offs


class _Fp8ExpertsMixin:
    """Mixed into the experts module's class by `convert_model_to_fp8`: the forward sees FP8 views of the weights."""

    _fp8_weight_class: type[_Fp8ExpertWeight] = _EmulatedFp8ExpertWeight
    _FP8_WEIGHTS = ("gate_up_proj", "down_proj")

    def _path(self, rows: torch.Tensor, num_assignments: int) -> str:
        # The FP8 GEMM stands in for the grouped GEMM only: decode-sized batches (held-out evaluation, judge
        # sampling, RL rollouts during a run) take it too, in FP8 like training, not the gathered or dense bmm.
        return "sorted"

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        # The parameters themselves stay plain (FSDP2 puts its all-gathered weights in `_parameters` before this
        # runs); the views exist for this call only and are differentiable aliases of them.
        plain = {name: self._parameters[name] for name in self._FP8_WEIGHTS}
        for name, weight in plain.items():
            if type(weight) not in (torch.Tensor, nn.Parameter):
                raise Fp8UnsupportedError(
                    f"FP8 experts need plain weight tensors in forward; {name} is a {type(weight).__name__} "
                    "(expert- or tensor-parallel plans shard it as a DTensor). FSDP2 works; EP/TP with FP8 does not yet."
                )
        try:
            for name, weight in plain.items():
                self._parameters[name] = weight.as_subclass(self._fp8_weight_class)
            return super().forward(*args, **kwargs)
        finally:
            self._parameters.update(plain)


_CONVERTED_CLASSES: dict[tuple[type, bool], type] = {}


def _fp8_experts_class(cls: type, emulate: bool) -> type:
    key = (cls, emulate)
    if key not in _CONVERTED_CLASSES:
        weight_class = _EmulatedFp8ExpertWeight if emulate else _TorchaoFp8ExpertWeight
        name = f"{'Emulated' if emulate else ''}Fp8{cls.__name__}"
        _CONVERTED_CLASSES[key] = type(name, (_Fp8ExpertsMixin, cls), {"_fp8_weight_class": weight_class})
    return _CONVERTED_CLASSES[key]


# ---------------------------------------------------------------------------------------------------------------
# Checks and conversion
# ---------------------------------------------------------------------------------------------------------------


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def torchao_problem() -> str | None:
    """Why torchao cannot run the FP8 GEMMs, or None."""
    try:
        version = importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version is None or _version_tuple(version) < _version_tuple(TORCHAO_MIN_VERSION):
        found = "not installed" if version is None else f"version {version}"
        return (
            f"torchao missing or too old (need >= {TORCHAO_MIN_VERSION}, found {found}): pip install 'llama4-hf[fp8]'"
        )
    try:
        import torchao.float8  # noqa: F401
        from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm  # noqa: F401
    except ImportError as error:
        return f"torchao {version} does not import its FP8 training modules ({error}); need >= {TORCHAO_MIN_VERSION}"
    return None


def fp8_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why real FP8 training cannot run on `device` (default: the current CUDA device), or None when it can."""
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        where = "this machine has no CUDA device" if not torch.cuda.is_available() else f"the model is on {device}"
        return where
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0):
        return (
            f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; the FP8 grouped GEMM "
            "(torch._scaled_grouped_mm) needs 9.0 (Hopper: H100/H200)"
        )
    return torchao_problem()


def _accelerator_device() -> torch.device:
    """The device accelerate (and so the Trainer) trains on in this process."""
    from accelerate import PartialState

    return PartialState().device


def _check_multiple(what: str, sizes: dict[str, int]) -> None:
    bad = {name: size for name, size in sizes.items() if size % ALIGNMENT}
    if bad:
        listed = ", ".join(f"{name}={size}" for name, size in bad.items())
        raise Fp8UnsupportedError(
            f"FP8 GEMMs cannot take {what}: {listed}; each of these must be a multiple of {ALIGNMENT} "
            "(float8 kernels load operands in 16-byte blocks). Pick sizes that are multiples of 16 or train in bf16."
        )


def _decoder_linear(fqn: str, module: nn.Module) -> bool:
    # Inside the decoder layers (attention, shared expert, dense MLPs); not lm_head, embeddings or the vision tower.
    return type(module) is nn.Linear and re.search(r"(^|\.)layers\.\d+\.", fqn) is not None and "vision" not in fqn


def convert_model_to_fp8(model: nn.Module, emulate: bool = False) -> nn.Module:
    """Train `model` with FP8-rowwise GEMMs in its routed experts and decoder linear layers; converts in place.

    emulate=False: the real kernels through torchao, on a CUDA device of compute capability 9.0 (the model must be
    there, ideally in bf16). emulate=True: the same quantization emulated in float32 on any device, without torchao.
    The router, norms, embeddings and lm_head stay in high precision. Convert before FSDP2's `fully_shard` (the
    tested order). Returns the model. Raises `Fp8UnsupportedError` naming the problem.
    """
    experts = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, Llama4TextExperts)]
    linears = [(fqn, m) for fqn, m in model.named_modules() if _decoder_linear(fqn, m)]
    other_experts = [
        fqn
        for fqn, m in model.named_modules()
        if getattr(m, "gate_up_proj", None) is not None and not isinstance(m, Llama4TextExperts)
    ]
    if getattr(model, "is_quantized", False):
        raise Fp8UnsupportedError(
            f"{type(model).__name__} is quantized (int4 experts): FP8 training converts full-precision weights. "
            "Load the model without quantization_config for FP8, or train LoRA adapters on the int4 model (QLoRA)"
        )
    if other_experts:
        raise Fp8UnsupportedError(
            f"{other_experts[0]} ({type(model.get_submodule(other_experts[0])).__name__}) is not "
            "modeling_llama4's Llama4TextExperts, whose grouped GEMM the FP8 path replaces; load the model with "
            "modeling_llama4.Llama4ForCausalLM"
        )
    if not experts and not linears:
        raise Fp8UnsupportedError(f"{type(model).__name__} has no Llama 4 experts or decoder linear layers to convert")
    for fqn, module in experts:
        if isinstance(module, _Fp8ExpertsMixin):
            raise Fp8UnsupportedError(f"{fqn} is already converted to FP8")
        _check_multiple(
            f"the routed experts at {fqn}",
            {"hidden_size": module.hidden_size, "intermediate_size": module.intermediate_size},
        )
    for fqn, module in linears:
        _check_multiple(
            f"the linear layer {fqn}", {"in_features": module.in_features, "out_features": module.out_features}
        )

    if not emulate:
        # Recipes convert before the Trainer moves the model, so a CPU-resident model is judged by the device
        # accelerate will train it on.
        device = next(model.parameters()).device
        if device.type == "cpu":
            device = _accelerator_device()
        if (reason := fp8_unavailable_reason(device)) is not None:
            raise Fp8UnsupportedError(
                f"real FP8 training needs an NVIDIA Hopper GPU (compute capability 9.0) and torchao >= "
                f"{TORCHAO_MIN_VERSION}: {reason}. Use convert_model_to_fp8(model, emulate=True) (recipes: "
                "`fp8_emulate: true`) to check the numerics anywhere, or train in bf16."
            )

    for _, module in experts:
        if not emulate:
            # Column-major per expert, the layout the FP8 grouped GEMM reads, so no copy is made per step.
            for name in _Fp8ExpertsMixin._FP8_WEIGHTS:
                weight = getattr(module, name)
                weight.data = _column_major(weight.data)
        module.__class__ = _fp8_experts_class(type(module), emulate)
    if emulate:
        for _, module in linears:
            module.__class__ = EmulatedFp8Linear
    elif linears:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        chosen = {id(m) for _, m in linears}
        convert_to_float8_training(
            model,
            config=Float8LinearConfig.from_recipe_name("rowwise"),
            module_filter_fn=lambda module, fqn: id(module) in chosen,
        )
    return model


def fp8_summary(model: nn.Module) -> dict[str, int]:
    """How many modules of each kind run their GEMMs in FP8 (for logs and tests)."""
    experts = sum(isinstance(m, _Fp8ExpertsMixin) for m in model.modules())
    linears = sum(type(m).__name__ in ("EmulatedFp8Linear", "Float8Linear") for m in model.modules())
    return {"experts": experts, "linears": linears}
