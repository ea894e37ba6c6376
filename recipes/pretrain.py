"""Pretraining recipe: a causal language model trained from a config on a text corpus.

    accelerate launch recipes/pretrain.py --config recipes/configs/pretrain_tiny.yaml

By default the model is built fresh from `hub_configs/tiny` (`--from_scratch`, with `--model_config_overrides`)
and trained on the bundled synthetic corpus: worked arithmetic problems rendered in the Llama 4 chat format.
`--dataset_name` with a `text` column trains on your own corpus. TRL's `SFTTrainer` does the language modelling
(loss on every token); re-running a killed command resumes from the last complete checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from datasets import load_dataset
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser

from recipes.common import (
    TaskArguments,
    defer_hub_push,
    finish_recipe,
    model_and_tokenizer,
    task_datasets,
    train_resumably,
)
from recipes.synthetic import pretraining_corpus


@dataclass
class PretrainScriptArguments(TaskArguments):
    corpus_documents: int = field(default=12800, metadata={"help": "Synthetic corpus size (documents)."})
    corpus_levels: list[int] = field(
        default_factory=lambda: [1, 2], metadata={"help": "Difficulty levels the synthetic corpus covers."}
    )
    corpus_chat_format: bool = field(
        default=False, metadata={"help": "Render the synthetic corpus in the chat format (default: plain Q/A text)."}
    )


def main(script_args: PretrainScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> dict[str, Any]:
    model, tokenizer = model_and_tokenizer(model_args, script_args, training_args)
    if script_args.dataset_name:
        corpus = load_dataset(script_args.dataset_name, split=script_args.dataset_train_split)
        heldout = None
    else:
        corpus = pretraining_corpus(
            tokenizer, script_args.corpus_documents, seed=script_args.task_seed, levels=script_args.corpus_levels,
            chat_format=script_args.corpus_chat_format,
        )  # fmt: skip
        _, heldout = task_datasets(script_args)
    if "text" not in corpus.column_names:
        raise ValueError(f"the pretraining corpus needs a `text` column; it has {corpus.column_names}")
    total = sum(p.numel() for p in model.parameters())
    print(f"pretraining {type(model).__name__} ({total / 1e6:.2f}M parameters) on {len(corpus)} documents")
    defer_hub_push(training_args)
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=corpus, processing_class=tokenizer)
    train_resumably(trainer, training_args)
    return finish_recipe(trainer, tokenizer, heldout, script_args, training_args, "pretrain")


if __name__ == "__main__":
    parser = TrlParser((PretrainScriptArguments, SFTConfig, ModelConfig))
    main(*parser.parse_args_and_config())
