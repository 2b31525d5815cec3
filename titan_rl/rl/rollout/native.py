"""The built-in rollout engine: sampling with the trainer's own ``GptOss`` module.

Same module, same attention and MoE code as the trainer, so there is no second model
implementation and no weight sync (the engine holds a reference to the live module). This
engine prefills the left-padded prompts with the model's ordinary attention backend, then decodes
one token at a time against a preallocated KV cache (``titan_rl.model.kv_cache``; sliding-window
layers keep only their window). Decode steps take the model's few-token paths: one-query attention
against the cache, the padded batched-matmul MoE (``Experts.forward_padded``), and the LM head
through ``decode_linear``. A row whose episode hit a stop token leaves the batch and the cache,
so the remaining rows decode without it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from titan_rl.model import GptOss
from titan_rl.model.kv_cache import KVCache


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class Completion:
    tokens: list[int]  # sampled tokens, the stop token included when one ended the episode
    logprobs: list[float]  # log-prob of each sampled token under the tempered distribution
    finish_reason: str  # "stop" or "length"


def filter_logits(logits: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Set logits outside top-k / the top-p nucleus to -inf. ``logits [B, vocab]``.

    Top-p keeps the most probable tokens (of the top-k distribution) until their mass reaches
    ``top_p``, the token that crosses it included. Both cut at a logit value, so tokens tied with the
    last one kept are kept too: the result does not depend on the order of the vocabulary.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits = torch.sort(logits, dim=-1, descending=True).values
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs  # the first token is always kept
        cutoff = sorted_logits.masked_fill(mass_before > top_p, float("inf")).amin(-1, keepdim=True)
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    return logits


def _onednn_linear_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def decode_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for the few rows of a decode step: ``x [B, in]``, ``weight [out, in]``.

    On CPU in fp32 this is oneDNN's fp32 GEMM (``torch.ops.mkldnn._linear_pointwise``, on the
    unchanged weight), which on the benchmark machine took half the time of the default BLAS call
    for the LM head at 8 rows (benchmarks/README.md); elsewhere a plain matmul.
    """
    if _onednn_linear_ok(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return x @ weight.T


@contextmanager
def full_sequence_attention(model: GptOss):
    """Undo a context-parallel re-placement of attention for the duration (rollouts see whole rows)."""
    saved = [block.self_attn.attention_fn for block in model.layers]
    for block in model.layers:
        block.self_attn.attention_fn = None
    try:
        yield
    finally:
        for block, fn in zip(model.layers, saved):
            block.self_attn.attention_fn = fn


class NativeEngine:
    """Batched sampling from a live ``GptOss``; reproducible through its own generator."""

    def __init__(self, model: GptOss, seed: int = 0) -> None:
        self.model = model
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def update_weights(self, model: torch.nn.Module) -> None:
        """Nothing to copy: the engine samples from the trainer's module itself."""
        self.model = model

    # The rest of the RolloutEngine lifecycle (titan_rl/rl/rollout/engine.py). Nothing to release
    # or take back: the weights are the trainer's own and the KV cache lives only within a call.
    def sleep(self) -> None:
        """Nothing to free between calls (see above)."""

    def wake_up(self) -> None:
        """Nothing to take back (see above)."""

    def rng_state(self) -> list[int]:
        """The sampling generator's state as ints (its bytes): all a resumed run needs to draw the
        same tokens, since the weights and prompts come back from the checkpoint and the step."""
        return self.generator.get_state().tolist()

    def set_rng_state(self, state: list[int]) -> None:
        self.generator.set_state(torch.tensor(state, dtype=torch.uint8))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        with full_sequence_attention(self.model):  # every rank generates whole sequences
            return self._generate(prompts, params)

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        model = self.model
        device = model.lm_head.weight.device
        batch, width = len(prompts), max(len(p) for p in prompts)
        # left padding: every row writes its next token into the same cache slot
        tokens = torch.zeros(batch, width, dtype=torch.long)
        positions = torch.full((batch, width), -1, dtype=torch.long)
        document_ids = torch.zeros(batch, width, dtype=torch.long)  # padding 0, prompt 1
        for i, prompt in enumerate(prompts):
            pad = width - len(prompt)
            tokens[i, pad:] = torch.tensor(prompt)
            positions[i, pad:] = torch.arange(len(prompt))
            document_ids[i, pad:] = 1
        cache = KVCache(model.args, batch, width + params.max_new_tokens, device)  # compute dtype
        hidden = model(
            tokens.to(device),
            positions=positions.to(device),
            document_ids=document_ids.to(device),
            return_hidden=True,
            kv_cache=cache,
        )[:, -1]
        next_position = torch.tensor([[len(p)] for p in prompts], device=device)  # [B, 1]
        rows = list(range(batch))  # the prompt each row of the batch (and of the cache) decodes
        outputs = [Completion([], [], "length") for _ in prompts]
        stop = set(params.stop_token_ids)
        for step in range(params.max_new_tokens):
            sampled, logprobs = self._sample(hidden, params)
            finished = set()
            for row, (i, token, logprob) in enumerate(zip(rows, sampled.tolist(), logprobs.tolist())):
                outputs[i].tokens.append(token)
                outputs[i].logprobs.append(logprob)
                if token in stop:
                    outputs[i].finish_reason = "stop"
                    finished.add(row)
            if len(finished) == len(rows) or step == params.max_new_tokens - 1:
                break
            if finished:  # finished episodes leave the batch: later steps decode only the others
                keep = [row for row in range(len(rows)) if row not in finished]
                rows = [rows[row] for row in keep]
                cache.keep_rows(torch.tensor(keep, device=device))
                sampled, next_position = sampled[keep], next_position[keep]
            hidden = model(
                sampled[:, None].to(device),
                positions=next_position,
                return_hidden=True,
                kv_cache=cache,
            )[:, -1]
            next_position = next_position + 1
        return outputs

    def _sample(self, hidden: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Next tokens ``[B]`` from the final hidden states ``[B, hidden]``, and their log-probs under
        the tempered distribution (before top-k / top-p filtering), both on the CPU."""
        logits = decode_linear(hidden, self.model.lm_head.weight).float().cpu()  # [B, vocab]
        if params.temperature != 1.0:
            logits = logits / params.temperature
        if params.top_k == 1:  # greedy
            sampled = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(filter_logits(logits, params.top_p, params.top_k), dim=-1)
            sampled = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        # log p(token) = logit - logsumexp(logits): the full [B, vocab] log-softmax is never stored
        logprobs = logits.gather(1, sampled[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        return sampled, logprobs
