"""Write hub_configs/: the official Scout and Maverick configs, a Behemoth-shaped one, and the tiny default.

    python scripts/build_hub_configs.py [--out hub_configs]

The tiny default carries a byte-level BPE tokenizer trained here from `hub_configs/tiny/tokenizer_corpus.txt`,
every Llama 4 special token at the same offsets as the real tokenizer (ids 200000+ there, 896+ here), a
Llama 4 chat template with `{% generation %}` markers (assistant-only loss), and processor configs for
transformers' `Llama4Processor` / `Llama4ImageProcessor`. Deterministic: a test re-runs it and compares.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast
from transformers.utils import is_torchvision_available

from modeling_llama4 import Llama4Config

ROOT = Path(__file__).resolve().parents[1]


def llama4_special_tokens(num_reserved: int) -> list[str]:
    """Llama 4's special tokens in id order (Meta's llama-models tokenizer), truncated to `num_reserved`."""
    basic = ["begin_of_text", "end_of_text", "fim_prefix", "fim_middle", "fim_suffix"]
    basic += ["header_start", "header_end", "eom", "eot", "step"]
    text = [f"text_post_train_reserved_special_token_{i}" for i in range(6)]
    text += ["python_start", "python_end", "finetune_right_pad"]
    text += [f"text_post_train_reserved_special_token_{i}" for i in range(6, 67)]
    vision = ["image_start", "image_end", "vision_reserved_special_token_0", "vision_reserved_special_token_1"]
    vision += ["tile_x_separator", "tile_y_separator"] + [f"vision_reserved_special_token_{i}" for i in range(2, 6)]
    vision += ["image", "vision_reserved_special_token_6", "patch"]
    names = basic + text + vision
    names += [f"vision_reserved_special_token_{i}" for i in range(7, 7 + num_reserved - len(names))]
    return [f"<|{name}|>" for name in names[:num_reserved]]


CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}"
    "{%- if message['content'] is string %}{%- set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{%- else %}{%- set parts = message['content'] %}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{%- generation %}"
    "{%- for part in parts %}{%- if part['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}"
    "{{- '<|eot|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{%- for part in parts %}{%- if part['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}"
    "{{- '<|eot|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif %}"
)

BPE_VOCAB = 896  # the tiny model's vocab is 1024: 896 BPE tokens + 128 special tokens
NUM_SPECIAL = 128


def build_tokenizer(corpus: Path) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train([str(corpus)], trainer)
    assert tokenizer.get_vocab_size() <= BPE_VOCAB
    # Fill to exactly BPE_VOCAB so the special tokens sit at fixed ids (896 + their real offset).
    filler = [f"<|tiny_unused_{i}|>" for i in range(BPE_VOCAB - tokenizer.get_vocab_size())]
    tokenizer.add_tokens(filler)
    tokenizer.add_special_tokens(llama4_special_tokens(NUM_SPECIAL))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot|>",
        pad_token="<|finetune_right_pad|>",
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def special_id(name: str) -> int:
    return BPE_VOCAB + llama4_special_tokens(NUM_SPECIAL).index(f"<|{name}|>")


def real_special_id(name: str) -> int:
    return 200000 + llama4_special_tokens(NUM_SPECIAL).index(f"<|{name}|>")


OFFICIAL_VISION = dict(
    hidden_size=1408,
    intermediate_size=5632,
    num_hidden_layers=34,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    num_channels=3,
    norm_eps=1e-5,
    pixel_shuffle_ratio=0.5,
    projector_input_dim=4096,
    projector_output_dim=4096,
    vision_output_dim=4096,
    multi_modal_projector_bias=False,
    vision_feature_select_strategy="default",
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
OFFICIAL_TEXT = dict(
    vocab_size=202048,
    hidden_size=5120,
    intermediate_size=8192,
    intermediate_size_mlp=16384,
    num_hidden_layers=48,
    num_attention_heads=40,
    num_key_value_heads=8,
    head_dim=128,
    num_experts_per_tok=1,
    attention_chunk_size=8192,
    no_rope_layer_interval=4,
    attn_temperature_tuning=True,
    floor_scale=8192,
    attn_scale=0.1,
    rms_norm_eps=1e-5,
    bos_token_id=real_special_id("begin_of_text"),
    eos_token_id=[real_special_id("end_of_text"), real_special_id("eom"), real_special_id("eot")],
    pad_token_id=real_special_id("finetune_right_pad"),
)
OFFICIAL_TOKENS = dict(
    boi_token_index=real_special_id("image_start"),
    eoi_token_index=real_special_id("image_end"),
    image_token_index=real_special_id("patch"),
)

CONFIGS = {
    "scout": dict(
        text_config=dict(
            OFFICIAL_TEXT,
            num_local_experts=16,
            interleave_moe_layer_step=1,
            use_qk_norm=True,
            max_position_embeddings=10485760,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 16.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
            },
        ),
        vision_config=OFFICIAL_VISION,
        **OFFICIAL_TOKENS,
    ),
    "maverick": dict(
        text_config=dict(
            OFFICIAL_TEXT,
            num_local_experts=128,
            interleave_moe_layer_step=2,
            use_qk_norm=False,
            max_position_embeddings=1048576,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
        vision_config=OFFICIAL_VISION,
        **OFFICIAL_TOKENS,
    ),
    # INFERRED, not released: Meta only said "16 experts, 288B active, ~2T total". Width, depth and expert
    # size are chosen to hit those counts with Scout's layout (top-1 + shared expert, MoE every layer).
    "behemoth": dict(
        text_config=dict(
            OFFICIAL_TEXT,
            hidden_size=16384,
            num_attention_heads=128,
            num_key_value_heads=8,
            intermediate_size=20480,
            intermediate_size_mlp=40960,
            num_hidden_layers=108,
            num_local_experts=16,
            interleave_moe_layer_step=1,
            use_qk_norm=True,
            max_position_embeddings=262144,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
        vision_config=OFFICIAL_VISION,
        inferred_shape="Behemoth is unreleased: this shape is inferred from Meta's 288B-active / ~2T-total figures.",
        **OFFICIAL_TOKENS,
    ),
    "tiny": dict(
        text_config=dict(
            vocab_size=BPE_VOCAB + NUM_SPECIAL,
            hidden_size=64,
            intermediate_size=64,
            intermediate_size_mlp=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=1,
            attention_chunk_size=32,
            no_rope_layer_interval=4,
            use_qk_norm=True,
            max_position_embeddings=4096,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            bos_token_id=special_id("begin_of_text"),
            eos_token_id=[special_id("end_of_text"), special_id("eom"), special_id("eot")],
            pad_token_id=special_id("finetune_right_pad"),
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=56,
            patch_size=14,
            pixel_shuffle_ratio=0.5,
            projector_input_dim=64,
            projector_output_dim=64,
            vision_output_dim=64,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        boi_token_index=special_id("image_start"),
        eoi_token_index=special_id("image_end"),
        image_token_index=special_id("patch"),
    ),
}


def write_config(name: str, out: Path) -> Llama4Config:
    spec = dict(CONFIGS[name])
    config = Llama4Config(architectures=["Llama4ForConditionalGeneration"], **spec)
    out.mkdir(parents=True, exist_ok=True)
    # Plain official-format config.json (no auto_map, no copied code): push_to_hub adds those to model repos.
    config.to_json_file(out / "config.json")
    text = config.text_config
    GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
    ).save_pretrained(out)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "hub_configs")
    args = parser.parse_args()
    for name in CONFIGS:
        write_config(name, args.out / name)

    tiny = args.out / "tiny"
    corpus = ROOT / "hub_configs" / "tiny" / "tokenizer_corpus.txt"
    if corpus.resolve() != (tiny / "tokenizer_corpus.txt").resolve():
        shutil.copy(corpus, tiny / "tokenizer_corpus.txt")
    tokenizer = build_tokenizer(corpus)
    if is_torchvision_available():
        from transformers import Llama4ImageProcessor, Llama4Processor

        vision = CONFIGS["tiny"]["vision_config"]
        image_processor = Llama4ImageProcessor(
            size={"height": vision["image_size"], "width": vision["image_size"]}, max_patches=4
        )
        processor = Llama4Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=vision["patch_size"],
            pixel_shuffle_ratio=vision["pixel_shuffle_ratio"],
            chat_template=CHAT_TEMPLATE,
        )
        processor.save_pretrained(tiny)
    else:
        # transformers' Llama4ImageProcessor needs torchvision, which has no CPU build on PyPI for
        # torch 2.13 CPU: write the tokenizer and keep the committed processor configs.
        tokenizer.save_pretrained(tiny)
        tokenizer_config = json.loads((tiny / "tokenizer_config.json").read_text())
        tokenizer_config["processor_class"] = "Llama4Processor"  # as Llama4Processor.save_pretrained writes it
        (tiny / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        print("torchvision not installed: wrote the tokenizer only, kept processor_config.json as committed")
    for path in sorted(tiny.glob("*.json")):  # stable key order so re-running gives identical files
        path.write_text(json.dumps(json.loads(path.read_text()), indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    print(f"wrote {', '.join(CONFIGS)} to {args.out}")


if __name__ == "__main__":
    main()
