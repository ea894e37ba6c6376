"""Batched generation and the `python -m eval` runner end to end on the tiny random model, including resume."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import eval.runner
from eval.generation import generate_completions
from eval.runner import SampleCache, main
from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
TINY = Path(__file__).resolve().parents[1] / "hub_configs" / "tiny"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Generation on a 0.5M-parameter model is all small ops: extra threads only contend on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY)).eval(), AutoTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    model, tokenizer = tiny
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


PROMPTS = [
    [{"role": "user", "content": "What is 2 + 2? Put the answer in a box."}],
    [{"role": "user", "content": "hi"}],
    "a plain text prompt, no chat template",
]


def test_generate_batched_greedy_equals_one_by_one(tiny):
    model, tokenizer = tiny
    batched = generate_completions(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3, progress=False)
    single = [generate_completions(model, tokenizer, [p], max_new_tokens=6, progress=False)[0] for p in PROMPTS]
    assert batched == single
    assert all(len(samples) == 1 and isinstance(samples[0], str) for samples in batched)


def test_generate_left_pads_chat_prompts_and_restores_the_tokenizer(tiny, monkeypatch):
    model, tokenizer = tiny
    tokenizer.padding_side = "right"
    seen = []
    real_generate = model.generate

    def spy(**kwargs):
        seen.append(kwargs["input_ids"].clone())
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    generate_completions(model, tokenizer, PROMPTS[:2], max_new_tokens=2, progress=False)
    ids = seen[0]
    assert (ids[:, -1] != tokenizer.pad_token_id).all()  # left padding: every row ends in its own last token
    assert ids[1, 0] == tokenizer.pad_token_id  # the short prompt is padded on the left
    # The chat template (with its BOS and assistant header) is used, and BOS is not doubled.
    header = tokenizer.convert_tokens_to_ids("<|header_start|>")
    assert (ids == header).sum(dim=1).tolist() == [2, 2]
    assert ((ids == tokenizer.bos_token_id).sum(dim=1) == 1).all()
    assert tokenizer.padding_side == "right"


def test_generate_samples(tiny):
    model, tokenizer = tiny
    out = generate_completions(
        model, tokenizer, PROMPTS[:2], max_new_tokens=6, num_samples=3, temperature=1.0, batch_size=4, progress=False
    )
    assert [len(samples) for samples in out] == [3, 3]
    assert len(set(out[0])) > 1  # sampled, not copies
    again = generate_completions(
        model, tokenizer, PROMPTS[:2], max_new_tokens=6, num_samples=3, temperature=1.0, batch_size=4, progress=False
    )
    assert again == out  # seeded


def run(tiny_dir, output_dir, *extra):
    argv = ["--model", str(tiny_dir), "--data_dir", str(FIXTURES), "--output_dir", str(output_dir)]
    return main([*argv, "--max_new_tokens", "4", "--no_progress", *extra])


def test_end_to_end_all_tasks(tiny_dir, tmp_path):
    results = run(tiny_dir, tmp_path, "--tasks", "math500,gpqa_diamond,mgsm,global_mmlu", "--limit", "2")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == results
    counts = {name: scores["num_examples"] for name, scores in saved["tasks"].items()}
    assert counts == {"math500": 2, "gpqa_diamond": 2, "mgsm": 2 * 11, "global_mmlu": 4}  # --limit per language
    for scores in saved["tasks"].values():
        assert 0.0 <= scores["accuracy"] <= 1.0
    assert set(saved["tasks"]["mgsm"]["subsets"]) == {"bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh"}
    assert "| mgsm | accuracy |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    # GPQA outputs keep ids, letters and permutations, never the question.
    gpqa = (tmp_path / "samples" / "gpqa_diamond.jsonl").read_text() + (
        tmp_path / "cache" / "gpqa_diamond.jsonl"
    ).read_text()
    assert "SYNTHETIC" not in gpqa and "prompt" not in gpqa and "permutation" in gpqa
    math = [json.loads(line) for line in (tmp_path / "samples" / "math500.jsonl").read_text().splitlines()]
    assert math[0]["prompt"][0]["role"] == "user" and len(math[0]["completions"]) == 1


def count_generated(monkeypatch, fail_after: int | None = None) -> list[int]:
    """Record how many prompts each generate_completions call gets; optionally crash after `fail_after` prompts."""
    counts = []
    real = eval.runner.generate_completions

    def wrapper(model, tokenizer, prompts, **kwargs):
        counts.append(len(prompts))
        if fail_after is not None:
            save, done = kwargs["on_prompt_done"], []

            def crash(index, completions):
                if len(done) == fail_after:
                    raise KeyboardInterrupt
                done.append(index)
                save(index, completions)

            kwargs["on_prompt_done"] = crash
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(eval.runner, "generate_completions", wrapper)
    return counts


def test_resume_does_not_regenerate(tiny_dir, tmp_path, monkeypatch):
    counts = count_generated(monkeypatch)
    first = run(tiny_dir, tmp_path, "--tasks", "math500", "--limit", "2", "--batch_size", "1")
    assert counts == [2]
    again = run(tiny_dir, tmp_path, "--tasks", "math500", "--limit", "2")
    assert counts == [2]  # nothing generated
    assert again["tasks"]["math500"]["generated"] == 0
    assert again["tasks"]["math500"]["accuracy"] == first["tasks"]["math500"]["accuracy"]
    run(tiny_dir, tmp_path, "--tasks", "math500", "--limit", "4")
    assert counts == [2, 2]  # only the two new examples
    run(tiny_dir, tmp_path, "--tasks", "math500", "--limit", "4", "--max_new_tokens", "5")
    assert counts == [2, 2, 4]  # other settings: the cached outputs do not apply


def test_crashed_run_resumes_where_it_stopped(tiny_dir, tmp_path, monkeypatch):
    counts = count_generated(monkeypatch, fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        run(
            tiny_dir, tmp_path, "--tasks", "mgsm", "--limit", "1", "--batch_size", "2", "--languages", "de,en,fr,zh,ja"
        )
    # A torn last line, as a crash mid-write leaves it, is skipped.
    with (tmp_path / "cache" / "mgsm.jsonl").open("a") as f:
        f.write('{"id": "de/0", "key": "abc", "compl')
    assert len(SampleCache(tmp_path / "cache" / "mgsm.jsonl").entries) == 3
    counts = count_generated(monkeypatch)
    results = run(tiny_dir, tmp_path, "--tasks", "mgsm", "--limit", "1", "--languages", "de,en,fr,zh,ja")
    assert counts == [2] and results["tasks"]["mgsm"]["num_examples"] == 5


def test_num_samples_reports_pass_and_maj_at_k(tiny_dir, tmp_path):
    results = run(tiny_dir, tmp_path, "--tasks", "gpqa_diamond", "--limit", "2", "--num_samples", "4")
    scores = results["tasks"]["gpqa_diamond"]
    assert results["config"]["temperature"] == 0.6  # sampling by default with several samples
    assert {"accuracy", "pass@1", "pass@2", "pass@4", "maj@1", "maj@2", "maj@4"} <= set(scores)
    cached = [json.loads(line) for line in (tmp_path / "cache" / "gpqa_diamond.jsonl").read_text().splitlines()]
    assert [len(c["completions"]) for c in cached] == [4, 4]


def test_missing_data_exits_with_the_fix_before_loading_the_model(tmp_path):
    with pytest.raises(SystemExit, match="--data_dir must contain math500/test.jsonl"):
        main(["--model", str(tmp_path / "no-model"), "--tasks", "math500", "--data_dir", str(tmp_path)])
