"""QLoRA on the int4 model: TRL's SFTTrainer (unpatched) trains PEFT adapters on attention, the shared expert and
the int4 routed experts; the int4 base does not move; adapters save and load; the merge is exact."""

from pathlib import Path

import pytest
import torch
import trl
from datasets import Dataset
from peft import get_peft_model
from transformers import AutoTokenizer

from modeling_llama4 import Int4Config, Llama4ForCausalLM, Llama4TextConfig, quantize_model
from modeling_llama4.int4 import Int4TextExperts
from modeling_llama4.int4_lora import (
    Int4LoraExperts,
    Int4LoraLinear,
    int4_lora_config,
    load_int4_adapter,
    merge_int4_lora,
)

TINY = Path(__file__).resolve().parents[1] / "hub_configs" / "tiny"


def int4_tiny(tmp_path: Path) -> Llama4ForCausalLM:
    torch.manual_seed(0)
    Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY)).save_pretrained(tmp_path / "bf")
    return Llama4ForCausalLM.from_pretrained(tmp_path / "bf", quantization_config=Int4Config(group_size=32))


def test_lora_layers_sit_on_int4_modules_and_only_adapters_get_gradients():
    torch.manual_seed(0)
    model = quantize_model(Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY)), Int4Config(group_size=32))
    peft_model = get_peft_model(model, int4_lora_config(r=4, lora_alpha=8, init_lora_weights=False))
    layer = peft_model.base_model.model.model.layers[0]
    assert isinstance(layer.feed_forward.experts, Int4LoraExperts)
    assert isinstance(layer.feed_forward.shared_expert.gate_proj, Int4LoraLinear)
    assert not hasattr(layer.feed_forward.router, "lora_A")
    ids = torch.randint(3, 800, (2, 16))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert any(".experts.lora_A." in n for n in with_grad) and any("shared_expert" in n for n in with_grad)


@pytest.mark.slow
def test_sft_trainer_two_steps_then_save_load_merge_and_requantize(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    model = int4_tiny(tmp_path)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    data = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": f"{a + b}"}]}
            for a, b in [(1, 2), (2, 3), (3, 4), (4, 5)]
        ]
    )
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        max_length=32,
        seed=0,
    )
    peft_config = int4_lora_config(r=4, lora_alpha=8, lora_dropout=0.0)
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config
    )
    peft_model = trainer.model
    adapters_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    trainer.train()
    assert trainer.state.global_step == 2
    # the int4 base is untouched, bit for bit; every adapter's B moved (A may too)
    for key, value in peft_model.base_model.model.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, base_state[key.replace(".base_layer", "")]), key
    moved = {n for n, p in peft_model.named_parameters() if "lora_B" in n and not torch.equal(p, adapters_before[n])}
    assert moved == {n for n in adapters_before if "lora_B" in n}
    assert any(".experts.lora_B." in n for n in moved)

    peft_model.eval()
    ids = torch.randint(3, 800, (2, 20))
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = load_int4_adapter(int4_tiny(tmp_path / "again"), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, adapted)

    merged = merge_int4_lora(reloaded, torch.float32)
    assert type(merged) is Llama4ForCausalLM and not merged.is_quantized
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert all(p.is_floating_point() for p in merged.parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    requantized = quantize_model(merged, Int4Config(group_size=32))
    assert isinstance(requantized.model.layers[0].feed_forward.experts, Int4TextExperts)
    with torch.no_grad():
        assert (requantized(ids).logits - adapted).abs().max() < 0.1


def test_a_qlora_adapter_directory_loads_merged_into_the_int4_base_it_was_trained_on(tmp_path):
    """A `--load_in_int4 --use_peft` run's output (its manifest says load_in_int4) loads as `merge_int4_lora` of
    the adapter on the int4 base; asked for int4 again (`--load_in_int4` in the next stage), it is re-quantized."""
    import json

    from eval.loading import load_causal_lm

    model = int4_tiny(tmp_path)
    adapted = get_peft_model(model, int4_lora_config(r=4, lora_dropout=0.0))
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    adapted.save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "run_manifest.json").write_text(json.dumps({"load_in_int4": True, "int4_group_size": 32}))
    batch = torch.randint(3, 800, (2, 12))
    with torch.no_grad():
        want = adapted.eval()(batch).logits
        merged = load_causal_lm(str(tmp_path / "run"), dtype=torch.float32)
        torch.testing.assert_close(merged(batch).logits, want, atol=1e-4, rtol=1e-4)
        assert not merged.is_quantized
        again = load_causal_lm(str(tmp_path / "run"), dtype=torch.float32, quantization_config=Int4Config(32))
        assert again.is_quantized and any(isinstance(m, Int4TextExperts) for m in again.modules())
