"""`--load_in_int4` in the recipes: the flag parses in sft/dpo/online_rl, the loader quantizes, and TRL's LoRA
settings (including `lora_target_parameters` on the fused experts) land on the int4 modules."""

from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from trl import DPOConfig, GRPOConfig, ModelConfig, SFTConfig, TrlParser

from modeling_llama4 import Int4Config, Llama4ForCausalLM, Llama4TextConfig, quantize_model
from modeling_llama4.int4 import Int4TextExperts
from modeling_llama4.int4_lora import Int4LoraExperts, Int4LoraLinear
from recipes.common import load_model, peft_config_for
from recipes.dpo import DPOScriptArguments
from recipes.online_rl import OnlineRLScriptArguments
from recipes.sft import SFTScriptArguments

TINY = Path(__file__).resolve().parents[1] / "hub_configs" / "tiny"


@pytest.mark.parametrize(
    "script_args, config_class",
    [(SFTScriptArguments, SFTConfig), (DPOScriptArguments, DPOConfig), (OnlineRLScriptArguments, GRPOConfig)],
)
def test_flag_parses_in_every_recipe(script_args, config_class, tmp_path):
    parser = TrlParser((script_args, config_class, ModelConfig))
    args, _, _ = parser.parse_args_into_dataclasses(
        ["--load_in_int4", "--int4_group_size", "32", "--output_dir", str(tmp_path), "--use_cpu", "--bf16", "false"]
    )
    assert args.load_in_int4 and args.int4_group_size == 32


def test_loader_quantizes_and_trl_lora_settings_reach_the_int4_experts(tmp_path):
    torch.manual_seed(0)
    Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY)).save_pretrained(tmp_path / "bf")
    args = SFTScriptArguments(load_in_int4=True, int4_group_size=32)
    model = load_model(str(tmp_path / "bf"), args)
    assert model.is_quantized and isinstance(model.model.layers[0].feed_forward.experts, Int4TextExperts)
    model_args = ModelConfig(
        use_peft=True,
        lora_r=4,
        lora_dropout=0.0,
        lora_target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        lora_target_parameters=["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"],
    )
    peft_model = get_peft_model(model, peft_config_for(model_args, model))
    layer = peft_model.base_model.model.model.layers[0]
    assert isinstance(layer.feed_forward.experts, Int4LoraExperts)
    assert isinstance(layer.feed_forward.shared_expert.up_proj, Int4LoraLinear)
    assert isinstance(layer.self_attn.k_proj, torch.nn.Linear)  # not targeted: stays plain
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)

    scratch = load_model(str(TINY), SFTScriptArguments(from_scratch=True, load_in_int4=True, int4_group_size=32))
    assert scratch.is_quantized
    float_model = load_model(str(tmp_path / "bf"), SFTScriptArguments())
    assert not getattr(float_model, "is_quantized", False)  # the default stays full precision
    float_config = peft_config_for(model_args, float_model)
    assert float_config.target_parameters and not float_config._custom_modules


@pytest.mark.parametrize(("int4", "dropout"), [(True, 0.05), (False, 0.0), (False, 0.05)])
def test_use_peft_without_targets_adapts_attention_shared_expert_and_experts(int4, dropout, capsys):
    # PEFT has no default targets for Llama 4 and raises: `--use_peft true` alone must still train.
    torch.manual_seed(0)
    model = Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY))
    if int4:
        quantize_model(model, Int4Config(group_size=32))
    peft_model = get_peft_model(model, peft_config_for(ModelConfig(use_peft=True, lora_dropout=dropout), model))
    adapted = {name.split(".lora_")[0] for name, _ in peft_model.named_parameters() if "lora_" in name}
    layer = "base_model.model.model.layers.0."
    for module in ("self_attn.q_proj", "self_attn.o_proj", "feed_forward.shared_expert.up_proj"):
        assert layer + module in adapted
    experts = any(name.startswith(layer + "feed_forward.experts") for name in adapted)
    assert experts == (int4 or dropout == 0)  # float experts take PEFT's parameter adapters, which refuse dropout
    if not experts:
        assert "routed experts left out (PEFT adapts them only with --lora_dropout 0" in capsys.readouterr().out
    assert not any("router" in name for name in adapted)
