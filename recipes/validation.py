"""What every recipe checks before it builds a model: arguments, data, config overrides and the output directory.

Every recipe (and the pipeline, which runs them) goes through `parse_recipe_args` (flags merged with the YAML),
`check_arguments` (values, the dataset, the DPO losses) and `check_run_manifest` (a resume must have the settings
of the run it resumes), so a mistake is reported in seconds, naming the flag, file or value and the fix, and
never as a library traceback after minutes of sampling. Errors are `InputError`s; `run_recipe` prints them
without a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from datasets import Dataset, load_dataset
from datasets.exceptions import DatasetNotFoundError
from trl import DPOConfig, TrlParser

from eval.files import write_json_atomic
from eval.loading import InputError, check_has_weights, check_model_path

from .synthetic import LANGUAGES, LEVELS

__all__ = [
    "InputError",
    "MANIFEST",
    "check_arguments",
    "check_run_manifest",
    "load_task_dataset",
    "parse_mapping",
    "parse_recipe_args",
    "run_recipe",
    "run_settings",
]

MANIFEST = "run_manifest.json"
# Flags holding config fields: given both in the YAML and on the command line, the two mappings are merged (the
# command line wins per field) rather than the command line's replacing the YAML's.
MERGED_MAPPINGS = ("model_config_overrides", "teacher_config_overrides")
DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# The losses TRL's DPOTrainer computes; it checks `loss_type` only in its first training step.
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------


def parse_mapping(value: Any, flag: str) -> dict[str, Any]:
    """A mapping given as a dict or as JSON/YAML text (`{hidden_size: 128}`); anything else names the flag."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        parsed = yaml.safe_load(value) if isinstance(value, str) else value
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise InputError(
            f"{flag}: {value!r} is not a JSON/YAML mapping{where} ({getattr(error, 'problem', error)}); "
            "write it like '{\"hidden_size\": 128}'"
        ) from None
    if parsed is None:
        return {}
    if not isinstance(parsed, dict):
        raise InputError(f"{flag}: expected a mapping like '{{\"hidden_size\": 128}}', got {value!r}")
    return parsed


def _yaml_config(argv: Sequence[str]) -> tuple[str | None, dict[str, Any]]:
    if "--config" not in argv:
        return None, {}
    path = Path(argv[list(argv).index("--config") + 1])
    if not path.is_file():
        raise InputError(f"--config: no such file {str(path)!r}")
    try:
        return str(path), yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"--config {path}:{where} is not valid YAML ({getattr(error, 'problem', error)})") from None


def merge_mapping_flags(argv: Sequence[str]) -> list[str]:
    """`argv` with each `--model_config_overrides` / `--teacher_config_overrides` merged over the YAML's."""
    argv = list(argv)
    path, config = _yaml_config(argv)
    for name in MERGED_MAPPINGS:
        flag = f"--{name}"
        if flag not in argv or name not in config:
            continue
        position = argv.index(flag) + 1
        if position >= len(argv):
            raise InputError(f"{flag} needs a value, e.g. '{{\"hidden_size\": 128}}'")
        merged = {**parse_mapping(config[name], f"{name} in {path}"), **parse_mapping(argv[position], flag)}
        argv[position] = json.dumps(merged)
    return argv


def _unknown_argument_error(message: str, dataclass_types: Sequence[type]) -> InputError:
    """TRL's / HfArgumentParser's unknown-argument error as one line, with the closest valid name for each."""
    known = sorted({f.name for cls in dataclass_types for f in dataclasses.fields(cls)})
    given = re.findall(r"'--([A-Za-z_][A-Za-z0-9_.\-]*)'", message.split(":", 1)[-1])
    hints = []
    for name in dict.fromkeys(given):
        close = difflib.get_close_matches(name.replace("-", "_"), known, n=1, cutoff=0.6)
        hints.append(f"--{name}" + (f" (did you mean --{close[0]}?)" if close else ""))
    where = "in the --config file" if "config file" in message else "on the command line"
    return InputError(f"unknown argument {where}: {', '.join(hints) or message}; `--help` lists every argument")


def parse_recipe_args(dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple:
    """`TrlParser(dataclass_types).parse_args_and_config(argv)` with the config-override mappings merged; an
    unknown name or a value a config class refuses (its own checks, e.g. GRPO's batch divisibility) becomes an
    `InputError`."""
    argv = merge_mapping_flags(sys.argv[1:] if argv is None else argv)
    try:
        parsed = TrlParser(tuple(dataclass_types)).parse_args_and_config(argv)
    except ValueError as error:
        message = str(error)
        if "Unknown arguments" in message or "arguments are not used" in message:
            raise _unknown_argument_error(message, dataclass_types) from None
        raise InputError(" ".join(message.split()) or repr(error)) from None
    for args in parsed:
        _scalars_as_lists(args)
    return parsed


def _scalars_as_lists(args: Any) -> None:
    """A YAML scalar for a list field (`levels: 1`, `reward_funcs: format_reward`) as one item, not its characters
    (the YAML values bypass argparse's `nargs`)."""
    if not dataclasses.is_dataclass(args):
        return
    for spec in dataclasses.fields(args):
        value = getattr(args, spec.name, None)
        if "list" in str(spec.type) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            setattr(args, spec.name, [value])


def run_recipe(main: Callable, dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> Any:
    """The recipes' `__main__`: parse, run, and print an `InputError` as one line (exit status 2)."""
    try:
        return main(*parse_recipe_args(dataclass_types, argv))
    except InputError as error:
        raise SystemExit(f"error: {error}") from None


# ---------------------------------------------------------------------------------------------------------------
# Arguments and data
# ---------------------------------------------------------------------------------------------------------------


def _at_least(args: Any, name: str, low: int) -> None:
    """A whole number >= `low` (YAML values bypass argparse's types), or unset."""
    value = getattr(args, name, None)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"--{name} {value!r}: must be a whole number (at least {low})")
    if value < low:
        raise InputError(f"--{name} {value}: must be at least {low}")


def check_arguments(script_args: Any, training_args: Any = None, model_args: Any = None) -> None:
    """Every check that needs no model and no data download; raises `InputError`."""
    if not script_args.dataset_name:
        _at_least(script_args, "train_problems", 1)
        unknown = sorted(set(script_args.languages) - set(LANGUAGES))
        if unknown:
            raise InputError(f"--languages: the synthetic task has no {unknown}; it has {list(LANGUAGES)}")
        wrong = sorted(set(script_args.levels) - set(LEVELS))
        if wrong:
            raise InputError(f"--levels: the synthetic task has no level {wrong}; it has {list(LEVELS)}")
    else:
        path = Path(script_args.dataset_name).expanduser()
        if path.exists():
            _data_files(path, "--dataset_name")  # readable, well-formed data before a model is built
        else:
            try:
                check_model_path(script_args.dataset_name, "--dataset_name", need_config=False)
            except InputError:
                raise InputError(
                    f"--dataset_name: no such file or directory {script_args.dataset_name!r}; a Hub dataset id looks "
                    "like org/name"
                ) from None
    _at_least(script_args, "heldout_problems", 0)
    for name in ("heldout_batch_size", "heldout_max_new_tokens", "judge_samples", "corpus_documents"):
        _at_least(script_args, name, 1)
    _at_least(script_args, "pair_samples", 2)  # a pair needs two answers to compare
    threshold = getattr(script_args, "judge_threshold", None)
    if threshold is not None and not threshold > 0:
        raise InputError(
            f"--judge_threshold {threshold}: prompts the judge solves at this pass rate or above are dropped, so "
            f"{threshold} drops them all; give a rate in (0, 1] (0.75 by default), or 1.1 to keep every prompt"
        )
    for name in MERGED_MAPPINGS:
        if hasattr(script_args, name):
            setattr(script_args, name, parse_mapping(getattr(script_args, name), f"--{name}") or None)
    model_path = getattr(model_args, "model_name_or_path", None)
    if model_args is not None:
        if not model_path:
            raise InputError("--model_name_or_path is required: a model directory, a config directory (with "
                             "--from_scratch true) or a Hub id")  # fmt: skip
        check_model_path(model_path, "--model_name_or_path")
    for name in ("judge_model_name_or_path", "teacher_model_name_or_path"):
        for args in (script_args, training_args):
            path = getattr(args, name, None)
            if path:
                check_model_path(path, f"--{name}")
    if getattr(script_args, "tokenizer_name_or_path", None):
        check_model_path(script_args.tokenizer_name_or_path, "--tokenizer_name_or_path", need_config=False)
    for name in getattr(script_args, "reward_funcs", None) or []:
        from .common import reward_function  # resolves names and dotted paths; an error names the reward

        reward_function(name)
    if getattr(script_args, "load_in_int4", False) and not getattr(model_args, "use_peft", False):
        raise InputError(
            "--load_in_int4 true trains LoRA adapters over the int4 experts (QLoRA): add --use_peft true; "
            "the int4 weights themselves are not trainable"
        )
    fp8 = [f"--{name} true" for name in ("fp8", "fp8_emulate") if getattr(script_args, name, False)]
    if fp8 and getattr(script_args, "load_in_int4", False):
        raise InputError(
            f"{fp8[0]} and --load_in_int4 true do not combine: FP8 trains every weight through FP8 GEMMs, int4 keeps "
            "the experts frozen for LoRA (QLoRA); choose one"
        )
    output_dir = getattr(training_args, "output_dir", None)
    if output_dir and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise InputError(f"--output_dir {output_dir!r} is a file; give a directory for the run")
    _check_training_numbers(training_args, model_args, getattr(script_args, "reward_funcs", None))
    resume = getattr(training_args, "resume_from_checkpoint", None)
    if resume and str(resume).lower() != "true" and not Path(resume).expanduser().is_dir():
        raise InputError(
            f"--resume_from_checkpoint {resume!r}: no such checkpoint directory; give a checkpoint-N directory, or "
            "leave the flag out: a re-run resumes from the last complete checkpoint in --output_dir by itself"
        )
    if isinstance(training_args, DPOConfig):
        unknown = [loss for loss in training_args.loss_type or [] if loss not in DPO_LOSS_TYPES]
        if unknown:
            raise InputError(f"--loss_type {unknown}: DPO has no such loss; choose from {list(DPO_LOSS_TYPES)}")
    if model_path and not getattr(script_args, "from_scratch", False):  # last: the other mistakes first
        check_has_weights(model_path, "--model_name_or_path", "add --from_scratch true to train a fresh model "
                          "built from it, or give the directory a trained model was saved to")  # fmt: skip


def _check_training_numbers(training_args: Any, model_args: Any, rewards: list[str] | None = None) -> None:
    """Values the Trainer, TRL or torch would refuse only after the model is built (or accept and misuse)."""
    weight = getattr(training_args, "min_prompt_weight", None)
    if weight is not None and not weight >= 0:
        raise InputError(f"--min_prompt_weight {weight}: must be >= 0 (a floor on every prompt's draw weight p(1-p))")
    fraction = getattr(training_args, "curriculum_fraction", None)
    if fraction is not None and not 0 <= fraction <= 1:
        raise InputError(
            f"--curriculum_fraction {fraction}: the share of training over which levels unlock, from 0 to 1 (0.2, "
            "not 20); 0 unlocks every level at once"
        )
    if training_args is not None:
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "max_length", "max_completion_length", "max_prompt_length"):  # fmt: skip
            _at_least(training_args, name, 1)
        rate = getattr(training_args, "learning_rate", None)
        if rate is not None and not (isinstance(rate, (int, float)) and 0 < rate < float("inf")):
            raise InputError(f"--learning_rate {rate!r}: give a positive number, e.g. 1e-5 (0 trains nothing)")
        if getattr(training_args, "max_steps", None) == 0:
            raise InputError("--max_steps 0: transformers would still train one step; give a positive number of "
                             "steps, or -1 to train for --num_train_epochs")  # fmt: skip
        temperature = getattr(training_args, "temperature", None)
        if temperature is not None and not temperature > 0:
            raise InputError(f"--temperature {temperature!r}: sampling needs a temperature above 0, e.g. 1.0")
        _at_least(training_args, "num_generations", 2)  # group-relative advantages need two or more
        weights = getattr(training_args, "reward_weights", None)
        if weights and rewards and len(weights) != len(rewards):
            raise InputError(f"--reward_weights {weights}: give one weight per reward in --reward_funcs {rewards}")
    if model_args is not None and getattr(model_args, "use_peft", False):
        _at_least(model_args, "lora_r", 1)


def _check_json_lines(path: Path) -> None:
    """Name the file and line of the first malformed JSON record (the datasets error names neither). A .json file
    may hold one document or JSON Lines, as the `json` builder reads both."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            json.loads(text)
            return
        except json.JSONDecodeError as error:
            if text.lstrip().startswith("["):
                raise InputError(
                    f"{path}:{error.lineno}: malformed JSON ({error.msg}, column {error.colno})"
                ) from None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(
                    f"{path}:{number}: malformed JSON ({error.msg}, column {error.colno}); a .jsonl file holds one "
                    "JSON object per line"
                ) from None
            if not isinstance(record, dict):
                raise InputError(
                    f"{path}:{number}: a JSON {type(record).__name__}, not an object; a .jsonl file holds one JSON "
                    'object per line, e.g. {"prompt": "...", "answer": "..."}'
                )


def _data_files(path: Path, flag: str) -> tuple[str, list[Path]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES)
    if not files:
        raise InputError(
            f"{flag} {str(path)!r} holds no data files (.jsonl, .json, .csv or .parquet): put train.jsonl (and "
            "test.jsonl) in it, or give a Hub dataset id"
        )
    builders = {DATA_SUFFIXES.get(p.suffix) for p in files}
    if None in builders or len(builders) > 1:
        raise InputError(
            f"{flag} {str(path)!r}: data files must all be .jsonl/.json, .csv or .parquet, got "
            f"{sorted({p.suffix for p in files})}"
        )
    for file in files:
        if file.stat().st_size == 0 or (file.suffix in (".json", ".jsonl") and not file.read_text().strip()):
            raise InputError(f"{flag}: the data file {str(file)!r} is empty (no rows)")
        if file.suffix in (".json", ".jsonl"):
            _check_json_lines(file)
    return builders.pop(), files


def load_task_dataset(
    name: str,
    split: str,
    columns: Sequence[str] = (),
    flag: str = "--dataset_name",
    split_flag: str = "",
    optional: Sequence[str] = (),
) -> Dataset:
    """Split `split` of a Hub dataset, a local directory or a single data file, with `columns` present and at least
    one row; `optional` columns are checked (chat messages) where present. Every failure names the flag, the path
    (and line) and the fix."""
    path = Path(name).expanduser()
    if path.exists():
        builder, files = _data_files(path, flag)
        if path.is_file():
            if split != "train":
                raise InputError(
                    f"{flag} {name!r} is a single file, which holds only a 'train' split, not {split!r}: give a "
                    f"directory with train and {split} files, or skip the held-out split (--heldout_problems 0)"
                )
            data_files = {"train": [str(path)]}
        else:
            data_files = None
        try:
            if data_files is not None:
                dataset = load_dataset(builder, data_files=data_files, split=split)
            else:
                dataset = load_dataset(str(path), split=split)
        except ValueError as error:
            if "split" in str(error).lower():
                raise InputError(
                    f"{flag} {name!r} has no {split!r} split ({error}); name its files {split}.jsonl etc."
                    + (f", or choose another with {split_flag}" if split_flag else "")
                ) from None
            raise
    else:
        if Path(name).is_absolute() or name.startswith(".") or name.count("/") > 1:
            raise InputError(f"{flag}: no such file or directory {name!r}; a Hub dataset id looks like org/name")
        try:
            dataset = load_dataset(name, split=split)
        except DatasetNotFoundError:
            raise InputError(
                f"{flag} {name!r}: no such dataset on the Hub (misspelt, or private: log in with `hf auth login`), "
                "and no local file or directory of that name"
            ) from None
        except ConnectionError as error:  # offline, or HF_HUB_OFFLINE=1 and not in the cache
            raise InputError(
                f"{flag} {name!r}: {error}. Without a network, give a local file or a directory with train.jsonl "
                "(and test.jsonl); a Hub dataset read once before is found in the cache with HF_HUB_OFFLINE=1"
            ) from None
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise InputError(
            f"{flag} {name!r} ({split}) lacks the columns {missing} (it has {dataset.column_names}): recipes need "
            "`prompt` (chat messages) and `answer` (the gold final answer), plus `completion` for SFT and "
            "codistillation, and `text` for pretraining"
        )
    if len(dataset) == 0:
        raise InputError(f"{flag} {name!r} ({split}) has no rows")
    present = [*columns, *(column for column in optional if column in dataset.column_names)]
    chats = [column for column in present if column in CHAT_COLUMNS]
    if "answer" in present and (missing := [i for i, answer in enumerate(dataset["answer"], 1) if answer is None]):
        raise InputError(
            f"{flag} {name!r} ({split}), row {missing[0]}: `answer` is null ({len(missing)} rows in all); the rewards "
            "and the judge grade against it (it would be read as the text 'None'): give every row its answer"
        )
    for column in chats:
        _check_chat_column(dataset, column, f"{flag} {name!r} ({split})")
    return _as_chat_messages(dataset, chats)


# The roles Llama 4's chat template renders; any other (a typo such as "usr") would be rendered as a header
# the model never saw in training, silently.
CHAT_ROLES = ("system", "user", "assistant", "tool", "ipython")


def _check_chat_column(dataset: Dataset, column: str, where: str) -> None:
    """A chat column is plain non-empty strings or lists of {"role", "content"} messages with known roles, one form
    for every row."""
    if getattr(dataset.features[column], "dtype", None) in ("string", "large_string"):
        for number, text in enumerate(dataset[column], 1):
            if text is None or not text.strip():
                raise InputError(
                    f"{where}, row {number}: `{column}` is {_describe(text)}; an empty {column} would train the model "
                    "on nothing (an empty completion teaches it to stop at once): fill it in or drop the row"
                )
        return
    for number, messages in enumerate(dataset[column], 1):
        if isinstance(messages, str | int | float):  # a mixed column: the loader may even read "2" as 2
            raise InputError(
                f"{where}, row {number}: `{column}` is a plain string while other rows hold message lists; use one "
                'form for every row (a string, or [{"role": ..., "content": ...}, ...])'
            )
        if not isinstance(messages, list) or not messages:
            raise InputError(
                f"{where}, row {number}: `{column}` is {_describe(messages)}; it must be a string or a non-empty "
                'list of messages like {"role": "user", "content": "..."}'
            )
        for message in messages:
            role = message.get("role") if isinstance(message, dict) else None
            if role not in CHAT_ROLES or "content" not in message:
                raise InputError(
                    f"{where}, row {number}: `{column}` has the message {_describe(message)}; each message is "
                    f'{{"role": ..., "content": ...}} with a role from {list(CHAT_ROLES)}'
                )


# Columns the recipes read as chat messages, with the role a plain string in them is given.
CHAT_COLUMNS = {"prompt": "user", "completion": "assistant", "chosen": "assistant", "rejected": "assistant"}


def _as_chat_messages(dataset: Dataset, columns: Sequence[str]) -> Dataset:
    """Plain-string prompts and completions as one-message chats: the recipes render them with the chat template,
    as TRL's conversational format does."""
    strings = [
        column for column in columns if getattr(dataset.features[column], "dtype", None) in ("string", "large_string")
    ]
    if not strings:
        return dataset
    return dataset.map(
        lambda row: {column: [{"role": CHAT_COLUMNS[column], "content": row[column]}] for column in strings},
        desc="plain strings as chat messages",
    )


# ---------------------------------------------------------------------------------------------------------------
# The output directory: what a resume must share with the run it resumes
# ---------------------------------------------------------------------------------------------------------------

# Arguments that do not change the trained model: where and how often it logs and saves, and where it is pushed.
IGNORED_ARGUMENTS = {
    "output_dir", "logging_dir", "run_name", "report_to", "resume_from_checkpoint", "overwrite_output_dir",
    "logging_steps", "logging_strategy", "logging_first_step", "logging_nan_inf_filter", "log_level",
    "log_level_replica", "log_on_each_node", "disable_tqdm", "save_steps", "save_strategy", "save_total_limit",
    "save_only_model", "save_safetensors", "eval_steps", "eval_strategy", "per_device_eval_batch_size",
    "push_to_hub", "push_to_hub_requested", "hub_model_id", "hub_token", "hub_private_repo", "hub_strategy",
    "hub_always_push", "hub_revision", "dataloader_num_workers", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "local_rank", "heldout_problems", "heldout_batch_size", "heldout_max_new_tokens",
    "dataset_test_split", "write_teacher_logits_only", "trackio_space_id", "project",
}  # fmt: skip


def _model_files(path: str) -> dict[str, Any] | None:
    """A local model's config (its hash) and weights (size and modification time, cheap for any size): a
    retrained model at the same path differs. None for a Hub id."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    files: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        files["config.json"] = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()[:16]
    for weights in sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")):
        files[weights.name] = [weights.stat().st_size, weights.stat().st_mtime_ns]
    return files


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run_settings(script_args: Any, training_args: Any, model_args: Any) -> dict[str, Any]:
    """What a run's result depends on: the model (path and, when local, its files), the data and task arguments,
    and the training arguments, less `IGNORED_ARGUMENTS`."""
    settings: dict[str, Any] = {}
    for args in (model_args, script_args):
        if args is not None:
            settings.update(dataclasses.asdict(args))
    if training_args is not None:
        settings.update(training_args.to_dict())
    settings = {k: v for k, v in _plain(settings).items() if k not in IGNORED_ARGUMENTS and not k.startswith("_")}
    for key in ("model_name_or_path", "teacher_model_name_or_path", "judge_model_name_or_path"):
        if settings.get(key):
            settings[f"{key} files"] = _model_files(settings[key])
    return settings


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _holds_a_run(folder: Path) -> bool:
    """Whether there is anything to resume or reuse: a checkpoint or a results file (a run that stopped before its
    first checkpoint leaves nothing a new run could mix with)."""
    results = any((folder / name).is_file() for name in ("results.json", "stage_results.json"))
    return results or any(folder.glob("checkpoint-*"))


# Besides the weights, what `save_pretrained` / the Trainer write at the top of an output directory.
PREVIOUS_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "README.md",
    "training_args.bin",
)


def _refuse_deleting_an_input(folder: Path, settings: dict[str, Any]) -> None:
    """`--overwrite_output_dir` clears `folder`: refuse when a model, tokenizer or checkpoint the run reads is in it."""
    root = folder.expanduser().resolve()
    for key, value in settings.items():
        if not (key.endswith("_name_or_path") or key == "resume_from_checkpoint") or not isinstance(value, str):
            continue
        read = Path(value).expanduser()
        if read.is_dir() and (read.resolve() == root or root in read.resolve().parents):
            raise InputError(
                f"--{key} {value!r} is inside --output_dir {str(folder)!r}: --overwrite_output_dir would delete it "
                "before it is read; choose another --output_dir"
            )


def check_run_manifest(
    output_dir: str | Path, settings: dict[str, Any], *, overwrite: bool = False, write: bool = True
) -> None:
    """Refuse to resume in `output_dir` a run made with other `settings` (when it left a checkpoint or results),
    naming each that changed; with `overwrite`, remove its checkpoints, model and results first. Records `settings` in `output_dir/run_manifest.json` (atomically)."""
    folder = Path(output_dir)
    path = folder / MANIFEST
    if overwrite:
        _refuse_deleting_an_input(folder, settings)
        for checkpoint in folder.glob("checkpoint-*"):
            shutil.rmtree(checkpoint, ignore_errors=True)
        # The previous run's model too (only in a recipe's own directory: it wrote a manifest), so a run that fails
        # before saving does not leave it to be loaded as this one's.
        if path.is_file():
            previous_model = [*folder.glob("*.safetensors"), *folder.glob("*.bin"), *folder.glob("*.index.json")]
            for file in previous_model + [folder / name for name in PREVIOUS_MODEL_FILES]:
                file.unlink(missing_ok=True)
        for name in ("results.json", "stage_results.json", MANIFEST):
            (folder / name).unlink(missing_ok=True)
    elif path.is_file() and _holds_a_run(folder):
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            stored = None
        if isinstance(stored, dict):
            changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            if changed:
                lines = [f"  {k}: {_describe(stored.get(k))} -> {_describe(settings.get(k))}" for k in changed[:12]]
                more = f"\n  ... and {len(changed) - 12} more" if len(changed) > 12 else ""
                raise InputError(
                    f"output_dir {str(folder)!r} holds a run made with other settings, which a resume would mix with "
                    "these (before -> now):\n" + "\n".join(lines) + more + "\nRerun with the same arguments to "
                    "resume, choose another --output_dir, or pass --overwrite_output_dir true to start over (it "
                    "deletes the checkpoints and results there)."
                )
    if write:
        write_json_atomic(path, settings)
