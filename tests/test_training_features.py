"""Gradient checkpointing and the attention backends give the same numbers as the default path."""

import pytest
import torch

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig

from conftest import tiny_text_kwargs


def _grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(batch, labels=batch, use_cache=False).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    model = Llama4ForCausalLM(Llama4TextConfig(**tiny_text_kwargs(num_experts_per_tok=2))).train()
    batch = torch.randint(3, 96, (2, 40))
    reference = _grads(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.layers[0].gradient_checkpointing
    checkpointed = _grads(model, batch)
    assert reference.keys() == checkpointed.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


FLEX_ON_CPU = (
    "torch 2.13's flex attention on CPU fails in inductor's C++ codegen (VecMask<int> vs VecMask<float> in '?:'), "
    "and with padding returns NaN: it is tested only where CUDA is available"
)


@pytest.mark.parametrize(
    "implementation",
    [
        "eager",
        pytest.param("flex_attention", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=FLEX_ON_CPU)),
    ],
)
def test_attention_backends_match_sdpa(implementation):
    device = "cuda" if implementation == "flex_attention" else "cpu"
    model = Llama4ForCausalLM(Llama4TextConfig(**tiny_text_kwargs(floor_scale=4))).eval().to(device)
    input_ids = torch.randint(3, 96, (2, 40), device=device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :6] = 0
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
        model.set_attn_implementation(implementation)
        actual = model(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=1e-4, rtol=1e-4)
