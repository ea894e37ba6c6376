"""Long context: the generated retrieval task, chunked prefill against the plain forward, prefill memory, the
quantized cache of the NoPE layers, and the mid-training stage."""

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, DataCollatorWithFlattening
from transformers.cache_utils import DynamicCache

from eval.long_context import key_split, needle_corpus, needle_document, needle_grid
from eval.tasks import DataSource, Example, get_task
from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from modeling_llama4.kv_cache import Int8KVLayer, QuantizedNoPECache, kv_cache_nbytes


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


# ---------------------------------------------------------------------------------------------------------------
# Long prefill: through the cache in pieces, and its memory
# ---------------------------------------------------------------------------------------------------------------


def tiny_model(**overrides):
    torch.manual_seed(0)
    config = Llama4TextConfig.from_pretrained("hub_configs/tiny", **overrides)
    return Llama4ForCausalLM(config).eval()


@torch.no_grad()
def test_chunked_prefill_of_a_long_prompt_equals_the_unchunked_forward():
    # floor_scale 64: the NoPE layer's temperature changes every 64 positions, so the pieces must carry positions.
    model = tiny_model(floor_scale=64)
    ids = torch.randint(0, 1000, (1, 1100), generator=torch.Generator().manual_seed(1))
    full = model(input_ids=ids).logits  # chunks as batch rows: no mask, no cache
    cache, pieces = DynamicCache(config=model.config), []
    for start in range(0, ids.shape[1], 200):  # pieces straddle chunk edges (chunk 32)
        out = model(input_ids=ids[:, start : start + 200], cache=cache, use_cache=True)
        pieces.append(out.logits)
        cache = out.cache
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)
    kept = [layer.keys.shape[-2] for layer in cache.layers]
    chunk = model.config.attention_chunk_size
    assert kept == [chunk - 1 if t == "chunked_attention" else 1100 for t in model.config.layer_types]


def peak_rss_mib(fn) -> float:
    """Peak resident MiB above the resident set before fn() (torch's CPU allocations are invisible to tracemalloc)."""

    def status(field: str) -> float:
        line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
        return int(line.split()[1]) / 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux /proc")
@torch.no_grad()
def test_32k_prefill_memory_stays_under_what_one_full_mask_needs():
    model = tiny_model()
    length = 32768
    ids = torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(0))
    peak = peak_rss_mib(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))
    mask_mib = length * length / 2**20  # one boolean S x S mask: 1024 MiB
    assert peak < mask_mib / 2, f"prefill peaked at {peak:.0f} MiB"


# ---------------------------------------------------------------------------------------------------------------
# int8 cache of the NoPE layers
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 9), st.sampled_from([4, 16])),
    log_scale=st.floats(-6, 4),
    seed=st.integers(0, 2**31),
)
def test_int8_layer_round_trip_error_is_half_a_step(shape, log_scale, seed):
    states = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 10**log_scale
    layer = Int8KVLayer()
    keys, values = layer.update(states, 2 * states)
    assert torch.equal(keys, states) and torch.equal(values, 2 * states)  # the new states come back exact
    more = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)) * 10**log_scale
    keys, _ = layer.update(more, more)
    assert layer.get_seq_length() == 2 * shape[2] and keys.shape[-2] == 2 * shape[2]
    step = states.abs().amax(-1, keepdim=True) / 127  # per token and head
    bound = step * (0.5 + 1e-5) + 1e-37  # half a quantization step, plus float32 rounding
    assert (keys[..., : shape[2], :] - states).abs().le(bound).all()
    assert torch.equal(keys[..., shape[2] :, :], more)


@torch.no_grad()
def test_int8_nope_cache_decodes_like_the_full_forward_and_the_full_precision_cache():
    # A larger init than the default makes attention peaked, so errors in the cached keys would show.
    model = tiny_model(floor_scale=64, initializer_range=0.1)
    ids = torch.randint(0, 1000, (2, 360), generator=torch.Generator().manual_seed(2))
    full = model(input_ids=ids).logits[:, 239:359]
    decoded = {}
    for name, cache in (("fp32", DynamicCache(config=model.config)), ("int8", QuantizedNoPECache(model.config))):
        out = model(input_ids=ids[:, :240], cache=cache, use_cache=True)
        steps = [out.logits[:, -1:]]
        for t in range(240, 359):
            steps.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        decoded[name] = (torch.cat(steps, 1), cache)
    torch.testing.assert_close(decoded["fp32"][0], full, rtol=1e-4, atol=1e-4)
    error = (decoded["int8"][0] - full).abs().max() / full.abs().max()
    assert error < 5e-3, error
    assert torch.equal(decoded["int8"][0].argmax(-1), full.argmax(-1))
    fp32_cache, int8_cache = decoded["fp32"][1], decoded["int8"][1]
    assert [type(layer).__name__ for layer in int8_cache.layers] == [
        "DynamicSlidingWindowLayer" if t == "chunked_attention" else "Int8KVLayer" for t in model.config.layer_types
    ]
    nope = model.config.layer_types.index("full_attention")
    fp32_layer = fp32_cache.layers[nope]
    fp32_bytes = fp32_layer.keys.numel() * 4 + fp32_layer.values.numel() * 4
    # int8 values plus a float32 scale per head_dim values, against fp32 values: (1 + 4 / D) / 4 of the bytes.
    ratio = int8_cache.layers[nope].nbytes() / fp32_bytes
    assert ratio == pytest.approx((1 + 4 / model.config.head_dim) / 4)
    assert kv_cache_nbytes(fp32_cache) - kv_cache_nbytes(int8_cache) == fp32_bytes - int8_cache.layers[nope].nbytes()


# ---------------------------------------------------------------------------------------------------------------
# The mid-training stage
# ---------------------------------------------------------------------------------------------------------------


def test_needle_corpus_is_a_length_curriculum_of_train_keys(tokenizer):
    corpus = needle_corpus(tokenizer, 3, [64, 160], seed=0)
    lengths = [len(tokenizer(text).input_ids) for text in corpus["text"]]
    answers = [len(tokenizer.encode(" " + t.rsplit(" ", 1)[1], add_special_tokens=False)) for t in corpus["text"]]
    # Each document's tokens but the beginning-of-text one (which this tokenizer's __call__ does not add).
    assert [n - a for n, a in zip(lengths, answers)] == [63, 63, 63, 159, 159, 159]
    assert all(key_split(k) == "train" for t in corpus["text"] for k in re.findall(r"\b[A-Z]{3}\b", t))


class SimulatedCrash(Exception):
    pass


@pytest.mark.slow
def test_midtrain_stage_packs_whole_documents_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import TrainerCallback
    from trl import ModelConfig, SFTConfig, TrlParser

    from recipes import pretrain

    class CrashAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise SimulatedCrash("killed after checkpoint-2")

    batches = []

    class RecordingCollator(DataCollatorWithFlattening):
        def __call__(self, features, *args, **kwargs):
            batch = super().__call__(features, *args, **kwargs)
            batches.append((len(features), batch["position_ids"].clone()))
            return batch

    def run(output_dir, crash: bool):
        argv = ["--config", "recipes/configs/midtrain_tiny.yaml", "--output_dir", str(output_dir),
                "--needle_lengths", "64", "128", "--corpus_documents", "8", "--per_device_train_batch_size", "4",
                "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--max_length", "160"]  # fmt: skip
        args = TrlParser((pretrain.PretrainScriptArguments, SFTConfig, ModelConfig)).parse_args_and_config(argv)
        with monkeypatch.context() as patch:
            patch.setattr(pretrain, "DataCollatorWithFlattening", RecordingCollator)
            if crash:
                original = pretrain.train_resumably

                def crashing(trainer, training_args):
                    trainer.add_callback(CrashAfterCheckpoint())
                    original(trainer, training_args)

                patch.setattr(pretrain, "train_resumably", crashing)
            return pretrain.main(*args)

    run(tmp_path / "straight", crash=False)
    # Whole documents packed: each row restarts its positions once per document; phase 2 is twice as long.
    rows = [positions[0] for _, positions in batches[:4]]
    starts = [int((row == 0).sum()) for row in rows]
    assert starts == [4, 4, 4, 4] and rows[0].numel() < rows[2].numel()
    assert rows[0].max() < 64 + 8 <= rows[2].max()
    with pytest.raises(SimulatedCrash):
        run(tmp_path / "resumed", crash=True)
    results = run(tmp_path / "resumed", crash=False)
    assert any(entry.get("step") == 3 for entry in results["log_history"]), "resumed run did not train on"
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


@torch.no_grad()
def test_generate_takes_the_int8_nope_cache():
    model = tiny_model(initializer_range=0.1)
    prompt = torch.randint(0, 1000, (1, 100), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    cache = QuantizedNoPECache(model.config)
    assert torch.equal(model.generate(prompt, cache=cache, **kwargs), model.generate(prompt, **kwargs))
    assert isinstance(cache.layers[3], Int8KVLayer) and cache.layers[3].get_seq_length() == 119
