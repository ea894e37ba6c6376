"""Make the Auto classes and TRL build this package's sparse classes for Llama 4 checkpoints.

`import modeling_llama4` calls `register()` (set `LLAMA4_HF_NO_REGISTER=1` to opt out; `unregister()` undoes it).
A process that never imports this package is unchanged: the registration lives in transformers' in-process
Auto mappings, nothing is written to disk. Two places are covered:

- transformers' Auto classes: `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and `AutoModelForImageTextToText`
  map `model_type` "llama4_text" / "llama4" to our config and model classes (GKDTrainer, pipelines, PEFT, ...).
- TRL's `create_model_from_path`, which DPO, KTO, RLOO, GRPO and Distillation use to rebuild a reference or
  teacher from a checkpoint path: it looks `config.architectures[0]` up in the `transformers` namespace
  before any Auto class, so it would get the built-in dense-MoE class (which crashes in TRL's fused LM head).
  A wrapper picks our class for Llama 4 checkpoints. TRL takes ~2.5 s to import, so the wrapper is installed
  when `trl.trainer.utils` is imported (an import hook), or at once if it already is.

The classes stay importable by name either way: `transformers.Llama4ForCausalLM` is always the built-in.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from .configuration_llama4 import Llama4Config, Llama4TextConfig
from .modeling_llama4 import Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextModel

OPT_OUT_ENV = "LLAMA4_HF_NO_REGISTER"
LLAMA4_MODEL_TYPES = ("llama4", "llama4_text")
_TRL_UTILS = "trl.trainer.utils"

# (auto class, config class, model class) as transformers' own mappings pair the built-in ones.
_AUTO_MODELS = (
    (AutoModel, Llama4TextConfig, Llama4TextModel),
    (AutoModelForCausalLM, Llama4TextConfig, Llama4ForCausalLM),
    (AutoModelForCausalLM, Llama4Config, Llama4ForCausalLM),
    (AutoModelForImageTextToText, Llama4Config, Llama4ForConditionalGeneration),
)
_state: dict[str, Any] = {"registered": False, "original_create": None, "finder": None}


def is_registered() -> bool:
    return _state["registered"]


def llama4_class_for(config: Any) -> type | None:
    """Our class for a Llama 4 config (by `architectures[0]`, like TRL), None for any other model."""
    if getattr(config, "model_type", None) not in LLAMA4_MODEL_TYPES:
        return None
    architectures = getattr(config, "architectures", None) or []
    if architectures and architectures[0] == "Llama4ForConditionalGeneration":
        return Llama4ForConditionalGeneration
    return Llama4ForCausalLM


def _wrap_create_model_from_path(original):
    @functools.wraps(original)
    def create_model_from_path(model_id: str, architecture=None, **kwargs):
        if architecture is None:
            trust = kwargs.get("trust_remote_code", False)
            architecture = llama4_class_for(AutoConfig.from_pretrained(model_id, trust_remote_code=trust))
        return original(model_id, architecture=architecture, **kwargs)

    create_model_from_path.__llama4_hf_original__ = original
    return create_model_from_path


def _rebind_trl(old, new) -> None:
    """Point every loaded TRL module that imported `old` by name (`from .utils import ...`) at `new`."""
    for name, module in list(sys.modules.items()):
        if (name == "trl" or name.startswith("trl.")) and getattr(module, "create_model_from_path", None) is old:
            module.create_model_from_path = new


def _patch_trl(utils_module) -> None:
    current = utils_module.create_model_from_path
    if hasattr(current, "__llama4_hf_original__"):
        return
    _state["original_create"] = current
    wrapped = _wrap_create_model_from_path(current)
    utils_module.create_model_from_path = wrapped
    _rebind_trl(current, wrapped)


class _PatchTRLOnImport(importlib.abc.MetaPathFinder):
    """Installs the wrapper right after `trl.trainer.utils` executes, before the trainers import from it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRL_UTILS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            if is_registered():
                _patch_trl(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def register() -> None:
    """Map Llama 4 model types to this package's classes in the Auto classes and TRL's model loader."""
    if _state["registered"]:
        return
    AutoConfig.register("llama4_text", Llama4TextConfig, exist_ok=True)
    AutoConfig.register("llama4", Llama4Config, exist_ok=True)
    for auto_class, config_class, model_class in _AUTO_MODELS:
        # The mapping's own `register`: `AutoModelForCausalLM.register` refuses the multimodal config for the
        # text class, a pairing transformers' own mapping makes (a text model from a multimodal checkpoint).
        auto_class._model_mapping.register(config_class, model_class, exist_ok=True)
    _state["registered"] = True
    if _TRL_UTILS in sys.modules:
        _patch_trl(sys.modules[_TRL_UTILS])
    elif _state["finder"] is None:
        _state["finder"] = _PatchTRLOnImport()
        sys.meta_path.insert(0, _state["finder"])


def unregister() -> None:
    """Undo `register()`: the Auto classes and TRL give transformers' built-in Llama 4 again."""
    if not _state["registered"]:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for model_type in ("llama4_text", "llama4"):
        CONFIG_MAPPING._extra_content.pop(model_type, None)
    for auto_class, config_class, _ in _AUTO_MODELS:
        auto_class._model_mapping._extra_content.pop(config_class, None)
    if _state["finder"] is not None:
        sys.meta_path.remove(_state["finder"])
        _state["finder"] = None
    if (original := _state["original_create"]) is not None and _TRL_UTILS in sys.modules:
        utils_module = sys.modules[_TRL_UTILS]
        wrapped = utils_module.create_model_from_path
        utils_module.create_model_from_path = original
        _rebind_trl(wrapped, original)
        _state["original_create"] = None
    _state["registered"] = False


def register_unless_opted_out() -> None:
    if os.environ.get(OPT_OUT_ENV, "").strip().lower() not in ("1", "true", "yes"):
        register()


__all__ = ["OPT_OUT_ENV", "is_registered", "llama4_class_for", "register", "unregister"]
