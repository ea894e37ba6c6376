"""Run under torchrun (2 CPU processes, gloo): the tiny Llama 4 with emulated FP8 (recipes/fp8.py) under FSDP2
`fully_shard`, one SGD step, then compare the gathered weights with one process training the FP8 model on the
whole batch. Each rank quantizes its own tokens, as the single process does per shard, so they must agree."""

import sys

import torch
import torch.distributed as dist
from common import build_tiny, rank_rows, train_single_process
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from recipes.fp8 import convert_model_to_fp8, fp8_summary


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, 800, (2 * world, 40), generator=generator) for _ in range(1)]

    model = convert_model_to_fp8(build_tiny(), emulate=True)  # before sharding; the experts' weights stay plain
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    experts = model.model.layers[0].feed_forward.experts.gate_up_proj
    assert experts.to_local().shape[0] == experts.shape[0] // world  # experts are sharded

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in batches:
        mine = rank_rows(batch, rank)
        model(mine, labels=mine, use_cache=False).loss.backward()  # FSDP averages gradients over ranks
        optimizer.step()
        optimizer.zero_grad()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    if rank == 0:
        reference = convert_model_to_fp8(build_tiny(), emulate=True)
        expected = train_single_process(reference, batches, world).state_dict()
        bf16_like = train_single_process(build_tiny(), batches, world).state_dict()  # no FP8
        assert full.keys() == expected.keys()
        worst = max((full[k] - expected[k]).abs().max().item() for k in expected)
        fp8_effect = max((bf16_like[k] - expected[k]).abs().max().item() for k in expected)
        assert worst < 1e-5, worst
        assert fp8_effect > 100 * max(worst, 1e-7), (fp8_effect, worst)  # the comparison can tell FP8 apart
        print(f"FP8 FSDP2 OK: {fp8_summary(model)}, max diff {worst:.2e} (FP8 vs none: {fp8_effect:.2e})")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
