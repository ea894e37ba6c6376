"""Bad benchmark arguments are one argparse error line (exit status 2) naming the flag and the fix, before anything
is built or measured; `--quick` changes the defaults only, never a flag given. (Bad `push_to_hub` calls are in
test_hub_roundtrip.py, next to the local Hub server they must not touch.)"""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
TINY = str(ROOT / "hub_configs" / "tiny")


def bench_main(script: str, argv: list[str], monkeypatch, capsys) -> tuple[object, str]:
    """Run a benchmark's main() in this process; (exit status, stderr)."""
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    with pytest.raises(SystemExit) as exited:
        module.main()
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "script, argv, message",
    [
        (
            "bench_generate",
            ["--shapes", "scout"],
            r"--shapes: invalid choice: 'scout' \(choose from 'main', 'scout-like', 'maverick-like'\)",
        ),
        ("bench_generate", ["--batches", "8", "0"], r"--batches: 0 is too small: give a whole number >= 1"),
        ("bench_generate", ["--new-tokens", "many"], r"--new-tokens: 'many' is not a whole number"),
        ("bench_generate", ["--compile", "--cache", "dynamic"], r"--compile runs ours with a static cache"),
        ("bench_int4", ["--checkpoint", "/missing"], r"--checkpoint: /missing: no such directory"),
        ("bench_int4", ["--checkpoint", str(ROOT / "docs")], r"docs: no config.json there"),
        ("bench_int4", ["--group-size", "64"], r"--group-size applies to --checkpoint only"),
        ("bench_int4", ["--checkpoint", TINY, "--only", "bytes"], r"--only picks tables.*run them separately"),
        (
            "bench_int4",
            ["--checkpoint", TINY, "--group-size", "48"],
            r"group_size=48\) does not divide the 64 input features.*Pass it as --group-size",
        ),
        ("bench_int4", ["--problems", "0"], r"--problems: 0 is too small"),
        (
            "bench_codistill",
            ["--arms", "hard,adaptve"],
            r"--arms: 'adaptve' is not one of hard,adaptive,adaptive_argmax,schedule,topk \(did you mean 'adaptive'\?\)",
        ),
        ("bench_codistill", ["--arms", ","], r"--arms: ',': give at least one comma-separated value"),
        ("bench_codistill", ["--student_documents", "128,0"], r"--student_documents: 0 is too small"),
        ("bench_codistill", ["--temperature", "0"], r"--temperature: 0.0 must be a number > 0"),
        ("bench_metap", ["--sweeps", "widht"], r"--sweeps: 'widht' is not one of coord,width,depth,experts"),
        ("bench_metap", ["--quick", "--widths", "8,32"], r"--widths 8: .*num_attention_heads=0.*width // 16 heads"),
        ("bench_metap", ["--steps", "0"], r"--steps: 0 is too small"),
        ("bench_text", ["--tokens", "0"], r"--tokens: 0 is too small"),
        ("bench_gpu", ["--dry-run", "--repeats", "0"], r"--repeats: 0 is too small"),
        ("bench_gpu_int4", ["--dry-run", "--group-size", "3"], r"--group-size 3: .*must be a positive even number"),
        ("bench_gpu_int4", ["--dry-run", "--group-size", "96"], r"--group-size 96: .*does not divide the 256"),
        ("bench_gpu_int4", ["--dry-run", "--max-peak-gb", "-1"], r"--max-peak-gb: -1.0 must be a number > 0"),
        ("bench_grading", ["--external_python", "/missing/python"], r"--external_python: /missing/python: no such"),
        ("bench_grading", ["--data_dir", "/missing"], r"--data_dir /missing has no math500/test.jsonl.*--bbh_only"),
        ("bench_long_context", ["--kv", "--lenghts", "8"], r"unrecognized arguments: --lenghts 8"),
        ("bench_long_context", ["--ablation", "--steps", "1"], r"--steps: 1 is too small: give a whole number >= 2"),
        ("bench_long_context", ["--memory", "--lengths", "-8"], r"--lengths: -8 is too small"),
        ("bench_rl_stage", ["--model", "/missing"], r"--model: /missing: no such directory"),
        ("bench_rl_stage", ["--model", TINY, "--max_steps", "0"], r"--max_steps: 0 is too small"),
        ("bench_capabilities", ["--num_problems", "1"], r"--num_problems: 1 is too small: give a whole number >= 2"),
    ],
)
def test_bad_benchmark_argument_is_one_argparse_error(script, argv, message, monkeypatch, capsys):
    code, err = bench_main(script, argv, monkeypatch, capsys)
    assert code == 2 and "error: " in err and "Traceback" not in err, err
    assert re.search(message, err.replace("\n", " ")), err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arms", "a,z"], r"--arms: 'z' is not one of a,b,c,d,e"),
        (["--rl_steps", "0"], r"--rl_steps: 0 is too small"),
        (["--torch_threads", "-1"], r"--torch_threads: -1 is too small: give a whole number >= 0"),
    ],
)
def test_bad_rl_ablation_argument(argv, message, capsys):
    import bench_rl_ablation

    with pytest.raises(SystemExit) as exited:
        bench_rl_ablation.main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and re.search(message, err), err


def test_quick_keeps_the_shapes_and_batches_given(monkeypatch, capsys):
    import bench_generate

    built, rates, prefills = [], [], []
    monkeypatch.setattr(
        bench_generate, "build_pair", lambda name: built.append(name) or (None, None, {"vocab_size": 9})
    )

    def rate(ours, builtin, vocab, batch, prompt, new, repeats, cache, compile_ours):
        rates.append((batch, new))
        return {"ours": 2.0, "builtin": 1.0, "same": True}

    monkeypatch.setattr(bench_generate, "generate_rate", rate)
    monkeypatch.setattr(
        bench_generate, "prefill", lambda label, length: prefills.append(length) or {"seconds": 1.0, "peak_mib": 1.0}
    )
    monkeypatch.setattr(sys, "argv", ["bench_generate.py", "--quick", "--shapes", "scout-like", "--batches", "2"])
    bench_generate.main()
    assert built == ["scout-like"] and rates == [(2, 16)]  # --quick's 16 new tokens; the shape and batch given
    assert prefills == [4096, 4096]  # --quick's prefill length, built-in and ours
    assert "| scout-like | 2 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench_generate.py", "--shapes", "scout"], "invalid choice: 'scout' (choose from 'main', 'scout-like'"),
        (["bench_int4.py", "--checkpoint", "/missing"], "argument --checkpoint: /missing: no such directory"),
        (["bench_codistill.py", "--arms", "adaptve"], "argument --arms: 'adaptve' is not one of hard,adaptive"),
    ],
)
def test_the_reported_commands_exit_2_with_one_line(argv, message):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert message in result.stderr.strip().splitlines()[-1]
