"""Which roundings make a bf16 engine and trainer disagree: the same weights under precision variants.

bench_generate.py's where-the-difference-comes-from table, once per variant of one set of weights
(the benchmark model, rounded to bf16 once, so every variant computes with the same weights):

- ``bf16``: the model in bf16, as training and rollouts run it (``--gemm-reductions``, default
  full: CUDA GEMMs split along K sum their parts in fp32, ``parallelism.gemm_reductions``).
- ``bf16, reduced split-K sums``: the same with PyTorch's default, parts summed in bf16 where
  cuBLAS finds it faster (decode steps' few-row GEMMs). The same as ``bf16`` on CPU.
- ``fp32 residual``: bf16, but the residual stream between blocks kept in fp32 (each block's
  input is rounded to bf16 only where its norm's output enters the block).
- ``fp32 router``: bf16, but the router logits computed from the bf16 inputs with fp32 sums and
  results (no rounding of the logits before top-k).
- ``fp32 activations``: fp32 compute on the bf16 weights, rounding only the inputs of every
  GEMM to bf16 (the linears, the grouped expert GEMMs and the LM head): what bf16 tensor-core
  GEMMs with fp32 outputs and fp32 everything else would compute (attention included; a flash
  kernel would round its inputs and output too).
- ``fp32 activations, bf16 expert outputs``: the same, but the grouped expert GEMMs' results
  rounded to bf16 too: what a mode could run today, where ``torch.mm(..., out_dtype=float32)``
  gives the linears fp32 results at bf16 speed but ``torch._grouped_mm`` has no fp32 output
  (``bench_gemm_out.py``).
- ``model.activation_dtype = float32``: not an emulation: the bf16 model in the mode built on
  that finding (``titan_rl.model.linear``): bf16 weights, fp32 activations, bf16 operands and fp32
  results for the linears (on CUDA ``out_dtype`` GEMMs) and the experts (on CUDA a Triton grouped
  GEMM, ``titan_rl.model.grouped_gemm``): what the ``fp32 activations`` row emulates.
- ``fp32``: fp32 compute on the bf16 weights, nothing rounded (the engine and trainer's floor).

The variants are emulated here by patching the model's functions for the duration of a row
(``variant``); the model code has no such modes. On CUDA the bf16 rows attend with the flash kernel
and the fp32 ones with the chunked kernel, a difference of its own. Greedy decoding; the engine vs
trainer columns show how far each variant's rounding moves the two apart, with the engine's routing
replayed in the trainer and without, and the share of positions that route differently. Runs on CUDA
when available, else on the CPU. From the repo root:

    python benchmarks/bench_precision.py                     # 4 layers, hidden 512, 16 experts
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from collections.abc import Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from bench_generate import mismatch_cells, mismatch_measures
from bench_model import add_model_flags, model_args

import titan_rl.model.moe as moe
from titan_rl.model import GptOss
from titan_rl.model.logprobs import LogitsGemm
from titan_rl.model.model import Block
from titan_rl.parallel.parallelize import SPLIT_K_FLAGS, set_gemm_reductions
from titan_rl.rl.rollout import SamplingParams, native

REDUCED = "bf16, reduced split-K sums"
BF16_EXPERTS = "fp32 activations, bf16 expert outputs"
MODE = "model.activation_dtype = float32"
VARIANTS = ("bf16", REDUCED, "fp32 residual", "fp32 router", "fp32 activations", BF16_EXPERTS, MODE, "fp32")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, vocab=32000)
    p.add_argument("--batch", type=int, default=8, help="prompts per generate")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument(
        "--hf-path", help="the weights of this HF folder (e.g. bench_agreement.py --save-hf) instead of "
        "random ones; the model shape flags are ignored",
    )  # fmt: skip
    return p.parse_args(argv)


def to_bf16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to bf16, in fp32."""
    return x.to(torch.bfloat16).float()


def _block_with_fp32_residual(
    self: Block,
    x,
    cos,
    sin,
    document_ids=None,
    expert_indices=None,
    kv_cache=None,
    documents=None,
    return_router_logits=False,
):
    """``Block.forward`` with ``x`` in fp32: the norms' outputs enter the block in its weights' dtype."""
    compute = self.self_attn.q_proj.weight.dtype
    x = x.float()
    attn = self.self_attn(self.input_layernorm(x).to(compute), cos, sin, document_ids, kv_cache, documents)
    x = x + attn.float()
    normed = self.post_attention_layernorm(x).to(compute)
    out, *routing = self.mlp(normed, expert_indices, return_router_logits)
    return x + out.float(), *routing


def _fp32_router_logits(self: moe.Router, x, expert_indices=None, return_logits=False):
    """``Router.forward`` with fp32 sums and logits from the same bf16 inputs and weights."""
    logits = F.linear(x.float(), self.weight.float(), self.bias.float())
    chosen, own = torch.topk(logits, self.top_k, dim=-1)
    if expert_indices is None:
        weights, expert_indices = torch.softmax(chosen, dim=-1).to(x.dtype), own
    else:
        expert_indices = torch.where(expert_indices < 0, own, expert_indices.to(own.dtype))
        weights = torch.softmax(logits.gather(-1, expert_indices), dim=-1).to(x.dtype)
    return (weights, expert_indices, logits) if return_logits else (weights, expert_indices)


@contextlib.contextmanager
def variant(name: str, model: GptOss | None = None) -> Iterator[None]:
    """Patch the model's functions as ``name`` computes (see the module docstring); ``MODE`` sets
    the (bf16) ``model``'s own ``activation_dtype``. Every row decodes through ``grouped_mm`` (the
    product a GPU runs and the variants patch): the engine's CPU-only fp32 expert copies are off."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            mock.patch.object(native, "cpu_decode_experts", lambda m: contextlib.nullcontext())
        )
        if name == REDUCED:
            matmul = torch.backends.cuda.matmul
            for flag in SPLIT_K_FLAGS:  # restored after the row
                stack.callback(setattr, matmul, flag, getattr(matmul, flag))
            set_gemm_reductions("reduced")
        elif name == "fp32 residual":
            # the final norm's output stays fp32 too; the LM head rounds its input as always
            stack.enter_context(mock.patch.object(Block, "forward", _block_with_fp32_residual))
        elif name == MODE:
            stack.enter_context(mock.patch.object(model.args, "activation_dtype", "float32"))
        elif name == "fp32 router":
            stack.enter_context(mock.patch.object(moe.Router, "forward", _fp32_router_logits))
        elif name in ("fp32 activations", BF16_EXPERTS):
            linear, grouped, operand = F.linear, moe.grouped_mm, LogitsGemm.operand
            out = to_bf16 if name == BF16_EXPERTS else (lambda y: y)
            stack.enter_context(mock.patch.object(F, "linear", lambda x, w, b=None: linear(to_bf16(x), w, b)))
            stack.enter_context(
                mock.patch.object(moe, "grouped_mm", lambda x, w, c: out(grouped(to_bf16(x), w, c)))
            )
            stack.enter_context(
                mock.patch.object(LogitsGemm, "operand", lambda self, x: operand(self, to_bf16(x)))
            )
        yield


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    set_gemm_reductions(a.gemm_reductions)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.hf_path:
        from titan_rl.checkpoint.hf import load_hf_model

        fp32 = load_hf_model(a.hf_path, device=device, progress=True).eval()
    else:
        torch.manual_seed(0)
        with device:
            fp32 = GptOss(model_args(a)).eval()
    with torch.no_grad():  # bf16 weights for every variant; the fp32 ones hold the same values
        for p in fp32.parameters():
            p.copy_(to_bf16(p))
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, fp32.args.vocab_size, (a.batch, a.prompt), generator=g).tolist()
    params = SamplingParams(temperature=1.0, top_k=1, max_new_tokens=a.new)
    args = fp32.args
    print(
        f"config: {a.hf_path or 'random weights'}: {args.num_hidden_layers} layers, hidden "
        f"{args.hidden_size}, {args.num_local_experts} experts top-{args.num_experts_per_tok}, vocab "
        f"{args.vocab_size}, rounded to bf16; {a.batch} prompts of {a.prompt} random tokens, {a.new} "
        f"greedy; {'cuda' if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}\n"
    )
    print(
        "| variant | engine vs trainer, mean | max | trainer replaying the engine's routing, mean | max "
        "| positions routed differently |"
    )
    print("|---|" + "---:|" * 5)
    for name in a.variants:
        model = bf16 if name in ("bf16", REDUCED, "fp32 residual", "fp32 router", MODE) else fp32
        with torch.no_grad(), variant(name, model):
            cells = mismatch_cells(mismatch_measures(model, prompts, params, fp32=False))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
