"""Shared by the multi-process scripts: the tiny model they all train, and the single-process reference."""

from pathlib import Path

import torch

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig

TINY = Path(__file__).resolve().parents[2] / "hub_configs" / "tiny"


def build_tiny(**config_overrides) -> Llama4ForCausalLM:
    torch.manual_seed(0)
    return Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY, **config_overrides))


def rank_rows(batch: torch.Tensor, rank: int, rows_per_rank: int = 2) -> torch.Tensor:
    return batch[rows_per_rank * rank : rows_per_rank * (rank + 1)]


def train_single_process(model: Llama4ForCausalLM, batches: list[torch.Tensor], world: int, lr: float = 0.1):
    """What data-parallel SGD over `world` ranks computes: each step, the mean of the ranks' mean losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for batch in batches:
        shards = [rank_rows(batch, r) for r in range(world)]
        (sum(model(s, labels=s, use_cache=False).loss for s in shards) / world).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model
