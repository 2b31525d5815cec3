"""CPU smoke run of the model: ``python -m titan_rl.smoke``.

Builds a small GPT-OSS, checks that the fast attention backend agrees with the eager reference
and that train() and eval() agree bitwise, then fits a fixed random batch for a few AdamW steps
with chunked log-probs and prints the loss falling. Runs in seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.progress import Progress

from titan_rl.model import GptOss, GptOssModelArgs, token_logprobs_and_entropy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="debug", help="model preset: debug, 20b or 120b")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64, help="tokens per row (longer than the window)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    console = Console()

    torch.manual_seed(args.seed)
    model_args = GptOssModelArgs.from_preset(args.preset)
    counts = model_args.num_params()
    console.print(
        f"[bold]GPT-OSS {args.preset}[/]: {counts['total'] / 1e6:.2f}M params "
        f"({counts['active'] / 1e6:.2f}M active), {model_args.num_hidden_layers} layers, "
        f"{model_args.num_local_experts} experts top-{model_args.num_experts_per_tok}, "
        f"window {model_args.sliding_window}"
    )
    model = GptOss(model_args)
    tokens = torch.randint(0, model_args.vocab_size, (args.batch, args.seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    with torch.no_grad():
        fast = model(inputs)
        model.set_attention_backend("eager")
        eager = model(inputs)
        model.set_attention_backend("auto")
        model.eval()
        same_eval = torch.equal(model(inputs), fast)
        model.train()
    diff = ((fast - eager).abs().max() / eager.abs().max()).item()
    console.print(f"attention chunked vs eager: rel diff {diff:.2e}; train() == eval() bitwise: {same_eval}")
    if diff > 1e-5 or not same_eval:
        console.print("[red]smoke check failed[/]")
        return 1

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start = time.perf_counter()
    first = last = float("nan")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("training", total=args.steps)
        for step in range(1, args.steps + 1):
            hidden = model(inputs, return_hidden=True)
            logprobs, entropy = token_logprobs_and_entropy(hidden, model.lm_head.weight, targets)
            loss = -logprobs.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last = loss.item()
            first = last if step == 1 else first
            if step == 1 or step % 10 == 0 or step == args.steps:
                console.print(f"step {step:4d}  loss {last:.4f}  entropy {entropy.mean().item():.4f}")
            progress.advance(task)
    tokens_per_s = args.steps * inputs.numel() / (time.perf_counter() - start)
    console.print(f"loss {first:.4f} -> {last:.4f} in {args.steps} steps ({tokens_per_s:,.0f} tokens/s)")
    if not last < first:
        console.print("[red]loss did not decrease[/]")
        return 1
    console.print("[green]smoke run OK[/]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
