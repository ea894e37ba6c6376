"""GRPO's generation for our Llama 4: each distinct prompt prefilled once, then a decode loop that drops finished
rows from the batch.

`model.generate` keeps every row in the batch until the longest answer ends and draws each token with
`torch.multinomial`. On the main job's RL batches (256 rows, answers of 21-32 tokens) both cost: a row that has
finished still runs through every layer, and `multinomial` over (256, vocab) took 15% of a generate() call on
this CPU (docs/benchmarks.md). The loop here runs generate()'s own logits processors (the same
`_get_logits_processor` generate() builds from the config), keeps a row until its first EOS, then removes it from
the batch and the key/value cache, and samples by inverse CDF: one uniform per row against the cumulative
probabilities, the same distribution as `multinomial`, from fewer random numbers. Greedy decoding gives
generate()'s tokens (tests/test_rl_logprobs.py); sampled tokens follow the same distribution but not the same
random stream. Configs it does not cover (beams, several sequences per row, stop strings, time limits, ...) go
to `model.generate`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import DynamicCache, GenerationConfig, StaticCache
from transformers.generation.configuration_utils import GenerationMode

__all__ = ["decode_dropping_finished", "generate_sharing_prompts", "prefill_distinct_rows", "sample_inverse_cdf"]

# Rows are removed from the batch once this share of the remaining ones has finished: each removal copies every
# layer's keys and values, so waiting for a few rows at a time costs less than copying after each one.
DROP_FRACTION = 1 / 16


def sample_inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` (B, V), each drawn with probability probs[b, v] / probs[b].sum().

    Token v is drawn iff u falls in [cdf[v-1], cdf[v]) for u uniform on [0, cdf[-1]): a zero-probability token has
    an empty interval and is never drawn."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, device=probs.device, dtype=cdf.dtype, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)  # (B,)


def _decodes_here(config: GenerationConfig, generate_kwargs: dict[str, Any]) -> bool:
    """Whether the call asks only for what the loop here does: greedy or sampled decoding of one sequence per row,
    stopping at EOS or `max_new_tokens`, the result as a tensor of ids."""
    return (
        set(generate_kwargs) <= {"generation_config"}
        and config.get_generation_mode() in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)
        and (config.max_new_tokens or 0) >= 1
        and config.num_return_sequences == 1
        and not config.return_dict_in_generate
        and config.stop_strings is None
        and config.max_time is None
    )


@torch.no_grad()
def decode_dropping_finished(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, config: GenerationConfig
) -> torch.Tensor:
    """Continue left-padded `input_ids` (B, P), all but whose last token are in `cache`, by up to
    `config.max_new_tokens` tokens: (B, P + C) like `model.generate`, pad after each row's first EOS, C the length
    of the longest answer. `config` has been through generate()'s `_prepare_generation_config`."""
    base = model.get_base_model() if is_peft_model(model) else model
    device = input_ids.device
    base._prepare_special_tokens(config, True, device=device, batch_size=input_ids.size(0))
    processors = base._get_logits_processor(config, input_ids_seq_length=input_ids.size(1), device=device)
    eos, pad = config._eos_token_tensor, config._pad_token_tensor
    if pad is None:  # as generate(): the first EOS pads
        pad = eos[0] if eos is not None else torch.tensor(0, device=device)
    batch, prompt_len = input_ids.shape
    width = prompt_len + config.max_new_tokens
    output = torch.full((batch, width), int(pad), dtype=input_ids.dtype, device=device)
    output[:, :prompt_len] = input_ids
    # Working copies of the rows still decoding, in the cache's batch order; `rows` maps them to `output`.
    sequences, masks = output.clone(), attention_mask.new_zeros(batch, width)
    masks[:, :prompt_len] = attention_mask
    rows = torch.arange(batch, device=device)
    positions = attention_mask.sum(dim=-1, keepdim=True) - 1  # (B, 1): the last prompt token's, as generate()'s
    tokens = input_ids[:, -1:]  # (B, 1): run next, its key and value not yet cached
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    length = prompt_len
    for length in range(prompt_len, width):
        out = base(
            input_ids=tokens, attention_mask=masks[:, :length], position_ids=positions, cache=cache,
            use_cache=True, logits_to_keep=1, output_router_logits=False,
        )  # fmt: skip
        logits = out.logits[:, -1].float()  # (A, V): the rows still decoding
        scores = processors(sequences[:, :length], logits)
        if config.do_sample:
            next_tokens = sample_inverse_cdf(scores.softmax(dim=-1))
        else:
            next_tokens = scores.argmax(dim=-1)
        next_tokens = next_tokens.masked_fill(finished, int(pad))  # (A,)
        sequences[:, length], masks[:, length] = next_tokens, 1
        if eos is not None:
            finished |= torch.isin(next_tokens, eos)
        done = int(finished.sum())
        if done == finished.numel():
            break
        if done and done >= DROP_FRACTION * finished.numel():
            output[rows[finished]] = sequences[finished]
            keep = (~finished).nonzero().squeeze(1)
            cache.reorder_cache(keep)
            sequences, masks, rows, positions = sequences[keep], masks[keep], rows[keep], positions[keep]
            next_tokens, finished = next_tokens[keep], finished[keep]
        tokens, positions = next_tokens[:, None], positions + 1
    output[rows] = sequences
    return output[:, : length + 1]


def prefill_distinct_rows(
    backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, *, positions_from_mask: bool, **kwargs
) -> tuple[Any, int, torch.Tensor]:
    """Run each distinct row of `input_ids` / `attention_mask` (B, S) through `backbone` once into `cache`, then
    gather the cache to every row (a differentiable index). Returns (the backbone's output over the U distinct
    rows, U, the row -> distinct-row index (B,)). `positions_from_mask`: position ids counted over the unpadded
    tokens, as generate() sets them; else the backbone's default, as a plain forward (TRL's log-prob pass) gets."""
    length = input_ids.size(1)
    unique, inverse = torch.unique(torch.cat([input_ids, attention_mask], dim=1), dim=0, return_inverse=True)
    mask = unique[:, length:]  # (U, S)
    if positions_from_mask:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    output = backbone(input_ids=unique[:, :length], attention_mask=mask, cache=cache, use_cache=True, **kwargs)
    cache.reorder_cache(inverse)  # (U, ...) -> (B, ...): every layer's keys and values
    return output, len(unique), inverse


def generate_sharing_prompts(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **generate_kwargs: Any
) -> torch.Tensor:
    """`model.generate(input_ids, attention_mask, ...)` (our Llama 4, left-padded prompts) with the prefill of each
    distinct prompt run once: GRPO repeats every prompt `num_generations` times. All but the last prompt token are
    prefilled per distinct row, the cache is gathered to every row, and `decode_dropping_finished` runs the last
    token and decodes (greedy: generate()'s tokens; tests/test_rl_logprobs.py).

    With `cache_implementation="static"` in the generation config the cache is a `StaticCache` sized for the
    prompt and `max_new_tokens`: a dynamic cache concatenates (re-allocates) every layer's keys and values at each
    decode step, which at GRPO's batch sizes on CPU costs more than the attention itself."""
    base = model.get_base_model() if is_peft_model(model) else model
    config, _ = base._prepare_generation_config(generate_kwargs.get("generation_config"))
    if not _decodes_here(config, generate_kwargs):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
    config = copy.deepcopy(config)  # the special-token tensors are written onto it
    if config.cache_implementation == "static":
        cache = StaticCache(config=base.config, max_cache_len=input_ids.size(1) + config.max_new_tokens)
    else:
        cache = DynamicCache(config=base.config)  # the cache generate() would build: chunked layers keep one chunk
    if input_ids.size(1) > 1:
        prefill_distinct_rows(
            base.model, input_ids[:, :-1], attention_mask[:, :-1], cache, positions_from_mask=True,
            output_router_logits=False,
        )  # fmt: skip
    return decode_dropping_finished(model, input_ids, attention_mask, cache, config)
