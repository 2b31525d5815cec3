"""Generation: titan_rl's native engine vs HF transformers ``generate`` on the same model and prompts.

Greedy decoding (``top_k=1`` on our side, ``do_sample=False`` on HF's) of ``--new`` tokens for
equal-length random prompts, one pair of rows per ``--batch`` size: tokens/s side by side, how many
generated tokens agree, and how closely our engine's log-probs agree with the trainer's. The
trainer's are the model's own teacher-forced log-prob path (``model(tokens, targets=...,
target_index=...)``, what ``train.py`` computes) over prompt + completion, scoring the tokens the
engine sampled; on-policy RL needs their difference to be small. The two engines run alternately
(one warm-up each, then ours, HF, ours, HF, ...), so a machine whose load changes during the run
slows both alike; the table gives the median and the best run of each.

With ``--dtype bfloat16`` (or float16) a second table says where the engine / trainer difference
comes from: the trainer replaying the experts the engine chose (``record_routing``: a routing flip
between the two, a near-tie of router logits rounded apart, moves a token to other experts and its
log-prob by ~1e-1), the share of positions routed differently, and the trainer against an fp32
copy of its weights, routing on its own and replaying the trainer's routing (how far the dtype
moves the same model, with and without its own routing flips). Runs on CUDA when
available, else on the CPU. Run from the repo root with titan_rl importable:

    python benchmarks/bench_generate.py                     # 4 layers, hidden 512, 16 experts, vocab 32000
    python benchmarks/bench_generate.py --vocab 201088 --new 64
    python benchmarks/bench_generate.py --preset 20b --layers 4 --dtype bfloat16 --batch 32 128  # a GPU
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import torch
from bench_model import (
    activations_note,
    add_model_flags,
    build,
    print_top_ops,
)  # same model and flags as the training benchmark

from titan_rl.model import GptOss
from titan_rl.model.moe import UNROUTED
from titan_rl.parallel.parallelize import set_gemm_reductions
from titan_rl.rl.rollout import Completion, NativeEngine, SamplingParams
from titan_rl.rl.rollout.native import DECODE_MODES

GREEDY_TEMPERATURE = 1.0  # the temperature both sides' log-probs are taken at (greedy picks the argmax)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, vocab=32000)
    p.add_argument(
        "--batch", type=int, nargs="+", default=[8], help="prompts generated together; a row pair each"
    )
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="generated tokens per prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine, after one warm-up")
    p.add_argument(
        "--decode", nargs="+", default=["eager"], choices=DECODE_MODES,
        help="our engine's decode modes, a row each (cuda_graph: CUDA, bf16, sm90 / sm100)",
    )  # fmt: skip
    p.add_argument(
        "--sources", type=int, nargs="*", metavar="BATCH",
        help="bf16 / fp16: the batch sizes of the where-the-difference-comes-from table (default: all; "
        "none: no table)",
    )  # fmt: skip
    p.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="profile one more generate per batch size and mode (not cuda_graph): top N ops (stderr)",
    )  # fmt: skip
    return p.parse_args()


def timed_alternately(
    engines: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None]
) -> dict[str, Any]:
    """Seconds of every timed run and the last output, per engine; run 0 of each warms up. An engine
    that raises is reported (traceback on stderr, ``error`` in its result) and left out of later
    rounds, so one failing mode does not cost the others' numbers."""
    results = {name: {"times": [], "output": None, "error": None} for name in engines}
    for r in range(repeats + 1):
        for name, fn in engines.items():
            if results[name]["error"]:
                continue
            sync()
            t0 = time.perf_counter()
            try:
                results[name]["output"] = fn()
                sync()
            except Exception as e:  # reported; the other engines go on
                traceback.print_exc()
                results[name]["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                continue
            seconds = time.perf_counter() - t0
            if r:
                results[name]["times"].append(seconds)
            print(f"[bench] {name} run {r}: {seconds:.2f}s", file=sys.stderr, flush=True)
    return results


def paired_ratio(reference: list[float], times: list[float]) -> float:
    """Median over the timed rounds of reference time / time: each round's two runs were back to
    back, so a change in the machine's load between rounds cancels (runs of a failed engine: none)."""
    return statistics.median(r / t for r, t in zip(reference, times, strict=True))


@torch.no_grad()
def trainer_logprobs(
    model: GptOss,
    prompts: list[list[int]],
    completions: list[Completion],
    expert_indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's log-probs of every completion token, flat ``[sum of lengths]``, fp32 on the
    CPU, and the experts it routed each input position to, ``[layers, rows, width, top_k]``.

    One forward over the right-padded rows prompt + completion (the last completion token only as a
    target); the target at position ``p`` is the token at ``p + 1``, taken at the completion's
    positions only (padding after them is never seen by the tokens before it: attention is causal).
    ``expert_indices`` replays a routing instead of the model's own (``GptOss.forward``).
    """
    rows = [prompt + c.tokens[:-1] for prompt, c in zip(prompts, completions)]
    width = max(map(len, rows))
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    targets, target_index = [], []
    for b, (row, prompt, c) in enumerate(zip(rows, prompts, completions)):
        tokens[b, : len(row)] = torch.tensor(row)
        targets += c.tokens
        target_index += [b * width + len(prompt) - 1 + j for j in range(len(c.tokens))]
    device = model.lm_head.weight.device
    logprobs, _, routing = model(
        tokens.to(device),
        targets=torch.tensor(targets, device=device),
        target_index=torch.tensor(target_index, device=device),
        temperature=GREEDY_TEMPERATURE,
        expert_indices=expert_indices,
        return_expert_indices=True,
    )
    return logprobs.float().cpu(), routing


@torch.no_grad()
def engine_routing(
    model: GptOss, prompts: list[list[int]], params: SamplingParams
) -> tuple[list[Completion], torch.Tensor]:
    """One more (untimed) ``eager`` generate recording the experts the engine ran at every position
    (``NativeEngine(record_routing=True)``): -> (completions, routing ``[layers, rows, width,
    top_k]``) in the layout ``trainer_logprobs`` replays (rows prompt + completion[:-1], right-padded
    with -1: positions the trainer routes itself)."""
    completions = NativeEngine(model, seed=0, record_routing=True).generate(prompts, params)
    fed = [c.routing[: len(p) + len(c.tokens) - 1] for p, c in zip(prompts, completions)]
    width = max(len(r) for r in fed)
    routing = torch.full((len(fed), width, *fed[0].shape[1:]), UNROUTED, dtype=torch.long)
    for row, recorded in enumerate(fed):
        routing[row, : len(recorded)] = recorded
    return completions, routing.permute(2, 0, 1, 3).to(model.lm_head.weight.device)


def mismatch_measures(
    model: GptOss, prompts: list[list[int]], params: SamplingParams, fp32: bool = True
) -> dict[str, torch.Tensor]:
    """Where a low-precision engine / trainer difference comes from, on one more (untimed) ``eager``
    generate: flat log-probs of its tokens from the ``engine``, the ``trainer`` (routing on its own),
    the trainer ``replayed`` on the engine's routing (what is left is rounding, not a different
    expert), an fp32 copy of the weights routing on its own (``fp32_own``: how far the dtype moves
    the model, its routing flips included) and replaying the trainer's routing (``fp32_same``:
    rounding alone); and ``moved [positions]``, for each input position the engine ran (not the
    padding of shorter rows), whether some layer chose another set of experts in the engine than in
    the trainer. ``fp32=False``: not the two fp32 ones (no fp32 copy of the weights is made)."""
    completions, routing = engine_routing(model, prompts, params)
    engine = torch.tensor([lp for c in completions for lp in c.logprobs])
    trainer, trainer_routing = trainer_logprobs(model, prompts, completions)
    replayed, _ = trainer_logprobs(model, prompts, completions, expert_indices=routing)
    moved = (routing.sort(-1).values != trainer_routing.sort(-1).values).any(-1).any(0)  # [rows, width]
    moved = moved[(routing >= 0).all(-1).all(0)]  # positions the engine ran: not padding (-1)
    out = {"engine": engine, "trainer": trainer, "replayed": replayed, "moved": moved}
    if fp32:
        copy32 = copy.deepcopy(model).float()
        out["fp32_own"], _ = trainer_logprobs(copy32, prompts, completions)
        out["fp32_same"], _ = trainer_logprobs(copy32, prompts, completions, expert_indices=trainer_routing)
    return out


def mean_max(diff: torch.Tensor) -> list[str]:
    """Two table cells: the mean and the largest |diff|."""
    return [f"{diff.abs().mean().item():.2e}", f"{diff.abs().max().item():.2e}"]


def mismatch_cells(m: dict[str, torch.Tensor]) -> list[str]:
    """The cells of one row of the where-the-difference-comes-from table (``mismatch_measures``):
    engine vs trainer, engine vs the replaying trainer (mean, max each), the share of positions
    routed differently, and where measured the trainer against fp32 routing on its own, and
    replaying its routing."""
    cells = [
        *mean_max(m["engine"] - m["trainer"]),
        *mean_max(m["engine"] - m["replayed"]),
        f"{m['moved'].float().mean().item():.2%}",
    ]
    if "fp32_own" in m:
        cells += [*mean_max(m["trainer"] - m["fp32_own"]), *mean_max(m["trainer"] - m["fp32_same"])]
    return cells


def main() -> None:
    a = parse()
    set_gemm_reductions(a.gemm_reductions)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    ours = build("ours", a, device).eval()
    hf = build("hf", a, device).eval()
    vocab = ours.args.vocab_size
    params = SamplingParams(temperature=GREEDY_TEMPERATURE, top_k=1, max_new_tokens=a.new)
    engines = {mode: NativeEngine(ours, seed=0, decode=mode) for mode in a.decode}
    rows, notes = [], []
    for batch in a.batch:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, vocab, (batch, a.prompt), generator=g)

        def run_ours(engine: NativeEngine, prompts: torch.Tensor = prompts) -> list[Completion]:
            return engine.generate(prompts.tolist(), params)

        @torch.no_grad()
        def run_hf(prompts: torch.Tensor = prompts) -> list[list[int]]:
            out = hf.generate(
                prompts.to(device),
                max_new_tokens=a.new,
                min_new_tokens=a.new,
                do_sample=False,
                pad_token_id=0,
            )
            return out[:, a.prompt :].tolist()

        print(f"[bench] batch {batch}", file=sys.stderr, flush=True)
        runs = {mode: functools.partial(run_ours, engine) for mode, engine in engines.items()}
        graph_engine = engines.get("cuda_graph")
        before = (graph_engine.captures, graph_engine.capture_seconds) if graph_engine else None
        results = timed_alternately({**runs, "hf": run_hf}, a.repeats, sync)
        if graph_engine and results["cuda_graph"]["times"] and not results["cuda_graph"]["error"]:
            calls = len(results["cuda_graph"]["times"]) + 1  # the warm-up captures too: every call anew
            captured = (graph_engine.captures - before[0]) / calls
            seconds = (graph_engine.capture_seconds - before[1]) / calls
            notes.append(
                f"cuda_graph at batch {batch}: {captured:g} graphs captured per generate, "
                f"{seconds * 1e3:,.0f} ms of capture per generate (inside its times)"
            )
        ok = [mode for mode in engines if not results[mode]["error"]]
        if a.profile:
            # not cuda_graph: its op list is graph launches, and the profiler's CUPTI teardown
            # has crashed processes that replay CUDA graphs (pytorch issue 75504)
            for mode in (m for m in ok if m != "cuda_graph"):
                print_top_ops(runs[mode], device, a.profile, f"titan_rl native ({mode}) at batch {batch}")
        checks = {}
        for mode in ok:
            completions, hf_tokens = results[mode]["output"], results["hf"]["output"]
            engine_logprobs = torch.tensor([lp for c in completions for lp in c.logprobs])
            diff = (engine_logprobs - trainer_logprobs(ours, prompts.tolist(), completions)[0]).abs()
            same = sum(x == y for c, h in zip(completions, hf_tokens) for x, y in zip(c.tokens, h))
            checks[mode] = (same, diff.mean().item(), diff.max().item())
        rows.append((batch, results, checks, prompts.tolist()))

    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    args = ours.args
    print(
        f"config: {args.num_hidden_layers} layers, hidden {args.hidden_size}, "
        f"{args.num_local_experts} experts top-{args.num_experts_per_tok}, vocab {vocab}, "
        f"prompt {a.prompt}, new {a.new}, {a.dtype}{activations_note(a)}, {where}; "
        f"torch {torch.__version__}, "
        f"transformers {version('transformers')}, HF experts {hf.config._experts_implementation}; "
        f"median / best of {a.repeats} timed runs after one warm-up; engine vs trainer: |difference| "
        f"of the engine's log-prob of each generated token and the model's teacher-forced log-prob "
        f"(T = {GREEDY_TEMPERATURE:g})\n"
    )
    print(
        "| engine | batch | tokens/s (median) | ratio (median) | tokens/s (best) | ratio (best) "
        "| ratio (paired median) | greedy tokens = HF | engine vs trainer logp, mean | max |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch, results, checks, _ in rows:
        total = batch * a.new
        median = {name: statistics.median(r["times"]) for name, r in results.items() if r["times"]}
        best = {name: min(r["times"]) for name, r in results.items() if r["times"]}
        for name in results:
            if results[name]["error"]:
                print(f"| titan_rl native ({name}) | {batch} | failed: {results[name]['error']} |")
                continue
            if name == "hf":
                label, extra = "transformers generate", ["", "n/a", "n/a"]
            else:
                same, mean_diff, max_diff = checks[name]
                label, extra = (
                    f"titan_rl native ({name})",
                    [f"{same}/{total}", f"{mean_diff:.2e}", f"{max_diff:.2e}"],
                )
            cells = [
                label,
                str(batch),
                f"{total / median[name]:,.0f}",
                f"{median['hf'] / median[name]:.2f}x",
                f"{total / best[name]:,.0f}",
                f"{best['hf'] / best[name]:.2f}x",
                f"{paired_ratio(results['hf']['times'], results[name]['times']):.2f}x",
                *extra,
            ]
            print("| " + " | ".join(cells) + " |")
    for note in notes:
        print(f"\n{note}")
    sources = [row for row in rows if a.sources is None or row[0] in a.sources]
    if a.dtype == "float32" or not sources:
        return
    # after the main table, so a run cut short there still printed it
    print(
        f"\nWhere the {a.dtype} engine / trainer difference comes from (one more, untimed, eager generate "
        "per batch; log-prob |difference| of the generated tokens):\n"
    )
    print(
        "| batch | engine vs trainer, mean | max | trainer replaying the engine's routing, mean | max "
        "| positions routed differently | trainer vs itself in fp32, mean | max "
        "| same, fp32 replaying the trainer's routing, mean | max |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch, _, _, prompts in sources:
        cells = mismatch_cells(mismatch_measures(ours, prompts, params))
        print(f"| {batch} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
