"""Run under torchrun (2 CPU processes, gloo): load our Llama 4 with transformers' expert parallelism
(`DistributedConfig(fsdp_size=2, ep_size=2)`), check each rank holds half the experts, and compare logits and a training
step with the single-process model."""

import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import DistributedConfig

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig

TINY = Path(__file__).resolve().parents[2] / "hub_configs" / "tiny"


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.gettempdir()) / "llama4_ep"
    if rank == 0:
        torch.manual_seed(0)
        Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY, num_experts_per_tok=2)).save_pretrained(folder)
    dist.barrier()
    reference = Llama4ForCausalLM.from_pretrained(folder).eval()
    model = Llama4ForCausalLM.from_pretrained(
        folder, distributed_config=DistributedConfig(fsdp_size=2, ep_size=2)
    ).eval()
    experts = model.model.layers[0].feed_forward.experts
    local = experts.gate_up_proj.to_local().shape[0] if hasattr(experts.gate_up_proj, "to_local") else None
    batch = torch.randint(3, 800, (2, 24), generator=torch.Generator().manual_seed(rank + 1))  # ranks differ
    with torch.no_grad():
        worst = (model(batch, use_cache=False).logits - reference(batch, use_cache=False).logits).abs().max().item()
    assert worst < 1e-4, worst

    # Training: each rank its own batch; gradients must equal single-process gradients of the mean loss.
    model.train()
    model(batch, labels=batch, use_cache=False).loss.backward()
    reference.train()
    batches = [torch.randint(3, 800, (2, 24), generator=torch.Generator().manual_seed(r + 1)) for r in range(2)]
    (sum(reference(b, labels=b, use_cache=False).loss for b in batches) / 2).backward()
    expected = dict(reference.named_parameters())
    grad_diff = 0.0
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        grad_diff = max(grad_diff, (grad - expected[name].grad).abs().max().item())
    assert grad_diff < 1e-5, grad_diff
    print(f"EP OK rank {rank}: {local} local experts, max logit diff {worst:.2e}, max grad diff {grad_diff:.2e}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
