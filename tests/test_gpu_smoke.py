"""`scripts/gpu_smoke.sh --dry-run`: the GPU smoke script's three stages run on the CPU and report their devices."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_smoke_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "smoke"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_smoke.sh"), "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = result.stdout
    assert "SMOKE OK (cpu)" in out
    for stage in ("| sft (judge filter) | cpu x", "| grpo (beta 0.04) | cpu x", "| dpo (policy pairs) | cpu x"):
        assert stage in out, out[-2000:]
