"""Generation: titan_rl's native engine vs HF transformers ``generate`` on the same model and prompts.

Greedy decoding (``top_k=1`` on our side, ``do_sample=False`` on HF's) of ``--new`` tokens for a
batch of equal-length random prompts; prints tokens/s side by side and how many generated tokens
agree. The two engines run alternately (one warm-up each, then ours, HF, ours, HF, ...), so a
machine whose load changes during the run slows both alike; the table gives the median and the
best run of each. Run from the repo root with titan_rl importable:

    python benchmarks/bench_generate.py                     # 4 layers, hidden 512, 16 experts, vocab 32000
    python benchmarks/bench_generate.py --vocab 201088 --new 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import torch
from bench_model import add_model_flags, build  # same model and flags as the training benchmark

from titan_rl.rl.rollout import NativeEngine, SamplingParams


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, vocab=32000)
    p.add_argument("--batch", type=int, default=8, help="prompts generated together")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="generated tokens per prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine, after one warm-up")
    return p.parse_args()


def timed_alternately(engines: dict[str, Callable[[], list[list[int]]]], repeats: int) -> dict[str, Any]:
    """Seconds of every timed run and the last output, per engine; run 0 of each warms up."""
    results = {name: {"times": [], "tokens": None} for name in engines}
    for r in range(repeats + 1):
        for name, fn in engines.items():
            t0 = time.perf_counter()
            results[name]["tokens"] = fn()
            seconds = time.perf_counter() - t0
            if r:
                results[name]["times"].append(seconds)
            print(f"[bench] {name} run {r}: {seconds:.2f}s", file=sys.stderr, flush=True)
    return results


def main() -> None:
    a = parse()
    device = torch.device("cpu")
    ours = build("ours", a, device).eval()
    hf = build("hf", a, device).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, a.vocab, (a.batch, a.prompt), generator=g)
    params = SamplingParams(temperature=1.0, top_k=1, max_new_tokens=a.new)
    engine = NativeEngine(ours, seed=0)

    def run_ours() -> list[list[int]]:
        return [c.tokens for c in engine.generate(prompts.tolist(), params)]

    @torch.no_grad()
    def run_hf() -> list[list[int]]:
        out = hf.generate(
            prompts, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, pad_token_id=0
        )
        return out[:, a.prompt :].tolist()

    results = timed_alternately({"ours": run_ours, "hf": run_hf}, a.repeats)
    ours_tokens, hf_tokens = results["ours"]["tokens"], results["hf"]["tokens"]
    same = sum(x == y for o, h in zip(ours_tokens, hf_tokens) for x, y in zip(o, h))
    total = a.batch * a.new
    median = {name: statistics.median(r["times"]) for name, r in results.items()}
    best = {name: min(r["times"]) for name, r in results.items()}
    print(
        f"config: {a.layers} layers, hidden {a.hidden}, {a.experts} experts top-{a.top_k}, vocab {a.vocab}, "
        f"batch {a.batch}, prompt {a.prompt}, new {a.new}, fp32, cpu ({torch.get_num_threads()} threads); "
        f"torch {torch.__version__}, transformers {version('transformers')}, HF experts "
        f"{hf.config._experts_implementation}; greedy tokens equal: {same}/{total}\n"
    )
    print("| engine | tokens/s (median) | ratio (median) | tokens/s (best) | ratio (best) |")
    print("|---|---:|---:|---:|---:|")
    for name, label in (("ours", "titan_rl native"), ("hf", "transformers generate")):
        print(
            f"| {label} | {total / median[name]:,.0f} | {median['hf'] / median[name]:.2f}x "
            f"| {total / best[name]:,.0f} | {best['hf'] / best[name]:.2f}x |"
        )


if __name__ == "__main__":
    main()
