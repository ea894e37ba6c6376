"""MetaP (modeling_llama4/metap.py): each group's init std and AdamW multipliers against the stated rule, the base
shape being the standard parametrisation, a coordinate check, wrapping and resume, config round trip, errors."""

import math

import pytest
import torch

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from modeling_llama4.metap import RULES, metap_enabled, metap_group, metap_param_groups, metap_shape

from conftest import tiny_text_kwargs

SIGMA = 0.02
# Base shape: hidden 32, expert width 16, dense-MLP width 32, 2 layers, 4 experts. Layers 0 and 2 are MoE, 1 and 3
# dense, so every group is present.
BASE = dict(
    metap_base_hidden_size=32,
    metap_base_intermediate_size=16,
    metap_base_num_hidden_layers=2,
    metap_base_num_local_experts=4,
    metap_base_intermediate_size_mlp=32,
)


def config_at(width: int, depth: int = 2, experts: int = 4, metap: bool = True, **extra) -> Llama4TextConfig:
    heads = width // 16
    kwargs = tiny_text_kwargs(
        hidden_size=width,
        intermediate_size=width // 2,
        intermediate_size_mlp=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        num_local_experts=experts,
        moe_layers=list(range(0, depth, 2)),
        initializer_range=SIGMA,
        **extra,
    )
    return Llama4TextConfig(**kwargs, **(BASE if metap else {}))


def expected(group: str, m: float, L: float) -> tuple[float, float, float, float]:
    """(init std / sigma, lr, eps, wd multipliers) written out by hand from the table, for width ratio m (expert
    and MLP widths scale with it here) and depth ratio L."""
    return {
        "embedding": (1, 1, 1 / (m * L), 1),
        "attention_qkv": (1 / math.sqrt(m), 1 / m, 1 / (m * L), m),
        "attention_out": (1 / (math.sqrt(m) * L), 1 / (m * L), 1 / m, m * L),
        "shared_expert_in": (1 / math.sqrt(m), 1 / m, 1 / (m * L), m),
        "shared_expert_out": (1 / (math.sqrt(m) * L), 1 / (m * L), 1 / m, m * L),
        "dense_mlp_in": (1 / math.sqrt(m), 1 / m, 1 / (m * L), m),
        "dense_mlp_out": (1 / (math.sqrt(m) * L), 1 / (m * L), 1 / m, m * L),
        "experts_gate_up": (1 / math.sqrt(m), 1 / m, 1 / (m * L), m),
        "experts_down": (1 / (math.sqrt(m) * L), 1 / (m * L), 1 / m, m * L),
        "router": (1 / m, 1 / m, 1 / L, m),
        "lm_head": (1 / m, 1 / m, 1 / L, m),
        "norm": (None, 1, 1 / (m * L), 0),
    }[group]


@pytest.mark.parametrize("width,depth", [(64, 2), (128, 4)])
def test_each_group_follows_its_rule(width, depth):
    torch.manual_seed(0)
    model = Llama4ForCausalLM(config_at(width, depth))
    m, L = width / 32, depth / 2
    groups = {g["metap_group"]: g for g in metap_param_groups(model, 1e-3, weight_decay=0.1, eps=1e-8)}
    assert set(groups) == set(RULES) - {"bias", "vision"}
    for name, group in groups.items():
        init, lr, eps, wd = expected(name, m, L)
        assert group["lr"] == pytest.approx(1e-3 * lr), name
        assert group["eps"] == pytest.approx(1e-8 * eps), name
        assert group["weight_decay"] == pytest.approx(0.1 * wd), name
        if init is None:
            continue
        values = torch.cat([p.detach().flatten() for p in group["params"]])
        # Empirical std of >= 512 draws: within 15% of the rule (the rules differ by >= sqrt(2) between widths).
        assert values.std().item() == pytest.approx(SIGMA * init, rel=0.15), name
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name


def test_base_shape_is_the_standard_parametrisation():
    shape = metap_shape(config_at(32))
    for name, rule in RULES.items():
        values = (rule.init(shape), rule.lr(shape), rule.eps(shape))
        assert values == (1.0, 1.0, 1.0), name
        assert rule.weight_decay(shape) == (0.0 if name in ("norm", "bias") else 1.0), name
    torch.manual_seed(0)
    metap = Llama4ForCausalLM(config_at(32))
    torch.manual_seed(0)
    standard = Llama4ForCausalLM(config_at(32, metap=False))
    for (name, a), (_, b) in zip(metap.named_parameters(), standard.named_parameters(), strict=True):
        assert torch.equal(a, b), name  # same draws: the base shape changes nothing at init
    assert {g["lr"] for g in metap_param_groups(metap, 3e-4)} == {3e-4}


def test_standard_model_gets_one_learning_rate_and_no_decay_on_vectors():
    model = Llama4ForCausalLM(config_at(64, metap=False))
    groups = metap_param_groups(model, 1e-3, weight_decay=0.1)
    assert {g["lr"] for g in groups} == {1e-3}
    decay = {g["metap_group"]: g["weight_decay"] for g in groups}
    assert decay["norm"] == 0.0 and decay["lm_head"] == 0.1 and decay["embedding"] == 0.1


def _logit_rms_after_training(width: int, metap: bool, steps: int = 4, lr: float = 3e-2) -> tuple[float, float]:
    torch.manual_seed(0)
    model = Llama4ForCausalLM(config_at(width, metap=metap))
    ids = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(metap_param_groups(model, lr))
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states[1]  # the first layer's output
    return out.logits.pow(2).mean().sqrt().item(), hidden.pow(2).mean().sqrt().item()


def test_coordinate_check_is_flat_under_metap_and_not_under_standard():
    # Width 32 -> 128 (4x) after a few AdamW steps at one learning rate: under MetaP the logits' RMS stays within
    # 1.5x; under the standard parametrisation the same updates grow the logits with the fan-in.
    metap = [_logit_rms_after_training(w, metap=True) for w in (32, 128)]
    standard = [_logit_rms_after_training(w, metap=False) for w in (32, 128)]
    metap_ratio = metap[1][0] / metap[0][0]
    standard_ratio = standard[1][0] / standard[0][0]
    assert 1 / 1.5 < metap_ratio < 1.5, (metap, standard)
    assert standard_ratio > 2.0, (metap, standard)
    hidden_metap = metap[1][1] / metap[0][1]
    hidden_standard = standard[1][1] / standard[0][1]
    assert hidden_metap < hidden_standard, (metap, standard)


def test_names_survive_wrapping():
    model = Llama4ForCausalLM(config_at(64))
    plain = [(g["metap_group"], g["lr"], len(g["params"])) for g in metap_param_groups(model, 1e-3)]
    compiled = torch.compile(model)  # parameters named `_orig_mod.*`; nothing is compiled until called
    assert [(g["metap_group"], g["lr"], len(g["params"])) for g in metap_param_groups(compiled, 1e-3)] == plain

    assert [(g["metap_group"], g["lr"], len(g["params"])) for g in metap_param_groups(Wrapper(model), 1e-3)] == plain


def test_names_survive_ddp_and_fsdp2(tmp_path):
    # Real wrappers on a one-process gloo group: DDP prefixes `module.`, FSDP2 keeps names but swaps in DTensors.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = Llama4ForCausalLM(config_at(64))
        plain = [(g["metap_group"], g["lr"], len(g["params"])) for g in metap_param_groups(model, 1e-3)]
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert [(g["metap_group"], g["lr"], len(g["params"])) for g in metap_param_groups(ddp, 1e-3)] == plain

        sharded = Llama4ForCausalLM(config_at(64))
        mesh = init_device_mesh("cpu", (1,))
        for layer in sharded.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        groups = metap_param_groups(sharded, 1e-3)
        assert [(g["metap_group"], g["lr"], len(g["params"])) for g in groups] == plain
        optimizer = torch.optim.AdamW(groups)
        ids = torch.randint(3, 96, (2, 8))
        sharded(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()  # the groups hold the sharded parameters themselves
    finally:
        dist.destroy_process_group()


class Wrapper(torch.nn.Module):  # DDP's and accelerate's naming without a process group: `module.*`
    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.slow
def test_trainer_mixin_survives_accelerate_and_resume(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from recipes.metap import metap_trainer

    torch.manual_seed(0)
    ids = torch.randint(3, 96, (16, 12), generator=torch.Generator().manual_seed(2)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})

    def trainer(max_steps: int):
        torch.manual_seed(0)
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=max_steps,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            weight_decay=0.1,
            lr_scheduler_type="constant",
            save_steps=2,
            save_strategy="steps",
            use_cpu=True,
            report_to="none",
            disable_tqdm=True,
        )
        return metap_trainer(Trainer)(model=Llama4ForCausalLM(config_at(64)), args=args, train_dataset=data)

    first = trainer(2)
    first.train()
    saved = {g["metap_group"]: g["lr"] for g in first.optimizer.param_groups}
    assert saved["attention_qkv"] == pytest.approx(1e-3 / 2) and saved["embedding"] == pytest.approx(1e-3)
    state_before = first.optimizer.state_dict()["state"]

    resumed = trainer(3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    groups = resumed.optimizer.param_groups
    assert {g["metap_group"]: g["lr"] for g in groups} == pytest.approx(saved)
    # Adam's step count continued from the checkpoint (2 saved steps + 1): the state was restored, not rebuilt.
    state = resumed.optimizer.state_dict()["state"]
    assert len(state) == len(state_before)
    assert all(int(s["step"]) == 3 for s in state.values())


def test_config_round_trip(tmp_path):
    config = config_at(64)
    config.save_pretrained(tmp_path)
    loaded = Llama4TextConfig.from_pretrained(tmp_path)
    for name, value in BASE.items():
        assert getattr(loaded, name) == value
    assert metap_shape(loaded) == metap_shape(config)
    off = config_at(64, metap=False)
    assert off.metap_base_hidden_size is None and "metap_base_hidden_size" not in off.to_diff_dict()


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(metap_base_hidden_size=48), "does not divide"),
        (dict(metap_base_hidden_size=128), "smaller than the base"),
        (dict(metap_base_num_hidden_layers=None), "incomplete"),
        (dict(metap_base_num_local_experts=3), "does not divide"),
    ],
)
def test_bad_base_shapes_are_refused(fields, message):
    config = config_at(64)
    for name, value in fields.items():
        setattr(config, name, value)
    with pytest.raises(ValueError, match=message):
        metap_shape(config)
    with pytest.raises(ValueError, match=message):
        Llama4ForCausalLM(config)


def test_unknown_names_are_refused():
    model = Llama4ForCausalLM(config_at(64))
    with pytest.raises(ValueError, match="unknown MetaP group"):
        metap_param_groups(model, 1e-3, lr_multipliers={"atention": 2.0})
    with pytest.raises(ValueError, match="no rule for parameter 'base_model.model.x.lora_A.default.weight'"):
        metap_group("base_model.model.x.lora_A.default.weight")
    groups = metap_param_groups(model, 1e-3, lr_multipliers={"router": 0.5})
    assert {g["metap_group"]: g["lr"] for g in groups}["router"] == pytest.approx(1e-3 / 2 * 0.5)


def test_recipe_flags_reach_the_config():
    from recipes.metap import with_metap_overrides
    from recipes.pretrain import PretrainScriptArguments

    args = PretrainScriptArguments(metap=True, metap_base_hidden_size=32, model_config_overrides='{"hidden_size": 64}')
    with_metap_overrides(args)
    assert args.model_config_overrides == {"hidden_size": 64, "metap_base_hidden_size": 32}
    with pytest.raises(ValueError, match="without --metap true"):
        with_metap_overrides(PretrainScriptArguments(metap_base_hidden_size=32))


def test_recipe_base_flags_build_a_metap_model_from_a_config_without_them():
    """hub_configs/tiny's config.json has no `metap_base_*` entries; the overrides check must still know them."""
    from eval.loading import load_causal_lm
    from recipes.metap import with_metap_overrides
    from recipes.pretrain import PretrainScriptArguments

    base = dict(metap_base_hidden_size=32, metap_base_num_hidden_layers=2, metap_base_intermediate_size=16)
    args = PretrainScriptArguments(metap=True, metap_base_num_local_experts=4, **base)
    with_metap_overrides(args)
    model = load_causal_lm("hub_configs/tiny", config_overrides=args.model_config_overrides, from_scratch=True)
    assert model.config.metap_base_hidden_size == 32 and metap_enabled(model.config)


def test_folding_a_forward_multiplier_into_the_weight_is_exact_under_adamw():
    # The docstring's claim behind the depth and readout rules: y = a * W x trained with (lr, eps, wd) equals
    # W' = a W trained with (a lr, eps / a, wd / a), step for step.
    a, lr, eps, wd = 0.25, 1e-2, 1e-3, 0.1  # a large eps, so its scaling matters
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    w_folded = torch.nn.Parameter(a * w.detach().clone())
    opt = torch.optim.AdamW([w], lr=lr, eps=eps, weight_decay=wd)
    opt_folded = torch.optim.AdamW([w_folded], lr=a * lr, eps=eps / a, weight_decay=wd / a)
    for step in range(5):
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
        (a * x @ w.T).tanh().pow(2).sum().backward()
        (x @ w_folded.T).tanh().pow(2).sum().backward()
        opt.step()
        opt_folded.step()
        opt.zero_grad()
        opt_folded.zero_grad()
    torch.testing.assert_close(w_folded.detach(), a * w.detach(), rtol=1e-5, atol=1e-6)


def test_loading_a_metap_checkpoint_keeps_its_weights(tmp_path):
    model = Llama4ForCausalLM(config_at(64, depth=4))
    model.save_pretrained(tmp_path)
    loaded = Llama4ForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.metap_base_hidden_size == 32
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
