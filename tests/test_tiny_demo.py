import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_demo_trains_generates_and_reloads_in_builtin(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/tiny_demo.py", "--steps", "100", "--output_dir", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "generates the same tokens: True" in result.stdout
    generated = next(line for line in result.stdout.splitlines() if line.startswith("generated:"))
    assert generated.startswith("generated: [106, 107, 108, 109")  # it learned to count
    assert (tmp_path / "out" / "model.safetensors").exists()
