"""Long context: the generated retrieval task, chunked prefill against the plain forward, prefill memory, the
quantized cache of the NoPE layers, and the mid-training stage."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from eval.long_context import key_split, needle_document, needle_grid
from eval.tasks import DataSource, Example, get_task


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained("hub_configs/tiny")


def occurrences(sequence: list[int], part: list[int]) -> int:
    return sum(sequence[i : i + len(part)] == part for i in range(len(sequence) - len(part) + 1))


def check_document(doc, tokenizer, length, depths):
    assert len(doc.input_ids) == doc.length == length
    assert doc.input_ids[0] == tokenizer.bos_token_id
    # The pieces tokenized one by one are what the whole text tokenizes to (what a user's pipeline sees).
    assert tokenizer.encode(doc.text, add_special_tokens=False) == doc.input_ids[1:]
    room = doc.meta["room"]
    filler_before = 0  # filler tokens ahead of each needle, in position order
    for (start, end), depth in sorted(zip(doc.needle_spans, depths)):
        needle = doc.input_ids[start:end]
        assert occurrences(doc.input_ids, needle) == 1
        assert abs((start - 1 - filler_before) / room - depth) <= 0.5 / room + 1e-12
        filler_before += end - start
    keys = re.findall(r"\b[A-Z]{3}\b", doc.text)
    assert keys.count(doc.meta["key"]) == 2  # in its needle and in the question
    assert len(set(keys)) == len(depths)
    assert re.findall(r"\d+", doc.text) == re.findall(r"\d+", doc.answer)[-1:]  # the value, once


@settings(max_examples=25, deadline=None)
@given(
    length=st.integers(64, 6000),
    depth=st.floats(0.0, 1.0),
    seed=st.integers(0, 10**6),
    split=st.sampled_from(["train", "test"]),
)
def test_needle_once_at_the_depth_and_length_asked(tokenizer, length, depth, seed, split):
    doc = needle_document(tokenizer, length, depth, seed, split)
    check_document(doc, tokenizer, length, (depth,))
    assert doc.answer == doc.value and key_split(doc.meta["key"]) == split


@settings(max_examples=15, deadline=None)
@given(length=st.integers(96, 6000), depths=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)), seed=st.integers())
def test_multihop_facts_once_each_at_their_depths(tokenizer, length, depths, seed):
    doc = needle_document(tokenizer, length, depths, seed, kind="multihop")
    assert len(doc.needle_spans) == 2
    link, fact = (doc.input_ids[a:b] for a, b in doc.needle_spans)
    other = doc.answer.split()[0]
    assert tokenizer.decode(link).strip() == f"The code of {doc.meta['key']} is the code of {other}."
    assert tokenizer.decode(fact).strip() == f"The code of {other} is {doc.value}."
    check_document(doc, tokenizer, length, depths)  # each key twice: A in the link and question, B in both facts


def test_long_documents_64x_the_training_length(tokenizer):
    doc = needle_document(tokenizer, 32768, 0.37, seed=3)
    check_document(doc, tokenizer, 32768, (0.37,))
    for depth in (0.0, 1.0):
        check_document(needle_document(tokenizer, 32768, depth, seed=4), tokenizer, 32768, (depth,))


def test_deterministic_and_splits_disjoint(tokenizer):
    assert needle_document(tokenizer, 700, 0.5, 1) == needle_document(tokenizer, 700, 0.5, 1)
    assert needle_document(tokenizer, 700, 0.5, 1).text != needle_document(tokenizer, 700, 0.5, 2).text
    grid = dict(lengths=(128, 256), depths=(0.0, 0.5, 1.0), per_cell=40)
    train = needle_grid(tokenizer, split="train", **grid)
    test = needle_grid(tokenizer, split="test", **grid)
    train_keys = {d.meta["key"] for d in train} | {d.answer.split()[0] for d in needle_grid(
        tokenizer, split="train", kind="multihop", **grid)}  # fmt: skip
    test_keys = {d.meta["key"] for d in test}
    assert len(test_keys) > 100 and not train_keys & test_keys
    assert not {d.text for d in train} & {d.text for d in test}


def test_bad_arguments_name_the_problem(tokenizer):
    with pytest.raises(ValueError, match="too short"):
        needle_document(tokenizer, 10, 0.5, 0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        needle_document(tokenizer, 512, 1.5, 0)
    with pytest.raises(ValueError, match="split must be"):
        needle_document(tokenizer, 512, 0.5, 0, split="dev")


def test_registered_tasks_grade_the_final_number():
    for name in ("needle", "needle_multihop"):
        task = get_task(name)
        examples = task.load(DataSource())
        assert len(examples) == 35 and all(isinstance(e, Example) for e in examples)
        assert {e.meta["length"] for e in examples} == {512, 1024, 2048, 4096, 8192, 16384, 32768}
        example = examples[0]
        assert task.grade(example.meta["answer"], example)[0]
        assert task.grade(f"The answer is {example.gold}", example)[0]
        assert not task.grade(str(int(example.gold) + 1), example)[0]
