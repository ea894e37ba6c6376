"""Total and active parameter counts of a Llama 4 model (works on the meta device)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .moe import Llama4TextExperts


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    active: int  # what one token uses: everything but the routed experts it is not sent to

    def __str__(self) -> str:
        def human(n: int) -> str:
            return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"

        return f"{human(self.total)} total, {human(self.active)} active"


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Count parameters; routed experts count `num_experts_per_tok / num_local_experts` of theirs as active."""
    total = active = 0.0
    for module in model.modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        total += own
        active += own * module.top_k / module.num_experts if isinstance(module, Llama4TextExperts) else own
    return ParameterCounts(total=int(total), active=int(active))
