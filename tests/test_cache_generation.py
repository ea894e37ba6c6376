"""KV cache, incremental decoding, generate(), and temperature tuning from true positions."""

import copy

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig, Llama4TextExperts, moe

from conftest import tiny_text_kwargs

TUNED = dict(floor_scale=4, attn_scale=0.5)  # temperature tuning visibly active at tiny lengths


def _model(**overrides) -> Llama4ForCausalLM:
    return Llama4ForCausalLM(Llama4TextConfig(**tiny_text_kwargs(**overrides))).eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_incremental_decoding_equals_full_forward(attn_implementation):
    model = _model(**TUNED)
    model.set_attn_implementation(attn_implementation)
    input_ids = torch.randint(3, 96, (2, 41))
    with torch.no_grad():
        full = model(input_ids).logits
        out = model(input_ids[:, :7], use_cache=True)
        steps = [out.logits]
        for t in range(7, 41):
            out = model(input_ids[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_cache_keeps_one_chunk_on_chunked_layers_and_everything_on_nope_layers():
    model = _model()
    with torch.no_grad():
        out = model(torch.randint(3, 96, (1, 50)), use_cache=True)
    for layer_type, layer_cache in zip(model.config.layer_types, out.cache.layers):
        kept = layer_cache.keys.shape[-2]
        if layer_type == "chunked_attention":
            assert kept <= model.config.attention_chunk_size
        else:
            assert kept == 50
    assert model.config.layer_types.count("chunked_attention") == 2


@pytest.mark.parametrize("overrides", [TUNED, dict(num_experts_per_tok=2, interleave_moe_layer_step=2)])
def test_greedy_generate_equals_builtin(tmp_path, overrides):
    ours = _model(**overrides)
    ours.save_pretrained(tmp_path)
    builtin = transformers.Llama4ForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(3, 96, (2, 9))
    kwargs = dict(max_new_tokens=30, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kwargs), builtin.generate(prompt, **kwargs))


def test_left_padded_greedy_generate_equals_builtin(tmp_path):
    # With the default floor_scale (8192) the temperature is 1 at these lengths, so the built-in's
    # cache-length positions and our true positions agree and the outputs must be identical.
    ours = _model()
    ours.save_pretrained(tmp_path)
    builtin = transformers.Llama4ForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(3, 96, (2, 12))
    attention_mask = torch.ones_like(prompt)
    attention_mask[0, :4] = 0
    prompt[attention_mask == 0] = 0
    kwargs = dict(max_new_tokens=25, do_sample=False, attention_mask=attention_mask, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kwargs), builtin.generate(prompt, **kwargs))


def test_temperature_tuning_uses_true_positions_under_left_padding():
    model = _model(**TUNED)
    sequence = torch.randint(3, 96, (1, 30))
    padded = torch.cat([torch.zeros(1, 10, dtype=torch.long), sequence], dim=1)
    attention_mask = torch.cat([torch.zeros(1, 10, dtype=torch.long), torch.ones(1, 30, dtype=torch.long)], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # what generate() passes
    with torch.no_grad():
        alone = model(sequence).logits
        with_padding = model(padded, attention_mask=attention_mask, position_ids=position_ids).logits[:, 10:]
        generated_alone = model.generate(sequence, max_new_tokens=12, do_sample=False, pad_token_id=0)
        generated_padded = model.generate(padded, attention_mask=attention_mask, max_new_tokens=12, do_sample=False)
    torch.testing.assert_close(with_padding, alone, atol=1e-4, rtol=1e-4)
    assert torch.equal(generated_padded[:, 10:], generated_alone)


def test_packed_sequences_equal_separate_forwards():
    model = _model(**TUNED)
    first, second = torch.randint(3, 96, (1, 21)), torch.randint(3, 96, (1, 19))
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(21), torch.arange(19)]).unsqueeze(0)
    with torch.no_grad():
        # Packing is detected from position_ids when there is no cache and no 2-D mask (training-style calls).
        packed_logits = model(packed, position_ids=position_ids, use_cache=False).logits
        separate = torch.cat([model(first).logits, model(second).logits], dim=1)
    torch.testing.assert_close(packed_logits, separate, atol=1e-4, rtol=1e-4)


def _pair(tmp_path, **overrides):
    ours = _model(**overrides)
    ours.save_pretrained(tmp_path)
    return ours, transformers.Llama4ForCausalLM.from_pretrained(tmp_path).eval()


def _left_padded(batch: int, length: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    prompt = torch.randint(3, 96, (batch, length))
    attention_mask = torch.ones_like(prompt)
    attention_mask[0, :pad] = 0
    prompt[attention_mask == 0] = 0
    return prompt, attention_mask


@pytest.mark.parametrize("batch, experts_path", [(1, "gather"), (1, "dense"), (3, "dense"), (3, "sorted")])
def test_static_cache_greedy_generate_equals_builtin(tmp_path, monkeypatch, batch, experts_path):
    # Decode steps through the gathered-weights path (what CUDA and traced graphs run), every expert on every row
    # (tiny experts on CPU), or, with that turned off, rows sorted by expert (the CPU kernel).
    ours, builtin = _pair(tmp_path, num_experts_per_tok=2)
    if experts_path == "gather":
        monkeypatch.setattr(moe, "_eager_cpu", lambda rows: False)
    if experts_path == "sorted":
        for module in ours.modules():
            if isinstance(module, Llama4TextExperts):
                module.dense_max_wasted_flops = 0
    prompt, attention_mask = _left_padded(batch, 12, 4 if batch > 1 else 0)
    kwargs = dict(max_new_tokens=24, do_sample=False, attention_mask=attention_mask, pad_token_id=0)
    want = builtin.generate(prompt, **kwargs)
    assert torch.equal(ours.generate(prompt, cache_implementation="static", **kwargs), want)
    assert torch.equal(ours.generate(prompt, **kwargs), want)


GENERATE_MODES = {
    "sample": dict(do_sample=True, top_k=10, top_p=0.7, temperature=0.7, num_return_sequences=2),
    "beam search": dict(num_beams=2, num_return_sequences=2, length_penalty=2.0),
    "beam sample": dict(do_sample=True, num_beams=2),
    "processors": dict(bad_words_ids=[[1, 0]], repetition_penalty=1.2, no_repeat_ngram_size=2, min_new_tokens=5),
    "no cache": dict(use_cache=False),
    "scores and logits": dict(return_dict_in_generate=True, output_scores=True, output_logits=True),
    "beam scores": dict(num_beams=2, return_dict_in_generate=True, output_scores=True),
    "attentions, hidden states": dict(return_dict_in_generate=True, output_attentions=True, output_hidden_states=True),
}


@pytest.mark.parametrize("mode", GENERATE_MODES)
def test_generate_modes_equal_builtin(tmp_path, mode):
    """generate()'s other decoding modes and outputs (the GenerationTesterMixin list) give the built-in's tokens,
    scores and per-step output shapes on the same weights; the prompt (15 tokens) spans a chunk boundary."""
    ours, builtin = _pair(tmp_path, eos_token_id=None)
    ours.set_attn_implementation("eager")  # attention weights: both then return them
    builtin.set_attn_implementation("eager")
    prompt, attention_mask = _left_padded(2, 15, 3)
    kwargs = dict(max_new_tokens=6, attention_mask=attention_mask, pad_token_id=0, **GENERATE_MODES[mode])
    outputs = []
    for model in (ours, builtin):
        torch.manual_seed(0)
        outputs.append(model.generate(prompt, **kwargs))
    got, want = outputs
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
        return
    assert torch.equal(got.sequences, want.sequences)
    for name in ("scores", "logits"):
        for step_got, step_want in zip(getattr(got, name) or (), getattr(want, name) or (), strict=True):
            torch.testing.assert_close(step_got, step_want, atol=1e-4, rtol=1e-4)
    for name in ("attentions", "hidden_states"):
        shapes_got = [[t.shape for t in step] for step in getattr(got, name) or ()]
        assert shapes_got == [[t.shape for t in step] for step in getattr(want, name) or ()], name


def test_generate_continues_from_its_cache_and_assisted_decoding_equals_greedy(tmp_path):
    """A second generate() on the first one's cache gives the tokens of one longer call; an assistant model
    (speculative decoding) and prompt lookup give greedy's tokens; the 20-token prompt spans a chunk boundary."""
    ours, builtin = _pair(tmp_path, eos_token_id=None)
    prompt = torch.randint(3, 96, (1, 20))
    kwargs = dict(attention_mask=torch.ones_like(prompt), pad_token_id=0, do_sample=False)
    longer = ours.generate(prompt, max_new_tokens=10, **kwargs)
    assert torch.equal(longer, builtin.generate(prompt, max_new_tokens=10, **kwargs))
    first = ours.generate(prompt, max_new_tokens=6, return_dict_in_generate=True, **kwargs)
    mask = torch.ones_like(first.sequences)
    cache = first.past_key_values
    assert cache.get_seq_length() == 25  # the last token is not run yet
    rest = dict(pad_token_id=0, do_sample=False, max_new_tokens=4, cache=cache)
    assert torch.equal(ours.generate(first.sequences, attention_mask=mask, **rest), longer)
    assert cache.get_seq_length() == 29  # the second call ran on (and grew) the first one's cache
    assistant = copy.deepcopy(ours)
    assert torch.equal(ours.generate(prompt, max_new_tokens=10, assistant_model=assistant, **kwargs), longer)
    assert torch.equal(ours.generate(prompt, max_new_tokens=10, prompt_lookup_num_tokens=3, **kwargs), longer)


def test_static_cache_incremental_decoding_equals_full_forward():
    model = _model(**TUNED)
    input_ids = torch.randint(3, 96, (2, 40))
    cache = transformers.StaticCache(config=model.config, max_cache_len=48)
    with torch.no_grad():
        full = model(input_ids).logits
        steps = [model(input_ids[:, :7], cache=cache, use_cache=True).logits]
        for t in range(7, 40):
            position_ids = torch.tensor([[t], [t]])
            steps.append(model(input_ids[:, t : t + 1], cache=cache, use_cache=True, position_ids=position_ids).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compiled_decode_step_is_one_graph_and_greedy_equals_builtin(tmp_path):
    """generate() with a static cache and `torch.compile(fullgraph=True)` of the decode step (transformers skips
    compiling llama4; ours does not): no graph break, and the built-in's tokens at batch 1 (gathered expert weights)
    and left-padded batch 3 (top-2: more assignments than experts, so every expert runs on every row when traced).
    The eager backend checks the capture without paying for inductor's C++ build on every test run."""
    from torch._dynamo.utils import counters

    ours, builtin = _pair(tmp_path, num_experts_per_tok=2)
    compile_config = transformers.CompileConfig(fullgraph=True, backend="eager")
    compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    torch._dynamo.reset()
    counters.clear()
    for batch in (1, 3):
        prompt, attention_mask = _left_padded(batch, 10, 3 if batch > 1 else 0)
        kwargs = dict(max_new_tokens=5, do_sample=False, attention_mask=attention_mask, pad_token_id=0)
        want = builtin.generate(prompt, **kwargs)
        got = ours.generate(prompt, cache_implementation="static", compile_config=compile_config, **kwargs)
        assert torch.equal(got, want), batch
    assert counters["stats"]["unique_graphs"] > 0  # the decode steps really were compiled
    assert not counters["graph_break"]


def test_completion_only_log_probs_equal_the_full_paths():
    """`logits_to_keep=n + 1` (what TRL passes to score a completion of n tokens) runs the LM head on the last
    positions only; the completion's log-probs equal those of full logits, with left padding in the prompt."""
    model = _model()
    prompt, attention_mask = _left_padded(3, 14, 5)
    completion = torch.randint(3, 96, (3, 6))
    input_ids = torch.cat([prompt, completion], dim=1)
    attention_mask = torch.cat([attention_mask, torch.ones_like(completion)], dim=1)
    n = completion.shape[1]
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask).logits[:, -n - 1 : -1]
        kept = model(input_ids, attention_mask=attention_mask, logits_to_keep=n + 1).logits[:, :-1]
    assert kept.shape == full.shape

    def log_probs(logits):
        return logits.log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)

    torch.testing.assert_close(log_probs(kept), log_probs(full), atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 5),
    kv_heads=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2, 5]),
    keys=st.integers(1, 40),
    head_dim=st.sampled_from([8, 16]),
    mask_kind=st.sampled_from(["none", "bool", "additive"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_one_query_attention_equals_sdpa(batch, kv_heads, group, keys, head_dim, mask_kind, dtype, seed):
    """The CPU decode path against transformers' SDPA attention (the built-in's), masks of every form, GQA."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from modeling_llama4.modeling_llama4 import one_query_attention

    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * group, 1, head_dim, generator=generator).to(dtype)
    key, value = (torch.randn(batch, kv_heads, keys, head_dim, generator=generator).to(dtype) for _ in range(2))
    mask = None
    if mask_kind != "none":
        attended = torch.rand(batch, 1, 1, keys, generator=generator) < 0.7
        attended[..., -1] = True  # every row attends to at least its own key
        mask = (
            attended if mask_kind == "bool" else torch.zeros(attended.shape, dtype=dtype).masked_fill(~attended, -1e4)
        )
    module = SimpleNamespace(num_key_value_groups=group, is_causal=False, training=False)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=head_dim**-0.5)
    ours = one_query_attention(query, key, value, mask, head_dim**-0.5)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours, expected, **tolerance)
