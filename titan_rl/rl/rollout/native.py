"""The built-in rollout engine: sampling with the trainer's own ``GptOss`` module.

Same module, same attention and MoE code as the trainer, so there is no second model
implementation and no weight sync (the engine holds a reference to the live module). This
engine prefills the left-padded prompts with the model's ordinary attention backend, then decodes
one token at a time against a KV cache (``titan_rl.model.kv_cache``; sliding-window layers keep
only their window).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

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


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]: ...

    def update_weights(self, model: torch.nn.Module) -> None: ...


def filter_logits(logits: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Set logits outside top-k / the top-p nucleus to -inf. ``logits [B, vocab]``."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the first token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


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

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        with full_sequence_attention(self.model):  # every rank generates whole sequences
            return self._generate(prompts, params)

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        model = self.model
        device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
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
        cache = KVCache(model.args, batch, width + params.max_new_tokens, device, dtype)
        hidden = model(
            tokens.to(device),
            positions=positions.to(device),
            document_ids=document_ids.to(device),
            return_hidden=True,
            kv_cache=cache,
        )[:, -1]
        next_position = torch.tensor([len(p) for p in prompts])
        done = torch.zeros(batch, dtype=torch.bool)
        outputs = [Completion([], [], "length") for _ in prompts]
        stop = torch.tensor(list(params.stop_token_ids), dtype=torch.long)
        for step in range(params.max_new_tokens):
            logits = (hidden @ model.lm_head.weight.T).float().cpu() / params.temperature  # [B, vocab]
            logprobs = torch.log_softmax(logits, dim=-1)
            if params.top_k == 1:  # greedy
                sampled = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(filter_logits(logits, params.top_p, params.top_k), dim=-1)
                sampled = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
            for i in torch.nonzero(~done).flatten().tolist():
                token = int(sampled[i])
                outputs[i].tokens.append(token)
                outputs[i].logprobs.append(float(logprobs[i, token]))
                if stop.numel() and bool((stop == token).any()):
                    done[i] = True
                    outputs[i].finish_reason = "stop"
            if done.all() or step == params.max_new_tokens - 1:
                break
            hidden = model(
                sampled[:, None].to(device),
                positions=next_position[:, None].to(device),
                return_hidden=True,
                kv_cache=cache,
            )[:, -1]
            next_position += 1
        return outputs
