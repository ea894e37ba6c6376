"""`--push_to_hub` in a recipe uploads the final model with its code, tokenizer and model card in one commit."""

import json

import pytest
from hub_server import LocalHub, patch_hub_constants
from huggingface_hub import HfApi
from trl import ModelConfig, SFTConfig, TrlParser

from recipes import pretrain


@pytest.fixture(scope="module")
def hub():
    with LocalHub() as server:
        yield server


@pytest.mark.slow
def test_recipe_push_to_hub_ships_weights_code_tokenizer_and_card(hub, hub_online, tmp_path):
    argv = [
        "--model_name_or_path", "hub_configs/tiny", "--from_scratch", "true", "--output_dir", str(tmp_path / "out"),
        "--corpus_documents", "16", "--heldout_problems", "4", "--heldout_max_new_tokens", "4",
        "--max_steps", "1", "--per_device_train_batch_size", "4", "--max_length", "64", "--use_cpu", "true",
        "--report_to", "none", "--push_to_hub", "true", "--hub_model_id", "org/tiny-pretrained",
    ]  # fmt: skip
    args = TrlParser((pretrain.PretrainScriptArguments, SFTConfig, ModelConfig)).parse_args_and_config(argv)
    with patch_hub_constants(hub, tmp_path / "cache"):
        results = pretrain.main(*args)

    api = HfApi(endpoint=hub.endpoint)
    files = set(api.list_repo_files("org/tiny-pretrained"))
    expected = {"model.safetensors", "config.json", "modeling_llama4.py", "moe.py", "tokenizer.json", "README.md"}
    assert expected <= files and not any(name.startswith("checkpoint-") for name in files)
    assert len(api.list_repo_commits("org/tiny-pretrained")) == 2  # repo creation + one upload
    card = hub.read_file("org/tiny-pretrained", "README.md").decode()
    assert "pretrain" in card
    uploaded = json.loads(hub.read_file("org/tiny-pretrained", "eval_results.json"))
    assert uploaded == {"heldout_accuracy": results["heldout"]["accuracy"]}
