"""LoRA through PEFT on the fused routed experts, attention and shared expert: train, save, load, merge."""

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig

TINY = Path(__file__).resolve().parents[1] / "hub_configs" / "tiny"
EXPERTS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]


def _base() -> Llama4ForCausalLM:
    torch.manual_seed(0)
    return Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY)).eval()


def _train_a_few_steps(model, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        batch = torch.randint(3, 800, (4, 24))
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_all_linear_leaves_the_router_out_and_reaches_attention_and_shared_expert():
    config = LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear", target_parameters=EXPERTS)
    model = get_peft_model(_base(), config)
    adapted = {name.split(".lora_")[0] for name, _ in model.named_parameters() if "lora_" in name}
    assert not any("router" in name for name in adapted)
    layer = "base_model.model.model.layers.0"
    for module in ("self_attn.q_proj", "self_attn.o_proj", "feed_forward.shared_expert.down_proj"):
        assert f"{layer}.{module}" in adapted
    assert any(name.startswith(f"{layer}.feed_forward.experts") for name in adapted)
    assert "base_model.model.lm_head" not in adapted


def test_expert_lora_trains_saves_loads_and_merges_exactly(tmp_path):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,  # required by PEFT for target_parameters
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        target_parameters=EXPERTS,
    )
    base = _base()
    experts_before = base.model.layers[0].feed_forward.experts.gate_up_proj.detach().clone()
    model = get_peft_model(base, config)
    model.train()
    _train_a_few_steps(model)
    model.eval()
    input_ids = torch.randint(3, 800, (2, 40))
    with torch.no_grad():
        adapted = model(input_ids=input_ids).logits
        base_only = _base()(input_ids).logits
    assert (adapted - base_only).abs().max() > 1e-3  # the adapters do something

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_base(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, adapted, rtol=0, atol=0)

    merged = reloaded.merge_and_unload()
    assert type(merged) is Llama4ForCausalLM
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, adapted, rtol=1e-5, atol=1e-5)
    experts_after = merged.model.layers[0].feed_forward.experts.gate_up_proj
    assert not torch.equal(experts_after, experts_before)  # the expert adapter was merged in


def test_an_adapter_directory_loads_as_its_base_with_the_adapter_merged(tmp_path):
    """What `--use_peft true` saves (adapter_config.json, no config.json) is a model the next recipe or
    `python -m eval --model` takes: the base it names, with the adapter merged."""
    import pytest

    from eval.loading import InputError, check_model_path, load_causal_lm

    _base().save_pretrained(tmp_path / "base")
    base = Llama4ForCausalLM.from_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear", target_parameters=EXPERTS)
    adapted = get_peft_model(base, config)
    _train_a_few_steps(adapted)
    adapted.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "config.json").exists()
    check_model_path(tmp_path / "adapter")
    merged = load_causal_lm(str(tmp_path / "adapter"))
    batch = torch.randint(3, 800, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(batch).logits, adapted.eval()(batch).logits, atol=1e-5, rtol=1e-5)
    assert not isinstance(merged, PeftModel)

    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(InputError, match="names no base_model_name_or_path"):
        check_model_path(tmp_path / "adapter")
