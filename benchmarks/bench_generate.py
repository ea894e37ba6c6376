"""Generation speed of our sparse Llama 4 against transformers' built-in, measured in one run.

    python benchmarks/bench_generate.py            # batch 1, 8, 64, 256 x three shapes, 4k and 32k prefill
    python benchmarks/bench_generate.py --quick    # the main job's model at batch 1, 8, 64; 16 new tokens; 4k prefill
    python benchmarks/bench_generate.py --shapes main --batches 1 64 --prefill
    python benchmarks/bench_generate.py --quick --batches 1    # flags given with --quick replace its sizes

Greedy `generate()` from a 64-token prompt; tokens/s counts new tokens (every row generates exactly
`--new-tokens`). Both models hold the same weights and must produce the same tokens (checked on every row).
Ours and the built-in alternate repeat by repeat, so a busy machine slows both sides of a ratio alike.
Prefill: one forward of a long prompt, wall time and peak resident memory above the loaded model, each in a
fresh subprocess (Linux: /proc and ru_maxrss). Same weights are not needed there: random init of one model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_text import COMMON, SHAPES  # noqa: E402
from cli_types import fill_unset, positive_int  # noqa: E402

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig  # noqa: E402


def shape_kwargs(name: str) -> dict:
    """Config kwargs of a benchmark shape. "main": the main job's model (hub_configs/tiny widened the way
    recipes/configs/pretrain_tiny.yaml does); the others bench_text.py's scaled Scout and Maverick."""
    if name == "main":
        import yaml

        text = json.loads((ROOT / "hub_configs/tiny/config.json").read_text())["text_config"]
        text.pop("model_type", None)
        overrides = yaml.safe_load((ROOT / "recipes/configs/pretrain_tiny.yaml").read_text())["model_config_overrides"]
        return {**text, **overrides, "max_position_embeddings": 65536}
    return {**COMMON, **SHAPES[name], "max_position_embeddings": 65536}


def build_pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    kwargs = shape_kwargs(name)
    torch.manual_seed(0)
    builtin = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**kwargs)).eval()
    ours = Llama4ForCausalLM(Llama4TextConfig(**kwargs)).eval()
    ours.load_state_dict(builtin.state_dict())
    return ours, builtin, kwargs


def generate_rate(
    ours, builtin, vocab: int, batch: int, prompt: int, new: int, repeats: int, cache: str | None, compile_ours: bool
) -> dict:
    torch.manual_seed(batch)
    input_ids = torch.randint(3, vocab, (batch, prompt))
    kwargs = dict(
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        cache_implementation=cache,
    )
    ours_kwargs = dict(kwargs)
    if compile_ours:
        # transformers never compiles the built-in llama4 in generate(); ours compiles its decode step (inductor)
        compile_config = transformers.CompileConfig(fullgraph=True)
        compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told
        ours_kwargs["compile_config"] = compile_config
    times = {"ours": [], "builtin": []}
    outputs = {}
    with torch.inference_mode():
        ours.generate(input_ids, **ours_kwargs)  # warm-up (and compilation) at the measured shapes
        builtin.generate(input_ids[:, :8], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
        for _ in range(repeats):
            for label, model, model_kwargs in (("ours", ours, ours_kwargs), ("builtin", builtin, kwargs)):
                start = time.perf_counter()
                outputs[label] = model.generate(input_ids, **model_kwargs)
                times[label].append(time.perf_counter() - start)
    same = torch.equal(outputs["ours"], outputs["builtin"])
    return {label: batch * new / statistics.median(t) for label, t in times.items()} | {"same": same}


_PREFILL_CHILD = """
import json, resource, sys, threading, time
import torch
sys.path[:0] = {paths!r}
import transformers
from bench_generate import shape_kwargs
from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
kwargs = shape_kwargs("main")
torch.manual_seed(0)
if {label!r} == "ours":
    model = Llama4ForCausalLM(Llama4TextConfig(**kwargs)).eval()
else:
    model = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**kwargs)).eval()
ids = torch.randint(3, kwargs["vocab_size"], (1, {length}))


def resident_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


# Resident memory sampled every millisecond during the forward (ru_maxrss would include the import's peak).
samples, done = [], threading.Event()


def sample():
    while not done.is_set():
        samples.append(resident_mib())
        time.sleep(1e-3)


sampler = threading.Thread(target=sample)
with torch.inference_mode():
    model(ids[:, :64], use_cache=True)  # warm-up
    before = resident_mib()
    sampler.start()
    start = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
peak = max(samples + [resident_mib()])
print(json.dumps(dict(seconds=seconds, peak_mib=peak - before)))
"""


def prefill(label: str, length: int) -> dict:
    """Time and peak memory (resident, above the loaded model and a short warm-up) of one long-prompt forward."""
    code = _PREFILL_CHILD.format(paths=[str(ROOT), str(ROOT / "benchmarks")], label=label, length=length)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shapes = ["main", *SHAPES]
    parser.add_argument("--shapes", nargs="+", choices=shapes, help=f"default: {' '.join(shapes)}")
    parser.add_argument("--batches", nargs="+", type=positive_int, help="default: 1 8 64 256")
    parser.add_argument("--prompt-tokens", type=positive_int, default=64)
    parser.add_argument("--new-tokens", type=positive_int, help="default: 64")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--cache", choices=["dynamic", "static"], help="default: dynamic (static with --compile)")
    parser.add_argument("--compile", action="store_true", help="ours: static cache, torch.compile'd decode step")
    parser.add_argument(
        "--prefill", nargs="*", type=positive_int, default=None, help="prompt lengths (default 4096 32768)"
    )
    parser.add_argument("--quick", action="store_true", help="main model, batch 1/8/64, 16 new tokens, 4k prefill")
    args = parser.parse_args()
    if args.compile and args.cache == "dynamic":
        parser.error("--compile runs ours with a static cache: leave out --cache dynamic, or --compile")
    if args.quick:
        fill_unset(args, dict(shapes=["main"], batches=[1, 8, 64], new_tokens=16))
        args.prefill = args.prefill if args.prefill else [4096]
    elif args.prefill is not None and not args.prefill:
        args.prefill = [4096, 32768]
    fill_unset(args, dict(shapes=shapes, batches=[1, 8, 64, 256], new_tokens=64))
    args.cache = args.cache or ("static" if args.compile else "dynamic")
    cache = None if args.cache == "dynamic" else "static"

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"prompt {args.prompt_tokens}, {args.new_tokens} new tokens, {args.cache} cache"
        f"{', ours compiled' if args.compile else ''}, median of {args.repeats}\n"
    )
    print("| shape | batch | built-in tok/s | ours tok/s | ours / built-in | same tokens |\n|---|---|---|---|---|---|")
    for name in args.shapes:
        ours, builtin, kwargs = build_pair(name)
        for batch in args.batches:
            rate = generate_rate(
                ours,
                builtin,
                kwargs["vocab_size"],
                batch,
                args.prompt_tokens,
                args.new_tokens,
                args.repeats,
                cache,
                args.compile,
            )
            print(
                f"| {name} | {batch} | {rate['builtin']:.0f} | {rate['ours']:.0f} | "
                f"{rate['ours'] / rate['builtin']:.2f}x | {'yes' if rate['same'] else 'NO'} |",
                flush=True,
            )
    if args.prefill:
        print("\n| prefill, main model | built-in | ours | ours / built-in |\n|---|---|---|---|")
        for length in args.prefill:
            got = {label: prefill(label, length) for label in ("builtin", "ours")}
            b, o = got["builtin"], got["ours"]
            print(
                f"| {length} tokens, time | {b['seconds']:.2f} s | {o['seconds']:.2f} s | {o['seconds'] / b['seconds']:.2f}x |"
            )
            print(
                f"| {length} tokens, peak memory | {b['peak_mib']:.0f} MiB | {o['peak_mib']:.0f} MiB | "
                f"{o['peak_mib'] / max(b['peak_mib'], 1):.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
