"""eval.grading: answer extraction in every listed format and MGSM language, math-verify grading, pass@k / maj@k."""

import itertools
import math
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eval import grading
from eval.grading import (
    MGSM_LANGUAGES,
    aggregate_scores,
    extract_boxed,
    extract_choice_letter,
    extract_math_answer,
    extract_number,
    majority_index,
    math_answer_correct,
    numbers_equal,
    pass_at_k,
)

# ----------------------------------------------------------------------------------------------------------------
# \boxed{}
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so $\boxed{5}$.", "5"),
        (r"\boxed{\frac{1}{2}} then \boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{x^{2^{3}}}", "x^{2^{3}}"),
        (r"\fbox{7}", "7"),
        (r"\boxed 5.", "5"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{4} and a truncated \boxed{3", "4"),  # the unclosed last box is skipped
        ("no box here", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_math_answer_prefers_box_then_answer_line():
    assert extract_math_answer("The final answer is 3.\nAlso \\boxed{4}") == "4"
    assert extract_math_answer("work...\nThe final answer is $3\\sqrt{2}$.\nI hope it is correct.") == "$3\\sqrt{2}$"
    assert extract_math_answer("Answer: 12") == "12"
    # The last statement counts, not the first ("The answer is" earlier in the reasoning).
    assert extract_math_answer("The answer is $x$ if...\nso\nThe final answer is \\text{(C)}.") == "\\text{(C)}"
    assert extract_math_answer("The final answer is:\n$$5$$") == "$$5$$"
    assert extract_math_answer("no conclusion") is None


# ----------------------------------------------------------------------------------------------------------------
# math_answer_correct
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, gold",
    [
        (r"Reasoning... so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"Therefore, the final answer is: $\boxed{0.5}$. I hope it is correct.", r"\frac12"),
        (r"The final answer is $\boxed{\left( 3, \frac{\pi}{2} \right)}$", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"The final answer is 3\sqrt{13}.", r"3\sqrt{13}"),  # no delimiters, no box
        ("Answer: 42", "42"),
        ("The answer is $6-5i$.", "6 - 5i"),
        (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}"),
        (r"\boxed{1, -2}", "1,-2"),
        ("The answer is $x$ when...\nThe final answer is \\text{(C)}.", r"\text{(C)}"),
        ("so we get\nThe final answer is \\{1\\pm\\sqrt{5},-2\\}. I hope it is correct.", r"\{1\pm\sqrt{5},-2\}"),
    ],
)
def test_math_answer_correct_accepts(prediction, gold):
    assert math_answer_correct(prediction, gold)


@pytest.mark.parametrize(
    "prediction, gold",
    [
        (r"\boxed{6}", "5"),
        (r"The final answer is $\boxed{\frac{1}{3}}$", r"\frac{1}{2}"),
        ("I do not know.", "5"),
        ("", "5"),
        (r"\boxed{5}", ""),
        (r"\boxed{\frac{", "1"),  # malformed LaTeX
        (None, "1"),  # not even a string: still no exception
    ],
)
def test_math_answer_correct_rejects_without_raising(prediction, gold):
    assert math_answer_correct(prediction, gold) is False


def test_numeric_gold_answers_from_json_data_are_graded():
    """A data file with `"answer": 5` (a JSON number) must be graded like "5", not scored 0 silently."""
    assert math_answer_correct(r"\boxed{5}", 5) and math_answer_correct(r"so $\boxed{0.5}$", 0.5)
    assert not math_answer_correct(r"\boxed{6}", 5) and not math_answer_correct(r"\boxed{1}", True)


def test_math_answer_correct_times_out_as_false(monkeypatch):
    def slow(prediction, gold):
        time.sleep(5)
        return True

    monkeypatch.setattr(grading, "_parse_and_verify", slow)
    start = time.perf_counter()
    assert math_answer_correct(r"\boxed{\frac{1}{2}}", "0.5", timeout_seconds=0.2) is False
    assert time.perf_counter() - start < 2


_INTEGER_TEXT = st.builds(
    lambda sign, digits: sign + digits, st.sampled_from(["", "-", "+"]), st.from_regex(r"[0-9]{1,4}", fullmatch=True)
)


@settings(max_examples=150, deadline=None)
@given(
    boxed=st.one_of(_INTEGER_TEXT, st.sampled_from(["1.5", "\\frac{3}{2}", "x", "", "1,000", "2^{3}"])),
    gold=st.one_of(_INTEGER_TEXT, st.sampled_from(["1.5", "\\frac{3}{2}", "8"])),
    template=st.sampled_from(
        [
            "{a} + {b} = {c}. The final answer is \\boxed{{{x}}}.",
            "Die Antwort lautet \\boxed{{{x}}}.",
            "\\boxed{{{x}}}",
            "{a} - {b} = {c}. {c} + {b} = {a}. La respuesta es \\boxed{{{x}}}.",
            "\\boxed{{{a}}} first, then \\boxed{{{x}}}.",
            "The answer is {x}.",
        ]
    ),
    a=st.integers(0, 99),
    b=st.integers(0, 99),
    c=st.integers(-99, 999),
)
def test_integer_fast_path_agrees_with_math_verify(boxed, gold, template, a, b, c):
    # The shortcut for integer answers must give math-verify's own verdict whenever it answers at all.
    prediction = template.format(a=a, b=b, c=c, x=boxed)
    verdict = grading._integer_answer_verdict(prediction, gold)
    if verdict is not None:
        assert verdict == grading._parse_and_verify(prediction, gold), (prediction, gold)


def test_integer_fast_path_answers_the_synthetic_task_shape():
    assert grading._integer_answer_verdict("9 + 6 = 15. The final answer is \\boxed{15}.", "15") is True
    assert grading._integer_answer_verdict("9 + 6 = 15. The final answer is \\boxed{14}.", "15") is False
    assert grading._integer_answer_verdict("\\boxed{1} or \\boxed{15}", "15") is None  # two boxes: math-verify
    assert grading._integer_answer_verdict("\\boxed{1.5}", "1.5") is None


@settings(max_examples=200, deadline=None)
@given(value=st.integers(-(10**30), 10**30), zeros=st.integers(0, 3), plus=st.booleans())
def test_canonical_integer_equals_exactly_when_int_does(value, zeros, plus):
    text = ("-" if value < 0 else "+" if plus else "") + "0" * zeros + str(abs(value))
    assert grading.canonical_integer(text) == str(value)


def test_huge_boxed_integer_is_graded_not_raised():
    # int() refuses strings above 4300 digits; a model can box that many, and one crash would end an RL run.
    huge = "7" * 5000
    assert math_answer_correct(f"The answer is \\boxed{{{huge}}}.", "15") is False
    assert math_answer_correct(f"The answer is \\boxed{{00{huge}}}.", huge) is True
    assert grading._integer_answer_verdict(f"\\boxed{{-{huge}}}", huge) is False


def test_math_answer_correct_off_the_main_thread():
    # No SIGALRM outside the main thread: grading falls back to a child process and still works.
    results = []
    thread = threading.Thread(target=lambda: results.append(math_answer_correct(r"so \boxed{\frac{2}{4}}", "0.5")))
    thread.start()
    thread.join(60)
    assert results == [True]


# ----------------------------------------------------------------------------------------------------------------
# extract_number (MGSM)
# ----------------------------------------------------------------------------------------------------------------

# Each language's usual final-answer sentences, with its thousands separator, for the answer 2125.
NATIVE_ANSWERS = {
    "en": ["The answer is 2,125.", "Answer: 2,125", "The final answer is $2,125."],
    "bn": ["উত্তর হল 2,125।", "উত্তর: ২,১২৫", "উত্তর হল ২১২৫।"],
    "de": ["Die Antwort lautet 2.125.", "Antwort: 2.125 €", "Die Antwort ist 2125."],
    "es": ["La respuesta es 2 125.", "Respuesta: 2.125", "La respuesta es 2125 dólares."],
    "fr": ["La réponse est 2 125.", "Réponse : 2\u202f125 $", "La réponse est 2.125."],
    "ja": ["答えは2,125です。", "答え：2125", "答えは２１２５です。"],
    "ru": ["Ответ — 2 125.", "Ответ: 2\u00a0125 долларов", "Ответ: 2125"],
    "sw": ["Jibu ni 2,125.", "Jibu: 2,125", "Jibu ni $2125."],
    "te": ["సమాధానం 2,125.", "సమాధానం: 2125", "సమాధానం ౨౧౨౫."],
    "th": ["คำตอบคือ 2,125", "คำตอบ: 2125 บาท", "คำตอบคือ ๒,๑๒๕"],
    "zh": ["答案是 2,125。", "答案：2125", "答案是2,125元。"],
}


def test_native_answers_cover_every_mgsm_language():
    assert set(NATIVE_ANSWERS) == set(MGSM_LANGUAGES)


@pytest.mark.parametrize("language, answer", [(lang, a) for lang, answers in NATIVE_ANSWERS.items() for a in answers])
def test_extract_number_native_formats(language, answer):
    # Reasoning full of other numbers comes first, as in a real chain of thought.
    output = f"She has 3 boxes of 12 and spends 1,5 hours... 36 + 2089 = 2125\n\n{answer}"
    assert extract_number(output, language) == 2125


@pytest.mark.parametrize(
    "text, language, expected",
    [
        ("1,234,567.5 in total", "en", 1234567.5),
        ("1.234.567,5 insgesamt", "de", 1234567.5),
        ("1 234 567,5 au total", "fr", 1234567.5),
        ("মোট 12,34,567", "bn", 1234567),  # Indian grouping
        ("Die Antwort lautet 2,5.", "de", 2.5),  # German decimal comma
        ("Die Antwort lautet 2.5.", "de", 2.5),  # English habit in German text: not 25
        ("The answer is 1.234.", "en", 1.234),
        ("The answer is -5.", "en", -5),
        ("The answer is −12.", "en", -12),  # unicode minus
        ("COVID-19 cost 3 days. The answer is 3", "en", 3),
        (r"The final answer is $\boxed{1{,}234}$.", "en", 1234),
        (r"so the total is \boxed{\$18}.", "en", 18),
        (r"\boxed{3 + 15 = 18}", "en", 18),
        ("The answer is 3 + 15 = 18 dollars.", "en", 18),
        ("The answer is 18 (3 from Monday).", "en", 18),
        ("No prefix: first 3, then 4, so 7", "en", 7),  # last-number fallback
        ("Schritt-für-Schritt-Antwort:\nSie hat 16 Eier, verkauft 9, also 18", "de", 18),  # header without number
        ("Die Antwort lautet 1.234.", None, 1.234),  # no language: English format
        ("答案：1234", None, 1234),  # no language: every language's prefixes
        ("no digits at all", "en", None),
        ("", "en", None),
    ],
)
def test_extract_number_formats(text, language, expected):
    assert extract_number(text, language) == expected


def test_numbers_equal_reads_mgsm_gold_strings():
    assert numbers_equal(2125.0, "2,125")
    assert numbers_equal(70000, "70000")
    assert numbers_equal(0.1 + 0.2, 0.3)
    assert not numbers_equal(None, "5")
    assert not numbers_equal(5, "")


# ----------------------------------------------------------------------------------------------------------------
# extract_choice_letter (GPQA, MMLU)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Reasoning...\nThe best answer is B", "B"),
        ("Reasoning...\nThe best answer is (C).", "C"),
        ("The correct answer is option D.", "D"),
        ("Answer: A", "A"),
        ("**Answer:** C", "C"),
        ("the answer is (B)", "B"),
        ("The final answer is $\\boxed{D}$", "D"),
        ("\\boxed{\\text{A}}", "A"),
        ("\\boxed{(C)}", "C"),
        ("Antwort: B", "B"),
        ("答案：Ｃ", "C"),  # full-width letter
        ("Respuesta: D", "D"),
        ("Ответ: A", "A"),
        ("B", "B"),
        ("(D)", "D"),
        ("First I thought Answer: A, but on reflection Answer: C", "C"),  # the last statement wins
        ("the answer is a bit unclear", None),  # "a" is a word, not an option
        ("A cat sat on the mat.", None),
        ("Answer: E", None),  # not an option
        ("", None),
    ],
)
def test_extract_choice_letter(text, expected):
    assert extract_choice_letter(text) == expected


def test_extract_choice_letter_other_option_sets():
    assert extract_choice_letter("The best answer is F", letters="ABCDEFGHIJ") == "F"


# ----------------------------------------------------------------------------------------------------------------
# pass@k, maj@k
# ----------------------------------------------------------------------------------------------------------------


def brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n, c, k", [(5, 0, 1), (5, 1, 1), (5, 2, 3), (6, 3, 2), (4, 4, 4), (8, 1, 8)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    outcomes = [True] * c + [False] * (n - c)
    assert math.isclose(pass_at_k(n, c, k), brute_pass_at_k(outcomes, k))


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(2, 1, 3)


def test_majority_index_and_aggregate():
    assert majority_index([None, "b", "a", "b"]) == 1
    assert majority_index([None, None]) is None
    assert majority_index(["a", "b"]) == 0  # tie: earliest
    correct = [[False, True, True, False], [True, False, False, False]]
    keys = [["1", "2", "2", "3"], ["7", "8", "8", None]]
    scores = aggregate_scores(correct, keys, ks=[1, 2, 4])
    assert scores["accuracy"] == pytest.approx(3 / 8)
    assert scores["pass@1"] == pytest.approx(3 / 8)
    assert scores["pass@4"] == 1.0
    assert scores["pass@2"] == pytest.approx((brute_pass_at_k(correct[0], 2) + brute_pass_at_k(correct[1], 2)) / 2)
    assert scores["maj@4"] == 0.5  # question 1: "2" wins (correct); question 2: "8" wins (wrong)
    assert scores["maj@1"] == 0.5
    assert aggregate_scores([[True], [False]]) == {"accuracy": 0.5}  # one sample: no pass@k
