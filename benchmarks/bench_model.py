"""One training step (forward + backward of next-token cross-entropy): titan_rl vs HF transformers.

Both sides get the same config, weights and tokens. Each side runs in its own fresh subprocess so that
its peak memory is its own; a third subprocess first checks that both compute the same loss.
Run from the repo root with titan_rl importable (``pip install -e '.[dev]'`` or ``PYTHONPATH=.``):

    python benchmarks/bench_model.py                   # 4 layers, hidden 512, 16 experts, vocab 201088
    python benchmarks/bench_model.py --vocab 32000 --hf-experts eager
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from typing import Any

import torch
import torch.nn.functional as F

from titan_rl.checkpoint.names import to_hf_state_dict
from titan_rl.model import GptOss, GptOssModelArgs, token_logprobs_and_entropy

MIB = 1 << 20


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def model_args(a: argparse.Namespace) -> GptOssModelArgs:
    return GptOssModelArgs(
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


def build(side: str, a: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """Our model from a fixed seed; for ``hf``, a GptOssForCausalLM holding exactly those weights."""
    torch.manual_seed(0)
    with device:
        model = GptOss(model_args(a)).train()
    if side == "ours":
        return model
    from transformers import GptOssConfig, GptOssForCausalLM
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    drop = ("architectures", "model_type", "rope_scaling")
    cfg = {k: v for k, v in model.args.to_hf_config().items() if k not in drop}
    if a.hf_experts != "default":
        cfg["experts_implementation"] = a.hf_experts
    config = GptOssConfig(**cfg)
    config._attn_implementation = "eager"
    # Built on meta and given our tensors (assign=True) so the worker never holds two copies of the weights:
    # a transient 2x would raise ru_maxrss before the first step and hide part of HF's peak.
    with torch.device("meta"):
        hf = GptOssForCausalLM(config)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True, assign=True)
    assert not missing and not unexpected, (missing, unexpected)
    hf.model.rotary_emb = GptOssRotaryEmbedding(config).to(device)  # non-persistent buffers, left on meta
    return hf.float().train()


def loss_of(side: str, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``targets`` given ``inputs`` (the same targets on both sides)."""
    if side == "ours":
        hidden = model(inputs, return_hidden=True)
        logprobs, _ = token_logprobs_and_entropy(hidden, model.lm_head.weight, targets)
        return -logprobs.mean()
    logits = model(input_ids=inputs).logits  # what `labels=` does, minus its shift (targets are pre-shifted)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def tokens(a: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g).to(device)
    return seq[:, :-1], seq[:, 1:]


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # Linux: KiB


def worker(side: str, a: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    if side == "check":
        inputs, targets = tokens(a, device)
        with torch.no_grad():
            losses = [loss_of(s, build(s, a, device), inputs, targets).item() for s in ("ours", "hf")]
        return {"ours": losses[0], "hf": losses[1]}
    model = build(side, a, device)
    inputs, targets = tokens(a, device)
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
        log(f"{side}: {kind} step {step + 1}/{a.warmup + a.steps}: {dt:.2f}s, loss {loss.item():.5f}")
        if step >= a.warmup:
            times.append(dt)
    out = {"tok_s": a.batch * a.seq / statistics.median(times), "peak_mib": peak_mib(device) - start_mib}
    if side == "hf":
        out["experts"] = model.config._experts_implementation
    return out


def run_worker(side: str) -> dict[str, Any]:
    log(f"starting worker {side!r} in a fresh process")
    proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", side], stdout=subprocess.PIPE)
    if proc.returncode:
        sys.exit(f"worker {side!r} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def add_model_flags(p: argparse.ArgumentParser, vocab: int) -> None:
    """The model shape flags both benchmarks share (8 query / 2 kv heads x 64, window 128)."""
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--vocab", type=int, default=vocab)
    experts = ["default", "eager", "grouped_mm", "batched_mm"]
    p.add_argument("--hf-experts", default="default", choices=experts, help="default: HF's own choice")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, vocab=201_088)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tol", type=float, default=1e-4, help="largest accepted relative loss difference")
    p.add_argument("--worker", choices=["check", "ours", "hf"], help=argparse.SUPPRESS)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.worker:
        print(json.dumps(worker(a.worker, a, device)), flush=True)
        return

    check = run_worker("check")
    rel = abs(check["ours"] - check["hf"]) / abs(check["hf"])
    log(f"loss titan_rl {check['ours']:.6f} vs transformers {check['hf']:.6f}: rel diff {rel:.2e}")
    if rel > a.tol:
        sys.exit(f"losses disagree (rel diff {rel:.2e} > {a.tol:g}); the comparison would not be fair")
    ours, hf = run_worker("ours"), run_worker("hf")

    mem = "CUDA max_memory_allocated" if device.type == "cuda" else "ru_maxrss"
    mem = f"peak memory = increase of {mem} over the built model + inputs"
    print(
        f"\nconfig: {a.layers} layers, hidden {a.hidden}, intermediate {a.intermediate}, {a.experts} experts "
        f"top-{a.top_k}, 8 q / 2 kv heads x 64, sliding window 128 on every other layer, vocab {a.vocab}, "
        f"seq {a.seq}, batch {a.batch}, fp32, {device.type} ({torch.get_num_threads()} threads)\n"
        f"torch {torch.__version__}, transformers {version('transformers')}; HF attention eager, "
        f"HF experts {hf['experts']}; one step = forward + backward; median of {a.steps} steps after "
        f"{a.warmup} warmup; {mem}\n"
        f"loss check (no_grad forward): titan_rl {check['ours']:.6f}, transformers {check['hf']:.6f}, "
        f"rel diff {rel:.2e}\n"
    )
    print("| model | tokens/s | peak memory (MiB) | tokens/s ratio | memory ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, r in (("titan_rl", ours), ("transformers", hf)):
        tok_ratio, mem_ratio = r["tok_s"] / hf["tok_s"], r["peak_mib"] / hf["peak_mib"]
        print(f"| {name} | {r['tok_s']:,.0f} | {r['peak_mib']:,.0f} | {tok_ratio:.2f}x | {mem_ratio:.2f}x |")


if __name__ == "__main__":
    main()
