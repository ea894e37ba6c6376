"""Multi-process training on 2 CPU processes (gloo): DDP through `accelerate launch`, FSDP2 `fully_shard`, expert
parallelism through transformers' `DistributedConfig(ep_size=2)`,
DeepSpeed ZeRO-3 with the MoE block as a leaf module. Each must end with the weights of single-process training."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str], env: dict | None = None) -> str:
    result = subprocess.run(
        command, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_ddp_through_accelerate_launch_matches_single_process():
    accelerate = shutil.which("accelerate") or pytest.fail("accelerate CLI not on PATH")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "tests/distributed/ddp_accelerate.py"]
    out = _run(command, env={"ACCELERATE_USE_CPU": "1"})
    assert "DDP OK: 2 ranks" in out


@pytest.mark.slow
def test_fsdp2_fully_shard_shards_experts_and_matches_unsharded_training():
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    out = _run(command + ["tests/distributed/fsdp2_step.py"])
    assert "FSDP2 OK" in out and "2 of 4 experts/rank" in out


@pytest.mark.parametrize("name", ["single_gpu", "ddp", "fsdp2", "zero3"])
def test_shipped_accelerate_configs_load_and_name_our_classes(name):
    from accelerate.commands.config.config_args import load_config_from_file

    from modeling_llama4 import modeling_llama4, moe, vision

    config = load_config_from_file(str(ROOT / "recipes" / "accelerate_configs" / f"{name}.yaml"))
    names = []
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
        names = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
    if name == "zero3":
        assert config.deepspeed_config["zero_stage"] == 3
        names = config.deepspeed_config["deepspeed_moe_layer_cls_names"].split(",")
    for class_name in names:
        assert any(hasattr(module, class_name) for module in (modeling_llama4, moe, vision)), class_name


@pytest.mark.slow
def test_deepspeed_zero3_with_moe_leaf_matches_single_process_training():
    pytest.importorskip("deepspeed")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    out = _run(command + ["tests/distributed/zero3_step.py"], env={"DS_ACCELERATOR": "cpu"})
    assert "ZeRO-3 OK" in out


@pytest.mark.slow
def test_expert_parallel_plan_through_transformers_distributed_config(tmp_path):
    # DistributedConfig(fsdp_size=2, ep_size=2): each rank holds half the experts and its own batch; tokens
    # reach their experts by all-to-all. Logits and gradients equal the single-process model's.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    out = _run(command + ["tests/distributed/ep_step.py", str(tmp_path / "model")])
    assert out.count("EP OK") == 2 and "2 local experts" in out
