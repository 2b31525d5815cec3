"""The built-in rollout engine: sampling with the trainer's own ``GptOss`` module.

Same module, same attention and MoE code as the trainer, so there is no second model
implementation and no weight sync (the engine holds a reference to the live module). This
version re-runs the full prefix for every new token (no KV cache yet): simple and exact, meant
for the CPU debug runs and tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from titan_rl.model import GptOss


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
        model, device = self.model, self.model.lm_head.weight.device
        batch = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts])
        total = int(lengths.max()) + params.max_new_tokens
        tokens = torch.zeros(batch, total, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        done = torch.zeros(batch, dtype=torch.bool)
        outputs: list[Completion] = [Completion([], [], "length") for _ in prompts]
        stop = torch.tensor(list(params.stop_token_ids), dtype=torch.long)
        for _ in range(params.max_new_tokens):
            width = int(lengths.max())
            hidden = model(tokens[:, :width].to(device), return_hidden=True)  # right padding is causal-safe
            last = hidden[torch.arange(batch), (lengths - 1).to(device)]  # [B, hidden]
            logits = (last @ model.lm_head.weight.T).float().cpu() / params.temperature
            logprobs = torch.log_softmax(logits, dim=-1)
            probs = torch.softmax(filter_logits(logits, params.top_p, params.top_k), dim=-1)
            sampled = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
            for i in torch.nonzero(~done).flatten().tolist():
                token = int(sampled[i])
                outputs[i].tokens.append(token)
                outputs[i].logprobs.append(float(logprobs[i, token]))
                tokens[i, lengths[i]] = token
                lengths[i] += 1
                if stop.numel() and bool((stop == token).any()):
                    done[i] = True
                    outputs[i].finish_reason = "stop"
            if done.all():
                break
        return outputs
