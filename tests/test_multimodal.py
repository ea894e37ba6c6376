"""Early fusion against transformers' built-in Llama4ForConditionalGeneration on the same weights.

transformers 5.24.0's `Llama4ForConditionalGeneration.forward` crashes at its last line
(`outputs.image_outputs` on the text model's output), so the reference runs the built-in's own modules
in the order its forward does: embeddings, `get_image_features`, `multi_modal_projector`,
`get_placeholder_mask` + `masked_scatter`, then the built-in `language_model`.
"""

from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoTokenizer, Llama4Processor

from modeling_llama4 import Llama4Config, Llama4ForConditionalGeneration

TINY = Path(__file__).resolve().parents[1] / "hub_configs" / "tiny"
ATOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.Llama4Config.from_pretrained(TINY)
    builtin = transformers.Llama4ForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("builtin")
    builtin.save_pretrained(path)
    ours, info = Llama4ForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return builtin, ours.eval()


def tokens_per_tile(config) -> int:
    vision = config.vision_config
    return int((vision.image_size // vision.patch_size) ** 2 * vision.pixel_shuffle_ratio**2)


def image_prompt(tokenizer, config, texts_and_images: list) -> str:
    """A prompt laid out exactly as Llama4Processor does (its own `_prompt_split_image`)."""
    pieces = []
    for item in texts_and_images:
        if isinstance(item, str):
            pieces.append(item)
        else:  # (tiles_high, tiles_wide) aspect ratio of one image
            pieces.append(Llama4Processor._prompt_split_image(None, item, tokens_per_tile(config)))
    return "".join(pieces)


def tiles_for(aspect_ratios: list[tuple[int, int]], image_size: int) -> torch.Tensor:
    """Random pixel tiles: h*w tiles plus the global tile for multi-tile images, one tile otherwise."""
    count = sum(h * w + 1 if h * w > 1 else 1 for h, w in aspect_ratios)
    return torch.randn(count, 3, image_size, image_size)


def batch(tokenizer, config, rows: list[list]):
    prompts = [image_prompt(tokenizer, config, row) for row in rows]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
    aspect_ratios = [item for row in rows for item in row if not isinstance(item, str)]
    pixel_values = tiles_for(aspect_ratios, config.vision_config.image_size) if aspect_ratios else None
    return encoded.input_ids, encoded.attention_mask, pixel_values


def builtin_inputs_embeds(builtin, input_ids, pixel_values):
    inputs_embeds = builtin.get_input_embeddings()(input_ids)
    if pixel_values is None:
        return inputs_embeds
    features = builtin.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
    projected = builtin.multi_modal_projector(features.view(-1, features.size(-1)))
    mask = builtin.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=projected)
    return inputs_embeds.masked_scatter(mask, projected)


def builtin_logits(builtin, input_ids, attention_mask, pixel_values):
    inputs_embeds = builtin_inputs_embeds(builtin, input_ids, pixel_values)
    return builtin.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits


ROWS = {
    "one_image": [["Describe ", (1, 1), " please."]],
    "eight_images_one_prompt": [[f"image {i}: " if j == 0 else (1, 1) for i in range(8) for j in range(2)]],
    "different_counts_per_row": [["a ", (1, 1), " b ", (1, 1)], ["only one ", (1, 1), " here, longer text row"]],
    "text_only_row_with_image_rows": [["What is 2+3? Answer with a number."], ["look ", (1, 1)]],
    "multi_tile_images": [["wide ", (1, 2), " and tall ", (2, 1)], ["grid ", (2, 2)]],
}


@pytest.mark.parametrize("case", ROWS)
def test_logits_match_builtin(models, tokenizer, case):
    builtin, ours = models
    input_ids, attention_mask, pixel_values = batch(tokenizer, ours.config, ROWS[case])
    assert (input_ids == ours.config.image_token_id).any()
    with torch.no_grad():
        expected = builtin_logits(builtin, input_ids, attention_mask, pixel_values)
        actual = ours(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    real = attention_mask.bool()
    assert (expected - actual)[real].abs().max() <= ATOL


def test_images_change_the_logits(models, tokenizer):
    _, ours = models
    input_ids, attention_mask, pixel_values = batch(tokenizer, ours.config, ROWS["one_image"])
    with torch.no_grad():
        first = ours(input_ids=input_ids, pixel_values=pixel_values).logits
        second = ours(input_ids=input_ids, pixel_values=torch.randn_like(pixel_values)).logits
    assert (first - second).abs().max() > 1e-3


def test_generate_with_images_equals_builtin(models, tokenizer):
    builtin, ours = models
    input_ids, attention_mask, pixel_values = batch(tokenizer, ours.config, ROWS["different_counts_per_row"])
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=ours.config.text_config.pad_token_id)
    ours_out = ours.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **kwargs)
    with torch.no_grad():
        inputs_embeds = builtin_inputs_embeds(builtin, input_ids, pixel_values)
    builtin_new = builtin.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
    assert torch.equal(ours_out[:, input_ids.shape[1] :], builtin_new)


def test_ours_saved_loads_into_builtin(tmp_path):
    config = Llama4Config.from_pretrained(TINY)
    ours = Llama4ForConditionalGeneration(config)
    ours.save_pretrained(tmp_path)
    builtin, info = transformers.Llama4ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert set(builtin.state_dict()) == set(ours.state_dict())
    torch.testing.assert_close(
        builtin.state_dict()["language_model.model.layers.0.feed_forward.experts.gate_up_proj"],
        ours.state_dict()["language_model.model.layers.0.feed_forward.experts.gate_up_proj"],
    )


def test_mismatched_image_token_count_names_both_numbers(models, tokenizer):
    _, ours = models
    input_ids, _, pixel_values = batch(tokenizer, ours.config, [["two ", (1, 1), (1, 1)]])
    with pytest.raises(ValueError, match=r"has 8 image tokens .* but the images give 4 features \(1 tiles x 4\)"):
        ours(input_ids=input_ids, pixel_values=pixel_values[:1])


def test_pixel_values_without_image_tokens(models, tokenizer):
    _, ours = models
    input_ids = tokenizer(["no image here"], return_tensors="pt").input_ids
    with pytest.raises(ValueError, match=r"pixel_values for 2 tiles \(8 image features\) but the prompt has 0 image"):
        ours(input_ids=input_ids, pixel_values=torch.randn(2, 3, 56, 56))


def test_image_tokens_without_pixel_values_warn_and_run_as_text(models, tokenizer):
    # A warning, not an error: transformers' model tests run image-token ids without images, as text.
    builtin, ours = models
    input_ids, _, _ = batch(tokenizer, ours.config, ROWS["one_image"])
    with pytest.warns(UserWarning, match="has 4 image tokens .* but no pixel_values were given, so they are read as"):
        logits = ours(input_ids=input_ids).logits
    with torch.no_grad():
        expected = builtin.language_model(input_ids=input_ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_wrong_image_size_names_both_sizes(models, tokenizer):
    _, ours = models
    input_ids, _, _ = batch(tokenizer, ours.config, ROWS["one_image"])
    with pytest.raises(ValueError, match=r"tiles are \(64, 64\) pixels but this vision config expects 56x56"):
        ours(input_ids=input_ids, pixel_values=torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize(
    ("pixel_values", "message"),
    [
        (torch.randn(1, 1, 56, 56), r"shape \(1, 1, 56, 56\); the vision tower takes \(tiles, 3, 56, 56\)"),
        (torch.randn(3, 56, 56), r"shape \(3, 56, 56\).*add a leading dimension"),
        (torch.randint(0, 255, (1, 3, 56, 56), dtype=torch.uint8), r"torch.uint8 \(raw pixel values\?\)"),
    ],
)
def test_pixel_values_of_the_wrong_layout_or_dtype_are_named(pixel_values, message, models, tokenizer):
    _, ours = models
    input_ids, _, _ = batch(tokenizer, ours.config, ROWS["one_image"])
    with pytest.raises(ValueError, match=message):
        ours(input_ids=input_ids, pixel_values=pixel_values)


def test_inconsistent_vision_shapes_fail_at_build_time():
    config = Llama4Config.from_pretrained(TINY)
    config.vision_config.intermediate_size = 100
    with pytest.raises(ValueError, match="pixel shuffle makes 128 channels but the adapter's fc1 expects"):
        Llama4ForConditionalGeneration(config)


def test_text_model_loads_from_a_multimodal_checkpoint_and_saves_the_text_layout(models, tmp_path):
    from safetensors.torch import load_file

    from modeling_llama4 import Llama4ForCausalLM

    builtin, _ = models
    builtin.save_pretrained(tmp_path / "multimodal")
    text, info = Llama4ForCausalLM.from_pretrained(tmp_path / "multimodal", output_loading_info=True)
    assert not info["missing_keys"]
    assert {key.split(".")[0] for key in info["unexpected_keys"]} == {"vision_model", "multi_modal_projector"}
    input_ids = torch.randint(3, 800, (2, 40))
    with torch.no_grad():
        expected = builtin.language_model(input_ids).logits
        assert (text.eval()(input_ids).logits - expected).abs().max() <= ATOL
    text.save_pretrained(tmp_path / "text")
    keys = set(load_file(tmp_path / "text" / "model.safetensors"))
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    assert not any(key.startswith("language_model") for key in keys)
