"""Llama 4 text model: iRoPE attention over a sparse mixture of experts.

Module and parameter names match transformers' built-in `llama4`, so checkpoints load both ways.
What differs from the built-in:
- the MoE computes only the routed experts (see `moe.py`);
- attention temperature tuning reads the true token positions (`position_ids`), so it stays right
  under left padding and packed sequences (the built-in uses the cache length);
- unpadded sequences longer than a chunk run each chunk of a chunked layer as its own batch row
  (S x C attention, no S x S mask);
- the config validates itself and accepts Meta's `"attn_temperature_tuning": 4`;
- `Llama4ForConditionalGeneration` exposes its backbone (`model` / `base_model`), which TRL needs.
Other masks (chunked local / global causal) and the KV cache (one chunk on chunked layers, everything on
NoPE layers) are transformers' own `create_chunked_causal_mask`, `create_causal_mask` and `DynamicCache`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import CompileConfig, GenerationMixin
from transformers.masking_utils import create_causal_mask, create_chunked_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_llama4 import Llama4Config, Llama4TextConfig, Llama4VisionConfig
from .int4 import check_quantization_request  # also registers the int4 quantizer (remote code included)
from .metap import metap_enabled, metap_init_module, metap_param_groups  # noqa: F401 (public re-export)
from .moe import (
    Llama4Router,
    Llama4TextExperts,
    Llama4TextMLP,
    Llama4TextMoe,
    router_load_balancing_loss,
    router_z_loss,
)
from .vision import (
    Llama4MultiModalProjector,
    Llama4UnfoldConvolution,
    Llama4VisionAttention,
    Llama4VisionEncoder,
    Llama4VisionEncoderLayer,
    Llama4VisionPixelShuffleMLP,
    Llama4VisionRotaryEmbedding,
)


class Llama4TextRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        return (x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Llama4TextL2Norm(nn.Module):
    """Weightless RMS norm for QK norm, in float32."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        return (x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class Llama4TextRotaryEmbedding(nn.Module):
    """Complex RoPE frequencies: position_ids (B, S) -> freqs_cis (B, S, head_dim / 2), complex64."""

    def __init__(self, config: Llama4TextConfig) -> None:
        super().__init__()
        self.config = config
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: Llama4TextConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        return torch.polar(torch.ones_like(freqs), freqs) * self.attention_scaling


def apply_rotary_emb(
    query: torch.Tensor, key: torch.Tensor, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate adjacent pairs (GPT-J style, not rotate_half). query/key (B, S, heads, D); freqs_cis (B, S, D/2)."""
    query_c = torch.view_as_complex(query.float().reshape(*query.shape[:-1], -1, 2))
    key_c = torch.view_as_complex(key.float().reshape(*key.shape[:-1], -1, 2))
    freqs_cis = freqs_cis[:, :, None, :]
    query_out = torch.view_as_real(query_c * freqs_cis).flatten(3)
    key_out = torch.view_as_real(key_c * freqs_cis).flatten(3)
    return query_out.type_as(query), key_out.type_as(key)


def attention_temperature(position_ids: torch.Tensor, floor_scale: int, attn_scale: float) -> torch.Tensor:
    """Inference-time temperature of NoPE layers: (B, S) positions -> (B, S) query scales."""
    return torch.log1p(torch.floor((position_ids.float() + 1.0) / floor_scale)) * attn_scale + 1.0


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv_heads, S, D) -> (B, kv_heads * n_rep, S, D)."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq_len, head_dim = hidden_states.shape
    expanded = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq_len, head_dim)
    return expanded.reshape(batch, kv_heads * n_rep, seq_len, head_dim)


def split_into_chunks(states: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(B, heads, S, D) -> (B * ceil(S / C), heads, C, D), zero-padding the last chunk at its end."""
    batch, heads, seq_len, head_dim = states.shape
    num_chunks = -(-seq_len // chunk_size)
    states = nn.functional.pad(states, (0, 0, 0, num_chunks * chunk_size - seq_len))
    states = states.view(batch, heads, num_chunks, chunk_size, head_dim).transpose(1, 2)
    return states.reshape(batch * num_chunks, heads, chunk_size, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query (B, heads, S, D), key/value (B, kv_heads, L, D) -> ((B, S, heads, D), (B, heads, S, L)).

    Like the built-in, the softmax runs in the input dtype (Llama 4 does not upcast it)."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.dropout(weights.softmax(dim=-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


# One query per row (decode) over at most this many keys runs as grouped matmuls on CPU: there torch's SDPA kernel
# took 2x as long at batch 256 over 145 keys (2.7 vs 1.4 ms) and was no faster from ~1k keys on (docs/benchmarks.md).
ONE_QUERY_MAX_KEYS = 512


def one_query_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """query (B, heads, 1, D), key/value (B, kv_heads, L, D) -> (B, 1, heads, D). The heads sharing a key/value
    head are the rows of one matmul; the softmax runs in float32, as in SDPA's CPU kernel."""
    batch, heads, _, head_dim = query.shape
    grouped = query.view(batch, key.shape[1], heads // key.shape[1], head_dim)  # (B, kv_heads, G, D)
    weights = torch.matmul(grouped, key.transpose(2, 3)).float() * scaling  # (B, kv_heads, G, L)
    if attention_mask is not None:  # (B or 1, 1, 1, L): True where attended, or additive
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, float("-inf"))
        else:
            weights = weights + attention_mask
    output = torch.matmul(weights.softmax(dim=-1).to(value.dtype), value)  # (B, kv_heads, G, D)
    return output.view(batch, 1, heads, head_dim)


class Llama4TextAttention(nn.Module):
    def __init__(self, config: Llama4TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.use_rope = bool(config.no_rope_layers[layer_idx])  # 0 marks a NoPE layer
        self.is_chunked = config.layer_types[layer_idx] == "chunked_attention"
        self.attn_temperature_tuning = config.attn_temperature_tuning and not self.use_rope
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, config.attention_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, config.attention_bias)
        if config.use_qk_norm and self.use_rope:
            self.qk_norm = Llama4TextL2Norm(config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        attend_by_chunks: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]  # (B, S)
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape)  # (B, S, heads, D)
        key = self.k_proj(hidden_states).view(hidden_shape)  # (B, S, kv_heads, D)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, kv_heads, S, D)

        if self.use_rope:
            query, key = apply_rotary_emb(query, key, position_embeddings.to(query.device))
            if hasattr(self, "qk_norm"):  # after RoPE, RoPE layers only (Scout; Maverick has none)
                query, key = self.qk_norm(query), self.qk_norm(key)
        elif self.attn_temperature_tuning:
            scales = attention_temperature(position_ids, self.config.floor_scale, self.config.attn_scale)
            query = (query * scales[..., None, None]).to(query.dtype)

        query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, heads, S, D), (B, kv_heads, S, D)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        chunked_batch = attend_by_chunks and self.is_chunked
        if chunked_batch:
            # Each chunk attends only within itself, so run chunks as separate batch rows: attention
            # costs S*C instead of S*S and no S x S mask is built (the built-in masks a full S x S).
            chunk = self.config.attention_chunk_size
            query, key, value = (split_into_chunks(states, chunk) for states in (query, key, value))

        if (
            query.shape[2] == 1
            and key.shape[2] <= ONE_QUERY_MAX_KEYS
            and query.device.type == "cpu"
            and self.config._attn_implementation == "sdpa"
            and not (self.training and self.config.attention_dropout)
        ):
            attn_output = one_query_attention(query, key, value, attention_mask, self.scaling)  # (B, 1, heads, D)
            return self.o_proj(attn_output.reshape(*input_shape, -1)), None
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )  # (B or B * chunks, S or C, heads, D)
        if chunked_batch:
            attn_output = attn_output.reshape(input_shape[0], -1, *attn_output.shape[2:])[:, : input_shape[1]]
        return self.o_proj(attn_output.reshape(*input_shape, -1)), attn_weights


class Llama4TextDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: Llama4TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Llama4TextAttention(config, layer_idx)
        self.is_moe_layer = layer_idx in config.moe_layers
        if self.is_moe_layer:
            self.feed_forward = Llama4TextMoe(config)
        else:
            self.feed_forward = Llama4TextMLP(config, intermediate_size=config.intermediate_size_mlp)
        self.input_layernorm = Llama4TextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Llama4TextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        position_embeddings: torch.Tensor,
        cache: Cache | None = None,
        attend_by_chunks: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        attn_out, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=cache,
            attend_by_chunks=attend_by_chunks,
            **kwargs,
        )
        hidden_states = hidden_states + attn_out
        ff_out = self.feed_forward(self.post_attention_layernorm(hidden_states))
        if self.is_moe_layer:
            ff_out, _ = ff_out
        return hidden_states + ff_out.view(hidden_states.shape)


def _unreadable_safetensors(name_or_path: str | Path, kwargs: dict) -> list[str]:
    """Names of the local or cached safetensors files of a checkpoint whose header cannot be read."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        try:
            cache_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir") if kwargs.get(k) is not None}
            folder = Path(snapshot_download(str(name_or_path), local_files_only=True, **cache_kwargs))
        except Exception:  # nothing cached to inspect: the caller's message stands alone
            return []
    broken = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception:
            broken.append(path.name)
    return broken


# Config fields whose value sets a weight dimension, in the order a mismatch is explained by them.
_SHAPE_FIELDS = (
    "num_local_experts",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "intermediate_size_mlp",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


def _shape_mismatch_message(
    model: PreTrainedModel, source: str, mismatched: set[tuple[str, tuple[int, ...], tuple[int, ...]]]
) -> str:
    """Say which config field makes the model's weights a different shape from the checkpoint's, and the fix."""
    text = model.config.get_text_config()
    config_file = Path(source) / "config.json"
    written = set()
    if config_file.is_file():  # which fields the checkpoint's config.json really sets (else: defaults)
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        written = set(raw.get("text_config", raw))
    hints, values, examples = {}, {}, []
    for key, ckpt_shape, model_shape in sorted(mismatched):
        examples.append(f"{key}: checkpoint {tuple(ckpt_shape)}, model {tuple(model_shape)}")
        for ckpt_dim, model_dim in zip(ckpt_shape, model_shape):
            if ckpt_dim == model_dim:
                continue
            field = next((f for f in _SHAPE_FIELDS if getattr(text, f, None) == model_dim), None)
            if field is not None and field not in hints:
                origin = "set in the config" if field in written else "the default, as config.json does not set it"
                hints[field] = f"{field}={model_dim} ({origin}) but the weights have {ckpt_dim}"
                values[field] = ckpt_dim
    found = "; ".join(hints.values()) or "the config does not describe these weights"
    fix = ", ".join(f'"{field}": {value}' for field, value in values.items()) or "the fields that size them"
    return (
        f"The weights in {source} do not fit the config: {found}. Set {fix} in config.json (or pass it to "
        f"from_pretrained). Mismatched: {'; '.join(examples[:3])}{' ...' if len(examples) > 3 else ''}."
    )


def _check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Errors that name the problem for token ids the embedding cannot look up (on CUDA the lookup itself fails
    as an opaque device-side assert that also poisons the process)."""
    if input_ids.ndim != 2:
        raise ValueError(
            f"input_ids has shape {tuple(input_ids.shape)}; the model takes (batch, sequence). For one sequence "
            "add a batch dimension (input_ids[None]), or tokenize with return_tensors='pt'."
        )
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids are {input_ids.dtype}; token ids are integers: pass input_ids.long().")
    if input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids has no tokens (shape {tuple(input_ids.shape)}): give every row at least one token, "
            "e.g. the tokenizer's bos token (tokenize with add_special_tokens=True)."
        )
    if input_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = input_ids.aminmax()
    if low < 0 or high >= vocab_size:
        bad = int(low) if low < 0 else int(high)
        raise ValueError(
            f"input_ids contains token id {bad}, outside this model's vocabulary (0..{vocab_size - 1}, "
            f"vocab_size={vocab_size}). Use the tokenizer saved with this model; after adding tokens to a "
            "tokenizer, call model.resize_token_embeddings(len(tokenizer)). (-100 marks ignored label positions; "
            "it is not an input id.)"
        )


def _check_text_inputs(
    config: Llama4TextConfig,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | dict | None,
    position_ids: torch.Tensor | None,
    cache: Cache | None,
) -> None:
    """Shapes of what the decoder receives, checked before they fail deep inside attention or, worse, broadcast
    into silently wrong results (transformers' masking pads or truncates a 2-D mask of the wrong length)."""
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.hidden_size:
        raise ValueError(
            f"inputs_embeds has shape {tuple(inputs_embeds.shape)}; the model takes (batch, sequence, "
            f"{config.hidden_size}) (hidden_size={config.hidden_size}), as model.get_input_embeddings() returns."
        )
    batch, seq = inputs_embeds.shape[:2]
    if position_ids is not None and position_ids.shape[-1] != seq:
        raise ValueError(
            f"position_ids has shape {tuple(position_ids.shape)} but the input has {seq} tokens per row: pass "
            f"({batch}, {seq}) positions (or none, to count from the cache length)."
        )
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2 or torch.compiler.is_compiling():
        return  # 4-D masks and generate()'s prepared per-layer masks are transformers' own
    past = cache.get_seq_length() if cache is not None else 0
    expected = past + seq
    # A preallocated (static) cache may be given a mask over its whole length; any other mask covers exactly
    # the cached tokens and the new ones.
    longer_ok = cache is not None and not isinstance(cache, DynamicCache)
    length = attention_mask.shape[1]
    if attention_mask.shape[0] != batch or length < expected or (length > expected and not longer_ok):
        cached = f" after {past} cached tokens" if past else ""
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the input is {batch} rows of {seq} tokens"
            f"{cached}: a 2-D mask is ({batch}, {expected}), one entry (1 = attend, 0 = padding) per cached and "
            "new token. Pass the mask from the same tokenizer call as input_ids; when reusing a cache, extend it "
            "by the new tokens."
        )


def _check_labels(labels: torch.Tensor, hidden_states: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    if labels.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but the input is {tuple(hidden_states.shape[:2])} (batch, "
            "sequence): labels are the input ids themselves (the model shifts them), with -100 where no loss is "
            "wanted (padding, prompt)."
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels are {labels.dtype}; they are token ids: pass labels.long().")
    if torch.compiler.is_compiling():
        return
    wrong = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(wrong.any()):
        raise ValueError(
            f"labels contain {int(labels[wrong][0])}, neither a token id (0..{vocab_size - 1}) nor {ignore_index} "
            "(ignored position). Mask padding and prompts with -100, not with the pad id of another tokenizer."
        )


class Llama4GenerationMixin(GenerationMixin):
    """transformers' `generate`, with the prompt checked first: an empty or 1-D prompt otherwise fails inside
    generate's padding check with an IndexError that does not say what is wrong."""

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(prompt, torch.Tensor):
            _check_token_ids(prompt, self.config.get_text_config().vocab_size)
        return super().generate(inputs, *args, **kwargs)


class Llama4PreTrainedModel(PreTrainedModel):
    config: Llama4TextConfig
    config_class = Llama4TextConfig
    base_model_prefix = "model"
    input_modalities = ("text",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Llama4TextDecoderLayer"]
    _supports_flash_attn = False
    _supports_sdpa = True
    # Flex attention: CUDA for training and inference; on CPU forward and generation only (equal to SDPA with
    # padding, tests/test_drop_in.py): torch has no flex backward on CPU, so training there is refused with the fix.
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Decode steps trace as one graph (static cache; experts by gathered weights or every expert when traced):
    # tests/test_cache_generation.py compiles generate()'s decode step with fullgraph=True.
    _can_compile_fullgraph = True

    def get_compiled_call(self, compile_config: CompileConfig | None) -> Callable:
        """`torch.compile`d `__call__` for generate()'s decode steps. transformers returns the plain call for every
        `llama4` model (its built-in cannot compile); ours decodes with static shapes (`StaticCache`, gathered
        expert weights), so this is transformers' own logic without that exclusion."""
        compile_config = compile_config or self._default_compile_config()
        default_config = getattr(self.generation_config, "compile_config", None) or self._default_compile_config()
        if (
            not hasattr(self, "_compiled_call")
            or getattr(self, "_last_compile_config", default_config) != compile_config
        ):
            self._last_compile_config = compile_config
            self._compiled_call = torch.compile(self.__call__, **compile_config.to_dict())
        return self._compiled_call

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`, with errors that say which file is broken and what to do."""
        check_quantization_request(cls, pretrained_model_name_or_path, kwargs)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            broken = _unreadable_safetensors(pretrained_model_name_or_path, kwargs)
            raise OSError(
                f"Cannot read the weights of {pretrained_model_name_or_path}: {', '.join(broken) or 'a file'} is "
                f"corrupt or truncated ({error}). Retry with force_download=True to fetch it again; if that fails "
                "too, the file in the repo itself is damaged and must be re-uploaded."
            ) from error
        except OSError as error:
            local = Path(str(pretrained_model_name_or_path)).expanduser()
            weights = ("*.safetensors", "*.bin", "*.index.json")
            if local.is_dir() and not kwargs.get("subfolder") and not any(any(local.glob(w)) for w in weights):
                raise OSError(
                    f"{pretrained_model_name_or_path} holds no weights (no model.safetensors). To build a fresh "
                    f"model from its config.json: {cls.__name__}({cls.config_class.__name__}.from_pretrained(path)); "
                    "otherwise give the directory a trained model was saved to."
                ) from error
            listed = not local.is_dir() or (local / "model.safetensors.index.json").is_file()
            if listed and ".safetensors" in str(error) and "model.safetensors.index.json" not in str(error):
                raise OSError(
                    f"{pretrained_model_name_or_path} is missing a weight shard listed in its "
                    f"model.safetensors.index.json ({error}). The upload is incomplete: push every shard again."
                ) from error
            raise

    @staticmethod
    def _finalize_model_loading(model, load_config, loading_info):
        # transformers prints a table of reinitialised tensors, then a RuntimeError pointing at it; a wrong or
        # missing config field (e.g. no `num_local_experts`) should instead be named, with the fix.
        if loading_info.mismatched_keys and not load_config.ignore_mismatched_sizes:
            raise ValueError(
                _shape_mismatch_message(
                    model, str(load_config.pretrained_model_name_or_path), loading_info.mismatched_keys
                )
            )
        return PreTrainedModel._finalize_model_loading(model, load_config, loading_info)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.get_text_config().initializer_range
        if isinstance(module, Llama4TextExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, Llama4Router):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Llama4VisionRotaryEmbedding):
            init.copy_(module.freqs_ci, module._compute_freqs_ci(module.config))
        elif isinstance(module, Llama4VisionModel):
            init.normal_(module.class_embedding, std=module.scale)
            init.normal_(module.positional_embedding_vlm, std=module.scale)
        if metap_enabled(self.config):
            metap_init_module(self, module)  # MetaP init scales (rules in metap.py); base shape: unchanged


class Llama4TextModel(Llama4PreTrainedModel):
    _can_record_outputs = {
        "attentions": Llama4TextAttention,
        "hidden_states": Llama4TextDecoderLayer,
        "router_logits": OutputRecorder(Llama4TextMoe, index=1),
    }

    def __init__(self, config: Llama4TextConfig) -> None:
        if isinstance(config, Llama4TextConfig):  # fields set after construction are checked here too
            config.check_fields()
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(Llama4TextDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Llama4TextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Llama4TextRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def _can_attend_by_chunks(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | dict | None,
        position_ids: torch.Tensor,
        cache: Cache | None,
        output_attentions: bool = False,
    ) -> bool:
        """Whether chunked layers can run each chunk as its own batch row: a fresh, unpadded, unpacked
        sequence longer than one chunk (training, or a generation prefill without padding). Not when attention
        weights are returned: they are (B, heads, S, S) under the chunk mask, as the built-in returns them."""
        chunk = self.config.attention_chunk_size
        return (
            chunk is not None
            and not output_attentions
            and inputs_embeds.shape[1] > chunk
            and self.config._attn_implementation in ("sdpa", "eager")
            and not isinstance(attention_mask, dict)
            and (cache is None or cache.get_seq_length() == 0)
            and (attention_mask is None or bool(attention_mask.all()))
            and bool((position_ids.diff(dim=-1) == 1).all())  # no packed sequences
        )

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if input_ids is not None:
            _check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)  # (B, S, H)
        _check_text_inputs(self.config, inputs_embeds, attention_mask, position_ids, cache)
        if self.config._attn_implementation == "flex_attention" and inputs_embeds.device.type == "cpu":
            if inputs_embeds.requires_grad:
                raise ValueError(
                    "attn_implementation='flex_attention' has no backward pass on CPU (torch "
                    f"{torch.__version__}): train on CPU with attn_implementation='sdpa' (or 'eager'), or on a GPU. "
                    "For inference on CPU run the forward under torch.no_grad() (generate() does), which works."
                )
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)  # chunked layers keep one chunk, NoPE layers all
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)  # (1, S)

        output_attentions = kwargs.get("output_attentions", self.config.output_attentions)
        attend_by_chunks = self._can_attend_by_chunks(
            inputs_embeds, attention_mask, position_ids, cache, output_attentions=bool(output_attentions)
        )
        if not isinstance(masks := attention_mask, dict):  # generate() may pass them prepared
            mask_args = (self.config, inputs_embeds, attention_mask, cache, position_ids)
            masks = {
                layer_type: create_chunked_causal_mask(*mask_args)
                if layer_type == "chunked_attention"
                else create_causal_mask(*mask_args)
                for layer_type in set(self.config.layer_types) - ({"chunked_attention"} if attend_by_chunks else set())
            }
            if attend_by_chunks:  # a plain causal mask over one chunk (None for SDPA, which uses is_causal)
                chunk = inputs_embeds[:1, : self.config.attention_chunk_size]
                masks["chunked_attention"] = create_causal_mask(self.config, chunk, None, None, None)

        hidden_states = inputs_embeds
        freqs_cis = self.rotary_emb(hidden_states, position_ids)  # (B or 1, S, D/2)
        for layer, layer_type in zip(self.layers, self.config.layer_types):
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[layer_type],
                position_ids=position_ids,
                position_embeddings=freqs_cis,
                cache=cache,
                attend_by_chunks=attend_by_chunks,
                **kwargs,
            )
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache if use_cache else None)


@dataclass
class Llama4CausalLMOutput(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus the router z-loss. `aux_loss` is the unweighted load-balancing loss."""

    z_loss: torch.FloatTensor | None = None


def _nested_to_tuple(output: ModelOutput) -> tuple:
    return tuple(value.to_tuple() if isinstance(value, ModelOutput) else value for value in output.values())


@dataclass
class Llama4MultimodalModelOutput(MoeModelOutputWithPast):
    """The text decoder's outputs plus the vision tower's (`image_outputs`, None without images)."""

    image_outputs: BaseModelOutputWithPooling | None = None

    to_tuple = _nested_to_tuple


@dataclass
class Llama4MultimodalCausalLMOutput(Llama4CausalLMOutput):
    """`Llama4CausalLMOutput` plus the vision tower's outputs (`image_outputs.pooler_output`: the projected image
    features, (N tiles, tokens_per_tile, hidden_size)), as transformers' multimodal outputs carry them."""

    image_outputs: BaseModelOutputWithPooling | None = None

    to_tuple = _nested_to_tuple

    @property
    def image_hidden_states(self) -> torch.Tensor | None:
        """The projected image features (`image_outputs.pooler_output`), the built-in's deprecated name."""
        return None if self.image_outputs is None else self.image_outputs.pooler_output


def add_router_losses(
    config: Llama4TextConfig,
    loss: torch.Tensor | None,
    router_logits: tuple[torch.Tensor, ...] | None,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(loss + coefficients x router losses, balancing loss, z-loss); losses only where router logits exist."""
    if not router_logits:
        return loss, None, None
    token_mask = None
    # A dict (per-layer-type masks, as `generate` builds for a static cache) or a 4-D mask carries no per-token
    # padding flag to use: every token then counts.
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        # With a cache the 2-D mask also covers the cached tokens; the routers only saw the ones just run.
        num_new = router_logits[0].shape[0] // attention_mask.shape[0]
        token_mask = attention_mask[:, -num_new:].reshape(-1).bool()
    aux_loss = router_load_balancing_loss(router_logits, config.num_experts_per_tok, token_mask)
    z_loss = router_z_loss(router_logits, token_mask)
    if loss is not None:
        loss = loss + config.router_aux_loss_coef * aux_loss.to(loss.device)
        loss = loss + getattr(config, "router_z_loss_coef", 0.0) * z_loss.to(loss.device)
    return loss, aux_loss, z_loss


class Llama4ForCausalLM(Llama4PreTrainedModel, Llama4GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    # Official repos are multimodal (`language_model.model.*`). The built-in reads their text half by
    # setting base_model_prefix="language_model", which names no attribute and breaks TRL; a key
    # mapping (a no-op for text-only checkpoints) does the same with the standard prefix "model".
    _text_from_multimodal_keys = {r"^language_model\.model\.": "model.", r"^language_model\.lm_head\.": "lm_head."}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> Llama4ForCausalLM:
        if "key_mapping" in kwargs:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        kwargs["key_mapping"] = cls._text_from_multimodal_keys
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        # transformers reverts load-time renamings when saving; ours must not be reverted, so that a text
        # model is always saved in the text layout (`model.*`, `lm_head.weight`).
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        ours = set(cls._text_from_multimodal_keys)
        model._weight_conversions = [
            conversion
            for conversion in getattr(model, "_weight_conversions", None) or []
            if not ours.intersection(getattr(conversion, "_original_source_patterns", []))
        ] or None
        return loaded

    def __init__(self, config: Llama4TextConfig) -> None:
        super().__init__(config)
        self.model = Llama4TextModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> Llama4CausalLMOutput:
        """With `output_router_logits` (or the config's), also returns the router losses and adds them to the
        loss, weighted by `router_aux_loss_coef` and `router_z_loss_coef`, when labels are given."""
        if kwargs.get("pixel_values") is not None:
            raise ValueError(
                "Llama4ForCausalLM is the text model and would drop pixel_values silently: load the checkpoint with "
                "Llama4ForConditionalGeneration (AutoModelForImageTextToText) to give it images."
            )
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        return self.logits_and_losses(outputs, labels, attention_mask, logits_to_keep, **kwargs)

    def logits_and_losses(
        self,
        outputs: MoeModelOutputWithPast,
        labels: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> Llama4CausalLMOutput:
        """LM head, next-token loss and router losses on top of the backbone's outputs."""
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])  # (B, kept, V)
        loss = None
        if labels is not None:
            _check_labels(labels, outputs.last_hidden_state, self.config.vocab_size, kwargs.get("ignore_index", -100))
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        loss, aux_loss, z_loss = add_router_losses(self.config, loss, outputs.router_logits, attention_mask)
        return Llama4CausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )


class Llama4VisionModel(Llama4PreTrainedModel):
    """Tiles (N, 3, S, S) -> image features (N, (S/patch * pixel_shuffle_ratio)^2, vision_output_dim)."""

    config: Llama4VisionConfig
    config_class = Llama4VisionConfig
    base_model_prefix = "vision_model"
    input_modalities = ("image",)
    _no_split_modules = ["Llama4VisionEncoderLayer"]

    def __init__(self, config: Llama4VisionConfig) -> None:
        if isinstance(config, Llama4VisionConfig):
            config.check_shapes()
        super().__init__(config)
        self.image_size = config.image_size
        self.scale = config.hidden_size**-0.5
        num_positions = (config.image_size // config.patch_size) ** 2 + 1  # patches + class token
        self.patch_embedding = Llama4UnfoldConvolution(config)
        self.class_embedding = nn.Parameter(self.scale * torch.randn(config.hidden_size))
        self.positional_embedding_vlm = nn.Parameter(self.scale * torch.randn(num_positions, config.hidden_size))
        self.rotary_embedding = Llama4VisionRotaryEmbedding(config)
        self.layernorm_pre = nn.LayerNorm(config.hidden_size)
        self.layernorm_post = nn.LayerNorm(config.hidden_size)
        self.model = Llama4VisionEncoder(config)
        self.vision_adapter = Llama4VisionPixelShuffleMLP(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embedding

    # hidden_states: the encoder's input and each layer's output (before layernorm_post), as the built-in returns
    _can_record_outputs = {
        "hidden_states": Llama4VisionEncoderLayer,
        "attentions": OutputRecorder(Llama4VisionAttention, index=1),
    }

    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        channels = self.config.num_channels
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; the vision tower takes (tiles, {channels}, "
                f"{self.image_size}, {self.image_size}), as Llama4Processor returns them (a single image: add a "
                "leading dimension; grey images: convert to RGB)."
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values are {pixel_values.dtype} (raw pixel values?): the vision tower takes rescaled, "
                "normalised floats; preprocess images with Llama4Processor / Llama4ImageProcessor."
            )
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values tiles are {tuple(pixel_values.shape[-2:])} pixels but this vision config expects "
                f"{self.image_size}x{self.image_size} (vision_config.image_size={self.image_size}). Preprocess images "
                f"with Llama4ImageProcessor(size={{'height': {self.image_size}, 'width': {self.image_size}}})."
            )
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.linear.weight.dtype))  # (N, P, D)
        class_token = self.class_embedding.expand(patches.shape[0], 1, -1)
        hidden_states = torch.cat([patches, class_token], dim=1) + self.positional_embedding_vlm  # (N, P+1, D)
        hidden_states = self.model(self.layernorm_pre(hidden_states), self.rotary_embedding(hidden_states))
        hidden_states = self.layernorm_post(hidden_states)[:, :-1]  # drop the class token: (N, P, D)
        return BaseModelOutputWithPooling(last_hidden_state=self.vision_adapter(hidden_states))  # (N, P*ratio^2, out)


class Llama4MultimodalBackbone(Llama4PreTrainedModel):
    """Image fusion then the text decoder, no LM head: (input_ids, pixel_values) -> `MoeModelOutputWithPast`.

    `Llama4ForConditionalGeneration.model` / `base_model`: what TRL and PEFT run to get `last_hidden_state`
    (the built-in names no such attribute, which crashes TRL's trainers). Inside the generation model it is
    built over that model's own submodules and not registered there, so the checkpoint keeps the official
    layout (`vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`); on its own it saves as
    `vision_model.*`, `multi_modal_projector.*`, `language_model.*`."""

    config: Llama4Config
    config_class = Llama4Config
    base_model_prefix = ""
    input_modalities = ("image", "text")
    _no_split_modules = ["Llama4TextDecoderLayer", "Llama4VisionEncoderLayer"]

    def __init__(
        self,
        config: Llama4Config,
        vision_model: Llama4VisionModel | None = None,
        multi_modal_projector: Llama4MultiModalProjector | None = None,
        language_model: Llama4TextModel | None = None,
    ) -> None:
        super().__init__(config)
        self.vision_model = vision_model or Llama4VisionModel(config.vision_config)
        self.multi_modal_projector = multi_modal_projector or Llama4MultiModalProjector(config)
        self.language_model = language_model or Llama4TextModel(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """(N tiles, 3, S, S) -> the vision tower's output: `last_hidden_state` (N, tokens_per_tile, vision_output_dim)
        before the projector (as the built-in), and `pooler_output` (N, tokens_per_tile, hidden_size), the projected
        features the text model receives (transformers' multimodal convention)."""
        image_outputs = self.vision_model(pixel_values, **kwargs)
        image_outputs.pooler_output = self.multi_modal_projector(image_outputs.last_hidden_state)
        return image_outputs

    def fuse_images(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        cache: Cache | None,
        **vision_kwargs,
    ) -> tuple[torch.Tensor, BaseModelOutputWithPooling | None]:
        """Token embeddings (B, S, H) with image features scattered into the `<|patch|>` positions, and the vision
        tower's output (None without images)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            _check_token_ids(input_ids, self.config.text_config.vocab_size)
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, S, H)
        image_token_id = self.config.image_token_id
        if pixel_values is None:
            prefill = cache is None or cache.get_seq_length() == 0
            # A warning, not an error: transformers' own model tests (and text-only uses of a multimodal
            # checkpoint) run image-token ids as plain tokens, as the built-in does.
            if input_ids is not None and prefill and (count := int((input_ids == image_token_id).sum())) > 0:
                warnings.warn(
                    f"The prompt has {count} image tokens (<|patch|>, id {image_token_id}) but no pixel_values were "
                    "given, so they are read as text tokens. Pass the pixel_values from the same Llama4Processor call.",
                    stacklevel=2,
                )
            return inputs_embeds, None
        if input_ids is not None:
            is_image_token = input_ids == image_token_id  # (B, S)
        else:
            image_embedding = self.get_input_embeddings()(torch.tensor(image_token_id, device=inputs_embeds.device))
            is_image_token = (inputs_embeds == image_embedding).all(-1)
        num_image_tokens = int(is_image_token.sum())
        vision = self.config.vision_config
        tokens_per_tile = int((vision.image_size // vision.patch_size) ** 2 * vision.pixel_shuffle_ratio**2)
        if num_image_tokens == 0:
            raise ValueError(
                f"Got pixel_values for {pixel_values.shape[0]} tiles ({pixel_values.shape[0] * tokens_per_tile} "
                f"image features) but the prompt has 0 image tokens (<|patch|>, id {image_token_id}). Build prompts "
                "with Llama4Processor or apply_chat_template with an image entry, which insert the tokens."
            )
        image_outputs = self.get_image_features(pixel_values, **vision_kwargs)
        image_features = image_outputs.pooler_output  # (N, tokens_per_tile, H)
        image_features = image_features.reshape(-1, image_features.shape[-1]).to(
            inputs_embeds.device, inputs_embeds.dtype
        )
        if num_image_tokens != image_features.shape[0]:
            raise ValueError(
                f"The prompt has {num_image_tokens} image tokens (<|patch|>, id {image_token_id}) but the images give "
                f"{image_features.shape[0]} features ({pixel_values.shape[0]} tiles x {tokens_per_tile}). Pass the "
                "pixel_values and input_ids from the same Llama4Processor call."
            )
        return inputs_embeds.masked_scatter(is_image_token.unsqueeze(-1), image_features), image_outputs

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> Llama4MultimodalModelOutput:
        vision_kwargs = {key: kwargs[key] for key in ("output_attentions", "output_hidden_states") if key in kwargs}
        inputs_embeds, image_outputs = self.fuse_images(input_ids, inputs_embeds, pixel_values, cache, **vision_kwargs)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        return Llama4MultimodalModelOutput(**outputs, image_outputs=image_outputs)


class Llama4ForConditionalGeneration(Llama4PreTrainedModel, Llama4GenerationMixin):
    """Early fusion: image features replace the `<|patch|>` token embeddings, then the sparse-MoE text model."""

    config: Llama4Config
    config_class = Llama4Config
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    _no_split_modules = ["Llama4TextDecoderLayer", "Llama4VisionEncoderLayer"]
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: Llama4Config) -> None:
        super().__init__(config)
        self.vision_model = Llama4VisionModel(config.vision_config)
        self.multi_modal_projector = Llama4MultiModalProjector(config)
        self.language_model = Llama4ForCausalLM(config.text_config)
        self.vocab_size = config.text_config.vocab_size
        # Built once over the modules above and kept out of `_modules`: no duplicate state-dict keys.
        self.__dict__["model"] = Llama4MultimodalBackbone(
            config, self.vision_model, self.multi_modal_projector, self.language_model.model
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def set_decoder(self, decoder: nn.Module) -> None:
        self.language_model.set_decoder(decoder)

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """The vision tower's output for (N tiles, 3, S, S), as the built-in (`return_dict=False`: a tuple); the
        projected features in `pooler_output`."""
        return self.model.get_image_features(pixel_values, **kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> Llama4MultimodalCausalLMOutput:
        if output_router_logits is None:
            output_router_logits = self.config.text_config.output_router_logits
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        text_outputs = self.language_model.logits_and_losses(outputs, labels, attention_mask, logits_to_keep, **kwargs)
        return Llama4MultimodalCausalLMOutput(**text_outputs, image_outputs=outputs.image_outputs)


__all__ = [
    "Llama4PreTrainedModel",
    "Llama4TextModel",
    "Llama4ForCausalLM",
    "Llama4VisionModel",
    "Llama4ForConditionalGeneration",
    "Llama4MultimodalBackbone",
    "Llama4CausalLMOutput",
]
