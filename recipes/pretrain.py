"""Pretraining recipe: a causal language model trained from a config on a text corpus.

    accelerate launch recipes/pretrain.py --config recipes/configs/pretrain_tiny.yaml

By default the model is built fresh from `hub_configs/tiny` (`--from_scratch`, with `--model_config_overrides`)
and trained on the bundled synthetic corpus: worked arithmetic problems as plain "Question: ... Answer: ..." text
(`--corpus_chat_fraction` renders a share in the Llama 4 chat format). `--dataset_name` with a `text` column trains
on your own corpus. Re-running a killed command resumes from the last complete checkpoint.

transformers' `Trainer` does the language modelling (loss on every token), as in its `run_clm` example, with the
model's own loss. TRL's `SFTTrainer` would add nothing here but tokenization, and its chunked fused LM head (a
Python loop over tiles, built to spare GPU memory at 200k-token vocabularies) costs CPU time for no gain at a
small vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import DataCollatorForLanguageModeling, DataCollatorWithFlattening, Trainer
from trl import ModelConfig, SFTConfig

from eval.loading import InputError
from eval.long_context import needle_corpus
from recipes.common import (
    TaskArguments,
    defer_hub_push,
    finish_recipe,
    model_and_tokenizer,
    task_datasets,
    train_resumably,
)
from recipes.metap import MetaPArguments, metap_trainer, with_metap_overrides
from recipes.synthetic import pretraining_corpus
from recipes.validation import load_task_dataset, run_recipe
from recipes.visual import (
    EarlyFusionCollator,
    VisualArguments,
    early_fusion_corpus,
    is_visual,
    visual_datasets,
    visual_model_and_processor,
)


@dataclass
class PretrainScriptArguments(VisualArguments, MetaPArguments, TaskArguments):
    corpus_documents: int = field(default=12800, metadata={"help": "Synthetic corpus size (documents)."})
    corpus_levels: list[int] = field(
        default_factory=lambda: [1, 2], metadata={"help": "Difficulty levels the synthetic corpus covers."}
    )
    corpus_chat_fraction: float = field(
        default=0.0,
        metadata={"help": "Share of the synthetic corpus rendered in the chat format (the rest is plain Q/A text)."},
    )
    corpus: str = field(
        default="arithmetic",
        metadata={"help": "Bundled corpus: 'arithmetic' (worked problems) or 'needle' (long-context retrieval)."},
    )
    needle_lengths: list[int] = field(
        default_factory=lambda: [512, 2048],
        metadata={"help": "'needle': document tokens of each phase, in training order; corpus_documents per phase."},
    )
    pack_documents: bool = field(
        default=False,
        metadata={"help": "Pack each batch's documents whole into one row (position ids restart per document)."},
    )


def main(script_args: PretrainScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> dict[str, Any]:
    if script_args.corpus not in ("arithmetic", "needle"):
        raise InputError(f"--corpus {script_args.corpus!r}: choose 'arithmetic' or 'needle' (or pass --dataset_name)")
    with_metap_overrides(script_args)
    if is_visual(script_args):
        return _pretrain_early_fusion(script_args, training_args, model_args)
    model, tokenizer = model_and_tokenizer(model_args, script_args, training_args)
    if script_args.dataset_name:
        corpus = load_task_dataset(
            script_args.dataset_name, script_args.dataset_train_split, ("text",), split_flag="--dataset_train_split"
        )
        heldout = None
    elif script_args.corpus == "needle":  # long-context mid-training: eval/long_context.py's train keys only
        corpus = needle_corpus(
            tokenizer, script_args.corpus_documents, script_args.needle_lengths, script_args.task_seed
        )
        heldout = None
    else:
        corpus = pretraining_corpus(
            tokenizer, script_args.corpus_documents, seed=script_args.task_seed, levels=script_args.corpus_levels,
            chat_fraction=script_args.corpus_chat_fraction,
        )  # fmt: skip
        _, heldout = task_datasets(script_args)
    if "text" not in corpus.column_names:
        raise ValueError(f"the pretraining corpus needs a `text` column; it has {corpus.column_names}")
    total = sum(p.numel() for p in model.parameters())
    print(f"pretraining {type(model).__name__} ({total / 1e6:.2f}M parameters) on {len(corpus)} documents")
    # Each document is one sequence: <|begin_of_text|> text <|eot|>, cut at max_length.
    eos = tokenizer.eos_token
    corpus = corpus.map(
        lambda batch: tokenizer(
            [text if text.endswith(eos) else text + eos for text in batch["text"]],
            truncation=True, max_length=training_args.max_length,
        ),
        batched=True, remove_columns=corpus.column_names, desc="tokenizing",
    )  # fmt: skip
    defer_hub_push(training_args)
    trainer = metap_trainer(Trainer, script_args.metap)(
        model=model,
        args=training_args,
        train_dataset=corpus,
        # Packing keeps documents whole: the masks and the NoPE temperature follow the per-document positions.
        data_collator=DataCollatorWithFlattening()
        if script_args.pack_documents
        else DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    train_resumably(trainer, training_args)
    return finish_recipe(trainer, tokenizer, heldout, script_args, training_args, "pretrain")


def _pretrain_early_fusion(
    script_args: PretrainScriptArguments, training_args: SFTConfig, model_args: ModelConfig
) -> dict[str, Any]:
    """`--task visual`: the multimodal model on interleaved text-only and image-text documents
    (`recipes.visual.early_fusion_corpus`; or `--dataset_name` with `text` and `images` columns)."""
    model, processor = visual_model_and_processor(model_args, script_args, training_args)
    if script_args.dataset_name:
        corpus = load_task_dataset(
            script_args.dataset_name, script_args.dataset_train_split, ("text", "images"),
            split_flag="--dataset_train_split",
        )  # fmt: skip
        heldout = None
    else:
        corpus = early_fusion_corpus(
            script_args.corpus_documents, seed=script_args.task_seed,
            fraction=script_args.image_documents_fraction, kinds=script_args.visual_kinds,
            max_images=script_args.max_images,
        )  # fmt: skip
        _, heldout = visual_datasets(script_args)
    total = sum(p.numel() for p in model.parameters())
    print(f"pretraining {type(model).__name__} ({total / 1e6:.2f}M parameters) on {len(corpus)} documents")
    # The collator reads `text` and `images`, which the model's forward does not take.
    training_args.remove_unused_columns = False
    defer_hub_push(training_args)
    trainer = metap_trainer(Trainer, script_args.metap)(
        model=model,
        args=training_args,
        train_dataset=corpus,
        data_collator=EarlyFusionCollator(processor, training_args.max_length, pack=script_args.pack_documents),
        processing_class=processor,
    )
    train_resumably(trainer, training_args)
    return finish_recipe(trainer, processor, heldout, script_args, training_args, "pretrain")


if __name__ == "__main__":
    run_recipe(main, (PretrainScriptArguments, SFTConfig, ModelConfig))
