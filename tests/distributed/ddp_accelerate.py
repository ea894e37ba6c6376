"""Run under `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`: DDP training steps on our
Llama 4 (sparse MoE, router aux loss on), then check every rank holds the same weights as a single-process
model trained on the whole batch."""

from pathlib import Path

import torch
from accelerate import Accelerator

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig

TINY = Path(__file__).resolve().parents[2] / "hub_configs" / "tiny"


def build() -> Llama4ForCausalLM:
    torch.manual_seed(0)
    config = Llama4TextConfig.from_pretrained(TINY, output_router_logits=True, router_aux_loss_coef=0.01)
    return Llama4ForCausalLM(config)


def main() -> None:
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2, f"expected 2 processes, got {world}"
    model = accelerator.prepare(build())
    initial = torch.cat([p.detach().reshape(-1) for p in build().parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [torch.randint(3, 800, (2 * world, 32), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    for batch in batches:
        mine = batch[2 * rank : 2 * rank + 2]
        accelerator.backward(model(mine, labels=mine, use_cache=False).loss)
        optimizer.step()
        optimizer.zero_grad()

    flat = torch.cat([p.detach().reshape(-1) for p in accelerator.unwrap_model(model).parameters()])
    gathered = accelerator.gather(flat.unsqueeze(0))
    assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
    assert (flat - initial).abs().max() > 1e-4, "training did not move the weights"
    if accelerator.is_main_process:
        reference = build()
        reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
        for batch in batches:
            halves = [batch[2 * r : 2 * r + 2] for r in range(world)]
            (sum(reference(h, labels=h).loss for h in halves) / world).backward()
            reference_optimizer.step()
            reference_optimizer.zero_grad()
        expected = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
        worst = (expected - flat).abs().max().item()
        assert worst < 1e-5, worst
        print(f"DDP OK: {world} ranks in step, max diff to single process {worst:.2e}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
