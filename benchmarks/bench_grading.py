"""How well answer extraction grades known-correct outputs: ours (eval.grading) against lighteval's and lm-eval's.

    python benchmarks/bench_grading.py                                   # ../shared/data, ours (+ the others if installed)
    python benchmarks/bench_grading.py --external_python /tmp/lighteval/bin/python --external_python /tmp/lm-eval/bin/python

Inputs, over the full data:
- MATH-500: each of the 500 reference solutions, given as the model output, against the `answer` field. A perfect
  grader scores 100%; every miss is a correct solution graded wrong. Second column: the same solutions with the
  box removed and a last line "The final answer is X." without LaTeX delimiters.
- MGSM: each of the 250 gold answers in each of the 11 languages, written after the (number-laden) question as
  that language's usual final-answer sentence (MGSM's own exemplar phrasing, e.g. "Die Antwort lautet 2.125.",
  "答案是 2,125。", "La réponse est 2 125.") with the language's thousands separator; plus variants ("Antwort:
  2.125", Indian grouping and Bengali digits, `\\boxed{}`) in the "all formats" column.

lighteval and lm-eval are optional (not project dependencies) and pin other versions of math-verify's parser, so
they are best installed in separate environments (`python -m venv --system-site-packages DIR` then `DIR/bin/pip
install lighteval`, another with `lm-eval "antlr4-python3-runtime==4.11"`) and reached with --external_python;
each missing one prints "not installed".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# The repository root, so that `eval` imports without installing the project.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
# Graders: name -> (math(prediction, row) -> bool, mgsm(prediction, gold, language) -> bool)
# ---------------------------------------------------------------------------------------------------------------


def ours() -> tuple[Callable, Callable]:
    from eval.grading import extract_number, math_answer_correct, numbers_equal

    return (
        lambda pred, row: math_answer_correct(pred, row["answer"]),
        lambda pred, gold, lang: numbers_equal(extract_number(pred, lang), gold),
    )


def lighteval_extractive() -> tuple[Callable, Callable]:
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

    return math, mgsm


def _lm_eval_mgsm(filter_name: str) -> Callable:
    import re

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


def lm_eval_strict() -> tuple[Callable, Callable]:
    # minerva_math500's math_verify score: verify(parse(solution), parse(output)); mgsm_native_cot strict-match.
    from lm_eval.tasks.minerva_math.utils import process_results

    return (
        lambda pred, row: process_results(row, [pred])["math_verify"] == 1,
        _lm_eval_mgsm("strict-match"),
    )


def lm_eval_flexible() -> tuple[Callable, Callable]:
    # minerva_math500's exact_match ("Final Answer: The final answer is X. I hope it is correct." then string
    # normalisation); mgsm_native_cot flexible-extract (the last number-like token).
    from lm_eval.tasks.minerva_math.utils import process_results

    return (
        lambda pred, row: process_results(row, [pred])["exact_match"] == 1,
        _lm_eval_mgsm("flexible-extract"),
    )


def lm_eval_hendrycks() -> tuple[Callable, Callable]:
    # hendrycks_math500: the text between the first and last `$`, string-normalised, against the solution's box.
    from lm_eval.tasks.hendrycks_math.utils import process_results

    return (lambda pred, row: process_results(row, [pred])["exact_match"] == 1, None)


GRADERS = {
    "ours (eval.grading)": ours,
    "lighteval 0.13 extractive match": lighteval_extractive,
    "lm-eval minerva_math500 math_verify / mgsm strict-match": lm_eval_strict,
    "lm-eval minerva_math500 exact_match / mgsm flexible-extract": lm_eval_flexible,
    "lm-eval hendrycks_math500": lm_eval_hendrycks,
}
EXTERNAL = [name for name in GRADERS if not name.startswith("ours")]


def run_grader(name: str, math_rows: list[dict], mgsm: dict, quiet: bool) -> dict:
    try:
        math_fn, mgsm_fn = GRADERS[name]()
    except ImportError as error:
        return {"error": f"not installed ({error.name})"}
    start = time.perf_counter()
    result: dict = {"math_misses": []}
    for key, make in (
        ("math", lambda r: r["solution"]),
        ("math_unboxed", lambda r: unboxed(r["solution"], r["answer"])),
    ):
        correct = 0
        for row in math_rows:
            try:
                ok = bool(math_fn(make(row), row))  # numpy bools from lm-eval are not JSON
            except Exception:
                ok = False
            correct += ok
            if not ok and key == "math":
                result["math_misses"].append(row["unique_id"])
        result[key] = [correct, len(math_rows)]
    if mgsm_fn is not None:
        result["mgsm_native"], result["mgsm_all"] = {}, {}
        for lang, rows in mgsm.items():
            native, total_all, ok_all = 0, 0, 0
            for question, gold in rows:
                for fmt, text in mgsm_formats(lang, question, gold).items():
                    try:
                        ok = bool(mgsm_fn(text, gold, lang))
                    except Exception:
                        ok = False
                    native += ok and fmt == "native"
                    ok_all += ok
                    total_all += 1
            result["mgsm_native"][lang] = [native, len(rows)]
            result["mgsm_all"][lang] = [ok_all, total_all]
    result["seconds"] = round(time.perf_counter() - start, 1)
    if not quiet:
        print(f"  {name}: {result['seconds']} s", file=sys.stderr)
    return result


def pct(pair: list[int]) -> str:
    return f"{100 * pair[0] / pair[1]:.1f}%" if pair[1] else "-"


def print_tables(results: dict[str, dict]) -> None:
    print("\n| grader | MATH-500 reference solutions graded correct | same, box removed, \"The final answer is X.\" | "
          "MGSM gold, native format (11 x 250) | MGSM gold, all formats |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | {r['error']} | | | |")
            continue
        if "mgsm_native" in r:
            native = [sum(v[0] for v in r["mgsm_native"].values()), sum(v[1] for v in r["mgsm_native"].values())]
            every = [sum(v[0] for v in r["mgsm_all"].values()), sum(v[1] for v in r["mgsm_all"].values())]
            mgsm_cells = f"{pct(native)} | {pct(every)}"
        else:
            mgsm_cells = "- | -"
        math_cells = f"{pct(r['math'])} ({r['math'][0]}/{r['math'][1]}) | {pct(r['math_unboxed'])}"
        print(f"| {name} | {math_cells} | {mgsm_cells} |")
    with_mgsm = {name: r for name, r in results.items() if "mgsm_native" in r}
    if with_mgsm:
        print("\nMGSM gold answers in the language's usual answer sentence, graded correct (native / all formats):\n")
        print("| language | " + " | ".join(with_mgsm) + " |")
        print("|---|" + "---|" * len(with_mgsm))
        for lang in LANGUAGES:
            cells = [f"{pct(r['mgsm_native'][lang])} / {pct(r['mgsm_all'][lang])}" for r in with_mgsm.values()]
            print(f"| {lang} | " + " | ".join(cells) + " |")
    for name, r in results.items():
        if r.get("math_misses"):
            shown = ", ".join(r["math_misses"][:8]) + (" ..." if len(r["math_misses"]) > 8 else "")
            print(f"\n{name}: MATH-500 misses: {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument(
        "--external_python",
        action="append",
        default=[],
        help="interpreter of an environment with lighteval and/or lm-eval (repeatable: they pin different parsers)",
    )
    parser.add_argument("--only", choices=["ours", "external", "all"], default="all")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON (no tables)")
    args = parser.parse_args()
    if not (args.data_dir / "math500" / "test.jsonl").exists():
        raise SystemExit(f"{args.data_dir} has no math500/test.jsonl: pass --data_dir (see ../shared/data)")
    math_rows, mgsm = load_data(args.data_dir)

    names = (
        list(GRADERS) if args.only == "all" else [n for n in GRADERS if (n in EXTERNAL) == (args.only == "external")]
    )
    if args.external_python:
        names = [n for n in names if n not in EXTERNAL]
    results = {name: run_grader(name, math_rows, mgsm, args.json) for name in names}
    for python in args.external_python if args.only != "ours" else []:
        command = [python, __file__, "--only", "external", "--json", "--data_dir", str(args.data_dir)]
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
