import json
import logging

import pytest
import transformers

from modeling_llama4 import Llama4TextConfig

from conftest import tiny_text_kwargs


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_experts_per_tok": 5}, "num_experts_per_tok=5 is outside 1..num_local_experts=4"),
        ({"num_attention_heads": 6}, "num_attention_heads=6 does not divide hidden_size=64"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide num_attention_heads=4"),
        ({"attention_chunk_size": 0}, "attention_chunk_size=0 must be positive"),
        ({"moe_layers": [1, 7]}, r"moe_layers \[7\] are out of range for num_hidden_layers=4"),
        ({"rope_parameters": {"rope_type": "spiral", "rope_theta": 1e4}}, "unknown rope_type 'spiral'"),
    ],
)
def test_invalid_config_names_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        Llama4TextConfig(**tiny_text_kwargs(**overrides))


def test_official_integer_temperature_tuning_is_accepted_and_saved_as_bool(tmp_path, caplog):
    raw = transformers.Llama4TextConfig(**tiny_text_kwargs()).to_dict()
    raw["attn_temperature_tuning"] = 4  # as in Meta's released Scout config.json
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(Exception, match="attn_temperature_tuning"):
        transformers.Llama4TextConfig.from_pretrained(tmp_path)  # the built-in refuses it

    with caplog.at_level(logging.WARNING):
        config = Llama4TextConfig.from_pretrained(tmp_path)
    assert config.attn_temperature_tuning is True
    assert "attn_temperature_tuning=4" in caplog.text
    config.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["attn_temperature_tuning"] is True
    assert transformers.Llama4TextConfig.from_pretrained(tmp_path / "resaved").attn_temperature_tuning is True


def test_config_round_trips_with_builtin(tmp_path):
    ours = Llama4TextConfig(**tiny_text_kwargs(interleave_moe_layer_step=2, use_qk_norm=False))
    ours.save_pretrained(tmp_path)
    builtin = transformers.Llama4TextConfig.from_pretrained(tmp_path)
    for field in ("moe_layers", "no_rope_layers", "layer_types", "attention_chunk_size", "rope_parameters"):
        assert getattr(builtin, field) == getattr(ours, field)
    assert ours.model_type == builtin.model_type == "llama4_text"
    assert ours.num_experts == ours.num_local_experts == 4
