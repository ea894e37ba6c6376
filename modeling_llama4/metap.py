"""MetaP: per-parameter-group init scales and AdamW learning rates that transfer across model size.

Meta published no formula for MetaP; this is the muP family it is inferred to be, relative to a *base shape*
(the small model where the learning rate was tuned). With the multipliers

    m_d = hidden_size / base_hidden_size            (width)
    m_I = intermediate_size / base_intermediate_size (expert and shared-expert width)
    m_M = intermediate_size_mlp / base_intermediate_size_mlp (dense-MLP width; default: m_I)
    m_L = num_hidden_layers / base_num_hidden_layers (depth)
    m_E = num_local_experts / base_num_local_experts (expert count: no factor, see below)

each group gets `init std = sigma * f`, `lr = eta * g`, `eps = epsilon * h`, `weight_decay = lambda * k`
(sigma = `initializer_range`, eta / epsilon / lambda the base run's AdamW settings):

| group             | init f              | lr g             | eps h          | wd k           | source |
|-------------------|---------------------|------------------|----------------|----------------|--------|
| embedding         | 1                   | 1                | 1/(m_d m_L)    | 1              | TP5 Tab. 3 (input weights); CompleteP Tab. 1 |
| attention_qkv     | 1/sqrt(m_d)         | 1/m_d            | 1/(m_d m_L)    | m_d            | TP5 Tab. 3 (hidden); CompleteP Tab. 1 |
| attention_out     | 1/(sqrt(m_d) m_L)   | 1/(m_d m_L)      | 1/m_d          | m_d m_L        | hidden + CompleteP branch x 1/m_L, folded |
| shared_expert_in  | 1/sqrt(m_d)         | 1/m_d            | 1/(m_d m_L)    | m_d            | hidden (fan-in H) |
| shared_expert_out | 1/(sqrt(m_I) m_L)   | 1/(m_I m_L)      | 1/m_d          | m_I m_L        | hidden (fan-in I) + branch fold |
| dense_mlp_in      | 1/sqrt(m_d)         | 1/m_d            | 1/(m_d m_L)    | m_d            | hidden (fan-in H) |
| dense_mlp_out     | 1/(sqrt(m_M) m_L)   | 1/(m_M m_L)      | 1/m_d          | m_M m_L        | hidden (fan-in I_mlp) + branch fold |
| experts_gate_up   | 1/sqrt(m_d)         | 1/m_d            | 1/(m_d m_L)    | m_d            | MoE muP 2508.09752 (experts = hidden) |
| experts_down      | 1/(sqrt(m_I) m_L)   | 1/(m_I m_L)      | 1/m_d          | m_I m_L        | 2508.09752, 2601.20205 + branch fold |
| router            | 1/m_d               | 1/m_d            | 1/m_L          | m_d            | output-like (fan-out E finite): TP5 Tab. 3 |
| norm              | 1 (ones)            | 1                | 1/(m_d m_L)    | 0              | vector-like; CompleteP: lr m_L^(alpha-1) = 1 |
| bias              | 1 (zeros)           | 1                | 1/(m_d m_L)    | 0              | vector-like, as norm |
| lm_head           | 1/m_d               | 1/m_d            | 1/m_L          | m_d            | TP5 Tab. 3 (output weights), readout x 1/m_d folded |
| vision            | 1                   | 1                | 1              | 1              | not scaled (the vision tower keeps its base shape) |

Every rule keeps the forward pass the built-in's: no multiplier is applied at run time, so a MetaP checkpoint
is an ordinary Llama 4 checkpoint both ways. Two muP/CompleteP rules do carry forward multipliers, the readout's
1/m_d (microsoft/mup `MuReadout`) and CompleteP's residual-branch 1/m_L (alpha = 1, arXiv 2505.01618). Both are
folded into the weights they multiply, which is exact under AdamW: for y = a * W x, training W' = a W with
init a * std, lr a * eta, eps eps / a and weight decay wd / a gives the same W' at every step (Adam's update
is invariant to the gradient scale 1/a once eps scales with it; decoupled decay needs wd' lr' = wd lr).
A residual branch is linear in its last matrix (`o_proj`, the shared expert's and every routed expert's
`down_proj`, the dense MLP's `down_proj`), so its 1/m_L folds into that matrix; the readout's 1/m_d folds into
`lm_head`. Global-norm gradient clipping sees the folded gradients, so with clipping on the equivalence is
approximate. The eps column is CompleteP's eps / (m_d m_L^alpha) (eps follows the gradient's scale) with those
folds applied; an output-like matrix's gradient does not shrink with width, so it keeps the depth factor only.
Weight decay keeps lr x wd at the base run's value for every decayed group (CompleteP's wd x m_d, the
"independent" decay).

Expert count: the router score is a sigmoid of the top-k logit (not a softmax over experts) and top-k is fixed,
so an expert's input and the MoE output do not change scale with E; 2508.09752 reports the learning rate
transferring across expert counts under muP with no extra factor, so m_E enters no rule (it is validated and
reported, and benchmarks/bench_metap.py measures whether that holds here). The router is classified as an
output-like matrix (fan-in H, finite fan-out E), as muP does for any finite-output layer; 2508.09752 derives muP
for "both the router and experts" but its router table could not be checked here, so this classification is
ours. Attention keeps Llama's 1/sqrt(head_dim): width grows by heads at a fixed head_dim, as in Llama 4
(5120 = 40 x 128), so muP's 1/head_dim changes nothing; `o_proj`'s fan-in (heads x head_dim) is taken to grow
like H.

At the base shape every multiplier is 1 and this is exactly the standard parametrisation (the built-in's init,
one learning rate, decay on matrices and embeddings, none on norms and biases).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

BASE_FIELDS = (
    "metap_base_hidden_size",
    "metap_base_num_hidden_layers",
    "metap_base_intermediate_size",
    "metap_base_num_local_experts",
)
OPTIONAL_BASE_FIELDS = ("metap_base_intermediate_size_mlp",)


@dataclass(frozen=True)
class MetaPShape:
    """Target / base ratios along each scaling axis (all 1: the standard parametrisation)."""

    width: float = 1.0  # m_d
    expert_width: float = 1.0  # m_I
    mlp_width: float = 1.0  # m_M
    depth: float = 1.0  # m_L
    experts: float = 1.0  # m_E (enters no rule; see the module docstring)


@dataclass(frozen=True)
class MetaPRule:
    """One row of the table: multipliers of the base init std, learning rate, Adam eps and weight decay."""

    init: Callable[[MetaPShape], float]
    lr: Callable[[MetaPShape], float]
    eps: Callable[[MetaPShape], float]
    weight_decay: Callable[[MetaPShape], float]
    source: str


def _hidden(fan_in: Callable[[MetaPShape], float], source: str, branch_out: bool = False) -> MetaPRule:
    # muP hidden matrix (Adam): std ~ 1/sqrt(fan_in), lr ~ 1/fan_in. A residual branch's last matrix also carries
    # CompleteP's 1/m_L, folded into init and lr (and out of eps / wd, see the docstring).
    fold = (lambda s: 1.0 / s.depth) if branch_out else (lambda s: 1.0)
    return MetaPRule(
        init=lambda s: fold(s) / math.sqrt(fan_in(s)),
        lr=lambda s: fold(s) / fan_in(s),
        eps=lambda s: 1.0 / (s.width * s.depth * fold(s)),
        weight_decay=lambda s: fan_in(s) / fold(s),
        source=source,
    )


def _vector(source: str) -> MetaPRule:
    return MetaPRule(
        init=lambda s: 1.0,
        lr=lambda s: 1.0,
        eps=lambda s: 1.0 / (s.width * s.depth),
        weight_decay=lambda s: 0.0,
        source=source,
    )


def _output_like(source: str) -> MetaPRule:
    # muP output matrix (Adam, TP5 Table 3): init var 1/fan_in^2, lr 1/fan_in, no forward multiplier (for lm_head
    # this is MuReadout's 1/m_d logit multiplier folded in). Its gradient does not shrink with width, so eps keeps
    # only CompleteP's depth factor.
    return MetaPRule(
        init=lambda s: 1.0 / s.width,
        lr=lambda s: 1.0 / s.width,
        eps=lambda s: 1.0 / s.depth,
        weight_decay=lambda s: s.width,
        source=source,
    )


def _width(s: MetaPShape) -> float:
    return s.width


RULES: dict[str, MetaPRule] = {
    "embedding": MetaPRule(
        init=lambda s: 1.0,
        lr=lambda s: 1.0,
        eps=lambda s: 1.0 / (s.width * s.depth),
        weight_decay=lambda s: 1.0,
        source="input weights: Tensor Programs V Table 3 (init var 1/fan_in, fan_in = vocab; Adam lr 1); CompleteP",
    ),
    "attention_qkv": _hidden(_width, "hidden: Tensor Programs V Table 3, microsoft/mup MuAdam; CompleteP Table 1"),
    "attention_out": _hidden(_width, "hidden + CompleteP residual 1/m_L folded (arXiv 2505.01618)", branch_out=True),
    "shared_expert_in": _hidden(_width, "hidden, fan-in H: Tensor Programs V; CompleteP"),
    "shared_expert_out": _hidden(
        lambda s: s.expert_width, "hidden, fan-in I + residual fold: Tensor Programs V; CompleteP", branch_out=True
    ),
    "dense_mlp_in": _hidden(_width, "hidden, fan-in H: Tensor Programs V; CompleteP"),
    "dense_mlp_out": _hidden(
        lambda s: s.mlp_width, "hidden, fan-in I_mlp + residual fold: Tensor Programs V; CompleteP", branch_out=True
    ),
    "experts_gate_up": _hidden(_width, "experts as hidden, fan-in H: MoE muP arXiv 2508.09752, 2601.20205"),
    "experts_down": _hidden(
        lambda s: s.expert_width,
        "experts as hidden, fan-in I + residual fold: arXiv 2508.09752, 2601.20205; CompleteP",
        branch_out=True,
    ),
    "router": _output_like("router: output-like (finite fan-out E), Tensor Programs V Table 3; arXiv 2508.09752"),
    "norm": _vector("vector-like: Tensor Programs V (lr 1); CompleteP (lr m_L^(alpha-1) = 1, no decay)"),
    "bias": _vector("vector-like: Tensor Programs V (lr 1); CompleteP (lr m_L^(alpha-1) = 1, no decay)"),
    "lm_head": _output_like("lm_head: output weights, Tensor Programs V Table 3 / microsoft/mup MuReadout, folded"),
    "vision": MetaPRule(
        init=lambda s: 1.0,
        lr=lambda s: 1.0,
        eps=lambda s: 1.0,
        weight_decay=lambda s: 1.0,
        source="not scaled: the vision tower keeps its own shape",
    ),
}

# Parameter name -> group, matched on the name's tail so wrapper prefixes (`module.` from DDP, `_orig_mod.` from
# torch.compile, `base_model.model.` from PEFT, FSDP2 keeps names) do not matter. First match wins.
_PATTERNS: tuple[tuple[str, re.Pattern], ...] = tuple(
    (group, re.compile(pattern))
    for group, pattern in (
        ("vision", r"(^|\.)(vision_model|multi_modal_projector)\."),
        ("embedding", r"(^|\.)embed_tokens\.weight$"),
        ("lm_head", r"(^|\.)lm_head\.weight$"),
        ("attention_qkv", r"(^|\.)self_attn\.[qkv]_proj\.weight$"),
        ("attention_out", r"(^|\.)self_attn\.o_proj\.weight$"),
        ("shared_expert_in", r"(^|\.)feed_forward\.shared_expert\.(gate|up)_proj\.weight$"),
        ("shared_expert_out", r"(^|\.)feed_forward\.shared_expert\.down_proj\.weight$"),
        ("dense_mlp_in", r"(^|\.)feed_forward\.(gate|up)_proj\.weight$"),
        ("dense_mlp_out", r"(^|\.)feed_forward\.down_proj\.weight$"),
        ("experts_gate_up", r"(^|\.)feed_forward\.experts\.gate_up_proj$"),
        ("experts_down", r"(^|\.)feed_forward\.experts\.down_proj$"),
        ("router", r"(^|\.)feed_forward\.router\.weight$"),
        ("norm", r"norm\.weight$"),
        ("bias", r"\.bias$"),
    )
)


def metap_group(name: str) -> str:
    """The MetaP group of a parameter name (any wrapper prefix). Raises for a parameter no rule covers."""
    for group, pattern in _PATTERNS:
        if pattern.search(name):
            return group
    raise ValueError(
        f"MetaP has no rule for parameter {name!r}: it covers the Llama 4 text model's own parameters "
        f"({', '.join(RULES)}). Adapter parameters (LoRA) and other added modules are not covered: train them "
        "without --metap, or freeze them."
    )


def metap_shape(config) -> MetaPShape:
    """Target/base multipliers from a (text or multimodal) config; all 1 when MetaP is off. Raises on a base
    shape that is incomplete, does not divide the target, or is larger than the target."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    base = {name: getattr(config, name, None) for name in BASE_FIELDS + OPTIONAL_BASE_FIELDS}
    if all(base[name] is None for name in BASE_FIELDS):
        if base["metap_base_intermediate_size_mlp"] is not None:
            raise ValueError(
                "metap_base_intermediate_size_mlp is set but MetaP is off: also set " + ", ".join(BASE_FIELDS)
            )
        return MetaPShape()
    missing = [name for name in BASE_FIELDS if base[name] is None]
    if missing:
        raise ValueError(
            f"MetaP base shape is incomplete: {', '.join(missing)} not set. Set all of {', '.join(BASE_FIELDS)} "
            "to the shape the learning rate was tuned at (a field equal to the target's own value: no scaling "
            "along that axis)."
        )
    if getattr(config, "tie_word_embeddings", False):
        raise ValueError(
            "MetaP needs untied embeddings (tie_word_embeddings=False, as in Llama 4): the input embedding and "
            "lm_head follow different rules."
        )
    if base["metap_base_intermediate_size_mlp"] is None:
        base["metap_base_intermediate_size_mlp"] = (
            config.intermediate_size_mlp * base["metap_base_intermediate_size"] / config.intermediate_size
        )  # same ratio as the expert width

    def ratio(field: str, target: int) -> float:
        value = base[field]
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{field}={value!r} must be a positive integer")
        if target < value:
            raise ValueError(
                f"MetaP target {field.removeprefix('metap_base_')}={target} is smaller than the base {value}: the "
                "base is the small model the learning rate was tuned at, so the target must be at least as large. "
                "Swap them, or tune at a smaller base."
            )
        if target % value != 0:
            raise ValueError(
                f"MetaP base {field}={value} does not divide the target {field.removeprefix('metap_base_')}={target}: "
                "use a base that divides it (e.g. a power-of-two fraction), so every multiplier is an integer."
            )
        return target / value

    return MetaPShape(
        width=ratio("metap_base_hidden_size", config.hidden_size),
        expert_width=ratio("metap_base_intermediate_size", config.intermediate_size),
        mlp_width=ratio("metap_base_intermediate_size_mlp", config.intermediate_size_mlp),
        depth=ratio("metap_base_num_hidden_layers", config.num_hidden_layers),
        experts=ratio("metap_base_num_local_experts", config.num_local_experts),
    )


def metap_enabled(config) -> bool:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "metap_base_hidden_size", None) is not None


def metap_init_std(config, name: str) -> float:
    """Init std of parameter `name` under MetaP (`initializer_range` times the group's init multiplier)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text.initializer_range * RULES[metap_group(name)].init(metap_shape(config))


def metap_init_module(model: nn.Module, module: nn.Module) -> None:
    """Redraw the matrices of `module` (a submodule of `model`) at their MetaP init std. Called by `_init_weights`
    after the built-in init; leaves a parameter alone when its std equals the built-in's (so the base shape draws
    exactly the standard init) and when it was loaded from a checkpoint (`init.normal_` skips those)."""
    from transformers import initialization as init

    names = model.__dict__.get("_metap_module_names")
    if names is None or module not in names:
        names = {m: n for n, m in model.named_modules()}
        model.__dict__["_metap_module_names"] = names
    prefix = names.get(module)
    if prefix is None:
        return
    config = model.config
    shape = metap_shape(config)
    sigma = config.get_text_config().initializer_range
    for pname, param in module.named_parameters(recurse=False):
        group = metap_group(f"{prefix}.{pname}" if prefix else pname)
        if group in ("norm", "bias", "vision"):
            continue
        scale = RULES[group].init(shape)
        if scale != 1.0:
            init.normal_(param, mean=0.0, std=sigma * scale)


def metap_param_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    lr_multipliers: dict[str, float] | None = None,
    named_parameters: Iterable | None = None,
) -> list[dict]:
    """Optimizer parameter groups for `torch.optim.AdamW(groups)`: one per MetaP group, each with its `lr`,
    `weight_decay` and `eps` (and `metap_group`, its name). `learning_rate`, `weight_decay` and `eps` are the
    values tuned at the base shape; `lr_multipliers` (group name -> factor) applies per-group factors tuned at
    the base on top. With MetaP off (no base shape in the config) every multiplier is 1: the standard
    parametrisation, decay on matrices and embeddings only. Works on a wrapped model (DDP, FSDP2, compile)."""
    lr_multipliers = dict(lr_multipliers or {})
    unknown = sorted(set(lr_multipliers) - set(RULES))
    if unknown:
        raise ValueError(f"unknown MetaP group(s) {unknown} in lr_multipliers; the groups are {sorted(RULES)}")
    config = _find_config(model)
    shape = metap_shape(config)
    by_group: dict[str, list] = {}
    items = named_parameters if named_parameters is not None else model.named_parameters()
    for name, param in items:
        if param.requires_grad:
            by_group.setdefault(metap_group(name), []).append(param)
    groups = []
    for group, params in by_group.items():
        rule = RULES[group]
        groups.append(
            {
                "params": params,
                "lr": learning_rate * rule.lr(shape) * lr_multipliers.get(group, 1.0),
                "weight_decay": weight_decay * rule.weight_decay(shape),
                "eps": eps * rule.eps(shape),
                "metap_group": group,
            }
        )
    return groups


def _find_config(model: nn.Module):
    # Wrappers (DDP's `.module`, compile's `._orig_mod`, PEFT's `.base_model.model`) hide the config one level down.
    seen = model
    for _ in range(4):
        config = getattr(seen, "config", None)
        if config is not None and (hasattr(config, "hidden_size") or hasattr(config, "text_config")):
            return config
        seen = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None) or getattr(seen, "model", None)
        if seen is None:
            break
    raise ValueError(f"cannot find a Llama 4 config on {type(model).__name__}: pass the model itself, unwrapped")


__all__ = [
    "RULES",
    "MetaPRule",
    "MetaPShape",
    "metap_enabled",
    "metap_group",
    "metap_init_module",
    "metap_init_std",
    "metap_param_groups",
    "metap_shape",
]
