"""BIG-Bench Hard: each answer family's extraction on right and wrong outputs, the shipped 3-shot prompts, the
offline loader on synthetic fixtures in the original format, its errors, the metric module and the runner."""

import json
import re
from pathlib import Path

import evaluate
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eval.grading import BBH_TASKS, bbh_answer_correct, bbh_gold_key, extract_bbh_answer, macro_scores
from eval.tasks import DataSource, DataUnavailableError, bbh_cot_prompt, get_task, read_bbh_json

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
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


def test_shipped_cot_prompts_grade_their_own_answers():
    # The 27 standard 3-shot prompts: 3 exemplars each, every exemplar answer graded right against the answer it
    # states, and wrong against another exemplar's different answer.
    for task in BBH_TASKS:
        description, shots = bbh_cot_prompt(task)
        assert description and len(shots) == 3, task
        golds = [re.search(r"So the answer is (.+)\.\s*$", answer).group(1) for _, answer in shots]
        for (question, answer), gold in zip(shots, golds):
            assert answer.startswith("Let's think step by step."), task
            assert bbh_answer_correct(answer, gold, task, question), (task, gold)
            other = next((g for g in golds if bbh_gold_key(g, task) != bbh_gold_key(gold, task)), None)
            if other is not None:
                assert not bbh_answer_correct(answer, other, task, question), (task, other)


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
    # 3-shot: the exemplars as earlier turns, then the question.
    assert [m["role"] for m in first.messages] == ["user", "assistant"] * 3 + ["user"]
    assert first.messages[-1]["content"] == f"Q: {raw['input']}"
    assert first.messages[1]["content"].startswith("Let's think step by step.")
    with pytest.warns(UserWarning):
        zero = get_task("bbh_zeroshot").load(DataSource(data_dir=FIXTURES))
    zero_first = next(e for e in zero if e.id == first.id)
    assert len(zero_first.messages) == 1 and raw["input"] in zero_first.messages[0]["content"]
    assert zero_first.messages[0]["content"].endswith(
        '"So the answer is X." where X is the letter of the correct option in parentheses, such as (A).'
    )


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
    with pytest.raises(DataUnavailableError, match=rf"{re.escape(str(path))}:4:"):
        get_task("bbh").load(DataSource(data_dir=tmp_path))


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
