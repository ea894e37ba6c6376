"""Int4 experts: Meta's format bit for bit, the kernels against dequantize-then-fp32, quantize-on-load, save/load,
remote code through the local Hub, and the errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import LocalHub, hub_env, patch_hub_constants
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import modeling_llama4
from modeling_llama4 import (
    Int4Config,
    Llama4Config,
    Llama4ForCausalLM,
    Llama4ForConditionalGeneration,
    Llama4TextConfig,
    Llama4TextExperts,
    dequantize_model,
    push_to_hub,
    quantize_model,
)
from modeling_llama4 import int4 as int4_module
from modeling_llama4.int4 import (
    Int4Linear,
    Int4TextExperts,
    Int4TextMLP,
    pack_int4,
    quantize_int4,
    unpack_int4,
)

from conftest import tiny_text_kwargs

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "hub_configs" / "tiny"


# Meta's llama-models `models/quantize_impls.py`, re-typed from its formula (int4_row_quantize + pack_int4).
def meta_int4_row_quantize(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    to_quant = x.reshape(-1, group_size).to(torch.float)
    max_val = torch.abs(to_quant).amax(dim=1, keepdim=True)
    scales = max_val.clamp(min=1e-6) / 8
    out = to_quant.div(scales).round().clamp_(-8, 7)
    out = out.to(dtype=torch.int8).reshape(x.shape)
    return out, scales.view(x.shape[0], -1).t().contiguous()  # [K / group_size, N]


def meta_pack_int4(x: torch.Tensor) -> torch.Tensor:
    low_x, high_x = x[:, ::2], x[:, 1::2]
    high_x = torch.bitwise_left_shift(high_x, 4)
    low_x = torch.bitwise_and(low_x, 0xF)
    return torch.bitwise_or(low_x, high_x).contiguous()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 3),
    group_size=st.sampled_from([2, 8, 32, 128]),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    ties=st.booleans(),
)
def test_quantize_is_metas_bit_for_bit(rows, groups, group_size, seed, dtype, ties):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, groups * group_size, generator=generator)
    if ties:  # every group's absmax is 8, so scale = 1 and w / scale hits exact halves: half to even must match
        weight = torch.randint(-16, 17, weight.shape, generator=generator).float() / 2
        weight[:, ::group_size] = 8.0
    weight = weight.to(dtype)
    values, scales = quantize_int4(weight, group_size)
    meta_values, meta_scales = meta_int4_row_quantize(weight, group_size)
    assert torch.equal(values, meta_values)
    assert torch.equal(scales.t(), meta_scales)
    assert torch.equal(pack_int4(values), meta_pack_int4(meta_values))


def test_round_half_to_even_and_clamp():
    # scale = 8 / 8 = 1: 2.5 -> 2, 3.5 -> 4, -2.5 -> -2, -8 stays, the absmax +8 clamps to 7
    weight = torch.tensor([[2.5, 3.5, -2.5, 8.0, -8.0, 0.5, 1.5, 0.0]])
    values, scales = quantize_int4(weight, 8)
    assert values.tolist() == [[2, 4, -2, 7, -8, 0, 2, 0]]
    assert scales.tolist() == [[1.0]]
    assert quantize_int4(torch.zeros(1, 8), 8)[1].item() == pytest.approx(1e-6 / 8)  # the clamp, no NaN


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 8)), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(shape, seed):
    values = torch.randint(-8, 8, (*shape[:-1], 2 * shape[-1]), generator=torch.Generator().manual_seed(seed))
    values = values.to(torch.int8)
    packed = pack_int4(values)
    assert packed.dtype == torch.int8 and packed.shape[-1] == shape[-1]
    assert torch.equal(unpack_int4(packed), values)


def experts_config(hidden=64, inter=32, experts=4, top_k=2):
    return Llama4TextConfig(
        **tiny_text_kwargs(
            hidden_size=hidden, intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=top_k
        )
    )


@pytest.mark.parametrize(
    "dtype, inter, group_size, uses_kernel",
    [
        (torch.float32, 32, 32, False),  # float32: the routed experts' own weights dequantized, exact
        (torch.bfloat16, 32, 32, True),  # bf16, few rows: torch's int4 GEMM
        (torch.bfloat16, 48, 16, False),  # a group size the kernel does not take: dequantized in bf16
    ],
)
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_int4_experts_match_dequantized_fp32_experts(dtype, inter, group_size, uses_kernel, rows):
    config = experts_config(64, inter, experts=4, top_k=2)
    float_experts = Llama4TextExperts(config)
    torch.nn.init.normal_(float_experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(float_experts.down_proj, std=0.1)
    quantized = Int4TextExperts.from_experts(float_experts, config, group_size)
    reference = Llama4TextExperts(config)
    gate_up, down = quantized.dequantized_weights(torch.float32)
    reference.gate_up_proj.data, reference.down_proj.data = gate_up, down

    x = torch.randn(rows, 64).to(dtype)
    ids = torch.randint(0, 4, (rows, 2))
    ids[0] = torch.tensor([1, 1 if rows > 1 else 0])
    weights = torch.rand(rows, 2)
    with torch.no_grad():
        out = quantized(x, ids, weights)
        expected = reference(x.float(), ids, weights)
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:  # bf16 activations and outputs: bf16 rounding of the intermediate and the result
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    # only the experts that got tokens ran, through torch's int4 GEMM where dtype and shapes allow it
    ran = {key[1] for key in quantized.kernel_cache.entries}
    assert ran == (set(ids.unique().tolist()) if uses_kernel else set())


def test_int4_experts_ignore_foreign_ids_and_pass_input_gradients():
    config = experts_config(top_k=1)
    float_experts = Llama4TextExperts(config)
    torch.nn.init.normal_(float_experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(float_experts.down_proj, std=0.1)
    quantized = Int4TextExperts.from_experts(float_experts, config, 32)
    x = torch.randn(5, 64, requires_grad=True)
    ids = torch.tensor([[0], [9], [2], [9], [0]])  # 9: another rank's expert
    out = quantized(x, ids, torch.ones(5, 1))
    assert out[1].abs().max() == 0 and out[3].abs().max() == 0
    out.square().sum().backward()
    reference = Llama4TextExperts(config)
    reference.gate_up_proj.data, reference.down_proj.data = quantized.dequantized_weights()
    x_ref = x.detach().clone().requires_grad_(True)
    reference(x_ref, ids, torch.ones(5, 1)).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in quantized.parameters())


def test_int4_linear_matches_dequantized_linear_both_paths():
    for out_features, group_size in ((48, 32), (40, 16)):
        linear = torch.nn.Linear(64, out_features, bias=False)
        quantized = Int4Linear.from_linear(linear, group_size)
        x = torch.randn(3, 5, 64)
        expected = x @ quantized.dequantized_weight().t()
        torch.testing.assert_close(quantized(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(quantized(x.bfloat16()).float(), expected, rtol=2e-2, atol=2e-2)
        assert bool(quantized.kernel_cache.entries) == (out_features % 16 == 0 and group_size == 32)
    many_rows = torch.randn(int4_module.KERNEL_MAX_ROWS + 1, 64).bfloat16()  # past the kernel's row range
    quantized = Int4Linear.from_linear(torch.nn.Linear(64, 48, bias=False), 32)
    quantized(many_rows)
    assert not quantized.kernel_cache.entries


def test_bad_group_size_errors():
    with pytest.raises(ValueError, match="does not divide the 64 input features"):
        Int4Linear(64, 32, group_size=48)
    with pytest.raises(ValueError, match="positive even"):
        Int4Config(group_size=7)
    with pytest.raises(
        ValueError, match=r"32 input features of model.layers.0.feed_forward.experts.down_proj \(intermediate_size\)"
    ):
        quantize_model(Llama4ForCausalLM(Llama4TextConfig(**tiny_text_kwargs())), Int4Config(group_size=64))
    with pytest.raises(ValueError, match="only describes 'llama4_int4'"):
        Int4Config.from_dict({"quant_method": "bitsandbytes", "group_size": 32})


def test_quantize_model_takes_the_config_as_a_dict_too():
    model = quantize_model(Llama4ForCausalLM(Llama4TextConfig(**tiny_text_kwargs())), {"group_size": 16})
    assert model.config.quantization_config.group_size == 16
    with pytest.raises(ValueError, match=r"unknown settings \['group_sise'\]"):
        quantize_model(Llama4ForCausalLM(Llama4TextConfig(**tiny_text_kwargs())), {"group_sise": 16})
    with pytest.raises(TypeError, match="takes an Int4Config"):
        quantize_model(Llama4ForCausalLM(Llama4TextConfig(**tiny_text_kwargs())), 16)


@pytest.mark.parametrize("group_size", [2.5, None, True, "a lot"])
def test_a_group_size_that_is_not_a_whole_number_errors(group_size):
    with pytest.raises(ValueError, match=r"give a whole number, e.g. 128"):
        Int4Config(group_size=group_size)
    assert Int4Config(group_size=128.0).group_size == Int4Config(group_size="64").group_size * 2 == 128


def test_modules_to_not_convert_takes_one_name_and_warns_about_names_that_match_nothing(tmp_path):
    assert Int4Config(modules_to_not_convert="lm_head").modules_to_not_convert == ["lm_head"]
    model = Llama4ForCausalLM(Llama4TextConfig(**tiny_text_kwargs()))
    model.save_pretrained(tmp_path)
    keep_layer_1 = Int4Config(group_size=16, modules_to_not_convert=["layers.1.feed_forward"])  # its experts too
    loaded = Llama4ForCausalLM.from_pretrained(tmp_path, quantization_config=keep_layer_1)
    assert isinstance(loaded.model.layers[0].feed_forward.experts, Int4TextExperts)
    kept_experts = loaded.model.layers[1].feed_forward.experts
    assert torch.equal(kept_experts.gate_up_proj, model.model.layers[1].feed_forward.experts.gate_up_proj)
    kept = "layers.1.feed_forward"
    with pytest.warns(UserWarning, match=r"\['layer.0.feed_forward'\]\) names no module of this model"):
        quantize_model(model, Int4Config(group_size=16, modules_to_not_convert=["layer.0.feed_forward", kept]))
    assert not isinstance(model.model.layers[1].feed_forward.experts, Int4TextExperts)
    assert isinstance(model.model.layers[0].feed_forward.experts, Int4TextExperts)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return Llama4ForCausalLM(Llama4TextConfig(**tiny_text_kwargs())).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_quantize_on_load_save_and_reload_bit_identical(tiny_model, tmp_path):
    ids = torch.randint(3, 96, (2, 20))
    tiny_model.save_pretrained(tmp_path / "bf", max_shard_size="60KB")
    assert len(list((tmp_path / "bf").glob("*.safetensors"))) > 3  # several shards
    loaded = Llama4ForCausalLM.from_pretrained(tmp_path / "bf", quantization_config=Int4Config(group_size=32))
    layer = loaded.model.layers[0]
    assert isinstance(layer.feed_forward.experts, Int4TextExperts)
    assert isinstance(layer.feed_forward.shared_expert, Int4TextMLP)
    assert isinstance(layer.self_attn.q_proj, torch.nn.Linear) and loaded.lm_head.weight.dtype == torch.float32
    assert loaded.is_quantized and loaded.config.quantization_config.group_size == 32
    # quantizing while loading gives exactly what quantizing the loaded float model gives
    direct = quantize_model(Llama4ForCausalLM.from_pretrained(tmp_path / "bf"), Int4Config(group_size=32))
    expected = logits(direct, ids)
    assert torch.equal(logits(loaded, ids), expected)
    assert (expected - logits(tiny_model, ids)).abs().max() < 0.1  # int4 is close, not equal

    loaded.save_pretrained(tmp_path / "int4")
    saved = json.loads((tmp_path / "int4" / "config.json").read_text())
    assert saved["quantization_config"] == {
        "quant_method": "llama4_int4",
        "group_size": 32,
        "modules_to_not_convert": None,
    }
    tensors = load_file(tmp_path / "int4" / "model.safetensors")
    assert tensors["model.layers.0.feed_forward.experts.gate_up_proj"].dtype == torch.int8
    assert tensors["model.layers.0.feed_forward.experts.gate_up_proj"].shape == (4, 64, 32)
    assert tensors["model.layers.0.feed_forward.experts.gate_up_proj_scale"].shape == (4, 64, 2)
    assert tensors["model.layers.0.feed_forward.shared_expert.down_proj.weight_scale"].shape == (64, 1)
    reloaded = Llama4ForCausalLM.from_pretrained(tmp_path / "int4")
    assert reloaded.is_quantized and isinstance(reloaded.model.layers[1].feed_forward.experts, Int4TextExperts)
    assert torch.equal(logits(reloaded, ids), expected)


def test_load_time_peak_holds_int4_plus_one_tensor(tiny_model, tmp_path, monkeypatch):
    """While loading, the float weights alive at any moment are one checkpoint tensor, never the whole model."""
    tiny_model.save_pretrained(tmp_path / "bf", max_shard_size="60KB")
    quantized_names = (".experts.", ".shared_expert.")
    float_tensors = [p for n, p in tiny_model.named_parameters() if any(q in n for q in quantized_names)]
    largest = max(p.numel() * p.element_size() for p in float_tensors)
    num_weights = sum(p.numel() for p in float_tensors)
    peaks, real_convert = [], int4_module.Int4Quantize.convert
    holder = {}

    def spying_convert(self, input_dict, **kwargs):
        model = holder.get("model")
        incoming = sum(
            t.numel() * t.element_size() for v in input_dict.values() for t in (v if isinstance(v, list) else [v])
        )
        if model is not None:
            resident = sum(
                p.numel() * p.element_size()
                for n, p in model.named_parameters()
                if any(q in n for q in quantized_names)
                and p.device.type != "meta"
                and p.is_floating_point()
                and not n.endswith("_scale")
            )
            peaks.append(resident + incoming)
        return real_convert(self, input_dict, **kwargs)

    real_before = int4_module.Int4HfQuantizer._process_model_before_weight_loading

    def remember(self, model, **kwargs):
        holder["model"] = model
        return real_before(self, model, **kwargs)

    monkeypatch.setattr(int4_module.Int4Quantize, "convert", spying_convert)
    monkeypatch.setattr(int4_module.Int4HfQuantizer, "_process_model_before_weight_loading", remember)
    loaded = Llama4ForCausalLM.from_pretrained(tmp_path / "bf", quantization_config=Int4Config(group_size=32))
    assert len(peaks) == 4 * 2 + 4 * 3  # every expert tensor and shared-expert Linear went through the op
    assert max(peaks) == largest  # no float MoE weight stays resident: one tensor at a time
    # what stays: half a byte per weight plus one float32 scale per 32 weights
    assert int4_module.int4_bytes(loaded)["int4_modules"] == num_weights // 2 + num_weights // 32 * 4


def test_multimodal_quantize_on_load_and_reload(tmp_path):
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(Llama4Config.from_pretrained(TINY)).eval()
    model.save_pretrained(tmp_path / "bf")
    group = 32
    loaded = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "bf", quantization_config=Int4Config(group))
    moe = loaded.language_model.model.layers[0].feed_forward
    assert isinstance(moe.experts, Int4TextExperts) and loaded.is_quantized
    assert not any(isinstance(m, (Int4Linear, Int4TextExperts)) for m in loaded.vision_model.modules())
    ids = torch.randint(3, 800, (1, 12))
    expected = logits(loaded, ids)
    loaded.save_pretrained(tmp_path / "int4")
    reloaded = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "int4")
    assert torch.equal(logits(reloaded, ids), expected)
    text_only = Llama4ForCausalLM.from_pretrained(tmp_path / "int4")  # the text half of the int4 repo
    assert torch.equal(logits(text_only, ids), expected)


def test_already_quantized_errors(tiny_model, tmp_path):
    quantized = quantize_model(tiny_model, Int4Config(group_size=32))
    with pytest.raises(ValueError, match="already quantized; int4 needs a full-precision model"):
        quantize_model(quantized, Int4Config(group_size=32))
    quantized.save_pretrained(tmp_path / "int4")
    with pytest.raises(ValueError, match="already int4 with group_size=32.*group_size=16"):
        Llama4ForCausalLM.from_pretrained(tmp_path / "int4", quantization_config=Int4Config(group_size=16))
    same = Llama4ForCausalLM.from_pretrained(tmp_path / "int4", quantization_config=Int4Config(group_size=32))
    assert isinstance(same.model.layers[0].feed_forward.experts, Int4TextExperts)  # same settings: a plain load

    config = json.loads((tmp_path / "int4" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "int4" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"already quantized \(bitsandbytes\)"):
        Llama4ForCausalLM.from_pretrained(tmp_path / "int4", quantization_config=Int4Config(group_size=32))


@pytest.mark.parametrize("damage", ["missing", "misshaped"])
def test_int4_checkpoint_with_broken_scales_errors(tiny_model, tmp_path, damage):
    quantize_model(tiny_model, Int4Config(group_size=32)).save_pretrained(tmp_path / "int4")
    path = tmp_path / "int4" / "model.safetensors"
    tensors = load_file(path)
    key = "model.layers.2.feed_forward.experts.down_proj_scale"
    if damage == "missing":
        del tensors[key]
    else:
        tensors[key] = tensors[key][:, :, :1].repeat(1, 1, 3).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    message = "is missing" if damage == "missing" else r"has shape \(4, 64, 3\), expected \(4, 64, 1\)"
    with pytest.raises(ValueError, match=f"does not match its quantization_config: .*down_proj_scale {message}"):
        Llama4ForCausalLM.from_pretrained(tmp_path / "int4")


def test_dequantize_model_gives_float_modules_with_the_same_logits(tiny_model):
    ids = torch.randint(3, 96, (1, 10))
    quantized = quantize_model(tiny_model, Int4Config(group_size=32))
    expected = logits(quantized, ids)
    restored = dequantize_model(quantized)
    assert not restored.is_quantized and not hasattr(restored.config, "quantization_config")
    assert isinstance(restored.model.layers[0].feed_forward.experts, Llama4TextExperts)
    torch.testing.assert_close(logits(restored, ids), expected, rtol=1e-5, atol=1e-5)


PULL_INT4 = """
import sys
sys.modules["modeling_llama4"] = None
import torch
from transformers import AutoModelForCausalLM
repo, inputs_path, out_path = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
experts = model.model.layers[0].feed_forward.experts
with torch.no_grad():
    logits = model(torch.load(inputs_path)).logits
torch.save({"logits": logits, "experts": f"{type(experts).__module__}.{type(experts).__name__}",
            "quantized": model.is_quantized}, out_path)
"""


@pytest.mark.slow
def test_int4_repo_pulls_through_remote_code_bit_identical(tiny_model, tmp_path, hub_online):
    quantized = quantize_model(tiny_model, Int4Config(group_size=32))
    ids = torch.randint(3, 96, (2, 16))
    expected = logits(quantized, ids)
    with LocalHub() as hub:
        with patch_hub_constants(hub, tmp_path / "push-cache"):
            push_to_hub(quantized, "org/tiny-int4")
        assert "int4.py" in hub.files("org/tiny-int4")
        torch.save(ids, tmp_path / "ids.pt")
        env = {**os.environ, **hub_env(hub, tmp_path / "pull-cache")}
        env.pop("PYTHONPATH", None)
        result = subprocess.run(
            [sys.executable, "-c", PULL_INT4, "org/tiny-int4", tmp_path / "ids.pt", tmp_path / "out.pt"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["experts"].startswith("transformers_modules.") and out["experts"].endswith("int4.Int4TextExperts")
    assert out["quantized"]
    assert torch.equal(out["logits"], expected)


def test_kernel_path_passes_input_gradients_in_bf16():
    quantized = Int4Linear.from_linear(torch.nn.Linear(64, 48, bias=False), 32)
    x = torch.randn(4, 64).bfloat16().requires_grad_(True)
    quantized(x).float().square().sum().backward()
    assert quantized.kernel_cache.entries  # the int4 GEMM ran
    x_ref = x.detach().float().requires_grad_(True)
    (x_ref @ quantized.dequantized_weight().t()).square().sum().backward()
    torch.testing.assert_close(x.grad.float(), x_ref.grad, rtol=3e-2, atol=3e-2)


def test_kernel_resident_model_gives_the_kernel_logits_and_refuses_other_uses(tiny_model):
    model = quantize_model(tiny_model, Int4Config(group_size=32)).to(torch.bfloat16)
    ids = torch.randint(3, 96, (2, 6))
    expected = logits(model, ids)  # bf16, few rows: the kernel path
    held = int4_module.make_kernel_resident(model)
    experts = model.model.layers[0].feed_forward.experts
    assert experts.gate_up_proj.numel() == 0 and held > 0
    assert torch.equal(logits(model, ids), expected)
    with pytest.raises(RuntimeError, match="kernel layout.*got torch.float32"):
        experts(torch.randn(3, 64), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    with pytest.raises(RuntimeError, match="cannot be moved or cast"):
        experts.float()


def test_remote_code_copy_loads_int4_next_to_the_package_and_builtin_is_refused(tiny_model, tmp_path):
    import transformers
    from transformers import AutoModelForCausalLM

    quantized = quantize_model(tiny_model, Int4Config(group_size=32))
    ids = torch.randint(3, 96, (1, 8))
    expected = logits(quantized, ids)
    quantized.save_pretrained(tmp_path / "int4")
    # the remote-code classes are other classes than the package's, in the same process; the package's own
    # registration would win over remote code (transformers prefers explicitly registered classes), so lift it
    modeling_llama4.unregister()
    try:
        remote = AutoModelForCausalLM.from_pretrained(tmp_path / "int4", trust_remote_code=True)
    finally:
        modeling_llama4.register()
    assert type(remote).__module__.startswith("transformers_modules.")
    assert type(remote.model.layers[0].feed_forward.experts).__name__ == "Int4TextExperts"
    assert torch.equal(logits(remote, ids), expected)
    tiny_model_float = Llama4ForCausalLM(Llama4TextConfig(**tiny_text_kwargs()))
    tiny_model_float.save_pretrained(tmp_path / "bf")
    with pytest.raises(ValueError, match="found no llama4-hf experts"):
        transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "bf", quantization_config=Int4Config(group_size=32))
