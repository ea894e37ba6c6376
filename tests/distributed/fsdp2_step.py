"""Run under torchrun (2 CPU processes, gloo): FSDP2 `fully_shard` on our Llama 4, one training step,
then compare the gathered full state dict with an unsharded model trained on the whole batch."""

import sys

import torch
import torch.distributed as dist
from common import build_tiny, rank_rows, train_single_process
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = torch.randint(3, 800, (2 * world, 40), generator=torch.Generator().manual_seed(1))

    model = build_tiny()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    experts = model.model.layers[0].feed_forward.experts.gate_up_proj
    local_experts = experts.to_local().shape[0]
    assert local_experts == experts.shape[0] // world, (local_experts, experts.shape)  # experts are sharded

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mine = rank_rows(batch, rank)
    model(mine, labels=mine, use_cache=False).loss.backward()  # FSDP averages gradients over ranks
    optimizer.step()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    if rank == 0:
        expected = train_single_process(build_tiny(), [batch], world).state_dict()
        assert full.keys() == expected.keys()
        worst = max((full[k] - expected[k]).abs().max().item() for k in expected)
        assert worst < 1e-5, worst
        moved = max((expected[k] - build_tiny().state_dict()[k]).abs().max().item() for k in expected)
        assert moved > 1e-4, "training did not move the weights"
        print(
            f"FSDP2 OK: {len(full)} tensors, max diff {worst:.2e}, {local_experts} of {experts.shape[0]} experts/rank"
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
