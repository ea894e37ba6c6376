"""GPTQ for the int4 experts with the router score kept on the input: beats round-to-nearest on held-out text,
stays finite for an expert that gets no calibration tokens, and writes the same int4 format."""

import copy

import torch

from modeling_llama4 import Int4Config, Llama4ForCausalLM, Llama4TextConfig, quantize_model
from modeling_llama4.int4 import pack_int4, quantize_int4, unpack_int4
from modeling_llama4.int4_gptq import gptq_quantize, gptq_quantize_weight

from conftest import tiny_text_kwargs

CONFIG = Int4Config(group_size=32)


def tiny(**overrides) -> Llama4ForCausalLM:
    torch.manual_seed(0)
    return Llama4ForCausalLM(Llama4TextConfig(**tiny_text_kwargs(**overrides), initializer_range=0.1)).eval()


def held_out_kl_and_loss(reference, model, ids) -> tuple[float, float]:
    with torch.no_grad():
        p = reference(ids).logits.float().log_softmax(-1)
        out = model(input_ids=ids, labels=ids)
    q = out.logits.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item(), out.loss.item()


def test_gptq_beats_round_to_nearest_on_held_out_text():
    base = tiny()
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randint(3, 96, (8, 32), generator=generator) for _ in range(4)]
    held_out = torch.randint(3, 96, (8, 32), generator=generator)
    rtn = quantize_model(copy.deepcopy(base), CONFIG)
    gptq = copy.deepcopy(base)
    counts = gptq_quantize(gptq, calibration, CONFIG)
    assert counts == {"gptq": 4 * (4 * 2 + 3), "rtn_fallback": 0}
    assert gptq.is_quantized and type(gptq.model.layers[0].feed_forward.experts).__name__ == "Int4TextExperts"
    kl_rtn, _ = held_out_kl_and_loss(base, rtn, held_out)
    kl_gptq, _ = held_out_kl_and_loss(base, gptq, held_out)
    assert kl_gptq < 0.85 * kl_rtn, (kl_gptq, kl_rtn)


def test_expert_without_calibration_tokens_keeps_round_to_nearest_and_stays_finite():
    base = tiny()
    for layer in base.model.layers:  # expert 3 can never win top-1: max(x.w, -x.w) >= 0 = its logit
        router = layer.feed_forward.router.weight.data
        router[1], router[3] = -router[0], 0.0
    rtn = quantize_model(copy.deepcopy(base), CONFIG)
    gptq = copy.deepcopy(base)
    counts = gptq_quantize(gptq, [torch.randint(3, 96, (8, 32)) for _ in range(4)], CONFIG)
    assert counts["rtn_fallback"] == 4  # one starved expert per layer
    for layer_rtn, layer_gptq in zip(rtn.model.layers, gptq.model.layers):
        experts_rtn, experts_gptq = layer_rtn.feed_forward.experts, layer_gptq.feed_forward.experts
        assert torch.equal(experts_gptq.gate_up_proj[3], experts_rtn.gate_up_proj[3])
        assert torch.equal(experts_gptq.down_proj_scale[3], experts_rtn.down_proj_scale[3])
        assert not torch.equal(experts_gptq.gate_up_proj[0], experts_rtn.gate_up_proj[0])  # GPTQ where it can
        for tensor in experts_gptq.parameters():
            assert torch.isfinite(tensor.float()).all()
    with torch.no_grad():
        assert torch.isfinite(gptq(torch.randint(3, 96, (2, 16))).logits).all()


def test_gptq_weight_with_empty_hessian_is_round_to_nearest_and_values_stay_in_range():
    weight = torch.randn(16, 64)
    values, scales = gptq_quantize_weight(weight, torch.zeros(64, 64), group_size=32)
    rtn_values, rtn_scales = quantize_int4(weight, 32)
    assert torch.equal(values, rtn_values) and torch.equal(scales, rtn_scales)
    inputs = torch.randn(200, 64)
    values, scales = gptq_quantize_weight(weight, inputs.t() @ inputs, group_size=32)
    assert values.min() >= -8 and values.max() <= 7 and torch.isfinite(scales).all()
    assert torch.equal(unpack_int4(pack_int4(values)), values)
    # GPTQ lowers the output error on the inputs it was calibrated on
    dequantized = values.float() * scales.repeat_interleave(32, dim=-1)
    rtn = rtn_values.float() * rtn_scales.repeat_interleave(32, dim=-1)
    error_gptq = (inputs @ (dequantized - weight).t()).square().sum()
    error_rtn = (inputs @ (rtn - weight).t()).square().sum()
    assert error_gptq < error_rtn
