"""Run under `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`: DDP training steps on our
Llama 4 (sparse MoE, router aux loss on), then check every rank holds the same weights as a single-process
model trained on the whole batch."""

import torch
from accelerate import Accelerator
from common import build_tiny, rank_rows, train_single_process


def build():
    return build_tiny(output_router_logits=True, router_aux_loss_coef=0.01)


def main() -> None:
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2, f"expected 2 processes, got {world}"
    model = accelerator.prepare(build())
    initial = torch.cat([p.detach().reshape(-1) for p in build().parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [torch.randint(3, 800, (2 * world, 32), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    for batch in batches:
        mine = rank_rows(batch, rank)
        accelerator.backward(model(mine, labels=mine, use_cache=False).loss)
        optimizer.step()
        optimizer.zero_grad()

    flat = torch.cat([p.detach().reshape(-1) for p in accelerator.unwrap_model(model).parameters()])
    gathered = accelerator.gather(flat.unsqueeze(0))
    assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
    assert (flat - initial).abs().max() > 1e-4, "training did not move the weights"
    if accelerator.is_main_process:
        reference = train_single_process(build(), batches, world)
        expected = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
        worst = (expected - flat).abs().max().item()
        assert worst < 1e-5, worst
        print(f"DDP OK: {world} ranks in step, max diff to single process {worst:.2e}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
