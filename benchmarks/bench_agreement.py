"""Engine / trainer agreement in bf16 on random weights, then on the same model after it learned
something: does training shrink the difference?

The bf16 agreement of benchmarks/README.md is measured on random weights. A random router's logits
nearly tie, so bf16 rounding sends a token to other experts in the engine than in the trainer; a
trained router's seldom tie. This script trains the benchmark model (fp32 weights, AdamW, the
trainer's own chunked log-prob loss) on a random sparse Markov language, whose lowest reachable loss
is known (``MarkovLanguage.loss_floor``): each of ``--states`` tokens is followed by one of
``--successors`` tokens, with probabilities drawn from Dirichlet(``--concentration``). At each of
``--steps`` (0: the random weights) a copy of the weights in ``--dtype`` generates from prompts of
that language, greedily and at temperature 1, and one table row per decoding gives the columns of
bench_generate.py's where-the-difference-comes-from table (``mismatch_measures``), with the
held-out loss and the generated tokens' mean log-prob for scale. Runs on CUDA when available, else on the
CPU. From the repo root:

    python benchmarks/bench_agreement.py                           # hidden 512, 16 experts, CPU minutes
    python benchmarks/bench_agreement.py --preset 20b --layers 2 --lr 3e-4 --steps 0 200   # a GPU

``--hf-path`` measures a real checkpoint instead, as it is (a trained router is the measurement
random weights cannot make): prompts from ``--prompts-file`` (one per line, through the folder's
tokenizer.json) or random tokens, no stop tokens (every completion runs ``--new`` tokens), and
``--skip-fp32`` where an fp32 copy does not fit:

    python benchmarks/bench_agreement.py --hf-path /models/gpt-oss-20b --skip-fp32 \\
        --prompts-file prompts.txt --new 256
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import torch
from bench_generate import mismatch_cells, mismatch_measures
from bench_model import DTYPES, add_model_flags, model_args

from titan_rl.model import GptOss
from titan_rl.parallel.parallelize import set_gemm_reductions
from titan_rl.rl.rollout import SamplingParams


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, vocab=32000)
    p.set_defaults(dtype="bfloat16")
    p.add_argument(
        "--steps", type=int, nargs="+", help="measure after these (default 0 100 300; 0 with --hf-path)"
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-batch", type=int, default=16, help="sequences per training step")
    p.add_argument("--seq", type=int, default=128, help="tokens per training sequence")
    p.add_argument("--states", type=int, default=4096, help="the language's tokens (<= vocab)")
    p.add_argument("--successors", type=int, default=8, help="possible next tokens of each token")
    p.add_argument("--concentration", type=float, default=0.5, help="of the Dirichlet (lower: peakier)")
    p.add_argument("--batch", type=int, default=8, help="prompts per measured generate")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=64)
    p.add_argument(
        "--hf-path", help="measure this HF checkpoint folder as it is (no training; the model shape "
        "flags are ignored, --dtype applies) instead of the benchmark model",
    )  # fmt: skip
    p.add_argument(
        "--prompts-file", help="with --hf-path: one prompt per line, tokenized with the folder's "
        "tokenizer.json (default: --batch prompts of --prompt random tokens)",
    )  # fmt: skip
    p.add_argument(
        "--save-hf", metavar="DIR", help="save the weights after the last step as a HF folder (fp32), "
        "e.g. for bench_precision.py --hf-path",
    )  # fmt: skip
    p.add_argument(
        "--skip-fp32", action="store_true", help="no fp32-copy columns (an fp32 copy of the weights "
        "must fit next to them: gpt-oss-20b needs 84 GB)",
    )  # fmt: skip
    a = p.parse_args(argv)
    a.steps = sorted(set(a.steps or ([0] if a.hf_path else [0, 100, 300])))
    if a.hf_path and a.steps != [0]:
        p.error("--hf-path measures the checkpoint as it is, nothing is trained here: use --steps 0")
    if a.save_hf and a.hf_path:
        p.error("--save-hf saves the trained benchmark model; with --hf-path nothing is trained")
    if a.prompts_file and not a.hf_path:
        p.error("--prompts-file needs --hf-path (the benchmark model's prompts come from its language)")
    return a


class MarkovLanguage:
    """Token t is followed by ``successors[t, j]`` with probability ``probs[t, j]``."""

    def __init__(self, states: int, successors: int, concentration: float, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.states = states
        self.successors = torch.randint(0, states, (states, successors), generator=self.generator)
        with torch.random.fork_rng(devices=[]):  # Dirichlet draws from the global generator
            torch.manual_seed(seed)
            alpha = torch.full((successors,), concentration)
            self.probs = torch.distributions.Dirichlet(alpha).sample((states,))

    def loss_floor(self, length: int) -> float:
        """The lowest expected mean next-token loss (nats) on ``sample(rows, length)`` sequences: the
        language's entropy at each position, weighted by how likely each token is there (the first
        token uniform, then pushed through the transitions), averaged over the ``length - 1``
        predicted positions. No model can beat it; one that learned the language reaches it."""
        transitions = torch.zeros(self.states, self.states, dtype=torch.float64)
        transitions.scatter_add_(1, self.successors, self.probs.double())  # repeated successors merged
        entropy = -(transitions * transitions.clamp_min(1e-300).log()).sum(1)  # [states]
        where = torch.full((self.states,), 1.0 / self.states, dtype=torch.float64)
        total = 0.0
        for _ in range(length - 1):
            total += float(where @ entropy)
            where = where @ transitions
        return total / (length - 1)

    def sample(self, rows: int, length: int) -> torch.Tensor:
        """``[rows, length]`` token sequences, each from a uniformly drawn first token."""
        out = torch.empty(rows, length, dtype=torch.long)
        out[:, 0] = torch.randint(0, self.states, (rows,), generator=self.generator)
        for t in range(1, length):
            choice = torch.multinomial(self.probs[out[:, t - 1]], 1, generator=self.generator)[:, 0]
            out[:, t] = self.successors[out[:, t - 1], choice]
        return out


def next_token_loss(model: GptOss, tokens: torch.Tensor) -> torch.Tensor:
    """Mean -log p of every next token of ``tokens [rows, T]`` (the trainer's chunked log-prob path)."""
    rows, width = tokens.shape
    index = (torch.arange(rows)[:, None] * width + torch.arange(width - 1)).flatten()
    device = model.lm_head.weight.device
    logprobs, _ = model(
        tokens.to(device),
        targets=tokens[:, 1:].flatten().to(device),
        target_index=index.to(device),
    )
    return -logprobs.mean()


DECODINGS = {"greedy": dict(top_k=1), "T = 1": dict()}  # both at temperature 1


def measure(model: GptOss, prompts: list[list[int]], new: int, fp32: bool) -> list[list[str]]:
    """Per decoding: its name, the generated tokens' mean log-prob, then ``mismatch_cells``."""
    rows = []
    for name, extra in DECODINGS.items():
        m = mismatch_measures(
            model, prompts, SamplingParams(temperature=1.0, max_new_tokens=new, **extra), fp32
        )
        rows.append([name, f"{m['engine'].mean().item():.3f}", *mismatch_cells(m)])
        log(f"measured {name}")
    return rows


def checkpoint_rows(a: argparse.Namespace, device: torch.device) -> tuple[list[list[str]], str]:
    """``--hf-path``: the table rows of the checkpoint as it is, and the config line."""
    from titan_rl.checkpoint.hf import load_hf_model

    model = load_hf_model(a.hf_path, dtype=DTYPES[a.dtype], device=device, progress=True).eval()
    if a.prompts_file:
        from titan_rl.rl.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(a.hf_path)
        with open(a.prompts_file) as f:
            prompts = [tokenizer.encode(line.rstrip("\n")) for line in f if line.strip()]
        if not prompts or not all(prompts):
            raise SystemExit(f"{a.prompts_file}: no prompts, or a line with no tokens")
        what = f"{len(prompts)} prompts of {a.prompts_file} ({sum(map(len, prompts))} tokens)"
    else:
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, model.args.vocab_size, (a.batch, a.prompt), generator=g).tolist()
        what = f"{a.batch} prompts of {a.prompt} random tokens"
    with torch.no_grad():
        rows = [["checkpoint", "n/a", *row] for row in measure(model, prompts, a.new, not a.skip_fp32)]
    args = model.args
    config = (
        f"config: {a.hf_path}: {args.num_hidden_layers} layers, hidden {args.hidden_size}, "
        f"{args.num_local_experts} experts top-{args.num_experts_per_tok}, vocab {args.vocab_size}; "
        f"measured in {a.dtype}; {what}, {a.new} new"
    )
    return rows, config


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    set_gemm_reductions(a.gemm_reductions)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.hf_path:
        rows, config = checkpoint_rows(a, device)
        print(
            f"{config} on {device_name(device)}, torch {torch.__version__}; log-prob |differences| of "
            "the generated tokens\n"
        )
        print_table(rows, not a.skip_fp32)
        return
    args = model_args(a)
    if a.states > args.vocab_size:
        raise SystemExit(f"--states {a.states} > vocab {args.vocab_size}")
    language = MarkovLanguage(a.states, a.successors, a.concentration)
    held_out = language.sample(a.train_batch, a.seq)
    prompts = language.sample(a.batch, a.prompt).tolist()
    torch.manual_seed(0)
    with device:
        model = GptOss(args).train()  # fp32: the weights being trained
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rows, done, started = [], 0, time.perf_counter()
    for target in a.steps:
        while done < target:
            loss = next_token_loss(model, language.sample(a.train_batch, a.seq))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            done += 1
            if done % 25 == 0 or done == target:
                log(f"step {done}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")
        optimizer.zero_grad(set_to_none=True)  # the gradients' memory, while two more copies exist
        with torch.no_grad():
            model.eval()
            held = next_token_loss(model, held_out).item()
            low = copy.deepcopy(model).to(DTYPES[a.dtype])
            model.train()
            log(f"measuring after {done} steps")
            rows += [
                [str(done), f"{held:.3f}", *row] for row in measure(low, prompts, a.new, not a.skip_fp32)
            ]
            del low

    print(
        f"config: {args.num_hidden_layers} layers, hidden {args.hidden_size}, {args.num_local_experts} "
        f"experts top-{args.num_experts_per_tok}, vocab {args.vocab_size}; measured in {a.dtype} on "
        f"{device_name(device)}, torch "
        f"{torch.__version__}; language: {a.states} tokens x {a.successors} successors, "
        f"Dirichlet({a.concentration:g}), held-out loss floor {language.loss_floor(a.seq):.3f} nats "
        f"(uniform tokens: {math.log(a.states):.3f}); training: fp32 AdamW lr {a.lr:g}, "
        f"{a.train_batch} x {a.seq} tokens a step; {a.batch} prompts of {a.prompt} tokens, {a.new} "
        "new; log-prob |differences| of the generated tokens\n"
    )
    print_table(rows, not a.skip_fp32)
    if a.save_hf:
        from titan_rl.checkpoint.hf import save_hf_model

        save_hf_model(model, a.save_hf, dtype=torch.float32)
        log(f"saved the weights after {done} steps to {a.save_hf}")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def print_table(rows: list[list[str]], fp32: bool) -> None:
    columns = [
        "trained steps", "held-out loss", "decoding", "mean logp, generated",
        "engine vs trainer, mean", "max", "trainer replaying the engine's routing, mean", "max",
        "positions routed differently",
    ]  # fmt: skip
    if fp32:
        columns += [
            "trainer vs itself in fp32, mean",
            "max",
            "same, fp32 replaying the trainer's routing, mean",
            "max",
        ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---:|" * 2 + "---|" + "---:|" * (len(columns) - 3))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
