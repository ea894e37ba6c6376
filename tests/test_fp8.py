"""FP8 is a Hopper-GPU option: here (CPU) it must refuse with a message that says why and what to use."""

import pytest
import torch

from recipes.fp8 import fp8_accelerator_kwargs, fp8_unavailable_reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp8_on_cpu_is_refused_with_the_reason_and_the_alternative():
    assert fp8_unavailable_reason() == "this machine has no CUDA device"
    with pytest.raises(RuntimeError, match=r"FP8 training needs an NVIDIA Hopper.*no CUDA device.*bf16"):
        fp8_accelerator_kwargs()


def test_fp8_accelerate_config_selects_torchao():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).resolve().parents[1] / "recipes" / "accelerate_configs" / "fp8.yaml"
    config = load_config_from_file(str(path))
    assert config.mixed_precision == "fp8" and config.fp8_config["backend"] == "AO"
