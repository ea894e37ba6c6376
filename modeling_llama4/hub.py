"""Push a Llama 4 model to the Hub with its modeling code, tokenizer or processor, and a model card.

Not imported by the modeling files, so it does not travel as remote code itself.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

from .configuration_llama4 import Llama4Config, Llama4TextConfig
from .modeling_llama4 import Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4PreTrainedModel
from .parameters import count_parameters


def register_auto_classes() -> None:
    """Make `save_pretrained` / `push_to_hub` write `auto_map` and copy the modeling files, so that
    `AutoModel*.from_pretrained(repo, trust_remote_code=True)` builds these classes."""
    Llama4TextConfig.register_for_auto_class()
    Llama4Config.register_for_auto_class()
    Llama4ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    Llama4ForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")


def model_card(
    model: Llama4PreTrainedModel,
    recipe: str | None = None,
    eval_results: dict[str, float] | None = None,
    base_model: str | None = None,
) -> str:
    """A README.md for the Hub: architecture summary, parameter counts, recipe and eval results when known."""
    text = model.config.get_text_config()
    counts = count_parameters(model)
    pipeline = "image-text-to-text" if isinstance(model, Llama4ForConditionalGeneration) else "text-generation"
    header = ["---", "library_name: transformers", f"pipeline_tag: {pipeline}", "tags:", "- llama4", "- moe"]
    header += [f"base_model: {base_model}"] if base_model else []
    header += ["---", ""]
    moe_every = (
        "every layer" if text.interleave_moe_layer_step == 1 else f"every {text.interleave_moe_layer_step} layers"
    )
    nope = text.no_rope_layers.count(0)
    lines = [
        "# Llama 4 (llama4-hf)",
        "",
        "Saved with llama4-hf: transformers' `llama4` weight layout with a",
        "sparse mixture of experts. Load it with either implementation:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True)  # llama4-hf classes",
        "model = AutoModelForCausalLM.from_pretrained(repo_id)  # transformers' built-in Llama 4",
        "```",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {counts} |",
        f"| layers | {text.num_hidden_layers} (hidden {text.hidden_size}, {text.num_attention_heads} heads, "
        f"{text.num_key_value_heads} KV heads) |",
        f"| mixture of experts | {text.num_local_experts} routed experts, top-{text.num_experts_per_tok}, "
        f"shared expert, MoE {moe_every} |",
        f"| attention | chunked local (chunk {text.attention_chunk_size}) on RoPE layers, global on {nope} NoPE "
        f"layers, QK norm {'on' if text.use_qk_norm else 'off'} |",
        f"| vocabulary | {text.vocab_size} |",
    ]
    if isinstance(model, Llama4ForConditionalGeneration):
        vision = model.config.vision_config
        lines.append(
            f"| vision | early fusion, {vision.num_hidden_layers}-layer encoder, {vision.image_size}px tiles |"
        )
    if recipe:
        lines += ["", "## Training recipe", "", recipe]
    if eval_results:
        lines += ["", "## Evaluation", "", "| task | score |", "|---|---|"]
        lines += [f"| {task} | {score:.4g} |" for task, score in eval_results.items()]
    return "\n".join(header + lines) + "\n"


def push_to_hub(
    model: Llama4PreTrainedModel,
    repo_id: str,
    processor: Any | None = None,
    recipe: str | None = None,
    eval_results: dict[str, float] | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload Llama 4 (llama4-hf)",
) -> str:
    """Upload weights (safetensors), config with `auto_map`, the modeling files, the tokenizer or processor,
    and a model card, in ONE commit: a pull never sees a half-uploaded repo. Returns the commit url.
    The auto-class registration that ships the code happens when `modeling_llama4` is imported."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
        Path(folder, "README.md").write_text(model_card(model, recipe=recipe, eval_results=eval_results))
        if eval_results:
            Path(folder, "eval_results.json").write_text(json.dumps(eval_results, indent=2))
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return commit.commit_url
