"""Where the soft targets come from: an online teacher (loaded and checked against the student's tokenizer), the
teacher's own completions (sequence-level distillation), or top-k teacher log-probs precomputed to disk.

Precomputed logits serve teachers too big to host beside the student, and reuse one teacher pass over many runs
(Meta reused Behemoth's pre-training forward passes as targets). A store is a directory:

    metadata.json                 top_k, temperature, tokenizer fingerprint, number of rows, shard size
    shard-00000.safetensors       rows [0, shard_size): for each token position of each row
        input_ids       (tokens,)      int64   the row's tokens, flat; `offsets` (rows + 1,) delimits rows
        topk_ids        (tokens, k)    int32   the teacher's k most likely next tokens, most likely first
        topk_logprobs   (tokens, k)    float   their log-probs at the distillation temperature
        target_logprobs (tokens,)      float   log-prob (at T = 1) of the token that actually follows
        top2_logprobs   (tokens, 2)    float   log-probs (at T = 1) of topk_ids[:, :2] (for the adaptive weights)

Each shard is written to a temporary file and renamed, so a killed writer leaves only whole shards, and a rerun
skips them. Rows are found again by their tokens (a hash, then an exact comparison), so the trainer may filter or
shuffle its dataset; tokens that differ from every stored row are an error, not a silent misalignment.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import get_training_chat_template, has_generation_markers
from trl.trainer.utils import pad

from eval.files import atomic_path, write_json_atomic
from eval.generation import generate_completions
from eval.grading import math_answer_correct
from eval.loading import load_causal_lm
from modeling_llama4.fingerprint import weights_fingerprint as teacher_fingerprint  # the project's one fingerprint

FORMAT_VERSION = 2
METADATA = "metadata.json"
TOPK_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_target_logprobs", "teacher_top2_logprobs")


# ---------------------------------------------------------------------------------------------------------------
# Teachers and tokenizers
# ---------------------------------------------------------------------------------------------------------------


def load_teacher(path: str, init_kwargs: dict[str, Any] | None = None) -> PreTrainedModel:
    """A teacher from a path or Hub id through the project's one loader (`eval.loading.load_causal_lm`: our
    `Llama4ForCausalLM` for any Llama 4 checkpoint, where TRL's loader would pick transformers' dense built-in),
    with TRL's defaults for `teacher_model_init_kwargs`: float32, and `device_map="auto"` off CPU."""
    kwargs = dict(init_kwargs or {})
    kwargs.setdefault("dtype", "float32")
    if "device_map" not in kwargs and PartialState().device.type not in ("cpu", "mps"):
        kwargs["device_map"] = "auto"
    return load_causal_lm(path, flag="--teacher_model_name_or_path", **kwargs)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the vocabulary (every token and its id) and the special tokens but padding: equal iff both map text
    to ids and ids to meaning the same way, which is what comparing two models' next-token distributions needs."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    # The pad token is left out: recipes often set it (to EOS) on one side only, and padding is never a target.
    special = {name: str(value) for name, value in sorted(tokenizer.special_tokens_map.items()) if name != "pad_token"}
    text = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_tokenizer(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, what: str = "teacher"
) -> None:
    """Raise a `ValueError` naming both tokenizers and the fix when they differ in vocabulary or special tokens."""
    if tokenizer_fingerprint(student) == tokenizer_fingerprint(teacher):
        return
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    differ = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=lambda item: item[1])[:4]
    raise ValueError(
        f"The student's tokenizer ({student.name_or_path!r}, {len(student_vocab)} tokens, fingerprint "
        f"{tokenizer_fingerprint(student)}) and the {what}'s ({teacher.name_or_path!r}, {len(teacher_vocab)} tokens, "
        f"fingerprint {tokenizer_fingerprint(teacher)}) differ (e.g. {differ}; special tokens "
        f"{student.special_tokens_map} vs {teacher.special_tokens_map}). Distillation compares next-token "
        "distributions position by position, so both must tokenize identically: give the student the teacher's "
        "tokenizer (and a model with its vocabulary), or distill from a teacher trained with the student's tokenizer."
    )


def teacher_tokenizer_for(teacher: PreTrainedModel | str) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved beside a teacher checkpoint, if there is one (a local directory or a cached repo)."""
    path = teacher if isinstance(teacher, str) else getattr(teacher, "name_or_path", "")
    if not path:
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None


def output_vocab_size(model: PreTrainedModel) -> int:
    """Width of the model's next-token distribution (its LM head), which is what the soft loss compares."""
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.get_text_config().vocab_size


# ---------------------------------------------------------------------------------------------------------------
# Sequence-level distillation
# ---------------------------------------------------------------------------------------------------------------


def generate_teacher_targets(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
    keep_gold_when_wrong: bool = False,
) -> Dataset:
    """`dataset` (`prompt`, optionally `completion` and `answer`) with `completion` replaced by the teacher's own
    completion of each prompt: sequence-level distillation (Kim & Rush, 2016).

    With several processes each generates a share of the prompts and all receive every completion (on CPU the
    training config, `use_cpu=True`, must have set up the process group first). With `keep_gold_when_wrong`, rows
    whose teacher answer is wrong (graded against `answer`) keep their own completion. Adds a
    `teacher_answer_correct` column when `answer` exists.
    """
    if "prompt" not in dataset.column_names:
        raise ValueError(f"sequence-level distillation needs a `prompt` column; got {dataset.column_names}")
    if keep_gold_when_wrong and not {"answer", "completion"} <= set(dataset.column_names):
        raise ValueError("`seq_kd_keep_gold_when_wrong` needs `answer` and `completion` columns")
    state = PartialState()
    indices = list(range(len(dataset)))
    with state.split_between_processes(indices) as mine:
        texts = generate_completions(
            teacher, tokenizer, [dataset[i]["prompt"] for i in mine], max_new_tokens=max_new_tokens,
            temperature=temperature, batch_size=batch_size, seed=seed, progress=state.is_main_process,
            desc="teacher completions", split_across_processes=False,  # already this rank's share
        )  # fmt: skip
        local = list(zip(mine, (samples[0] for samples in texts)))
    generated = dict(gather_object(local) if state.num_processes > 1 else local)

    def replace(row: dict, index: int) -> dict:
        text = generated[index]
        out = {}
        if "answer" in row:
            out["teacher_answer_correct"] = math_answer_correct(text, str(row["answer"]))
            if keep_gold_when_wrong and not out["teacher_answer_correct"]:
                return {**out, "completion": row["completion"]}
        conversational = isinstance(row["prompt"], list)
        out["completion"] = [{"role": "assistant", "content": text}] if conversational else text
        return out

    # Completions may change type (a string column from chat messages), so build the column anew.
    rows = [{**row, **replace(row, i)} for i, row in enumerate(dataset)]
    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------------------------------
# Precomputed top-k teacher log-probs
# ---------------------------------------------------------------------------------------------------------------


def tokenize_like_sft(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, args: SFTConfig) -> Dataset:
    """`dataset` tokenized exactly as `SFTTrainer` (and so `CoDistillationTrainer`) tokenizes it under `args`:
    chat template, completion mask, EOS, truncation; unshuffled and unpacked.

    Calls SFTTrainer's own preparation (with the three attributes it reads) rather than a copy of it, so the stored
    teacher tokens cannot drift from the student's when TRL changes its tokenization.
    """
    if "input_ids" in dataset.column_names:
        return dataset
    args = copy.copy(args)
    args.shuffle_dataset = False
    first = dataset[0]
    chat_template = None
    if args.assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
        chat_template = get_training_chat_template(tokenizer)
    completion_only = args.completion_only_loss
    if completion_only is None:
        completion_only = "prompt" in first and "completion" in first
    shim = SimpleNamespace(_tokenizer=tokenizer, chat_template=chat_template, completion_only_loss=completion_only)
    return SFTTrainer._prepare_dataset(shim, dataset, tokenizer, args, False, None, "teacher")


def _row_key(ids: Sequence[int]) -> bytes:
    return hashlib.blake2b(torch.as_tensor(list(ids), dtype=torch.int64).numpy().tobytes(), digest_size=16).digest()


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _check_or_write_metadata(folder: Path, metadata: dict[str, Any], state: PartialState) -> None:
    path = folder / METADATA
    if path.exists():
        existing = json.loads(path.read_text())
        keys = ("format_version", "top_k", "temperature", "num_rows", "shard_size", "tokenizer_fingerprint")
        keys += ("data_fingerprint", "teacher_fingerprint", "dtype")
        differ = {k: (existing.get(k), metadata[k]) for k in keys if existing.get(k) != metadata[k]}
        if differ:
            raise ValueError(
                f"{folder} already holds teacher logits written with other settings {differ} (stored, requested): "
                "write to a new directory, or delete this one to start over"
            )
        return
    if state.is_main_process:
        write_json_atomic(path, metadata)


@torch.no_grad()
def _teacher_topk_rows(
    teacher: PreTrainedModel, rows: list[list[int]], top_k: int, temperature: float, pad_id: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    device = next(teacher.parameters()).device
    ids = [torch.tensor(r, dtype=torch.long) for r in rows]
    input_ids = pad(ids, padding_value=pad_id, padding_side="right").to(device)
    attention_mask = pad([torch.ones_like(r) for r in ids], padding_value=0, padding_side="right").to(device)
    logits = teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    tempered = torch.log_softmax(logits / temperature, dim=-1)
    values, indices = tempered.topk(top_k, dim=-1)  # sorted: the teacher's argmax first
    plain = tempered if temperature == 1.0 else torch.log_softmax(logits, dim=-1)
    # Position j predicts token j + 1; the last position has no next token (its value is never read).
    following = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
    target = plain.gather(-1, following.unsqueeze(-1)).squeeze(-1)
    top2 = plain.gather(-1, indices[..., :2])
    return [
        tuple(t[i, : len(r)].cpu() for t in (indices.to(torch.int32), values, target, top2))
        for i, r in enumerate(rows)
    ]


def write_teacher_topk(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    output_dir: str | os.PathLike,
    *,
    args: SFTConfig | None = None,
    top_k: int = 32,
    temperature: float = 1.0,
    shard_size: int = 1024,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
) -> dict[str, int]:
    """Run `teacher` over `dataset` once and store its top-k next-token log-probs at `temperature` per position.

    The dataset is tokenized as the trainer will tokenize it under `args` (pass the training config: same
    `max_length`, masks and chat template). Resumable: finished shards are kept, the rest written; a directory
    written with other settings is refused. With several processes, shard i is written by process i mod N.
    Returns counts of shards `written` and `skipped` by this process and the store's `num_rows`.
    """
    if args is None:  # only its tokenization settings matter, and its device set-up
        args = SFTConfig(
            output_dir=str(output_dir), report_to="none", use_cpu=not torch.cuda.is_available(), bf16=False
        )
    # The config sets up the (possibly multi-process) state: a bare PartialState() would not go distributed on CPU.
    _ = args.device
    state = PartialState()
    vocab = output_vocab_size(teacher)
    if not 2 <= top_k < vocab:
        raise ValueError(f"top_k must be in [2, {vocab - 1}] (below the teacher's vocabulary), got {top_k}")
    rows = tokenize_like_sft(dataset, tokenizer, args)["input_ids"]
    folder = Path(output_dir)
    metadata = {
        "format_version": FORMAT_VERSION,
        "top_k": top_k,
        "temperature": float(temperature),
        "num_rows": len(rows),
        "shard_size": shard_size,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "tokenizer": tokenizer.name_or_path,
        "vocab_size": vocab,
        "teacher": getattr(teacher, "name_or_path", "") or type(teacher).__name__,
        "dtype": str(dtype).removeprefix("torch."),
        # A rerun resumes only over the same rows and the same teacher: finished shards of other data or of another
        # teacher (retrained under the same path) must not be mixed in.
        "data_fingerprint": hashlib.sha256(b"".join(_row_key(r) for r in rows)).hexdigest()[:16],
        "teacher_fingerprint": teacher_fingerprint(teacher),
    }
    _check_or_write_metadata(folder, metadata, state)
    state.wait_for_everyone()
    was_training = teacher.training
    teacher.eval()
    written = skipped = 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for shard in range(math.ceil(len(rows) / shard_size)):
        if shard % state.num_processes != state.process_index:
            continue
        path = folder / _shard_name(shard)
        if path.exists():
            skipped += 1
            continue
        shard_rows = rows[shard * shard_size : (shard + 1) * shard_size]
        parts = []
        for start in range(0, len(shard_rows), batch_size):
            parts += _teacher_topk_rows(teacher, shard_rows[start : start + batch_size], top_k, temperature, pad_id)
        lengths = torch.tensor([0] + [len(r) for r in shard_rows])
        tensors = {
            "input_ids": torch.tensor([t for r in shard_rows for t in r], dtype=torch.int64),
            "offsets": lengths.cumsum(0),
            "topk_ids": torch.cat([p[0] for p in parts]).contiguous(),
            "topk_logprobs": torch.cat([p[1] for p in parts]).to(dtype).contiguous(),
            "target_logprobs": torch.cat([p[2] for p in parts]).to(dtype).contiguous(),
            "top2_logprobs": torch.cat([p[3] for p in parts]).to(dtype).contiguous(),
        }
        with atomic_path(path) as temporary:  # a reader or a rerun sees the whole shard or none
            save_file(tensors, str(temporary))
        written += 1
    teacher.train(was_training)
    state.wait_for_everyone()
    return {"written": written, "skipped": skipped, "num_rows": len(rows)}


class TeacherLogitsStore:
    """Read access to a directory written by `write_teacher_topk`: rows looked up by their tokens."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not (self.path / METADATA).exists():
            raise FileNotFoundError(
                f"{self.path} holds no teacher logits ({METADATA} missing): run write_teacher_topk"
            )
        self.metadata = json.loads((self.path / METADATA).read_text())
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.path} holds teacher logits in format {self.metadata.get('format_version')}, this version "
                f"reads format {FORMAT_VERSION}: rewrite them with write_teacher_topk into a new directory"
            )
        self.top_k, self.temperature = self.metadata["top_k"], self.metadata["temperature"]
        num_rows, shard_size = self.metadata["num_rows"], self.metadata["shard_size"]
        num_shards = math.ceil(num_rows / shard_size)
        missing = [i for i in range(num_shards) if not (self.path / _shard_name(i)).exists()]
        if missing:
            raise ValueError(
                f"{self.path} is incomplete: {len(missing)} of {num_shards} shards missing (first: "
                f"{_shard_name(missing[0])}). Rerun write_teacher_topk with the same arguments: it resumes."
            )
        self._offsets: list[torch.Tensor] = []
        self._index: dict[bytes, int] = {}
        for shard in range(num_shards):
            with safe_open(self.path / _shard_name(shard), "pt") as handle:
                ids, offsets = handle.get_tensor("input_ids"), handle.get_tensor("offsets")
            self._offsets.append(offsets)
            for local in range(len(offsets) - 1):
                self._index.setdefault(
                    _row_key(ids[offsets[local] : offsets[local + 1]].tolist()), shard * shard_size + local
                )
        self._handles: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Open safetensors handles are not picklable (DataLoader workers): each process reopens its own.
        return {**self.__dict__, "_handles": {}}

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if self.metadata["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
            raise ValueError(
                f"The teacher logits in {self.path} were written with tokenizer {self.metadata['tokenizer']!r} "
                f"(fingerprint {self.metadata['tokenizer_fingerprint']}), but the student's is "
                f"{tokenizer.name_or_path!r} (fingerprint {tokenizer_fingerprint(tokenizer)}). The stored token ids "
                "mean different text for the student: write the logits with the student's tokenizer, or train the "
                "student with the tokenizer they were written with."
            )

    def find(self, input_ids: Sequence[int]) -> int | None:
        """Global row number of the stored row with exactly these tokens, or None."""
        return self._index.get(_row_key(input_ids))

    def row(self, index: int) -> dict[str, torch.Tensor]:
        """`input_ids` (L,), `topk_ids` (L, k) int64, float32 `topk_logprobs` (L, k), `target_logprobs` (L,) and
        `top2_logprobs` (L, 2)."""
        shard, local = divmod(index, self.metadata["shard_size"])
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(self.path / _shard_name(shard), "pt")
        start, end = self._offsets[shard][local].item(), self._offsets[shard][local + 1].item()
        out = {name: handle.get_slice(name)[start:end] for name in ("input_ids", "topk_ids")}
        floats = ("topk_logprobs", "target_logprobs", "top2_logprobs")
        out.update({name: handle.get_slice(name)[start:end].float() for name in floats})
        out["topk_ids"] = out["topk_ids"].long()
        return out

    def attach(
        self, dataset: Dataset, name: str = "train", tokenizer: PreTrainedTokenizerBase | None = None
    ) -> Dataset:
        """`dataset` (tokenized) with a `teacher_row` column pointing into the store; a row whose tokens match no
        stored row is a `ValueError` (it was tokenized differently from when the logits were written)."""
        found = [self.find(ids) for ids in dataset["input_ids"]]
        missing = [i for i, row in enumerate(found) if row is None]
        if missing:
            ids = dataset[missing[0]]["input_ids"]
            shown = repr(tokenizer.decode(ids[:40])) if tokenizer is not None else ids[:40]
            raise ValueError(
                f"{len(missing)} of {len(found)} {name} rows have token ids that match no row stored in {self.path} "
                f"(first: row {missing[0]}, starting {shown}). The teacher's tokens must be the student's: write the "
                "logits for this dataset with the trainer's tokenizer and config (write_teacher_topk(..., "
                "args=training_args): same chat template, max_length and truncation_mode)."
            )
        return dataset.add_column("teacher_row", found)


@dataclass
class TeacherTopKCollator:
    """Wraps the SFT collator: adds each row's stored teacher top-k, laid out like the batch's `input_ids` (right
    padded, or concatenated when padding-free), after checking the stored tokens are the batch's tokens."""

    collator: Any
    store: TeacherLogitsStore
    padding_free: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if "teacher_row" not in examples[0]:
            raise ValueError(
                "examples reach the collator without `teacher_row`: with teacher_logits_path the trainer must prepare "
                "the dataset itself (do not set dataset_kwargs={'skip_prepare_dataset': True})"
            )
        rows = [self.store.row(example.pop("teacher_row")) for example in examples]
        batch = self.collator(examples)
        for example, row in zip(examples, rows):
            if row["input_ids"].tolist() != list(example["input_ids"]):
                raise ValueError(
                    f"stored teacher tokens differ from the batch's tokens ({row['input_ids'][:12].tolist()}... vs "
                    f"{list(example['input_ids'])[:12]}...): the store {self.store.path} does not belong to this data"
                )
        width = batch["input_ids"].shape[1]
        for key in TOPK_KEYS:
            name = key.removeprefix("teacher_")
            tensors = [row[name] for row in rows]
            if self.padding_free:
                tensors = [torch.cat(tensors)]
            padded = pad(tensors, padding_value=0, padding_side="right")
            extra = width - padded.shape[1]  # pad_to_multiple_of can make the batch wider
            if extra:
                padded = torch.nn.functional.pad(padded, (0, 0) * (padded.dim() - 2) + (0, extra))
            batch[key] = padded
        return batch
