"""Same weights -> same logits as transformers' built-in Llama 4, loading in both directions."""

import pytest
import torch
import transformers

from modeling_llama4 import Llama4ForCausalLM

from conftest import LLAMA3_ROPE, tiny_text_kwargs

CASES = {
    "top1_every_layer_moe_qk_norm": {},
    "top2_interleaved_no_qk_norm": dict(num_experts_per_tok=2, interleave_moe_layer_step=2, use_qk_norm=False),
    "llama3_rope_temperature_tuning": dict(rope_parameters=LLAMA3_ROPE, floor_scale=4, attn_scale=0.5),
    "many_nope_layers_mha": dict(num_hidden_layers=6, no_rope_layer_interval=2, num_key_value_heads=4, floor_scale=8),
    "maverick_like": dict(
        num_local_experts=8, interleave_moe_layer_step=2, use_qk_norm=False, rope_parameters=LLAMA3_ROPE
    ),
}
ATOL = 1e-4


def _builtin_and_ours(tmp_path, attn_implementation="sdpa", **overrides):
    config = transformers.Llama4TextConfig(**tiny_text_kwargs(**overrides))
    builtin = transformers.Llama4ForCausalLM(config).eval()
    builtin.save_pretrained(tmp_path / "builtin")
    ours, info = Llama4ForCausalLM.from_pretrained(
        tmp_path / "builtin", output_loading_info=True, attn_implementation=attn_implementation
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    builtin = transformers.Llama4ForCausalLM.from_pretrained(
        tmp_path / "builtin", attn_implementation=attn_implementation
    )
    return builtin.eval(), ours.eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("case", CASES)
def test_logits_match_builtin_beyond_one_chunk(tmp_path, case, attn_implementation):
    builtin, ours = _builtin_and_ours(tmp_path, attn_implementation, **CASES[case])
    input_ids = torch.randint(3, 96, (2, 45))  # 45 tokens: nearly three chunks of 16
    with torch.no_grad():
        expected = builtin(input_ids).logits
        actual = ours(input_ids).logits
    assert (expected - actual).abs().max() <= ATOL


def test_temperature_tuning_is_active_in_the_parity_case(tmp_path):
    # Guard against a parity test that passes because the feature under test never triggers.
    builtin, ours = _builtin_and_ours(tmp_path, **CASES["llama3_rope_temperature_tuning"])
    input_ids = torch.randint(3, 96, (1, 40))
    with torch.no_grad():
        tuned = ours(input_ids).logits
        ours.config.attn_temperature_tuning = False
        for layer in ours.model.layers:
            layer.self_attn.attn_temperature_tuning = False
        untuned = ours(input_ids).logits
    assert (tuned - untuned).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["top1_every_layer_moe_qk_norm", "llama3_rope_temperature_tuning"])
def test_left_padded_batch_matches_builtin(tmp_path, case):
    builtin, ours = _builtin_and_ours(tmp_path, **CASES[case])
    input_ids = torch.randint(3, 96, (3, 37))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0
    attention_mask[2, :20] = 0  # pad longer than a chunk
    input_ids[attention_mask == 0] = 0
    with torch.no_grad():
        expected = builtin(input_ids, attention_mask=attention_mask).logits
        actual = ours(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert (expected - actual)[real].abs().max() <= ATOL


def test_ours_saved_loads_into_builtin(tmp_path):
    config_kwargs = tiny_text_kwargs(num_experts_per_tok=2, interleave_moe_layer_step=2, rope_parameters=LLAMA3_ROPE)
    from modeling_llama4 import Llama4TextConfig

    ours = Llama4ForCausalLM(Llama4TextConfig(**config_kwargs)).eval()
    ours.save_pretrained(tmp_path / "ours")
    builtin, info = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert set(builtin.state_dict()) == set(ours.state_dict())
    input_ids = torch.randint(3, 96, (2, 40))
    with torch.no_grad():
        assert (builtin.eval()(input_ids).logits - ours(input_ids).logits).abs().max() <= ATOL


def test_gradients_match_builtin(tmp_path):
    builtin, ours = _builtin_and_ours(tmp_path, **CASES["top2_interleaved_no_qk_norm"])
    input_ids = torch.randint(3, 96, (2, 24))
    for model in (builtin, ours):
        model.train()
        model(input_ids, labels=input_ids).loss.backward()
    ours_grads = dict(ours.named_parameters())
    for name, param in builtin.named_parameters():
        torch.testing.assert_close(ours_grads[name].grad, param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_parity_inputs_take_the_chunk_batched_path_and_padded_ones_the_masked_path(tmp_path):
    # The long unpadded parity inputs run chunks as batch rows; padded batches use transformers' masks.
    # Both are compared with the built-in above, so this guards that each path is really exercised.
    _, ours = _builtin_and_ours(tmp_path)
    embeds = torch.zeros(2, 45, 64)
    positions = torch.arange(45).unsqueeze(0)
    assert ours.model._can_attend_by_chunks(embeds, None, positions, None)
    padded = torch.ones(2, 45, dtype=torch.long)
    padded[1, :5] = 0
    assert not ours.model._can_attend_by_chunks(embeds, padded, positions, None)
    packed = torch.cat([torch.arange(20), torch.arange(25)]).unsqueeze(0)
    assert not ours.model._can_attend_by_chunks(embeds, None, packed, None)
