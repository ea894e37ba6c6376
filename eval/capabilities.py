"""Verifiable capabilities for training and evaluation: math, reasoning, instruction following and coding.

Each capability is a family of generated problems with its own checker, a train split and a held-out test split
that share no problem (a stable hash decides: of the question for math, as in `eval.synthetic`; of the logical
problem for reasoning and coding, so that no translated or reworded twin crosses), and the same fixed seed always
gives the same rows. Every row has the columns

    prompt (chat messages), completion ([one assistant message], a reference answer for SFT), answer (str),
    capability, language, level (1-3, for the curriculum), constraint (JSON of the active constraint, "" when
    none), system_instruction (the id of the row's `SystemInstruction`, "" when none)

- `math`: the bundled arithmetic task (`eval.synthetic.arithmetic_problems`, rows unchanged).
- `reasoning`: orderings from comparisons ("Anna is older than Tom. ... Who is the youngest?"); the answer is a name
  in `\\boxed{}`. Level 1: two people, 2: three, 3: four and "the second ...".
- `coding`: a description of a computation on inputs x (and y); the answer is a program of `eval.expr_lang`, which
  the checker runs on fixed test inputs with our evaluator and compares with the reference program's values.
- `instruction`: math and reasoning questions under a constraint-setting system instruction from the train pool
  (answer language, a wrapper around the reply, a word limit, a banned word); right only when the answer is right
  AND the constraint holds.

`SYSTEM_INSTRUCTIONS` holds a `train` pool (persona, format, verbosity, language and the constraint-setting ones)
and a disjoint `heldout` pool, worded differently and with constraint instances train never has, for evaluating
instruction following under unseen instructions. `capability_score` is the one checker the reward and the eval
tasks use. See docs/capabilities.md.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from datasets import Dataset

from .expr_lang import ExprError, evaluate, free_names
from .grading import canonical_integer, extract_boxed, math_answer_correct
from .synthetic import FINAL_ANSWER, INSTRUCTION, LANGUAGES, LEVELS, SOLUTION_OPENER, _split_of, arithmetic_problems

__all__ = [
    "CAPABILITIES",
    "SYSTEM_INSTRUCTIONS",
    "SystemInstruction",
    "capability_group",
    "capability_problems",
    "capability_score",
    "constraint_holds",
    "heldout_mixture",
    "mixed_problems",
    "with_system_instruction",
]

CAPABILITIES: tuple[str, ...] = ("math", "reasoning", "instruction", "coding")
SPLITS = ("train", "test")


# ---------------------------------------------------------------------------------------------------------------
# System instructions
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SystemInstruction:
    id: str  # unique across pools
    text: str  # the system message content
    constraint: dict | None  # {"kind": "language" | "wrapper" | "word_limit" | "banned", ...}; None: nothing to check


def _plain(id: str, text: str) -> SystemInstruction:
    return SystemInstruction(id, text, None)


def _language(id: str, text: str, language: str) -> SystemInstruction:
    return SystemInstruction(id, text, {"kind": "language", "language": language})


def _wrapper(id: str, text: str, open_: str, close: str) -> SystemInstruction:
    return SystemInstruction(id, text, {"kind": "wrapper", "open": open_, "close": close})


def _word_limit(id: str, text: str, max_words: int) -> SystemInstruction:
    return SystemInstruction(id, text, {"kind": "word_limit", "max_words": max_words})


def _banned(id: str, text: str, token: str) -> SystemInstruction:
    return SystemInstruction(id, text, {"kind": "banned", "token": token})


# Held-out instructions are worded differently, and most of their constraints (Spanish, the <result> and << >>
# wrappers, 5 and 8 words, 'final' and 'the') never occur in training.
SYSTEM_INSTRUCTIONS: dict[str, tuple[SystemInstruction, ...]] = {
    "train": (
        _plain("persona-helpful", "You are a helpful assistant."),
        _plain("persona-tutor", "You are a patient math tutor who explains each step."),
        _plain("persona-de", "Du bist ein hilfsbereiter Assistent."),
        _plain("format-boxed", "Show your work briefly and put the final answer in \\boxed{}."),
        _plain("verbosity-concise", "Be concise."),
        _language("lang-de", "Always reply in German.", "de"),
        _language("lang-fr", "Always reply in French.", "fr"),
        _language("lang-en", "Reply in English, whatever the language of the question.", "en"),
        _wrapper("wrap-ans", "Wrap your whole reply in <ans> and </ans>.", "<ans>", "</ans>"),
        _wrapper("wrap-brackets", "Start your reply with [[ and end it with ]].", "[[", "]]"),
        _word_limit("limit-6", "Use at most 6 words.", 6),
        _word_limit("limit-10", "Keep your reply under 11 words.", 10),
        _banned("ban-answer", "Never use the word 'answer'.", "answer"),
        _banned("ban-we", "Do not use the word 'we'.", "we"),
    ),
    "heldout": (
        _plain("h-persona-expert", "You are an expert problem solver."),
        _plain("h-persona-careful", "You are a careful assistant who checks every result."),
        _plain("h-verbosity-brief", "Answer briefly and precisely."),
        _language("h-lang-es", "Your replies must be written in Spanish.", "es"),
        _language("h-lang-de", "Antworte immer auf Deutsch.", "de"),
        _wrapper(
            "h-wrap-result", "Enclose everything you write between <result> and </result>.", "<result>", "</result>"
        ),
        _wrapper("h-wrap-angle", "Your reply has to begin with << and finish with >>.", "<<", ">>"),
        _word_limit("h-limit-5", "No more than five words, please.", 5),
        _word_limit("h-limit-8", "Limit yourself to 8 words.", 8),
        _banned("h-ban-final", "The word 'final' is forbidden in your reply.", "final"),
        _banned("h-ban-the", "Avoid the word 'the' entirely.", "the"),
    ),
}


def _instruction_by_id() -> dict[str, SystemInstruction]:
    return {si.id: si for pool in SYSTEM_INSTRUCTIONS.values() for si in pool}


# ---------------------------------------------------------------------------------------------------------------
# Constraints: checking a reply, and rewriting a reference reply so that it satisfies one
# ---------------------------------------------------------------------------------------------------------------

# The language of a reply is told by the fixed phrases the families' replies are built from.
PROGRAM_ANSWER = {
    "en": "The program is \\boxed{{{x}}}.",
    "de": "Das Programm lautet \\boxed{{{x}}}.",
    "fr": "Le programme est \\boxed{{{x}}}.",
    "es": "El programa es \\boxed{{{x}}}.",
}


def _phrases(language: str) -> tuple[str, ...]:
    prefix = "\\boxed{{{x}}}."
    return (
        SOLUTION_OPENER[language],
        FINAL_ANSWER[language].removesuffix(prefix).strip(),
        PROGRAM_ANSWER[language].removesuffix(prefix).strip(),
    )


LANGUAGE_PHRASES: dict[str, tuple[str, ...]] = {language: _phrases(language) for language in LANGUAGES}
_BOXED_SPAN_RE = re.compile(r"\\boxed\{")


def _boxed_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each closed `\\boxed{...}` in `text`, braces balanced."""
    spans = []
    for match in _BOXED_SPAN_RE.finditer(text):
        depth = 0
        for i in range(match.end() - 1, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    spans.append((match.start(), i + 1))
                    break
    return spans


def _word_count(text: str) -> int:
    # A boxed answer counts as one word however many spaces a program has inside it.
    for start, end in reversed(_boxed_spans(text)):
        text = text[:start] + "BOXED" + text[end:]
    return len(text.split())


def _banned_re(token: str) -> re.Pattern[str]:
    if re.fullmatch(r"\w+", token):
        return re.compile(rf"(?<!\w){re.escape(token)}(?!\w)", re.IGNORECASE)
    return re.compile(re.escape(token), re.IGNORECASE)


def reply_language(text: str) -> str | None:
    """The one language whose fixed reply phrases occur in `text`; None when none or several do."""
    found = [language for language, phrases in LANGUAGE_PHRASES.items() if any(p in text for p in phrases)]
    return found[0] if len(found) == 1 else None


def constraint_holds(text: str, constraint: dict | None) -> bool:
    """Whether the reply `text` satisfies `constraint` (None or {}: nothing to check)."""
    if not constraint:
        return True
    kind = constraint["kind"]
    if kind == "language":
        return reply_language(text) == constraint["language"]
    if kind == "wrapper":
        stripped, open_, close = text.strip(), constraint["open"], constraint["close"]
        if len(stripped) < len(open_) + len(close) or not (stripped.startswith(open_) and stripped.endswith(close)):
            return False
        inner = stripped[len(open_) : len(stripped) - len(close)]
        return open_ not in inner and close not in inner  # wrapped once
    if kind == "word_limit":
        return _word_count(text) <= constraint["max_words"]
    if kind == "banned":
        return _banned_re(constraint["token"]).search(text) is None
    raise ValueError(f"unknown constraint kind {kind!r}; the kinds are language, wrapper, word_limit, banned")


def _sentences(text: str) -> list[str]:
    # Split after ". " outside a boxed answer (reference replies are "Opener steps. ... Final \\boxed{x}.").
    protected = text
    for start, end in reversed(_boxed_spans(text)):
        protected = protected[:start] + "\0" * (end - start) + protected[end:]
    pieces, begin = [], 0
    for match in re.finditer(r"(?<=\.) ", protected):
        pieces.append(text[begin : match.start()])
        begin = match.end()
    pieces.append(text[begin:])
    return [piece for piece in pieces if piece]


def _last_boxed(text: str) -> str:
    spans = _boxed_spans(text)
    if not spans:
        raise ValueError(f"a reference reply must end in a \\boxed{{}} answer: {text!r}")
    start, end = spans[-1]
    return text[start:end]


def _translate(text: str, target: str) -> str:
    source = reply_language(text)
    if source is None or source == target:
        return text
    for old, new in zip(LANGUAGE_PHRASES[source], LANGUAGE_PHRASES[target]):
        text = text.replace(old, new)
    return text


def _unwrap(text: str) -> str:
    for si in _instruction_by_id().values():
        c = si.constraint
        if c and c["kind"] == "wrapper" and text.startswith(c["open"]) and text.endswith(c["close"]):
            return text[len(c["open"]) : len(text) - len(c["close"])]
    return text


def satisfy(text: str, constraint: dict | None) -> str:
    """The reference reply `text` rewritten to satisfy `constraint`: translated fixed phrases, a wrapper, the worked
    steps dropped for a word limit (down to the bare boxed answer), sentences with a banned word dropped."""
    text = _unwrap(text)
    if not constraint:
        return text
    kind = constraint["kind"]
    if kind == "language":
        text = _translate(text, constraint["language"])
    elif kind == "wrapper":
        text = f"{constraint['open']}{text}{constraint['close']}"
    elif kind == "word_limit":
        if _word_count(text) > constraint["max_words"]:
            text = _sentences(text)[-1]
        if _word_count(text) > constraint["max_words"]:
            text = _last_boxed(text) + "."
    elif kind == "banned":
        banned = _banned_re(constraint["token"])
        kept = [s for s in _sentences(text) if not banned.search(s)]
        if not kept or _BOXED_SPAN_RE.search(kept[-1]) is None:
            kept.append(_last_boxed(text) + ".")
        text = " ".join(kept)
    if not constraint_holds(text, constraint):
        raise ValueError(f"cannot rewrite {text!r} to satisfy {constraint}")
    return text


# ---------------------------------------------------------------------------------------------------------------
# Reasoning: orderings from comparisons
# ---------------------------------------------------------------------------------------------------------------

PEOPLE = {
    "en": ("Anna", "Tom", "Mia", "Paul", "Lucy", "Ben", "Emma", "Jack", "Sara", "Leo"),
    "de": ("Lisa", "Jonas", "Lena", "Felix", "Emma", "Paul", "Mara", "Tim", "Anna", "Max"),
    "fr": ("Paul", "Marie", "Louis", "Chloé", "Hugo", "Léa", "Jules", "Alice", "Emma", "Noé"),
    "es": ("María", "Juan", "Lucía", "Pablo", "Sofía", "Diego", "Carmen", "Luis", "Elena", "Hugo"),
}
# Per relation: (more, less) comparatives, and the questions for (first, last, second, second from last).
RELATIONS = {
    "en": {
        "age": (("older", "younger"), ("oldest", "youngest", "second oldest", "second youngest")),
        "height": (("taller", "shorter"), ("tallest", "shortest", "second tallest", "second shortest")),
        "speed": (("faster", "slower"), ("fastest", "slowest", "second fastest", "second slowest")),
    },
    "de": {
        "age": (("älter", "jünger"), ("ältesten", "jüngsten", "zweitältesten", "zweitjüngsten")),
        "height": (("größer", "kleiner"), ("größten", "kleinsten", "zweitgrößten", "zweitkleinsten")),
        "speed": (("schneller", "langsamer"), ("schnellsten", "langsamsten", "zweitschnellsten", "zweitlangsamsten")),
    },
    "fr": {
        "age": (
            ("plus âgé", "plus jeune"),
            ("le plus âgé", "le plus jeune", "le deuxième plus âgé", "le deuxième plus jeune"),
        ),
        "height": (
            ("plus grand", "plus petit"),
            ("le plus grand", "le plus petit", "le deuxième plus grand", "le deuxième plus petit"),
        ),
        "speed": (
            ("plus rapide", "plus lent"),
            ("le plus rapide", "le plus lent", "le deuxième plus rapide", "le deuxième plus lent"),
        ),
    },
    "es": {
        "age": (("mayor", "menor"), ("el mayor", "el menor", "el segundo mayor", "el segundo menor")),
        "height": (
            ("más alto", "más bajo"),
            ("el más alto", "el más bajo", "el segundo más alto", "el segundo más bajo"),
        ),
        "speed": (
            ("más rápido", "más lento"),
            ("el más rápido", "el más lento", "el segundo más rápido", "el segundo más lento"),
        ),
    },
}
FACT = {
    "en": "{a} is {c} than {b}.",
    "de": "{a} ist {c} als {b}.",
    "fr": "{a} est {c} que {b}.",
    "es": "{a} es {c} que {b}.",
}
WHO = {"en": "Who is the {q}?", "de": "Wer ist am {q}?", "fr": "Qui est {q} ?", "es": "¿Quién es {q}?"}


def _reasoning_problem(rng: random.Random, language: str, level: int) -> dict:
    people = rng.sample(PEOPLE[language], level + 1)  # in order, first = most
    relation = rng.choice(sorted(RELATIONS[language]))
    (more, less), questions = RELATIONS[language][relation]
    facts = []
    for upper, lower in zip(people, people[1:]):
        if rng.random() < 0.5:
            facts.append(FACT[language].format(a=upper, b=lower, c=more))
        else:
            facts.append(FACT[language].format(a=lower, b=upper, c=less))
    rng.shuffle(facts)
    which = rng.randrange(4 if level == 3 else 2)
    answer = [people[0], people[-1], people[1], people[-2]][which]
    question = " ".join([*facts, WHO[language].format(q=questions[which])])
    solution = f"{SOLUTION_OPENER[language]} {' > '.join(people)}. {FINAL_ANSWER[language].format(x=answer)}"
    # The split key is the logical problem, whatever the language and the facts' phrasing and order: a translated
    # or reworded twin of a test problem must not be in train.
    order = ",".join(str(PEOPLE[language].index(person)) for person in people)
    key = f"reasoning|{relation}|{order}|{which}"
    return _row(f"{question} {INSTRUCTION[language]}", solution, answer, "reasoning", language, level), key


# ---------------------------------------------------------------------------------------------------------------
# Coding: programs of eval.expr_lang from a description
# ---------------------------------------------------------------------------------------------------------------

# The first step acts on the input {v}, later ones on the result so far; {a} is the constant.
FIRST_STEP = {
    "+": {"en": "add {a} to {v}", "de": "addiere {a} zu {v}", "fr": "ajoute {a} à {v}", "es": "suma {a} a {v}"},
    "-": {
        "en": "subtract {a} from {v}",
        "de": "subtrahiere {a} von {v}",
        "fr": "soustrais {a} de {v}",
        "es": "resta {a} de {v}",
    },
    "*": {
        "en": "multiply {v} by {a}",
        "de": "multipliziere {v} mit {a}",
        "fr": "multiplie {v} par {a}",
        "es": "multiplica {v} por {a}",
    },
    "//": {
        "en": "divide {v} by {a}, rounding down",
        "de": "teile {v} durch {a} und runde ab",
        "fr": "divise {v} par {a} en arrondissant vers le bas",
        "es": "divide {v} entre {a} redondeando hacia abajo",
    },
    "%": {
        "en": "take the remainder of {v} divided by {a}",
        "de": "nimm den Rest von {v} geteilt durch {a}",
        "fr": "prends le reste de {v} divisé par {a}",
        "es": "toma el resto de {v} dividido entre {a}",
    },
}
NEXT_STEP = {
    "+": {"en": "add {a}", "de": "addiere {a}", "fr": "ajoute {a}", "es": "suma {a}"},
    "-": {"en": "subtract {a}", "de": "subtrahiere {a}", "fr": "soustrais {a}", "es": "resta {a}"},
    "*": {
        "en": "multiply by {a}",
        "de": "multipliziere mit {a}",
        "fr": "multiplie par {a}",
        "es": "multiplica por {a}",
    },
    "//": {
        "en": "divide by {a}, rounding down",
        "de": "teile durch {a} und runde ab",
        "fr": "divise par {a} en arrondissant vers le bas",
        "es": "divide entre {a} redondeando hacia abajo",
    },
    "%": {
        "en": "take the remainder modulo {a}",
        "de": "nimm den Rest modulo {a}",
        "fr": "prends le reste modulo {a}",
        "es": "toma el resto módulo {a}",
    },
}
# Level 3 starts from two inputs.
PAIR_STEP = {
    "max(x, y)": {
        "en": "take the larger of x and y",
        "de": "nimm die größere von x und y",
        "fr": "prends le plus grand de x et y",
        "es": "toma el mayor de x e y",
    },
    "min(x, y)": {
        "en": "take the smaller of x and y",
        "de": "nimm die kleinere von x und y",
        "fr": "prends le plus petit de x et y",
        "es": "toma el menor de x e y",
    },
    "abs(x - y)": {
        "en": "take the distance between x and y",
        "de": "nimm den Abstand zwischen x und y",
        "fr": "prends la distance entre x et y",
        "es": "toma la distancia entre x e y",
    },
    "x + y": {"en": "add x and y", "de": "addiere x und y", "fr": "additionne x et y", "es": "suma x e y"},
    "x - y": {"en": "subtract y from x", "de": "subtrahiere y von x", "fr": "soustrais y de x", "es": "resta y de x"},
    "x * y": {
        "en": "multiply x by y",
        "de": "multipliziere x mit y",
        "fr": "multiplie x par y",
        "es": "multiplica x por y",
    },
}
THEN = {"en": ", then ", "de": ", dann ", "fr": ", puis ", "es": ", luego "}
CODE_TASK = {
    "en": "Write a program with input {v}: {steps}. Put the program in \\boxed{{}}.",
    "de": "Schreibe ein Programm mit Eingabe {v}: {steps}. Schreibe das Programm in \\boxed{{}}.",
    "fr": "Écris un programme avec l'entrée {v} : {steps}. Mets le programme dans \\boxed{{}}.",
    "es": "Escribe un programa con entrada {v}: {steps}. Escribe el programa en \\boxed{{}}.",
}
INPUTS = {"en": "x and y", "de": "x und y", "fr": "x et y", "es": "x e y"}
VARIABLES = ("x", "n", "k", "m")  # levels 1-2: one input; level 3: x and y
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "//": 2, "%": 2}
# The checker runs both programs on these inputs; they cover negatives, zero and values past every constant.
TEST_INPUTS = (-7, -2, 0, 1, 3, 8, 12, 25)
TEST_PAIRS = ((-7, 3), (-2, -5), (0, 4), (1, 1), (3, -8), (8, 2), (12, 25), (25, 12))


def _coding_problem(rng: random.Random, language: str, level: int) -> dict:
    if level == 3:
        program = rng.choice(sorted(PAIR_STEP))
        variables, described = INPUTS[language], [PAIR_STEP[program][language]]
        precedence = 3 if program.endswith(")") else _PRECEDENCE[program.split()[1]]  # 3: a call binds tightest
    else:
        program = variables = rng.choice(VARIABLES)
        described, precedence = [], 3  # 3: an atom
    for _ in range(1 if level == 3 else level):
        op = rng.choice(("+", "-", "*", "//", "%"))
        a = rng.randint(2, {1: 50, 2: 9, 3: 30}[level])
        described.append((NEXT_STEP if described else FIRST_STEP)[op][language].format(a=a, v=program))
        # Operators are left-associative, so only a tighter operator after a looser one needs parentheses.
        program = f"({program}) {op} {a}" if _PRECEDENCE[op] > precedence else f"{program} {op} {a}"
        precedence = _PRECEDENCE[op]
    task = CODE_TASK[language].format(v=variables, steps=THEN[language].join(described))
    row = _row(task, PROGRAM_ANSWER[language].format(x=program), program, "coding", language, level)
    return row, f"coding|{canonical_program(program)}"


def canonical_program(program: str) -> str:
    """`program` with a single input renamed to `v`: the split key of a coding problem, which must not differ
    between a test problem and its train twin in another language or with another input name."""
    names = sorted(free_names(program))
    return re.sub(rf"\b{names[0]}\b", "v", program, flags=re.ASCII) if len(names) == 1 else program


def program_correct(candidate: str, reference: str) -> bool:
    """Whether `candidate` computes what `reference` does on the test inputs (our evaluator; never raises)."""
    names = sorted(free_names(reference))
    inputs = (
        [dict(zip(names, pair)) for pair in TEST_PAIRS] if len(names) == 2 else [{names[0]: x} for x in TEST_INPUTS]
    )
    try:
        return all(evaluate(candidate, env) == evaluate(reference, env) for env in inputs)
    except ExprError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Rows, splits, mixtures
# ---------------------------------------------------------------------------------------------------------------


def _row(question: str, solution: str, answer: str, capability: str, language: str, level: int) -> dict:
    return {
        "prompt": [{"role": "user", "content": question}],
        "completion": [{"role": "assistant", "content": solution}],
        "answer": answer,
        "capability": capability,
        "language": language,
        "level": level,
        "constraint": "",
        "system_instruction": "",
    }


def _check_split(split: str) -> str:
    split = "test" if split == "heldout" else split
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test' ('heldout' is the same as 'test'), got {split!r}")
    return split


def _generated(generator, tag: str, split: str, num_problems: int, seed: int, levels, languages) -> list[dict]:
    rng = random.Random(f"llama4-hf-{tag}-{seed}-{split}")
    cells = [(language, level) for level in levels for language in languages]
    rows, seen, attempts = [], set(), 0
    while len(rows) < num_problems:
        attempts += 1
        if attempts > 50 * num_problems + 1000:
            raise ValueError(f"cannot draw {num_problems} distinct {split} {tag} problems; ask for fewer")
        language, level = cells[len(rows) % len(cells)]
        row, key = generator(rng, language, level)
        question = row["prompt"][-1]["content"]
        if question in seen or _split_of(key) != split:
            continue
        seen.add(question)
        rows.append(row)
    return rows


def capability_problems(
    capability: str,
    split: str,
    num_problems: int,
    *,
    seed: int = 0,
    levels: Sequence[int] | None = None,
    languages: Sequence[str] | None = None,
    instructions: str = "train",
) -> Dataset:
    """`num_problems` distinct problems of one capability's `split` ("train" or "test"), evenly over languages and
    levels; the same arguments always give the same rows. `instructions` picks the system-instruction pool of the
    `instruction` family ("train", or "heldout" for instruction following under unseen instructions)."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; the capabilities are {list(CAPABILITIES)}")
    split = _check_split(split)
    levels = tuple(LEVELS if levels is None else levels)
    languages = tuple(LANGUAGES if languages is None else languages)
    unknown = sorted(set(languages) - set(LANGUAGES))
    if unknown or not languages:
        raise ValueError(f"languages must be among {list(LANGUAGES)}, got {list(languages)}")
    if not levels or not set(levels) <= set(LEVELS):
        raise ValueError(f"levels must be among {list(LEVELS)}, got {list(levels)}")
    if instructions not in SYSTEM_INSTRUCTIONS:
        raise ValueError(f"instructions must be one of {list(SYSTEM_INSTRUCTIONS)}, got {instructions!r}")
    if capability == "math":
        math = arithmetic_problems(split, num_problems, seed=seed, languages=languages, levels=levels)
        rows = [{**row, "capability": "math", "constraint": "", "system_instruction": ""} for row in math]
    elif capability == "reasoning":
        rows = _generated(_reasoning_problem, "reasoning", split, num_problems, seed, levels, languages)
    elif capability == "coding":
        rows = _generated(_coding_problem, "coding", split, num_problems, seed, levels, languages)
    else:
        rows = _instruction_rows(split, num_problems, seed, levels, languages, instructions)
    return Dataset.from_list(rows) if rows else _empty()


def _instruction_rows(split, num_problems, seed, levels, languages, pool) -> list[dict]:
    # Half math, half reasoning questions (other seeds than those families' own rows), each under one of the pool's
    # constraint-setting instructions.
    half = (num_problems + 1) // 2
    math = arithmetic_problems(split, half, seed=seed + 7919, languages=languages, levels=levels)
    math_rows = [{**row, "capability": "math", "constraint": "", "system_instruction": ""} for row in math]
    reasoning = _generated(
        _reasoning_problem, "reasoning-instruction", split, num_problems - half, seed, levels, languages
    )
    bases = [row for pair in zip(math_rows, reasoning) for row in pair] + math_rows[len(reasoning) :]
    constrained = [si for si in SYSTEM_INSTRUCTIONS[pool] if si.constraint is not None]
    rng = random.Random(f"llama4-hf-instruction-{seed}-{split}-{pool}")
    rows = []
    for base in bases:
        row = with_system_instruction(base, rng.choice(constrained))
        rows.append({**row, "capability": "instruction"})
    return rows


def _empty() -> Dataset:
    return Dataset.from_dict({column: [] for column in _row("", "", "", "", "", 0)})


def mixed_problems(
    shares: dict[str, float],
    split: str,
    num_problems: int,
    *,
    seed: int = 0,
    levels: Sequence[int] | None = None,
    languages: Sequence[str] | None = None,
) -> Dataset:
    """A mixture: round(share * num_problems) rows of each capability (largest remainder, so the total is exactly
    `num_problems`), shares normalised to sum to 1, rows interleaved in a seeded shuffle."""
    unknown = sorted(set(shares) - set(CAPABILITIES))
    if unknown:
        raise ValueError(f"unknown capabilities {unknown} in shares; the capabilities are {list(CAPABILITIES)}")
    if any(not math.isfinite(share) or share < 0 for share in shares.values()) or sum(shares.values()) <= 0:
        raise ValueError(f"shares must be finite, non-negative and sum to more than 0, got {shares}")
    total = sum(shares.values())
    names = [name for name in CAPABILITIES if shares.get(name, 0) > 0]
    exact = {name: shares[name] / total * num_problems for name in names}
    counts = {name: int(exact[name]) for name in names}
    by_remainder = sorted(names, key=lambda name: (-(exact[name] - counts[name]), CAPABILITIES.index(name)))
    for name in by_remainder[: num_problems - sum(counts.values())]:
        counts[name] += 1
    rows = []
    for name in names:
        if counts[name]:
            problems = capability_problems(name, split, counts[name], seed=seed, levels=levels, languages=languages)
            rows.extend(problems.to_list())
    random.Random(f"llama4-hf-mixture-{seed}-{split}").shuffle(rows)
    return Dataset.from_list(rows) if rows else _empty()


def heldout_mixture(
    capabilities: Sequence[str],
    num_problems: int,
    *,
    seed: int = 0,
    levels: Sequence[int] | None = None,
    languages: Sequence[str] | None = None,
) -> Dataset:
    """Held-out rows for evaluating after training on `capabilities`: equal parts of each one's test split, plus
    (with `instruction`) an equal part of instruction following under the held-out instruction pool, in that order
    (`capability_group` tells the parts apart)."""
    if len(set(capabilities)) != len(capabilities):
        raise ValueError(f"capabilities {list(capabilities)} name one more than once; each would be scored twice")
    groups = [*capabilities, *(["instruction_unseen"] if "instruction" in capabilities else [])]
    rows = []
    for index, group in enumerate(groups):
        count = num_problems // len(groups) + (index < num_problems % len(groups))
        capability, pool = ("instruction", "heldout") if group == "instruction_unseen" else (group, "train")
        problems = capability_problems(
            capability, "test", count, seed=seed, levels=levels, languages=languages, instructions=pool
        )
        rows.extend(problems.to_list())
    return Dataset.from_list(rows) if rows else _empty()


def capability_group(row: dict) -> str:
    """The row's capability, or `instruction_unseen` for a row under a held-out-pool system instruction."""
    heldout = {si.id for si in SYSTEM_INSTRUCTIONS["heldout"]}
    return "instruction_unseen" if row.get("system_instruction") in heldout else row.get("capability") or "math"


def with_system_instruction(row: dict, instruction: SystemInstruction | None) -> dict:
    """A new row: `instruction` as the system message (replacing one already there), `constraint` and
    `system_instruction` set, and the reference `completion` rewritten to satisfy the constraint (for SFT). None
    removes the system message and the constraint. Rewrites that drop words (word limit, banned word) are not
    undone by a later instruction; translations and wrappers are."""
    prompt = [dict(message) for message in row["prompt"] if message["role"] != "system"]
    if instruction is not None:
        prompt = [{"role": "system", "content": instruction.text}, *prompt]
    constraint = instruction.constraint if instruction is not None else None
    new = {
        **row,
        "prompt": prompt,
        "constraint": json.dumps(constraint, sort_keys=True) if constraint else "",
        "system_instruction": instruction.id if instruction is not None else "",
    }
    if row.get("completion"):  # RL rows come without one
        completion = [dict(message) for message in row["completion"]]
        reply = completion[-1]["content"]
        if row.get("language") in LANGUAGE_PHRASES:  # undo an earlier instruction's translation
            reply = _translate(reply, row["language"])
        completion[-1]["content"] = satisfy(reply, constraint)
        new["completion"] = completion
    return new


# ---------------------------------------------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------------------------------------------


def _boxed_correct(text: str, answer: str) -> bool:
    # The last boxed answer decides: an integer equal to an integer answer, or the name, case aside. Stricter than
    # math-verify, which falls back to the last number in the text when the box does not parse ("7 + 8 = 15.
    # \\boxed{Anna}" would count for 15).
    boxed = extract_boxed(text)
    if boxed is None:
        return False
    boxed, answer = boxed.strip().rstrip(".").strip(), answer.strip()
    if re.fullmatch(r"-?[0-9]+", answer):
        return re.fullmatch(r"[-+]?[0-9]+", boxed) is not None and canonical_integer(boxed) == canonical_integer(
            answer
        )
    return boxed.casefold() == answer.casefold()


def capability_score(completion_text: str, row: dict) -> float:
    """1.0 when `completion_text` answers `row` right for its capability AND satisfies the row's constraint (if
    any), else 0.0. `row` needs `answer` and `capability`; `constraint` (JSON or "") is optional.

    math: math-verify, as `accuracy_reward` and the `synthetic` task grade; reasoning and instruction: the last
    `\\boxed{}` holds the answer (an equal integer, or the name case aside); coding: the last `\\boxed{}` holds a
    program that `eval.expr_lang` runs to the reference program's values on every test input."""
    if not isinstance(completion_text, str):
        return 0.0
    capability, answer = row.get("capability") or "math", str(row["answer"])
    raw = row.get("constraint") or ""
    constraint = json.loads(raw) if isinstance(raw, str) and raw else (raw or None)
    if constraint and not constraint_holds(completion_text, constraint):
        return 0.0
    if capability == "math":
        return float(math_answer_correct(completion_text, answer))
    if capability in ("reasoning", "instruction"):
        return float(_boxed_correct(completion_text, answer))
    if capability == "coding":
        program = extract_boxed(completion_text)
        return float(program is not None and program_correct(program, answer))
    raise ValueError(f"unknown capability {capability!r}; the capabilities are {list(CAPABILITIES)}")
