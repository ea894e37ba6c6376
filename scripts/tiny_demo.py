"""Main job on the embedded tiny default: build, train briefly, generate, save, reload in the built-in.

    python scripts/tiny_demo.py [--config hub_configs/tiny] [--steps 150] [--output_dir outputs/tiny_demo]

Builds the tiny Llama 4 text model from `hub_configs/tiny`, teaches it a counting pattern with a few
AdamW steps (forward and backward through the sparse MoE and chunked/NoPE attention), generates a
continuation greedily, saves the checkpoint, and loads it into transformers' built-in Llama 4 to show
that both produce the same tokens. No Hub, no GPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig


def counting_batch(batch_size: int, length: int, vocab_size: int) -> torch.Tensor:
    """Rows of consecutive token ids (wrapping), starting anywhere above the special ids 0-2."""
    starts = torch.randint(3, vocab_size, (batch_size, 1))
    return 3 + (starts - 3 + torch.arange(length)) % (vocab_size - 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="hub_configs/tiny")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--output_dir", default="outputs/tiny_demo")
    args = parser.parse_args()
    torch.manual_seed(0)

    config = Llama4TextConfig.from_pretrained(args.config)
    model = Llama4ForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"tiny Llama 4: {total / 1e6:.2f}M parameters, {config.num_local_experts} experts, "
        f"layer types {config.layer_types}"
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = counting_batch(16, 48, config.vocab_size)  # 48 tokens: longer than the 32-token chunk
        loss = model(batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 25 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f}s")

    model.eval()
    prompt = torch.tensor([[100, 101, 102, 103, 104, 105]])
    generated = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=config.pad_token_id)
    print("prompt:   ", prompt[0].tolist())
    print("generated:", generated[0, prompt.shape[1] :].tolist())

    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)
    builtin = transformers.Llama4ForCausalLM.from_pretrained(output_dir).eval()
    builtin_generated = builtin.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=config.pad_token_id)
    same = torch.equal(generated, builtin_generated)
    print(f"saved to {output_dir}; transformers' built-in Llama 4 generates the same tokens: {same}")
    if not same:
        raise SystemExit("built-in and ours disagree on the saved checkpoint")


if __name__ == "__main__":
    main()
