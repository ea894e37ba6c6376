"""An int8 KV cache for the global (NoPE) layers, which hold nearly all of Llama 4's cache at long lengths.

Chunked layers keep one chunk (transformers' `DynamicSlidingWindowLayer`, a constant size); NoPE layers keep every
token, so at 1M tokens they are ~98% of Scout's cache. `QuantizedNoPECache` is transformers' `DynamicCache` with
those layers stored as int8 with one scale per token and head: about half the bytes of bf16, a quarter of fp32.

Why not transformers' quantized layers: `QuantizedLayer` (KIVI) needs quanto or HQQ and re-quantizes its whole
cache every `residual_length` tokens; `Fp8QuantizedLayer` freezes one per-tensor scale at the first update, so a
later token larger than the prompt's largest saturates. A scale per token and head is fixed when the token arrives,
so states are appended as they come and never re-quantized.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import BaseQuantizedLayer, DynamicCache, DynamicLayer

__all__ = ["Int8KVLayer", "QuantizedNoPECache"]


class Int8KVLayer(BaseQuantizedLayer):
    """K and V as int8 (B, kv_heads, S, D) with float32 scales (B, kv_heads, S, 1): symmetric, absmax / 127.

    Each update returns the cached states dequantized plus the new ones exact: attention over the whole sequence
    then runs in the model's dtype, one layer at a time, as with transformers' FP8 layer."""

    # float32: a float16 scale would flush the small activations of some heads to its smallest normal; at
    # head_dim 128 a 4-byte scale adds 3% to the int8 bytes.
    scale_dtype = torch.float32

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)  # self.keys: an empty tensor that records the dtype
        empty = key_states[..., :0, :]
        self._quantized_keys, self._quantized_values = self._quantize(empty), self._quantize(empty)

    def _quantize(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = tensor.abs().amax(dim=-1, keepdim=True).to(self.scale_dtype) / 127.0
        scale = scale.clamp(min=torch.finfo(self.scale_dtype).tiny)  # an all-zero vector: any scale, not zero
        quantized = torch.round(tensor.to(self.scale_dtype) / scale).clamp(-127, 127).to(torch.int8)
        return quantized, scale

    def _dequantize(self, qtensor: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        quantized, scale = qtensor
        return (quantized.float() * scale.float()).to(self.keys.dtype)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new (B, kv_heads, S_new, D) states; return all of them, (B, kv_heads, S_total, D)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self._dequantize(self._quantized_keys), key_states], dim=-2)
        values = torch.cat([self._dequantize(self._quantized_values), value_states], dim=-2)
        self._quantized_keys = self._append(self._quantized_keys, key_states)
        self._quantized_values = self._append(self._quantized_values, value_states)
        return keys, values

    def _append(self, stored: tuple[torch.Tensor, torch.Tensor], states: torch.Tensor):
        quantized, scale = self._quantize(states)
        return torch.cat([stored[0], quantized], dim=-2), torch.cat([stored[1], scale], dim=-2)

    def nbytes(self) -> int:
        """Bytes held: int8 states and their scales."""
        if not self.is_initialized:
            return 0
        return sum(
            t.numel() * t.element_size() for pair in (self._quantized_keys, self._quantized_values) for t in pair
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            beam_idx = beam_idx.to(self._quantized_keys[0].device)
            self._quantized_keys = tuple(t.index_select(0, beam_idx) for t in self._quantized_keys)
            self._quantized_values = tuple(t.index_select(0, beam_idx) for t in self._quantized_values)


class QuantizedNoPECache(DynamicCache):
    """`DynamicCache(config=...)` (a sliding window of one chunk on chunked layers) with `Int8KVLayer` on the
    layers that keep every token. Pass it as `cache=` to the model's forward or to `generate`."""

    def __init__(self, config) -> None:
        super().__init__(config=config)
        self.layers = [Int8KVLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]


def kv_cache_nbytes(cache) -> int:
    """Bytes of K and V a cache holds, quantized layers included."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes"):
            total += layer.nbytes()
        elif getattr(layer, "is_initialized", False):
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return total
