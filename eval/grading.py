"""Answer extraction and grading, shared by the metric modules, the runner and RL reward functions.

Everything here takes a full model output (chain of thought included) and never raises on odd text: a grader
that crashes a 10-hour RL run on one malformed completion is worse than one that scores it 0.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import threading
import unicodedata
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager

__all__ = [
    "BBH_TASKS",
    "MGSM_LANGUAGES",
    "aggregate_scores",
    "bbh_answer_correct",
    "bbh_gold_key",
    "extract_bbh_answer",
    "extract_boxed",
    "extract_choice_letter",
    "extract_math_answer",
    "extract_number",
    "macro_scores",
    "majority_index",
    "math_answer_correct",
    "math_answer_key",
    "numbers_equal",
    "pass_at_k",
]

MGSM_LANGUAGES = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")

# ---------------------------------------------------------------------------------------------------------------
# \boxed{...}
# ---------------------------------------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])\s*")  # not "\boxedx", another macro


def _balanced_braces(text: str, start: int) -> str | None:
    """Content of the `{...}` group opening at `text[start]`; None when it never closes (a truncated output)."""
    depth = 0
    for i in range(start, len(text)):
        # `\{` and `\}` are literal braces (set notation), not grouping.
        if text[i] == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif text[i] == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces kept; None if there is none.

    `\\boxed 5` (TeX's brace-less form) gives "5". An unclosed last box is skipped in favour of an earlier closed one.
    """
    if not isinstance(text, str):
        return None
    for match in reversed(list(_BOXED_RE.finditer(text))):
        end = match.end()
        if end < len(text) and text[end] == "{":
            content = _balanced_braces(text, end)
            if content is not None:
                return content.strip()
        elif match.group(0).endswith((" ", "\t")) or end < len(text) and text[end].isalnum():
            token = re.match(r"[^\s$.,;]+", text[end:])
            if token:
                return token.group(0)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Math (MATH-500): math-verify, gold first, under a timeout
# ---------------------------------------------------------------------------------------------------------------


class _GradingTimeout(BaseException):
    """BaseException so that math-verify's and sympy's `except Exception` blocks cannot swallow it."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    # One SIGALRM around parse + verify together (math-verify's own timeouts are per call and whole seconds).
    # Signals only work in the main thread; elsewhere the caller gets `_run_in_subprocess` instead.
    def handler(signum, frame):
        raise _GradingTimeout

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_ANSWER_PREFIX_RE = re.compile(r"final answer is|final answer:|answer is|answer:", re.IGNORECASE)
_HOPE_RE = re.compile(r"[.\s]*I hope it is correct\.?\s*$", re.IGNORECASE)


def extract_math_answer(text: str) -> str | None:
    """The final-answer span of a math output: the last `\\boxed{}`, else what follows the last "answer is" /
    "Answer:" (the rest of that line, or the next line when the prefix ends one). None when no answer is stated."""
    if not isinstance(text, str):
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    matches = list(_ANSWER_PREFIX_RE.finditer(text))
    if not matches:
        return None
    span = text[matches[-1].end() :].lstrip(" \t:").lstrip("\n").split("\n")[0]
    span = _HOPE_RE.sub("", span).strip().rstrip(".").strip()
    return span or None


def _latex_wrapped(answer: str) -> str:
    # math-verify's LaTeX extractor needs delimiters; a bare gold like `\frac{1}{2}` or `3\sqrt{2}` would otherwise
    # go through the plain-expression parser, which misreads LaTeX.
    stripped = answer.strip()
    if stripped.startswith("$") or "\\boxed" in stripped or stripped.startswith(("\\(", "\\[")):
        return stripped
    return f"${stripped}$"


_INTEGER_RE = re.compile(r"[-+]?[0-9]+")


def _integer_answer_verdict(prediction: str, gold: str) -> bool | None:
    """math-verify's verdict when both answers are plain integers, without calling it; None otherwise.

    Parsing with sympy costs ~17 ms an answer, which made grading the largest cost of a tiny-model RL step (256
    completions: 4 s) and of the judge filter. With exactly one `\\boxed{}` in the output math-verify grades its
    content, and two integers are equal exactly when their values are, so the verdict is the same (tested against
    math-verify on random outputs). Anything else (decimals, LaTeX, several boxes, no box) goes to math-verify.
    """
    gold = gold.strip()
    if not _INTEGER_RE.fullmatch(gold) or len(_BOXED_RE.findall(prediction)) != 1:
        return None
    boxed = extract_boxed(prediction)
    if boxed is None or not _INTEGER_RE.fullmatch(boxed):
        return None
    return canonical_integer(boxed) == canonical_integer(gold)


def canonical_integer(text: str) -> str:
    """`text` (an optionally signed run of ASCII digits) as the shortest string with its value: no "+", no
    leading zeros, no "-0". Compared instead of `int()`, which refuses more than 4300 digits (a model can box
    that many) and costs quadratic time on long ones."""
    text = text.strip()
    sign, digits = ("-", text[1:]) if text[:1] == "-" else ("", text.lstrip("+"))
    digits = digits.lstrip("0") or "0"
    return "0" if digits == "0" else sign + digits


def _parse_and_verify(prediction: str, gold: str) -> bool:
    from math_verify import parse, verify

    gold_parsed = parse(_latex_wrapped(gold), parsing_timeout=None)
    if not gold_parsed:
        return False
    # The whole output first: math-verify ranks `\boxed{}` and "final answer is" above other matches itself.
    pred_parsed = parse(prediction, parsing_timeout=None)
    if pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None):
        return True
    # Then the extracted final-answer span alone, wrapped in LaTeX delimiters: this rescues outputs such as
    # "The final answer is 3\sqrt{2}." without `$...$`, which the plain-expression parser misreads.
    span = extract_math_answer(prediction)
    if span is None:
        return False
    span_parsed = parse(_latex_wrapped(span), parsing_timeout=None)
    return bool(span_parsed) and verify(gold_parsed, span_parsed, timeout_seconds=None)


def _quiet_math_verify() -> None:
    # We run math-verify with its own timeouts off (ours wraps both calls); it warns about that once per process.
    import math_verify.grader
    import math_verify.parser

    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _subprocess_worker(prediction: str, gold: str, queue) -> None:  # pragma: no cover - runs in a child process
    try:
        _quiet_math_verify()
        queue.put(_parse_and_verify(prediction, gold))
    except BaseException:
        queue.put(False)


def _run_in_subprocess(prediction: str, gold: str, timeout_seconds: float) -> bool:
    # Off the main thread (a thread-pool reward function, a web server) SIGALRM is unavailable; a child process
    # is the only way to stop a runaway sympy simplification. Slower (~50 ms), hence only as a fallback.
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_subprocess_worker, args=(prediction, gold, queue), daemon=True)
    process.start()
    try:
        return bool(queue.get(timeout=timeout_seconds + 10.0))  # + interpreter start-up
    except Exception:
        return False
    finally:
        if process.is_alive():
            process.kill()
        process.join(1.0)


def math_answer_correct(prediction: str, gold: str | int | float, timeout_seconds: float = 5.0) -> bool:
    """Whether a model output states the gold answer, by math-verify `verify(parse(gold), parse(prediction))`.

    `prediction` is a full output (chain of thought, `\\boxed{}` or "The final answer is ..."); `gold` a bare answer
    such as MATH-500's `answer` field (`\\frac{1}{2}`, `(3, \\frac{\\pi}{2})`) or a text with `\\boxed{}`. Gold is
    parsed first because math-verify's comparison is not symmetric (gold decides intervals vs. sets etc.). Never
    raises: unparsable input, any error and running past `timeout_seconds` give False. A numeric gold (a JSON
    number in the data: `"answer": 5`) is read as its decimal text.
    """
    if isinstance(gold, int | float) and not isinstance(gold, bool):
        gold = str(gold)
    if not isinstance(prediction, str) or not isinstance(gold, str) or not prediction.strip() or not gold.strip():
        return False
    verdict = _integer_answer_verdict(prediction, gold)
    if verdict is not None:
        return verdict
    _quiet_math_verify()
    if threading.current_thread() is not threading.main_thread():
        return _run_in_subprocess(prediction, gold, timeout_seconds)
    try:
        with _time_limit(timeout_seconds):
            return bool(_parse_and_verify(prediction, gold))
    except _GradingTimeout:
        return False
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Numbers (MGSM)
# ---------------------------------------------------------------------------------------------------------------

# Answer prefixes per language: MGSM's own exemplar phrasing (lm-eval's native CoT prompts), simple-evals' short
# forms, and the English ones, which models often fall back to in any language. Longest first per language.
MGSM_ANSWER_PREFIXES: dict[str, tuple[str, ...]] = {
    "en": ("The final answer is", "The answer is", "Answer"),
    "bn": ("উত্তর হল", "উত্তর হলো", "উত্তর", "উত্তরঃ"),
    "de": ("Die Antwort lautet", "Die Antwort ist", "Antwort"),
    "es": ("La respuesta es", "Respuesta"),
    "fr": ("La réponse est", "Réponse"),
    "ja": ("答えは", "解答", "答え"),
    "ru": ("Ответ —", "Ответ:", "Ответ -", "Ответ"),
    "sw": ("Jibu ni", "Jibu"),
    "te": ("సమాధానం", "జవాబు"),
    "th": ("คำตอบคือ", "คำตอบ"),
    "zh": ("答案是", "答案"),
}

# Languages whose usual decimal mark is a comma (so `.` or a space groups thousands). The others group with
# commas (Bengali and Telugu in the Indian 2-digit groups, 1,00,000) and use a dot for decimals.
_COMMA_DECIMAL = {"de", "es", "fr", "ru"}
# Languages where a plain space groups thousands (1 234); everywhere a no-break or thin space does.
_SPACE_GROUPING = {"fr", "ru", "es"}
_THIN_SPACES = "\u00a0\u202f\u2009\u2007"


def _ascii_digits(text: str) -> str:
    """Native digits (Bengali ০-৯, Telugu ౦-౯, Thai ๐-๙, full-width ０-９, ...) as ASCII; nothing else changes.

    Full-width punctuation is deliberately left alone: in Chinese text `，` separates clauses, not thousands.
    """
    out = []
    for ch in text:
        if not ch.isascii() and ch.isdigit():
            value = unicodedata.decimal(ch, None)
            out.append(str(value) if value is not None else ch)
        else:
            out.append(ch)
    return "".join(out)


def _number_re(language: str | None) -> re.Pattern[str]:
    spaces = _THIN_SPACES + (" " if language in _SPACE_GROUPING else "")
    # A group separator is `.` or `,` followed by digits, or a space followed by exactly three digits (so that
    # "3 apples and 4" never merges into 34). The sign must not follow a word character ("COVID-19", "3-4").
    return re.compile(
        rf"(?<![\w.,])(?P<sign>[-−–]\s?)?(?P<body>\d+(?:(?:[.,]|[{spaces}](?=\d{{3}}(?!\d)))\d+)*)",
    )


def _to_float(body: str, language: str | None) -> float | None:
    body = re.sub(rf"[ {_THIN_SPACES}]", "", body)
    commas, dots = body.count(","), body.count(".")
    if commas and dots:
        # Both marks: the last one is the decimal mark (1,234.5 and 1.234,5 alike).
        decimal = "," if body.rfind(",") > body.rfind(".") else "."
        group = "." if decimal == "," else ","
        body = body.replace(group, "").replace(decimal, ".")
    elif commas or dots:
        mark = "," if commas else "."
        count = commas or dots
        tail = body.rsplit(mark, 1)[1]
        comma_decimal = language in _COMMA_DECIMAL
        # The locale's decimal mark is a decimal unless repeated; the other mark groups thousands when followed by
        # 3 digits and is otherwise a decimal (a German model writing "2.5" in English style means two and a half).
        is_decimal_mark = (mark == ",") == comma_decimal
        if count > 1:
            body = body.replace(mark, "")
        elif is_decimal_mark:
            body = body.replace(mark, ".")
        elif len(tail) == 3:
            body = body.replace(mark, "")
        else:
            body = body.replace(mark, ".")
    try:
        value = float(body)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _numbers(text: str, language: str | None) -> list[float]:
    values = []
    for match in _number_re(language).finditer(text):
        value = _to_float(match.group("body"), language)
        if value is not None:
            values.append(-value if match.group("sign") else value)
    return values


def _clean_latex(text: str) -> str:
    # `1{,}234` and `1\,234` are how LaTeX writes grouped numbers; `\$`, `\text{...}` and `\%` are decoration.
    text = text.replace("{,}", ",").replace("\\,", "\u2009").replace("\\!", "").replace("\\ ", " ")
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\frac\{(\d+)\}\{(\d+)\}", r"\1/\2", text)
    return text.replace("\\$", "$").replace("\\%", "%")


def _prefix_re(language: str | None) -> re.Pattern[str]:
    prefixes = set(MGSM_ANSWER_PREFIXES["en"])
    if language is None:
        for values in MGSM_ANSWER_PREFIXES.values():
            prefixes.update(values)
    else:
        prefixes.update(MGSM_ANSWER_PREFIXES.get(language, ()))
    alternatives = "|".join(re.escape(p) for p in sorted(prefixes, key=len, reverse=True))
    return re.compile(rf"(?:\*\*)?(?:{alternatives})(?:\*\*)?\s*(?:[:：]|[—-](?=\s))?", re.IGNORECASE)


def extract_number(text: str, language: str | None = None) -> float | None:
    """The final numeric answer of a grade-school math output (MGSM, GSM8K); None when it has no number.

    In order: the last `\\boxed{}`; the number on the line of the last answer prefix ("The answer is", "Die
    Antwort lautet", "答案：", ... for `language`, English ones always); the last number in the text. Numbers are
    read in the language's format: `1,234.5` (en), `1.234,5` (de, es), `1 234,5` (fr, ru), `1,00,000` (bn, te),
    native digits (০-৯, ౦-౯, ๐-๙, full-width). Without `language` the English format is assumed and every
    language's prefixes are tried.
    """
    if not isinstance(text, str) or not text:
        return None
    text = _ascii_digits(text)
    boxed = extract_boxed(text)
    if boxed is not None:
        values = _numbers(_clean_latex(boxed), language)
        if values:
            return values[0] if len(values) == 1 or "=" not in boxed else values[-1]
    cleaned = _clean_latex(text)
    for match in reversed(list(_prefix_re(language).finditer(cleaned))):
        line = cleaned[match.end() :].split("\n", 1)[0]
        # "The answer is 3 + 15 = 18": the result follows the last `=`; otherwise the first number is the answer
        # ("The answer is 18 (3 eggs a day)").
        after_equals = line.rsplit("=", 1)[1] if "=" in line else line
        values = _numbers(after_equals, language)
        if values:
            return values[0]
    values = _numbers(cleaned, language)
    return values[-1] if values else None


def boxed_word_key(text: str) -> str | None:
    """The last `\\boxed{}` answer as a word key (lower case, spaces collapsed): the visual task's answers ("red",
    "top left", "3"); None without a box."""
    answer = extract_boxed(text)
    return None if answer is None else " ".join(answer.lower().split())


def boxed_word_correct(text: str, gold: str) -> bool:
    """The last `\\boxed{}` answer equals the gold word(s), case and spacing ignored."""
    key = boxed_word_key(text)
    return key is not None and key == " ".join(str(gold).lower().split())


def numbers_equal(prediction: float | None, gold: float | str | None, rel_tol: float = 1e-6) -> bool:
    """Whether an extracted number equals the gold one (gold may be MGSM's string form, e.g. "70000")."""
    if prediction is None or gold is None:
        return False
    if isinstance(gold, str):
        gold = _to_float(gold.strip().replace(" ", ""), None) if gold.strip() else None
        if gold is None:
            return False
    return math.isclose(prediction, float(gold), rel_tol=rel_tol, abs_tol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice (GPQA, MMLU)
# ---------------------------------------------------------------------------------------------------------------

# Answer words in the languages of Global-MMLU / MMMLU prompts, for "X: B" (simple-evals' multilingual list plus
# the MGSM prefixes); English phrasings for "the (best|correct|final) answer is (B)".
_CHOICE_ANSWER_WORDS = (
    r"answer|antwort|respuesta|réponse|resposta|risposta|jawaban|jibu|cevap|ответ|відповідь|odpowiedź|"
    r"odpověď|antwoord|svar|vastaus|válasz|răspuns|απάντηση|תשובה|الإجابة|الجواب|پاسخ|उत्तर|উত্তর|উত্তরঃ|"
    r"సమాధానం|ఉత్తరం|பதில்|ഉത്തരം|ಉತ್ತರ|ઉત્તર|ਜਵਾਬ|คำตอบ|答案|答え|解答|정답|답|đáp án|trả lời|sagot|"
    r"amsa|idahun|azịza|impendulo|jawapan"
)
_FULLWIDTH_LETTERS = str.maketrans("ＡＢＣＤＥＦＧＨＩＪ", "ABCDEFGHIJ")


def _choice_patterns(letters: str) -> list[re.Pattern[str]]:
    letter = rf"[{letters}]"
    # A letter is the answer only when it stands alone: "(B)", "B", "**B**", "B." but not "Because" or "A cat".
    alone = rf"[\(\[\{{*\s]*(?-i:(?P<letter>{letter}))(?![\w'’])"
    return [
        re.compile(rf"\\boxed\s*\{{\s*(?:\\text(?:bf)?\s*\{{)?\s*\(?(?P<letter>{letter})\)?\s*\}}?\s*\}}"),
        re.compile(
            rf"(?:the\s+)?(?:best|correct|final|right)\s+(?:answer|option|choice)\s*(?:is|:)\s*(?:option|choice)?\s*"
            rf":?\s*\$?{alone}",
            re.IGNORECASE,
        ),
        re.compile(
            rf"(?:^|[^\w])(?:{_CHOICE_ANSWER_WORDS})\s*(?:\*\*)?\s*[:：]\s*(?:\*\*)?\s*\$?{alone}", re.IGNORECASE
        ),
        re.compile(rf"answer\s+is\s*:?\s*(?:option|choice)?\s*\$?{alone}", re.IGNORECASE),
    ]


def extract_choice_letter(text: str, letters: str = "ABCD") -> str | None:
    """The chosen option letter of a multiple-choice output, upper case; None when no answer is stated.

    Recognises `\\boxed{B}` (also `\\boxed{\\text{B}}`, `\\boxed{(B)}`), "The best answer is B", "The correct answer
    is (B)", "Answer: B" (and "Antwort: B", "答案：B", ... for multilingual MMLU), "answer is B"; the last statement
    wins. A bare letter as the whole output ("B", "(B)", "B.") counts too. `letters` sets the valid options.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    text = text.translate(_FULLWIDTH_LETTERS)
    for pattern in _choice_patterns(letters):
        matches = list(pattern.finditer(text))
        if matches:
            return matches[-1].group("letter").upper()
    bare = re.fullmatch(rf"\s*[\(\[*]*\s*([{letters}])\s*[\)\]*.]*\s*", text)
    return bare.group(1) if bare else None


# ---------------------------------------------------------------------------------------------------------------
# BIG-Bench Hard: one extractor per answer family
# ---------------------------------------------------------------------------------------------------------------

_BBH_CHOICE = (
    "date_understanding disambiguation_qa geometric_shapes hyperbaton logical_deduction_five_objects "
    "logical_deduction_seven_objects logical_deduction_three_objects movie_recommendation penguins_in_a_table "
    "reasoning_about_colored_objects ruin_names salient_translation_error_detection snarks temporal_sequences "
    "tracking_shuffled_objects_five_objects tracking_shuffled_objects_seven_objects "
    "tracking_shuffled_objects_three_objects"
).split()
# The words each two-way task's gold uses, then synonyms a model may answer with instead.
_BBH_BINARY: dict[str, dict[str, str]] = {
    "boolean_expressions": {"true": "true", "false": "false"},
    "causal_judgement": {"yes": "yes", "no": "no"},
    "formal_fallacies": {"valid": "valid", "invalid": "invalid"},
    "navigate": {"yes": "yes", "no": "no"},
    "sports_understanding": {"yes": "yes", "no": "no", "plausible": "yes", "implausible": "no"},
    "web_of_lies": {"yes": "yes", "no": "no"},
}
# "not valid" is "invalid", "not plausible" is "no"; a negated word that has no opposite in the task is left alone.
_BBH_NEGATION = {"valid": "invalid", "plausible": "no", "true": "false"}
BBH_TASKS: dict[str, str] = {
    **{name: "choice" for name in _BBH_CHOICE},
    **{name: "binary" for name in _BBH_BINARY},
    "multistep_arithmetic_two": "numeric",
    "object_counting": "numeric",
    "dyck_languages": "dyck",
    "word_sorting": "words",
}
BBH_TASKS = dict(sorted(BBH_TASKS.items()))

_BBH_ANSWER_RE = re.compile(r"(?:the\s+)?(?:final\s+|correct\s+|best\s+)?answer\s*(?:is\b|:)\s*:?", re.IGNORECASE)
_BBH_OPTION_RE = re.compile(r"^\(([A-Z])\)\s*(.+?)\s*$", re.MULTILINE)
_BRACKETS = "()[]{}<>"
_NUMBER_WORDS = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}


def _bbh_span(text: str) -> str | None:
    """What a BBH output gives as its answer: the rest of the line after the last "the answer is" / "Answer:"
    (the next lines up to a blank one when the prefix ends its line), or the last `\\boxed{}` when that comes later;
    a one-line output without either is taken whole. Markdown emphasis, quotes and a final period are dropped."""
    matches = list(_BBH_ANSWER_RE.finditer(text))
    boxes = list(_BOXED_RE.finditer(text))
    if boxes and (not matches or boxes[-1].start() > matches[-1].start()):
        span = extract_boxed(text)
        if span is not None:
            span = re.sub(r"^\\text(?:bf)?\{(.*)\}$", r"\1", span.strip())
            return span.strip() or None
    if matches:
        rest = text[matches[-1].end() :].lstrip(" \t*:")
        if rest.startswith("\n"):
            rest = rest.strip("\n").split("\n\n")[0].replace("\n", " ")
        span = rest.split("\n")[0]
    elif "\n" not in text.strip():
        span = text
    else:
        return None
    span = span.strip().strip("*`$\"'“”").strip()
    span = re.sub(r"(?<![.])\.$", "", span).strip().strip("*`$\"'“”").strip()
    return span or None


def _normalise_words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s&'-]", " ", text.lower()).split())


def _bbh_options(question: str) -> dict[str, str]:
    return {letter: _normalise_words(option) for letter, option in _BBH_OPTION_RE.findall(question or "")}


def _bbh_choice(span: str, question: str | None) -> str | None:
    options = _bbh_options(question or "")
    span = re.sub(r"^(?:option|choice)\s+", "", span, flags=re.IGNORECASE)
    # "(B)", "(B) Patrick", "B)", "B.", "B: ...", "B" alone; not "A cat" (an article, not a letter).
    letter = re.match(r"^[\[(]([A-Za-z])[\])](?!\w)|^([A-Z])(?:[).:,](?!\w)|$)", span)
    if letter:
        found = (letter.group(1) or letter.group(2)).upper()
        return f"({found})" if not options or found in options else None
    # The option's text instead of its letter: accepted only when it names exactly one option.
    text = _normalise_words(span)
    named = [letter for letter, option in options.items() if option == text]
    return f"({named[0]})" if len(named) == 1 else (text or None)


def _bbh_binary(span: str, task: str) -> str | None:
    vocabulary = _BBH_BINARY[task]
    words = _normalise_words(span)
    found = []
    for negated in re.findall(r"\bnot\s+(\w+)", words):
        if negated in _BBH_NEGATION and _BBH_NEGATION[negated] in vocabulary.values():
            found.append(_BBH_NEGATION[negated])
    words = re.sub(r"\bnot\s+\w+", " ", words)
    found += [vocabulary[word] for word in words.split() if word in vocabulary]
    # "Yes and no", "True or False": two different verdicts are no answer.
    return found[0] if found and len(set(found)) == 1 else None


def _bbh_number(span: str) -> float | None:
    after_equals = _ascii_digits(span).rsplit("=", 1)[-1]
    values = _numbers(after_equals, None)
    if values:
        return values[0]
    word = re.match(r"^\s*([a-z]+)\b", after_equals.lower())
    return float(_NUMBER_WORDS[word.group(1)]) if word and word.group(1) in _NUMBER_WORDS else None


def _number_key(value: float | None) -> str | None:
    if value is None:
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def _bbh_words(span: str) -> str:
    tokens = [token.strip('.`"*[]()“”').lower() for token in re.split(r"[\s,;]+", span)]
    return " ".join(token for token in tokens if token and not re.fullmatch(r"\d+[.)]?", token))


def extract_bbh_answer(text: str, task: str, question: str | None = None) -> str | None:
    """The answer of a BIG-Bench Hard output in a canonical form comparable with the gold target; None when the
    output states none. `question` (the task input) lets the option-letter tasks accept an option's text, and
    `dyck_languages` accept the whole completed sequence, as well as the canonical answer.

    Per family: option letters as "(B)" (from "(B)", "B", "B)", "(B) Patrick" or the text "Patrick"); two-way
    verdicts as the gold's word ("True", "yes", "valid"; "plausible" / "not valid" too, never two verdicts at
    once); numbers as their value (`-11,520`, "eight"); `dyck_languages` as its closing brackets without spaces;
    `word_sorting` as the lower-cased words separated by single spaces (commas, line breaks and list numbers
    dropped).
    """
    if not isinstance(text, str) or not text.strip() or task not in BBH_TASKS:
        return None
    span = _bbh_span(text)
    if span is None:
        return None
    family = BBH_TASKS[task]
    if family == "choice":
        return _bbh_choice(span, question)
    if family == "binary":
        return _bbh_binary(span, task)
    if family == "numeric":
        return _number_key(_bbh_number(span))
    if family == "dyck":
        closing = "".join(ch for ch in span if ch in _BRACKETS)
        prefix = re.search(r"Input:\s*(.+)", question or "")
        opened = "".join(ch for ch in prefix.group(1) if ch in _BRACKETS) if prefix else ""
        # The whole completed sequence is the same answer as its closing part.
        if opened and closing.startswith(opened) and len(closing) > len(opened):
            closing = closing[len(opened) :]
        return closing or None
    return _bbh_words(span) or None


def bbh_gold_key(gold: str, task: str) -> str | None:
    """The canonical form of a BBH target (what `extract_bbh_answer` returns for a correct output)."""
    family = BBH_TASKS.get(task)
    if family is None:
        raise ValueError(f"unknown BBH task {task!r}; the 27 are: {', '.join(BBH_TASKS)}")
    gold = gold.strip()
    if family == "choice":
        letter = re.fullmatch(r"\(([A-Z])\)", gold)
        # A few targets are an option's text rather than its letter (options split at commas in the source).
        return f"({letter.group(1)})" if letter else _normalise_words(gold)
    if family == "binary":
        return _BBH_BINARY[task].get(gold.lower())
    if family == "numeric":
        return _number_key(_bbh_number(gold))
    if family == "dyck":
        return "".join(ch for ch in gold if ch in _BRACKETS)
    return _bbh_words(gold)


def bbh_answer_correct(text: str, gold: str, task: str, question: str | None = None) -> bool:
    """Exact match of a BBH output's extracted answer with the target, after the normalisation of
    `extract_bbh_answer` (so "So the answer is B." matches "(B)", and "(C)" never does)."""
    answer = extract_bbh_answer(text, task, question)
    return answer is not None and answer == bbh_gold_key(gold, task)


# ---------------------------------------------------------------------------------------------------------------
# Several samples per question: pass@k and maj@k
# ---------------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from `n` samples of which `c` are correct (Chen et al. 2021, eq. 1):
    1 - C(n-c, k) / C(n, k), computed as a product to stay exact for large n."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_index(keys: Sequence[Hashable | None]) -> int | None:
    """Index of the first sample whose answer key is the most common one (ties: the earliest answer to reach the
    top count first appears first); None when no sample has an answer. Samples without an answer do not vote."""
    counts = Counter(key for key in keys if key is not None)
    if not counts:
        return None
    top = max(counts.values())
    for i, key in enumerate(keys):
        if key is not None and counts[key] == top:
            return i
    return None  # unreachable


def aggregate_scores(
    correct: Sequence[Sequence[bool]], keys: Sequence[Sequence[Hashable | None]] | None = None, ks: Iterable[int] = ()
) -> dict[str, float]:
    """Scores of per-question sample grades: `correct[q][s]` is sample s of question q.

    `accuracy` is the mean over all samples (pass@1, unbiased for any n). With more than one sample per question,
    `pass@k` (unbiased estimator) and, given answer `keys` (`keys[q][s]`, e.g. the extracted number), `maj@k` (the
    majority answer of the first k samples is correct) for each k in `ks` that is <= the number of samples.
    """
    if not correct:
        return {"accuracy": 0.0}
    scores = {"accuracy": sum(sum(row) / len(row) for row in correct) / len(correct)}
    n = min(len(row) for row in correct)
    for k in sorted(set(ks)):
        if k < 1 or k > n or n == 1:
            continue
        scores[f"pass@{k}"] = sum(pass_at_k(len(row), sum(row), k) for row in correct) / len(correct)
        if keys is not None:
            hits = 0
            for row_correct, row_keys in zip(correct, keys):
                index = majority_index(row_keys[:k])
                hits += bool(index is not None and row_correct[index])
            scores[f"maj@{k}"] = hits / len(correct)
    return scores


def macro_scores(
    correct: Sequence[Sequence[bool]],
    keys: Sequence[Sequence[Hashable | None]] | None,
    subsets: Sequence[Hashable],
    ks: Iterable[int] = (),
) -> dict[str, float]:
    """`aggregate_scores` per subset, averaged with equal weight per subset (BIG-Bench Hard's headline number, which
    weighs a 146-question task like a 250-question one): `macro_accuracy`, `macro_pass@k`, `macro_maj@k`."""
    rows: dict[Hashable, list[int]] = {}
    for index, subset in enumerate(subsets):
        rows.setdefault(subset, []).append(index)
    ks = list(ks)
    per_subset = [
        aggregate_scores([correct[i] for i in indices], None if keys is None else [keys[i] for i in indices], ks)
        for indices in rows.values()
    ]
    if not per_subset:
        return {"macro_accuracy": 0.0}
    names = [name for name in per_subset[0] if all(name in scores for scores in per_subset)]
    return {f"macro_{name}": sum(scores[name] for scores in per_subset) / len(per_subset) for name in names}


def math_answer_key(text: str) -> str | None:
    """A comparable form of a math output's final answer, for maj@k: the extracted span without spaces and
    presentation-only LaTeX (`\\left`, `\\dfrac`, `\\!`)."""
    span = extract_math_answer(text)
    if span is None:
        return None
    for old, new in (("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\!", "")):
        span = span.replace(old, new)
    return re.sub(r"\s+|\\[,;:]|^\$|\$$", "", span) or None
