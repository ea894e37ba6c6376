"""BIG-Bench Hard: each answer family's extraction on right and wrong outputs, the 3-shot prompt files (read from
the user's copy; synthetic ones here), the offline loader on synthetic fixtures in the original formats, its errors,
zero-shot without prompt files, the metric module and the runner."""

import json
import re
import shutil
from pathlib import Path

import evaluate
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eval import tasks
from eval.grading import BBH_TASKS, bbh_answer_correct, bbh_gold_key, extract_bbh_answer, macro_scores
from eval.runner import main
from eval.tasks import (
    BBH_ZEROSHOT_DESCRIPTION,
    DataSource,
    DataUnavailableError,
    get_task,
    read_bbh_cot_prompt,
    read_bbh_json,
)

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
PROMPTS = FIXTURES / "bbh" / "cot-prompts"
METRIC = Path(__file__).resolve().parents[1] / "eval" / "metrics" / "bbh_accuracy"
SHUFFLE = "tracking_shuffled_objects_three_objects"
OPTIONS = "At the end, Claire has the\nOptions:\n(A) red marble\n(B) green marble\n(C) blue marble"
DYCK = "Complete the rest of the sequence, making sure that the parentheses are closed properly. Input: ( [ {"

# (task, gold, question, outputs graded right, outputs graded wrong)
CASES = [
    (
        SHUFFLE,
        "(B)",
        OPTIONS,
        ["So the answer is (B).", "So the answer is B.", "the answer is (B) green marble", "Answer: green marble",
         "**Answer:** (B)", "So the answer is (b).", "The final answer is $\\boxed{B}$.", "The answer is: **B**",
         "(A) is out, so the answer is not (A). So the answer is (B)."],
        ["So the answer is (A).", "So the answer is C.", "So the answer is (D).", "Answer: red marble",
         "So the answer is (B). Wait, no: the answer is (C).", "I think it is green.", "So the answer is A cat."],
    ),
    (
        "boolean_expressions",
        "False",
        None,
        ["So the answer is False.", "the answer is **false**", "Answer: False", "So the answer is not true."],
        ["So the answer is True.", "So the answer is True or False.", "So the answer is yes.", "False? True."],
    ),
    (
        "sports_understanding",
        "no",
        None,
        ["So the answer is no.", "So the answer is No, it is not.", "So the answer is implausible.",
         "So the answer is not plausible."],
        ["So the answer is yes.", "So the answer is plausible.", "So the answer is yes and no."],
    ),
    (
        "formal_fallacies",
        "invalid",
        None,
        ["So the answer is invalid.", "So the answer is not valid.", "Answer: **Invalid**"],
        ["So the answer is valid.", "So the answer is valid, not invalid."],
    ),
    (
        "multistep_arithmetic_two",
        "-11520",
        None,
        ["So the answer is -11520.", "So the answer is -11,520.", "So the answer is 90 * (-128) = -11520.",
         "So the answer is $\\boxed{-11520}$.", "So the answer is −11520."],
        ["So the answer is 11520.", "So the answer is -11521.", "So the answer is -1152.",
         "-11520 is what I first got, then I redid it. So the answer is -11250."],
    ),
    (
        "object_counting",
        "8",
        None,
        ["So the answer is 8.", "So the answer is eight.", "So the answer is 8 (5 apples and 3 pears)."],
        ["So the answer is 9.", "I have 8 fruits in the first basket and 1 more. So the answer is 9."],
    ),
    (
        "dyck_languages",
        "} ] )",
        DYCK,
        ["So the answer is } ] ).", "So the answer is }]).", "So the answer is `} ] )`.",
         "So the answer is ( [ { } ] )."],
        ["So the answer is } ) ].", "So the answer is } ].", "So the answer is ( [ { } ).", "So the answer is ."],
    ),
    (
        "word_sorting",
        "apricot mango o'hare walnut",
        None,
        ["So the answer is apricot mango o'hare walnut.", "So the answer is: apricot, mango, o'hare, walnut",
         "The answer is:\n1. apricot\n2. mango\n3. o'hare\n4. walnut", "So the answer is Apricot Mango O'hare Walnut."],
        ["So the answer is mango apricot o'hare walnut.", "So the answer is apricot mango walnut.",
         "So the answer is apricot mango ohare walnut."],
    ),
]  # fmt: skip


def test_every_bbh_task_has_a_family():
    assert len(BBH_TASKS) == 27
    assert set(BBH_TASKS.values()) == {"choice", "binary", "numeric", "dyck", "words"}


@pytest.mark.parametrize("task,gold,question,right,wrong", CASES, ids=[case[0] for case in CASES])
def test_family_extraction_right_and_wrong(task, gold, question, right, wrong):
    for output in right:
        assert bbh_answer_correct(f"Let's think step by step.\n{output}", gold, task, question), output
    for output in wrong:
        assert not bbh_answer_correct(f"Let's think step by step.\n{output}", gold, task, question), output


def test_no_stated_answer_is_none_and_odd_input_never_raises():
    chain = "Let's think step by step.\nThe first marble is red.\nThe second is green."
    assert extract_bbh_answer(chain, SHUFFLE, OPTIONS) is None
    # A one-line output is its own answer; a longer one must state it.
    assert bbh_answer_correct("(B)", "(B)", SHUFFLE, OPTIONS) and bbh_answer_correct(
        "True", "True", "boolean_expressions"
    )
    assert not bbh_answer_correct("Thinking.\n(B)", "(B)", SHUFFLE, OPTIONS)
    for odd in ("", None, 3, "So the answer is", "\\boxed{", "answer is ((((((", "So the answer is \\boxed{}"):
        for task in BBH_TASKS:
            assert bbh_answer_correct(odd, "(A)", task, OPTIONS) is False


def test_option_text_targets_are_compared_as_text():
    # A few BBH targets are an option's text (the source split those options at commas).
    assert bbh_gold_key("Monsters, Inc", "movie_recommendation") == "monsters inc"
    assert bbh_answer_correct("So the answer is Monsters, Inc.", "Monsters, Inc", "movie_recommendation")
    assert not bbh_answer_correct("So the answer is (A).", "Monsters, Inc", "movie_recommendation")


def test_unknown_task_names_the_27():
    with pytest.raises(ValueError, match="date_understanding"):
        bbh_gold_key("(A)", "bbh_date")


def test_prompt_files_grade_their_own_answers():
    # One synthetic prompt file per fixture task, in BBH's cot-prompts format: 3 exemplars each, every exemplar
    # answer graded right against the answer it states, and wrong against another exemplar's different answer.
    fixture_tasks = sorted(p.stem for p in (FIXTURES / "bbh").glob("*.json"))
    assert sorted(p.stem for p in PROMPTS.glob("*.txt")) == fixture_tasks and len(fixture_tasks) == 7
    for task in fixture_tasks:
        description, shots = read_bbh_cot_prompt(PROMPTS / f"{task}.txt")
        assert description and "-----" not in description and "SYNTHETIC" not in description, task
        assert len(shots) == 3, task
        golds = [re.search(r"So the answer is (.+)\.\s*$", answer).group(1) for _, answer in shots]
        others = 0
        for (question, answer), gold in zip(shots, golds):
            assert not question.startswith("Q:") and "\nA: " not in question, task
            assert answer.startswith("Let's think step by step."), task
            assert bbh_answer_correct(answer, gold, task, question), (task, gold)
            other = next((g for g in golds if bbh_gold_key(g, task) != bbh_gold_key(gold, task)), None)
            if other is not None:
                others += 1
                assert not bbh_answer_correct(answer, other, task, question), (task, other)
        assert others, task  # each file's exemplars have at least two different answers


def test_offline_loader_reads_the_original_format():
    with pytest.warns(UserWarning, match="7 of the 27"):
        examples = get_task("bbh").load(DataSource(data_dir=FIXTURES))
    by_task = {}
    for example in examples:
        by_task.setdefault(example.subset, []).append(example)
    assert sorted(by_task) == sorted(p.stem for p in (FIXTURES / "bbh").glob("*.json"))
    first = by_task[SHUFFLE][0]
    raw = json.loads((FIXTURES / "bbh" / f"{SHUFFLE}.json").read_text())["examples"][0]
    assert first.id == f"{SHUFFLE}/0" and first.gold == raw["target"] == "(A)"
    # 3-shot: the description and the exemplars of DIR/bbh/cot-prompts/<task>.txt as earlier turns, then the question.
    description, shots = read_bbh_cot_prompt(PROMPTS / f"{SHUFFLE}.txt")
    assert first.messages[:-1] == [
        message
        for i, (question, answer) in enumerate(shots)
        for message in (
            {"role": "user", "content": (f"{description}\n\n" if i == 0 else "") + f"Q: {question}"},
            {"role": "assistant", "content": answer},
        )
    ]
    assert first.messages[-1] == {"role": "user", "content": f"Q: {raw['input']}"}
    with pytest.warns(UserWarning):
        zero = get_task("bbh_zeroshot").load(DataSource(data_dir=FIXTURES))
    zero_first = next(e for e in zero if e.id == first.id)
    # Zero-shot with the prompt file present: its description, the question, the instruction.
    assert len(zero_first.messages) == 1
    content = zero_first.messages[0]["content"]
    assert content.startswith(f"{description}\n\nQ: {raw['input']}\n\n")
    assert content.endswith(
        '"So the answer is X." where X is the letter of the correct option in parentheses, such as (A).'
    )


def _data_only(tmp_path: Path, tasks_: tuple[str, ...] = ("navigate",)) -> Path:
    # A data_dir with BBH task files and no prompt files (navigate: a task the fixture prompts do not cover).
    (tmp_path / "bbh").mkdir(parents=True)
    for task in tasks_:
        source = FIXTURES / "bbh" / f"{task}.json"
        if source.exists():
            shutil.copy(source, tmp_path / "bbh" / source.name)
        else:
            rows = [{"input": "Take 2 steps forward, then 2 steps back. Are you where you started?", "target": "Yes"}]
            (tmp_path / "bbh" / f"{task}.json").write_text(json.dumps({"examples": rows}))
    return tmp_path


def _no_hub(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Hub was asked for data")

    monkeypatch.setattr(tasks, "_load_hub_dataset", refuse)


def test_missing_prompt_file_names_the_path_and_the_fix(tmp_path, monkeypatch):
    _no_hub(monkeypatch)
    data_dir = _data_only(tmp_path)
    with pytest.warns(UserWarning), pytest.raises(DataUnavailableError) as error:
        get_task("bbh").load(DataSource(data_dir=data_dir))
    message = str(error.value)
    assert str(data_dir / "bbh" / "cot-prompts" / "navigate.txt") in message
    assert str(data_dir / "cot-prompts" / "navigate.txt") in message  # the repository's own layout, also looked at
    assert "github.com/suzgunmirac/BIG-Bench-Hard" in message and "--data_dir DIR" in message
    assert "--tasks bbh_zeroshot" in message
    # A prompt folder that lacks one of the tasks names that task's file.
    (data_dir / "bbh" / "cot-prompts").mkdir()
    shutil.copy(PROMPTS / "word_sorting.txt", data_dir / "bbh" / "cot-prompts")
    shutil.copy(FIXTURES / "bbh" / "word_sorting.json", data_dir / "bbh")
    with pytest.warns(UserWarning), pytest.raises(DataUnavailableError, match=r"cot-prompts/navigate\.txt"):
        get_task("bbh").load(DataSource(data_dir=data_dir))
    # From the Hub (no data_dir): fails before any download, with the same fix.
    with pytest.raises(DataUnavailableError, match=r"no --data_dir was given.*BIG-Bench-Hard.*bbh_zeroshot"):
        get_task("bbh").load(DataSource())


def test_missing_prompts_fail_before_the_model_loads(tmp_path):
    data_dir = _data_only(tmp_path / "data")
    argv = ["--model", str(tmp_path / "no_model"), "--data_dir", str(data_dir), "--tasks", "bbh"]
    with pytest.warns(UserWarning), pytest.raises(SystemExit, match=r"error: bbh: neither .*navigate\.txt"):
        main([*argv, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_prompts_from_a_clone_of_the_repository_and_with_hub_data(tmp_path, monkeypatch):
    # A clone: bbh/<task>.json and cot-prompts/<task>.txt side by side.
    clone = _data_only(tmp_path, ("word_sorting",))
    shutil.copytree(PROMPTS, clone / "cot-prompts")
    with pytest.warns(UserWarning):
        (example,) = get_task("bbh").load(DataSource(data_dir=clone))
    description, shots = read_bbh_cot_prompt(PROMPTS / "word_sorting.txt")
    assert example.messages[0]["content"] == f"{description}\n\nQ: {shots[0][0]}" and len(example.messages) == 7
    # Data from the Hub, prompts from a folder: bbh_prompt_dir.
    rows = {"word_sorting": [{"input": "Sort the following words alphabetically: List: b a", "target": "a b"}]}
    monkeypatch.setattr(tasks, "BBH_TASKS", {"word_sorting": "words"})
    monkeypatch.setattr(tasks, "_load_hub_dataset", lambda repo, config, *args: rows[config])
    (hub_example,) = get_task("bbh").load(DataSource(bbh_prompt_dir=PROMPTS))
    assert hub_example.messages[:-1] == example.messages[:-1] and hub_example.gold == "a b"


def test_zero_shot_needs_no_prompt_files(tmp_path, monkeypatch):
    _no_hub(monkeypatch)
    data_dir = _data_only(tmp_path, ("navigate", SHUFFLE, "sports_understanding"))
    with pytest.warns(UserWarning, match="3 of the 27"):
        examples = get_task("bbh_zeroshot").load(DataSource(data_dir=data_dir))
    assert {e.subset for e in examples} == {"navigate", SHUFFLE, "sports_understanding"}
    for example in examples:
        (message,) = example.messages
        assert message["content"].startswith(f"{BBH_ZEROSHOT_DESCRIPTION}\n\nQ: {example.meta['input']}\n\n")
    hints = {e.subset: e.messages[0]["content"].rsplit("where X is ", 1)[1] for e in examples}
    assert hints == {"navigate": "Yes or No.", "sports_understanding": "yes or no.",
                     SHUFFLE: "the letter of the correct option in parentheses, such as (A)."}  # fmt: skip
    grade = get_task("bbh_zeroshot").grade
    assert all(grade(f"So the answer is {e.gold}.", e)[0] for e in examples)
    # From the Hub, without any prompt folder.
    rows = [{"input": "Take 1 step. Take 1 step back. Are you where you started?", "target": "Yes"}]
    monkeypatch.setattr(tasks, "BBH_TASKS", {"navigate": "binary"})
    monkeypatch.setattr(tasks, "_load_hub_dataset", lambda *args: rows)
    (hub_example,) = get_task("bbh_zeroshot").load(DataSource())
    assert hub_example.messages[0]["content"].startswith(f"{BBH_ZEROSHOT_DESCRIPTION}\n\nQ: Take 1 step.")


def test_malformed_prompt_file_names_the_file(tmp_path):
    path = tmp_path / "navigate.txt"
    path.write_text("canary\n-----\nSay whether you return.\n\nQ: Take 1 step.\nA: So the answer is No.\n")
    with pytest.raises(DataUnavailableError, match=rf"{re.escape(str(path))}: 1 exemplars, expected 3"):
        read_bbh_cot_prompt(path)
    assert read_bbh_cot_prompt(path, shots=0) == (
        "Say whether you return.",
        [("Take 1 step.", "So the answer is No.")],
    )
    # Windows line ends read the same.
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert read_bbh_cot_prompt(path, shots=1)[1] == [("Take 1 step.", "So the answer is No.")]


def test_grading_through_the_task():
    with pytest.warns(UserWarning):
        examples = get_task("bbh").load(DataSource(data_dir=FIXTURES))
    grade = get_task("bbh").grade
    for example in examples:
        assert grade(f"So the answer is {example.gold}.", example)[0], example.id
    shuffle = next(e for e in examples if e.subset == SHUFFLE)
    assert grade("So the answer is red marble.", shuffle) == (True, "(A)")  # option text, from the input
    assert grade("So the answer is (C).", shuffle) == (False, "(C)")


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bbh" / "navigate.json"
    path.parent.mkdir()
    path.write_text(
        '{\n  "examples": [\n    {"input": "Take 3 steps.", "target": "No"},\n    {"input": "x" "target"}\n]}'
    )
    # Zero-shot, which needs no prompt files (the 3-shot task would first ask for navigate.txt).
    with pytest.warns(UserWarning), pytest.raises(DataUnavailableError, match=rf"{re.escape(str(path))}:4:"):
        get_task("bbh_zeroshot").load(DataSource(data_dir=tmp_path))


def test_example_without_target_names_file_and_line(tmp_path):
    path = tmp_path / "navigate.json"
    rows = [{"input": "Take 3 steps.", "target": "No"}, {"input": "Turn left.", "answer": "Yes"}]
    path.write_text(json.dumps({"canary": "x", "examples": rows}, indent=4))
    line = path.read_text().splitlines().index('            "input": "Turn left.",') + 1
    with pytest.raises(DataUnavailableError, match=rf"{re.escape(str(path))}:{line}: example 1 needs"):
        read_bbh_json(path)
    path.write_text(json.dumps([{"input": "a", "target": "b"}]))
    with pytest.raises(DataUnavailableError, match='navigate.json:1: expected an object with an "examples"'):
        read_bbh_json(path)


def test_empty_data_dir_names_the_layout(tmp_path):
    with pytest.raises(DataUnavailableError, match=r"bbh/<task>\.json"):
        get_task("bbh").load(DataSource(data_dir=tmp_path))


def test_macro_scores_weigh_tasks_equally():
    correct = [[True], [False], [False], [False], [True, True][:1]]
    subsets = ["a", "b", "b", "b", "a"]
    assert macro_scores(correct, None, subsets) == {"macro_accuracy": pytest.approx((1.0 + 0.0) / 2)}
    sampled = macro_scores([[True, False], [False, False]], [["x", "y"], ["z", "z"]], ["a", "b"], ks=[2])
    assert sampled == {"macro_accuracy": 0.25, "macro_pass@2": 0.5, "macro_maj@2": 0.5}


def test_metric_module():
    metric = evaluate.load(str(METRIC))
    result = metric.compute(
        predictions=["So the answer is B.", "So the answer is (C).", "So the answer is False.", "no answer"],
        references=["(B)", "(B)", "False", "True"],
        tasks=[SHUFFLE, SHUFFLE, "boolean_expressions", "boolean_expressions"],
    )
    assert result == {
        "accuracy": 0.5,
        "macro_accuracy": 0.5,
        f"accuracy_{SHUFFLE}": 0.5,
        "accuracy_boolean_expressions": 0.5,
    }
    with pytest.raises(ValueError, match="unknown BBH tasks"):
        metric.compute(predictions=["x"], references=["(A)"], tasks="bbh_nope")


@settings(max_examples=200, deadline=None)
@given(st.integers(-(10**7), 10**7), st.integers(-(10**7), 10**7), st.booleans())
def test_numbers_match_exactly_when_equal(stated, gold, grouped):
    text = f"Let's think step by step.\n12 * 3 = 36.\nSo the answer is {stated:,}." if grouped else f"{stated}"
    assert bbh_answer_correct(text, str(gold), "multistep_arithmetic_two") == (stated == gold)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 18), st.data())
def test_letters_match_exactly_when_equal(count, data):
    letters = "ABCDEFGHIJKLMNOPQR"[:count]
    gold, stated = data.draw(st.sampled_from(letters)), data.draw(st.sampled_from(letters))
    question = "Which?\nOptions:\n" + "\n".join(f"({x}) thing {x.lower()}" for x in letters)
    text = f"Option ({gold if gold != stated else letters[0]}) is tempting.\nSo the answer is ({stated})."
    assert bbh_answer_correct(text, f"({gold})", SHUFFLE, question) == (stated == gold)
