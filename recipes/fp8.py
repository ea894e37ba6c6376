"""FP8 training on Hopper (or newer) GPUs: torchao float8 through accelerate, and a clear refusal elsewhere.

torchao converts `nn.Linear` layers (attention, shared expert, dense MLPs) to float8 matmuls. The fused routed
experts are 3-D parameters, not `nn.Linear`, so they stay in bf16, and so do the router (deliberately not an
`nn.Linear`), the LM head and the first linear layer (accelerate's default filter: they are precision-sensitive).
"""

from __future__ import annotations

from typing import Any

import torch


def fp8_unavailable_reason() -> str | None:
    """Why FP8 training cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "this machine has no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return f"{torch.cuda.get_device_name()} has compute capability {major}.{minor}; float8 matmuls need 8.9+"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "torchao is not installed (pip install torchao)"
    return None


def fp8_accelerator_kwargs() -> dict[str, Any]:
    """Keyword arguments for `accelerate.Accelerator` that train in FP8 with torchao, after checking the hardware.

    Equivalent to `accelerate launch --config_file recipes/accelerate_configs/fp8.yaml`."""
    if (reason := fp8_unavailable_reason()) is not None:
        raise RuntimeError(
            f"FP8 training needs an NVIDIA Hopper-class GPU (H100/H200, compute capability 8.9+) and torchao: "
            f"{reason}. Train in bf16 instead (mixed_precision='bf16', or "
            "recipes/accelerate_configs/single_gpu.yaml)."
        )
    from accelerate.utils import AORecipeKwargs

    return {"mixed_precision": "fp8", "kwargs_handlers": [AORecipeKwargs()]}
