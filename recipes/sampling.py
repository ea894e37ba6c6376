"""Sampling many answers per prompt from a policy, cached on disk.

The judge filter (SFT) and the preference-pair builder (DPO) both need k sampled answers per prompt. Samples are
cached per chunk of prompts, under a key made of the model's weights and the sampling settings: a re-run, or a run
killed half-way, never regenerates a finished chunk and gets exactly the samples a single pass would have drawn
(each chunk has its own seed).

Generation runs on the accelerator accelerate uses and, under a multi-process launcher, every process generates a
share of each chunk and receives all of it (`eval.generation.generate_completions`); the main process writes the
cache. Every rank returns the same samples as a single process would.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from accelerate import PartialState
from tqdm.auto import tqdm

from eval.generation import generate_completions
from modeling_llama4.fingerprint import prompting_fingerprint, weights_fingerprint

from .common import write_json_atomic


def images_fingerprint(images: list) -> str:
    """A short hash of a prompt's pixels: prompts of equal text differ by their images."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(repr(image.size).encode())
        digest.update(image.convert("RGB").tobytes())
    return digest.hexdigest()[:16]


def cached_samples(
    model,
    tokenizer,
    prompts: list,
    *,
    num_samples: int,
    cache_dir: str | os.PathLike,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    chunk_size: int = 128,
    seed: int = 0,
    desc: str = "sampling",
    images: list[list] | None = None,
) -> list[list[str]]:
    """`num_samples` sampled completions per prompt (`result[i][j]`), cached under `cache_dir`. With `images` (one
    list of PIL images per prompt) `tokenizer` is the processor, and the cache keys on the pixels too."""
    settings = {
        "model": weights_fingerprint(model),
        "prompting": prompting_fingerprint(tokenizer, model),  # a fixed chat template regenerates
        "num_samples": num_samples,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "chunk_size": chunk_size,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / key
    main_process = PartialState().is_main_process
    if main_process:
        write_json_atomic(folder / "settings.json", settings)
    samples: list[list[str]] = []
    starts = range(0, len(prompts), chunk_size)
    for chunk_index, start in enumerate(tqdm(starts, desc=desc, unit="chunk", disable=not main_process)):
        chunk = prompts[start : start + chunk_size]
        chunk_images = images[start : start + chunk_size] if images is not None else None
        keyed = chunk if chunk_images is None else [chunk, [images_fingerprint(row) for row in chunk_images]]
        fingerprint = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
        path = folder / f"chunk-{chunk_index:05d}-{fingerprint}.json"
        if path.is_file():
            samples.extend(json.loads(path.read_text(encoding="utf-8"))["samples"])
            continue
        outputs = generate_completions(
            model, tokenizer, chunk, max_new_tokens=max_new_tokens, num_samples=num_samples,
            temperature=temperature, batch_size=batch_size, seed=seed + 1_000_003 * chunk_index, progress=False,
            images=chunk_images,
        )  # fmt: skip
        if main_process:
            write_json_atomic(path, {"samples": outputs})
        samples.extend(outputs)
    return samples
