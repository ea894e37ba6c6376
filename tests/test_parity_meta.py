"""Same weights -> same logits as Meta's reference Llama 4 (github.com/meta-llama/llama-models, `models/llama4/`).

The reference below is an independent plain-torch re-typing of the formulas in Meta's `model.py`, `moe.py`,
`ffn.py` and `vision/{encoder,embedding}.py` (fairscale's parallel layers become plain matmuls, the KV cache is
left out), on Meta's own weight names and layouts (`attention.wq`, `feed_forward.experts.w1` (E, D, F),
`router_DE` (D, E), ...). It derives its layer pattern (NoPE every `nope_layer_interval`, MoE every
`interleave_moe_layer_step`) from Meta's arguments, not from our config's lists. A converter maps our
state_dict (transformers' llama4 names, as `convert_llama4_weights_to_hf.py` writes them: no q/k permutation,
since both sides rotate adjacent pairs as complex numbers) to those names, and the logits are compared on
sequences spanning several attention chunks, with temperature tuning active, QK norm on and off, llama3 RoPE
scaling and interleaved dense/MoE layers. Full-sequence forwards only: Meta's decode path drops the chunk mask.

The reference is also run with single features changed (no temperature tuning, router score on the expert
output, ...) to show the comparison notices each of them.
"""

import math
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from modeling_llama4 import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

from conftest import tiny_text_kwargs

# ---------------------------------------------------------------------------------------------------------------
# Meta's reference forward, re-typed from its formulas. `p` is a flat dict of Meta-named tensors.
# ---------------------------------------------------------------------------------------------------------------

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MetaArgs:
    """The fields of Meta's `ModelArgs` / `MoEArgs` (args.py) that the forward reads."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    use_scaled_rope: bool
    rope_scaling_factor: float | None
    rope_high_freq_factor: float | None
    nope_layer_interval: int | None
    use_qk_norm: bool
    attn_temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    attention_chunk_size: int | None
    num_experts: int
    top_k: int
    interleave_moe_layer_step: int


@dataclass(frozen=True)
class MetaVisionArgs:
    """Meta's `VisionArgs` (args.py), square tiles."""

    image_size: int
    patch_size: int
    dim: int
    n_layers: int
    n_heads: int
    mlp_ratio: float
    output_dim: int
    pixel_shuffle_ratio: float


def meta_rmsnorm(x: torch.Tensor, eps: float) -> torch.Tensor:
    # model.py `rmsnorm`: normalised in float32, cast back; the weight (if any) multiplies after the cast.
    x32 = x.float()
    return (x32 / torch.sqrt(x32.square().mean(-1, keepdim=True) + eps)).type_as(x)


def meta_scaled_freqs(freqs: torch.Tensor, scale_factor: float, high_freq_factor: float) -> torch.Tensor:
    # model.py `apply_scaling`: llama3 scaling with the original context (8192) and low_freq_factor (1) fixed.
    context, low = 8192, 1.0
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low) / (high_freq_factor - low)
    blended = (1 - smooth) * freqs / scale_factor + smooth * freqs
    scaled = torch.where(wavelen > context / low, freqs / scale_factor, blended)
    return torch.where(wavelen < context / high_freq_factor, freqs, scaled)


def meta_freqs_cis(args: MetaArgs, seqlen: int) -> torch.Tensor:
    # model.py `precompute_freqs_cis` (head dim = dim // n_heads there), rows 0..seqlen-1: (S, D/2) complex64.
    head_dim = args.dim // args.n_heads
    freqs = 1.0 / args.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    if args.use_scaled_rope:
        freqs = meta_scaled_freqs(freqs, args.rope_scaling_factor, args.rope_high_freq_factor)
    angles = torch.arange(seqlen, dtype=torch.float32)[:, None] * freqs[None, :]
    return torch.complex(torch.cos(angles), torch.sin(angles))


def meta_rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    # model.py `apply_rotary_emb`: channel pairs (2i, 2i+1) as one complex number, in float32.
    # x (B, S, heads, D); freqs_cis (S, D/2) broadcast over batch and heads.
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * freqs_cis[None, :, None, :]).flatten(-2).type_as(x)


def meta_masks(seqlen: int, chunk: int | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    # model.py `Transformer.forward` (global causal) and `create_chunked_attention_mask` (same chunk, causal),
    # as additive masks.
    i, j = torch.arange(seqlen)[:, None], torch.arange(seqlen)[None, :]
    neg = torch.tensor(float("-inf"), dtype=dtype)
    zero = torch.tensor(0.0, dtype=dtype)
    global_mask = torch.where(j <= i, zero, neg)
    local_mask = None if chunk is None else torch.where((j <= i) & (i // chunk == j // chunk), zero, neg)
    return global_mask, local_mask


def meta_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # The scaled dot-product attention Meta calls: q (B, S, heads, D), k/v (B, S, kv_heads, D) -> (B, S, heads * D).
    # Key/value heads serve consecutive query heads (`repeat_interleave` on the head axis).
    n_rep = q.shape[2] // k.shape[2]
    q, k, v = (
        q.transpose(1, 2),
        k.repeat_interleave(n_rep, 2).transpose(1, 2),
        v.repeat_interleave(n_rep, 2).transpose(1, 2),
    )
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def meta_attention(
    p: Params, prefix: str, x: torch.Tensor, args: MetaArgs, freqs_cis: torch.Tensor, mask: torch.Tensor, nope: bool
) -> torch.Tensor:
    # model.py `Attention.forward` at start_pos 0: RoPE, then weightless QK RMS norm (RoPE layers only), then
    # temperature tuning of the queries on NoPE layers from the absolute positions.
    bsz, seqlen, _ = x.shape
    head_dim = args.dim // args.n_heads
    q = (x @ p[prefix + "wq.weight"].T).view(bsz, seqlen, args.n_heads, head_dim)
    k = (x @ p[prefix + "wk.weight"].T).view(bsz, seqlen, args.n_kv_heads, head_dim)
    v = (x @ p[prefix + "wv.weight"].T).view(bsz, seqlen, args.n_kv_heads, head_dim)
    if not nope:
        q, k = meta_rotate(q, freqs_cis), meta_rotate(k, freqs_cis)
        if args.use_qk_norm:
            q, k = meta_rmsnorm(q, args.norm_eps), meta_rmsnorm(k, args.norm_eps)
    if args.attn_temperature_tuning and nope:
        positions = torch.arange(seqlen, dtype=torch.float32)
        scales = torch.log(torch.floor((positions + 1.0) / args.floor_scale) + 1.0) * args.attn_scale + 1.0
        q = q * scales.view(1, seqlen, 1, 1)
    return meta_sdpa(q, k, v, mask) @ p[prefix + "wo.weight"].T


def meta_swiglu(p: Params, prefix: str, x: torch.Tensor) -> torch.Tensor:
    # ffn.py `FeedForward.forward`: w2(silu(w1 x) * w3 x), weights (F, D), (D, F), (F, D).
    return (F.silu(x @ p[prefix + "w1.weight"].T) * (x @ p[prefix + "w3.weight"].T)) @ p[prefix + "w2.weight"].T


def meta_moe(p: Params, prefix: str, x: torch.Tensor, args: MetaArgs, score_on_output: bool = False) -> torch.Tensor:
    # moe.py `MoE.forward` + `Experts.batched_swiglu`: every expert sees every token, scaled by the sigmoid of its
    # router logit on the top-k experts and by sigmoid(-inf) = 0 elsewhere; the scaled INPUT goes through the
    # expert; the shared expert is added unweighted. `score_on_output` is not Meta's: the sensitivity check's
    # variant that scales the expert's output instead.
    bsz, seqlen, dim = x.shape
    x_aD = x.reshape(-1, dim)
    logits_aE = x_aD @ p[prefix + "router_DE"]
    top_logits, top_experts = logits_aE.topk(args.top_k, dim=-1)
    scores_Ea = torch.full_like(logits_aE, float("-inf")).scatter(1, top_experts, top_logits).sigmoid().T
    if score_on_output:
        routed_in_EaD = x_aD.expand(args.num_experts, -1, -1)
    else:
        routed_in_EaD = x_aD[None] * scores_Ea[..., None]
    w1, w2, w3 = (p[prefix + f"experts.{name}"] for name in ("w1", "w2", "w3"))  # (E, D, F), (E, F, D), (E, D, F)
    routed_out_EaD = (F.silu(routed_in_EaD @ w1) * (routed_in_EaD @ w3)) @ w2
    if score_on_output:
        routed_out_EaD = routed_out_EaD * scores_Ea[..., None]
    out_aD = meta_swiglu(p, prefix + "shared_expert.", x_aD) + routed_out_EaD.sum(0)
    return out_aD.view(bsz, seqlen, dim)


def meta_layer_kinds(args: MetaArgs, layer_id: int) -> tuple[bool, bool]:
    # model.py `TransformerBlock.__init__`: (is_nope_layer, is_moe_layer), 1-based intervals.
    nope = args.nope_layer_interval is not None and (layer_id + 1) % args.nope_layer_interval == 0
    return nope, (layer_id + 1) % args.interleave_moe_layer_step == 0


def meta_transformer(
    p: Params,
    args: MetaArgs,
    tokens: torch.Tensor,
    image_features: torch.Tensor | None = None,
    image_mask: torch.Tensor | None = None,
    score_on_output: bool = False,
) -> torch.Tensor:
    # model.py `Transformer.forward` + `TransformerBlock.forward` at start_pos 0: (B, S) tokens -> float32 logits.
    # image_features (tokens, output_dim) fill the positions of image_mask (B, S) in order, through
    # `vision_projection` (embedding.py `scatter_embeddings` + the `h * ~mask + h_image * mask` blend).
    h = p["tok_embeddings.weight"][tokens]
    if image_features is not None:
        h_image = torch.zeros(*tokens.shape, image_features.shape[-1], dtype=h.dtype)
        h_image = h_image.masked_scatter(image_mask[..., None], image_features.to(h.dtype))
        mask = image_mask[..., None].to(h.dtype)
        h = h * (1 - mask) + (h_image @ p["vision_projection.weight"].T) * mask
    seqlen = tokens.shape[1]
    freqs_cis = meta_freqs_cis(args, seqlen)
    global_mask, local_mask = meta_masks(seqlen, args.attention_chunk_size, h.dtype)
    for layer_id in range(args.n_layers):
        prefix = f"layers.{layer_id}."
        nope, moe = meta_layer_kinds(args, layer_id)
        mask = global_mask if nope or local_mask is None else local_mask
        normed = meta_rmsnorm(h, args.norm_eps) * p[prefix + "attention_norm.weight"]
        h = h + meta_attention(p, prefix + "attention.", normed, args, freqs_cis, mask, nope)
        normed = meta_rmsnorm(h, args.norm_eps) * p[prefix + "ffn_norm.weight"]
        if moe:
            h = h + meta_moe(p, prefix + "feed_forward.", normed, args, score_on_output)
        else:
            h = h + meta_swiglu(p, prefix + "feed_forward.", normed)
    h = meta_rmsnorm(h, args.norm_eps) * p["norm.weight"]
    return (h @ p["output.weight"].T).float()


def meta_vision_freqs_cis(vargs: MetaVisionArgs) -> torch.Tensor:
    # vision/encoder.py `VisionEncoder.__init__`: 2-D RoPE over the patch grid (row-major), x then y frequencies
    # on alternate channels, positions counted from 1; the class token (appended last) is not rotated.
    side = vargs.image_size // vargs.patch_size
    quarter_dim = vargs.dim // vargs.n_heads // 2
    freqs = 1.0 / 10000 ** (torch.arange(0, quarter_dim, 2).float() / quarter_dim)  # (D/4,)
    index = torch.arange(side * side)
    x_angles = ((index % side + 1).float()[:, None] * freqs).repeat_interleave(2, -1)  # (P, D/2)
    y_angles = ((index // side + 1).float()[:, None] * freqs).repeat_interleave(2, -1)
    angles = torch.cat([x_angles, y_angles], -1)[:, ::2]  # (P, D/2)
    angles = torch.cat([angles, angles.new_zeros(1, angles.shape[1])])  # the class token
    return torch.complex(torch.cos(angles), torch.sin(angles))


def meta_vision_embeddings(
    p: Params, vargs: MetaVisionArgs, tiles: torch.Tensor, freqs_cis: torch.Tensor | None = None
) -> torch.Tensor:
    # vision/encoder.py `VisionEncoder.forward` + vision/embedding.py `PixelShuffleMLP`: (N, 3, S, S) tiles ->
    # (N, tokens_per_tile, output_dim). The bf16 cast VisionEmbeddings applies is a storage choice, left out.
    # `freqs_cis` other than Meta's (the default) is for the sensitivity check.
    enc, adapter = "vision_embeddings.vision_encoder.", "vision_embeddings.vision_adapter."
    dim, heads = vargs.dim, vargs.n_heads

    def layer_norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (dim,), p[name + ".weight"], p[name + ".bias"], 1e-5)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ p[name + ".weight"].T + p[name + ".bias"]

    patches = F.unfold(tiles, vargs.patch_size, stride=vargs.patch_size).transpose(1, 2)  # (N, P, 3 * p * p)
    x = patches @ p[enc + "conv1._linear.weight"].T
    x = torch.cat([x, p[enc + "class_embedding"].expand(x.shape[0], 1, dim)], 1) + p[enc + "positional_embedding_vlm"]
    x = layer_norm(x, enc + "ln_pre")
    freqs_cis = meta_vision_freqs_cis(vargs) if freqs_cis is None else freqs_cis
    for i in range(vargs.n_layers):
        block = f"{enc}transformer.resblocks.{i}."
        # model.py `Attention` with biases, RoPE, no QK norm, no mask (bidirectional), kv heads = heads.
        normed = layer_norm(x, block + "ln_1")
        q, k, v = (linear(normed, block + f"attn.{w}").unflatten(-1, (heads, -1)) for w in ("wq", "wk", "wv"))
        x = x + linear(meta_sdpa(meta_rotate(q, freqs_cis), meta_rotate(k, freqs_cis), v, None), block + "attn.wo")
        hidden = F.gelu(linear(layer_norm(x, block + "ln_2"), block + "mlp.c_fc"))
        x = x + linear(hidden, block + "mlp.c_proj")
    x = layer_norm(x, enc + "ln_post")[:, :-1]  # drop the class token
    # embedding.py `pixel_shuffle_op` on the (side, side) grid, then SimpleMLP (no biases, GELU after both).
    n, side, ratio = x.shape[0], int(math.isqrt(x.shape[1])), vargs.pixel_shuffle_ratio
    grid = x.reshape(n, side, int(side * ratio), int(dim / ratio)).permute(0, 2, 1, 3)
    grid = grid.reshape(n, int(side * ratio), int(side * ratio), int(dim / ratio**2)).permute(0, 2, 1, 3)
    shuffled = grid.reshape(n, -1, grid.shape[-1])
    hidden = F.gelu(shuffled @ p[adapter + "mlp.c_fc.weight"].T)
    return F.gelu(hidden @ p[adapter + "mlp.c_proj.weight"].T)


# ---------------------------------------------------------------------------------------------------------------
# Our config and weights -> Meta's arguments and names.
# ---------------------------------------------------------------------------------------------------------------


def meta_args_from(config: Llama4TextConfig) -> MetaArgs:
    """Meta's arguments for our config; asserts the config is one Meta's code can express."""
    assert config.head_dim == config.hidden_size // config.num_attention_heads, "Meta derives head_dim"
    assert not config.attention_bias and config.hidden_act == "silu"
    rope = config.rope_parameters
    scaled = rope["rope_type"] == "llama3"
    if scaled:  # Meta's `apply_scaling` hard-codes these two
        assert rope["original_max_position_embeddings"] == 8192 and rope["low_freq_factor"] == 1
    else:
        assert rope["rope_type"] == "default"
    return MetaArgs(
        dim=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        vocab_size=config.vocab_size,
        norm_eps=config.rms_norm_eps,
        rope_theta=rope["rope_theta"],
        use_scaled_rope=scaled,
        rope_scaling_factor=rope.get("factor") if scaled else None,
        rope_high_freq_factor=rope.get("high_freq_factor") if scaled else None,
        nope_layer_interval=config.no_rope_layer_interval,
        use_qk_norm=config.use_qk_norm,
        attn_temperature_tuning=config.attn_temperature_tuning,
        floor_scale=float(config.floor_scale),
        attn_scale=config.attn_scale,
        attention_chunk_size=config.attention_chunk_size,
        num_experts=config.num_local_experts,
        top_k=config.num_experts_per_tok,
        interleave_moe_layer_step=config.interleave_moe_layer_step,
    )


def meta_vision_args_from(config: Llama4Config) -> MetaVisionArgs:
    vision = config.vision_config
    assert vision.rope_parameters["rope_theta"] == 10000, "Meta's vision RoPE hard-codes theta 10000"
    assert vision.projector_input_dim == vision.projector_output_dim == vision.vision_output_dim
    return MetaVisionArgs(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        dim=vision.hidden_size,
        n_layers=vision.num_hidden_layers,
        n_heads=vision.num_attention_heads,
        mlp_ratio=vision.intermediate_size / vision.hidden_size,
        output_dim=vision.vision_output_dim,
        pixel_shuffle_ratio=vision.pixel_shuffle_ratio,
    )


# Ours -> Meta, per layer (the inverse of convert_llama4_weights_to_hf.py's key map).
_LAYER_RENAMES = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "feed_forward.gate_proj.weight": "feed_forward.w1.weight",
    "feed_forward.up_proj.weight": "feed_forward.w3.weight",
    "feed_forward.down_proj.weight": "feed_forward.w2.weight",
    "feed_forward.shared_expert.gate_proj.weight": "feed_forward.shared_expert.w1.weight",
    "feed_forward.shared_expert.up_proj.weight": "feed_forward.shared_expert.w3.weight",
    "feed_forward.shared_expert.down_proj.weight": "feed_forward.shared_expert.w2.weight",
    "feed_forward.experts.down_proj": "feed_forward.experts.w2",  # (E, F, D) on both sides
}
_TOP_RENAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "multi_modal_projector.linear_1.weight": "vision_projection.weight",
}
_VISION_RENAMES = {
    "patch_embedding.linear.weight": "vision_encoder.conv1._linear.weight",
    "class_embedding": "vision_encoder.class_embedding",
    "positional_embedding_vlm": "vision_encoder.positional_embedding_vlm",
    "layernorm_pre": "vision_encoder.ln_pre",
    "layernorm_post": "vision_encoder.ln_post",
    "vision_adapter.mlp.fc1.weight": "vision_adapter.mlp.c_fc.weight",
    "vision_adapter.mlp.fc2.weight": "vision_adapter.mlp.c_proj.weight",
}
_VISION_LAYER_RENAMES = {
    "self_attn.q_proj": "attn.wq",
    "self_attn.k_proj": "attn.wk",
    "self_attn.v_proj": "attn.wv",
    "self_attn.o_proj": "attn.wo",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "input_layernorm": "ln_1",
    "post_attention_layernorm": "ln_2",
}


def to_meta_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (transformers-named) text or multimodal state_dict -> Meta's parameter names and layouts.

    Every tensor must be claimed, so a weight the converter does not know fails here rather than being dropped."""
    meta, rest = {}, {}
    for key, value in state_dict.items():
        key = key.removeprefix("language_model.")
        if key.startswith("model.layers."):
            layer, name = key.removeprefix("model.layers.").split(".", 1)
            prefix = f"layers.{layer}."
            if name in _LAYER_RENAMES:
                meta[prefix + _LAYER_RENAMES[name]] = value
            elif name == "feed_forward.router.weight":  # (E, D) -> router_DE (D, E)
                meta[prefix + "feed_forward.router_DE"] = value.T
            elif name == "feed_forward.experts.gate_up_proj":  # (E, D, 2F): gate (w1) then up (w3)
                w1, w3 = value.chunk(2, dim=-1)
                meta[prefix + "feed_forward.experts.w1"], meta[prefix + "feed_forward.experts.w3"] = w1, w3
            else:
                rest[key] = value
        elif key in _TOP_RENAMES:
            meta[_TOP_RENAMES[key]] = value
        elif key.startswith("vision_model.model.layers."):
            layer, name = key.removeprefix("vision_model.model.layers.").split(".", 1)
            module, param = name.rsplit(".", 1)
            block = f"vision_embeddings.vision_encoder.transformer.resblocks.{layer}."
            meta[block + _VISION_LAYER_RENAMES[module] + "." + param] = value
        elif key.startswith("vision_model."):
            name = key.removeprefix("vision_model.")
            match = next((ours for ours in _VISION_RENAMES if name == ours or name.startswith(ours + ".")), None)
            if match is None:
                rest[key] = value
            else:
                meta["vision_embeddings." + _VISION_RENAMES[match] + name[len(match) :]] = value
        else:
            rest[key] = value
    assert not rest, f"weights the converter does not map: {sorted(rest)}"
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Tiny models and the comparisons.
# ---------------------------------------------------------------------------------------------------------------

# llama3 scaling as Meta can express it (original context 8192, low_freq_factor 1). high_freq_factor 64 puts four
# of the eight frequencies of a 16-wide head in the blended band and one in the scaled band, so within 40 tokens
# the scaling moves angles by tenths of a radian (Scout's high_freq_factor 1 would touch only the slowest ones).
META_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 64.0,
    "original_max_position_embeddings": 8192,
}
# 4 layers: 0 RoPE + dense, 1 RoPE + MoE, 2 NoPE + dense, 3 RoPE + MoE; chunks of 16 over 40 tokens (3 chunks);
# temperature tuning from position 3 on (floor_scale 4), up to 1 + 0.5 * log(11) = 2.2 at position 39.
BASE = dict(
    num_hidden_layers=4,
    no_rope_layer_interval=3,
    interleave_moe_layer_step=2,
    num_local_experts=4,
    num_experts_per_tok=1,
    attention_chunk_size=16,
    floor_scale=4,
    attn_scale=0.5,
    rope_parameters=META_LLAMA3_ROPE,
    max_position_embeddings=16384,  # transformers wants it above the llama3 original context
)
CASES = {
    "qk_norm_tuned": dict(use_qk_norm=True, attn_temperature_tuning=True),
    "qk_norm_untuned": dict(use_qk_norm=True, attn_temperature_tuning=False),
    "no_qk_norm_tuned": dict(use_qk_norm=False, attn_temperature_tuning=True),
    "no_qk_norm_untuned_default_rope": dict(
        use_qk_norm=False, attn_temperature_tuning=False, rope_parameters={"rope_type": "default", "rope_theta": 1e4}
    ),
    "every_layer_moe_top2_more_experts": dict(interleave_moe_layer_step=1, num_local_experts=6, num_experts_per_tok=2),
}
SEQ_LEN = 40
# max |ours - Meta| / max |Meta| per dtype (measured: about 1e-6 in float32, 5e-7 in float64). float64 runs still
# do RoPE, the RMS norms and the temperature scales in float32 on both sides (Meta's `.float()` calls and float32
# positions, mirrored by ours) and Meta returns float32 logits, so float64 only halves the float32 error; with
# those float32 steps switched to float64 on both sides the logits agree to ~2e-15.
RTOL = {torch.float32: 1e-5, torch.float64: 2e-6}


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> None:
    """Random weights large enough that a wrong formula moves the logits: norm weights around 1, the rest N(0, std)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            is_norm_weight = "norm" in name and name.endswith("weight")
            param.copy_(1 + 0.2 * noise if is_norm_weight else std * noise)


def text_model(dtype: torch.dtype, **overrides) -> Llama4ForCausalLM:
    model = Llama4ForCausalLM(Llama4TextConfig(**tiny_text_kwargs(**{**BASE, **overrides})))
    randomize_(model)
    return model.to(dtype).eval()


def meta_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach() for key, value in to_meta_state_dict(model.state_dict()).items()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


def test_layer_pattern_is_metas():
    # Meta derives NoPE and MoE layers from 1-based intervals; the tiny cases must exercise both kinds of each.
    config = text_model(torch.float32).config
    args = meta_args_from(config)
    kinds = [meta_layer_kinds(args, i) for i in range(args.n_layers)]
    assert kinds == [(False, False), (False, True), (True, False), (False, True)]
    assert [not nope for nope, _ in kinds] == [bool(flag) for flag in config.no_rope_layers]
    assert [i for i, (_, moe) in enumerate(kinds) if moe] == config.moe_layers


@pytest.mark.parametrize("path", ["chunk_rows", "chunk_masks", "prefill_cache"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASES)
def test_logits_match_meta_reference(case, dtype, path, monkeypatch):
    ours = text_model(dtype, **CASES[case])
    if path == "chunk_masks":  # transformers' chunked causal masks instead of chunks run as batch rows
        monkeypatch.setattr(ours.model, "_can_attend_by_chunks", lambda *args, **kwargs: False)
    tokens = torch.randint(3, ours.config.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = meta_transformer(meta_params(ours), meta_args_from(ours.config), tokens)
        actual = ours(tokens, use_cache=path == "prefill_cache").logits
    assert expected.abs().max() > 1.0  # logits well away from zero, so the relative bound means something
    assert relative_error(actual, expected) <= RTOL[dtype]


# Each changes one thing in the reference (or its weights): the comparison must see it by orders of magnitude.
# (QK norm before instead of after RoPE is not among them: rotating pairs keeps each head's RMS, so it is the same.)
ARG_MUTATIONS = {
    "no_temperature_tuning": dict(attn_temperature_tuning=False),
    "no_llama3_rope_scaling": dict(use_scaled_rope=False),
    "global_attention_not_chunked": dict(attention_chunk_size=None),
    "no_nope_layers": dict(nope_layer_interval=None),
    "no_qk_norm": dict(use_qk_norm=False),
}


def swap_gate_and_up(params: Params) -> Params:
    swapped = dict(params)
    for w1 in [key for key in params if key.endswith("experts.w1")]:
        w3 = w1.removesuffix("w1") + "w3"
        swapped[w1], swapped[w3] = params[w3], params[w1]
    return swapped


@pytest.mark.parametrize("mutation", [*ARG_MUTATIONS, "router_score_on_expert_output", "experts_gate_and_up_swapped"])
def test_comparison_sees_each_feature(mutation):
    ours = text_model(torch.float64, **CASES["qk_norm_tuned"])
    params, args = meta_params(ours), meta_args_from(ours.config)
    mutated_args = replace(args, **ARG_MUTATIONS.get(mutation, {}))
    mutated_params = swap_gate_and_up(params) if mutation == "experts_gate_and_up_swapped" else params
    score_on_output = mutation == "router_score_on_expert_output"
    tokens = torch.randint(3, ours.config.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        actual = ours(tokens, use_cache=False).logits
        faithful = relative_error(actual, meta_transformer(params, args, tokens))
        mutated = relative_error(
            actual, meta_transformer(mutated_params, mutated_args, tokens, score_on_output=score_on_output)
        )
    assert faithful <= RTOL[torch.float64]
    assert mutated > 1000 * RTOL[torch.float64], f"{mutation}: {mutated:.2e}"


# A 2-layer vision tower on 56-pixel tiles: 4 x 4 patches of 14, pixel-shuffled (ratio 0.5) to 4 tokens per tile.
TINY_VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,  # = 4 * hidden (Meta's mlp_ratio) = hidden / ratio^2 (the adapter's input)
    image_size=56,
    patch_size=14,
    pixel_shuffle_ratio=0.5,
    vision_output_dim=48,
    projector_input_dim=48,
    projector_output_dim=48,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
IMAGE_TOKEN = 90


def multimodal_model(dtype: torch.dtype) -> Llama4ForConditionalGeneration:
    config = Llama4Config(
        text_config=tiny_text_kwargs(**{**BASE, **CASES["qk_norm_tuned"]}),
        vision_config=TINY_VISION,
        image_token_index=IMAGE_TOKEN,
    )
    model = Llama4ForConditionalGeneration(config)
    randomize_(model)
    return model.to(dtype).eval()


def image_inputs(tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 40 tokens, row 0 with 4 image tokens per tile from position 5 (across the first chunk boundary),
    row 1 text only; and the random pixel tiles."""
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(3, IMAGE_TOKEN, (2, SEQ_LEN), generator=generator)
    tokens[0, 5 : 5 + 4 * tiles] = IMAGE_TOKEN
    return tokens, torch.randn(tiles, 3, 56, 56, generator=generator)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_multimodal_logits_match_meta_reference(dtype):
    ours = multimodal_model(dtype)
    tokens, tiles = image_inputs(tiles=3)
    params = meta_params(ours)
    with torch.no_grad():
        features = meta_vision_embeddings(params, meta_vision_args_from(ours.config), tiles.to(dtype))
        image_features = features.reshape(-1, features.shape[-1])
        expected = meta_transformer(
            params, meta_args_from(ours.config.text_config), tokens, image_features, tokens == IMAGE_TOKEN
        )
        actual = ours(tokens, pixel_values=tiles.to(dtype), use_cache=False).logits
    assert expected.abs().max() > 1.0
    assert relative_error(actual, expected) <= RTOL[dtype]


@pytest.mark.parametrize("mutation", ["images_ignored", "no_vision_rope", "class_token_rotated"])
def test_multimodal_comparison_sees_the_vision_path(mutation):
    ours = multimodal_model(torch.float64)
    tokens, tiles = image_inputs(tiles=3)
    params, args, vargs = (
        meta_params(ours),
        meta_args_from(ours.config.text_config),
        meta_vision_args_from(ours.config),
    )
    freqs_cis = meta_vision_freqs_cis(vargs)
    if mutation == "no_vision_rope":
        freqs_cis = torch.ones_like(freqs_cis)
    elif mutation == "class_token_rotated":  # the class token given patch 0's rotation instead of none
        freqs_cis = torch.cat([freqs_cis[:-1], freqs_cis[:1]])
    with torch.no_grad():
        actual = ours(tokens, pixel_values=tiles.double(), use_cache=False).logits
        features = meta_vision_embeddings(params, vargs, tiles.double(), freqs_cis).flatten(0, 1)
        if mutation == "images_ignored":
            expected = meta_transformer(params, args, tokens)
        else:
            expected = meta_transformer(params, args, tokens, features, tokens == IMAGE_TOKEN)
    mutated = relative_error(actual, expected)
    assert mutated > 1000 * RTOL[torch.float64], f"{mutation}: {mutated:.2e}"
