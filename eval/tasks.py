"""Benchmark definitions. A task is data: where its rows come from, how a row becomes a zero-shot chain-of-thought
chat prompt, and how an output is graded. The runner (`eval/runner.py`) is generic over tasks.

Sources: the Hugging Face Hub by default, or `--data_dir` with offline copies in the original formats:

    DATA_DIR/math500/test.jsonl               MATH-500 (problem, answer, unique_id, subject, level)
    DATA_DIR/gpqa/gpqa_diamond.csv            GPQA Diamond as in the GPQA repo's dataset.zip ...
    DATA_DIR/gpqa/dataset.zip                 ... or that zip itself (password-protected; --gpqa_password)
    DATA_DIR/mgsm/mgsm_<lang>.tsv             MGSM: question<TAB>answer, no header, one file per language
    DATA_DIR/global_mmlu/<lang>.{parquet,jsonl,csv}   Global-MMLU test split (question, option_a..option_d,
                                              answer), or OpenAI MMMLU's columns (Question, A..D, Answer)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import zipfile
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

from .grading import (
    MGSM_LANGUAGES,
    extract_choice_letter,
    extract_number,
    math_answer_correct,
    math_answer_key,
    numbers_equal,
)

__all__ = ["TASKS", "DataSource", "DataUnavailableError", "Example", "Task", "get_task"]

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


@dataclass
class Example:
    id: str
    messages: list[dict]
    gold: str
    subset: str | None = None  # reported separately (language, subject)
    meta: dict = field(default_factory=dict)  # saved with the outputs (e.g. GPQA's choice permutation)


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
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
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


def read_mgsm_tsv(text: str) -> list[tuple[str, str]]:
    """(question, answer) rows of an MGSM TSV. Split on the tab by hand: questions contain quotes, which csv would
    take for field quoting."""
    rows = []
    for line in text.splitlines():
        if line.strip():
            question, _, answer = line.rstrip("\r").rpartition("\t")
            rows.append((question.strip(), answer.strip()))
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
        for i, (question, answer) in enumerate(read_mgsm_tsv(_mgsm_text(source, language))):
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
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
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


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("math500", _load_math500, _grade_math, metric="math_accuracy", max_new_tokens=4096),
        Task(
            "gpqa_diamond", _load_gpqa, _grade_choice, metric="gpqa_accuracy", max_new_tokens=4096, save_prompts=False
        ),
        Task("mgsm", _load_mgsm, _grade_mgsm, metric="mgsm_accuracy", max_new_tokens=1024, limit_per_subset=True),
        Task(
            "global_mmlu",
            _load_global_mmlu,
            _grade_choice,
            metric="gpqa_accuracy",
            max_new_tokens=2048,
            limit_per_subset=True,
        ),
    )
}


# Long-context retrieval, generated (eval/long_context.py): a needle, and two facts far apart, at 512-32768 tokens.
from .long_context import grade_needle, load_needle_examples  # noqa: E402

for _kind, _name in (("single", "needle"), ("multihop", "needle_multihop")):
    TASKS[_name] = Task(
        _name, lambda source, kind=_kind: load_needle_examples(source, kind), grade_needle, metric="mgsm_accuracy",
        max_new_tokens=16,
    )  # fmt: skip


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]
