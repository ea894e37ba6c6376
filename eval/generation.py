"""Batched generation for evaluation and RL sampling: chat template, left padding, `model.generate`, decode.

Runs on the device accelerate (and so the Trainer) uses, and under `accelerate launch` / `torchrun` splits the
batches across the processes and gathers every completion on every rank, with results identical to one process.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

__all__ = ["generate_completions", "generation_device", "render_prompts"]

Prompt = str | list[dict]


def render_prompts(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt: chat messages through the tokenizer's chat template with the assistant header
    appended (`add_generation_prompt=True`), plain strings as they are (with the tokenizer's BOS)."""
    ids = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids.append(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        else:
            text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
            # The template already starts with <|begin_of_text|>; a second BOS shifts every position.
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def _generation_config(model, tokenizer, max_new_tokens: int, temperature: float, top_p: float, num_samples: int):
    # A copy of the model's own config keeps its EOS ids (Llama 4 stops on <|eot|> and <|eom|>) while our settings
    # override the sampling ones a checkpoint may ship (`do_sample: true, temperature: 0.6`).
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.pad_token_id = tokenizer.pad_token_id
    if temperature > 0:
        config.do_sample, config.temperature, config.top_p, config.top_k = True, temperature, top_p, None
        config.num_return_sequences = num_samples
    else:
        config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
        config.num_return_sequences = 1
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    return config


def generation_device(model, device: str | torch.device | None = None) -> torch.device:
    """Where to generate: `device` if given; else the accelerator accelerate uses (`PartialState().device`, the
    Trainer's device, `cuda:<local rank>` under a launcher) for a model still on the CPU where `from_pretrained`
    left it; else where the model already is. A model dispatched over devices (`device_map`) stays put."""
    current = next(model.parameters()).device
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        return current
    if device is not None:
        return torch.device(device)
    if current.type == "cpu":
        return PartialState().device
    return current


@torch.inference_mode()
def generate_completions(
    model,
    tokenizer,
    prompts: list[list[dict]] | list[str],
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generating",
    on_prompt_done: Callable[[int, list[str]], None] | None = None,
    device: str | torch.device | None = None,
    split_across_processes: bool = True,
    images: Sequence[list] | None = None,
) -> list[list[str]]:
    """`num_samples` completions for each prompt, decoded without special tokens: `result[i][j]` is sample j of
    prompt i.

    Chat prompts (lists of `{"role", "content"}` messages) go through the chat template with the generation prompt;
    strings are used as is. Greedy when `temperature == 0` (then one generation is copied `num_samples` times, since
    every sample would be the same); otherwise sampling with `temperature` / `top_p`, seeded per batch from `seed`.
    `batch_size` counts sequences per `generate` call (prompts x samples). Prompts are grouped by length and left
    padded. `on_prompt_done(index, completions)` is called as each prompt finishes, e.g. to write a resumable cache
    (on the main process only when several run).

    The model is moved to `generation_device(model, device)` first. With several processes (and
    `split_across_processes`), batch b runs on rank b % num_processes with the seed one process would give it, and
    each round of batches is gathered on every rank: every rank returns all completions, equal to one process's.

    `images[i]` (PIL images, one per `{"type": "image"}` entry of prompt i) makes the prompts multimodal: then
    `tokenizer` must be the model's processor (`Llama4Processor`), which expands each image into its tile tokens.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not prompts:
        return []
    processor = None
    if images is not None:
        if not hasattr(tokenizer, "image_processor"):
            raise ValueError(
                "image prompts need the model's processor (Llama4Processor, AutoProcessor.from_pretrained), not a "
                f"{type(tokenizer).__name__}: pass the processor as `tokenizer`"
            )
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts: give one list per prompt")
        processor, tokenizer = tokenizer, tokenizer.tokenizer
    saved = tokenizer.padding_side, tokenizer.pad_token
    # Decoder-only models must be left padded: with right padding the first generated token follows pad tokens.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    model.eval()
    try:
        config = _generation_config(model, tokenizer, max_new_tokens, temperature, top_p, num_samples)
        sampled = temperature > 0
        per_call = max(1, batch_size // num_samples) if sampled else max(1, batch_size)
        if processor is None:
            ids = render_prompts(tokenizer, prompts)
            lengths = [len(row) for row in ids]
        else:  # the processor tokenizes per batch (it expands the images); lengths here only order the prompts
            rendered = [
                processor.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False) for p in prompts
            ]
            pixels = [sum(image.size[0] * image.size[1] for image in row) for row in images]
            lengths = [len(text) + area // 256 for text, area in zip(rendered, pixels)]
            # generate() would repeat pixel_values per tile, not per prompt: repeat the prompts here instead.
            repeats = num_samples if sampled else 1
            if sampled:
                config.num_return_sequences = 1
        # Longest first: similar lengths share a batch (less padding), and an out-of-memory error shows up at once.
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
        starts = list(range(0, len(order), per_call))
        results: list[list[str] | None] = [None] * len(prompts)
        device = generation_device(model, device)
        if next(model.parameters()).device != device:
            model.to(device)
        state = PartialState()
        ranks = state.num_processes if split_across_processes else 1
        rank = state.process_index if ranks > 1 else 0
        report = on_prompt_done if ranks == 1 or state.is_main_process else None
        with tqdm(total=len(prompts), desc=desc, disable=not progress or rank != 0, unit="prompt") as bar:
            for round_start in range(0, len(starts), ranks):  # one batch per process per round
                done: list[tuple[int, list[str]]] = []
                if round_start + rank < len(starts):
                    start = starts[round_start + rank]
                    batch = order[start : start + per_call]
                    if processor is None:
                        inputs = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt")
                    else:
                        inputs = processor(
                            text=[rendered[i] for i in batch for _ in range(repeats)],
                            images=[list(images[i]) for i in batch for _ in range(repeats)],
                            padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt",
                        )  # fmt: skip
                    inputs = inputs.to(device)
                    if sampled:
                        torch.manual_seed(seed + start)
                    output = model.generate(**inputs, generation_config=config)
                    new_tokens = output[:, inputs["input_ids"].shape[1] :]
                    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                    for k, index in enumerate(batch):
                        samples = (
                            texts[k * num_samples : (k + 1) * num_samples] if sampled else [texts[k]] * num_samples
                        )
                        done.append((index, samples))
                if ranks > 1:
                    done = gather_object(done)
                for index, samples in done:
                    results[index] = samples
                    if report is not None:
                        report(index, samples)
                bar.update(len(done))
    finally:
        tokenizer.padding_side, tokenizer.pad_token = saved
        model.train(was_training)
    return results  # type: ignore[return-value]
