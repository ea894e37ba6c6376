"""Loading a causal LM by path or Hub id, once for the whole project: `python -m eval`, the recipes and the
codistillation teachers all load through `load_causal_lm`.

It lives in `eval/` because the recipes may import `eval/` but not the other way round, and `modeling_llama4/`
stays the model alone (it ships as Hub remote code, where a CLI loader has no place).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "InputError",
    "check_model_path",
    "load_causal_lm",
    "load_multimodal",
    "load_processor",
    "load_tokenizer",
    "torch_dtype",
]

LLAMA4_MODEL_TYPES = ("llama4", "llama4_text")
HUB_ID_HINT = "a Hub id looks like org/name (e.g. meta-llama/Llama-4-Scout-17B-16E-Instruct)"


class InputError(ValueError):
    """A mistake in what the user passed (a path, a flag, a data file). The message names the offending value and
    the fix; command-line entry points print it without a traceback."""


def check_model_path(path: str | os.PathLike, flag: str = "--model_name_or_path", *, need_config: bool = True) -> None:
    """Refuse a local path that does not exist (or holds no `config.json`) before huggingface_hub takes it for a
    malformed repo id. A string in Hub-id form that is not a local directory passes: the Hub decides."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = str(path)
    local = Path(text).expanduser()
    if local.is_dir():
        if need_config and (base := adapter_base(local, flag)) is not None:
            check_model_path(base, f"{flag} {text!r}: its adapter's base_model_name_or_path")
            return
        if need_config and not (local / "config.json").is_file():
            raise InputError(
                f"{flag} {text!r} is a directory without config.json: give the directory a model was saved to "
                "(save_pretrained writes config.json beside the weights)"
            )
        return
    if local.exists():
        raise InputError(
            f"{flag} {text!r} is a file, not a model directory: give the directory that holds config.json, or "
            f"{HUB_ID_HINT}"
        )
    try:
        validate_repo_id(text)
        hub_form = not text.startswith((".", "/", "~")) and text.count("/") <= 1
    except HFValidationError:
        hub_form = False
    if not hub_form:
        raise InputError(f"{flag}: no such directory {text!r}; {HUB_ID_HINT}")


def adapter_base(path: str | os.PathLike, flag: str = "--model_name_or_path") -> str | None:
    """The base model of a PEFT adapter directory (`adapter_config.json` and no `config.json`, what a recipe run
    with `--use_peft` saves), else None."""
    local = Path(str(path)).expanduser()
    if not (local / "adapter_config.json").is_file() or (local / "config.json").is_file():
        return None
    try:
        base = json.loads((local / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    if not isinstance(base, str) or not base:
        raise InputError(
            f"{flag} {str(path)!r} holds a PEFT adapter whose adapter_config.json names no base_model_name_or_path: "
            "add the base model's path there, or merge the adapter into its base (merge_and_unload) and give that"
        )
    return base


def _merged_adapter(path: str, base: str, flag: str, **load_kwargs: Any):
    """The base model with the adapter at `path` merged in: for an adapter trained on int4 experts (the run's
    manifest says `load_in_int4`), merged into the dequantized int4 base it was trained on, as `merge_int4_lora`."""
    from peft import PeftModel

    from modeling_llama4 import Int4Config, quantize_model

    requested = load_kwargs.pop("quantization_config", None)  # for the merged model (e.g. QLoRA on an SFT adapter)
    manifest = Path(path).expanduser() / "run_manifest.json"
    settings = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else {}
    if settings.get("load_in_int4"):
        from modeling_llama4.int4_lora import load_int4_adapter, merge_int4_lora

        int4 = Int4Config(group_size=settings.get("int4_group_size", 128))
        model = load_causal_lm(base, flag=f"{flag} (adapter base)", quantization_config=int4, **load_kwargs)
        merged = merge_int4_lora(load_int4_adapter(model, path), dtype=model.lm_head.weight.dtype)
    else:
        model = load_causal_lm(base, flag=f"{flag} (adapter base)", **load_kwargs)
        merged = PeftModel.from_pretrained(model, path).merge_and_unload()
    print(f"{flag} {path}: a LoRA adapter on {base}, merged into it")
    return quantize_model(merged, requested) if requested is not None else merged


def check_has_weights(path: str | os.PathLike, flag: str = "--model_name_or_path", fix: str | None = None) -> None:
    """Refuse a local model directory that holds a config but no weights (a config directory such as
    hub_configs/tiny, or a run that never saved), which transformers reports as a missing file."""
    local = Path(str(path)).expanduser()
    if not local.is_dir() or any(any(local.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.index.json")):
        return
    fix = fix or "give the directory a trained model was saved to (e.g. by recipes/pretrain.py)"
    raise InputError(f"{flag} {str(path)!r} holds a config.json but no weights (no model.safetensors): {fix}")


def torch_dtype(dtype: Any) -> Any:
    """None and "auto" as they are (transformers' default, the checkpoint's own), "bfloat16" -> torch.bfloat16, a
    torch.dtype as is."""
    import torch

    if dtype in (None, "auto"):
        return dtype
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise InputError(f"unknown dtype {dtype!r}: use auto, bfloat16, float16 or float32")
    return value


def _check_overrides(overrides: dict[str, Any], config: Any, flag: str) -> None:
    # `to_dict` leaves out fields still at None (the `metap_base_*` ones): the dataclass fields name them all.
    known = set(config.to_dict()) | {field.name for field in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        hints = {key: difflib.get_close_matches(key, known, n=1) for key in unknown}
        said = ", ".join(f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") for key, hint in hints.items())
        raise InputError(f"{flag}: {config.model_type} configs have no field {said}")


def _llama4_config(path: str, overrides: dict[str, Any], flag: str, overrides_flag: str):
    """The text config with `overrides`, built (and so checked) by the config class before any weights load; its
    complaint names the flag and the value."""
    from huggingface_hub.errors import StrictDataclassError

    from modeling_llama4 import Llama4TextConfig

    try:
        return Llama4TextConfig.from_pretrained(path, **overrides)
    except (ValueError, TypeError, StrictDataclassError) as error:
        given = f" with {overrides_flag} {overrides}" if overrides else ""
        message = " ".join(str(error).split())
        raise InputError(f"{flag} {path!r}{given}: the config is invalid: {message}") from None


def _load_config(path: str, flag: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as error:
        if Path(path).expanduser().is_dir():
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"{flag} {path!r}: no local directory of that name, and it could not be loaded as a Hub id ({first}). "
            "Check the spelling of the path; a Hub model needs network access or a cached copy."
        ) from error


def load_causal_lm(
    path: str,
    *,
    flag: str = "--model_name_or_path",
    dtype: Any = None,
    trust_remote_code: bool = False,
    config_overrides: dict[str, Any] | None = None,
    overrides_flag: str = "--model_config_overrides",
    from_scratch: bool = False,
    **kwargs: Any,
):
    """Our `Llama4ForCausalLM` for any Llama 4 checkpoint (ours, transformers' or an official multimodal one: its
    text half), built freshly initialised from the config when `from_scratch`; any other causal LM through
    `AutoModelForCausalLM`. `config_overrides` go through the config class (its checks apply); `kwargs` (e.g.
    `device_map`, `attn_implementation`) go to `from_pretrained`. `flag` and `overrides_flag` name the arguments in
    error messages."""
    from transformers import AutoModelForCausalLM

    from modeling_llama4 import Llama4ForCausalLM

    check_model_path(path, flag)
    if not from_scratch and (base := adapter_base(path, flag)) is not None:
        load_kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, config_overrides=config_overrides)
        return _merged_adapter(str(path), base, flag, overrides_flag=overrides_flag, **load_kwargs, **kwargs)
    overrides = dict(config_overrides or {})
    dtype = torch_dtype(dtype)
    config = _load_config(path, flag, trust_remote_code)
    is_llama4 = getattr(config, "model_type", None) in LLAMA4_MODEL_TYPES
    if overrides:
        _check_overrides(overrides, config.get_text_config() if is_llama4 else config, overrides_flag)
    if from_scratch and not is_llama4:
        raise InputError(f"{flag} {path!r} is a {config.model_type} config; from_scratch builds Llama 4 only")
    if is_llama4:
        text_config = _llama4_config(path, overrides, flag, overrides_flag)
    if from_scratch:
        model = Llama4ForCausalLM(text_config)
        return model.to(dtype) if dtype not in (None, "auto") else model
    check_has_weights(path, flag)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if is_llama4:
        return Llama4ForCausalLM.from_pretrained(path, **overrides, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **overrides, **kwargs)


def load_tokenizer(
    path: str, flag: str = "--tokenizer_name_or_path", *, trust_remote_code: bool = False, pad_with_eos: bool = True
):
    """The tokenizer saved at `path`; with `pad_with_eos`, EOS becomes the pad token where it has none (the
    trainers pad batches)."""
    from transformers import AutoTokenizer

    check_model_path(path, flag, need_config=False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if pad_with_eos and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_processor(path: str, flag: str = "--model_name_or_path"):
    """transformers' `Llama4Processor` saved at `path` (tokenizer, image processor, chat template). Its image
    processor needs torchvision; without it this is one `InputError` saying how to get it."""
    from transformers import AutoProcessor

    check_model_path(path, flag, need_config=False)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise InputError(
            f"{flag} {path!r}: image prompts need transformers' Llama4Processor, whose image processor needs "
            "torchvision, which is not installed. PyPI's torchvision runs beside a CUDA torch build (also on CPU): "
            "use a second environment, `pip install torch==2.14.1 torchvision==0.29.1` then this project "
            "(docs/multimodal.md)"
        ) from None
    processor = AutoProcessor.from_pretrained(path)
    if not hasattr(processor, "image_processor"):
        raise InputError(
            f"{flag} {path!r} has a tokenizer but no image processor (processor_config.json): image prompts need "
            "the processor saved with a multimodal model, e.g. hub_configs/tiny"
        )
    return processor


def load_multimodal(
    path: str,
    *,
    flag: str = "--model_name_or_path",
    dtype: Any = None,
    config_overrides: dict[str, Any] | None = None,
    overrides_flag: str = "--model_config_overrides",
    from_scratch: bool = False,
    **kwargs: Any,
):
    """Our `Llama4ForConditionalGeneration` (vision tower, projector and sparse-MoE text model) and its processor,
    built freshly initialised when `from_scratch`. `config_overrides` apply to the text model (as for
    `load_causal_lm`); `kwargs` go to `from_pretrained`."""
    from modeling_llama4 import Llama4Config, Llama4ForConditionalGeneration

    check_model_path(path, flag)
    config = _load_config(path, flag, False)
    if getattr(config, "model_type", None) != "llama4" or getattr(config, "vision_config", None) is None:
        raise InputError(
            f"{flag} {path!r} is a {getattr(config, 'model_type', '?')} config without a vision tower: image "
            "training and the visual task need a multimodal Llama 4 (Llama4ForConditionalGeneration), e.g. "
            "hub_configs/tiny"
        )
    processor = load_processor(path, flag)
    overrides = dict(config_overrides or {})
    config = Llama4Config.from_pretrained(path)
    if overrides:
        _check_overrides(overrides, config.text_config, overrides_flag)
        text_config = _llama4_config(path, overrides, flag, overrides_flag)
        config.text_config = text_config
    dtype = torch_dtype(dtype)
    if from_scratch:
        model = Llama4ForConditionalGeneration(config)
        return (model.to(dtype) if dtype not in (None, "auto") else model), processor
    check_has_weights(path, flag)
    if dtype is not None:
        kwargs["dtype"] = dtype
    return Llama4ForConditionalGeneration.from_pretrained(path, config=config, **kwargs), processor
