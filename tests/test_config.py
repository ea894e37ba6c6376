import inspect
import json
import logging

import pytest
import torch
import transformers

from modeling_llama4 import Llama4Config, Llama4ForCausalLM, Llama4TextConfig, Llama4VisionConfig

from conftest import tiny_text_kwargs


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_experts_per_tok": 5}, "num_experts_per_tok=5 is outside 1..num_local_experts=4"),
        ({"head_dim": 15}, "head_dim=15 is odd"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide num_attention_heads=4"),
        ({"attention_chunk_size": 0}, "attention_chunk_size=0 must be positive"),
        ({"moe_layers": [1, 7]}, r"moe_layers \[7\] are out of range for num_hidden_layers=4"),
        ({"rope_parameters": {"rope_type": "spiral", "rope_theta": 1e4}}, "unknown rope_type 'spiral'"),
        ({"layer_types": ["full_attention", "chunked_atention"] * 2}, r"layer_types has \['chunked_atention'\]"),
        ({"layer_types": ["sliding_attention"] * 4}, r"layer_types has \['sliding_attention'\]. Llama 4 layers"),
        ({"pad_token_id": 10_000}, r"pad_token_id=10000 is outside the vocabulary"),
        ({"interleave_moe_layer_step": 0}, "interleave_moe_layer_step=0 must be positive"),
        ({"no_rope_layer_interval": 0}, "no_rope_layer_interval=0 must be positive"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps=-1.0 must be positive"),
        ({"hidden_act": "gelu_fast_typo"}, "unknown hidden_act 'gelu_fast_typo'"),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}},
            r"Missing required keys in `rope_parameters` for 'rope_type'='llama3'.*'factor'",
        ),
        (
            {"attention_chunk_size": None, "layer_types": ["chunked_attention"] * 4},
            "chunked_attention layers but attention_chunk_size is null",
        ),
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


@pytest.mark.parametrize(
    ("ours", "builtin"),
    [
        (Llama4TextConfig, transformers.Llama4TextConfig),
        (Llama4VisionConfig, transformers.Llama4VisionConfig),
        (Llama4Config, transformers.Llama4Config),
    ],
)
def test_signature_names_the_builtin_fields_and_defaults(ours, builtin):
    # transformers' model tester builds configs from `inspect.signature`; `**kwargs` gave it a Scout-sized model.
    ours_params = inspect.signature(ours).parameters
    builtin_params = inspect.signature(builtin).parameters
    for name, param in builtin_params.items():
        assert name in ours_params, name
        assert ours_params[name].default == param.default, name


def test_config_built_from_its_signature_is_small():
    params = inspect.signature(Llama4TextConfig).parameters
    assert params["hidden_size"].default == 5120 and params["num_local_experts"].default == 16
    kwargs = {name: 2 for name in ("num_hidden_layers", "num_local_experts") if name in params}
    config = Llama4TextConfig(hidden_size=32, intermediate_size=16, intermediate_size_mlp=32, vocab_size=99,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, **kwargs)  # fmt: skip
    assert (config.hidden_size, config.num_hidden_layers, config.num_local_experts) == (32, 2, 2)


def test_explicit_head_dim_lets_heads_not_divide_hidden_size():
    # The shape transformers' own Llama 4 tester uses: 40 heads of 8 channels on a 32-wide model.
    kwargs = tiny_text_kwargs(hidden_size=32, num_attention_heads=40, num_key_value_heads=8, head_dim=8)
    builtin_config = transformers.Llama4TextConfig(**kwargs)  # the built-in accepts it
    ours = Llama4ForCausalLM(Llama4TextConfig(**kwargs)).eval()
    builtin = transformers.Llama4ForCausalLM(builtin_config).eval()
    builtin.load_state_dict(ours.state_dict())
    input_ids = torch.randint(3, kwargs["vocab_size"], (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, builtin(input_ids).logits, atol=1e-4, rtol=1e-4)


@pytest.fixture
def saved_tiny(tmp_path):
    Llama4ForCausalLM(Llama4TextConfig(**tiny_text_kwargs())).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_experts_per_tok": 9}, "num_experts_per_tok=9 is outside 1..num_local_experts=4"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide num_attention_heads=4"),
        ({"hidden_size": "64"}, "hidden_size: .*expected int, got str.*without quotes"),
    ],
)
def test_from_pretrained_keyword_overrides_are_validated(saved_tiny, overrides, message):
    # Keyword overrides are set after the config is built; they must meet the same checks.
    with pytest.raises(ValueError, match=message):
        Llama4ForCausalLM.from_pretrained(saved_tiny, **overrides)
    with pytest.raises(ValueError, match=message):
        Llama4TextConfig.from_pretrained(saved_tiny, **overrides)


@pytest.mark.parametrize(
    ("overrides", "moe_layers", "layer_types"),
    [
        ({"interleave_moe_layer_step": 2}, [1, 3], ["chunked_attention", "full_attention"] * 2),
        ({"no_rope_layer_interval": 4}, [0, 1, 2, 3], ["chunked_attention"] * 3 + ["full_attention"]),
        ({"attention_chunk_size": None}, [0, 1, 2, 3], ["full_attention"] * 4),
        ({"num_hidden_layers": 6}, list(range(6)), ["chunked_attention", "full_attention"] * 3),
    ],
)
def test_changing_a_field_rederives_the_layer_lists_config_json_stores(saved_tiny, overrides, moe_layers, layer_types):
    """config.json stores `moe_layers`, `no_rope_layers` and `layer_types`; an override of the field they derive
    from must not be outvoted by them (every layer stayed MoE after `interleave_moe_layer_step=2`)."""
    config = Llama4TextConfig.from_pretrained(saved_tiny, **overrides)
    assert (config.moe_layers, config.layer_types) == (moe_layers, layer_types)
    assert len(config.no_rope_layers) == config.num_hidden_layers
    kept = Llama4TextConfig.from_pretrained(saved_tiny, interleave_moe_layer_step=2, moe_layers=[0])
    assert kept.moe_layers == [0]  # a list given with it wins


def test_a_near_miss_field_name_warns_with_the_field_it_meant(caplog):
    with caplog.at_level(logging.WARNING):
        config = Llama4Config(text_config={"hidden_sise": 64})
    assert "got 'hidden_sise', which is not one of its fields: did you mean 'hidden_size'?" in caplog.text
    assert config.text_config.hidden_size == 5120  # kept as an extra, not applied
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Llama4TextConfig(**tiny_text_kwargs(project_note="extra keys are kept silently"))
    assert "not one of its fields" not in caplog.text


def test_string_number_in_config_json_names_the_field(saved_tiny):
    raw = json.loads((saved_tiny / "config.json").read_text())
    raw["hidden_size"] = "64"
    (saved_tiny / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"Invalid Llama4TextConfig: hidden_size: .*got str.*\"hidden_size\": 64"):
        Llama4ForCausalLM.from_pretrained(saved_tiny)


def test_missing_expert_count_names_the_field_and_the_fix(saved_tiny):
    raw = json.loads((saved_tiny / "config.json").read_text())
    del raw["num_local_experts"]  # the model is then built with the default 16 experts, the weights have 4
    (saved_tiny / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as error:
        Llama4ForCausalLM.from_pretrained(saved_tiny)
    message = str(error.value)
    assert "num_local_experts=16 (the default, as config.json does not set it) but the weights have 4" in message
    assert 'Set "num_local_experts": 4 in config.json' in message
    assert "LOAD REPORT" not in message


def test_field_changed_after_construction_is_checked_when_the_model_is_built():
    config = Llama4TextConfig(**tiny_text_kwargs())
    config.num_experts_per_tok = 9
    with pytest.raises(ValueError, match="num_experts_per_tok=9 is outside 1..num_local_experts=4"):
        Llama4ForCausalLM(config)
