"""Task loading from --data_dir copies in the original formats (fixtures), GPQA shuffling, Hub errors."""

from pathlib import Path

import pytest

from eval import tasks
from eval.grading import MGSM_LANGUAGES
from eval.tasks import DataSource, DataUnavailableError, get_task, gpqa_permutation

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
SOURCE = DataSource(data_dir=FIXTURES)


def test_math500_from_jsonl():
    examples = get_task("math500").load(SOURCE)
    assert len(examples) == 6
    first = examples[0]
    assert first.id == "test/precalculus/807.json" and first.gold == r"\left( 3, \frac{\pi}{2} \right)"
    assert first.messages[0]["role"] == "user" and "Convert the point" in first.messages[0]["content"]
    assert r"\boxed" in first.messages[0]["content"]  # zero-shot CoT asks for a boxed final answer


def test_math500_grades_reference_solutions():
    import json

    task = get_task("math500")
    rows = [json.loads(line) for line in (FIXTURES / "math500" / "test.jsonl").read_text().splitlines()]
    for example, row in zip(task.load(SOURCE), rows):
        assert task.grade(row["solution"], example)[0], example.id


def test_gpqa_csv_and_password_zip_give_the_same_examples():
    from_csv = get_task("gpqa_diamond").load(SOURCE)
    from_zip = get_task("gpqa_diamond").load(DataSource(data_dir=FIXTURES / "gpqa_zip"))
    assert [(e.id, e.gold, e.messages) for e in from_csv] == [(e.id, e.gold, e.messages) for e in from_zip]
    assert len(from_csv) == 3


def test_gpqa_wrong_password_names_the_fix():
    with pytest.raises(DataUnavailableError, match="--gpqa_password"):
        get_task("gpqa_diamond").load(DataSource(data_dir=FIXTURES / "gpqa_zip", gpqa_password="wrong"))


def test_gpqa_shuffle_is_per_question_seeded_and_recorded():
    examples = get_task("gpqa_diamond").load(SOURCE)
    correct = {"recSYNTH0000001": "6", "recSYNTH0000002": "Nitrogen", "recSYNTH0000003": "The mitochondrion"}
    for example in examples:
        permutation = example.meta["permutation"]
        assert sorted(permutation) == [0, 1, 2, 3]
        assert permutation == gpqa_permutation(example.id, seed=0)  # independent of the other questions
        # The gold letter shows the correct answer.
        assert f"{example.gold}. {correct[example.id]}\n" in example.messages[0]["content"]
    # Not always in the same slot, and a different seed reshuffles.
    assert len({e.gold for e in examples}) > 1
    assert any(gpqa_permutation(e.id, seed=1) != e.meta["permutation"] for e in examples)


def test_gpqa_task_does_not_save_prompts():
    assert get_task("gpqa_diamond").save_prompts is False


def test_mgsm_all_languages_from_tsv():
    examples = get_task("mgsm").load(SOURCE)
    assert {e.subset for e in examples} == set(MGSM_LANGUAGES)
    assert len(examples) == 4 * len(MGSM_LANGUAGES)
    german = [e for e in examples if e.subset == "de"]
    assert german[0].id == "de/0" and german[0].gold == "18" and german[3].gold == "2,125"
    assert '"Antwort: N"' in german[0].messages[0]["content"]  # instruction in the question's language
    assert all(e.messages[0]["content"].count(tasks.MGSM_INSTRUCTIONS[e.subset]) == 1 for e in examples)


def test_mgsm_gold_answers_in_native_format_grade_correct():
    task = get_task("mgsm")
    statements = {"de": "Die Antwort lautet {}.", "zh": "答案：{}", "fr": "La réponse est {}."}
    separators = {"de": ".", "zh": ",", "fr": " "}
    for example in task.load(DataSource(data_dir=FIXTURES, languages=("de", "zh", "fr"))):
        value = int(example.gold.replace(",", ""))
        written = f"{value:,}".replace(",", separators[example.subset])
        assert task.grade(statements[example.subset].format(written), example)[0], (example.id, written)


def test_mgsm_unknown_language():
    with pytest.raises(ValueError, match="MGSM has no language"):
        get_task("mgsm").load(DataSource(data_dir=FIXTURES, languages=("xx",)))


def test_read_mgsm_tsv_keeps_quotes():
    rows = tasks.read_mgsm_tsv('She said "two" apples, 2 "big" ones.\t2\n\nQ2\t1,000\n')
    assert rows == [('She said "two" apples, 2 "big" ones.', "2"), ("Q2", "1,000")]


def test_global_mmlu_from_files():
    examples = get_task("global_mmlu").load(SOURCE)
    assert {e.subset for e in examples} == {"de", "en"}
    first = [e for e in examples if e.subset == "de"][0]
    assert (
        first.gold == "B" and "B) 56" in first.messages[0]["content"] and "Answer: X" in first.messages[0]["content"]
    )


def test_missing_data_dir_file_names_the_layout(tmp_path):
    with pytest.raises(DataUnavailableError, match="math500/test.jsonl"):
        get_task("math500").load(DataSource(data_dir=tmp_path))
    with pytest.raises(DataUnavailableError, match=r"gpqa/gpqa_diamond\.csv or gpqa/dataset\.zip"):
        get_task("gpqa_diamond").load(DataSource(data_dir=tmp_path))


def test_hub_default_sources_and_offline_errors(monkeypatch):
    import datasets
    import huggingface_hub

    calls = []

    def offline_load_dataset(repo, config=None, split=None):
        calls.append((repo, config, split))
        raise ConnectionError("no network")

    def offline_download(repo_id, filename, repo_type=None):
        calls.append((repo_id, filename, repo_type))
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline_load_dataset)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline_download)
    for name, expected in [
        ("math500", ("HuggingFaceH4/MATH-500", None, "test")),
        ("gpqa_diamond", ("Idavidrein/gpqa", "gpqa_diamond", "train")),
        ("mgsm", ("juletxara/mgsm", "mgsm_bn.tsv", "dataset")),
        ("global_mmlu", ("CohereLabs/Global-MMLU", "bn", "test")),
    ]:
        with pytest.raises(DataUnavailableError, match="no network.*--data_dir"):
            get_task(name).load(DataSource())
        assert calls[-1] == expected


def test_hub_mgsm_reads_the_downloaded_tsv(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(
        huggingface_hub, "hf_hub_download", lambda repo_id, filename, repo_type=None: str(FIXTURES / "mgsm" / filename)
    )
    examples = get_task("mgsm").load(DataSource(languages=("ja",)))
    assert [e.gold for e in examples] == ["18", "3", "70000", "2,125"]


def test_unknown_task():
    with pytest.raises(ValueError, match="available: math500"):
        get_task("mmlu_pro")
