"""The judge filter's and DPO's sampling and the held-out generation split across 2 processes (gloo on CPU):
every rank gets every completion, equal to a single process's, each rank generating only part of them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "distributed"))


@pytest.mark.slow
def test_two_processes_split_the_sampling_and_match_one(tmp_path):
    from sampling_2proc import run

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["tests/distributed/sampling_2proc.py", str(tmp_path / "two")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    single = run(tmp_path / "one" / "cache")
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["world"] == 2
        assert rank["samples"] == single["samples"]  # same seeds per batch: identical samples
        assert rank["greedy"] == single["greedy"]
        assert 0 < rank["rows_generated"] < single["rows_generated"]  # each did a share
    assert sum(rank["rows_generated"] for rank in ranks) == single["rows_generated"]
    chunks = sorted(p.name for p in (tmp_path / "two" / "cache").rglob("chunk-*.json"))
    assert chunks == sorted(p.name for p in (tmp_path / "one" / "cache").rglob("chunk-*.json")) and len(chunks) == 2


def test_generation_runs_on_the_accelerator_accelerate_uses(monkeypatch):
    # No GPU here: stand in for one with accelerate's reported device. A model left on the CPU by from_pretrained
    # goes there; an explicit device wins; a model already placed on an accelerator stays.
    import types

    import torch

    import eval.generation

    accelerator = torch.device("meta")
    monkeypatch.setattr(eval.generation, "PartialState", lambda: types.SimpleNamespace(device=accelerator))
    on_cpu = torch.nn.Linear(2, 2)
    assert eval.generation.generation_device(on_cpu) == accelerator
    assert eval.generation.generation_device(on_cpu, "cpu") == torch.device("cpu")
    placed = torch.nn.Linear(2, 2, device="meta")
    monkeypatch.setattr(eval.generation, "PartialState", lambda: types.SimpleNamespace(device=torch.device("cpu")))
    assert eval.generation.generation_device(placed) == torch.device("meta")
