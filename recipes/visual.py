"""Early fusion in training: the recipes' multimodal path, taken with `--task visual`.

The model is our `Llama4ForConditionalGeneration` (vision tower, projector, sparse-MoE text model) and the
processing class transformers' `Llama4Processor`, which expands each `<|image|>` of a prompt into
`<|image_start|> [tiles of <|patch|>, tile separators] <|image|> <|patch|>... <|image_end|>` and turns the images
into `pixel_values`. The data is the generated visual task (`eval.visual`), or `--dataset_name` with an `images`
column; every row is checked before training (images per prompt against the `{"type": "image"}` entries and
against `--max_images`).

- Pretraining (`recipes/pretrain.py`): interleaved documents, text-only (the arithmetic corpus) and image-text
  (an image followed by its caption), through `EarlyFusionCollator`: no loss on the image tokens, and with
  `--pack_documents` whole documents packed into one row (an image's tokens are never split).
- SFT (`recipes/sft.py`): TRL's `SFTTrainer` with the processor; TRL's vision collator builds the batches.
- Online RL and DPO (`recipes/online_rl.py`, `recipes/dpo.py`): GRPO and DPO on image prompts, the hard-prompt
  sampler and the adaptive filter unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import set_seed

from eval.loading import InputError, load_multimodal
from eval.synthetic import arithmetic_problems
from eval.visual import KINDS, MAX_IMAGES, visual_answer_correct, visual_caption, visual_problems

from .validation import load_task_dataset, parse_mapping

IMAGE_TOKENS = (
    "<|image_start|>",
    "<|image_end|>",
    "<|image|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
)


@dataclass
class VisualArguments:
    task: str = field(
        default="arithmetic",
        metadata={
            "help": "'arithmetic' (the text task, Llama4ForCausalLM) or 'visual' (the image task: "
            "Llama4ForConditionalGeneration with its processor; needs torchvision, see docs/multimodal.md)."
        },
    )
    visual_kinds: list[str] = field(
        default_factory=lambda: list(KINDS),
        metadata={"help": f"Kinds of the visual train prompts, among {list(KINDS)} (the held-out set has all)."},
    )
    max_images: int = field(
        default=MAX_IMAGES, metadata={"help": f"Most images per prompt (1 to {MAX_IMAGES}); more is an error."}
    )
    blind_control: bool = field(
        default=True,
        metadata={"help": "Visual held-out eval: also score the prompts with grey images (the text-only control)."},
    )
    image_documents_fraction: float = field(
        default=0.5, metadata={"help": "Visual pretraining: share of image-text documents among the documents."}
    )


def is_visual(args: Any) -> bool:
    task = getattr(args, "task", "arithmetic")
    if task not in ("arithmetic", "visual"):
        raise InputError(f"--task {task!r}: choose 'arithmetic' (text) or 'visual' (images)")
    return task == "visual"


def visual_model_and_processor(model_args: Any, task_args: Any, training_args: Any) -> tuple[Any, Any]:
    """The multimodal policy and its processor, after the recipes' run checks (`prepare_run`), seeded like
    `recipes.common.model_and_tokenizer`."""
    from .common import prepare_run

    for flag in ("fp8", "fp8_emulate", "load_in_int4"):
        if getattr(task_args, flag, False):
            raise InputError(f"--{flag} is for the text model; --task visual trains the multimodal model in full")
    if not 1 <= task_args.max_images <= MAX_IMAGES:
        raise InputError(f"--max_images {task_args.max_images}: choose 1 to {MAX_IMAGES} (Llama 4's maximum)")
    unknown = sorted(set(task_args.visual_kinds) - set(KINDS))
    if unknown or not task_args.visual_kinds:
        raise InputError(f"--visual_kinds {unknown or '(none)'}: choose among {list(KINDS)}")
    prepare_run(model_args, task_args, training_args)
    set_seed(training_args.seed)
    overrides = parse_mapping(task_args.model_config_overrides, "--model_config_overrides")
    model, processor = load_multimodal(
        model_args.model_name_or_path, dtype=None if model_args.dtype == "auto" else model_args.dtype,
        config_overrides=overrides, from_scratch=task_args.from_scratch,
    )  # fmt: skip
    if task_args.tokenizer_name_or_path:
        raise InputError("--tokenizer_name_or_path: --task visual uses the processor saved with the model")
    return model, processor


def check_visual_rows(dataset: Dataset, max_images: int, what: str = "dataset") -> None:
    """Every row's images match its prompt's `{"type": "image"}` entries, and none has more than `max_images`."""
    if "images" not in dataset.column_names:
        raise InputError(f"the visual {what} needs an `images` column; it has {dataset.column_names}")
    for index, row in enumerate(dataset.select_columns(["prompt", "images"]).with_format(None)):
        placeholders = sum(
            part.get("type") == "image"
            for message in row["prompt"]
            if isinstance(message["content"], list)
            for part in message["content"]
        )
        count = len(row["images"] or [])
        if placeholders != count:
            raise InputError(
                f"{what} row {index}: the prompt has {placeholders} image entries ({{'type': 'image'}}) but the row "
                f"has {count} images; give one image per entry, in order"
            )
        if count > max_images:
            raise InputError(
                f"{what} row {index} has {count} images, more than --max_images {max_images}: raise --max_images "
                f"(at most {MAX_IMAGES}) or drop such rows"
            )


def check_single_tile(dataset: Dataset, processor: Any) -> None:
    """Online RL takes single-tile images only: TRL's GRPO slices `pixel_values` per image, but the processor cuts
    a larger image into several tiles (rows), and TRL finds Llama 4's tile counts only for other models."""
    size = processor.image_processor.size
    tile = (size["width"], size["height"])
    for index, images in enumerate(dataset.select_columns(["images"]).with_format(None)["images"]):
        for image in images:
            if tuple(image.size) != tile:
                raise InputError(
                    f"online RL row {index}: a {image.size[0]}x{image.size[1]} image makes several processor tiles; "
                    f"GRPO here takes {tile[0]}x{tile[1]} images (one tile): drop the grounding kind "
                    "(--visual_kinds colour count) or resize the images"
                )


def refuse_images_without_processor(dataset: Dataset, args: Any) -> None:
    """A text recipe (`--task arithmetic`, a tokenizer) given a dataset with images would drop them silently."""
    if not is_visual(args) and ("images" in dataset.column_names or "image" in dataset.column_names):
        raise InputError(
            "the dataset has images but the recipe runs the text model with a tokenizer: pass --task visual (the "
            "multimodal model and its processor), or drop the images column"
        )


def visual_datasets(args: Any, columns: tuple[str, ...] = ()) -> tuple[Dataset, Dataset | None]:
    """(train, held-out) visual rows: the generated task, or `--dataset_name` with `prompt`, `answer`, `images`."""
    if args.dataset_name:
        needed = ("prompt", "answer", "images", *columns)
        train = load_task_dataset(
            args.dataset_name, args.dataset_train_split, needed, split_flag="--dataset_train_split"
        )
        test = None
        if args.heldout_problems:
            test = load_task_dataset(
                args.dataset_name,
                args.dataset_test_split,
                ("prompt", "answer", "images"),
                split_flag="--dataset_test_split",
            )
            test = test.select(range(min(args.heldout_problems, len(test))))
    else:
        kwargs = dict(seed=args.task_seed, max_images=args.max_images)
        try:
            train = visual_problems("train", args.train_problems, kinds=args.visual_kinds, **kwargs)
            # Every kind, whatever the stage trains on: the stages of a pipeline are compared on the same problems.
            test = visual_problems("test", args.heldout_problems, **kwargs) if args.heldout_problems else None
        except ValueError as error:  # too many problems for the distinct images, unknown kinds
            raise InputError(f"--train_problems / --heldout_problems / --visual_kinds: {error}") from error
    check_visual_rows(train, args.max_images, "train")
    if test is not None:
        check_visual_rows(test, args.max_images, "held-out")
    return train, test


def visual_accuracy_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 where the completion's last `\\boxed{}` is the visual task's gold answer (TRL reward signature)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(visual_answer_correct(text, str(gold))) for text, gold in zip(texts, answer)]


# ---------------------------------------------------------------------------------------------------------------
# Early-fusion pretraining
# ---------------------------------------------------------------------------------------------------------------


def early_fusion_corpus(num_documents: int, *, seed: int, fraction: float, kinds, max_images: int) -> Dataset:
    """Interleaved documents: every k-th is image-text (`fraction` of them: images, each followed by its caption,
    train-split images only), the rest text-only worked arithmetic problems. Columns `text` (with one `<|image|>`
    per image) and `images`."""
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"--image_documents_fraction {fraction}: give a share between 0 and 1")
    num_image = sum(int((i + 1) * fraction) > int(i * fraction) for i in range(num_documents))
    problems = visual_problems("train", num_image, seed=seed + 2000, kinds=kinds, max_images=max_images)
    texts_only = arithmetic_problems("train", max(1, num_documents - num_image), seed=seed + 1000, levels=(1, 2))
    rows, image_index, text_index = [], 0, 0
    for i in range(num_documents):
        if int((i + 1) * fraction) > int(i * fraction):
            row = problems[image_index]
            image_index += 1
            captions = [visual_caption(json.loads(key)) for key in row["image_keys"]]
            rows.append({"text": " ".join(f"<|image|>{caption}" for caption in captions), "images": row["images"]})
        else:
            row = texts_only[text_index]
            text_index += 1
            text = f"Question: {row['prompt'][0]['content']}\nAnswer: {row['completion'][0]['content']}"
            rows.append({"text": text, "images": []})
    return Dataset.from_list(rows)


class EarlyFusionCollator:
    """Documents (`text` with `<|image|>` markers, `images`) -> a multimodal causal-LM batch.

    Each document goes through the processor on its own: `<|begin_of_text|> text <|eot|>` with its images
    expanded into tile tokens, and `pixel_values` in the order the image tokens appear. Labels are the input ids
    except at padding and at every image token (`<|patch|>`, image start/end, `<|image|>`, tile separators): the
    model predicts text, never placeholders. Text-only documents longer than `max_length` are cut; a document
    whose image tokens would be cut is an error (cutting them would leave features without their placeholders).

    `pack=True` concatenates the batch's documents into one row with position ids restarting per document (the
    masks and the NoPE temperature follow them, as for `DataCollatorWithFlattening`); documents stay whole, so
    each image's tokens do too."""

    def __init__(self, processor, max_length: int | None = None, pack: bool = False):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.pack = pack
        self.image_token_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS)))
        self.patch_id = self.tokenizer.convert_tokens_to_ids("<|patch|>")

    def _document(self, example: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        text = f"{self.tokenizer.bos_token}{example['text']}{self.tokenizer.eos_token}"
        images = list(example.get("images") or [])
        markers = example["text"].count("<|image|>")
        if markers != len(images):
            raise InputError(
                f"a pretraining document has {markers} <|image|> markers but {len(images)} images: give one image "
                "per marker, in order"
            )
        if images:
            out = self.processor(text=[text], images=[images], add_special_tokens=False, return_tensors="pt")
            ids, pixels = out["input_ids"][0], out["pixel_values"]
        else:
            ids, pixels = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"]), None
        if self.max_length is not None and len(ids) > self.max_length:
            if pixels is not None:
                raise InputError(
                    f"an image-text document is {len(ids)} tokens, over --max_length {self.max_length}: cutting it "
                    "would split an image's tokens; raise --max_length or use fewer images per document"
                )
            ids = ids[: self.max_length]
        return ids, pixels

    def _labels(self, ids: torch.Tensor) -> torch.Tensor:
        labels = ids.clone()
        labels[torch.isin(ids, self.image_token_ids)] = -100
        return labels

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        documents = [self._document(example) for example in examples]
        pixels = [p for _, p in documents if p is not None]
        batch: dict[str, torch.Tensor] = {}
        if self.pack:
            ids = torch.cat([d for d, _ in documents])[None]  # (1, total)
            positions = torch.cat([torch.arange(len(d)) for d, _ in documents])[None]
            labels = torch.cat([torch.cat([torch.tensor([-100]), self._labels(d)[1:]]) for d, _ in documents])[None]
            batch.update(input_ids=ids, labels=labels, position_ids=positions)
        else:
            width = max(len(d) for d, _ in documents)
            pad = self.tokenizer.pad_token_id
            ids = torch.full((len(documents), width), pad, dtype=torch.long)
            labels = torch.full((len(documents), width), -100, dtype=torch.long)
            mask = torch.zeros((len(documents), width), dtype=torch.long)
            for row, (d, _) in enumerate(documents):  # right padding, as the text pretraining collator
                ids[row, : len(d)], labels[row, : len(d)], mask[row, : len(d)] = d, self._labels(d), 1
            batch.update(input_ids=ids, labels=labels, attention_mask=mask)
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch


# ---------------------------------------------------------------------------------------------------------------
# Online RL on image prompts
# ---------------------------------------------------------------------------------------------------------------


def visual_online_rl_trainer() -> type:
    """`recipes.rl.OnlineRLTrainer` for image prompts: the hard-prompt sampler, filter and curriculum unchanged."""
    from .rl import OnlineRLTrainer

    class VisualOnlineRLTrainer(OnlineRLTrainer):
        def _tokenize_prompts(self, prompts):
            prompt_ids, images, fields = super()._tokenize_prompts(prompts)
            # Llama4Processor returns pixel_values as a list of per-tile tensors here (TRL stacks them through
            # numpy, which has no bfloat16, the processor's dtype): one (tiles, 3, S, S) tensor instead.
            return (
                prompt_ids,
                images,
                {
                    k: torch.cat(v) if isinstance(v, list) and v and isinstance(v[0], torch.Tensor) else v
                    for k, v in fields.items()
                },
            )

    return VisualOnlineRLTrainer
