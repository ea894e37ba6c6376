"""Re-running in an output directory: a resume must have the settings of the run it resumes (else a clear refusal
naming what changed, and `--overwrite_output_dir true` to start over); the pipeline's skipped stages likewise. Also
the end of a run: readable file modes and a failed Hub push that still leaves the results."""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from trl import ModelConfig, SFTConfig

from recipes import pipeline, pretrain
from recipes.common import prepare_run
from recipes.validation import MANIFEST, InputError, parse_recipe_args

TYPES = (pretrain.PretrainScriptArguments, SFTConfig, ModelConfig)
BASE = [
    "--model_name_or_path", "hub_configs/tiny", "--from_scratch", "true", "--use_cpu", "true", "--bf16", "false",
    "--report_to", "none", "--max_steps", "2", "--save_steps", "1", "--logging_steps", "1", "--corpus_documents",
    "16", "--per_device_train_batch_size", "4", "--max_length", "64", "--heldout_problems", "0", "--seed", "0",
]  # fmt: skip


def parsed(output_dir, *extra: str):
    return parse_recipe_args(TYPES, [*BASE, "--output_dir", str(output_dir), *extra])


def prepare(output_dir, *extra: str) -> None:
    script_args, training_args, model_args = parsed(output_dir, *extra)
    prepare_run(model_args, script_args, training_args)
    (Path(output_dir) / "checkpoint-1").mkdir(exist_ok=True)  # as if it had trained: something to resume


def test_a_run_that_left_nothing_to_resume_is_not_held_against_the_next(tmp_path):
    script_args, training_args, model_args = parsed(tmp_path, "--learning_rate", "1e-3")
    prepare_run(model_args, script_args, training_args)  # e.g. stopped by bad data before its first checkpoint
    prepare(tmp_path, "--learning_rate", "1e-4")
    assert json.loads((tmp_path / MANIFEST).read_text())["learning_rate"] == 1e-4


def test_changed_learning_rate_is_refused_naming_it_and_the_fix(tmp_path):
    prepare(tmp_path, "--learning_rate", "1e-3")
    with pytest.raises(InputError) as raised:
        prepare(tmp_path, "--learning_rate", "1e-4")
    message = str(raised.value)
    assert "holds a run made with other settings" in message
    assert "learning_rate: 0.001 -> 0.0001" in message
    assert "--overwrite_output_dir true" in message and str(tmp_path) in message


def test_changed_data_is_refused(tmp_path):
    prepare(tmp_path)
    with pytest.raises(InputError, match=r"corpus_documents: 16 -> 32"):
        prepare(tmp_path, "--corpus_documents", "32")


def test_changed_model_overrides_are_refused(tmp_path):
    prepare(tmp_path)
    with pytest.raises(InputError, match=r"model_config_overrides: null -> \{\"hidden_size\": 32\}"):
        prepare(tmp_path, "--model_config_overrides", '{"hidden_size": 32}')


def test_retrained_model_at_the_same_path_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(open("hub_configs/tiny/config.json").read())
    prepare(tmp_path / "out", "--model_name_or_path", str(model))
    (model / "model.safetensors").write_bytes(b"new weights")
    with pytest.raises(InputError, match=r"model_name_or_path files: "):
        prepare(tmp_path / "out", "--model_name_or_path", str(model))


def test_same_settings_and_logging_changes_resume(tmp_path):
    prepare(tmp_path)
    prepare(tmp_path, "--logging_steps", "5", "--save_steps", "3", "--report_to", "none")
    stored = json.loads((tmp_path / MANIFEST).read_text())
    assert (
        stored["learning_rate"] == SFTConfig(output_dir="x", use_cpu=True, bf16=False).learning_rate
        and "logging_steps" not in stored
        and "output_dir" not in stored
    )


def test_overwrite_output_dir_starts_over(tmp_path):
    prepare(tmp_path, "--learning_rate", "1e-3")
    (tmp_path / "checkpoint-1").mkdir(exist_ok=True)
    (tmp_path / "checkpoint-1" / "trainer_state.json").write_text("{}")
    (tmp_path / "results.json").write_text("{}")
    script_args, training_args, model_args = parsed(
        tmp_path, "--learning_rate", "1e-4", "--overwrite_output_dir", "true"
    )
    prepare_run(model_args, script_args, training_args)
    assert not (tmp_path / "checkpoint-1").exists() and not (tmp_path / "results.json").exists()
    assert json.loads((tmp_path / MANIFEST).read_text())["learning_rate"] == 1e-4


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.slow
def test_trained_run_is_readable_and_a_changed_rerun_is_refused_before_training(tmp_path, monkeypatch):
    previous = os.umask(0o022)
    try:
        results = pretrain.main(*parsed(tmp_path, "--learning_rate", "1e-3"))
    finally:
        os.umask(previous)
    assert results["log_history"]
    for path in [tmp_path / "model.safetensors", tmp_path / "results.json", tmp_path / MANIFEST]:
        assert mode(path) == 0o644, path
    checkpoint_files = [p for p in (tmp_path / "checkpoint-2").rglob("*") if p.is_file()]
    assert checkpoint_files and all(mode(p) == 0o644 for p in checkpoint_files)
    weights = (tmp_path / "model.safetensors").read_bytes()

    import recipes.common

    monkeypatch.setattr(recipes.common, "load_causal_lm", lambda *a, **k: pytest.fail("built a model"))
    with pytest.raises(InputError, match=r"learning_rate: 0.001 -> 0.01"):
        pretrain.main(*parsed(tmp_path, "--learning_rate", "1e-2"))
    assert (tmp_path / "model.safetensors").read_bytes() == weights


@pytest.mark.slow
def test_push_to_hub_offline_is_one_error_after_the_results_are_written(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError) as raised:
        pretrain.main(*parsed(tmp_path, "--max_steps", "1", "--push_to_hub", "true", "--hub_model_id", "me/tiny"))
    message = str(raised.value)
    assert message.startswith("--push_to_hub: uploading to 'me/tiny' failed")
    assert f"saved in {tmp_path} with its results.json" in message
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "results.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_stages(monkeypatch):
    """Stages that run the recipes' checks and manifest but train nothing: the pipeline's own logic, fast."""
    calls = []

    def fake(script_args, training_args, model_args):
        prepare_run(model_args, script_args, training_args)
        calls.append(training_args.output_dir)
        shutil.copy("hub_configs/tiny/config.json", training_args.output_dir)  # the next stage's model
        (Path(training_args.output_dir) / "model.safetensors").write_bytes(b"")  # (its weights, for the checks)
        return {
            "heldout": {"accuracy": 0.5, "correct": [1, 0], "boxed_rate": 1.0, "accuracy_by_level": {"1": 0.5}},
            "log_history": [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5, "reward": 0.3}],
        }

    for name, (script_cls, config_cls, _) in list(pipeline.STAGES.items()):
        monkeypatch.setitem(pipeline.STAGES, name, (script_cls, config_cls, fake))
    return calls


def pipeline_args(tmp_path, learning_rate: str = "1e-3", **extra):
    stages = [
        {"name": "pretrain", "from_scratch": True, "max_steps": 1, "learning_rate": learning_rate},
        {"name": "sft", "max_steps": 1},
    ]
    shared = {"use_cpu": True, "bf16": False, "report_to": "none", "heldout_problems": 2}
    return pipeline.PipelineArguments(output_dir=str(tmp_path / "run"), stages=stages, shared=shared, **extra)


def test_pipeline_skips_a_finished_stage_only_with_the_same_settings(tmp_path, fake_stages, capsys):
    pipeline.main(pipeline_args(tmp_path))
    assert len(fake_stages) == 2
    pipeline.main(pipeline_args(tmp_path))
    assert len(fake_stages) == 2  # both skipped
    with pytest.raises(InputError, match=r"(?s)\[pretrain\] output_dir .* learning_rate: 0.001 -> 0.0001.*"
                       r"--overwrite_output_dir true"):  # fmt: skip
        pipeline.main(pipeline_args(tmp_path, "1e-4"))
    pipeline.main(pipeline_args(tmp_path, "1e-4", overwrite_output_dir=True))
    assert len(fake_stages) == 4


def test_pipeline_prints_the_stage_table_and_plots_every_curve(tmp_path, fake_stages, capsys):
    pipeline.main(pipeline_args(tmp_path))
    out = capsys.readouterr().out
    assert "| stage | accuracy |" in out and "| sft | 50.0% |" in out and "+0 / -0 (p=1)" in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["stages"][0]["reward_curve"] == [0.3]
    assert (tmp_path / "run" / "results.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("results.json", "report.md", "results.png", "pretrain/stage_results.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "run" / name).st_mode) & 0o044 == 0o044, name  # others may read


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{"name": "pretrain"}, {"name": "sft", "config": "recipes/configs/sft_tny.yaml"}],
         r"\[sft\] config 'recipes/configs/sft_tny.yaml': no such file"),
        ([{"name": "sft"}, {"name": "sft"}], r"\['sft'\] appear more than once"),
        ([{"name": "sft", "model_name_or_path": "elsewhere"}], r"\[sft\] sets model_name_or_path"),
    ],
)  # fmt: skip
def test_pipeline_stage_mistakes_are_named_before_any_stage_runs(tmp_path, fake_stages, stages, message):
    with pytest.raises(InputError, match=message):
        pipeline.main(pipeline.PipelineArguments(output_dir=str(tmp_path), stages=stages))
    assert fake_stages == []


def test_pipeline_stage_without_a_known_name(tmp_path, fake_stages):
    args = pipeline.PipelineArguments(output_dir=str(tmp_path), stages=[{"name": "sfft"}])
    with pytest.raises(InputError, match=r"each needs a `name` among \['pretrain', 'sft', 'online_rl', 'dpo'\]"):
        pipeline.main(args)


def test_overwrite_output_dir_removes_the_previous_model_too(tmp_path):
    prepare(tmp_path, "--learning_rate", "1e-3")
    previous = ["model.safetensors", "config.json", "generation_config.json", "README.md", "training_args.bin"]
    for name in previous:
        (tmp_path / name).write_text("from the previous run")
    (tmp_path / "notes.txt").write_text("the user's own")
    script_args, training_args, model_args = parsed(
        tmp_path, "--learning_rate", "1e-4", "--overwrite_output_dir", "true"
    )
    prepare_run(model_args, script_args, training_args)
    assert not any((tmp_path / name).exists() for name in previous)  # a run that fails now leaves no stale model
    assert (tmp_path / "notes.txt").exists()


def test_overwrite_refuses_an_output_dir_that_is_the_model(tmp_path):
    shutil.copy(Path("hub_configs/tiny/config.json"), tmp_path / "config.json")
    script_args, training_args, model_args = parse_recipe_args(
        TYPES, [*BASE, "--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path),
                "--overwrite_output_dir", "true"],
    )  # fmt: skip
    with pytest.raises(InputError, match="--model_name_or_path .* is inside --output_dir .*would delete it"):
        prepare_run(model_args, script_args, training_args)
    assert (tmp_path / "config.json").exists()


def test_overwrite_keeps_files_in_a_directory_no_recipe_wrote(tmp_path):
    # e.g. `--output_dir . --overwrite_output_dir true` in a project folder: its README and config stay
    for name in ("README.md", "config.json"):
        (tmp_path / name).write_text("the user's own")
    script_args, training_args, model_args = parsed(tmp_path, "--overwrite_output_dir", "true")
    prepare_run(model_args, script_args, training_args)
    assert (tmp_path / "README.md").read_text() == (tmp_path / "config.json").read_text() == "the user's own"


def test_a_checkpoint_without_optimizer_state_is_refused_with_the_ways_out(tmp_path):
    from types import SimpleNamespace

    from recipes.common import train_resumably

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"")
    untouched = SimpleNamespace()  # add_callback / train would raise AttributeError: nothing may start
    args = SimpleNamespace(resume_from_checkpoint=str(checkpoint), output_dir=str(tmp_path))
    with pytest.raises(
        InputError, match=r"checkpoint-2 has no optimizer state.*--save_only_model.*--model_name_or_path"
    ):
        train_resumably(untouched, args)
    (checkpoint / "optimizer.pt").write_bytes(b"")
    with pytest.raises(AttributeError):  # now it resumes: the trainer is asked to train
        train_resumably(untouched, args)
