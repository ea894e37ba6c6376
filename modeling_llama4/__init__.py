"""Llama 4 for the Hugging Face ecosystem, with a sparse mixture of experts."""

from .configuration_llama4 import Llama4TextConfig
from .modeling_llama4 import Llama4ForCausalLM, Llama4PreTrainedModel, Llama4TextModel
from .moe import Llama4TextExperts, Llama4TextMLP, Llama4TextMoe, grouped_matmul

__all__ = [
    "Llama4TextConfig",
    "Llama4TextModel",
    "Llama4ForCausalLM",
    "Llama4PreTrainedModel",
    "Llama4TextMoe",
    "Llama4TextExperts",
    "Llama4TextMLP",
    "grouped_matmul",
]
