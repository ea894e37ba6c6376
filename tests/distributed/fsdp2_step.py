"""Run under torchrun (2 CPU processes, gloo): FSDP2 `fully_shard` on our Llama 4, one training step,
then compare the gathered full state dict with an unsharded model trained on the whole batch."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig

TINY = Path(__file__).resolve().parents[2] / "hub_configs" / "tiny"


def build() -> Llama4ForCausalLM:
    torch.manual_seed(0)
    return Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY))


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = torch.randint(3, 800, (2 * world, 40), generator=torch.Generator().manual_seed(1))

    model = build()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    experts = model.model.layers[0].feed_forward.experts.gate_up_proj
    local_experts = experts.to_local().shape[0]
    assert local_experts == experts.shape[0] // world, (local_experts, experts.shape)  # experts are sharded

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mine = batch[2 * rank : 2 * rank + 2]
    model(mine, labels=mine, use_cache=False).loss.backward()  # FSDP averages gradients over ranks
    optimizer.step()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    if rank == 0:
        reference = build()
        reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
        losses = [reference(batch[2 * r : 2 * r + 2], labels=batch[2 * r : 2 * r + 2]).loss for r in range(world)]
        (sum(losses) / world).backward()
        reference_optimizer.step()
        expected = reference.state_dict()
        assert full.keys() == expected.keys()
        worst = max((full[k] - expected[k]).abs().max().item() for k in expected)
        assert worst < 1e-5, worst
        moved = max((expected[k] - build().state_dict()[k]).abs().max().item() for k in expected)
        assert moved > 1e-4, "training did not move the weights"
        print(
            f"FSDP2 OK: {len(full)} tensors, max diff {worst:.2e}, {local_experts} of {experts.shape[0]} experts/rank"
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
