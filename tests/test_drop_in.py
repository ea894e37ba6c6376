"""Interfaces transformers' built-in Llama 4 has and ours must have too (issue: a true drop-in)."""

import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import PreTrainedModel

from modeling_llama4 import (
    Llama4Config,
    Llama4ForCausalLM,
    Llama4ForConditionalGeneration,
    Llama4TextConfig,
)

from conftest import tiny_text_kwargs

TINY = Path(__file__).resolve().parents[1] / "hub_configs" / "tiny"


@pytest.fixture(scope="module")
def causal_lm():
    torch.manual_seed(0)
    return Llama4ForCausalLM(Llama4TextConfig(**tiny_text_kwargs())).eval()


@pytest.fixture(scope="module")
def multimodal():
    torch.manual_seed(0)
    return Llama4ForConditionalGeneration(Llama4Config.from_pretrained(TINY)).eval()


def _token_ids(model, shape):  # text tokens only (the tiny multimodal vocabulary ends in image tokens)
    return torch.randint(3, min(model.config.get_text_config().vocab_size, 900), shape)


def _model_for(name, causal_lm, multimodal):
    return {
        "causal_lm": causal_lm,
        "text_model": causal_lm.model,
        "multimodal": multimodal,
        "backbone": multimodal.model,
    }[name]


@pytest.mark.parametrize("name", ["causal_lm", "text_model", "multimodal", "backbone"])
def test_past_key_values_is_the_deprecated_name_of_cache(name, causal_lm, multimodal):
    model = _model_for(name, causal_lm, multimodal)
    prompt, next_token = _token_ids(model, (2, 9)), _token_ids(model, (2, 1))

    def step(keyword: str):
        with torch.no_grad():
            prefill = model(input_ids=prompt, use_cache=True)
            out = model(input_ids=next_token, use_cache=True, **{keyword: prefill.cache})
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    with pytest.warns(FutureWarning, match="past_key_values"):
        old_name = step("past_key_values")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        new_name = step("cache")
    with torch.no_grad():  # the cache is really used: not the logits of the lone token
        alone = model(input_ids=next_token)
    alone = alone.logits if hasattr(alone, "logits") else alone.last_hidden_state
    torch.testing.assert_close(old_name, new_name)
    assert (old_name - alone).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["causal_lm", "multimodal"])
def test_return_dict_false_returns_tuples_like_the_builtin(name, causal_lm, multimodal):
    model = _model_for(name, causal_lm, multimodal)
    input_ids = _token_ids(model, (2, 7))
    with torch.no_grad():
        as_dict = model(input_ids=input_ids, labels=input_ids)
        as_tuple = model(input_ids=input_ids, labels=input_ids, return_dict=False)
        no_labels = model(input_ids=input_ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(no_labels, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    torch.testing.assert_close(no_labels[0], as_dict.logits)


def test_tensor_parallel_plans_name_the_lm_head_like_the_builtin(causal_lm, multimodal):
    assert (
        causal_lm._tp_plan["lm_head"] == transformers.Llama4ForCausalLM._tp_plan["lm_head"] == "colwise_gather_output"
    )
    assert multimodal._tp_plan["lm_head"] == "colwise_gather_output"


def test_get_image_features_returns_the_builtins_model_output(multimodal):
    builtin = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config.from_pretrained(TINY)).eval()
    builtin.load_state_dict(multimodal.state_dict())
    size = multimodal.config.vision_config.image_size
    pixel_values = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours = multimodal.get_image_features(pixel_values)
        ours_tuple = multimodal.get_image_features(pixel_values, return_dict=False)
        expected = builtin.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
    assert isinstance(ours, BaseModelOutputWithPooling) and isinstance(ours_tuple, tuple)  # as the built-in
    torch.testing.assert_close(ours.last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_tuple[0], expected)


def test_vision_hidden_states_and_attentions_match_the_builtin(multimodal):
    builtin = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config.from_pretrained(TINY)).eval()
    builtin.load_state_dict(multimodal.state_dict())
    for model in (builtin, multimodal):
        model.set_attn_implementation("eager")  # attention weights come from the eager kernel only
    size = multimodal.config.vision_config.image_size
    pixel_values = torch.randn(2, 3, size, size)
    requested = {"output_hidden_states": True, "output_attentions": True}
    try:
        with torch.no_grad():
            ours = multimodal.get_image_features(pixel_values, **requested)
            expected = builtin.get_image_features(pixel_values=pixel_values, return_dict=True, **requested)
            # What the text model receives: the projected features, transformers' `pooler_output` convention
            projected = builtin.multi_modal_projector(expected.last_hidden_state)
    finally:
        multimodal.set_attn_implementation("sdpa")
    assert isinstance(ours, BaseModelOutputWithPooling)
    layers = multimodal.config.vision_config.num_hidden_layers
    assert len(ours.hidden_states) == len(expected.hidden_states) == layers + 1
    assert len(ours.attentions) == layers and ours.attentions[0].shape == (2, 4, 17, 17)  # heads, patches + class
    for got, want in zip(ours.hidden_states + ours.attentions, expected.hidden_states + expected.attentions):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.pooler_output, projected, atol=1e-5, rtol=1e-5)


def test_multimodal_forward_returns_the_image_outputs(multimodal):
    config = multimodal.config
    tokens = int((config.vision_config.image_size // config.vision_config.patch_size) ** 2 / 4)
    input_ids = _token_ids(multimodal, (2, 3 + tokens))
    input_ids[:, 1 : 1 + tokens] = config.image_token_id
    size = config.vision_config.image_size
    pixel_values = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = multimodal(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True)
        as_tuple = multimodal(input_ids=input_ids, pixel_values=pixel_values, return_dict=False)
        text_only = multimodal(input_ids=input_ids[:, tokens + 1 :])
    image_outputs = out.image_outputs
    assert image_outputs.pooler_output.shape == (2, tokens, config.text_config.hidden_size)
    assert len(image_outputs.hidden_states) == config.vision_config.num_hidden_layers + 1
    assert len(out.hidden_states) == config.text_config.num_hidden_layers + 1  # the text model's, unchanged
    assert text_only.image_outputs is None and text_only.image_hidden_states is None
    assert out.image_hidden_states is image_outputs.pooler_output  # the built-in's (deprecated) name
    torch.testing.assert_close(as_tuple[0], out.logits)
    torch.testing.assert_close(as_tuple[-1][0], image_outputs.last_hidden_state)  # nested outputs are tuples too


def test_attention_weights_over_chunks_match_the_builtin(tmp_path):
    # A prompt longer than one chunk takes our chunks-as-batch-rows path; returned weights are (B, heads, S, S).
    torch.manual_seed(0)
    config = Llama4TextConfig(**tiny_text_kwargs(attn_implementation="eager"))
    ours = Llama4ForCausalLM(config).eval()
    ours.save_pretrained(tmp_path)
    builtin = transformers.Llama4ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    length = 2 * config.attention_chunk_size + 5
    input_ids = _token_ids(ours, (2, length))
    with torch.no_grad():
        got = ours(input_ids=input_ids, output_attentions=True)
        want = builtin(input_ids=input_ids, output_attentions=True)
        plain = ours(input_ids=input_ids)
    assert len(got.attentions) == config.num_hidden_layers
    for layer, (ours_weights, builtin_weights) in enumerate(zip(got.attentions, want.attentions)):
        assert ours_weights.shape == (2, config.num_attention_heads, length, length), layer
        torch.testing.assert_close(ours_weights, builtin_weights, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.logits, plain.logits, atol=1e-5, rtol=1e-5)


def test_a_meta_device_build_materialises_with_to_empty():
    config = Llama4Config.from_pretrained(TINY)
    with torch.device("meta"):
        model = Llama4ForConditionalGeneration(config)
    model.to_empty(device="cpu")
    table = model.vision_model.rotary_embedding.freqs_ci
    assert table.device.type == "cpu" and table.is_complex()
    torch.testing.assert_close(
        table, type(model.vision_model.rotary_embedding)._compute_freqs_ci(config.vision_config)
    )


def test_multimodal_backbone_is_one_pretrained_submodel_and_keys_stay_official(multimodal, tmp_path):
    backbone = multimodal.model
    assert isinstance(backbone, PreTrainedModel) and backbone is multimodal.model is multimodal.base_model
    assert backbone.language_model is multimodal.language_model.model
    assert backbone.vision_model is multimodal.vision_model
    keys = set(multimodal.state_dict())
    assert not any(key.startswith("model.") for key in keys)
    assert {key.split(".")[0] for key in keys} == {"vision_model", "multi_modal_projector", "language_model"}
    assert "language_model.lm_head.weight" in keys and "language_model.model.embed_tokens.weight" in keys
    backbone.save_pretrained(tmp_path)
    reloaded = type(backbone).from_pretrained(tmp_path)
    input_ids = _token_ids(backbone, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=input_ids).last_hidden_state, backbone(input_ids=input_ids).last_hidden_state
        )


@pytest.mark.parametrize("cast", ["to_bf16", "half"])
def test_casting_the_model_keeps_the_complex_vision_rope_table(cast, multimodal):
    import copy

    size = multimodal.config.vision_config.image_size
    pixel_values = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = multimodal.vision_model(pixel_values).last_hidden_state
        low = copy.deepcopy(multimodal)
        low = low.to(torch.bfloat16) if cast == "to_bf16" else low.half()
        assert low.vision_model.rotary_embedding.freqs_ci.is_complex()
        torch.testing.assert_close(
            low.vision_model.rotary_embedding.freqs_ci, multimodal.vision_model.rotary_embedding.freqs_ci
        )
        dtype = low.vision_model.patch_embedding.linear.weight.dtype
        assert dtype in (torch.bfloat16, torch.float16)
        if cast == "half":  # fp16 matmuls are not all implemented on CPU: compare the table itself only
            return
        output = low.vision_model(pixel_values.to(dtype)).last_hidden_state.float()
    error = (output - reference).abs().max() / reference.abs().max()
    assert error < 0.05  # bf16 noise; the real-cast table gave errors of ~0.3 relative


# Which classes the Auto API and TRL's model loader build for a Llama 4 checkpoint, in a fresh interpreter.
REGISTRATION_SCRIPT = """
import json, sys
mode, checkpoint = sys.argv[1:]
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
if mode != "never_imported":
    import modeling_llama4
import trl.trainer.dpo_trainer, trl.trainer.utils

def classes():
    text = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint).get_text_config())
    multimodal = AutoModelForImageTextToText.from_pretrained(checkpoint)
    reference = trl.trainer.dpo_trainer.create_model_from_path(checkpoint)  # how DPO/KTO/GRPO/RLOO load it
    return [type(m).__module__ for m in (AutoConfig.from_pretrained(checkpoint), text, multimodal, reference)]

out = {"first": classes()}
if mode == "imported":
    modeling_llama4.unregister()
    out["unregistered"] = classes()
    modeling_llama4.register()
    out["registered_again"] = classes()
print("RESULT" + json.dumps(out))
"""


def _classes_in_fresh_process(mode: str, checkpoint: Path, **env) -> dict:
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run(
        [sys.executable, "-c", REGISTRATION_SCRIPT, mode, str(checkpoint)],
        env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.mark.slow
def test_importing_us_registers_our_classes_reversibly_and_only_then(multimodal, tmp_path):
    multimodal.save_pretrained(tmp_path)
    builtin = ["transformers.models.llama4.configuration_llama4"] + ["transformers.models.llama4.modeling_llama4"] * 3
    ours = ["modeling_llama4.configuration_llama4"] + ["modeling_llama4.modeling_llama4"] * 3
    assert _classes_in_fresh_process("never_imported", tmp_path) == {"first": builtin}
    imported = _classes_in_fresh_process("imported", tmp_path)
    assert imported == {"first": ours, "unregistered": builtin, "registered_again": ours}


def test_opt_out_variable_skips_the_registration(monkeypatch):
    from transformers import AutoConfig

    import modeling_llama4

    modeling_llama4.unregister()
    try:
        monkeypatch.setenv(modeling_llama4.registration.OPT_OUT_ENV, "1")
        modeling_llama4.register_unless_opted_out()  # what `import modeling_llama4` runs
        assert not modeling_llama4.is_registered()
        assert type(AutoConfig.for_model("llama4_text")) is transformers.Llama4TextConfig
        monkeypatch.delenv(modeling_llama4.registration.OPT_OUT_ENV)
        modeling_llama4.register_unless_opted_out()
        assert modeling_llama4.is_registered()
        assert type(AutoConfig.for_model("llama4_text")) is Llama4TextConfig
    finally:
        modeling_llama4.register()


@pytest.mark.slow
def test_flex_attention_on_cpu_matches_sdpa_with_padding_and_refuses_training(monkeypatch):
    # transformers compiles flex with max-autotune, minutes on this CPU: take its uncompiled path (same masks, same
    # kernel semantics), the one it uses inside an outer torch.compile.
    import transformers.integrations.flex_attention as flex_integration

    monkeypatch.setattr(flex_integration, "is_torchdynamo_compiling", lambda: True)
    torch.manual_seed(0)
    model = Llama4ForCausalLM(Llama4TextConfig(**tiny_text_kwargs(num_hidden_layers=2, attention_chunk_size=8)))
    input_ids = torch.randint(3, 90, (2, 20))
    mask = torch.ones_like(input_ids)
    mask[0, :10] = 0  # left padding covering a whole chunk: fully masked query rows
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    model.eval()
    with torch.no_grad():
        sdpa = model(input_ids, attention_mask=mask).logits
        sdpa_tokens = model.generate(input_ids, attention_mask=mask, **kwargs)
        model.set_attn_implementation("flex_attention")
        flex = model(input_ids, attention_mask=mask).logits
        flex_tokens = model.generate(input_ids, attention_mask=mask, **kwargs)
    assert not flex.isnan().any()
    torch.testing.assert_close(flex[mask.bool()], sdpa[mask.bool()], atol=1e-5, rtol=1e-5)
    assert torch.equal(flex_tokens, sdpa_tokens)
    model.train()
    with pytest.raises(ValueError, match="no backward pass on CPU.*attn_implementation='sdpa'"):
        model(input_ids, attention_mask=mask, labels=input_ids)
