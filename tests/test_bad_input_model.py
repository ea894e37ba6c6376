"""Inputs a user gets wrong reach the model as clear errors, not IndexErrors deep in attention or silent results."""

import pytest
import torch
from transformers import StaticCache

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig

from conftest import tiny_text_kwargs

IDS = torch.randint(3, 96, (2, 5))


@pytest.fixture(scope="module")
def model() -> Llama4ForCausalLM:
    torch.manual_seed(0)
    return Llama4ForCausalLM(Llama4TextConfig(**tiny_text_kwargs())).eval()


@pytest.mark.parametrize(
    "inputs, message",
    [
        (dict(input_ids=torch.tensor([[5, 96]])), r"token id 96, outside this model's vocabulary \(0\.\.95"),
        (dict(input_ids=torch.tensor([[5, -100]])), r"token id -100.*-100 marks ignored label positions"),
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), r"no tokens \(shape \(2, 0\)\)"),
        (
            dict(input_ids=torch.tensor([5, 6, 7])),
            r"shape \(3,\); the model takes \(batch, sequence\).*input_ids\[None\]",
        ),
        (dict(input_ids=torch.tensor([[5.0, 6.0]])), r"torch.float32; token ids are integers"),
        (dict(input_ids=IDS, attention_mask=torch.ones(2, 3, dtype=torch.long)), r"shape \(2, 3\).*is \(2, 5\)"),
        (dict(input_ids=IDS, attention_mask=torch.ones(2, 9, dtype=torch.long)), r"shape \(2, 9\).*is \(2, 5\)"),
        (dict(input_ids=IDS, attention_mask=torch.ones(3, 5, dtype=torch.long)), r"shape \(3, 5\).*is \(2, 5\)"),
        (dict(inputs_embeds=torch.randn(2, 5, 32)), r"inputs_embeds has shape \(2, 5, 32\).*hidden_size=64"),
        (dict(input_ids=IDS, position_ids=torch.arange(3)[None]), r"position_ids has shape \(1, 3\).*5 tokens"),
        (dict(input_ids=IDS, labels=IDS[:, :4]), r"labels has shape \(2, 4\) but the input is \(2, 5\)"),
        (dict(input_ids=IDS, labels=torch.full((2, 5), 200)), r"labels contain 200, neither a token id \(0\.\.95\)"),
        (dict(input_ids=IDS, labels=IDS.float()), r"labels are torch.float32"),
        (dict(input_ids=IDS, pixel_values=torch.randn(1, 3, 8, 8)), r"text model and would drop pixel_values"),
    ],
)
def test_bad_model_inputs_are_named(model, inputs, message):
    with pytest.raises(ValueError, match=message):
        model(**inputs)


@pytest.mark.parametrize("prompt", [torch.zeros(1, 0, dtype=torch.long), torch.tensor([5, 6]), torch.tensor([[99]])])
def test_bad_prompts_to_generate_are_named(model, prompt):
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(prompt, max_new_tokens=2, pad_token_id=0)


def test_a_mask_without_the_cached_tokens_is_refused(model):
    with torch.no_grad():
        cache = model(IDS, use_cache=True).cache
        with pytest.raises(ValueError, match=r"after 5 cached tokens: a 2-D mask is \(2, 6\)"):
            model(IDS[:, :1], attention_mask=torch.ones(2, 1, dtype=torch.long), cache=cache, use_cache=True)


def test_valid_masks_still_pass(model):
    """The checks refuse nothing legitimate: masks over cached + new tokens, custom ignore_index, a static
    cache's preallocated length, padding, a 4-D mask."""
    with torch.no_grad():
        out = model(IDS, attention_mask=torch.ones(2, 5, dtype=torch.long), use_cache=True)
        step = model(IDS[:, :1], attention_mask=torch.ones(2, 6, dtype=torch.long), cache=out.cache, use_cache=True)
        assert step.logits.shape == (2, 1, 96)
        labels = IDS.clone()
        labels[:, :2] = -1
        assert torch.isfinite(model(IDS, labels=labels, ignore_index=-1).loss)
        static = StaticCache(config=model.config, max_cache_len=12)
        full = torch.ones(2, 12, dtype=torch.long)
        assert model(IDS, attention_mask=full, cache=static, use_cache=True).logits.shape == (2, 5, 96)
        causal = torch.tril(torch.ones(5, 5, dtype=torch.bool))[None, None].expand(2, 1, 5, 5)
        assert model(IDS, attention_mask=causal).logits.shape == (2, 5, 96)
