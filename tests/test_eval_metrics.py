"""The metric modules load with `evaluate.load("eval/metrics/<name>")` and score like eval.grading."""

import warnings
from pathlib import Path

import evaluate
import pytest

METRICS = Path(__file__).resolve().parents[1] / "eval" / "metrics"


@pytest.fixture(scope="module")
def metrics():
    names = (
        "math_accuracy",
        "gpqa_accuracy",
        "mgsm_accuracy",
        "bbh_accuracy",
        "capability_accuracy",
        "visual_accuracy",
    )
    return {name: evaluate.load(str(METRICS / name)) for name in names}


def test_metric_scripts_share_the_one_grading_module():
    # The symlinks are what evaluate copies next to each script; a copy would drift from eval/grading.py.
    for name in ("math_accuracy", "gpqa_accuracy", "mgsm_accuracy", "bbh_accuracy"):
        link = METRICS / name / "grading.py"
        assert link.is_symlink() and link.resolve() == (METRICS.parent / "grading.py").resolve()


def test_loads_from_another_directory_without_the_eval_package(tmp_path, monkeypatch):
    # evaluate imports its cached copy of the script; it must not need `eval` on sys.path (the working directory).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".", str(METRICS.parents[1]))])
    metric = evaluate.load(str(METRICS / "math_accuracy"))
    assert metric.compute(predictions=[r"so \boxed{2}"], references=["2"]) == {"accuracy": 1.0}


def test_math_accuracy(metrics):
    result = metrics["math_accuracy"].compute(
        predictions=[r"... $\boxed{\frac{1}{2}}$", "The final answer is 3", "no idea"],
        references=["0.5", "4", "1"],
    )
    assert result == {"accuracy": pytest.approx(1 / 3)}


def test_math_accuracy_with_samples_reports_pass_and_maj_at_k(metrics):
    result = metrics["math_accuracy"].compute(
        predictions=[[r"\boxed{1}", r"\boxed{2}", r"\boxed{2}", r"\boxed{3}"], [r"\boxed{5}"] * 4],
        references=["2", "4"],
        k=[1, 2, 4],
    )
    assert result["accuracy"] == pytest.approx(2 / 8)
    assert result["pass@4"] == 0.5
    assert result["pass@2"] == pytest.approx((1 - 1 / 6 * 1) / 2)  # 2 correct of 4: 1 - C(2,2)/C(4,2) = 5/6
    assert result["maj@4"] == 0.5  # question 1: "2" is the majority and correct


def test_gpqa_accuracy(metrics):
    result = metrics["gpqa_accuracy"].compute(
        predictions=["... The best answer is C", "Answer: (A)", r"\boxed{D}", "I cannot decide"],
        references=["C", "B", "D", "A"],
    )
    assert result == {"accuracy": 0.5}


def test_mgsm_accuracy_per_language(metrics):
    result = metrics["mgsm_accuracy"].compute(
        predictions=[
            "... Die Antwort lautet 2.125.",
            "... 答案：2125",
            "... La réponse est 2 125.",
            "The answer is 7",
        ],
        references=["2,125", "2,125", "2,125", "8"],
        languages=["de", "zh", "fr", "en"],
    )
    assert result == {"accuracy": 0.75, "accuracy_de": 1.0, "accuracy_en": 0.0, "accuracy_fr": 1.0, "accuracy_zh": 1.0}


def test_visual_accuracy(metrics):
    result = metrics["visual_accuracy"].compute(
        predictions=["The answer is \\boxed{Top  Left}.", "\\boxed{red}", "red", "\\boxed{3}"],
        references=["top left", "blue", "red", "3"],
    )
    assert result == {"accuracy": 0.5}


def test_mgsm_accuracy_numeric_references(metrics):
    assert metrics["mgsm_accuracy"].compute(predictions=["The answer is 1,000"], references=[1000.0]) == {
        "accuracy": 1.0
    }


def test_each_task_grades_like_its_metric_module(metrics):
    # The runner grades with Task.grade; users score saved outputs with the metric module it names. Same answers.
    from eval.tasks import TASKS, DataSource

    source = DataSource(data_dir=Path(__file__).parent / "fixtures" / "eval", languages=("de", "zh"))
    outputs = [r"\boxed{2}", "The best answer is B", "Die Antwort lautet 2.125.", "答案：18", "Answer: C", "no idea"]
    for task in TASKS.values():
        if task.name == "global_mmlu":
            source = DataSource(data_dir=source.data_dir)
        task_source = DataSource(languages=("de",)) if task.name == "synthetic" else source
        with warnings.catch_warnings():  # BBH: the fixtures hold 7 of its 27 tasks
            warnings.simplefilter("ignore")
            examples = task.load(task_source)[:4]
        for example in examples:
            for output in outputs + [example.gold, f"So the answer is {example.gold}."]:
                kwargs = {"languages": [example.subset]} if task.metric == "mgsm_accuracy" else {}
                if task.metric == "bbh_accuracy":
                    kwargs = {"tasks": [example.subset], "inputs": [example.meta["input"]]}
                if task.metric == "capability_accuracy":
                    kwargs = {
                        "capabilities": [example.meta["capability"]],
                        "constraints": [example.meta["constraint"]],
                    }
                scored = metrics[task.metric].compute(predictions=[output], references=[example.gold], **kwargs)
                assert scored["accuracy"] == float(task.grade(output, example)[0]), (task.name, example.id, output)
