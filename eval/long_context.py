"""Long-context retrieval tasks, generated from a seed: a needle in a haystack, and a two-hop variant.

A document is filler sentences of lower-case words with facts ("needles") placed at controlled depths, then a
question about them at the end:

    single:    ... The code of QXT is 47. ... Question: what is the code of QXT? Answer: 47
    multi-hop: ... The code of QXT is the code of BMR. ... The code of BMR is 47. ...
               Question: what is the code of QXT? Answer: BMR 47

Keys are three upper-case letters and values two-digit numbers; the filler holds neither, so each needle occurs
exactly once. Lengths are exact in tokens of a given tokenizer (each piece is tokenized alone and the pieces are
concatenated, which for a byte-level BPE equals tokenizing the whole text; a test checks it). The depth of a
needle is its first token's offset into the filler: 0.0 right after the beginning of text, 1.0 just before the
question. Keys are split by a stable hash (about a fifth are test keys), so no fact of the test split is ever
trained on.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from .grading import extract_number, numbers_equal

__all__ = [
    "DEFAULT_DEPTHS",
    "DEFAULT_LENGTHS",
    "NeedleDocument",
    "grade_needle",
    "key_split",
    "needle_document",
    "needle_grid",
]

SPLITS = ("train", "test")
KINDS = ("single", "multihop")
# The tiny model's training length (512) up to 64x it; the registered task uses these.
DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "hub_configs" / "tiny"

# Words of the haystack: lower case, no digits, none of the needle's or question's words ("code", "of", "is").
FILLER_WORDS = (
    "the", "and", "has", "apples", "speed", "one", "man", "token", "image", "step", "per", "each", "then", "back",
    "box", "fox", "dog", "first", "few", "have", "come", "care", "check", "does", "what", "that", "its", "she",
    "such", "six", "ten", "sum", "log", "embed", "final", "experts", "kilometres", "buy", "add", "asked",
)  # fmt: skip
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
NEEDLE = " The code of {key} is {value}."
LINK = " The code of {key} is the code of {other}."
QUESTION = " Question: what is the code of {key}? Answer:"


@dataclass(frozen=True)
class NeedleDocument:
    """One retrieval problem. `input_ids` (beginning of text included) has exactly `length` tokens."""

    id: str
    kind: str  # "single" or "multihop"
    split: str
    text: str  # the document and question, without the beginning-of-text token
    input_ids: list[int]
    answer: str  # the expected completion: "47", or "BMR 47" for two hops
    value: str  # the number asked for
    length: int
    depths: tuple[float, ...]  # requested depth of each needle (multi-hop: the link, then the fact)
    needle_spans: tuple[tuple[int, int], ...]  # [start, end) of each needle in input_ids
    meta: dict = field(default_factory=dict)


def key_split(key: str) -> str:
    """'test' for about a fifth of the keys, 'train' for the rest; stable across processes and Python versions."""
    return "test" if zlib.crc32(key.encode()) % 5 == 0 else "train"


def _draw_key(rng: random.Random, split: str, avoid: set[str]) -> str:
    while True:
        key = "".join(rng.choice(LETTERS) for _ in range(3))
        if key_split(key) == split and key not in avoid:
            return key


class _Haystack:
    """Filler of an exact token count: whole sentences of 4-9 words, the last one cut to fit."""

    def __init__(self, tokenizer) -> None:
        self.words = [(w, tokenizer.encode(" " + w, add_special_tokens=False)) for w in FILLER_WORDS]
        self.single = [(w, ids) for w, ids in self.words if len(ids) == 1]
        self.period = tokenizer.encode(".", add_special_tokens=False)
        if not self.single or len(self.period) != 1:
            raise ValueError(
                "the haystack needs filler words that are one token each and '.' as one token in this tokenizer; "
                "use a byte-level BPE tokenizer such as hub_configs/tiny's"
            )

    def fill(self, rng: random.Random, n: int) -> tuple[str, list[int]]:
        text, ids = [], []
        while n > 0:
            if n <= 10:  # close with words of one token each so the count comes out exact
                words = [rng.choice(self.single) for _ in range(max(n - 1, 1))]
            else:
                words = [rng.choice(self.words) for _ in range(rng.randint(4, 9))]
                if sum(len(w_ids) for _, w_ids in words) + 1 > n - 2:  # leave room for a closing sentence
                    words = [rng.choice(self.single) for _ in range(4)]
            sentence = [t for _, w_ids in words for t in w_ids]
            stop = n > len(sentence)
            text.append(" ".join(w for w, _ in words) + ("." if stop else ""))
            ids += sentence + (self.period if stop else [])
            n -= len(sentence) + (1 if stop else 0)
        return "".join(" " + t for t in text), ids


@cache
def _haystack(tokenizer) -> _Haystack:
    return _Haystack(tokenizer)


def needle_document(
    tokenizer,
    length: int,
    depth: float | Sequence[float],
    seed: int,
    split: str = "test",
    kind: str = "single",
) -> NeedleDocument:
    """A document of exactly `length` tokens with its needle(s) at `depth` (multi-hop: two depths, default the
    given one and the one half a document away), deterministic in (length, depth, seed, split, kind)."""
    if split not in SPLITS or kind not in KINDS:
        raise ValueError(f"split must be one of {SPLITS} and kind one of {KINDS}; got {split!r}, {kind!r}")
    depths = (depth,) if isinstance(depth, int | float) else tuple(depth)
    if kind == "multihop" and len(depths) == 1:
        depths = (depths[0], (depths[0] + 0.5) % 1.0)
    if len(depths) != (2 if kind == "multihop" else 1) or not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"{kind} needs {'two depths' if kind == 'multihop' else 'one depth'} in [0, 1]; got {depth}")
    rng = random.Random(f"needle:{kind}:{split}:{length}:{depths}:{seed}")
    key = _draw_key(rng, split, set())
    value = str(rng.randint(10, 99))
    if kind == "single":
        needles, answer = [NEEDLE.format(key=key, value=value)], value
    else:
        other = _draw_key(rng, split, {key})
        needles, answer = (
            [LINK.format(key=key, other=other), NEEDLE.format(key=other, value=value)],
            f"{other} {value}",
        )
    question = QUESTION.format(key=key)
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    needle_ids, question_ids = [encode(n) for n in needles], encode(question)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    room = length - len(bos) - len(question_ids) - sum(len(n) for n in needle_ids)
    if room < 0:
        raise ValueError(f"length={length} is too short for the needle and question ({length - room} tokens)")
    # Filler offsets of the needles, in depth order; ties keep the given order.
    order = sorted(range(len(depths)), key=lambda i: depths[i])
    offsets = [round(depths[i] * room) for i in order]
    haystack = _haystack(tokenizer)
    text, ids, spans, used = "", list(bos), [None] * len(depths), 0
    for i, offset in zip(order, offsets):
        filler_text, filler_ids = haystack.fill(rng, offset - used)
        used = offset
        text, ids = text + filler_text, ids + filler_ids
        spans[i] = (len(ids), len(ids) + len(needle_ids[i]))
        text, ids = text + needles[i], ids + needle_ids[i]
    filler_text, filler_ids = haystack.fill(rng, room - used)
    text, ids = text + filler_text + question, ids + filler_ids + question_ids
    return NeedleDocument(
        id=f"{kind}/{split}/L{length}/d{'-'.join(f'{d:g}' for d in depths)}/s{seed}",
        kind=kind,
        split=split,
        text=text,
        input_ids=ids,
        answer=answer,
        value=value,
        length=length,
        depths=depths,
        needle_spans=tuple(spans),
        meta={"key": key, "room": room},
    )


def needle_grid(
    tokenizer,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    per_cell: int = 1,
    seed: int = 0,
    split: str = "test",
    kind: str = "single",
) -> list[NeedleDocument]:
    """`per_cell` documents for every (length, depth), seeds `seed`, `seed + 1`, ..."""
    return [
        needle_document(tokenizer, length, depth, seed + i, split, kind)
        for length in lengths
        for depth in depths
        for i in range(per_cell)
    ]


def grade_needle(output: str, example) -> tuple[bool, Hashable | None]:
    """Correct when the output's final number is the value asked for (the multi-hop chain may precede it)."""
    value = extract_number(output)
    return numbers_equal(value, example.gold), value


@cache
def _tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


def load_needle_examples(source, kind: str = "single") -> list:
    """The registered tasks' examples: the default lengths x depths, shortest first, lengths counted in tokens of
    the tiny tokenizer (hub_configs/tiny; another tokenizer gives other lengths in its own tokens)."""
    from .tasks import Example

    documents = needle_grid(_tiny_tokenizer(), seed=source.seed, kind=kind)
    instruction = "Read the document and answer the question at its end with the number only.\n\n"
    return [
        Example(
            id=doc.id,
            messages=[{"role": "user", "content": instruction + doc.text.lstrip()}],
            gold=doc.value,
            meta={"length": doc.length, "depths": list(doc.depths), "answer": doc.answer},
        )
        for doc in documents
    ]


def needle_corpus(tokenizer, documents_per_length: int, lengths: Sequence[int], seed: int = 0, split: str = "train"):
    """A `datasets.Dataset` with a `text` column for language-model training: `documents_per_length` documents at
    each length in `lengths`, in that order (a length curriculum, for a sequential sampler), each followed by its
    answer, needles at uniformly random depths."""
    import datasets

    rng = random.Random(f"needle-corpus:{seed}:{split}")
    texts = []
    for length in lengths:
        for _ in range(documents_per_length):
            doc = needle_document(tokenizer, length, rng.random(), rng.randrange(1 << 30), split)
            texts.append(doc.text + " " + doc.answer)
    return datasets.Dataset.from_dict({"text": texts})
