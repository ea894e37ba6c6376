"""The capability families (eval/capabilities.py): deterministic, train and held-out disjoint, each checker right on
hand-written right and wrong answers (constraint violations included), and system-instruction pools disjoint with
rewritten reference replies that score 1.0."""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eval.capabilities import (
    CAPABILITIES,
    SYSTEM_INSTRUCTIONS,
    SystemInstruction,
    capability_problems,
    capability_score,
    constraint_holds,
    mixed_problems,
    with_system_instruction,
)
from eval.synthetic import arithmetic_problems

COLUMNS = {"prompt", "completion", "answer", "capability", "language", "level", "constraint", "system_instruction"}


def _question(row: dict) -> str:
    return row["prompt"][-1]["content"]


def _reply(row: dict) -> str:
    return row["completion"][0]["content"]


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_rows_are_deterministic_and_splits_disjoint(capability):
    train = capability_problems(capability, "train", 240)
    assert set(train.column_names) == COLUMNS
    assert train.to_list() == capability_problems(capability, "train", 240).to_list()
    assert train.to_list() != capability_problems(capability, "train", 240, seed=1).to_list()
    test = capability_problems(capability, "test", 120)
    assert capability_problems(capability, "heldout", 120).to_list() == test.to_list()
    assert not {_question(r) for r in train} & {_question(r) for r in test}
    assert len({_question(r) for r in train}) == len(train)
    assert set(train["capability"]) == {capability}
    assert set(train["level"]) == {1, 2, 3} and set(train["language"]) == {"en", "de", "fr", "es"}
    # Every reference reply is right for its own row.
    assert all(capability_score(_reply(r), r) == 1.0 for r in [*train, *test])


def _logical_key(row: dict) -> str:
    # Derived from the row's text alone, independently of the generator: what makes two problems the same
    # whatever their language, the facts' wording and order (reasoning) or the input's name (coding).
    from eval.capabilities import PEOPLE, RELATIONS
    from eval.synthetic import SOLUTION_OPENER

    language, solution = row["language"], row["completion"][-1]["content"]
    if row["capability"] == "coding":
        (name, *more) = sorted(set(re.findall(r"\b[a-z]\b", row["answer"])))
        return "coding|" + (re.sub(rf"\b{name}\b", "v", row["answer"]) if not more else row["answer"])
    people = solution[len(SOLUTION_OPENER[language]) :].strip().split(". ")[0].split(" > ")
    question = _question(row)
    (relation,) = [
        r for r, ((more, less), _) in RELATIONS[language].items() if f" {more} " in question or f" {less} " in question
    ]
    order = [PEOPLE[language].index(p) for p in people]
    return f"reasoning|{relation}|{order}|{people.index(row['answer'])}"


def test_no_logical_problem_is_in_both_splits():
    # A test problem reworded, reordered, translated or with its input renamed is still the same problem.
    keys = {}
    for split, count in (("train", 800), ("test", 200)):
        rows = [r for c in ("reasoning", "coding") for r in capability_problems(c, split, count)]
        keys[split] = {_logical_key(r) for r in rows}
        assert len(keys[split]) > count // 2
    assert not keys["train"] & keys["test"]


def test_math_rows_are_the_arithmetic_rows():
    rows = capability_problems("math", "train", 50, seed=3, levels=[1, 2], languages=["de", "en"])
    reference = arithmetic_problems("train", 50, seed=3, levels=[1, 2], languages=["de", "en"])
    assert [{k: r[k] for k in reference.column_names} for r in rows] == reference.to_list()
    assert set(rows["constraint"]) == {""} and set(rows["system_instruction"]) == {""}


def test_levels_and_languages_select_rows():
    rows = capability_problems("reasoning", "train", 30, levels=[3], languages=["fr"])
    assert set(rows["level"]) == {3} and set(rows["language"]) == {"fr"}
    with pytest.raises(ValueError, match="unknown capability"):
        capability_problems("poetry", "train", 3)
    with pytest.raises(ValueError, match="split must be"):
        capability_problems("math", "validation", 3)
    with pytest.raises(ValueError, match="languages must be among"):
        capability_problems("coding", "train", 3, languages=["xx"])
    with pytest.raises(ValueError, match="levels must be among"):
        capability_problems("coding", "train", 3, levels=[4])


# ---------------------------------------------------------------------------------------------------------------
# Checkers on hand-written answers
# ---------------------------------------------------------------------------------------------------------------


def _row(capability: str, answer: str, constraint: dict | None = None, language: str = "en") -> dict:
    return {
        "capability": capability,
        "answer": answer,
        "language": language,
        "constraint": json.dumps(constraint) if constraint else "",
    }


def test_math_checker():
    row = _row("math", "12")
    assert capability_score("We get 5 + 7 = 12. The final answer is \\boxed{12}.", row) == 1.0
    assert capability_score("The final answer is \\boxed{13}.", row) == 0.0
    assert capability_score("The final answer is 12 apples, I think", _row("math", "12")) == 1.0  # math-verify
    assert capability_score("no idea", row) == 0.0


def test_boxed_answer_decides_outside_math():
    # math-verify (the math rows' grader, as accuracy_reward) falls back to the last number when the box does not
    # parse; the other families read the box alone.
    from recipes.common import accuracy_reward

    text = "On calcule 7 + 8 = 15. La réponse est \\boxed{María}."
    assert capability_score(text, _row("math", "15")) == accuracy_reward([text], answer=["15"])[0]
    assert capability_score(text, _row("instruction", "15")) == 0.0
    assert capability_score("\\boxed{+15}.", _row("instruction", "15")) == 1.0
    assert capability_score("The answer is 15.", _row("instruction", "15")) == 0.0  # no box


def test_reasoning_checker():
    row = _row("reasoning", "Léa")
    assert capability_score("On calcule Léa > Hugo. La réponse est \\boxed{Léa}.", row) == 1.0
    assert capability_score("\\boxed{léa}", row) == 1.0  # names compare case-insensitively
    assert capability_score("La réponse est \\boxed{Hugo}.", row) == 0.0
    assert capability_score("Léa", row) == 0.0  # no boxed answer


def test_coding_checker_runs_the_program():
    row = _row("coding", "(x + 3) * 2")
    assert capability_score("The program is \\boxed{(x + 3) * 2}.", row) == 1.0
    assert capability_score("The program is \\boxed{2 * x + 6}.", row) == 1.0  # same function, other program
    assert capability_score("The program is \\boxed{x + 3 * 2}.", row) == 0.0  # precedence
    assert capability_score("The program is \\boxed{14}.", row) == 0.0  # a constant is right at one input only
    assert capability_score("The program is \\boxed{(y + 3) * 2}.", row) == 0.0  # unbound name
    assert capability_score("The program is \\boxed{__import__('os')}.", row) == 0.0  # refused, not run
    pair = _row("coding", "max(x, y) // 3")
    assert capability_score("\\boxed{max(y, x) // 3}", pair) == 1.0
    assert capability_score("\\boxed{x // 3}", pair) == 0.0


def test_instruction_checker_needs_answer_and_constraint():
    wrapper = _row("instruction", "9", {"kind": "wrapper", "open": "<ans>", "close": "</ans>"})
    assert capability_score("<ans>We get 4 + 5 = 9. The final answer is \\boxed{9}.</ans>", wrapper) == 1.0
    assert capability_score("We get 4 + 5 = 9. The final answer is \\boxed{9}.", wrapper) == 0.0  # no wrapper
    assert capability_score("<ans>The final answer is \\boxed{8}.</ans>", wrapper) == 0.0  # wrong answer
    assert capability_score("<ans><ans>\\boxed{9}</ans>", wrapper) == 0.0  # opened twice
    same = _row("instruction", "9", {"kind": "wrapper", "open": "**", "close": "**"})
    assert capability_score("**\\boxed{9}**", same) == 1.0 and capability_score("**\\boxed{9}** **", same) == 0.0

    german = _row("instruction", "Tom", {"kind": "language", "language": "de"})
    assert capability_score("Wir rechnen Tom > Anna. Die Antwort lautet \\boxed{Tom}.", german) == 1.0
    assert capability_score("We get Tom > Anna. The final answer is \\boxed{Tom}.", german) == 0.0
    assert capability_score("Wir rechnen Tom > Anna. The final answer is \\boxed{Tom}.", german) == 0.0  # mixed

    limit = _row("instruction", "9", {"kind": "word_limit", "max_words": 5})
    assert capability_score("The final answer is \\boxed{9}.", limit) == 1.0
    assert capability_score("We get 4 + 5 = 9. The final answer is \\boxed{9}.", limit) == 0.0

    banned = _row("instruction", "9", {"kind": "banned", "token": "answer"})
    assert capability_score("We get 4 + 5 = 9. \\boxed{9}.", banned) == 1.0
    assert capability_score("The final ANSWER is \\boxed{9}.", banned) == 0.0  # case-insensitive
    assert capability_score("The answers: \\boxed{9}.", banned) == 1.0  # whole words only


def test_constraints_apply_to_any_capability():
    # RL samples system instructions for every capability: the constraint is checked on top of the answer.
    coding = _row("coding", "x - 4", {"kind": "word_limit", "max_words": 4})
    assert capability_score("The program is \\boxed{x - 4}.", coding) == 1.0  # a boxed program is one word
    assert capability_score("Here it is: the program is \\boxed{x - 4}.", coding) == 0.0
    math = _row("math", "7", {"kind": "language", "language": "es"})
    assert capability_score("Calculamos 3 + 4 = 7. La respuesta es \\boxed{7}.", math) == 1.0
    assert capability_score("On calcule 3 + 4 = 7. La réponse est \\boxed{7}.", math) == 0.0


def test_unknown_constraint_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown constraint kind 'rhyme'"):
        constraint_holds("text", {"kind": "rhyme"})


# ---------------------------------------------------------------------------------------------------------------
# System instructions
# ---------------------------------------------------------------------------------------------------------------


def test_pools_are_disjoint_and_heldout_has_unseen_constraints():
    train, heldout = SYSTEM_INSTRUCTIONS["train"], SYSTEM_INSTRUCTIONS["heldout"]
    assert set(SYSTEM_INSTRUCTIONS) == {"train", "heldout"}
    ids = [si.id for si in train + heldout]
    assert len(ids) == len(set(ids))
    assert not {si.text for si in train} & {si.text for si in heldout}
    train_constraints = [si.constraint for si in train if si.constraint]
    unseen = [si.constraint for si in heldout if si.constraint and si.constraint not in train_constraints]
    assert len(unseen) >= 4
    kinds = {c["kind"] for c in train_constraints}
    assert kinds == {"language", "wrapper", "word_limit", "banned"} == {c["kind"] for c in unseen}
    # Both pools also hold instructions without a checkable constraint (persona, verbosity, format).
    assert any(si.constraint is None for si in train) and any(si.constraint is None for si in heldout)


ALL_INSTRUCTIONS = [*SYSTEM_INSTRUCTIONS["train"], *SYSTEM_INSTRUCTIONS["heldout"]]


@pytest.mark.parametrize("instruction", ALL_INSTRUCTIONS, ids=lambda si: si.id)
def test_rewritten_replies_satisfy_every_instruction(instruction):
    rows = [r for c in ("math", "reasoning", "coding") for r in capability_problems(c, "train", 24)]
    for row in rows:
        new = with_system_instruction(row, instruction)
        assert new["prompt"][0] == {"role": "system", "content": instruction.text}
        assert new["prompt"][1:] == row["prompt"]
        assert new["system_instruction"] == instruction.id
        assert json.loads(new["constraint"] or "null") == instruction.constraint
        assert capability_score(_reply(new), new) == 1.0, (instruction.id, _reply(new))
        if instruction.constraint is None:
            assert _reply(new) == _reply(row)
        else:
            # The original reply breaks the constraint or already satisfied it (then it is kept as is).
            assert constraint_holds(_reply(row), instruction.constraint) == (_reply(new) == _reply(row))


def test_replacing_and_removing_an_instruction():
    row = capability_problems("math", "train", 1, languages=["en"])[0]
    german = next(si for si in SYSTEM_INSTRUCTIONS["train"] if si.id == "lang-de")
    wrapped = next(si for si in SYSTEM_INSTRUCTIONS["train"] if si.id == "wrap-ans")
    once = with_system_instruction(row, german)
    twice = with_system_instruction(once, wrapped)
    assert [m["role"] for m in twice["prompt"]] == ["system", "user"]
    assert twice["prompt"][0]["content"] == wrapped.text
    assert _reply(twice) == f"<ans>{_reply(row)}</ans>"  # German undone, English reply wrapped
    removed = with_system_instruction(twice, None)
    assert removed["prompt"] == row["prompt"] and _reply(removed) == _reply(row)
    assert removed["constraint"] == "" and removed["system_instruction"] == ""


def test_rl_rows_without_a_completion_take_an_instruction():
    row = capability_problems("coding", "train", 1)[0]
    del row["completion"]  # online_rl drops it
    new = with_system_instruction(row, SYSTEM_INSTRUCTIONS["train"][0])
    assert "completion" not in new and new["prompt"][0]["role"] == "system" and new["constraint"] == ""
    assert with_system_instruction({"prompt": row["prompt"]}, None) == {
        "prompt": row["prompt"], "constraint": "", "system_instruction": ""
    }  # fmt: skip


def test_instruction_family_uses_the_chosen_pool():
    train_ids = {si.id for si in SYSTEM_INSTRUCTIONS["train"]}
    heldout_ids = {si.id for si in SYSTEM_INSTRUCTIONS["heldout"]}
    seen = capability_problems("instruction", "test", 60)
    unseen = capability_problems("instruction", "test", 60, instructions="heldout")
    assert set(seen["system_instruction"]) <= train_ids and set(unseen["system_instruction"]) <= heldout_ids
    assert all(r["constraint"] for r in seen) and all(r["prompt"][0]["role"] == "system" for r in seen)
    assert [_question(r) for r in seen] == [_question(r) for r in unseen]  # same questions, other instructions
    assert all(capability_score(_reply(r), r) == 1.0 for r in unseen)


# ---------------------------------------------------------------------------------------------------------------
# Mixtures
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    shares=st.dictionaries(st.sampled_from(CAPABILITIES), st.floats(0.01, 10), min_size=1),
    num_problems=st.integers(0, 40),
)
def test_mixture_counts_are_largest_remainder(shares, num_problems):
    rows = mixed_problems(shares, "train", num_problems)
    assert len(rows) == num_problems
    total = sum(shares.values())
    counts = {c: rows["capability"].count(c) for c in CAPABILITIES}
    for capability in CAPABILITIES:
        exact = shares.get(capability, 0) / total * num_problems
        assert abs(counts[capability] - exact) < 1  # floor or ceil of the exact share
    assert rows.to_list() == mixed_problems(shares, "train", num_problems).to_list()


def test_mixture_rejects_bad_shares():
    with pytest.raises(ValueError, match="unknown capabilities"):
        mixed_problems({"math": 1, "art": 1}, "train", 4)
    with pytest.raises(ValueError, match="non-negative"):
        mixed_problems({"math": -1}, "train", 4)


def test_coding_descriptions_match_their_programs():
    # An independent reading of the English descriptions (not via the evaluator) gives the programs' values.
    steps = {
        "add (\\d+) to (\\w)": lambda v, a: v + a, "subtract (\\d+) from (\\w)": lambda v, a: v - a,
        "multiply (\\w) by (\\d+)": lambda v, a: v * a, "divide (\\w) by (\\d+), rounding down": lambda v, a: v // a,
        "take the remainder of (\\w) divided by (\\d+)": lambda v, a: v % a,
        "add (\\d+)": lambda v, a: v + a, "subtract (\\d+)": lambda v, a: v - a,
        "multiply by (\\d+)": lambda v, a: v * a, "divide by (\\d+), rounding down": lambda v, a: v // a,
        "take the remainder modulo (\\d+)": lambda v, a: v % a,
    }  # fmt: skip
    pairs = {
        "take the larger of x and y": max, "take the smaller of x and y": min,
        "take the distance between x and y": lambda x, y: abs(x - y), "add x and y": lambda x, y: x + y,
        "subtract y from x": lambda x, y: x - y, "multiply x by y": lambda x, y: x * y,
    }  # fmt: skip
    from eval.expr_lang import evaluate

    rows = capability_problems("coding", "train", 90, languages=["en"])
    for row in rows:
        description = re.match(r"Write a program with input (.+?): (.+)\. Put", _question(row)).group(2)
        parts = description.split(", then ")
        for x, y in ((-7, 3), (5, 2), (13, -4)):
            if row["level"] == 3:
                value, env = pairs[parts[0]](x, y), {"x": x, "y": y}
                parts_left = parts[1:]
            else:
                value, env, parts_left = x, None, parts
            for part in parts_left:
                for pattern, apply in steps.items():
                    match = re.fullmatch(pattern, part)
                    if match:
                        numbers = [int(g) for g in match.groups() if g.isdigit()]
                        names = [g for g in match.groups() if not g.isdigit()]
                        env = env or {names[0]: x}
                        value = apply(value, numbers[0])
                        break
                else:
                    raise AssertionError(f"unread step {part!r}")
            assert evaluate(row["answer"], env) == value, (description, row["answer"])


def test_with_system_instruction_takes_a_system_instruction():
    custom = SystemInstruction("custom", "Always reply in Spanish.", {"kind": "language", "language": "es"})
    row = capability_problems("reasoning", "train", 1, languages=["en"])[0]
    new = with_system_instruction(row, custom)
    assert _reply(new).startswith("Calculamos") and "La respuesta es" in _reply(new)


# ---------------------------------------------------------------------------------------------------------------
# The eval tasks, the metric module, and the recipes' reward and data
# ---------------------------------------------------------------------------------------------------------------


def test_each_capability_is_an_eval_task():
    from eval import tasks
    from eval.tasks import DataSource, get_task

    assert tasks.CAPABILITY_NAMES == CAPABILITIES
    for name in [*(f"capability_{c}" for c in CAPABILITIES), "capability_instruction_unseen"]:
        task = get_task(name)
        examples = task.load(DataSource(languages=("es", "zh")))  # a language these tasks lack is left out
        assert len(examples) == 100 and {e.subset for e in examples} == {"es"}
        rows = capability_problems(
            name.removeprefix("capability_").removesuffix("_unseen"), "test", 100, languages=["es"],
            instructions="heldout" if name.endswith("_unseen") else "train",
        )  # fmt: skip
        assert [e.messages for e in examples] == list(rows["prompt"]) and [e.gold for e in examples] == rows["answer"]
        assert all(task.grade(_reply(row), example)[0] for row, example in zip(rows, examples))
        assert not any(task.grade("\\boxed{-1}", example)[0] for example in examples)
    with pytest.raises(tasks.DataUnavailableError, match="none of \\['zh'\\]"):
        get_task("capability_math").load(DataSource(languages=("zh",)))


def test_metric_module_scores_like_the_checker(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    import evaluate

    metrics = Path(__file__).resolve().parents[1] / "eval" / "metrics"
    for module in ("grading", "capabilities", "expr_lang", "synthetic"):
        link = metrics / "capability_accuracy" / f"{module}.py"
        assert link.is_symlink() and link.resolve() == (metrics.parent / f"{module}.py").resolve()
    monkeypatch.chdir(tmp_path)  # loads without the `eval` package importable
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", ".", str(metrics.parents[1]))])
    metric = evaluate.load(str(metrics / "capability_accuracy"))
    rows = capability_problems("instruction", "test", 6).to_list() + capability_problems("coding", "test", 6).to_list()
    outputs = [_reply(r) if i % 2 else "\\boxed{-1}" for i, r in enumerate(rows)]
    scored = metric.compute(
        predictions=outputs, references=[r["answer"] for r in rows], capabilities=[r["capability"] for r in rows],
        constraints=[r["constraint"] for r in rows],
    )  # fmt: skip
    assert (
        scored
        == {"accuracy": sum(capability_score(o, r) for o, r in zip(outputs, rows)) / len(rows)}
        == {"accuracy": 0.5}
    )
    with pytest.raises(ValueError, match="6 capabilities"):
        metric.compute(predictions=outputs, references=[r["answer"] for r in rows], capabilities=["coding"] * 6)


def test_capability_reward_is_the_checker_on_trl_columns():
    from recipes.common import REWARD_FUNCTIONS, accuracy_reward

    reward = REWARD_FUNCTIONS["capability_reward"]
    rows = [r for c in CAPABILITIES for r in capability_problems(c, "train", 4)]
    completions = [
        [{"role": "assistant", "content": _reply(r) if i % 3 else "\\boxed{-1}"}] for i, r in enumerate(rows)
    ]
    columns = {k: [r[k] for r in rows] for k in ("answer", "capability", "constraint", "language", "level")}
    scores = reward(completions, **columns, prompts=[r["prompt"] for r in rows])
    assert scores == [capability_score(c[0]["content"], r) for c, r in zip(completions, rows)]
    assert scores == [float(i % 3 != 0) for i in range(len(rows))]
    # Math rows without the capability columns (the arithmetic task) score like accuracy_reward.
    math = arithmetic_problems("train", 6)
    texts = [_reply(r) if i % 2 else "The final answer is \\boxed{-1}." for i, r in enumerate(math)]
    assert reward(texts, answer=math["answer"]) == accuracy_reward(texts, answer=math["answer"])


def test_task_datasets_with_capabilities():
    from recipes.common import TaskArguments, dataset_pass_rates, mixture_shares, task_datasets
    from recipes.validation import InputError

    args = TaskArguments(
        capabilities=["math", "coding", "instruction"], capability_shares='{"math": 2, "coding": 1, "instruction": 1}',
        train_problems=40, heldout_problems=40, levels=[1, 2],
    )  # fmt: skip
    train, test = task_datasets(args)
    assert [train["capability"].count(c) for c in ("math", "coding", "instruction")] == [20, 10, 10]
    assert set(train["level"]) == {1, 2} and train.to_list() == task_datasets(args)[0].to_list()
    groups = [r["capability"] + ("_unseen" if r["system_instruction"].startswith("h-") else "") for r in test]
    assert {g: groups.count(g) for g in groups} == {
        "math": 10,
        "coding": 10,
        "instruction": 10,
        "instruction_unseen": 10,
    }
    heldout_ids = {si.id for si in SYSTEM_INSTRUCTIONS["heldout"]}
    assert not heldout_ids & set(train["system_instruction"])
    sft_train, _ = task_datasets(args, ("completion",))  # SFT: some rows also carry a train-pool instruction
    with_system = [r for r in sft_train if r["capability"] != "instruction" and r["system_instruction"]]
    assert len(with_system) == 30 // 4 and not heldout_ids & set(sft_train["system_instruction"])
    assert all(capability_score(_reply(r), r) == 1.0 for r in sft_train)
    rates = dataset_pass_rates([[_reply(r), "\\boxed{-1}"] for r in test], test)
    assert rates == [0.5] * len(test)
    # Without --capabilities the main job's data and grading must stay the plain arithmetic task's: the same rows,
    # and the judge filter's math-verify pass rates.
    from eval.grading import math_answer_correct
    from recipes.judge import pass_rates

    plain, _ = task_datasets(TaskArguments(train_problems=8, heldout_problems=0))
    assert plain.to_list() == arithmetic_problems("train", 8).to_list()
    samples = [[_reply(r), "The final answer is \\boxed{-1}.", _reply(r)] for r in plain]
    assert dataset_pass_rates(samples, plain) == pass_rates(samples, plain["answer"], math_answer_correct)
    # A mapping that leaves a capability out gives it 0, as --mixture_shares does; no mapping: equal shares.
    assert mixture_shares(TaskArguments(capabilities=["math", "coding"], capability_shares={"math": 2})) == {
        "math": 2,
        "coding": 0.0,
    }
    assert mixture_shares(TaskArguments(capabilities=["math", "coding"])) == {"math": 1.0, "coding": 1.0}
    with pytest.raises(InputError, match="no capability \\['art'\\]"):
        mixture_shares(TaskArguments(capabilities=["math", "art"]))
    with pytest.raises(InputError, match="names \\['coding'\\], which --capabilities"):
        mixture_shares(TaskArguments(capabilities=["math"], capability_shares={"coding": 1}))
    with pytest.raises(InputError, match="non-negative numbers"):
        mixture_shares(TaskArguments(capabilities=["math"], capability_shares={"math": "a lot"}))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"capability_shares": {"math": float("nan")}}, "finite non-negative"),
        ({"capability_shares": {"math": float("inf"), "coding": 1}}, "finite non-negative"),
        ({"capabilities": ["math", "math"]}, "names \\['math'\\] more than once"),
        ({"capability_system_fraction": 2.0}, "--capability_system_fraction must be a number from 0 to 1, got 2.0"),
        ({"capability_system_fraction": float("nan")}, "--capability_system_fraction must be a number from 0 to 1"),
    ],
)
def test_bad_capability_arguments_are_refused_before_loading(overrides, message):
    from recipes.common import TaskArguments, mixture_shares, prepare_run
    from recipes.validation import InputError

    args = TaskArguments(**{"capabilities": ["math", "coding"], **overrides})
    with pytest.raises(InputError, match=message):
        mixture_shares(args)
    # prepare_run (the recipes' checks before a model is built) refuses it too, ahead of the run manifest.
    with pytest.raises(InputError, match=message):
        prepare_run(None, args, None)


def test_library_refuses_non_finite_shares_and_repeated_capabilities():
    from eval.capabilities import heldout_mixture

    for shares in ({"math": float("nan")}, {"math": 1.0, "coding": float("inf")}):
        with pytest.raises(ValueError, match="finite"):
            mixed_problems(shares, "train", 10)
    with pytest.raises(ValueError, match="more than once"):
        heldout_mixture(["math", "math"], 10)


def test_huge_boxed_integer_scores_zero_without_raising():
    huge = "9" * 5000  # int() refuses more than 4300 digits
    assert capability_score(f"\\boxed{{{huge}}}", _row("reasoning", "12")) == 0.0
    assert capability_score(f"\\boxed{{+000{huge}}}", _row("instruction", huge)) == 1.0
    assert capability_score(f"\\boxed{{{huge}}}", _row("math", "12")) == 0.0


def test_capability_reward_scores_malformed_completions_zero():
    from recipes.common import capability_reward

    bad = [None, [], [{"role": "assistant"}], [{"role": "assistant", "content": None}], 5, ["text"]]
    assert capability_reward(bad, answer=["12"] * len(bad)) == [0.0] * len(bad)
    good = [[{"role": "assistant", "content": "\\boxed{12}"}]]
    assert capability_reward(good, answer=["12"], capability=["reasoning"]) == [1.0]


def test_column_lengths_must_match():
    from recipes.common import capability_reward

    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        capability_reward(["\\boxed{1}", "\\boxed{2}"], answer=["1"])
    with pytest.raises(ValueError, match="2 capabilities"):
        capability_reward(["\\boxed{1}"], answer=["1"], capability=["math", "math"])


def test_heldout_accuracy_per_capability(monkeypatch):
    from recipes import common

    test = common.heldout_mixture(["reasoning", "instruction"], 12)
    outputs = [[_reply(r)] if i % 2 else ["\\boxed{-1}"] for i, r in enumerate(test)]
    monkeypatch.setattr(common, "generate_completions", lambda *args, **kwargs: outputs)
    result = common.heldout_accuracy(None, None, test, progress=False)
    assert result["correct"] == [i % 2 for i in range(12)] and result["accuracy"] == 0.5
    assert set(result["accuracy_by_capability"]) == {"reasoning", "instruction", "instruction_unseen"}


@pytest.mark.slow
def test_heldout_accuracy_generates_under_system_messages():
    # The real path once: the chat template renders the system messages and generation runs on them.
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer

    from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
    from recipes import common

    tiny = Path(__file__).resolve().parents[1] / "hub_configs" / "tiny"
    torch.manual_seed(0)
    model = Llama4ForCausalLM(Llama4TextConfig.from_pretrained(tiny)).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    test = common.heldout_mixture(["coding", "instruction"], 6)
    assert sum(r["prompt"][0]["role"] == "system" for r in test) == 4
    result = common.heldout_accuracy(model, tokenizer, test, max_new_tokens=3, batch_size=6, progress=False)
    assert result["num_problems"] == 6 and result["accuracy"] == 0.0  # an untrained model
    assert set(result["accuracy_by_capability"]) == {"coding", "instruction", "instruction_unseen"}


_ROWS = [r for c in ("math", "reasoning", "coding") for r in capability_problems(c, "train", 30)]


@settings(max_examples=150, deadline=None)
@given(row=st.sampled_from(_ROWS), data=st.data())
def test_any_constraint_instance_can_be_satisfied(row, data):
    # Beyond the pools: random word limits, banned words taken from the reply itself, arbitrary wrappers and target
    # languages. The rewritten reply keeps the right answer and satisfies the constraint; only a banned word inside
    # the boxed answer cannot be avoided, and that is refused.
    reply = _reply(row)
    boxed = reply[reply.index("\\boxed{") :]
    in_box = {w.casefold() for w in re.findall(r"[^\W\d]+", boxed)}
    words = sorted({w for w in re.findall(r"[^\W\d]+", reply) if w.casefold() not in in_box})
    kind = data.draw(st.sampled_from(["language", "wrapper", "word_limit", "banned"]))
    if kind == "language":
        constraint = {"kind": kind, "language": data.draw(st.sampled_from(["en", "de", "fr", "es"]))}
    elif kind == "wrapper":
        tags = data.draw(st.sampled_from([("<a>", "</a>"), ("{{", "}}"), ("##", "##"), ("```", "```")]))
        constraint = {"kind": kind, "open": tags[0], "close": tags[1]}
    elif kind == "word_limit":
        constraint = {"kind": kind, "max_words": data.draw(st.integers(1, 15))}
    else:
        constraint = {"kind": kind, "token": data.draw(st.sampled_from(words))}
    new = with_system_instruction(row, SystemInstruction("random", "(a random constraint)", constraint))
    assert constraint_holds(_reply(new), constraint) and capability_score(_reply(new), new) == 1.0, _reply(new)
    assert (_reply(new) == reply) == constraint_holds(reply, constraint)


def test_unsatisfiable_constraints_are_refused():
    # A banned word inside the boxed answer, or wrapper tags that occur in the reply itself.
    rows = capability_problems("coding", "train", 30, languages=["en"])
    row = next(r for r in rows if r["level"] == 1)
    with pytest.raises(ValueError, match="cannot rewrite .* to satisfy"):
        with_system_instruction(row, SystemInstruction("ban", "...", {"kind": "banned", "token": row["answer"][0]}))
    row = next(r for r in rows if "(" in r["answer"])
    with pytest.raises(ValueError, match="cannot rewrite .* to satisfy"):
        with_system_instruction(row, SystemInstruction("wrap", "...", {"kind": "wrapper", "open": "(", "close": ")"}))
