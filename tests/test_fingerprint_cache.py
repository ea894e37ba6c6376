"""One weights fingerprint keys every sample cache; the eval cache regenerates for a model retrained in place."""

import copy
from pathlib import Path

import torch
from transformers import AutoTokenizer

import recipes.sampling
import recipes.trainers.teachers
from eval.runner import main
from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from modeling_llama4.fingerprint import prompting_fingerprint, weights_fingerprint

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
TINY = Path(__file__).resolve().parents[1] / "hub_configs" / "tiny"


def tiny_model(seed: int = 0) -> Llama4ForCausalLM:
    torch.manual_seed(seed)
    return Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY)).eval()


def test_fingerprint_follows_the_weights_not_the_object_or_path(tmp_path):
    model = tiny_model()
    key = weights_fingerprint(model)
    assert weights_fingerprint(copy.deepcopy(model)) == key
    model.save_pretrained(tmp_path)
    assert weights_fingerprint(Llama4ForCausalLM.from_pretrained(tmp_path)) == key  # another path, same weights
    with torch.no_grad():
        model.model.layers[1].feed_forward.experts.down_proj[0, 0, 0] += 1e-3  # one expert weight
    assert weights_fingerprint(model) != key
    assert weights_fingerprint(tiny_model(seed=1)) != key


def test_recipes_and_teachers_use_the_one_fingerprint():
    assert recipes.sampling.weights_fingerprint is weights_fingerprint
    assert recipes.trainers.teachers.teacher_fingerprint is weights_fingerprint


def test_eval_cache_regenerates_for_a_model_retrained_at_the_same_path(tmp_path):
    checkpoint, output = tmp_path / "model", tmp_path / "eval"
    AutoTokenizer.from_pretrained(TINY).save_pretrained(checkpoint)
    argv = ["--model", str(checkpoint), "--data_dir", str(FIXTURES), "--output_dir", str(output),
            "--tasks", "math500", "--limit", "2", "--max_new_tokens", "3", "--no_progress"]  # fmt: skip
    tiny_model(seed=0).save_pretrained(checkpoint)
    assert main(argv)["tasks"]["math500"]["generated"] == 2
    assert main(argv)["tasks"]["math500"]["generated"] == 0  # same weights: served from the cache
    tiny_model(seed=1).save_pretrained(checkpoint)  # "retrained" in place
    assert main(argv)["tasks"]["math500"]["generated"] == 2


def test_eval_cache_regenerates_after_the_chat_template_or_generation_config_changes(tmp_path):
    checkpoint, output = tmp_path / "model", tmp_path / "eval"
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    tokenizer.save_pretrained(checkpoint)
    model = tiny_model(seed=0)
    model.save_pretrained(checkpoint)
    argv = ["--model", str(checkpoint), "--data_dir", str(FIXTURES), "--output_dir", str(output),
            "--tasks", "math500", "--limit", "2", "--max_new_tokens", "3", "--no_progress"]  # fmt: skip
    assert main(argv)["tasks"]["math500"]["generated"] == 2
    tokenizer.chat_template = "Answer briefly. " + tokenizer.chat_template  # a fixed template, same weights
    tokenizer.save_pretrained(checkpoint)
    assert main(argv)["tasks"]["math500"]["generated"] == 2
    assert main(argv)["tasks"]["math500"]["generated"] == 0
    model.generation_config.eos_token_id = [2, 5]  # another stop token
    model.save_pretrained(checkpoint)
    assert main(argv)["tasks"]["math500"]["generated"] == 2


def test_prompting_fingerprint_reads_a_processors_template_too():
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    key = prompting_fingerprint(tokenizer)

    class Processor:  # a processor holds the template itself and its tokenizer
        def __init__(self, template: str) -> None:
            self.chat_template, self.tokenizer = template, tokenizer

    assert prompting_fingerprint(Processor(tokenizer.chat_template)) == key
    assert prompting_fingerprint(Processor("{{ messages }}")) != key
