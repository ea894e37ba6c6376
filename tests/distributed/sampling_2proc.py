"""Sampling (judge filter / DPO pairs through `cached_samples`) and greedy generation (held-out eval) on 2 CPU
processes: each rank writes what it got and how many rows it generated itself; the test compares with one process.

    torchrun --nproc_per_node 2 tests/distributed/sampling_2proc.py OUT_DIR
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from common import TINY, build_tiny  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from eval.generation import generate_completions  # noqa: E402
from recipes.sampling import cached_samples  # noqa: E402

PROMPTS = [[{"role": "user", "content": f"What is {a} + {2 * a}?" + " Think." * (a % 3)}] for a in range(7)]


def run(cache_dir: Path) -> dict:
    """The same calls a recipe makes; also counts the rows this process generated."""
    model, tokenizer = build_tiny().eval(), AutoTokenizer.from_pretrained(TINY)
    rows = []
    generate = model.generate

    def counting_generate(*args, **kwargs):
        out = generate(*args, **kwargs)
        rows.append(out.shape[0])
        return out

    model.generate = counting_generate
    samples = cached_samples(
        model, tokenizer, PROMPTS, num_samples=2, cache_dir=cache_dir, temperature=1.0,
        max_new_tokens=4, batch_size=4, chunk_size=4, seed=3,
    )  # fmt: skip
    greedy = generate_completions(model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=2, progress=False)
    return {"samples": samples, "greedy": greedy, "rows_generated": sum(rows)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir = Path(sys.argv[1])
    state = PartialState(cpu=True)
    result = run(out_dir / "cache")
    result["world"] = state.num_processes
    (out_dir / f"rank{state.process_index}.json").write_text(json.dumps(result))
    state.wait_for_everyone()
    print(f"SAMPLING OK rank {state.process_index}")
