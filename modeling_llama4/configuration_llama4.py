"""Llama 4 text configuration: transformers' built-in config, plus the checks it does not make.

Subclassing the built-in keeps every field name, default and derived list (`moe_layers`,
`no_rope_layers`, `layer_types`) identical, so a `config.json` written by either side loads into the
other. The subclass adds validation with errors that name the fix, and accepts the integer
`"attn_temperature_tuning": 4` found in Meta's released Scout configs (the strict built-in refuses it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import re
from collections.abc import Iterator
from typing import Any

from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama4.configuration_llama4 import Llama4Config as _BuiltinLlama4Config
from transformers.models.llama4.configuration_llama4 import Llama4TextConfig as _BuiltinLlama4TextConfig
from transformers.models.llama4.configuration_llama4 import Llama4VisionConfig as _BuiltinLlama4VisionConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

KNOWN_ROPE_TYPES = {"default", *ROPE_INIT_FUNCTIONS}


def _refuse_other_architectures(cls: type, config_dict: dict[str, Any]) -> None:
    # transformers only warns when a config of another model type is loaded, then builds a model with
    # the wrong shapes or silently drops fields; a Llama 4 class should stop and say what it was given.
    model_type = config_dict.get("model_type")
    if model_type is not None and model_type != cls.model_type:
        raise ValueError(
            f"This config is for model_type={model_type!r} (architectures={config_dict.get('architectures')}), "
            f"not {cls.model_type!r}: {cls.__name__} cannot load it. Load it with the AutoModel class for its "
            "architecture, or point to a Llama 4 checkpoint."
        )


class Llama4TextConfig(_BuiltinLlama4TextConfig):
    r"""Configuration of the Llama 4 text model (`model_type = "llama4_text"`).

    Same fields as `transformers.Llama4TextConfig`. Extra keys are kept and written back, so a config
    with fields added by later versions of this project still loads into the built-in.
    """

    # Expert parallelism through transformers' `DistributedConfig(ep_size=...)`: experts shard along their first
    # dimension and tokens reach them by all-to-all. The built-in declares none (its experts take every token).
    base_model_ep_plan = {
        "layers.*.feed_forward.experts.gate_up_proj": "grouped_gemm",
        "layers.*.feed_forward.experts.down_proj": "grouped_gemm",
        "layers.*.feed_forward.experts": "ep_dispatch_experts",
    }

    # MetaP (modeling_llama4/metap.py): the base shape the learning rate was tuned at. Off (None) by default; set
    # all four (and optionally the dense-MLP width) to turn it on. Saved in config.json like any field.
    metap_base_hidden_size: int | None = None
    metap_base_num_hidden_layers: int | None = None
    metap_base_intermediate_size: int | None = None
    metap_base_num_local_experts: int | None = None
    metap_base_intermediate_size_mlp: int | None = None

    # The built-in's dataclass fields and defaults, so `inspect.signature` (transformers' model tester, IDEs)
    # sees every field rather than `**kwargs`.
    @functools.wraps(_BuiltinLlama4TextConfig.__init__)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        tuning = kwargs.get("attn_temperature_tuning")
        if isinstance(tuning, int) and not isinstance(tuning, bool):
            # Meta's Scout config.json ships `"attn_temperature_tuning": 4`; the reference code only tests
            # it for truth. Accept it rather than refusing the official checkpoint, and save a bool.
            logger.warning(
                f"`attn_temperature_tuning={tuning}` is an integer; reading it as {bool(tuning)} "
                "(as Meta's reference code does). Set it to true/false to silence this warning."
            )
            kwargs["attn_temperature_tuning"] = bool(tuning)
        with _readable_field_errors(type(self).__name__):
            super().__init__(*args, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Llama4TextConfig:
        _refuse_other_architectures(cls, config_dict)
        config_dict = _rederive_lists(config_dict, kwargs)
        # `from_pretrained(path, num_experts_per_tok=9)` sets such kwargs after construction: check again.
        with _readable_field_errors(cls.__name__):
            loaded = super().from_dict(config_dict, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).check_fields()
        return loaded

    def __post_init__(self, **kwargs: Any) -> None:
        # The built-in derives the layer lists from these before any check (a 0 divides by zero there).
        for name in ("interleave_moe_layer_step", "no_rope_layer_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"Invalid {type(self).__name__}: {name}={getattr(self, name)} must be positive. Every n-th layer "
                    f"is MoE / NoPE: 1 (Scout) or 2 (Maverick) for interleave_moe_layer_step, 4 for no_rope_layer_interval."
                )
        fields = [field.name for field in dataclasses.fields(self)]
        for key in kwargs:
            # Unknown keys are kept (configs from later versions load), but a near-miss is most likely a typo that
            # would otherwise leave the field at its Scout-sized default.
            if key not in fields and (close := difflib.get_close_matches(key, fields, n=1, cutoff=0.85)):
                logger.warning(
                    f"{type(self).__name__} got {key!r}, which is not one of its fields: did you mean {close[0]!r}? "
                    f"It is kept as an extra attribute and {close[0]} stays {getattr(self, close[0])!r}."
                )
        super().__post_init__(**kwargs)
        self.check_fields()

    def check_fields(self) -> None:
        """Raise a `ValueError` naming the field and the fix for a config the model cannot run.

        Checks only what breaks the model: with an explicit `head_dim` (the built-in default 128), the heads
        need not divide `hidden_size`. Runs on construction, after `from_pretrained`'s keyword overrides,
        and when a model is built (so a field changed after construction is caught too)."""

        def fail(problem: str, fix: str) -> None:
            raise ValueError(f"Invalid {type(self).__name__}: {problem}. {fix}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim"):
            if getattr(self, name) <= 0:
                fail(f"{name}={getattr(self, name)} must be positive", f"Set {name} to a positive integer.")
        if self.head_dim % 2:
            fail(
                f"head_dim={self.head_dim} is odd",
                "RoPE rotates pairs of channels: use an even head_dim (128 in the released models).",
            )
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads != 0:
            fail(
                f"num_key_value_heads={self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}",
                "Grouped-query attention needs the query heads to split evenly over the key/value heads.",
            )
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            fail(
                f"num_experts_per_tok={self.num_experts_per_tok} is outside 1..num_local_experts="
                f"{self.num_local_experts}",
                "Route each token to at least one and at most num_local_experts experts.",
            )
        if self.attention_chunk_size is not None and self.attention_chunk_size <= 0:
            fail(
                f"attention_chunk_size={self.attention_chunk_size} must be positive",
                "Use a positive chunk (8192 in the released models) or null for global attention everywhere.",
            )
        bad_moe = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        if bad_moe:
            fail(
                f"moe_layers {bad_moe} are out of range for num_hidden_layers={self.num_hidden_layers}",
                f"MoE layer indices must lie in 0..{self.num_hidden_layers - 1}.",
            )
        if len(self.no_rope_layers) < self.num_hidden_layers:
            fail(
                f"no_rope_layers has {len(self.no_rope_layers)} entries for {self.num_hidden_layers} layers",
                "Give one 0/1 flag per layer (1 = RoPE, 0 = NoPE), or leave it unset.",
            )
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type not in KNOWN_ROPE_TYPES:
            fail(
                f"unknown rope_type {rope_type!r}",
                f"Use one of {sorted(KNOWN_ROPE_TYPES)} (Scout uses 'llama3').",
            )
        if self.floor_scale <= 0:
            fail(f"floor_scale={self.floor_scale} must be positive", "The released models use 8192.")
        if self.rms_norm_eps <= 0:
            fail(f"rms_norm_eps={self.rms_norm_eps} must be positive", "The released models use 1e-5.")
        if self.hidden_act not in ACT2FN:
            fail(f"unknown hidden_act {self.hidden_act!r}", "The released models use 'silu'.")
        if self.attention_chunk_size is None and "chunked_attention" in (self.layer_types or []):
            fail(
                "layer_types has chunked_attention layers but attention_chunk_size is null",
                "Give a chunk size, or drop layer_types (it is then derived: all layers global without a chunk).",
            )
        unusable = sorted(set(self.layer_types or []) - {"full_attention", "chunked_attention"})
        if unusable:
            fail(
                f"layer_types has {unusable}",
                "Llama 4 layers attend globally ('full_attention', the NoPE layers) or within chunks "
                "('chunked_attention'); leave layer_types unset to derive it from no_rope_layers.",
            )
        if self.pad_token_id is not None and not -self.vocab_size <= self.pad_token_id < self.vocab_size:
            fail(
                f"pad_token_id={self.pad_token_id} is outside the vocabulary (vocab_size={self.vocab_size})",
                "Use a token id below vocab_size, or null.",
            )

    @property
    def num_experts(self) -> int:
        """Alias of `num_local_experts`, the name TRL and other MoE code read."""
        return self.num_local_experts


# Lists config.json stores but the built-in derives from other fields; changing a source field alone (an override,
# `from_pretrained(path, interleave_moe_layer_step=2)`) would leave the stored list in charge, silently.
_DERIVED_LISTS = {
    "interleave_moe_layer_step": ("moe_layers",),
    "no_rope_layer_interval": ("no_rope_layers", "layer_types"),
    "attention_chunk_size": ("layer_types",),
    "num_hidden_layers": ("moe_layers", "no_rope_layers", "layer_types"),
}


def _rederive_lists(config_dict: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`config_dict` with the changed source fields (and any lists the overrides give with them) in it and the other
    lists derived from them dropped, so the built-in's `__post_init__` derives those again, consistently."""
    changed = {name for name in _DERIVED_LISTS if name in overrides and overrides[name] != config_dict.get(name)}
    if not changed:
        return config_dict
    affected = {derived for name in changed for derived in _DERIVED_LISTS[name]}
    kept = {key: value for key, value in config_dict.items() if key not in affected}
    return {**kept, **{name: overrides[name] for name in changed | (affected & set(overrides))}}


@contextlib.contextmanager
def _readable_field_errors(config_name: str) -> Iterator[None]:
    """Turn the strict dataclass' type error (a multi-line dump) into one naming the field and the fix."""
    try:
        yield
    except StrictDataclassFieldValidationError as error:
        field = re.search(r"field '([^']+)'", str(error))
        name = field.group(1) if field else "?"
        raise ValueError(
            f"Invalid {config_name}: {name}: {error.__cause__}. Give {name} a value of the type it expects, in "
            f'config.json or as a keyword argument (a number is written without quotes, e.g. "hidden_size": 64).'
        ) from error
    except StrictDataclassClassValidationError as error:  # a multi-line dump around the validator's own message
        raise ValueError(f"Invalid {config_name}: {error.__cause__ or error}") from error
    except KeyError as error:  # transformers' RoPE validator: a key the rope_type needs is missing
        if "rope_parameters" not in str(error):
            raise
        raise ValueError(
            f"Invalid {config_name}: {error.args[0]}. Scout's are {{'rope_type': 'llama3', 'rope_theta': 500000.0, "
            "'factor': 16.0, 'low_freq_factor': 1.0, 'high_freq_factor': 1.0, 'original_max_position_embeddings': "
            "8192}."
        ) from error


class Llama4VisionConfig(_BuiltinLlama4VisionConfig):
    r"""Configuration of the Llama 4 vision encoder (`model_type = "llama4_vision_model"`), the built-in's fields.

    Adds the shape checks the built-in leaves to a matmul error deep in the forward pass. They run when a
    model is built (`check_shapes`), not on construction: transformers instantiates the default config
    (whose built-in defaults do not chain) to diff sub-configs when saving."""

    def check_shapes(self) -> None:
        def fail(problem: str, fix: str) -> None:
            raise ValueError(f"Invalid Llama4VisionConfig: {problem}. {fix}")

        if self.hidden_size % self.num_attention_heads != 0:
            fail(
                f"num_attention_heads={self.num_attention_heads} does not divide hidden_size={self.hidden_size}",
                "Choose a head count that divides the width (1408 / 16 in the released models).",
            )
        if self.image_size % self.patch_size != 0:
            fail(
                f"patch_size={self.patch_size} does not divide image_size={self.image_size}",
                "The released models use 336-pixel tiles and 14-pixel patches.",
            )
        side = self.image_size // self.patch_size
        if (side * self.pixel_shuffle_ratio) % 1 != 0:
            fail(
                f"pixel_shuffle_ratio={self.pixel_shuffle_ratio} does not evenly shrink the {side}x{side} patch grid",
                "Use a grid side divisible by 1/ratio (24 patches a side with ratio 0.5 in the released models).",
            )
        shuffled = self.hidden_size / self.pixel_shuffle_ratio**2
        if shuffled != self.intermediate_size:
            fail(
                f"pixel shuffle makes {shuffled:g} channels but the adapter's fc1 expects intermediate_size="
                f"{self.intermediate_size}",
                "Set intermediate_size = hidden_size / pixel_shuffle_ratio**2 (1408 * 4 = 5632 in the released models).",
            )
        if not self.projector_input_dim == self.projector_output_dim == self.vision_output_dim:
            fail(
                f"projector_input_dim={self.projector_input_dim}, projector_output_dim={self.projector_output_dim} "
                f"and vision_output_dim={self.vision_output_dim} differ",
                "The adapter chains them, so they must be equal (4096 in the released models).",
            )


class Llama4Config(_BuiltinLlama4Config):
    r"""Configuration of the multimodal Llama 4 (`model_type = "llama4"`): a text and a vision sub-config.

    Same fields as `transformers.Llama4Config`; its sub-configs are this package's validated classes."""

    sub_configs_defaults = {"text_config": Llama4TextConfig, "vision_config": Llama4VisionConfig}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Llama4Config:
        _refuse_other_architectures(cls, config_dict)
        return super().from_dict(config_dict, **kwargs)


__all__ = ["Llama4Config", "Llama4TextConfig", "Llama4VisionConfig"]
