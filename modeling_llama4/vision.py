"""Llama 4 vision encoder pieces: unfold-conv patches, 2-D axial RoPE, pre-LN encoder, pixel shuffle.

Module names match transformers' built-in `llama4` so `vision_model.*` weights load both ways.
The encoder is small next to the MoE text model; it is the built-in's computation, written plainly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


class Llama4UnfoldConvolution(nn.Module):
    """(N, C, S, S) pixels -> (N, (S/p)^2, hidden) patch embeddings via unfold + linear (no bias)."""

    def __init__(self, config) -> None:
        super().__init__()
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        self.unfold = nn.Unfold(kernel_size=(patch, patch), stride=patch)
        self.linear = nn.Linear(config.num_channels * patch * patch, config.hidden_size, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.linear(self.unfold(pixel_values).permute(0, 2, 1))


class Llama4VisionRotaryEmbedding(nn.Module):
    """2-D axial RoPE over the patch grid plus the class token (which gets no rotation)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.freqs_ci = nn.Buffer(self._compute_freqs_ci(config), persistent=False)

    @staticmethod
    def _compute_freqs_ci(config) -> torch.Tensor:
        side = config.image_size // config.patch_size
        patch_index = torch.arange(side**2, dtype=torch.int32).reshape(side**2, 1)
        patch_index = torch.cat([patch_index, patch_index[:1]], dim=0)
        patch_index[-1, -1] = -2  # the class token, appended last
        x, y = patch_index % side, patch_index // side
        freq_dim = config.hidden_size // config.num_attention_heads // 2
        rope_freq = 1.0 / (
            config.rope_parameters["rope_theta"] ** (torch.arange(0, freq_dim, 2)[: freq_dim // 2].float() / freq_dim)
        )
        freqs_x = ((x + 1)[..., None] * rope_freq[None, None, :]).repeat_interleave(2, dim=-1)
        freqs_y = ((y + 1)[..., None] * rope_freq[None, None, :]).repeat_interleave(2, dim=-1)
        freqs = torch.cat([freqs_x, freqs_y], dim=-1).float().contiguous()[..., ::2]
        freqs = freqs.masked_fill(patch_index.reshape(-1, 1, 1) < 0, 0)
        return torch.view_as_complex(torch.stack([torch.cos(freqs), torch.sin(freqs)], dim=-1))  # (P+1, 1, D/2)

    def _apply(self, fn, recurse: bool = True) -> Llama4VisionRotaryEmbedding:
        # `.to(torch.bfloat16)` / `.half()` would cast this complex table to the real dtype, dropping its sine half
        # (the built-in has this bug). Only the device change applies to it: it stays complex64.
        table = self._buffers.pop("freqs_ci")
        try:
            super()._apply(fn, recurse)
            device = fn(torch.empty(0, device=table.device)).device
        finally:
            self._buffers["freqs_ci"] = table
        if table.is_meta and device.type != "meta":  # `to_empty` after a meta-device build: recompute the table
            table = self._compute_freqs_ci(self.config)
        self._buffers["freqs_ci"] = table.to(device)
        return self

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.freqs_ci.to(hidden_states.device)


def vision_apply_rotary_emb(
    query: torch.Tensor, key: torch.Tensor, freqs_ci: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """query/key (N, P+1, heads, D); freqs_ci (P+1, 1, D/2) broadcast over tiles and heads."""
    query_c = torch.view_as_complex(query.float().reshape(*query.shape[:-1], -1, 2))
    key_c = torch.view_as_complex(key.float().reshape(*key.shape[:-1], -1, 2))
    freqs_ci = freqs_ci.view(1, query_c.shape[1], 1, query_c.shape[-1])
    return (
        torch.view_as_real(query_c * freqs_ci).flatten(3).type_as(query),
        torch.view_as_real(key_c * freqs_ci).flatten(3).type_as(key),
    )


def vision_eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bidirectional attention; (N, heads, P, D) -> ((N, P, heads, D), (N, heads, P, P))."""
    weights = torch.matmul(query, key.transpose(2, 3)) * module.head_dim**-0.5
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.dropout(weights.softmax(dim=-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class Llama4VisionAttention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor, freqs_ci: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]  # (N, P+1)
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query, key = vision_apply_rotary_emb(query, key, freqs_ci)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, vision_eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query.transpose(1, 2),
            key.transpose(1, 2),
            value,
            None,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=None,
            is_causal=False,
        )  # (N, P+1, heads, D), (N, heads, P+1, P+1) or None
        return self.o_proj(attn_output.reshape(*input_shape, -1)), attn_weights


class Llama4VisionMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.activation_fn = nn.GELU()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class Llama4VisionEncoderLayer(GradientCheckpointingLayer):
    def __init__(self, config) -> None:
        super().__init__()
        self.self_attn = Llama4VisionAttention(config)
        self.mlp = Llama4VisionMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, freqs_ci: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), freqs_ci)[0]
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class Llama4VisionEncoder(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(Llama4VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, freqs_ci: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, freqs_ci)
        return hidden_states


def pixel_shuffle(patches: torch.Tensor, ratio: float) -> torch.Tensor:
    """(N, side^2, C) -> (N, (side*ratio)^2, C / ratio^2): merges neighbouring patches into channels."""
    batch, num_patches, _ = patches.shape
    side = int(num_patches**0.5)
    grid = patches.view(batch, side, side, -1)
    _, height, width, channels = grid.shape
    grid = grid.view(batch, height, int(width * ratio), int(channels / ratio)).permute(0, 2, 1, 3).contiguous()
    grid = grid.view(batch, int(height * ratio), int(width * ratio), int(channels / ratio**2))
    return grid.permute(0, 2, 1, 3).contiguous().view(batch, -1, grid.shape[-1])


class Llama4VisionMLP2(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.intermediate_size, config.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(config.projector_output_dim, config.projector_output_dim, bias=False)
        self.activation_fn = nn.GELU()
        self.dropout = config.projector_dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = F.dropout(self.activation_fn(self.fc1(hidden_states)), p=self.dropout, training=self.training)
        return self.activation_fn(self.fc2(hidden_states))


class Llama4VisionPixelShuffleMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.pixel_shuffle_ratio = config.pixel_shuffle_ratio
        self.mlp = Llama4VisionMLP2(config)

    def forward(self, encoded_patches: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(encoded_patches, self.pixel_shuffle_ratio))


class Llama4MultiModalProjector(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_config.vision_output_dim, config.text_config.hidden_size, bias=False)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_1(image_features)
