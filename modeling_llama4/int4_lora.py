"""QLoRA on the int4 model: PEFT LoRA layers for `Int4Linear` and the int4 routed experts.

PEFT's own LoRA layers cannot sit on these modules: `lora.Linear` merges by adding to `base.weight` (packed
int8 here) and `target_parameters` reparametrizes a float 3-D parameter (the experts are int8 here). PEFT's
custom-module hook (`LoraConfig._register_custom_module`) takes layers that follow its LoRA conventions, so
these two classes do: adapters in `lora_A` / `lora_B` (saved and loaded by PEFT as usual), the base stays int4
and frozen, and `merge` writes the dequantized weight plus the adapter's delta into a float module (merging
into int4 would round the delta away). Not imported by the modeling files: remote code does not need PEFT.

    model = Llama4ForCausalLM.from_pretrained(path, quantization_config=Int4Config())
    peft_model = get_peft_model(model, int4_lora_config(r=16, target_modules=INT4_LORA_TARGETS))
    ...train...
    merged = merge_int4_lora(peft_model)  # a float Llama4ForCausalLM; quantize_model(merged) re-quantizes
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from .int4 import Int4Linear, Int4TextExperts, dequantize_model
from .moe import Llama4TextExperts

# attention, the shared expert / dense MLP projections, and the routed experts (the module, not its parameters)
INT4_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts"]


class _Int4LoraLayer(nn.Module, LoraLayer):
    """The constructor PEFT's custom-module dispatch calls, shared by the int4 LoRA layers."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1, **kwargs
    ):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)


class Int4LoraLinear(_Int4LoraLayer):
    """LoRA on an `Int4Linear`: y = int4(x) + B(A(dropout(x))) * scaling, adapters in float."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        if config.use_dora or config.alora_invocation_tokens is not None:
            raise ValueError("Int4 LoRA layers support plain LoRA only (no DoRA / aLoRA).")
        return None

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """(out, in) float32 delta of `adapter`."""
        a, b = self.lora_A[adapter].weight.float(), self.lora_B[adapter].weight.float()
        return (b @ a) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Replace the int4 base by an `nn.Linear` holding dequantized weight + delta (float32)."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            base = self.get_base_layer()
            weight = base.dequantized_weight() if isinstance(base, Int4Linear) else base.weight.detach().float()
            weight = weight + self.get_delta_weight(adapter).to(weight.device)
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"NaNs detected in the merged weights of adapter {adapter}.")
            linear = nn.Linear(self.in_features, self.out_features, bias=False, device=weight.device)
            linear.weight = nn.Parameter(weight, requires_grad=False)
            self.base_layer = linear
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            self.base_layer.weight.data -= self.get_delta_weight(adapter).to(self.base_layer.weight.device)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters or self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            a, b = self.lora_A[adapter], self.lora_B[adapter]
            lora = b(a(self.lora_dropout[adapter](x.to(a.weight.dtype)))) * self.scaling[adapter]
            result = result + lora.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class _ExpertFactors(nn.Module):
    """One side of the routed experts' adapters: `gate_up` and `down` factors, one per expert."""

    def __init__(self, gate_up_shape: tuple[int, int, int], down_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.gate_up = nn.Parameter(torch.zeros(gate_up_shape))
        self.down = nn.Parameter(torch.zeros(down_shape))


class Int4LoraExperts(_Int4LoraLayer):
    """LoRA on `Int4TextExperts`, per expert and per projection, in the fused `x @ W` layout:
    W_gate_up[e] + A_gu[e] (H, r) @ B_gu[e] (r, 2I) * scaling, and likewise for W_down[e] (I, H). An expert's
    adapters only see (and only get gradients from) the tokens routed to it, as its weights do."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.hidden_size, module.hidden_size

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if config.use_dora or config.alora_invocation_tokens is not None or config.lora_bias:
            raise ValueError("The int4 routed experts support plain LoRA only (no DoRA / aLoRA / lora_bias).")
        base = self.get_base_layer()
        experts, hidden, inter = base.num_experts, base.hidden_size, base.intermediate_size
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.use_rslora[adapter_name] = config.use_rslora
        self.lora_bias[adapter_name] = False
        p = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.lora_A[adapter_name] = _ExpertFactors((experts, hidden, r), (experts, inter, r))
        self.lora_B[adapter_name] = _ExpertFactors((experts, r, 2 * inter), (experts, r, hidden))
        # as nn.Linear's default init for A (kaiming uniform, a=sqrt(5)); B zero so the adapter starts as a no-op
        for factor, fan_in in ((self.lora_A[adapter_name].gate_up, hidden), (self.lora_A[adapter_name].down, inter)):
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(factor, -bound, bound)
        if config.init_lora_weights is False:  # PEFT's "random B" switch, used to test merges
            for factor in (self.lora_B[adapter_name].gate_up, self.lora_B[adapter_name].down):
                nn.init.normal_(factor, std=0.02)
        device = base.down_proj.device
        self.lora_A[adapter_name].to(device)
        self.lora_B[adapter_name].to(device)
        self.set_adapter(self.active_adapters)

    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.lora_A]

    def _expert_with_lora(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        gate_up = base.project_gate_up(expert, rows)  # (n, 2I)
        for adapter in self._active():
            a, b = self.lora_A[adapter].gate_up[expert], self.lora_B[adapter].gate_up[expert]
            x = self.lora_dropout[adapter](rows.to(a.dtype))
            gate_up = gate_up + ((x @ a) @ b * self.scaling[adapter]).to(gate_up.dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = base.act_fn(gate) * up  # (n, I)
        out = base.project_down(expert, hidden)  # (n, H)
        for adapter in self._active():
            a, b = self.lora_A[adapter].down[expert], self.lora_B[adapter].down[expert]
            x = self.lora_dropout[adapter](hidden.to(a.dtype))
            out = out + ((x @ a) @ b * self.scaling[adapter]).to(out.dtype)
        return out

    def forward(self, hidden_states, expert_indices, expert_weights, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        if self.disable_adapters or self.merged or not isinstance(base, Int4TextExperts):
            return base(hidden_states, expert_indices, expert_weights)
        return base(hidden_states, expert_indices, expert_weights, expert_fn=self._expert_with_lora)

    def get_delta_weight(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, H, 2I) and (E, I, H) float32 deltas of `adapter`, in the fused layout."""
        a, b, s = self.lora_A[adapter], self.lora_B[adapter], self.scaling[adapter]
        return (a.gate_up.float() @ b.gate_up.float()) * s, (a.down.float() @ b.down.float()) * s

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Replace the int4 base by float `Llama4TextExperts` holding dequantized weights + deltas (float32)."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            base = self.get_base_layer()
            if isinstance(base, Int4TextExperts):
                gate_up, down = base.dequantized_weights(torch.float32)
                shape = SimpleNamespace(
                    num_local_experts=base.num_experts,
                    num_experts_per_tok=base.top_k,
                    intermediate_size=base.intermediate_size,
                    hidden_size=base.hidden_size,
                    hidden_act=base.hidden_act,
                )
                with torch.device(gate_up.device):
                    experts = Llama4TextExperts(shape)
                experts.act_fn = base.act_fn
            else:
                experts, gate_up, down = base, base.gate_up_proj.detach().float(), base.down_proj.detach().float()
            delta_gate_up, delta_down = self.get_delta_weight(adapter)
            gate_up, down = gate_up + delta_gate_up.to(gate_up.device), down + delta_down.to(down.device)
            if safe_merge and not (torch.isfinite(gate_up).all() and torch.isfinite(down).all()):
                raise ValueError(f"NaNs detected in the merged weights of adapter {adapter}.")
            experts.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
            experts.down_proj = nn.Parameter(down, requires_grad=False)
            self.base_layer = experts
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            delta_gate_up, delta_down = self.get_delta_weight(adapter)
            self.base_layer.gate_up_proj.data -= delta_gate_up
            self.base_layer.down_proj.data -= delta_down

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_int4_lora(config: LoraConfig) -> LoraConfig:
    """Make `config` place `Int4LoraLinear` / `Int4LoraExperts` on the int4 modules it targets."""
    config._register_custom_module({Int4Linear: Int4LoraLinear, Int4TextExperts: Int4LoraExperts})
    return config


def int4_lora_config(**kwargs: Any) -> LoraConfig:
    """`LoraConfig(**kwargs)` that can adapt the int4 modules (default targets: `INT4_LORA_TARGETS`)."""
    kwargs.setdefault("target_modules", list(INT4_LORA_TARGETS))
    return register_int4_lora(LoraConfig(**kwargs))


def load_int4_adapter(model: nn.Module, adapter_path: str, **kwargs: Any) -> PeftModel:
    """`PeftModel.from_pretrained` for an adapter trained on the int4 model (the custom layers are registered
    again: PEFT does not save that mapping)."""
    config = register_int4_lora(LoraConfig.from_pretrained(adapter_path))
    return PeftModel.from_pretrained(model, adapter_path, config=config, **kwargs)


def merge_int4_lora(peft_model: PeftModel, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Merge the adapters into a full-precision model (`dtype`): adapted modules get dequantized weight + delta,
    the other int4 modules are dequantized. `quantize_model(merged)` re-quantizes it."""
    merged = peft_model.merge_and_unload()
    dequantize_model(merged, torch.float32)
    return merged.to(dtype)


def lora_config_for_model(config: LoraConfig | None, model: nn.Module) -> LoraConfig | None:
    """A recipe's `LoraConfig` made fit for `model`: unchanged for a float model; for an int4 one, the int4 LoRA
    layers registered and `target_parameters` on the fused experts (how float models adapt them) moved to the
    `experts` module, which carries the int4 experts' adapters."""
    if config is None or not any(isinstance(m, (Int4Linear, Int4TextExperts)) for m in model.modules()):
        return config
    expert_params = [
        p for p in config.target_parameters or [] if p.endswith(("experts.gate_up_proj", "experts.down_proj"))
    ]
    if expert_params:
        config.target_parameters = [p for p in config.target_parameters if p not in expert_params] or None
        targets = config.target_modules
        if isinstance(targets, str):  # a regex or "all-linear": add the experts as an alternative
            config.target_modules = targets if targets == "all-linear" else f"(?:{targets})|.*\\.experts$"
        else:
            config.target_modules = sorted({*(targets or []), "experts"})
    if config.target_modules == "all-linear":  # PEFT's all-linear finds nn.Linear only: name the int4 ones too
        config.target_modules = list(INT4_LORA_TARGETS)
    return register_int4_lora(config)
