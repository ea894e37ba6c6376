"""How well answer extraction grades known-correct outputs: ours (eval.grading) against lighteval's and lm-eval's.

    python benchmarks/bench_grading.py --data_dir DIR                    # ours (+ the others if installed)
    python benchmarks/bench_grading.py --bbh_only                        # the synthetic BBH items: no data needed
    python benchmarks/bench_grading.py --external_python /tmp/lighteval/bin/python --external_python /tmp/lm-eval/bin/python

Inputs, over the full data:
- MATH-500: each of the 500 reference solutions, given as the model output, against the `answer` field. A perfect
  grader scores 100%; every miss is a correct solution graded wrong. Second column: the same solutions with the
  box removed and a last line "The final answer is X." without LaTeX delimiters.
- MGSM: each of the 250 gold answers in each of the 11 languages, written after the (number-laden) question as
  that language's usual final-answer sentence (MGSM's own exemplar phrasing, e.g. "Die Antwort lautet 2.125.",
  "答案是 2,125。", "La réponse est 2 125.") with the language's thousands separator; plus variants ("Antwort:
  2.125", Indian grouping and Bengali digits, `\\boxed{}`) in the "all formats" column.

- Near misses, the other side: for every item a WRONG output that must be graded wrong (a grader that always says
  "correct" scores 100% recall and 0% here). MATH-500: the reference solution with its boxed answer replaced by
  another problem's (a different answer); MGSM: the native sentence with another question's gold number (a
  different value) in the language's format.
- BIG-Bench Hard: synthetic items in BBH's format (no BBH data ships here), 20 per task x 27 tasks, answered
  with a chain of thought that mentions other options and numbers, then in BBH's exemplar form ("So the answer
  is (B).") and other correct forms ("B", "(B) <option text>", "**Answer:** (B)", "false" for "False",
  "-1,234", `\\boxed{}`, "}])" for "} ] )", comma-separated sorted words); the near miss states a different
  answer the same way (another letter, the other verdict, another number, two brackets or words swapped).

lighteval and lm-eval are optional (not project dependencies) and pin other versions of math-verify's parser, so
they are best installed in separate environments (`python -m venv --system-site-packages DIR` then `DIR/bin/pip
install lighteval`, another with `lm-eval "antlr4-python3-runtime==4.11"`) and reached with --external_python;
each missing one prints "not installed".
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# The repository root, so that `eval` imports without installing the project.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_types import executable  # noqa: E402

LANGUAGES = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")
# MGSM's exemplar answer sentences (the phrasing lm-eval's native-CoT prompts ask for).
NATIVE_SENTENCE = {
    "en": "The answer is {n}.",
    "bn": "উত্তর হল {n}।",
    "de": "Die Antwort lautet {n}.",
    "es": "La respuesta es {n}.",
    "fr": "La réponse est {n}.",
    "ja": "答えは{n}です。",
    "ru": "Ответ — {n}.",
    "sw": "Jibu ni {n}.",
    "te": "సమాధానం {n}.",
    "th": "คำตอบคือ {n}",
    "zh": "答案是 {n}。",
}
# simple-evals' "<Answer>: N" last line (what eval/tasks.py's prompts ask for).
COLON_SENTENCE = {
    "en": "Answer: {n}",
    "bn": "উত্তর: {n}",
    "de": "Antwort: {n}",
    "es": "Respuesta: {n}",
    "fr": "Réponse : {n}",
    "ja": "答え：{n}",
    "ru": "Ответ: {n}",
    "sw": "Jibu: {n}",
    "te": "సమాధానం: {n}",
    "th": "คำตอบ: {n}",
    "zh": "答案：{n}",
}
# Thousands separator per language, as the MGSM questions themselves write them (80,000 / 80.000 / 80 000).
SEPARATOR = {"de": ".", "es": " ", "fr": " ", "ru": " "}


def group(value: int, separator: str, indian: bool = False) -> str:
    digits = str(value)
    if indian and len(digits) > 3:  # 1,14,200: the last three digits, then pairs
        head, tail = digits[:-3], digits[-3:]
        pairs = [head[max(0, i - 2) : i] for i in range(len(head), 0, -2)][::-1]
        return separator.join(pairs + [tail])
    return f"{value:,}".replace(",", separator)


def mgsm_formats(language: str, question: str, gold: int) -> dict[str, str]:
    """Known-correct outputs: the question (standing in for reasoning full of other numbers), then the answer."""
    sep = SEPARATOR.get(language, ",")
    n = group(gold, sep)
    formats = {
        "native": NATIVE_SENTENCE[language].format(n=n),
        "colon": COLON_SENTENCE[language].format(n=n),
        "plain digits": NATIVE_SENTENCE[language].format(n=str(gold)),
        "boxed": "The final answer is $\\boxed{" + n.replace(" ", "\\,") + "}$.",
    }
    if language in ("fr", "ru"):
        formats["no-break space"] = NATIVE_SENTENCE[language].format(n=group(gold, "\u202f"))
    if language in ("bn", "te"):
        formats["indian grouping"] = NATIVE_SENTENCE[language].format(n=group(gold, ",", indian=True))
    if language == "bn":
        native_digits = str.maketrans("0123456789", "০১২৩৪৫৬৭৮৯")
        formats["bengali digits"] = NATIVE_SENTENCE[language].format(n=n.translate(native_digits))
    return {name: f"{question}\n\n{text}" for name, text in formats.items()}


def unboxed(solution: str, answer: str) -> str:
    """A MATH solution with its last `\\boxed{X}` replaced by X and a last line "The final answer is X." (no LaTeX
    delimiters): the harder case of an output that states its answer without the box the prompt asked for."""
    start = solution.rfind("\\boxed{")
    if start < 0:
        return f"{solution}\n\nThe final answer is {answer}."
    depth, i = 0, start
    for i in range(start + len("\\boxed"), len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[i], 0)
        if depth == 0:
            break
    inner = solution[start + len("\\boxed{") : i]
    return f"{solution[:start]}{inner}{solution[i + 1 :]}\n\nThe final answer is {answer}."


def replace_boxed(solution: str, answer: str) -> str:
    """A MATH solution with the content of its last `\\boxed{}` replaced by `answer` (a near miss)."""
    start = solution.rfind("\\boxed{")
    if start < 0:
        return f"{solution}\n\nThe final answer is $\\boxed{{{answer}}}$."
    depth, i = 0, start
    for i in range(start + len("\\boxed"), len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[i], 0)
        if depth == 0:
            break
    head = solution[: start + len("\\boxed{")]
    return f"{head}{answer}{solution[i:]}"


def _answer_form(answer: str) -> str:
    # "x=5" is the same answer as "5": drop a leading variable assignment.
    form = re.sub(r"^\s*[a-zA-Z]\s*=\s*", "", answer)
    for old in ("\\left", "\\right", "\\dfrac", "\\tfrac", "\\!", "\\,", " ", "$", "^\\circ", "^{\\circ}"):
        form = form.replace(old, "\\frac" if old in ("\\dfrac", "\\tfrac") else "")
    try:
        return repr(float(form.replace(",", "")))
    except ValueError:
        return form


def other_answers(math_rows: list[dict]) -> list[str]:
    """For each problem, the answer of the next problem whose answer differs from it (as written and as a value),
    so that the near miss is a different answer, not an equivalent form."""
    forms = [_answer_form(row["answer"]) for row in math_rows]
    others = []
    for i, form in enumerate(forms):
        j = next(j for j in range(i + 1, i + len(forms)) if forms[j % len(forms)] != form)
        others.append(math_rows[j % len(forms)]["answer"])
    return others


# ---------------------------------------------------------------------------------------------------------------
# Synthetic BIG-Bench Hard items (BBH's formats, not its questions)
# ---------------------------------------------------------------------------------------------------------------

WORDS = (
    "anchor basil cobalt dune ember fjord glacier harbor iris juniper kestrel lagoon meadow nectar orchid pebble "
    "quartz raven saffron thistle umber velvet willow xenon yarrow zephyr o'hare it&t"
).split()
BINARY_WORDS = {
    "boolean_expressions": ("True", "False"),
    "causal_judgement": ("Yes", "No"),
    "formal_fallacies": ("valid", "invalid"),
    "navigate": ("Yes", "No"),
    "sports_understanding": ("yes", "no"),
    "web_of_lies": ("Yes", "No"),
}
PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}


def _swap_two(items: list[str], rng) -> list[str]:
    swapped = list(items)
    candidates = [i for i in range(len(items) - 1) if items[i] != items[i + 1]]
    i = rng.choice(candidates)
    swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    return swapped


def bbh_items(per_task: int = 20, seed: int = 0) -> list[dict]:
    """`per_task` synthetic items per BBH task: {task, family, input, target, outputs: {format: text}, near_miss}.
    Each output is a chain of thought mentioning other options/numbers, then the answer."""
    import random

    from eval.grading import BBH_TASKS

    rng = random.Random(seed)
    items = []
    for task, family in BBH_TASKS.items():
        for n in range(per_task):
            if family == "choice":
                texts = rng.sample(WORDS[:-2], rng.randint(3, 7))
                options = [f"the {word} box" for word in texts]
                gold, other = rng.sample(range(len(options)), 2)
                letter, wrong = "ABCDEFG"[gold], "ABCDEFG"[other]
                lines = "\n".join(f"({'ABCDEFG'[i]}) {option}" for i, option in enumerate(options))
                question = f"Item {n}: which box does Alice hold at the end?\nOptions:\n{lines}"
                target = f"({letter})"
                chain = (f"Let's think step by step.\nOption ({wrong}) {options[other]} cannot be it: Bob took it in "
                         f"step 2. After step 3, Alice holds {options[gold]}.\n")  # fmt: skip
                outputs = {
                    "exemplar": f"So the answer is ({letter}).",
                    "bare letter": f"So the answer is {letter}.",
                    "letter and text": f"So the answer is ({letter}) {options[gold]}.",
                    "markdown": f"**Answer:** ({letter})",
                    "boxed": f"The final answer is $\\boxed{{{letter}}}$.",
                }
                near = f"So the answer is ({wrong})."
            elif family == "binary":
                yes, no = BINARY_WORDS[task]
                target, wrong = (yes, no) if rng.random() < 0.5 else (no, yes)
                question = f"Item {n}: does the statement hold?"
                chain = f"Let's think step by step.\nIf the first part were {wrong}, the whole would be {wrong}; it is not.\n"
                other_case = target.lower() if target[0].isupper() else target.capitalize()
                outputs = {
                    "exemplar": f"So the answer is {target}.",
                    "other case": f"So the answer is {other_case}.",
                    "markdown": f"**Answer:** {target}",
                }
                near = f"So the answer is {wrong}."
            elif family == "numeric":
                value = rng.randint(-20000, 20000) if task == "multistep_arithmetic_two" else rng.randint(2, 20)
                wrong = value + rng.choice([-1, 1]) * rng.randint(1, 9)
                target = str(value)
                question = f"Item {n}: ((3 + {n}) * 7 - 12) = ?"
                chain = f"Let's think step by step.\n3 + {n} = {3 + n}; {3 + n} * 7 = {7 * (3 + n)}; and 12 more.\n"
                outputs = {
                    "exemplar": f"So the answer is {value}.",
                    "grouped": f"So the answer is {value:,}.",
                    "boxed": f"So the answer is $\\boxed{{{value}}}$.",
                }
                near = f"So the answer is {wrong}."
            elif family == "dyck":
                opened = [rng.choice(list(PAIRS)) for _ in range(rng.randint(3, 6))]
                while len(set(opened)) < 2:
                    opened.append(rng.choice(list(PAIRS)))
                closing = [PAIRS[ch] for ch in reversed(opened)]
                question = ("Complete the rest of the sequence, making sure that the parentheses are closed properly. "
                            f"Input: {' '.join(opened)}")  # fmt: skip
                target = " ".join(closing)
                chain = "Let's think step by step.\n" + "".join(
                    f"{i}: {ch} ; stack: {' '.join(opened[: i + 1])}\n" for i, ch in enumerate(opened)
                )
                outputs = {
                    "exemplar": f"So the answer is {target}.",
                    "no spaces": f"So the answer is {''.join(closing)}.",
                }
                near = f"So the answer is {' '.join(_swap_two(closing, rng))}."
            else:
                words = rng.sample(WORDS, rng.randint(3, 8))
                ordered = sorted(words)
                question = f"Sort the following words alphabetically: List: {' '.join(words)}"
                target = " ".join(ordered)
                chain = f"Let's think step by step.\nThe first letters are: {', '.join(w[0] for w in words)}.\n"
                outputs = {
                    "exemplar": f"So the answer is {target}.",
                    "commas": f"So the answer is {', '.join(ordered)}.",
                }
                near = f"So the answer is {' '.join(_swap_two(ordered, rng))}."
            items.append(
                {
                    "task": task,
                    "family": family,
                    "input": question,
                    "target": target,
                    "outputs": {name: chain + text for name, text in outputs.items()},
                    "near_miss": chain + near,
                }
            )
    return items


def load_data(data_dir: Path) -> tuple[list[dict], dict[str, list[tuple[str, int]]]]:
    from eval.tasks import read_mgsm_tsv

    math_rows = [json.loads(line) for line in (data_dir / "math500" / "test.jsonl").read_text().splitlines() if line]
    mgsm = {
        lang: [
            (q, int(a.replace(",", "")))
            for q, a in read_mgsm_tsv((data_dir / "mgsm" / f"mgsm_{lang}.tsv").read_text())
        ]
        for lang in LANGUAGES
    }
    return math_rows, mgsm


# ---------------------------------------------------------------------------------------------------------------
# Graders: name -> (math(prediction, row) -> bool, mgsm(prediction, gold, language) -> bool,
#                   bbh(prediction, item) -> bool); None where the grader has no such scorer
# ---------------------------------------------------------------------------------------------------------------


def ours() -> tuple[Callable, Callable, Callable]:
    from eval.grading import bbh_answer_correct, extract_number, math_answer_correct, numbers_equal

    return (
        lambda pred, row: math_answer_correct(pred, row["answer"]),
        lambda pred, gold, lang: numbers_equal(extract_number(pred, lang), gold),
        lambda pred, item: bbh_answer_correct(pred, item["target"], item["task"], item["input"]),
    )


def lighteval_extractive() -> tuple[Callable, Callable, Callable]:
    # lighteval's math_500 metric (pass_at_k_math's scorer) and the same extractive matcher, in each language,
    # for MGSM (lighteval's own MGSM tasks use exact match on the whole output, which no CoT output passes).
    from lighteval.metrics.dynamic_metrics import MultilingualExtractiveMatchMetric
    from lighteval.metrics.utils.extractive_match_utils import ExprExtractionConfig, LatexExtractionConfig
    from lighteval.models.model_output import ModelResponse
    from lighteval.tasks.requests import Doc
    from lighteval.utils.language import Language

    targets = [ExprExtractionConfig(), LatexExtractionConfig()]
    math_metric = MultilingualExtractiveMatchMetric(
        language=Language.ENGLISH, gold_extraction_target=targets, pred_extraction_target=targets, precision=6
    )
    codes = {"bn": "ben", "de": "deu", "en": "eng", "es": "spa", "fr": "fra", "ja": "jpn", "ru": "rus", "sw": "swa",
             "te": "tel", "th": "tha", "zh": "zho"}  # fmt: skip
    mgsm_metrics = {
        lang: MultilingualExtractiveMatchMetric(
            language=Language(code),
            gold_extraction_target=[ExprExtractionConfig()],
            # Not LatexExtractionConfig: lighteval 0.13 lacks its translation literals for most MGSM languages
            # (AttributeError: "Translation for 'and_word' is needed for Language.GERMAN").
            pred_extraction_target=[ExprExtractionConfig()],
        )
        for lang, code in codes.items()
    }

    def math(pred, row):
        doc = Doc(query="", choices=[f"${row['answer']}$"], gold_index=0)
        return math_metric.compute(doc, ModelResponse(text=[pred])) == 1

    def mgsm(pred, gold, lang):
        doc = Doc(query="", choices=[str(gold)], gold_index=0)
        return mgsm_metrics[lang].compute(doc, ModelResponse(text=[pred])) == 1

    # BBH: lighteval's bigbench_hard tasks are log-likelihood multiple choice, with no generative scorer. The
    # nearest it offers: its extractive matcher for option letters and numbers, and for the other families its
    # normalised (helm) exact match of the output's end (type_exact_match="suffix"; a full match fails any CoT).
    from lighteval.metrics.metrics_sample import ExactMatches
    from lighteval.metrics.normalizations import helm_normalizer
    from lighteval.metrics.utils.extractive_match_utils import IndicesExtractionConfig

    from eval.grading import BBH_TASKS

    letters = MultilingualExtractiveMatchMetric(
        language=Language.ENGLISH,
        gold_extraction_target=[IndicesExtractionConfig(prefix_for_extraction="NativeLetters")],
        pred_extraction_target=[IndicesExtractionConfig(prefix_for_extraction="NativeLetters")],
    )
    numbers = MultilingualExtractiveMatchMetric(
        language=Language.ENGLISH, gold_extraction_target=[ExprExtractionConfig()],
        pred_extraction_target=[ExprExtractionConfig()],
    )  # fmt: skip
    suffix = ExactMatches(normalize_gold=helm_normalizer, normalize_pred=helm_normalizer, type_exact_match="suffix")

    def bbh(pred, item):
        family = BBH_TASKS[item["task"]]
        if family == "choice":
            # Its index extractor reads letters up to the number of choices, as in lighteval's GPQA task.
            shown = re.findall(r"^\(([A-Z])\)", item["input"], flags=re.MULTILINE)
            doc = Doc(query="", choices=shown, gold_index=shown.index(item["target"].strip("()")))
            return letters.compute(doc, ModelResponse(text=[pred])) == 1
        if family == "numeric":
            doc = Doc(query="", choices=[item["target"]], gold_index=0)
            return numbers.compute(doc, ModelResponse(text=[pred])) == 1
        return suffix.compute_one_item(gold=item["target"], pred=pred) == 1

    return math, mgsm, bbh


def _lm_eval_mgsm(filter_name: str) -> Callable:

    import lm_eval
    import yaml
    from lm_eval.api.metrics import exact_match_hf_evaluate

    task_dir = Path(lm_eval.__file__).parent / "tasks" / "mgsm" / "native_cot"
    filters = {}
    for lang in LANGUAGES:
        config = yaml.safe_load((task_dir / f"mgsm_native_cot_{lang}.yaml").read_text())
        steps = next(f["filter"] for f in config["filter_list"] if f["name"] == filter_name)
        regex = next(s for s in steps if s["function"] == "regex")
        filters[lang] = (re.compile(regex["regex_pattern"]), regex.get("group_select", 0))

    def mgsm(pred, gold, lang):
        # lm-eval's RegexFilter: findall, take match `group_select`, first non-empty group of a tuple match.
        pattern, select = filters[lang]
        matches = pattern.findall(pred)
        if not matches:
            answer = "[invalid]"
        else:
            match = matches[select]
            answer = next((m for m in match if m), "") if isinstance(match, tuple) else match
        score = exact_match_hf_evaluate([answer.strip()], [str(gold)], ignore_case=True, ignore_punctuation=True)
        return score["exact_match"] == 1.0

    return mgsm


def _lm_eval_bbh(variant: str, filter_name: str) -> Callable:
    # lm-eval's own BBH configs (bbh/<variant>/<task>.yaml): their filter pipeline (its filter classes, the
    # `!function utils.X` ones from the task folder) and their exact_match settings.
    import importlib.util

    import lm_eval
    import yaml
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.filters.selection import TakeFirstFilter

    from eval.grading import BBH_TASKS

    folder = Path(lm_eval.__file__).parent / "tasks" / "bbh" / variant
    spec = importlib.util.spec_from_file_location(f"lm_eval_bbh_{variant}_utils", folder / "utils.py")
    utils = None
    if spec is not None and (folder / "utils.py").exists():
        utils = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(utils)

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor(
        "!function", lambda loader, node: getattr(utils, loader.construct_scalar(node).split(".")[-1])
    )
    template = yaml.load(next(folder.glob("_*template_yaml")).read_text(), Loader=Loader)
    metric = {
        k: v for k, v in template["metric_list"][0].items() if k not in ("metric", "aggregation", "higher_is_better")
    }
    pipelines = {}
    for task in BBH_TASKS:
        config = {**template, **yaml.load((folder / f"{task}.yaml").read_text(), Loader=Loader)}
        steps = next(f["filter"] for f in config["filter_list"] if f["name"] == filter_name)
        pipeline = []
        for step in steps:
            kwargs = {k: v for k, v in step.items() if k != "function"}
            function = step["function"]
            if function == "regex":
                pipeline.append(RegexFilter(**kwargs))
            elif function == "take_first":
                pipeline.append(TakeFirstFilter())
            else:
                pipeline.append(function(**kwargs))
        pipelines[task] = pipeline

    def bbh(pred, item):
        doc = {"input": item["input"], "target": item["target"]}
        responses = [[pred]]
        for step in pipelines[item["task"]]:
            responses = list(step.apply(responses, [doc]))
        answer = responses[0] if isinstance(responses[0], str) else responses[0][0]
        return exact_match_hf_evaluate([answer], [item["target"]], **metric)["exact_match"] == 1.0

    return bbh


def lm_eval_strict() -> tuple[Callable, Callable, Callable]:
    # minerva_math500's math_verify score: verify(parse(solution), parse(output)); mgsm_native_cot strict-match;
    # bbh_cot_fewshot (the standard 3-shot CoT): "the answer is (.*)." and exact match.
    from lm_eval.tasks.minerva_math.utils import process_results

    return (
        lambda pred, row: process_results(row, [pred])["math_verify"] == 1,
        _lm_eval_mgsm("strict-match"),
        _lm_eval_bbh("cot_fewshot", "get-answer"),
    )


def lm_eval_flexible() -> tuple[Callable, Callable, Callable]:
    # minerva_math500's exact_match ("Final Answer: The final answer is X. I hope it is correct." then string
    # normalisation); mgsm_native_cot flexible-extract (the last number-like token); bbh_cot_zeroshot
    # flexible-extract (per-task filters: the last "(X)", last True/False, last number, ...).
    from lm_eval.tasks.minerva_math.utils import process_results

    return (
        lambda pred, row: process_results(row, [pred])["exact_match"] == 1,
        _lm_eval_mgsm("flexible-extract"),
        _lm_eval_bbh("cot_zeroshot", "flexible-extract"),
    )


def lm_eval_hendrycks() -> tuple[Callable, Callable, Callable]:
    # hendrycks_math500: the text between the first and last `$`, string-normalised, against the solution's box.
    from lm_eval.tasks.hendrycks_math.utils import process_results

    return (lambda pred, row: process_results(row, [pred])["exact_match"] == 1, None, None)


GRADERS = {
    "ours (eval.grading)": ours,
    "lighteval 0.13 extractive match": lighteval_extractive,
    "lm-eval minerva_math500 math_verify / mgsm strict-match / bbh_cot_fewshot": lm_eval_strict,
    "lm-eval minerva_math500 exact_match / mgsm / bbh_cot_zeroshot flexible-extract": lm_eval_flexible,
    "lm-eval hendrycks_math500": lm_eval_hendrycks,
}
EXTERNAL = [name for name in GRADERS if not name.startswith("ours")]


def _safe(fn, *args) -> bool:
    try:
        return bool(fn(*args))  # numpy bools from lm-eval are not JSON
    except Exception:
        return False


def run_grader(name: str, math_rows: list[dict], mgsm: dict, quiet: bool) -> dict:
    try:
        math_fn, mgsm_fn, bbh_fn = GRADERS[name]()
    except ImportError as error:
        return {"error": f"not installed ({error.name})"}
    start = time.perf_counter()
    result: dict = {"math_misses": []}
    if math_rows:
        others = other_answers(math_rows)
        for key, make in (
            ("math", lambda i, r: r["solution"]),
            ("math_unboxed", lambda i, r: unboxed(r["solution"], r["answer"])),
        ):
            correct = 0
            for i, row in enumerate(math_rows):
                ok = _safe(math_fn, make(i, row), row)
                correct += ok
                if not ok and key == "math":
                    result["math_misses"].append(row["unique_id"])
            result[key] = [correct, len(math_rows)]
        rejected = sum(not _safe(math_fn, replace_boxed(r["solution"], o), r) for r, o in zip(math_rows, others))
        result["math_near_miss"] = [rejected, len(math_rows)]
    if mgsm_fn is not None and mgsm:
        result["mgsm_native"], result["mgsm_all"], result["mgsm_near_miss"] = {}, {}, {}
        for lang, rows in mgsm.items():
            native, total_all, ok_all, rejected = 0, 0, 0, 0
            for i, (question, gold) in enumerate(rows):
                for fmt, text in mgsm_formats(lang, question, gold).items():
                    ok = _safe(mgsm_fn, text, gold, lang)
                    native += ok and fmt == "native"
                    ok_all += ok
                    total_all += 1
                # Another question's (different) gold number, in this language's native sentence and format.
                wrong = next((g for _, g in rows[i + 1 :] + rows[:i] if g != gold), gold + 1)
                rejected += not _safe(mgsm_fn, mgsm_formats(lang, question, wrong)["native"], gold, lang)
            result["mgsm_native"][lang] = [native, len(rows)]
            result["mgsm_all"][lang] = [ok_all, total_all]
            result["mgsm_near_miss"][lang] = [rejected, len(rows)]
    if bbh_fn is not None:
        by_family: dict = {}
        for item in bbh_items():
            cell = by_family.setdefault(item["family"], {"exemplar": [0, 0], "all": [0, 0], "near_miss": [0, 0]})
            for fmt, text in item["outputs"].items():
                ok = _safe(bbh_fn, text, item)
                cell["all"][0] += ok
                cell["all"][1] += 1
                if fmt == "exemplar":
                    cell["exemplar"][0] += ok
                    cell["exemplar"][1] += 1
            cell["near_miss"][0] += not _safe(bbh_fn, item["near_miss"], item)
            cell["near_miss"][1] += 1
        result["bbh"] = by_family
    result["seconds"] = round(time.perf_counter() - start, 1)
    if not quiet:
        print(f"  {name}: {result['seconds']} s", file=sys.stderr)
    return result


def pct(pair: list[int]) -> str:
    return f"{100 * pair[0] / pair[1]:.1f}%" if pair[1] else "-"


def _total(cells) -> list[int]:
    cells = list(cells)
    return [sum(v[0] for v in cells), sum(v[1] for v in cells)]


def print_tables(results: dict[str, dict]) -> None:
    print("\n| grader | MATH-500 reference solutions graded correct | same, box removed, \"The final answer is X.\" | "
          "MATH-500 near misses graded wrong | MGSM gold, native format (11 x 250) | MGSM gold, all formats | "
          "MGSM near misses graded wrong |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | {r['error']} | | | | | |")
            continue
        if "math" in r:
            math_cells = f"{pct(r['math'])} ({r['math'][0]}/{r['math'][1]}) | {pct(r['math_unboxed'])} | "
            math_cells += pct(r["math_near_miss"])
        else:
            math_cells = "- | - | -"
        if "mgsm_native" in r:
            native, every = _total(r["mgsm_native"].values()), _total(r["mgsm_all"].values())
            mgsm_cells = f"{pct(native)} | {pct(every)} | {pct(_total(r['mgsm_near_miss'].values()))}"
        else:
            mgsm_cells = "- | - | -"
        print(f"| {name} | {math_cells} | {mgsm_cells} |")
    with_mgsm = {name: r for name, r in results.items() if "mgsm_native" in r}
    if with_mgsm:
        print("\nMGSM gold answers in the language's usual answer sentence, graded correct (native / all formats), "
              "and near misses graded wrong:\n")  # fmt: skip
        print("| language | " + " | ".join(with_mgsm) + " |")
        print("|---|" + "---|" * len(with_mgsm))
        for lang in LANGUAGES:
            cells = [
                f"{pct(r['mgsm_native'][lang])} / {pct(r['mgsm_all'][lang])}; {pct(r['mgsm_near_miss'][lang])}"
                for r in with_mgsm.values()
            ]
            print(f"| {lang} | " + " | ".join(cells) + " |")
    with_bbh = {name: r for name, r in results.items() if "bbh" in r}
    if with_bbh:
        print("\nBIG-Bench Hard, synthetic items in its format (20 per task x 27 tasks): known-correct outputs graded "
              "correct (BBH's exemplar form / all correct forms) and near misses graded wrong:\n")  # fmt: skip
        families = list(next(iter(with_bbh.values()))["bbh"])
        print("| grader | all tasks: exemplar form | all forms | near misses graded wrong | "
              + " | ".join(f"{family} (exemplar / all; near miss)" for family in families) + " |")  # fmt: skip
        print("|---|---|---|---|" + "---|" * len(families))
        for name, r in with_bbh.items():
            cells = r["bbh"]
            overall = [pct(_total(c[key] for c in cells.values())) for key in ("exemplar", "all", "near_miss")]
            per_family = [f"{pct(c['exemplar'])} / {pct(c['all'])}; {pct(c['near_miss'])}" for c in cells.values()]
            print(f"| {name} | " + " | ".join(overall + per_family) + " |")
    for name, r in results.items():
        if r.get("math_misses"):
            shown = ", ".join(r["math_misses"][:8]) + (" ..." if len(r["math_misses"]) > 8 else "")
            print(f"\n{name}: MATH-500 misses: {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data_dir",
        type=Path,
        help="DIR/math500/test.jsonl (MATH-500 as on the Hub) and DIR/mgsm/mgsm_<lang>.tsv (MGSM's files)",
    )
    parser.add_argument(
        "--external_python",
        action="append",
        default=[],
        type=executable,
        help="interpreter of an environment with lighteval and/or lm-eval (repeatable: they pin different parsers)",
    )
    parser.add_argument("--only", choices=["ours", "external", "all"], default="all")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON (no tables)")
    parser.add_argument("--bbh_only", action="store_true", help="only the synthetic BBH items (needs no data)")
    args = parser.parse_args()
    if args.bbh_only:
        math_rows, mgsm = [], {}
    elif args.data_dir is None or not (args.data_dir / "math500" / "test.jsonl").exists():
        parser.error(
            f"--data_dir {args.data_dir} has no math500/test.jsonl: pass --data_dir DIR holding math500/test.jsonl and "
            "mgsm/mgsm_<lang>.tsv, or --bbh_only"
        )
    else:
        math_rows, mgsm = load_data(args.data_dir)

    names = (
        list(GRADERS) if args.only == "all" else [n for n in GRADERS if (n in EXTERNAL) == (args.only == "external")]
    )
    if args.external_python:
        names = [n for n in names if n not in EXTERNAL]
    results = {name: run_grader(name, math_rows, mgsm, args.json) for name in names}
    for python in args.external_python if args.only != "ours" else []:
        command = [python, __file__, "--only", "external", "--json", "--data_dir", str(args.data_dir)]
        command += ["--bbh_only"] if args.bbh_only else []
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        # The last line: the graders themselves print to stdout (lm-eval's is_equiv: "WARNING: Both None").
        for name, result in json.loads(output.strip().splitlines()[-1]).items():
            if "error" not in result or name not in results:
                results[name] = result
    if args.json:
        print(json.dumps(results))
    else:
        print_tables(results)


if __name__ == "__main__":
    main()
