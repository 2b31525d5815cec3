"""One training step (forward + backward of next-token cross-entropy): titan_rl vs HF transformers.

Both sides get the same config, weights and tokens. Every measured row runs in its own fresh
subprocess, so its peak memory is its own; a first subprocess checks that both compute the same
loss. Columns: tokens/s, peak memory above the built model, model TFLOP/s (6 x active parameters x
tokens / step time) and MFU against the device's dense bf16 peak. Run from the repo root with
titan_rl importable (``pip install -e '.[dev]'`` or ``PYTHONPATH=.``):

    python benchmarks/bench_model.py    # 4 layers, hidden 512, 16 experts, vocab 201088, fp32
    python benchmarks/bench_model.py --preset 20b --layers 4 --dtype bfloat16 --seq 4096 65536 \\
        --hf-attn eager flex_attention --ac-from 32768  # gpt-oss-20b shapes on a GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import torch
import torch.nn.functional as F

from titan_rl.checkpoint.names import to_hf_state_dict
from titan_rl.model import GptOss, GptOssModelArgs
from titan_rl.model.args import ACTIVATION_DTYPES
from titan_rl.parallel.parallelize import GEMM_REDUCTIONS, set_gemm_reductions

MIB = 1 << 20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H20": 148.0, "A100": 312.0, "L40S": 362.0}
"""Dense bf16 tensor-core peaks (vendor datasheets, SXM parts), matched against the device name."""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def model_args(a: argparse.Namespace) -> GptOssModelArgs:
    if a.preset:
        return GptOssModelArgs.from_preset(
            a.preset, num_hidden_layers=a.layers, activation_dtype=a.activation_dtype
        )
    return GptOssModelArgs(
        activation_dtype=a.activation_dtype,
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        num_local_experts=a.experts,
        num_experts_per_tok=a.top_k,
        sliding_window=128,
    )


def activations_note(a: argparse.Namespace) -> str:
    """For the config line: the fp32-activation mode, when ours runs in it."""
    return " (ours: fp32 activations)" if a.activation_dtype == "float32" else ""


def build(side: str, a: argparse.Namespace, device: torch.device, hf_attn: str = "eager") -> torch.nn.Module:
    """Our model from a fixed seed; for ``hf``, a GptOssForCausalLM holding exactly those weights."""
    torch.manual_seed(0)
    dtype = DTYPES[getattr(a, "dtype", "float32")]
    with device:
        model = GptOss(model_args(a)).to(dtype).train()
    if side == "ours":
        return model
    from transformers import GptOssConfig, GptOssForCausalLM
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    drop = ("architectures", "model_type", "rope_scaling")
    cfg = {k: v for k, v in model.args.to_hf_config().items() if k not in drop}
    if a.hf_experts != "default":
        cfg["experts_implementation"] = a.hf_experts
    config = GptOssConfig(**cfg)
    config._attn_implementation = hf_attn
    # Built on meta and given our tensors (assign=True) so the worker never holds two copies of the weights:
    # a transient 2x would raise the peak before the first step and hide part of HF's.
    with torch.device("meta"):
        hf = GptOssForCausalLM(config)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True, assign=True)
    assert not missing and not unexpected, (missing, unexpected)
    hf.model.rotary_emb = GptOssRotaryEmbedding(config).to(
        device
    )  # fp32 non-persistent buffers, left on meta
    return hf.train()


def loss_of(side: str, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``targets`` given ``inputs`` (the same targets on both sides)."""
    if side == "ours":  # log-probs through the model's chunked lm_head: no [tokens, vocab] logits kept
        index = torch.arange(targets.numel(), device=targets.device)
        logprobs, _ = model(inputs, targets=targets.flatten(), target_index=index)
        return -logprobs.mean()
    logits = model(input_ids=inputs).logits  # what `labels=` does, minus its shift (targets are pre-shifted)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def tokens(a: argparse.Namespace, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model_args(a).vocab_size, (a.batch, seq + 1), generator=g).to(device)
    return ids[:, :-1], ids[:, 1:]


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # Linux: KiB


def worker(job: dict[str, Any], a: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One row: ``job = {"side", "seq", "hf_attn", "ac"}``; or the loss check (``side == "check"``)."""
    if job["side"] == "check":
        inputs, targets = tokens(a, job["seq"], device)
        with torch.no_grad():
            ours = loss_of("ours", build("ours", a, device), inputs, targets).item()
            hf = loss_of("hf", build("hf", a, device, job["hf_attn"]), inputs, targets).item()
        return {"ours": ours, "hf": hf}
    side = job["side"]
    model = build(side, a, device, job["hf_attn"])
    if side == "ours" and job["ac"]:
        from titan_rl.parallel.activation_checkpoint import apply_activation_checkpointing

        apply_activation_checkpointing(model, "full")
    if side == "ours" and a.compile:
        from titan_rl.parallel.parallelize import apply_compile

        apply_compile(model)
    inputs, targets = tokens(a, job["seq"], device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start_mib = torch.cuda.memory_allocated(device) / MIB
    else:
        start_mib = peak_mib(device)
    times = []
    for step in range(a.warmup + a.steps):
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        loss = loss_of(side, model, inputs, targets)
        loss.backward()
        sync()
        dt = time.perf_counter() - t0
        kind = "warmup" if step < a.warmup else "timed"
        log(f"{label(job)}: {kind} step {step + 1}/{a.warmup + a.steps}: {dt:.2f}s, loss {loss.item():.5f}")
        if step >= a.warmup:
            times.append(dt)
    out = {"seconds": statistics.median(times), "peak_mib": peak_mib(device) - start_mib}
    if a.profile:

        def one_step() -> None:
            model.zero_grad(set_to_none=True)
            loss_of(side, model, inputs, targets).backward()

        print_top_ops(one_step, device, a.profile, f"{label(job)} at T={job['seq']}: one step")
    if side == "hf":
        out["experts"] = model.config._experts_implementation
    return out


def print_top_ops(run: Callable[[], Any], device: torch.device, top: int, what: str) -> None:
    """Run ``run()`` once under ``torch.profiler`` and print its ``top`` ops by self device time
    (CPU time on a CPU) to stderr as "profile of <what>, top N ops". Both benchmarks call it after
    their timed runs, so the tables are unaffected."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    log(f"profile of {what}, top {top} ops by {key}\n{prof.key_averages().table(sort_by=key, row_limit=top)}")


def label(job: dict[str, Any]) -> str:
    if job["side"] == "ours":
        return "titan_rl" + (" + full AC" if job["ac"] else "")
    return f"HF {job['hf_attn']}"


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    """The worker's result, or ``{"failed": exit code}`` (out of memory, an unsupported HF attention):
    the row says so and the error is on stderr."""
    log(f"starting {label(job)} at T={job['seq']} in a fresh process")
    cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", json.dumps(job)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE)
    if proc.returncode:
        log(f"{label(job)} at T={job['seq']} failed with exit code {proc.returncode}")
        return {"failed": proc.returncode}
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def bf16_peak_tflops(a: argparse.Namespace, device: torch.device) -> float | None:
    if a.peak_tflops:
        return a.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def add_model_flags(p: argparse.ArgumentParser, vocab: int) -> None:
    """The model flags both benchmarks share: a preset, or a shape with 8 query / 2 kv heads x 64
    and window 128."""
    p.add_argument(
        "--preset", choices=["debug", "20b", "120b"], help="a titan_rl preset (shape flags ignored)"
    )
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--vocab", type=int, default=vocab)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights and compute, both sides")
    p.add_argument(
        "--activation-dtype", choices=ACTIVATION_DTYPES, default="auto",
        help="ours only: model.activation_dtype (float32: bf16 weights, fp32 activations)",
    )  # fmt: skip
    experts = ["default", "eager", "grouped_mm", "batched_mm"]
    p.add_argument("--hf-experts", default="default", choices=experts, help="default: HF's own choice")
    p.add_argument(
        "--gemm-reductions", choices=GEMM_REDUCTIONS, default="full",
        help="CUDA split-K sums, both sides (parallelism.gemm_reductions; reduced: PyTorch's default)",
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, vocab=201_088)
    p.add_argument("--seq", type=int, nargs="+", default=[1024], help="sequence lengths, one row each")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--hf-attn", nargs="+", default=["eager"], help="eager, sdpa, flex_attention, ...")
    p.add_argument("--hf-max-seq", type=int, default=8192, help="no HF rows beyond this T (memory)")
    p.add_argument(
        "--ac-from", type=int, default=0, help="our rows at T >= this use full activation checkpointing"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile our blocks (bf16)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--peak-tflops", type=float, default=0.0, help="device bf16 peak for MFU (default: by name)"
    )
    p.add_argument("--tol", type=float, default=None, help="largest accepted relative loss difference")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after each row, profile one step: its top N ops (stderr)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    set_gemm_reductions(a.gemm_reductions)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker), a, device)), flush=True)
        return

    tol = a.tol if a.tol is not None else (1e-4 if a.dtype == "float32" else 2e-2)
    check = run_worker({"side": "check", "seq": min(a.seq), "hf_attn": a.hf_attn[0], "ac": False})
    if "failed" in check:
        sys.exit("the loss check failed to run")
    rel = abs(check["ours"] - check["hf"]) / abs(check["hf"])
    log(f"loss titan_rl {check['ours']:.6f} vs transformers {check['hf']:.6f}: rel diff {rel:.2e}")
    if rel > tol:
        sys.exit(f"losses disagree (rel diff {rel:.2e} > {tol:g}); the comparison would not be fair")

    args = model_args(a)
    active = args.num_params()["active"]
    peak = bf16_peak_tflops(a, device)
    rows = []
    for seq in a.seq:
        jobs = [{"side": "ours", "seq": seq, "hf_attn": "eager", "ac": bool(a.ac_from and seq >= a.ac_from)}]
        if seq <= a.hf_max_seq:
            jobs += [{"side": "hf", "seq": seq, "hf_attn": attn, "ac": False} for attn in a.hf_attn]
        for job in jobs:
            rows.append((job, run_worker(job)))

    mem = "CUDA max_memory_allocated" if device.type == "cuda" else "ru_maxrss"
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(
        f"\nconfig: {args.num_hidden_layers} layers, hidden {args.hidden_size}, "
        f"{args.num_local_experts} experts top-{args.num_experts_per_tok}, {args.num_attention_heads} q / "
        f"{args.num_key_value_heads} kv heads x {args.head_dim}, window {args.sliding_window} on every "
        f"other layer, vocab {args.vocab_size}, "
        f"batch {a.batch}, {a.dtype}{activations_note(a)}, {where}; active params {active / 1e6:.1f}M\n"
        f"torch {torch.__version__}, transformers {version('transformers')}; one step = forward + backward; "
        f"median of {a.steps} steps after {a.warmup} warmup; peak = increase of {mem} over the built model; "
        f"TFLOP/s = 6 x active params x tokens / time; MFU vs {f'{peak:g} TFLOP/s bf16' if peak else 'n/a'}\n"
        f"loss check at T={min(a.seq)}: titan_rl {check['ours']:.6f}, transformers {check['hf']:.6f}, "
        f"rel diff {rel:.2e}\n"
    )
    print("| side | T | tokens/s | peak above weights (MiB) | TFLOP/s | MFU | tokens/s vs best HF at T |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for job, r in rows:
        if "failed" in r:
            print(f"| {label(job)} | {job['seq']:,} | failed (exit {r['failed']}, see stderr) | | | | |")
            continue
        tokens_s = a.batch * job["seq"] / r["seconds"]
        tflops = 6 * active * tokens_s / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        hf_best = [
            a.batch * j["seq"] / h["seconds"]
            for j, h in rows
            if "failed" not in h and j["side"] == "hf" and j["seq"] == job["seq"]
        ]
        ratio = f"{tokens_s / max(hf_best):.2f}x" if hf_best else "n/a"
        name = label(job) + (f" ({r['experts']} experts)" if job["side"] == "hf" else "")
        cells = [
            name,
            f"{job['seq']:,}",
            f"{tokens_s:,.0f}",
            f"{r['peak_mib']:,.0f}",
            f"{tflops:.3g}",
            mfu,
            ratio,
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
