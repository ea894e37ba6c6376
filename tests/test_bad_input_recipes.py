"""Mistakes a new user makes with the recipes: each fails in seconds, before a model is built, with an `InputError`
that names the flag, path or value and the fix (never a library traceback)."""

import json
import os
import stat

import pytest
from trl import DPOConfig, ModelConfig, SFTConfig

from recipes import codistill, dpo, online_rl, pretrain, sft
from recipes.common import write_json_atomic
from recipes.rl import OnlineRLConfig
from recipes.trainers import CoDistillationConfig
from recipes.validation import (
    DPO_LOSS_TYPES,
    InputError,
    load_task_dataset,
    merge_mapping_flags,
    parse_recipe_args,
    run_recipe,
)

FAST = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--max_steps", "1"]
RECIPES = {
    "pretrain": (pretrain, (pretrain.PretrainScriptArguments, SFTConfig, ModelConfig)),
    "sft": (sft, (sft.SFTScriptArguments, SFTConfig, ModelConfig)),
    "online_rl": (online_rl, (online_rl.OnlineRLScriptArguments, OnlineRLConfig, ModelConfig)),
    "dpo": (dpo, (dpo.DPOScriptArguments, DPOConfig, ModelConfig)),
    "codistill": (codistill, (codistill.CoDistillScriptArguments, CoDistillationConfig, ModelConfig)),
}


def run(name: str, tmp_path, *argv: str, model: str = "hub_configs/tiny"):
    """A recipe's `main` on parsed flags; the model is never reached when the input is bad."""
    module, types = RECIPES[name]
    flags = ["--model_name_or_path", model, "--output_dir", str(tmp_path / "out"), *FAST, *argv]
    if name == "online_rl":
        flags += ["--num_generations", "2", "--per_device_train_batch_size", "2"]
    return module.main(*parse_recipe_args(types, flags))


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a recipe gets as far as building a model."""
    import recipes.common

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was reported")

    monkeypatch.setattr(recipes.common, "load_causal_lm", refuse)


# ---------------------------------------------------------------------------------------------------------------
# Model and tokenizer paths
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RECIPES))
def test_mistyped_local_model_path_names_it_and_the_hub_id_form(name, tmp_path, no_model):
    typo = str(tmp_path / "outputs" / "pipline" / "sft")
    with pytest.raises(
        InputError, match=r"--model_name_or_path: no such directory .*pipline.*a Hub id looks like org/name"
    ):
        run(name, tmp_path, model=typo)


def test_relative_mistyped_path_is_not_taken_for_a_hub_id(tmp_path, no_model):
    with pytest.raises(InputError, match=r"no such directory './hub_configs/tinyy'"):
        run("sft", tmp_path, model="./hub_configs/tinyy")


def test_model_path_that_is_a_file(tmp_path, no_model):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(InputError, match=r"is a file, not a model directory: give the directory that holds config"):
        run("sft", tmp_path, model=str(file))


def test_model_directory_without_config(tmp_path, no_model):
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(InputError, match=r"empty_model' is a directory without config.json"):
        run("dpo", tmp_path, model=str(tmp_path / "empty_model"))


def test_mistyped_judge_path(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--judge_model_name_or_path: no such directory .*judge.*org/name"):
        run("sft", tmp_path, "--judge_model_name_or_path", str(tmp_path / "no" / "judge"))


def test_mistyped_teacher_path(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--teacher_model_name_or_path: no such directory .*teacher.*org/name"):
        run("codistill", tmp_path, "--teacher_model_name_or_path", str(tmp_path / "no" / "teacher"))


def test_mistyped_tokenizer_path(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--tokenizer_name_or_path: no such directory .*tokenizr"):
        run("pretrain", tmp_path, "--tokenizer_name_or_path", str(tmp_path / "a" / "tokenizr"))


def test_cli_prints_the_error_as_one_line_without_a_traceback(tmp_path, capsys):
    argv = ["--model_name_or_path", str(tmp_path / "x" / "y"), "--output_dir", str(tmp_path / "out"), *FAST]
    with pytest.raises(SystemExit) as raised:
        run_recipe(sft.main, RECIPES["sft"][1], argv)
    assert str(raised.value).startswith("error: --model_name_or_path: no such directory")


# ---------------------------------------------------------------------------------------------------------------
# Task arguments and data
# ---------------------------------------------------------------------------------------------------------------


def test_zero_train_problems(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--train_problems 0: must be at least 1"):
        run("sft", tmp_path, "--train_problems", "0")


def test_negative_heldout_problems(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--heldout_problems -1: must be at least 0"):
        run("online_rl", tmp_path, "--heldout_problems", "-1")


def test_zero_judge_samples(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--judge_samples 0: must be at least 1"):
        run("sft", tmp_path, "--judge_samples", "0")


def test_unknown_synthetic_language(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--languages: the synthetic task has no \['xx'\]; it has"):
        run("dpo", tmp_path, "--languages", "en", "xx")


def test_unknown_synthetic_level(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--levels: the synthetic task has no level \[7\]"):
        run("sft", tmp_path, "--levels", "1", "7")


def test_empty_dataset_directory(tmp_path, no_model):
    (tmp_path / "data").mkdir()
    with pytest.raises(InputError, match=r"--dataset_name .*data' holds no data files .*put train.jsonl"):
        run("sft", tmp_path, "--dataset_name", str(tmp_path / "data"))


def test_missing_dataset_path(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--dataset_name: no such file or directory .*nope.*Hub dataset id"):
        run("sft", tmp_path, "--dataset_name", str(tmp_path / "data" / "nope.jsonl"))


def test_malformed_jsonl_names_file_and_line(tmp_path, no_model):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": [], "answer": "1"}\n{"prompt": [}, "answer": "2"}\n')
    with pytest.raises(InputError, match=r"data.jsonl:2: malformed JSON"):
        run("sft", tmp_path, "--dataset_name", str(data))


def test_a_jsonl_line_that_is_not_an_object_names_file_and_line(tmp_path, no_model):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n["2+2?", "4"]\n')
    with pytest.raises(InputError, match=r"data.jsonl:2: a JSON list, not an object"):
        run("sft", tmp_path, "--dataset_name", str(data))


def test_malformed_json_file_names_the_line(tmp_path, no_model):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text('[\n  {"prompt": 1},\n  {"prompt": 2,,}\n]\n')
    with pytest.raises(InputError, match=r"train.json:3: malformed JSON"):
        run("sft", tmp_path, "--dataset_name", str(tmp_path / "data"))


def problems(count: int, completion: bool = True) -> list[dict]:
    rows = []
    for i in range(count):
        row = {"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)}
        if completion:
            row["completion"] = [{"role": "assistant", "content": f"\\boxed{{{i + 1}}}"}]
        rows.append(row)
    return rows


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_a_single_data_file_trains_and_says_how_to_get_a_heldout_split(tmp_path):
    from recipes.common import task_datasets
    from recipes.sft import SFTScriptArguments

    data = tmp_path / "train.jsonl"
    write_jsonl(data, problems(4))
    train, test = task_datasets(SFTScriptArguments(dataset_name=str(data), heldout_problems=0), ("completion",))
    assert len(train) == 4 and test is None
    with pytest.raises(InputError, match=r"single file, which holds only a 'train' split.*--heldout_problems 0"):
        task_datasets(SFTScriptArguments(dataset_name=str(data), heldout_problems=2))


def test_jsonl_missing_the_recipe_columns(tmp_path):
    from recipes.common import task_datasets
    from recipes.sft import SFTScriptArguments

    data = tmp_path / "train.jsonl"
    write_jsonl(data, problems(3, completion=False))
    with pytest.raises(InputError, match=r"lacks the columns \['completion'\].*plus `completion` for SFT"):
        task_datasets(SFTScriptArguments(dataset_name=str(data), heldout_problems=0), ("completion",))


def test_directory_without_the_test_split(tmp_path):
    from recipes.common import task_datasets
    from recipes.sft import SFTScriptArguments

    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", problems(3))
    with pytest.raises(InputError, match=r"has no 'test' split.*--dataset_test_split"):
        task_datasets(SFTScriptArguments(dataset_name=str(tmp_path / "data"), heldout_problems=2))


def test_empty_data_file(tmp_path):
    from recipes.common import task_datasets
    from recipes.sft import SFTScriptArguments

    data = tmp_path / "train.jsonl"
    write_jsonl(data, [{"prompt": "x", "answer": "1"}])
    data.write_text("")
    with pytest.raises(InputError, match=r"train.jsonl.*(no rows|holds no data)"):
        task_datasets(SFTScriptArguments(dataset_name=str(data), heldout_problems=0))


def test_pretraining_corpus_without_text(tmp_path, no_model):
    from recipes.validation import load_task_dataset

    data = tmp_path / "corpus.jsonl"
    write_jsonl(data, [{"body": "hello"}])
    with pytest.raises(InputError, match=r"lacks the columns \['text'\].*`text` for pretraining"):
        load_task_dataset(str(data), "train", ("text",))


def test_a_hub_dataset_id_that_cannot_be_reached_offline_says_what_to_do(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match=r"--dataset_name 'someorg/no-such-data': Couldn't reach.*local file"):
        load_task_dataset("someorg/no-such-data", "train", ("prompt",))


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([{"role": "usr", "content": "2+2?"}], r"row 2: `prompt` has the message \{\"role\": \"usr\".*'user'"),
        ([{"role": "user"}, {"content": "2+2?"}], r"row 2: `prompt` has the message .*with a role from"),
        ([], r"row 2: `prompt` is \[\]; it must be a string or a non-empty list"),
    ],
)
def test_chat_messages_with_a_mistyped_role_are_named(tmp_path, prompt, message):
    data = tmp_path / "train.jsonl"
    good = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}], "answer": "2"}
    write_jsonl(data, [good, {"prompt": prompt, "answer": "4"}])
    with pytest.raises(InputError, match=message):
        load_task_dataset(str(data), "train", ("prompt", "answer"))
    write_jsonl(data, [good, good])
    assert load_task_dataset(str(data), "train", ("prompt", "answer"))["prompt"][1] == good["prompt"]


# ---------------------------------------------------------------------------------------------------------------
# Config overrides
# ---------------------------------------------------------------------------------------------------------------


def test_malformed_override_json_names_the_flag(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--model_config_overrides: .* is not a JSON/YAML mapping at line 1"):
        run("pretrain", tmp_path, "--model_config_overrides", '{"hidden_size": 64,, }')


def test_override_that_is_not_a_mapping(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--model_config_overrides: expected a mapping"):
        run("pretrain", tmp_path, "--model_config_overrides", "[1, 2]")


def test_unknown_override_field_is_named_with_the_closest_one(tmp_path):
    with pytest.raises(InputError, match=r"--model_config_overrides: llama4_text configs have no field 'hiden_size' "
                       r"\(did you mean 'hidden_size'\?\)"):  # fmt: skip
        run("pretrain", tmp_path, "--from_scratch", "true", "--model_config_overrides", '{"hiden_size": 32}')


def test_cli_overrides_merge_with_the_yaml_ones(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("model_config_overrides: {hidden_size: 128, head_dim: 32}\nfrom_scratch: true\n")
    argv = merge_mapping_flags(["--config", str(config), "--model_config_overrides", '{"head_dim": 16}'])
    assert json.loads(argv[-1]) == {"hidden_size": 128, "head_dim": 16}
    script_args, _, _ = parse_recipe_args(
        RECIPES["pretrain"][1],
        ["--config", str(config), "--model_config_overrides", "{head_dim: 16}", "--output_dir", str(tmp_path), *FAST],
    )
    assert json.loads(script_args.model_config_overrides) == {"hidden_size": 128, "head_dim": 16}


def test_merged_overrides_reach_the_model_through_the_config(tmp_path, monkeypatch):
    from recipes.common import load_model
    from recipes.pretrain import PretrainScriptArguments

    args = PretrainScriptArguments(from_scratch=True, model_config_overrides={"hidden_size": 32, "head_dim": 8})
    model = load_model("hub_configs/tiny", args)
    assert model.config.hidden_size == 32 and model.config.head_dim == 8


def test_malformed_yaml_config_names_the_file(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("model_config_overrides: {hidden_size: 128\nseed: 0\n")
    with pytest.raises(InputError, match=r"--config .*recipe.yaml: line \d+ is not valid YAML"):
        merge_mapping_flags(["--config", str(config), "--model_config_overrides", "{}"])


# ---------------------------------------------------------------------------------------------------------------
# Errors that came too late
# ---------------------------------------------------------------------------------------------------------------


def test_invalid_dpo_loss_type_before_any_sampling(tmp_path, no_model, monkeypatch):
    monkeypatch.setattr(dpo, "cached_samples", lambda *a, **k: pytest.fail("sampled before checking loss_type"))
    with pytest.raises(InputError, match=r"--loss_type \['sigmod'\]: DPO has no such loss; choose from"):
        run("dpo", tmp_path, "--loss_type", "sigmod")


TEACHER = [
    "--teacher_model_name_or_path",
    "hub_configs/tiny",
    "--teacher_from_scratch",
    "true",
    "--from_scratch",
    "true",
]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--from_scratch", "true"], r"codistillation needs a teacher: --teacher_model_name_or_path .* or"),
        (
            ["--from_scratch", "true", "--teacher_logits_path", "LOGITS"],
            r"--teacher_logits_path '.*' holds no teacher logits \(metadata.json",
        ),
        (
            [*TEACHER, "--teacher_config_overrides", '{"vocab_size": 2048}'],
            r"over 1024 tokens but the teacher .* 2048",
        ),
        ([*TEACHER, "--teacher_logits_path", "LOGITS", "--teacher_logits_top_k", "5000"], r"must be from 2 to 1023"),
    ],
)
def test_codistillation_teacher_mistakes_are_named_before_a_model_loads(tmp_path, no_model, argv, message):
    argv = [str(tmp_path / "logits") if arg == "LOGITS" else arg for arg in argv]
    with pytest.raises(InputError, match=message):
        run("codistill", tmp_path, *argv)


def test_fp8_with_int4_is_refused_before_a_model_loads(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--fp8_emulate true and --load_in_int4 true do not combine"):
        run("sft", tmp_path, "--fp8_emulate", "true", "--load_in_int4", "true", "--use_peft", "true")


def test_a_pass_rate_reward_outside_the_rewards_is_named_and_a_dotted_one_matched(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--pass_rate_reward accuracy_reward: .* \['format_reward'\]; name one"):
        run("online_rl", tmp_path, "--reward_funcs", "format_reward", "--reward_weights", "1.0")
    from recipes.online_rl import check_rewards

    script_args, training_args, _ = parse_recipe_args(
        RECIPES["online_rl"][1],
        ["--reward_funcs", "tests.recipe_rewards.digit_share_reward", "--pass_rate_reward",
         "tests.recipe_rewards.digit_share_reward", "--output_dir", str(tmp_path), *FAST],
    )  # fmt: skip
    check_rewards(script_args, training_args)
    assert training_args.pass_rate_reward == "digit_share_reward"  # TRL names rewards by __name__


@pytest.mark.parametrize(
    "reward, message",
    [("math.pi", r"'math.pi' is a float, not a function"), ("os.path.join", r"takes \(a\), but TRL calls it")],
)
def test_a_reward_function_trl_cannot_call_is_named(tmp_path, no_model, reward, message):
    with pytest.raises(InputError, match=message):
        run("online_rl", tmp_path, "--reward_funcs", reward, "--reward_weights", "1.0")


@pytest.mark.parametrize(
    "rows, columns, message",
    [
        ([{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": None}], ("prompt", "answer"),
         r"row 2: `answer` is null \(1 rows in all\)"),
        ([{"prompt": "1+1?", "answer": "2", "completion": "2"}, {"prompt": "2+2?", "answer": "4", "completion": ""}],
         ("prompt", "answer", "completion"), r"row 2: `completion` is \"\"; an empty completion"),
        ([{"prompt": "1+1?", "answer": "2", "completion": "2"},
          {"prompt": "2+2?", "answer": "4", "completion": [{"role": "assistant", "content": "4"}]}],
         ("prompt", "answer", "completion"), r"row 1: `completion` is a plain string while other rows hold message"),
    ],
)  # fmt: skip
def test_null_answers_empty_completions_and_mixed_forms_are_named(tmp_path, rows, columns, message):
    write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(InputError, match=message):
        load_task_dataset(str(tmp_path / "train.jsonl"), "train", columns)


@pytest.mark.parametrize(
    "name, argv, message",
    [
        ("sft", ["--judge_threshold", "0"], r"--judge_threshold 0.0: .* drops them all"),
        ("online_rl", ["--min_prompt_weight", "-0.25"], r"--min_prompt_weight -0.25: must be >= 0"),
        ("online_rl", ["--curriculum_fraction", "20"], r"--curriculum_fraction 20.0: .* \(0.2, not 20\)"),
    ],
)
def test_judge_and_prompt_sampling_numbers_out_of_range_are_refused(tmp_path, no_model, name, argv, message):
    with pytest.raises(InputError, match=message):
        run(name, tmp_path, *argv)


def test_a_curriculum_column_of_words_is_named(tmp_path):
    rows = [{"prompt": f"{i}+1?", "answer": str(i + 1), "level": ["easy", "hard"][i % 2]} for i in range(8)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(InputError, match=r"--curriculum_column 'level' holds 'easy' \(str\); .* by a number"):
        run("online_rl", tmp_path, "--dataset_name", str(tmp_path / "train.jsonl"), "--heldout_problems", "0",
            "--from_scratch", "true", "--reward_funcs", "format_reward", "--reward_weights", "1.0",
            "--pass_rate_reward", "format_reward")  # fmt: skip


def test_dpo_refuses_pair_samples_below_two(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--pair_samples 1: must be at least 2"):
        run("dpo", tmp_path, "--pair_samples", "1")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "2+2?", "chosen": "4"}, r"has a `chosen` column but no `rejected`"),
        ({"prompt": "2+2?", "reply": "4"}, r"has neither `chosen` and `rejected` replies .* nor an `answer`"),
    ],
)
def test_dpo_data_without_pairs_or_answers_is_named(tmp_path, row, message):
    write_jsonl(tmp_path / "pairs.jsonl", [row] * 4)
    with pytest.raises(InputError, match=message):
        run("dpo", tmp_path, "--dataset_name", str(tmp_path / "pairs.jsonl"), "--heldout_problems", "0",
            "--from_scratch", "true")  # fmt: skip


def test_dpo_trains_on_the_preference_pairs_the_data_brings(tmp_path, monkeypatch):
    """TRL's preference format (`prompt`, `chosen`, `rejected`; no `answer`) is trained on as given."""
    from recipes import dpo

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled pairs although the data has its own")

    monkeypatch.setattr(dpo, "cached_samples", no_sampling)
    rows = [{"prompt": f"{i}+1?", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(8)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    results = run("dpo", tmp_path, "--dataset_name", str(tmp_path / "pairs.jsonl"), "--heldout_problems", "0",
                  "--from_scratch", "true", "--per_device_train_batch_size", "4", "--max_length", "64")  # fmt: skip
    assert results["pairs"] == {"prompts": 8, "pairs": 8, "given": True}
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert results["log_history"][-1]["train_loss"] > 0  # DPO's loss on the given pairs (log 2 at the start)


def test_dpo_loss_types_are_those_trl_computes():
    import inspect

    from trl import DPOTrainer

    source = inspect.getsource(DPOTrainer)
    for loss in DPO_LOSS_TYPES:
        assert f'loss_type == "{loss}"' in source, loss


# ---------------------------------------------------------------------------------------------------------------
# File modes
# ---------------------------------------------------------------------------------------------------------------


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_atomic_json_respects_the_umask(tmp_path, umask_022):
    write_json_atomic(tmp_path / "results.json", {"a": 1})
    assert mode(tmp_path / "results.json") == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name != "results.json"]  # no temporary left


def test_atomic_write_leaves_nothing_when_it_fails(tmp_path):
    from eval.files import atomic_path

    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.bin") as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_teacher_logit_shards_and_metadata_respect_the_umask(tmp_path, umask_022):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
    from recipes.trainers import write_teacher_topk

    teacher = Llama4ForCausalLM(Llama4TextConfig.from_pretrained("hub_configs/tiny"))
    rows = problems(3)
    write_teacher_topk(teacher, AutoTokenizer.from_pretrained("hub_configs/tiny"), Dataset.from_list(rows),
                       tmp_path / "logits", top_k=4, shard_size=2)  # fmt: skip
    written = sorted(p.name for p in (tmp_path / "logits").iterdir())
    assert written == ["metadata.json", "shard-00000.safetensors", "shard-00001.safetensors"]  # no temporaries
    assert all(mode(tmp_path / "logits" / name) == 0o644 for name in written)


def test_override_with_a_value_of_the_wrong_type_names_the_flag(tmp_path):
    with pytest.raises(InputError, match=r"--model_name_or_path 'hub_configs/tiny' with --model_config_overrides "
                       r"\{'hidden_size': '64'\}: the config is invalid: .*hidden_size"):  # fmt: skip
        run("pretrain", tmp_path, "--from_scratch", "true", "--model_config_overrides", '{"hidden_size": "64"}')


# ---------------------------------------------------------------------------------------------------------------
# Rewards, int4, MetaP, FP8
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["online_rl", "dpo"])
def test_unknown_reward_is_named_before_a_model_is_built(name, tmp_path, no_model):
    with pytest.raises(InputError, match=r"unknown reward function 'acuracy_reward': use one of .*accuracy_reward"):
        run(name, tmp_path, "--reward_funcs", "acuracy_reward")


def test_dpo_refuses_the_math_only_reward_with_capabilities(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--capabilities: accuracy_reward .*use --reward_funcs capability_reward$"):
        run("dpo", tmp_path, "--capabilities", "math", "coding")


def test_unimportable_reward_path_is_named(tmp_path, no_model):
    with pytest.raises(InputError, match=r"cannot import reward function 'no_such_pkg\.reward'"):
        run("online_rl", tmp_path, "--reward_funcs", "no_such_pkg.reward")


def test_int4_without_adapters_says_to_add_use_peft(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--load_in_int4 true trains LoRA adapters .*add --use_peft true"):
        run("sft", tmp_path, "--load_in_int4", "true")


def test_metap_base_fields_without_metap_is_one_input_error(tmp_path):
    argv = ["--model_name_or_path", "hub_configs/tiny", "--from_scratch", "true", "--output_dir", str(tmp_path / "out"),
            *FAST, "--metap_base_hidden_size", "32"]  # fmt: skip
    with pytest.raises(SystemExit) as raised:
        run_recipe(pretrain.main, RECIPES["pretrain"][1], argv)
    assert str(raised.value).startswith("error: metap_base_hidden_size given without --metap true: add --metap true")


def test_real_fp8_judges_the_device_the_trainer_will_use(monkeypatch):
    # Recipes convert while the model is still on the CPU: a Hopper GPU must not be refused for that.
    import torch

    from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
    from recipes import fp8

    seen = []
    monkeypatch.setattr(fp8, "_accelerator_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(fp8, "fp8_unavailable_reason", lambda device: seen.append(device) or "stop here")
    model = Llama4ForCausalLM(Llama4TextConfig.from_pretrained("hub_configs/tiny"))
    with pytest.raises(fp8.Fp8UnsupportedError, match="stop here"):
        fp8.convert_model_to_fp8(model)
    assert seen == [torch.device("cuda", 0)]


# ---------------------------------------------------------------------------------------------------------------
# Typos and numbers the Trainer, TRL or torch would refuse only after the model is built
# ---------------------------------------------------------------------------------------------------------------


def test_yaml_key_typo_is_named_with_the_closest_field(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("learning_rat: 0.001\n")
    argv = ["--config", str(config), "--output_dir", str(tmp_path / "out"), *FAST]
    with pytest.raises(InputError, match=r"in the --config file: --learning_rat \(did you mean --learning_rate\?\)"):
        parse_recipe_args(RECIPES["sft"][1], argv)


def test_command_line_typo_is_named_with_the_closest_field(tmp_path):
    argv = ["--output_dir", str(tmp_path / "out"), *FAST, "--learnig_rate", "1e-3"]
    with pytest.raises(InputError, match=r"on the command line: --learnig_rate \(did you mean --learning_rate\?\)"):
        parse_recipe_args(RECIPES["sft"][1], argv)


def test_a_value_a_config_class_refuses_is_one_input_error(tmp_path):
    argv = [
        "--output_dir",
        str(tmp_path / "out"),
        *FAST,
        "--per_device_train_batch_size",
        "6",
        "--num_generations",
        "4",
    ]
    with pytest.raises(InputError, match=r"must be divisible by num_generations \(4\)"):
        parse_recipe_args(RECIPES["online_rl"][1], argv)


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("sft", ["--per_device_train_batch_size", "0"], r"--per_device_train_batch_size 0: must be at least 1"),
        ("sft", ["--learning_rate", "0"], r"--learning_rate 0.0: give a positive number"),
        ("dpo", ["--learning_rate=-1e-3"], r"--learning_rate -0.001: give a positive number"),
        ("sft", ["--max_steps", "0"], r"--max_steps 0: transformers would still train one step"),
        ("pretrain", ["--max_length", "0"], r"--max_length 0: must be at least 1"),
        ("sft", ["--use_peft", "true", "--lora_r", "0"], r"--lora_r 0: must be at least 1"),
        ("online_rl", ["--temperature", "0"], r"--temperature 0.0: sampling needs a temperature above 0"),
        ("online_rl", ["--max_completion_length", "0"], r"--max_completion_length 0: must be at least 1"),
        ("online_rl", ["--reward_weights", "1.0"], r"--reward_weights \[1.0\]: give one weight per reward"),
    ],
)
def test_training_numbers_are_checked_before_the_model(name, argv, message, tmp_path, no_model):
    with pytest.raises(InputError, match=message):
        run(name, tmp_path, "--from_scratch", "true", *argv)


def test_a_config_directory_without_weights_says_from_scratch(tmp_path, no_model):
    with pytest.raises(
        InputError, match=r"'hub_configs/tiny' holds a config.json but no weights.*--from_scratch true"
    ):
        run("sft", tmp_path)


def test_plain_string_prompts_and_completions_become_chat_messages(tmp_path):
    rows = [{"prompt": "What is 2+3?", "answer": "5", "completion": "\\boxed{5}"}] * 4
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = load_task_dataset(str(tmp_path / "train.jsonl"), "train", ("prompt", "answer", "completion"))
    assert dataset[0]["prompt"] == [{"role": "user", "content": "What is 2+3?"}]
    assert dataset[0]["completion"] == [{"role": "assistant", "content": "\\boxed{5}"}]
    assert dataset[0]["answer"] == "5"


def test_a_mistyped_curriculum_column_is_named(tmp_path):
    with pytest.raises(InputError, match=r"--curriculum_column 'difficulty': the train set has no such column"):
        run("online_rl", tmp_path, "--from_scratch", "true", "--train_problems", "8", "--heldout_problems", "0",
            "--curriculum_column", "difficulty")  # fmt: skip


@pytest.mark.parametrize(("field", "value"), [("levels", 1), ("languages", "de"), ("reward_funcs", "format_reward")])
def test_a_yaml_scalar_where_a_list_is_expected_is_one_item(field, value, tmp_path, no_model):
    config = tmp_path / "recipe.yaml"
    # The pass rate is read from one of the rewards (the default, accuracy_reward, is not among these).
    pass_rate = "pass_rate_reward: format_reward\n" if field == "reward_funcs" else ""
    config.write_text(f"{field}: {value}\n{pass_rate}")
    module, types = RECIPES["online_rl"]
    parsed = parse_recipe_args(
        types, ["--config", str(config), "--output_dir", str(tmp_path / "out"), "--from_scratch", "true",
                "--model_name_or_path", "hub_configs/tiny", "--num_generations", "2",
                "--per_device_train_batch_size", "2", *FAST],
    )  # fmt: skip
    assert getattr(parsed[0], field) == [value]
    with pytest.raises(AssertionError, match="a model was built"):  # every check passed, up to the model
        module.main(*parsed)


def test_a_missing_resume_checkpoint_is_named_before_the_model(tmp_path, no_model):
    with pytest.raises(InputError, match=r"--resume_from_checkpoint '.*nope': no such checkpoint directory"):
        run("sft", tmp_path, "--from_scratch", "true", "--resume_from_checkpoint", str(tmp_path / "nope"))


def test_an_output_dir_that_is_a_file_is_named(tmp_path, no_model):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(InputError, match=r"--output_dir '.*out' is a file; give a directory"):
        run("sft", tmp_path, "--from_scratch", "true")


def test_curriculum_column_none_turns_the_curriculum_off(tmp_path, monkeypatch):
    import recipes.rl

    class TrainerBuilt(Exception):
        pass

    def stop(self, **kwargs):
        raise TrainerBuilt(self._difficulty)

    monkeypatch.setattr(recipes.rl.OnlineRLTrainer, "train", stop)
    with pytest.raises(TrainerBuilt) as built:
        run("online_rl", tmp_path, "--from_scratch", "true", "--train_problems", "8", "--heldout_problems", "0",
            "--curriculum_column", "none")  # fmt: skip
    assert built.value.args == (None,)  # no difficulty column: no curriculum


def test_a_fractional_batch_size_in_the_yaml_is_named(tmp_path, no_model):
    config = tmp_path / "recipe.yaml"
    config.write_text("per_device_train_batch_size: 4.5\n")
    with pytest.raises(InputError, match=r"--per_device_train_batch_size 4.5: must be a whole number \(at least 1\)"):
        run("sft", tmp_path, "--config", str(config), "--from_scratch", "true")
