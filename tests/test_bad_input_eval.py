"""`python -m eval` and the model loader given bad input: a clear error naming the flag, file (and line) or value,
a non-zero exit, and nothing written (no results, no empty output directory)."""

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from eval.loading import InputError, check_model_path, load_causal_lm, torch_dtype
from eval.runner import main
from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
TINY = Path(__file__).resolve().parents[1] / "hub_configs" / "tiny"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_model")
    Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY)).save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(path)
    return path


@pytest.fixture
def data(tmp_path):
    """A writable copy of the eval fixtures."""
    folder = tmp_path / "data"
    shutil.copytree(FIXTURES, folder)
    return folder


def fails(capsys, tmp_path, *argv: str, model: str = "some/model") -> str:
    """Run the CLI, expect a non-zero exit with nothing written; return the error text."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as raised:
        main(["--model", model, "--output_dir", str(out), "--no_progress", *argv])
    assert raised.value.code not in (0, None)
    assert not out.exists(), "a failed run left an output directory behind"
    message = raised.value.code if isinstance(raised.value.code, str) else capsys.readouterr().err
    assert "Traceback" not in message
    return message


@pytest.mark.parametrize("value", ["0", "-2"])
def test_limit_must_be_positive(value, capsys, tmp_path, data):
    message = fails(capsys, tmp_path, "--tasks", "math500", "--data_dir", str(data), "--limit", value)
    assert f"--limit: {value} is not a positive integer (give N >= 1, or leave the flag out)" in message


def test_limit_not_an_integer(capsys, tmp_path, data):
    message = fails(capsys, tmp_path, "--tasks", "math500", "--data_dir", str(data), "--limit", "ten")
    assert "--limit: 'ten' is not an integer" in message


@pytest.mark.parametrize("flag", ["--num_samples", "--batch_size", "--max_new_tokens"])
def test_counts_must_be_positive(flag, capsys, tmp_path, data):
    message = fails(capsys, tmp_path, "--tasks", "math500", "--data_dir", str(data), flag, "0")
    assert f"{flag}: 0 is not a positive integer" in message


def test_top_p_out_of_range(capsys, tmp_path, data):
    message = fails(capsys, tmp_path, "--tasks", "math500", "--data_dir", str(data), "--top_p", "1.5")
    assert "--top_p 1.5: must be in (0, 1]" in message


def test_negative_temperature(capsys, tmp_path, data):
    message = fails(capsys, tmp_path, "--tasks", "math500", "--data_dir", str(data), "--temperature", "-1")
    assert "--temperature -1.0: must be >= 0 (0 is greedy)" in message


def test_k_above_the_number_of_samples(capsys, tmp_path, data):
    message = fails(capsys, tmp_path, "--tasks", "math500", "--data_dir", str(data), "--num_samples", "2", "--k", "4")
    assert "--k 4: each k must be between 1 and --num_samples (2)" in message


def test_missing_data_dir(capsys, tmp_path):
    message = fails(capsys, tmp_path, "--tasks", "math500", "--data_dir", str(tmp_path / "dta"))
    assert "--data_dir: no such directory" in message and "dta" in message


def test_no_task_named(capsys, tmp_path, data):
    message = fails(capsys, tmp_path, "--tasks", " , ", "--data_dir", str(data))
    assert "names no task; available: math500" in message


def test_unknown_dtype(capsys, tmp_path, data):
    message = fails(capsys, tmp_path, "--tasks", "math500", "--data_dir", str(data), "--dtype", "bf16")
    assert "unknown dtype 'bf16': use auto, bfloat16, float16 or float32" in message


def test_empty_data_file(capsys, tmp_path, data):
    (data / "math500" / "test.jsonl").write_text("")
    message = fails(capsys, tmp_path, "--tasks", "math500", "--data_dir", str(data))
    assert f"math500: --data_dir {data} holds no examples (an empty data file?)" in message


def test_malformed_jsonl_names_the_file_and_line(capsys, tmp_path, data):
    path = data / "math500" / "test.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1][:-5], *lines[2:]]) + "\n")
    message = fails(capsys, tmp_path, "--tasks", "math500", "--data_dir", str(data))
    assert f"{path}:2: malformed JSON" in message


def test_global_mmlu_malformed_jsonl(capsys, tmp_path, data):
    path = data / "global_mmlu" / "de.jsonl"
    path.write_text(path.read_text() + "{not json}\n")
    message = fails(capsys, tmp_path, "--tasks", "global_mmlu", "--data_dir", str(data))
    assert f"{path}:" in message and "malformed JSON" in message


@pytest.mark.parametrize("row, columns", [("How many?\t3\textra", 3), ("How many? 3", 1)])
def test_tsv_row_with_the_wrong_number_of_columns(row, columns, capsys, tmp_path, data):
    path = data / "mgsm" / "mgsm_en.tsv"
    path.write_text(path.read_text().splitlines()[0] + "\n" + row + "\n")
    message = fails(capsys, tmp_path, "--tasks", "mgsm", "--languages", "en", "--data_dir", str(data))
    assert f"mgsm_en.tsv:2: {columns} tab-separated columns, expected 2 (question<TAB>answer)" in message


def test_jsonl_row_missing_a_field(capsys, tmp_path, data):
    (data / "math500" / "test.jsonl").write_text('{"question": "1 + 1?", "answer": "2"}\n')
    message = fails(capsys, tmp_path, "--tasks", "math500", "--data_dir", str(data))
    assert "math500: a data row in" in message and "lacks the field 'problem'" in message


def test_unknown_mgsm_language(capsys, tmp_path, data):
    message = fails(capsys, tmp_path, "--tasks", "mgsm", "--languages", "xx", "--data_dir", str(data))
    assert "MGSM has no language ['xx']" in message


def test_mistyped_model_path(capsys, tmp_path, data):
    typo = str(tmp_path / "outputs" / "sft_tyni")
    message = fails(capsys, tmp_path, "--tasks", "math500", "--data_dir", str(data), "--limit", "1", model=typo)
    assert message == f"error: --model: no such directory {typo!r}; a Hub id looks like org/name " + (
        "(e.g. meta-llama/Llama-4-Scout-17B-16E-Instruct)"
    )


def test_model_path_is_a_weights_file(capsys, tmp_path, data, tiny_dir):
    weights = str(tiny_dir / "model.safetensors")
    message = fails(capsys, tmp_path, "--tasks", "math500", "--data_dir", str(data), model=weights)
    assert "--model" in message and "is a file, not a model directory" in message


# ---------------------------------------------------------------------------------------------------------------
# The loader itself
# ---------------------------------------------------------------------------------------------------------------


def test_hub_id_that_cannot_be_loaded_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"--model 'nobody/no-such-model': no local directory of that name, and it "
                       r"could not be loaded as a Hub id"):  # fmt: skip
        load_causal_lm("nobody/no-such-model", flag="--model")


def test_hub_form_paths_pass_the_local_check():
    check_model_path("meta-llama/Llama-4-Scout-17B-16E-Instruct")  # the Hub decides about these
    check_model_path("hub_configs/tiny")  # a local directory that looks like org/name


def test_teacher_loader_goes_through_the_same_checks(tmp_path):
    from recipes.trainers import load_teacher

    with pytest.raises(InputError, match=r"--teacher_model_name_or_path: no such directory .*teachr"):
        load_teacher(str(tmp_path / "runs" / "teachr"))


def test_teacher_init_kwargs_with_a_bad_dtype(tiny_dir):
    from recipes.trainers import load_teacher

    with pytest.raises(InputError, match=r"unknown dtype 'fp8'"):
        load_teacher(str(tiny_dir), {"dtype": "fp8"})


def test_torch_dtype_names():
    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype("auto") == "auto" and torch_dtype(None) is None
    with pytest.raises(InputError, match=r"unknown dtype 'half-ish'"):
        torch_dtype("half-ish")


def test_eval_writes_readable_results(tiny_dir, tmp_path, data):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        main(["--model", str(tiny_dir), "--tasks", "math500", "--data_dir", str(data), "--limit", "1",
              "--max_new_tokens", "2", "--output_dir", str(tmp_path / "out"), "--no_progress"])  # fmt: skip
    finally:
        os.umask(previous)
    for name in ("results.json", "results.md", "results.png", "samples/math500.jsonl"):
        assert stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) == 0o644, name
    assert not [p for p in (tmp_path / "out").rglob("*.tmp")]


def test_a_config_directory_without_weights_is_named(capsys, tmp_path, data):
    message = fails(capsys, tmp_path, "--tasks", "math500", "--data_dir", str(data), model=str(TINY))
    assert "holds a config.json but no weights (no model.safetensors)" in message


def test_from_pretrained_of_a_config_directory_says_how_to_build_a_fresh_model():
    with pytest.raises(OSError, match=r"holds no weights .*Llama4ForCausalLM\(Llama4TextConfig.from_pretrained"):
        Llama4ForCausalLM.from_pretrained(TINY)


def test_an_output_dir_that_is_a_file_is_named(capsys, tmp_path, data):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(SystemExit, match=r"--output_dir '.*out' is a file"):
        main(["--model", "some/model", "--output_dir", str(tmp_path / "out"), "--tasks", "math500",
              "--data_dir", str(data), "--no_progress"])  # fmt: skip


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--device", "gpu", "--device 'gpu': not a torch device"),
    ("--device_map", "cuda", "--device_map 'cuda': this machine has no CUDA GPU"),
])  # fmt: skip
def test_a_device_this_machine_cannot_use_is_named(flag, value, message, capsys, tmp_path, data, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert message in fails(capsys, tmp_path, "--tasks", "math500", "--data_dir", str(data), flag, value)
