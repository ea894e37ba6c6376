"""The task registry: one definition adds a benchmark; the bundled synthetic task is registered there and the
recipes' held-out evaluation goes through it with unchanged results; BBH's macro averages reach results.json."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from eval import tasks
from eval.grading import extract_boxed, math_answer_correct
from eval.runner import build_parser, main
from eval.synthetic import arithmetic_problems
from eval.tasks import DataSource, Example, Task, chat_examples, get_task, register_task
from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
TINY = Path(__file__).resolve().parents[1] / "hub_configs" / "tiny"


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY)).eval(), AutoTokenizer.from_pretrained(TINY)
    torch.set_num_threads(threads)


def test_one_definition_adds_a_benchmark(monkeypatch, tmp_path):
    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))
    rows = [Example(id="q0", messages=[{"role": "user", "content": "2 + 2?"}], gold="4")]
    task = register_task(Task("toy", lambda source: rows, lambda out, ex: (out.strip() == ex.gold, out), "none"))
    assert get_task("toy") is task
    with pytest.raises(ValueError, match="already registered"):
        register_task(task)
    monkeypatch.setattr("eval.runner.TASKS", tasks.TASKS)
    assert "toy" in build_parser().format_help()


def test_synthetic_task_is_the_recipes_heldout_set():
    examples = get_task("synthetic").load(DataSource())
    rows = arithmetic_problems("test", 200)
    assert [(e.messages, e.gold, e.subset, e.meta["level"]) for e in examples[:200]] == [
        (r["prompt"], r["answer"], r["language"], r["level"]) for r in rows
    ]
    only_de = get_task("synthetic").load(DataSource(languages=("de",)))
    assert {e.subset for e in only_de} == {"de"}
    grade = get_task("synthetic").grade
    assert grade(rows[0]["completion"][0]["content"], examples[0])[0]
    assert not grade("The final answer is \\boxed{-1}.", examples[0])[0]


def test_recipes_import_the_generator_from_eval():
    import recipes.synthetic

    assert recipes.synthetic.arithmetic_problems is arithmetic_problems


def test_heldout_accuracy_through_the_registry_is_unchanged(tiny, monkeypatch):
    from eval import generation
    from recipes import common

    model, tokenizer = tiny
    dataset = arithmetic_problems("test", 12)
    outputs = generation.generate_completions(model, tokenizer, list(dataset["prompt"]), max_new_tokens=6,
                                              batch_size=4, progress=False)  # fmt: skip
    # Half of them replaced by the reference solutions, so that both verdicts occur.
    outputs = [
        [row["completion"][0]["content"]] if i % 2 else out for i, (row, out) in enumerate(zip(dataset, outputs))
    ]
    monkeypatch.setattr(common, "generate_completions", lambda *args, **kwargs: outputs)
    result = common.heldout_accuracy(model, tokenizer, dataset, max_new_tokens=6, batch_size=4, progress=False)
    # What the recipes computed before: math-verify on each output against `answer`.
    expected = [math_answer_correct(out[0], str(gold)) for out, gold in zip(outputs, dataset["answer"])]
    assert result["correct"] == [int(ok) for ok in expected] and 0 < sum(expected) < len(expected)
    assert result["accuracy"] == sum(expected) / len(expected)
    assert result["boxed_rate"] == sum(extract_boxed(o[0]) is not None for o in outputs) / len(outputs)
    assert set(result["accuracy_by_language"]) == set(dataset["language"])
    assert result["examples"][0]["output"] == outputs[0][0]


def test_chat_examples_take_a_users_dataset_without_language():
    examples = chat_examples([{"prompt": [{"role": "user", "content": "1+1?"}], "answer": 2}])
    assert examples[0].gold == "2" and examples[0].subset is None and examples[0].meta == {}


def test_bbh_end_to_end_reports_per_task_and_macro_scores(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--data_dir", str(FIXTURES), "--output_dir", str(tmp_path / "out")]
    with pytest.warns(UserWarning, match="7 of the 27"):
        results = main([*argv, "--tasks", "bbh", "--limit", "1", "--max_new_tokens", "3", "--no_progress",
                        "--num_samples", "2", "--temperature", "1.0"])  # fmt: skip
    scores = results["tasks"]["bbh"]
    assert len(scores["subsets"]) == 7 and scores["num_examples"] == 7
    assert scores["macro_accuracy"] == pytest.approx(sum(scores["subsets"].values()) / 7)
    assert {"pass@2", "maj@2", "macro_pass@2", "macro_maj@2"} <= set(scores)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["tasks"]["bbh"]["macro_accuracy"] == scores["macro_accuracy"]
    assert "| bbh | macro_accuracy |" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "results.png").stat().st_size > 0
