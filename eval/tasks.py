"""Benchmark definitions. A task is data: where its rows come from, how a row becomes a chat prompt (zero-shot
chain of thought; BBH also with its standard 3-shot prompts), and how an output is graded. The runner
(`eval/runner.py`) is generic over tasks.

Sources: the Hugging Face Hub by default, or `--data_dir` with offline copies in the original formats:

    DATA_DIR/math500/test.jsonl               MATH-500 (problem, answer, unique_id, subject, level)
    DATA_DIR/gpqa/gpqa_diamond.csv            GPQA Diamond as in the GPQA repo's dataset.zip ...
    DATA_DIR/gpqa/dataset.zip                 ... or that zip itself (password-protected; --gpqa_password)
    DATA_DIR/mgsm/mgsm_<lang>.tsv             MGSM: question<TAB>answer, no header, one file per language
    DATA_DIR/global_mmlu/<lang>.{parquet,jsonl,csv}   Global-MMLU test split (question, option_a..option_d,
                                              answer), or OpenAI MMMLU's columns (Question, A..D, Answer)
    DATA_DIR/bbh/<task>.json                  BIG-Bench Hard as in its repository: {"examples": [{"input",
                                              "target"}, ...]}, one file per task (Hub: lukaemon/bbh)
    DATA_DIR/bbh/cot-prompts/<task>.txt       BBH's 3-shot CoT prompts (the repository's cot-prompts/), which
                                              the `bbh` task needs and this package does not include; a clone
                                              of the repository as DATA_DIR (cot-prompts/ at its top) works too

Adding a benchmark is one `Task(...)` passed to `register_task` (plus a metric module in eval/metrics/ when it
needs a new grader); the runner, the cache, results.json/.md and the plot pick it up from the registry.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import warnings
import zipfile
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

from .grading import (
    BBH_TASKS,
    MGSM_LANGUAGES,
    bbh_gold_key,
    boxed_word_correct,
    boxed_word_key,
    extract_bbh_answer,
    extract_boxed,
    extract_choice_letter,
    extract_number,
    math_answer_correct,
    math_answer_key,
    numbers_equal,
)

__all__ = [
    "TASKS",
    "DataSource",
    "DataUnavailableError",
    "Example",
    "Task",
    "chat_examples",
    "get_task",
    "read_bbh_cot_prompt",
    "read_bbh_json",
    "register_task",
]

# Published in the GPQA repository's README (github.com/idavidrein/gpqa); the zip is encrypted only to keep the
# questions out of web crawls, not as access control.
GPQA_ZIP_PASSWORD = "deserted-untie-orchid"
# Global-MMLU languages that MGSM also covers (Global-MMLU has no Thai); --languages picks any of its 42.
GLOBAL_MMLU_DEFAULT_LANGUAGES = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "zh")


class DataUnavailableError(RuntimeError):
    """A dataset could not be read; the message names the source tried and how to provide the data instead."""


@dataclass(frozen=True)
class DataSource:
    data_dir: Path | None = None
    gpqa_password: str = GPQA_ZIP_PASSWORD
    languages: tuple[str, ...] | None = None  # MGSM / Global-MMLU languages; None: the task's default set
    seed: int = 0  # GPQA choice shuffling
    # BBH's cot-prompts/ folder; None: DATA_DIR/bbh/cot-prompts or DATA_DIR/cot-prompts. Set it to take the 3-shot
    # prompts from a folder while the data comes from the Hub (no data_dir).
    bbh_prompt_dir: Path | None = None


@dataclass
class Example:
    id: str
    messages: list[dict]
    gold: str
    subset: str | None = None  # reported separately (language, subject)
    meta: dict = field(default_factory=dict)  # saved with the outputs (e.g. GPQA's choice permutation)
    # PIL images, one per {"type": "image"} entry of `messages` (image tasks; generated, so not saved or cached).
    images: list | None = None


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[[DataSource], list[Example]]
    # output, example -> (correct, answer key for maj@k)
    grade: Callable[[str, Example], tuple[bool, Hashable | None]]
    metric: str  # the evaluate module in eval/metrics/ that scores the same way
    max_new_tokens: int = 2048
    limit_per_subset: bool = False  # --limit counts per language rather than overall
    # GPQA's terms forbid publishing its questions: its saved outputs carry ids, letters and completions only.
    save_prompts: bool = True
    layout: str = ""  # the offline copy under --data_dir, for the command line's help
    # Also report scores averaged over subsets with equal weight (BIG-Bench Hard's headline is the task mean).
    macro_average: bool = False
    # ("image", "text"): the prompts carry images; the runner loads the multimodal model and its processor.
    modalities: tuple[str, ...] = ("text",)


# ---------------------------------------------------------------------------------------------------------------
# Hub access with errors that say what to do
# ---------------------------------------------------------------------------------------------------------------


def _hub_error(what: str, error: Exception, layout: str, extra: str = "") -> DataUnavailableError:
    return DataUnavailableError(
        f"could not load {what} from the Hugging Face Hub ({type(error).__name__}: {error}). {extra}"
        f"Without network access, pass --data_dir DIR with {layout} (see `python -m eval --help`)."
    )


def _load_hub_dataset(repo: str, config: str | None, split: str, layout: str, extra: str = ""):
    import datasets

    try:
        return datasets.load_dataset(repo, config, split=split)
    except Exception as error:  # network, gating, missing config: all end in the same advice
        raise _hub_error(f"{repo}" + (f" ({config})" if config else ""), error, layout, extra) from error


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file; a malformed line is a `DataUnavailableError` naming the file and line."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataUnavailableError(
                    f"{path}:{number}: malformed JSON ({error.msg}, column {error.colno}); a .jsonl file holds one "
                    "JSON object per line"
                ) from None
    return rows


def _require(path: Path, layout: str) -> Path:
    if not path.exists():
        raise DataUnavailableError(f"{path} not found: --data_dir must contain {layout}")
    return path


# ---------------------------------------------------------------------------------------------------------------
# MATH-500
# ---------------------------------------------------------------------------------------------------------------

MATH_PROMPT = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    '"The final answer is $\\boxed{{ANSWER}}$." where ANSWER is just the final number or expression that solves '
    "the problem.\n\n{problem}"
)


def _load_math500(source: DataSource) -> list[Example]:
    layout = "math500/test.jsonl"
    if source.data_dir is not None:
        path = _require(source.data_dir / layout, layout)
        rows = read_jsonl(path)
    else:
        rows = list(_load_hub_dataset("HuggingFaceH4/MATH-500", None, "test", layout))
    return [
        Example(
            id=row.get("unique_id") or f"math500/{i}",
            messages=[{"role": "user", "content": MATH_PROMPT.format(problem=row["problem"])}],
            gold=row["answer"],
            subset=row.get("subject"),
            meta={"level": row.get("level")},
        )
        for i, row in enumerate(rows)
    ]


def _grade_math(output: str, example: Example) -> tuple[bool, Hashable | None]:
    return math_answer_correct(output, example.gold), math_answer_key(output)


# ---------------------------------------------------------------------------------------------------------------
# GPQA Diamond
# ---------------------------------------------------------------------------------------------------------------

GPQA_PROMPT = (
    "Given the following question and four candidate answers (A, B, C and D), choose the best answer.\n\n"
    "Question: {question}\n\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n\n"
    'Think step by step, then end your response with "The best answer is X" where X is one of A, B, C or D.'
)


def _read_gpqa_rows(source: DataSource) -> list[dict]:
    layout = "gpqa/gpqa_diamond.csv or gpqa/dataset.zip (the GPQA repository's zip)"
    if source.data_dir is None:
        extra = "GPQA is gated: accept its terms at huggingface.co/datasets/Idavidrein/gpqa and log in. "
        return list(_load_hub_dataset("Idavidrein/gpqa", "gpqa_diamond", "train", layout, extra))
    csv_path, zip_path = source.data_dir / "gpqa" / "gpqa_diamond.csv", source.data_dir / "gpqa" / "dataset.zip"
    if csv_path.exists():
        text = csv_path.read_text(encoding="utf-8-sig")
    elif zip_path.exists():
        with zipfile.ZipFile(zip_path) as archive:
            names = [n for n in archive.namelist() if n.endswith("gpqa_diamond.csv")]
            if not names:
                raise DataUnavailableError(f"{zip_path} has no gpqa_diamond.csv (members: {archive.namelist()[:5]})")
            try:
                text = archive.read(names[0], pwd=source.gpqa_password.encode()).decode("utf-8-sig")
            except RuntimeError as error:  # zipfile's "Bad password for file"
                raise DataUnavailableError(
                    f"cannot decrypt {zip_path}: {error}. Pass --gpqa_password (see the GPQA repository's README)"
                ) from error
    else:
        raise DataUnavailableError(f"neither {csv_path} nor {zip_path} exists: --data_dir must contain {layout}")
    return list(csv.DictReader(io.StringIO(text)))


def gpqa_permutation(question_id: str, seed: int = 0) -> list[int]:
    """The order in which a GPQA question's options are shown: `permutation[i]` is the index, in (correct,
    incorrect 1, incorrect 2, incorrect 3), of the option shown as letter i. Seeded per question (a string seed is
    hashed with SHA-512, stable across processes), so a question's order does not depend on which others run."""
    order = [0, 1, 2, 3]
    random.Random(f"gpqa:{seed}:{question_id}").shuffle(order)
    return order


def _load_gpqa(source: DataSource) -> list[Example]:
    examples = []
    for row in _read_gpqa_rows(source):
        options = [
            row["Correct Answer"],
            row["Incorrect Answer 1"],
            row["Incorrect Answer 2"],
            row["Incorrect Answer 3"],
        ]
        question = row["Question"].strip()
        question_id = row.get("Record ID") or hashlib.sha256(question.encode()).hexdigest()[:16]
        permutation = gpqa_permutation(question_id, source.seed)
        shown = {letter: options[k].strip() for letter, k in zip("ABCD", permutation)}
        examples.append(
            Example(
                id=question_id,
                messages=[{"role": "user", "content": GPQA_PROMPT.format(question=question, **shown)}],
                gold="ABCD"[permutation.index(0)],
                subset=row.get("High-level domain"),
                meta={"permutation": permutation},
            )
        )
    return examples


def _grade_choice(output: str, example: Example) -> tuple[bool, Hashable | None]:
    letter = extract_choice_letter(output)
    return letter == example.gold, letter


# ---------------------------------------------------------------------------------------------------------------
# MGSM
# ---------------------------------------------------------------------------------------------------------------

# Zero-shot chain-of-thought instructions in each language, each asking for the final line in that language's
# answer format (which eval.grading.MGSM_ANSWER_PREFIXES recognises).
MGSM_INSTRUCTIONS = {
    "en": "Solve this math problem. Reason step by step, then give the final answer on the last line in the form "
    '"Answer: N", where N is the number only.',
    "bn": 'এই গণিত সমস্যাটি সমাধান করুন। ধাপে ধাপে চিন্তা করুন, তারপর শেষ লাইনে "উত্তর: N" আকারে চূড়ান্ত উত্তর দিন, '
    "যেখানে N শুধুমাত্র সংখ্যাটি।",
    "de": "Löse diese Mathematikaufgabe. Denke Schritt für Schritt und gib dann in der letzten Zeile die endgültige "
    'Antwort in der Form "Antwort: N" an, wobei N nur die Zahl ist.',
    "es": "Resuelve este problema de matemáticas. Razona paso a paso y luego da la respuesta final en la última "
    'línea con el formato "Respuesta: N", donde N es solo el número.',
    "fr": "Résous ce problème de mathématiques. Raisonne étape par étape, puis donne la réponse finale sur la "
    'dernière ligne sous la forme "Réponse : N", où N est uniquement le nombre.',
    "ja": "この数学の問題を解いてください。段階的に考え、最後の行に「答え：N」の形式で最終的な答えを書いてください。N は数値のみです。",
    "ru": "Реши эту математическую задачу. Рассуждай шаг за шагом, а затем дай окончательный ответ в последней строке "
    'в виде "Ответ: N", где N — только число.',
    "sw": "Tatua tatizo hili la hesabu. Fikiri hatua kwa hatua, kisha toa jibu la mwisho kwenye mstari wa mwisho kwa "
    'muundo "Jibu: N", ambapo N ni nambari pekee.',
    "te": 'ఈ గణిత సమస్యను పరిష్కరించండి. దశలవారీగా ఆలోచించి, చివరి పంక్తిలో "సమాధానం: N" రూపంలో తుది సమాధానాన్ని ఇవ్వండి, ఇక్కడ N కేవలం సంఖ్య మాత్రమే.',
    "th": 'แก้โจทย์คณิตศาสตร์นี้ ให้คิดทีละขั้นตอน แล้วเขียนคำตอบสุดท้ายในบรรทัดสุดท้ายในรูปแบบ "คำตอบ: N" โดยที่ N เป็นตัวเลขเท่านั้น',
    "zh": "解决这道数学题。请逐步推理，然后在最后一行以“答案：N”的格式给出最终答案，其中 N 只是一个数字。",
}


def _mgsm_languages(source: DataSource) -> tuple[str, ...]:
    languages = source.languages or MGSM_LANGUAGES
    unknown = sorted(set(languages) - set(MGSM_LANGUAGES))
    if unknown:
        raise ValueError(f"MGSM has no language {unknown}; it has {', '.join(MGSM_LANGUAGES)}")
    return tuple(languages)


def read_mgsm_tsv(text: str, name: str = "MGSM TSV") -> list[tuple[str, str]]:
    """(question, answer) rows of an MGSM TSV. Split on the tab by hand: questions contain quotes, which csv would
    take for field quoting. A row without exactly two columns is a `DataUnavailableError` naming `name` and line."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            columns = line.rstrip("\r").split("\t")
            if len(columns) != 2:
                raise DataUnavailableError(
                    f"{name}:{number}: {len(columns)} tab-separated columns, expected 2 (question<TAB>answer)"
                )
            rows.append((columns[0].strip(), columns[1].strip()))
    return rows


def _mgsm_text(source: DataSource, language: str) -> str:
    name = f"mgsm_{language}.tsv"
    if source.data_dir is not None:
        return _require(source.data_dir / "mgsm" / name, "mgsm/mgsm_<lang>.tsv").read_text(encoding="utf-8")
    from huggingface_hub import hf_hub_download

    try:
        # juletxara/mgsm is a script dataset, which datasets >= 4 refuses; its TSVs are plain files.
        return Path(hf_hub_download("juletxara/mgsm", name, repo_type="dataset")).read_text(encoding="utf-8")
    except Exception as error:
        raise _hub_error(f"juletxara/mgsm/{name}", error, "mgsm/mgsm_<lang>.tsv") from error


def _load_mgsm(source: DataSource) -> list[Example]:
    examples = []
    for language in _mgsm_languages(source):
        where = source.data_dir / "mgsm" if source.data_dir is not None else "juletxara/mgsm"
        rows = read_mgsm_tsv(_mgsm_text(source, language), f"{where}/mgsm_{language}.tsv")
        for i, (question, answer) in enumerate(rows):
            examples.append(
                Example(
                    id=f"{language}/{i}",
                    messages=[{"role": "user", "content": f"{MGSM_INSTRUCTIONS[language]}\n\n{question}"}],
                    gold=answer,
                    subset=language,
                )
            )
    return examples


def _grade_mgsm(output: str, example: Example) -> tuple[bool, Hashable | None]:
    value = extract_number(output, example.subset)
    return numbers_equal(value, example.gold), value


# ---------------------------------------------------------------------------------------------------------------
# Global-MMLU (generation-based: the model reasons, then states a letter)
# ---------------------------------------------------------------------------------------------------------------

MMLU_PROMPT = (
    "Answer the following multiple choice question. Think step by step, then end your response with a line of the "
    'form "Answer: X" where X is one of A, B, C or D.\n\n{question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}'
)


def _read_table(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    import datasets

    return list(datasets.load_dataset("parquet", data_files=str(path), split="train"))


def _load_global_mmlu(source: DataSource) -> list[Example]:
    layout = "global_mmlu/<lang>.parquet (or .jsonl / .csv)"
    examples = []
    languages = source.languages or GLOBAL_MMLU_DEFAULT_LANGUAGES
    if source.data_dir is not None and source.languages is None:
        # Offline copies rarely hold all 42 languages: without --languages, take the ones that are there.
        languages = sorted({p.stem for p in (source.data_dir / "global_mmlu").glob("*.*")}) or languages
    for language in languages:
        if source.data_dir is not None:
            found = [source.data_dir / "global_mmlu" / f"{language}{ext}" for ext in (".parquet", ".jsonl", ".csv")]
            found = [p for p in found if p.exists()]
            if not found:
                raise DataUnavailableError(f"no global_mmlu/{language}.* in {source.data_dir}: expected {layout}")
            rows = _read_table(found[0])
        else:
            rows = list(_load_hub_dataset("CohereLabs/Global-MMLU", language, "test", layout))
        for i, row in enumerate(rows):
            if "option_a" in row:  # Global-MMLU
                options = [row[f"option_{c}"] for c in "abcd"]
                question, answer, row_id = row["question"], row["answer"], row.get("sample_id") or i
            else:  # OpenAI MMMLU
                options = [row[c] for c in "ABCD"]
                question, answer, row_id = row["Question"], row["Answer"], i
            shown = {letter: str(option).strip() for letter, option in zip("ABCD", options)}
            content = MMLU_PROMPT.format(question=question.strip(), **shown)
            examples.append(
                Example(
                    id=f"{language}/{row_id}",
                    messages=[{"role": "user", "content": content}],
                    gold=str(answer).strip().upper(),
                    subset=language,
                )
            )
    return examples


# ---------------------------------------------------------------------------------------------------------------
# The bundled synthetic task (eval/synthetic.py): the recipes' held-out evaluation
# ---------------------------------------------------------------------------------------------------------------

# Enough for any held-out size the recipes use; the first N of them are `arithmetic_problems("test", N)`, so
# `--limit 200` is the recipes' default held-out set.
SYNTHETIC_TEST_PROBLEMS = 1000


def chat_examples(rows, name: str = "synthetic") -> list[Example]:
    """Examples from rows in the recipes' format: `prompt` (chat messages) and `answer`, with `language` (reported
    as the subset) and `level` when present. The synthetic task's rows, or a recipe's `--dataset_name` test split."""
    return [
        Example(
            id=f"{name}/{i}",
            messages=list(row["prompt"]),
            gold=str(row["answer"]),
            subset=row.get("language"),
            meta={"level": row["level"]} if row.get("level") is not None else {},
        )
        for i, row in enumerate(rows)
    ]


def _load_synthetic(source: DataSource) -> list[Example]:
    from .synthetic import LANGUAGES, arithmetic_problems

    problems = arithmetic_problems("test", SYNTHETIC_TEST_PROBLEMS, languages=source.languages or LANGUAGES)
    return chat_examples(problems)


# ---------------------------------------------------------------------------------------------------------------
# BIG-Bench Hard
# ---------------------------------------------------------------------------------------------------------------

BBH_REPOSITORY = "github.com/suzgunmirac/BIG-Bench-Hard"
BBH_PROMPT_LAYOUT = "bbh/cot-prompts/<task>.txt"
_BBH_LAYOUT = "bbh/<task>.json (the BBH repository's files)"
# Zero-shot without the repository's prompt files: our own neutral task line (the family hint below says what
# form the answer takes).
BBH_ZEROSHOT_DESCRIPTION = "Answer the following question."
_BBH_BINARY_HINT = {
    "boolean_expressions": "True or False",
    "formal_fallacies": "valid or invalid",
    "sports_understanding": "yes or no",
}
_BBH_HINT = {
    "choice": "the letter of the correct option in parentheses, such as (A)",
    "numeric": "the number only",
    "dyck": "the closing brackets that complete the sequence, separated by spaces",
    "words": "the sorted words separated by spaces",
}


def bbh_prompt_folders(source: DataSource) -> list[Path]:
    """Where the BBH prompt files are looked for, in order: `source.bbh_prompt_dir` alone when set, else
    DATA_DIR/bbh/cot-prompts then DATA_DIR/cot-prompts (the repository's own layout); none without a data_dir."""
    if source.bbh_prompt_dir is not None:
        return [source.bbh_prompt_dir]
    if source.data_dir is None:
        return []
    return [source.data_dir / "bbh" / "cot-prompts", source.data_dir / "cot-prompts"]


def bbh_prompt_path(source: DataSource, task: str) -> Path | None:
    """The task's prompt file in the first of `bbh_prompt_folders` that has it, or None."""
    return next((p for p in (f / f"{task}.txt" for f in bbh_prompt_folders(source)) if p.is_file()), None)


def _missing_prompt_error(source: DataSource, task: str) -> DataUnavailableError:
    fix = (
        f"The standard 3-shot prompts are BBH's cot-prompts/<task>.txt, which this package does not include: clone "
        f"{BBH_REPOSITORY} and pass --data_dir DIR with DIR/{BBH_PROMPT_LAYOUT} (or the clone itself as --data_dir, "
        "it has bbh/<task>.json and cot-prompts/), or use --tasks bbh_zeroshot, which needs no prompt files."
    )
    folders = bbh_prompt_folders(source)
    if not folders:
        return DataUnavailableError(f"bbh: no prompt folder, since no --data_dir was given. {fix}")
    looked = " nor ".join(str(folder / f"{task}.txt") for folder in folders)
    return DataUnavailableError(
        f"bbh: neither {looked} exists. {fix}" if len(folders) > 1 else f"bbh: {looked} not found. {fix}"
    )


def read_bbh_cot_prompt(path: Path, shots: int = 3) -> tuple[str, list[tuple[str, str]]]:
    """(task description, [(question, chain-of-thought answer), ...]) of a prompt file in the BBH repository's
    format: a canary line, `-----`, the description, then blank-line-separated `Q: ...` / `A: ...` exemplars. Fewer
    than `shots` exemplars is a `DataUnavailableError` naming the file."""
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    text = text.split("-----\n", 1)[-1].strip()  # drop the canary line
    description, *blocks = re.split(r"\n\n(?=Q: )", text)
    exemplars = []
    for block in blocks:
        question, found, answer = block.removeprefix("Q: ").partition("\nA: ")
        if found:
            exemplars.append((question.strip(), answer.strip()))
    if len(exemplars) < shots:
        raise DataUnavailableError(
            f'{path}: {len(exemplars)} exemplars, expected {shots} (blocks of "Q: question" then "A: answer", '
            f"separated by blank lines, as in {BBH_REPOSITORY}'s cot-prompts/)"
        )
    return description.strip(), exemplars


def bbh_messages(task: str, question: str, prompt: tuple[str, list[tuple[str, str]]] | None, shots: int) -> list[dict]:
    """The chat prompt: `shots` exemplars of `prompt` (from `read_bbh_cot_prompt`) as earlier user/assistant turns
    (each answer ends "So the answer is X."), or zero-shot, the task description (the prompt's, or without a prompt
    our neutral one) and an instruction to end the same way."""
    if shots == 0:
        description = prompt[0] if prompt is not None else BBH_ZEROSHOT_DESCRIPTION
        family = BBH_TASKS[task]
        hint = _BBH_BINARY_HINT.get(task, "Yes or No") if family == "binary" else _BBH_HINT[family]
        instruction = f'Think step by step, then end your response with "So the answer is X." where X is {hint}.'
        return [{"role": "user", "content": f"{description}\n\nQ: {question}\n\n{instruction}"}]
    if prompt is None:
        raise ValueError(f"{task}: a {shots}-shot prompt needs the task's prompt file")
    description, exemplars = prompt
    messages = []
    for i, (shot_question, answer) in enumerate(exemplars[:shots]):
        prefix = f"{description}\n\n" if i == 0 else ""
        messages += [
            {"role": "user", "content": f"{prefix}Q: {shot_question}"},
            {"role": "assistant", "content": answer},
        ]
    return messages + [{"role": "user", "content": f"Q: {question}"}]


def read_bbh_json(path: Path) -> list[dict]:
    """The examples of a BBH task file in the repository's format, `{"examples": [{"input", "target"}, ...]}`.
    A malformed file raises DataUnavailableError naming the file and line."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataUnavailableError(
            f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg}); BBH files hold "
            '{"examples": [{"input": ..., "target": ...}, ...]}'
        ) from error
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise DataUnavailableError(f'{path}:1: expected an object with an "examples" list, as in the BBH repository')
    # Where each example starts, to point at the bad one.
    starts = [m.start() for m in re.finditer(r'(?<!\\)"input"\s*:', text)]
    for i, example in enumerate(data["examples"]):
        ok = isinstance(example, dict) and all(isinstance(example.get(k), str) for k in ("input", "target"))
        if not ok:
            line = text.count("\n", 0, starts[i]) + 1 if i < len(starts) else 1
            raise DataUnavailableError(
                f'{path}:{line}: example {i} needs string "input" and "target" fields, got {str(example)[:80]!r}'
            )
    return data["examples"]


def _bbh_present_tasks(source: DataSource) -> list[str]:
    """The tasks to run: all 27 from the Hub, or those with a file under DATA_DIR/bbh (warning about the rest)."""
    if source.data_dir is None:
        return list(BBH_TASKS)
    folder = source.data_dir / "bbh"
    present = [task for task in BBH_TASKS if (folder / f"{task}.json").exists()]
    if not present:
        raise DataUnavailableError(f"no BBH task files in {folder}: --data_dir must contain {_BBH_LAYOUT}")
    missing = [task for task in BBH_TASKS if task not in present]
    if missing:
        warnings.warn(
            f"{folder} has {len(present)} of the 27 BBH tasks (missing: {', '.join(missing)}); "
            "the macro average covers the present ones",
            stacklevel=3,
        )
    return present


def _bbh_task_rows(source: DataSource, task: str) -> list[dict]:
    if source.data_dir is None:
        return list(_load_hub_dataset("lukaemon/bbh", task, "test", _BBH_LAYOUT))
    return read_bbh_json(source.data_dir / "bbh" / f"{task}.json")


def _bbh_loader(shots: int) -> Callable[[DataSource], list[Example]]:
    def load(source: DataSource) -> list[Example]:
        tasks = _bbh_present_tasks(source)
        # Every prompt file is read (or found missing) before any data is, so a missing one fails in seconds,
        # not after 27 downloads.
        prompts = {}
        for task in tasks:
            path = bbh_prompt_path(source, task)
            if path is not None:
                prompts[task] = read_bbh_cot_prompt(path, shots)
            elif shots:
                raise _missing_prompt_error(source, task)
        return [
            Example(
                id=f"{task}/{i}",
                messages=bbh_messages(task, row["input"], prompts.get(task), shots),
                gold=row["target"],
                subset=task,
                meta={"input": row["input"]},
            )
            for task in tasks
            for i, row in enumerate(_bbh_task_rows(source, task))
        ]

    return load


def _grade_bbh(output: str, example: Example) -> tuple[bool, Hashable | None]:
    answer = extract_bbh_answer(output, example.subset, example.meta.get("input"))
    return answer is not None and answer == bbh_gold_key(example.gold, example.subset), answer


# ---------------------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------------------

TASKS: dict[str, Task] = {}
# One --help entry for both BBH tasks.
_BBH_HELP_LAYOUT = f"bbh/<task>.json (+ {BBH_PROMPT_LAYOUT}, the 3-shot prompts of {BBH_REPOSITORY}, for bbh)"


def register_task(task: Task) -> Task:
    """Add a benchmark to the registry (what `--tasks` and `get_task` choose from)."""
    if task.name in TASKS:
        raise ValueError(f"a task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


for _task in (
    Task(
        "math500", _load_math500, _grade_math, metric="math_accuracy", max_new_tokens=4096, layout="math500/test.jsonl"
    ),
    Task(
        "gpqa_diamond",
        _load_gpqa,
        _grade_choice,
        metric="gpqa_accuracy",
        max_new_tokens=4096,
        save_prompts=False,
        layout="gpqa/gpqa_diamond.csv or gpqa/dataset.zip",
    ),
    Task(
        "mgsm",
        _load_mgsm,
        _grade_mgsm,
        metric="mgsm_accuracy",
        max_new_tokens=1024,
        limit_per_subset=True,
        layout="mgsm/mgsm_<lang>.tsv",
    ),
    Task(
        "global_mmlu",
        _load_global_mmlu,
        _grade_choice,
        metric="gpqa_accuracy",
        max_new_tokens=2048,
        limit_per_subset=True,
        layout="global_mmlu/<lang>.parquet|.jsonl|.csv",
    ),
    Task("synthetic", _load_synthetic, _grade_math, metric="math_accuracy", max_new_tokens=256),
    # BBH's standard setting is 3-shot chain of thought (prompts from the user's copy; see bbh_prompt_folders).
    *(
        Task(
            name,
            _bbh_loader(shots),
            _grade_bbh,
            metric="bbh_accuracy",
            max_new_tokens=1024,
            limit_per_subset=True,
            layout=_BBH_HELP_LAYOUT,
            macro_average=True,
        )  # fmt: skip
        for name, shots in (("bbh", 3), ("bbh_zeroshot", 0))
    ),
):
    register_task(_task)


# Long-context retrieval, generated (eval/long_context.py): a needle, and two facts far apart, at 512-32768 tokens.
from .long_context import grade_needle, load_needle_examples  # noqa: E402

for _kind, _name in (("single", "needle"), ("multihop", "needle_multihop")):
    register_task(Task(
        _name, lambda source, kind=_kind: load_needle_examples(source, kind), grade_needle, metric="mgsm_accuracy",
        max_new_tokens=16,
    ))  # fmt: skip


# Generated capabilities (eval/capabilities.py), each one's held-out split; `capability_instruction_unseen` is
# instruction following under the held-out pool of system instructions (the same questions as
# `capability_instruction`, so the two pair up). The module is imported when a task runs: it needs `datasets`,
# which takes seconds to import.
CAPABILITY_NAMES = ("math", "reasoning", "instruction", "coding")  # eval.capabilities.CAPABILITIES
CAPABILITY_TEST_PROBLEMS = 100  # per language


def _load_capability(source: DataSource, capability: str, pool: str = "train") -> list[Example]:
    from .capabilities import capability_problems
    from .synthetic import LANGUAGES

    name = f"capability_{capability}" + ("_unseen" if pool == "heldout" else "")
    # --languages is shared by all tasks of a run: the ones these tasks have (en, de, fr, es) apply.
    languages = [language for language in source.languages or LANGUAGES if language in LANGUAGES]
    if not languages:
        raise DataUnavailableError(f"{name} has the languages {list(LANGUAGES)}, none of {list(source.languages)}")
    count = CAPABILITY_TEST_PROBLEMS * len(languages)
    rows = capability_problems(capability, "test", count, languages=languages, instructions=pool)
    keys = ("level", "capability", "constraint", "system_instruction")
    return [
        Example(f"{name}/{i}", list(row["prompt"]), row["answer"], row["language"], {k: row[k] for k in keys})
        for i, row in enumerate(rows)
    ]


def _grade_capability(output: str, example: Example) -> tuple[bool, Hashable | None]:
    from .capabilities import capability_score

    return bool(capability_score(output, {**example.meta, "answer": example.gold})), extract_boxed(output)


for _capability, _pool in [*((c, "train") for c in CAPABILITY_NAMES), ("instruction", "heldout")]:
    register_task(Task(
        f"capability_{_capability}" + ("_unseen" if _pool == "heldout" else ""),
        lambda source, capability=_capability, pool=_pool: _load_capability(source, capability, pool),
        _grade_capability, metric="capability_accuracy", max_new_tokens=64,
    ))  # fmt: skip


# The generated visual task (eval/visual.py): scored per images count, the subsets 1, 2-4 and 5-8 images.
VISUAL_TEST_PROBLEMS = 600


def _load_visual(source: DataSource) -> list[Example]:
    from .visual import visual_problems

    # The first N are the recipes' held-out set of N (`eval.visual.visual_problems("test", N)`): `--limit N`.
    rows = visual_problems("test", VISUAL_TEST_PROBLEMS)
    return [
        Example(
            id=f"visual/{i}",
            messages=list(row["prompt"]),
            gold=row["answer"],
            subset=row["images_bucket"],
            meta={"kind": row["kind"]},
            images=list(row["images"]),
        )
        for i, row in enumerate(rows)
    ]


def _grade_visual(output: str, example: Example) -> tuple[bool, Hashable | None]:
    return boxed_word_correct(output, example.gold), boxed_word_key(output)


register_task(
    Task(
        "visual",
        _load_visual,
        _grade_visual,
        metric="visual_accuracy",
        max_new_tokens=32,
        modalities=("image", "text"),
    )
)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]
