"""The int4 evidence scripts run: Scout's int4 bytes and memory (meta device), and the GPU decode benchmark's
CPU dry run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_scout_int4_bytes_and_memory_fit_one_80gb_gpu():
    from bench_int4 import scout_memory

    text = "\n".join(scout_memory(128))
    ratios = [float(r) for r in re.findall(r"\| (\d+\.\d)% \|", text)]
    assert len(ratios) == 2 and all(r <= 30.0 for r in ratios)  # routed and shared experts vs bf16
    total = float(re.search(r"\*\*total\*\* \| \*\*(\d+\.\d+)\*\*", text).group(1))
    assert 60 < total < 76  # int4 experts + bf16 rest of Scout, with KV-cache room on an 80 GB H100


@pytest.mark.slow
def test_gpu_benchmark_dry_run_on_cpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu_int4.py"), "--dry-run", "--steps", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if re.match(r"\| (1|32) \|", line)]
    assert len(rows) == 2 and all("fewer than bf16" in row for row in rows)


@pytest.mark.slow
def test_checkpoint_quality_mode_compares_full_rtn_and_gptq_on_the_same_problems(tmp_path):
    import torch
    from bench_int4 import checkpoint_quality
    from transformers import AutoTokenizer

    from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    tiny = ROOT / "hub_configs" / "tiny"
    Llama4ForCausalLM(Llama4TextConfig.from_pretrained(tiny)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp_path)
    lines = checkpoint_quality(str(tmp_path), problems=2, max_new_tokens=2, group_size=32)
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    assert {"full precision", "int4 RTN", "int4 GPTQ"} <= set(rows)
    assert "on 2 synthetic problems" in lines[0]
