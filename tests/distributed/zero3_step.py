"""Run under torchrun (2 CPU processes) with DS_ACCELERATOR=cpu: DeepSpeed ZeRO-3 training steps on our Llama 4
with the MoE block as a ZeRO-3 leaf module, compared with single-process training on the whole batch."""

from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import set_z3_leaf_modules

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig, Llama4TextMoe

TINY = Path(__file__).resolve().parents[2] / "hub_configs" / "tiny"


def build() -> Llama4ForCausalLM:
    torch.manual_seed(0)
    return Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY))


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build()
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
        mine = batch[2 * rank : 2 * rank + 2]
        engine.backward(engine(mine, labels=mine, use_cache=False).loss)
        engine.step()

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        trained = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    if rank == 0:
        reference = build()
        optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
        for batch in batches:
            halves = [batch[2 * r : 2 * r + 2] for r in range(world)]
            (sum(reference(h, labels=h).loss for h in halves) / world).backward()
            optimizer.step()
            optimizer.zero_grad()
        worst = max((trained[n] - p).abs().max().item() for n, p in reference.named_parameters())
        assert worst < 1e-4, worst
        print(f"ZeRO-3 OK: {len(trained)} parameters, max diff to single process {worst:.2e}")
    dist.barrier()


if __name__ == "__main__":
    main()
