"""The Hub round trip against a local Hub-compatible server: push, remote-code pull, offline re-pull,
official-layout repos, and clear errors for broken repos."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from hub_server import LocalHub, hub_env, patch_hub_constants
from huggingface_hub import HfApi
from transformers import AutoTokenizer

from modeling_llama4 import (
    Llama4Config,
    Llama4ForCausalLM,
    Llama4ForConditionalGeneration,
    Llama4TextConfig,
    push_to_hub,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "hub_configs" / "tiny"

# Runs in a fresh interpreter where `modeling_llama4` cannot be imported, as on a machine without llama4-hf.
PULL_SCRIPT = """
import json, sys
sys.modules["modeling_llama4"] = None
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
text_repo, multimodal_repo, inputs_path, out_path = sys.argv[1:]
inputs = torch.load(inputs_path)
text = AutoModelForCausalLM.from_pretrained(text_repo, trust_remote_code=True).eval()
multimodal = AutoModelForImageTextToText.from_pretrained(multimodal_repo, trust_remote_code=True).eval()
builtin_text = AutoModelForCausalLM.from_pretrained(text_repo).eval()
builtin_multimodal = AutoModelForImageTextToText.from_pretrained(multimodal_repo).eval()
tokenizer = AutoTokenizer.from_pretrained(multimodal_repo)
with torch.no_grad():
    out = {
        "text": text(inputs["text_ids"]).logits,
        "multimodal": multimodal(input_ids=inputs["mm_ids"], pixel_values=inputs["pixel_values"]).logits,
        "builtin_text": builtin_text(inputs["text_ids"]).logits,
        "builtin_multimodal_text_part": builtin_multimodal.language_model(inputs["text_ids"]).logits,
    }
out["classes"] = {name: f"{type(m).__module__}.{type(m).__name__}" for name, m in
                  [("text", text), ("multimodal", multimodal), ("builtin_text", builtin_text),
                   ("builtin_multimodal", builtin_multimodal)]}
out["tokenizer_len"] = len(tokenizer)
torch.save(out, out_path)
"""


def pull_in_fresh_process(hub, cache: Path, tmp_path: Path, inputs: dict, offline: bool = False) -> dict:
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, **hub_env(hub, cache, offline=offline)}
    result = subprocess.run(
        [sys.executable, "-c", PULL_SCRIPT, "org/tiny-text", "org/tiny-mm", tmp_path / "inputs.pt", tmp_path / "o.pt"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "o.pt")


@pytest.fixture(scope="module")
def hub():
    with LocalHub() as server:
        yield server


@pytest.fixture(autouse=True)
def _online(hub_online):
    pass


@pytest.mark.slow
def test_push_then_pull_with_remote_code_and_builtin_then_offline(hub, tmp_path):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    text_model = Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY)).eval()
    multimodal = Llama4ForConditionalGeneration(Llama4Config.from_pretrained(TINY)).eval()
    with patch_hub_constants(hub, tmp_path / "push-cache"):
        push_to_hub(text_model, "org/tiny-text", processor=tokenizer, recipe="Random init (test).")
        push_to_hub(multimodal, "org/tiny-mm", processor=tokenizer, eval_results={"math500": 0.25})

    files = set(HfApi(endpoint=hub.endpoint).list_repo_files("org/tiny-mm"))
    shipped = {
        "modeling_llama4.py",
        "configuration_llama4.py",
        "moe.py",
        "cpu_experts.py",
        "router_losses.py",
        "vision.py",
    }
    assert shipped | {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= files
    config = json.loads(hub.read_file("org/tiny-mm", "config.json"))
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_llama4.Llama4ForConditionalGeneration"
    card = hub.read_file("org/tiny-mm", "README.md").decode()
    assert "4 routed experts, top-1" in card and "| math500 | 0.25 |" in card and "total" in card
    assert "Random init (test)." in hub.read_file("org/tiny-text", "README.md").decode()
    assert len(HfApi(endpoint=hub.endpoint).list_repo_commits("org/tiny-mm")) == 2  # repo creation + one upload

    mm_ids = tokenizer(["look " + "<|image_start|><|image|>" + "<|patch|>" * 4 + "<|image_end|> ok"]).input_ids
    inputs = {
        "text_ids": torch.randint(3, 800, (2, 40)),
        "mm_ids": torch.tensor(mm_ids),
        "pixel_values": torch.randn(1, 3, 56, 56),
    }
    with torch.no_grad():
        expected_text = text_model(inputs["text_ids"]).logits
        expected_mm = multimodal(input_ids=inputs["mm_ids"], pixel_values=inputs["pixel_values"]).logits
        expected_mm_text = multimodal.language_model(inputs["text_ids"]).logits

    cache = tmp_path / "pull-cache"
    online = pull_in_fresh_process(hub, cache, tmp_path, inputs)
    assert online["classes"]["text"].startswith("transformers_modules.") and online["classes"]["text"].endswith(
        "modeling_llama4.Llama4ForCausalLM"
    )
    assert online["classes"]["multimodal"].endswith("modeling_llama4.Llama4ForConditionalGeneration")
    assert online["classes"]["builtin_text"] == "transformers.models.llama4.modeling_llama4.Llama4ForCausalLM"
    assert online["classes"]["builtin_multimodal"].startswith("transformers.models.llama4.")
    assert torch.equal(online["text"], expected_text)
    assert torch.equal(online["multimodal"], expected_mm)
    assert (online["builtin_text"] - expected_text).abs().max() <= 1e-4
    assert (online["builtin_multimodal_text_part"] - expected_mm_text).abs().max() <= 1e-4
    assert online["tokenizer_len"] == len(tokenizer)

    hub.clear_requests()
    offline = pull_in_fresh_process(hub, cache, tmp_path, inputs, offline=True)
    assert hub.requests == []  # everything came from the cache
    for key in ("text", "multimodal", "builtin_text"):
        assert torch.equal(offline[key], online[key])


def test_official_layout_repo_loads_into_our_classes(hub, tmp_path):
    torch.manual_seed(1)
    builtin = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config.from_pretrained(TINY)).eval()
    builtin.save_pretrained(tmp_path / "official")
    config = json.loads((tmp_path / "official" / "config.json").read_text())
    assert "auto_map" not in config
    config["text_config"]["attn_temperature_tuning"] = 4  # as in Meta's Scout config.json
    (tmp_path / "official" / "config.json").write_text(json.dumps(config))
    api = HfApi(endpoint=hub.endpoint)
    api.create_repo("meta-test/Llama-4-Tiny-16E")
    api.upload_folder(repo_id="meta-test/Llama-4-Tiny-16E", folder_path=tmp_path / "official")

    input_ids = torch.randint(3, 800, (1, 40))
    with patch_hub_constants(hub, tmp_path / "cache"):
        multimodal = Llama4ForConditionalGeneration.from_pretrained("meta-test/Llama-4-Tiny-16E").eval()
        text = Llama4ForCausalLM.from_pretrained("meta-test/Llama-4-Tiny-16E").eval()
    assert multimodal.config.text_config.attn_temperature_tuning is True
    with torch.no_grad():
        expected = builtin.language_model(input_ids).logits
        assert (multimodal(input_ids=input_ids).logits - expected).abs().max() <= 1e-4
        assert (text(input_ids).logits - expected).abs().max() <= 1e-4


@pytest.fixture
def tiny_text_folder(tmp_path):
    torch.manual_seed(2)
    model = Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    model.save_pretrained(tmp_path / "single")
    return tmp_path


def _no_partial_downloads(cache: Path) -> bool:
    return not list(cache.rglob("*.incomplete")) and not list(cache.rglob("*.lock.tmp"))


def test_missing_shard_is_a_clear_error(hub, tiny_text_folder):
    api = HfApi(endpoint=hub.endpoint)
    api.create_repo("org/missing-shard")
    api.upload_folder(repo_id="org/missing-shard", folder_path=tiny_text_folder / "sharded")
    index = json.loads((tiny_text_folder / "sharded" / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[1]
    hub.delete_file("org/missing-shard", missing)
    cache = tiny_text_folder / "cache"
    with patch_hub_constants(hub, cache), pytest.raises(OSError, match=f"missing a weight shard.*{missing}"):
        Llama4ForCausalLM.from_pretrained("org/missing-shard")
    assert _no_partial_downloads(cache)


def test_corrupt_safetensors_names_the_file(hub, tiny_text_folder):
    api = HfApi(endpoint=hub.endpoint)
    api.create_repo("org/corrupt")
    api.upload_folder(repo_id="org/corrupt", folder_path=tiny_text_folder / "single")
    weights = (tiny_text_folder / "single" / "model.safetensors").read_bytes()
    hub.replace_file("org/corrupt", "model.safetensors", weights[: len(weights) // 2])
    cache = tiny_text_folder / "cache"
    with patch_hub_constants(hub, cache), pytest.raises(OSError, match="model.safetensors is corrupt or truncated"):
        Llama4ForCausalLM.from_pretrained("org/corrupt")
    assert _no_partial_downloads(cache)


def test_config_of_another_architecture_is_refused(hub, tmp_path):
    mistral = transformers.MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    transformers.MistralForCausalLM(mistral).save_pretrained(tmp_path / "mistral")
    api = HfApi(endpoint=hub.endpoint)
    api.create_repo("org/mistral")
    api.upload_folder(repo_id="org/mistral", folder_path=tmp_path / "mistral")
    with patch_hub_constants(hub, tmp_path / "cache"):
        with pytest.raises(ValueError, match="model_type='mistral'.*not 'llama4_text'"):
            Llama4ForCausalLM.from_pretrained("org/mistral")
        with pytest.raises(ValueError, match="model_type='mistral'.*not 'llama4'"):
            Llama4ForConditionalGeneration.from_pretrained("org/mistral")


def _tiny_text_model() -> Llama4ForCausalLM:
    torch.manual_seed(3)
    return Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY)).eval()


def _peft_model() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(_tiny_text_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


def _int4_peft_model() -> torch.nn.Module:
    from peft import get_peft_model

    from modeling_llama4 import Int4Config, quantize_model
    from modeling_llama4.int4_lora import int4_lora_config

    return get_peft_model(quantize_model(_tiny_text_model(), Int4Config(group_size=32)), int4_lora_config(r=2))


def _gpt2() -> torch.nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))


@pytest.mark.parametrize(
    "make_model, kwargs, error, message",
    [
        (lambda: str(TINY), {}, TypeError, r"takes the model object, not the string .*Llama4ForCausalLM.from_pretr"),
        (_gpt2, {}, TypeError, r"not transformers\..*GPT2LMHeadModel \(model_type 'gpt2'\).*their own"),
        (_peft_model, {}, TypeError, r"PEFT adapters.*adapter alone.*merged = model\.merge_and_unload\(\)"),
        (_int4_peft_model, {}, TypeError, r"PEFT adapters.*merged = modeling_llama4\.int4_lora\.merge_int4_lora"),
        (
            _tiny_text_model,
            {"eval_results": {"math500": "61%"}},
            TypeError,
            r"eval_results\['math500'\] is '61%' \(str\); eval results must be numbers, e\.g\. 0\.61",
        ),
        (_tiny_text_model, {"eval_results": [0.61]}, TypeError, r"eval_results must be a dict.*not list"),
        (_tiny_text_model, {"processor": str(TINY)}, TypeError, r"processor must be a tokenizer.*AutoTokenizer"),
        (_tiny_text_model, {"repo_id": "org/bad name!"}, ValueError, r"Repo id must use alphanumeric"),
    ],
    ids=["path", "gpt2", "peft", "int4-peft", "eval-string", "eval-list", "processor-path", "repo-id"],
)
def test_bad_push_is_refused_before_any_hub_call(hub, tmp_path, make_model, kwargs, error, message):
    kwargs = dict(kwargs)  # the parametrize dict is shared between runs
    repo_id = kwargs.pop("repo_id", "org/never-created")
    model = make_model()
    hub.clear_requests()
    with patch_hub_constants(hub, tmp_path / "cache"), pytest.raises(error, match=message):
        push_to_hub(model, repo_id, **kwargs)
    assert hub.requests == [] and not hub.repo_exists(repo_id)  # no empty repo left behind


def test_failed_save_leaves_no_repo_and_numpy_scores_are_written_as_numbers(hub, tmp_path, monkeypatch):
    import numpy as np

    def disk_full(folder):
        raise OSError("disk full")

    model = _tiny_text_model()
    with patch_hub_constants(hub, tmp_path / "cache"):
        with monkeypatch.context() as patch:
            patch.setattr(model, "save_pretrained", disk_full)
            with pytest.raises(OSError, match="disk full"):
                push_to_hub(model, "org/save-fails")
        assert not hub.repo_exists("org/save-fails")
        push_to_hub(model, "org/numpy-scores", eval_results={"math500": np.float32(0.5), "gsm8k": torch.tensor(0.25)})
    assert json.loads(hub.read_file("org/numpy-scores", "eval_results.json")) == {"math500": 0.5, "gsm8k": 0.25}
    assert "| gsm8k | 0.25 |" in hub.read_file("org/numpy-scores", "README.md").decode()


@pytest.mark.skipif(
    not os.environ.get("HF_TOKEN") or os.environ.get("HF_HUB_OFFLINE") == "1",
    reason="real-Hub round trip needs HF_TOKEN and network",
)
def test_real_hub_round_trip(tmp_path):
    import uuid

    api = HfApi()
    repo_id = f"{api.whoami()['name']}/llama4-hf-test-{uuid.uuid4().hex[:8]}"
    model = Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY)).eval()
    try:
        push_to_hub(model, repo_id, private=True)
        pulled = transformers.AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True).eval()
        input_ids = torch.randint(3, 800, (1, 20))
        with torch.no_grad():
            assert torch.equal(pulled(input_ids).logits, model(input_ids).logits)
    finally:
        api.delete_repo(repo_id, missing_ok=True)
