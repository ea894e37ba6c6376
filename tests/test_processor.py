"""transformers' Llama4Processor + Llama4ImageProcessor on hub_configs/tiny, feeding our model.

The image processor needs torchvision, which PyPI only ships built against CUDA torch: with the CPU
torch 2.13 of the main test environment these tests skip, and CI runs them in a second environment
with torch 2.14.1 + torchvision 0.29.1 (see .ci/run)."""

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

from modeling_llama4 import Llama4Config, Llama4ForConditionalGeneration  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "hub_configs" / "tiny"


def random_image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_processor_inputs_drive_our_model_with_multi_tile_images():
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(TINY)
    model = Llama4ForConditionalGeneration(Llama4Config.from_pretrained(TINY)).eval()
    messages = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]}],
    ]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in messages]
    images = [[random_image(60, 130, 0)], [random_image(56, 56, 1), random_image(120, 50, 2)]]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    num_image_tokens = int((inputs.input_ids == model.config.image_token_id).sum())
    assert num_image_tokens == inputs.pixel_values.shape[0] * 4  # 4 tokens per 56-pixel tile
    assert inputs.pixel_values.shape[0] > 3  # multi-tile: tiles plus a global tile
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, inputs.input_ids.shape[1] + 5)


def test_chat_template_marks_assistant_tokens_for_the_loss():
    processor = AutoProcessor.from_pretrained(TINY)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "What is 2+3?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The answer is \\boxed{5}."}]},
    ]
    out = processor.tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assistant = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert processor.tokenizer.decode(assistant) == "The answer is \\boxed{5}.<|eot|>"
