"""Llama 4 for the Hugging Face ecosystem, with a sparse mixture of experts."""

from .configuration_llama4 import Llama4Config, Llama4TextConfig, Llama4VisionConfig
from .hub import model_card, push_to_hub, register_auto_classes
from .int4 import Int4Config, dequantize_model, quantize_model
from .metap import RULES as METAP_RULES
from .metap import metap_group, metap_param_groups, metap_shape
from .modeling_llama4 import (
    Llama4ForCausalLM,
    Llama4ForConditionalGeneration,
    Llama4PreTrainedModel,
    Llama4TextModel,
    Llama4VisionModel,
)
from .moe import Llama4TextExperts, Llama4TextMLP, Llama4TextMoe, grouped_matmul
from .parameters import ParameterCounts, count_parameters
from .registration import is_registered, register, register_unless_opted_out, unregister

__all__ = [
    "Int4Config",
    "quantize_model",
    "dequantize_model",
    "Llama4Config",
    "Llama4VisionConfig",
    "Llama4VisionModel",
    "Llama4ForConditionalGeneration",
    "Llama4TextConfig",
    "Llama4TextModel",
    "Llama4ForCausalLM",
    "Llama4PreTrainedModel",
    "Llama4TextMoe",
    "Llama4TextExperts",
    "Llama4TextMLP",
    "grouped_matmul",
    "count_parameters",
    "model_card",
    "push_to_hub",
    "register_auto_classes",
    "ParameterCounts",
    "METAP_RULES",
    "metap_group",
    "metap_param_groups",
    "metap_shape",
    "is_registered",
    "register",
    "register_unless_opted_out",
    "unregister",
]

# save_pretrained / push_to_hub write `auto_map` and ship the modeling files (trust_remote_code pulls).
register_auto_classes()
# AutoModel* and TRL's reference/teacher loader build these sparse classes for Llama 4 checkpoints
# (LLAMA4_HF_NO_REGISTER=1 opts out; `unregister()` undoes it). See registration.py.
register_unless_opted_out()
