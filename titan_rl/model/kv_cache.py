"""Key/value cache for generation: full layers keep every key, sliding-window layers only a window.

Rows are left-padded so that every row writes its new token at the same slot; each slot remembers
the absolute position of its key (-1 for padding / empty), and the mask is built from positions:
key at position j is visible to a query at position i when 0 <= j <= i and i - j < window.
The first forward through a fresh cache (the prefill) attends with the model's ordinary backend
and then stores the keys; later forwards (decode) write their keys and attend over the cache with
the same sink-softmax math as the eager reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from titan_rl.model.args import GptOssModelArgs
from titan_rl.model.attention import sink_softmax_attention


class LayerCache:
    def __init__(self, cache: KVCache, size: int, batch: int, args: GptOssModelArgs, device, dtype) -> None:
        self.cache = cache
        shape = (batch, size, args.num_key_value_heads, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_positions = torch.full((batch, size), -1, dtype=torch.long, device=device)

    def _write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        new, size = k.shape[1], self.k.shape[1]
        keep = min(new, size)  # a window layer's ring keeps only its last `size` keys
        start = self.cache.index + new - keep
        slots = torch.arange(start, start + keep, device=k.device) % size
        self.k[:, slots] = k[:, new - keep :]
        self.v[:, slots] = v[:, new - keep :]
        self.key_positions[:, slots] = positions[:, new - keep :]

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        sinks: torch.Tensor,
        scale: float,
        window: int | None,
        document_ids: torch.Tensor | None,
        fresh: Callable[..., torch.Tensor],
    ) -> torch.Tensor:
        positions = self.cache.positions  # [B, T] of the new tokens, -1 for padding
        if self.cache.index == 0:  # prefill: the new tokens are all there is
            out = fresh(q, k, v, sinks, scale, window, document_ids)
            self._write(k, v, positions)
            return out
        self._write(k, v, positions)
        used = min(self.cache.index + k.shape[1], self.k.shape[1])  # slots written so far
        keys, values = self.k[:, :used], self.v[:, :used]
        key_pos = self.key_positions[:, None, None, :used]  # [B, 1, 1, S]
        query_pos = positions[:, None, :, None]  # [B, 1, T, 1]
        allowed = (key_pos >= 0) & (key_pos <= query_pos)
        if window is not None:
            allowed = allowed & (query_pos - key_pos < window)
        return sink_softmax_attention(q, keys, values, sinks, scale, allowed)


class KVCache:
    """One ``LayerCache`` per layer, for ``batch`` rows and at most ``max_len`` tokens per row."""

    def __init__(
        self,
        args: GptOssModelArgs,
        batch: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len = max_len
        self.index = 0  # slots written so far (the same for every row)
        self.positions: torch.Tensor | None = None
        self.layers = []
        for layer in range(args.num_hidden_layers):
            window = args.window_of(layer)
            size = max_len if window is None else min(window, max_len)
            self.layers.append(LayerCache(self, size, batch, args, device, dtype))

    def begin(self, positions: torch.Tensor) -> None:
        """Called by the model before a forward over new tokens at ``positions [B, T]``."""
        if self.index + positions.shape[1] > self.max_len:
            raise ValueError(
                f"KV cache holds {self.max_len} tokens; {self.index + positions.shape[1]} needed"
            )
        self.positions = positions

    def end(self) -> None:
        self.index += self.positions.shape[1]
        self.positions = None
