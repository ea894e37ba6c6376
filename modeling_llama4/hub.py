"""Push a Llama 4 model to the Hub with its modeling code, tokenizer or processor, and a model card.

Not imported by the modeling files, so it does not travel as remote code itself.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.utils import validate_repo_id
from torch import nn

from .configuration_llama4 import Llama4Config, Llama4TextConfig
from .int4 import Int4Linear, Int4TextExperts
from .modeling_llama4 import Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4PreTrainedModel
from .parameters import count_parameters


def register_auto_classes() -> None:
    """Make `save_pretrained` / `push_to_hub` write `auto_map` and copy the modeling files, so that
    `AutoModel*.from_pretrained(repo, trust_remote_code=True)` builds these classes."""
    Llama4TextConfig.register_for_auto_class()
    Llama4Config.register_for_auto_class()
    Llama4ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    Llama4ForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")


def _has_peft_adapters(model: Any) -> bool:
    """A `PeftModel`, or a model with adapter layers injected (`add_adapter`, `inject_adapter_in_model`)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without PEFT installed, no model can carry its layers
        return False
    return isinstance(model, nn.Module) and any(isinstance(m, BaseTunerLayer) for m in model.modules())


def _check_model(model: Any, caller: str) -> None:
    """`model` must be one of the two classes whose code and auto-class entries the repo ships."""
    if isinstance(model, (str, Path)):
        raise TypeError(
            f"{caller}(model, ...) takes the model object, not the string {str(model)!r}: load it first, e.g. "
            "model = Llama4ForCausalLM.from_pretrained(path), and pass that model."
        )
    if _has_peft_adapters(model):
        int4 = any(isinstance(m, (Int4Linear, Int4TextExperts)) for m in model.modules())
        merge = "modeling_llama4.int4_lora.merge_int4_lora(model)" if int4 else "model.merge_and_unload()"
        raise TypeError(
            f"{caller} got a model with PEFT adapters, whose save_pretrained writes the adapter alone (no config, "
            f"no modeling code). Merge them first, merged = {merge}, and push the merged model."
        )
    if not isinstance(model, (Llama4ForCausalLM, Llama4ForConditionalGeneration)):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        kind = type(model)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        hint = (
            "Load the checkpoint with modeling_llama4's class of the same name (it reads the same weights)."
            if str(model_type).startswith("llama4")
            else "Push other models with their own model.push_to_hub(repo_id)."
        )
        raise TypeError(
            f"{caller} takes a llama4-hf Llama4ForCausalLM or Llama4ForConditionalGeneration, not "
            f"{name}{f' (model_type {model_type!r})' if model_type else ''}. {hint}"
        )


def _checked_eval_results(eval_results: Any) -> dict[str, float] | None:
    """`eval_results` as {task: float} (numpy and 0-d tensor scores become floats, which JSON can write)."""
    if eval_results is None:
        return None
    if not isinstance(eval_results, Mapping):
        raise TypeError(
            f"eval_results must be a dict of task name to score, e.g. {{'math500': 0.61}}, not "
            f"{type(eval_results).__name__}."
        )
    checked = {}
    for task, score in eval_results.items():
        if not isinstance(task, str):
            raise TypeError(f"eval_results key {task!r} is not a task name: use strings, e.g. {{'math500': 0.61}}.")
        try:  # numpy and 0-d tensor scores convert; strings must not ("0.61" would), nor bools (True is an int)
            value = None if isinstance(score, (str, bytes, bool)) else float(score)
        except (TypeError, ValueError):
            value = None
        if value is None:
            raise TypeError(
                f"eval_results[{task!r}] is {score!r} ({type(score).__name__}); eval results must be numbers, "
                "e.g. 0.61 for 61%."
            )
        checked[task] = value
    return checked


def model_card(
    model: Llama4PreTrainedModel,
    recipe: str | None = None,
    eval_results: dict[str, float] | None = None,
    base_model: str | None = None,
) -> str:
    """A README.md for the Hub: architecture summary, parameter counts, recipe and eval results when known."""
    _check_model(model, "model_card")
    eval_results = _checked_eval_results(eval_results)
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
    # Every argument is checked and the folder written before the first Hub call: a bad call or a failed save
    # must not leave an empty repo behind.
    _check_model(model, "push_to_hub")
    validate_repo_id(repo_id)  # HFValidationError (a ValueError) naming the rule a bad id breaks
    if processor is not None and not hasattr(processor, "save_pretrained"):
        raise TypeError(
            f"processor must be a tokenizer or processor object, not {type(processor).__name__}; load it with "
            "AutoTokenizer.from_pretrained(path) or AutoProcessor.from_pretrained(path)."
        )
    if recipe is not None and not isinstance(recipe, str):
        raise TypeError(f"recipe must be the model card's recipe text (a string), not {type(recipe).__name__}.")
    eval_results = _checked_eval_results(eval_results)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
        Path(folder, "README.md").write_text(model_card(model, recipe=recipe, eval_results=eval_results))
        if eval_results:
            Path(folder, "eval_results.json").write_text(json.dumps(eval_results, indent=2))
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return commit.commit_url
