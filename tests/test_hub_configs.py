"""hub_configs/: official shapes and parameter counts, the tiny tokenizer, and a reproducible build."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from modeling_llama4 import Llama4Config, Llama4ForConditionalGeneration, count_parameters

ROOT = Path(__file__).resolve().parents[1]
HUB_CONFIGS = ROOT / "hub_configs"


@pytest.mark.parametrize(
    ("name", "total_billions", "active_billions"),
    [("scout", 109, 17), ("maverick", 400, 17), ("behemoth", 2000, 288)],
)
def test_parameter_counts_on_meta_device(name, total_billions, active_billions):
    config = Llama4Config.from_pretrained(HUB_CONFIGS / name)
    with torch.device("meta"):
        model = Llama4ForConditionalGeneration(config)
    text_counts = count_parameters(model.language_model)
    counts = count_parameters(model)
    # Meta's figures: total includes the vision encoder, "active" counts the text model only.
    assert counts.total / 1e9 == pytest.approx(total_billions, rel=0.05)
    assert text_counts.active / 1e9 == pytest.approx(active_billions, rel=0.05)
    assert counts.active - text_counts.active == counts.total - text_counts.total  # the encoder is dense


def test_official_shapes():
    scout = Llama4Config.from_pretrained(HUB_CONFIGS / "scout").text_config
    maverick = Llama4Config.from_pretrained(HUB_CONFIGS / "maverick").text_config
    assert (scout.num_local_experts, scout.moe_layers) == (16, list(range(48)))
    assert (maverick.num_local_experts, maverick.moe_layers) == (128, list(range(1, 48, 2)))
    assert scout.use_qk_norm and not maverick.use_qk_norm
    assert scout.rope_parameters["rope_type"] == "llama3" and scout.rope_parameters["factor"] == 16.0
    assert scout.no_rope_layers[:4] == [1, 1, 1, 0]
    behemoth = json.loads((HUB_CONFIGS / "behemoth" / "config.json").read_text())
    assert "inferred" in behemoth["inferred_shape"]


def test_tiny_tokenizer_has_llama4_special_tokens_at_real_offsets():
    tokenizer = AutoTokenizer.from_pretrained(HUB_CONFIGS / "tiny")
    config = Llama4Config.from_pretrained(HUB_CONFIGS / "tiny")
    real_offsets = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|header_start|>": 5, "<|header_end|>": 6}
    real_offsets |= {"<|eom|>": 7, "<|eot|>": 8, "<|finetune_right_pad|>": 18, "<|image_start|>": 80}
    real_offsets |= {"<|image_end|>": 81, "<|tile_x_separator|>": 84, "<|tile_y_separator|>": 85}
    real_offsets |= {"<|image|>": 90, "<|patch|>": 92}
    for token, offset in real_offsets.items():
        assert tokenizer.convert_tokens_to_ids(token) == 896 + offset, token
    assert len(tokenizer) == config.text_config.vocab_size == 1024
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|patch|>")
    assert tokenizer.pad_token == "<|finetune_right_pad|>" and tokenizer.eos_token == "<|eot|>"
    text = "Frage: Lisa hat 12 Bonbons. 答案：8。 \\boxed{8}"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_tiny_chat_template_is_llama4_format_with_assistant_mask():
    tokenizer = AutoTokenizer.from_pretrained(HUB_CONFIGS / "tiny")
    messages = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "\\boxed{5}"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\nWhat is 2+3?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n\\boxed{5}<|eot|>"
    )
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assistant = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(assistant) == "\\boxed{5}<|eot|>"


@pytest.mark.slow
def test_build_script_reproduces_committed_configs(tmp_path):
    subprocess.run([sys.executable, "scripts/build_hub_configs.py", "--out", str(tmp_path)], cwd=ROOT, check=True)
    for built in sorted(tmp_path.rglob("*.json")):
        committed = HUB_CONFIGS / built.relative_to(tmp_path)
        new, old = json.loads(built.read_text()), json.loads(committed.read_text())
        for data in (new, old):
            data.pop("transformers_version", None)
        assert new == old, f"{committed} is stale: re-run scripts/build_hub_configs.py"
