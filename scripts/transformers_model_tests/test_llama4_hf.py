"""transformers' own common model tests (`ModelTesterMixin`, tests/test_modeling_common.py of the installed
transformers release) run on our classes. `run.sh` fetches that release's test files and runs this module
among them; nothing here is copied from transformers, only the model testers (inputs and tiny configs) are ours.
"""

import unittest

import torch
from transformers.testing_utils import require_torch, torch_device

from modeling_llama4 import (
    Llama4Config,
    Llama4ForCausalLM,
    Llama4ForConditionalGeneration,
    Llama4TextConfig,
    Llama4TextModel,
)

from ...test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor

TEXT_CONFIG = {
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 37,
    "intermediate_size_mlp": 64,
    "num_local_experts": 4,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 2,  # layer 0 dense, layer 1 MoE
    "attention_chunk_size": 4,  # shorter than the inputs, so chunked attention is exercised
    "max_position_embeddings": 64,
    "pad_token_id": 0,
}


class TextModelTester:
    def __init__(self, parent: unittest.TestCase) -> None:
        self.parent = parent
        self.batch_size, self.seq_length, self.is_training = 3, 7, True
        self.vocab_size, self.hidden_size = TEXT_CONFIG["vocab_size"], TEXT_CONFIG["hidden_size"]
        self.num_hidden_layers = TEXT_CONFIG["num_hidden_layers"]
        self.num_attention_heads = TEXT_CONFIG["num_attention_heads"]

    def get_config(self) -> Llama4TextConfig:
        return Llama4TextConfig(**TEXT_CONFIG)

    def prepare_config_and_inputs_for_common(self) -> tuple[Llama4TextConfig, dict]:
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        return self.get_config(), {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@require_torch
class Llama4HfTextModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (Llama4TextModel, Llama4ForCausalLM)
    test_can_init_all_missing_weights_before_2023 = True  # run it: the model file's year would skip it

    def setUp(self) -> None:
        self.model_tester = TextModelTester(self)


class MultimodalModelTester:
    """Image tokens first, then text, as transformers' own Llama 4 tester lays them out."""

    def __init__(self, parent: unittest.TestCase) -> None:
        self.parent = parent
        self.image_token_index, self.pad_token_id = 0, 1
        self.text_config = {**TEXT_CONFIG, "pad_token_id": 1, "attention_chunk_size": 8}
        self.vision_config = {
            "vision_output_dim": 32,
            "hidden_size": 32,
            "image_size": 8,
            "patch_size": 2,
            "num_channels": 3,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "pixel_shuffle_ratio": 0.5,
            "projector_input_dim": 32,
            "projector_output_dim": 32,
        }
        self.batch_size, self.is_training = 3, True
        self.vocab_size, self.hidden_size = 99, 32
        self.num_hidden_layers, self.num_attention_heads = 2, 4
        self.num_image_tokens = (8 // 2) ** 2 // 4  # 16 patches, pixel shuffle 0.5: 4 tokens per image
        self.seq_length = self.encoder_seq_length = 7 + self.num_image_tokens

    def get_config(self) -> Llama4Config:
        return Llama4Config(
            text_config=self.text_config, vision_config=self.vision_config, image_token_index=self.image_token_index
        )

    def prepare_config_and_inputs_for_common(self) -> tuple[Llama4Config, dict]:
        config = self.get_config()
        pixel_values = floats_tensor([self.batch_size, 3, 8, 8])
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 1) + 1
        attention_mask = input_ids.ne(self.pad_token_id).to(torch_device)
        input_ids[input_ids == config.image_token_index] = self.pad_token_id
        input_ids[:, : self.num_image_tokens] = config.image_token_index
        return config, {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


@require_torch
class Llama4HfMultimodalModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (Llama4ForConditionalGeneration,)
    _is_composite = True
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self) -> None:
        self.model_tester = MultimodalModelTester(self)

    def test_inputs_embeds(self) -> None:
        # The common test keeps pixel_values beside inputs_embeds; an image model takes one or the other.
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        model = Llama4ForConditionalGeneration(config).to(torch_device).eval()
        inputs = dict(inputs_dict)
        input_ids = inputs.pop("input_ids")
        del inputs["pixel_values"]
        with torch.no_grad():
            model(inputs_embeds=model.get_input_embeddings()(input_ids), **inputs)

    def test_mismatching_num_image_tokens(self) -> None:
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = Llama4ForConditionalGeneration(config).to(torch_device)
        model(**inputs)
        with self.assertRaises(ValueError):  # one image for three prompts' image tokens
            model(**{**inputs, "pixel_values": inputs["pixel_values"][-1:]})
        input_ids = torch.cat([inputs["input_ids"][:1]] * 2)
        with self.assertRaises(ValueError):  # two prompts with an image each, one image
            model(input_ids=input_ids, pixel_values=inputs["pixel_values"][:1])
        model(input_ids=input_ids, pixel_values=torch.cat([inputs["pixel_values"][:1]] * 2))
