"""Run under torchrun (2 CPU processes) with DS_ACCELERATOR=cpu: DeepSpeed ZeRO-3 training steps on our Llama 4
with the MoE block as a ZeRO-3 leaf module, compared with single-process training on the whole batch."""

import deepspeed
import torch
import torch.distributed as dist
from common import build_tiny, rank_rows, train_single_process
from deepspeed.utils import set_z3_leaf_modules

from modeling_llama4 import Llama4TextMoe


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_tiny()
    # Ranks route their tokens to different experts; without a leaf module, ZeRO-3's per-submodule gathers hang.
    set_z3_leaf_modules(model, [Llama4TextMoe])
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "gradient_clipping": 0.0,  # the reference does not clip
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    batches = [torch.randint(3, 800, (2 * world, 32), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    for batch in batches:
        mine = rank_rows(batch, rank)
        engine.backward(engine(mine, labels=mine, use_cache=False).loss)
        engine.step()

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        trained = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    if rank == 0:
        reference = train_single_process(build_tiny(), batches, world)
        worst = max((trained[n] - p).abs().max().item() for n, p in reference.named_parameters())
        assert worst < 1e-4, worst
        print(f"ZeRO-3 OK: {len(trained)} parameters, max diff to single process {worst:.2e}")
    dist.barrier()


if __name__ == "__main__":
    main()
