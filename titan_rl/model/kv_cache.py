"""Key/value cache for generation: full layers keep every key, sliding-window layers only a window.

A key lives in the slot of its own position: slot ``position % size``, where ``size`` is the row
length for a full layer and the window for a sliding-window layer (a ring that holds exactly the
last ``window`` keys). Rows are independent, so a row can hold a shorter or longer sequence than
its neighbours, and a finished row can be refilled with a new prompt (``replace_rows``) while the
others go on decoding. Each slot remembers the absolute position of its key (-1: empty), and the
mask is built from positions: key at position j is visible to a query at position i when
0 <= j <= i and i - j < window. Left padding (position -1) is written to one extra slot past the
end that attention never reads, so writes need no host-side filtering.

The buffers are allocated once, ``[batch, kv_heads, size + 1, head_dim]``, and written in place;
``keep_rows`` copies them only when finished rows leave the batch. Attention reads only the first
``KVCache.reach`` slots, a host-side bound on the positions (no device sync to find it). Three ways
through ``attend``:

- prefill (the first forward through a fresh cache): the new tokens are all there is, so they
  attend with the model's ordinary backend; their keys are then stored.
- decode (one new token per row): ``decode_sink_attention``, one query per row against the
  slots. Every stored key is causal and inside the window by construction, so the only mask is
  "slot holds a real token" (``key_positions >= 0``).
- several new tokens after a prefill: the stored keys plus the new ones, the general
  position-built mask and the eager sink math.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from titan_rl.model.args import GptOssModelArgs
from titan_rl.model.attention import sink_softmax_attention


def decode_sink_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Sink attention of one query per row. q ``[B, 1, H, D]``; keys/values ``[B, KV, S, D]``;
    ``visible [B, S]`` bool -> ``[B, 1, H, D]``.

    The math of ``sink_softmax_attention`` (softmax over the visible scores plus the sink logit,
    in fp32), with query head h reading kv head h // (H / KV): the H query heads are viewed as
    ``[KV, H / KV]`` so the two matmuls run per kv head without copying the cache.
    """
    batch, _, n_heads, head_dim = q.shape
    n_kv = keys.shape[1]
    q = q.float().reshape(batch, n_kv, n_heads // n_kv, head_dim)
    scores = torch.matmul(q, keys.float().transpose(-1, -2)) * scale  # [B, KV, H / KV, S]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    sink_column = sinks.float().view(1, n_kv, n_heads // n_kv, 1).expand(batch, -1, -1, 1)
    probs = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1)[..., :-1]
    out = torch.matmul(probs, values.float())  # [B, KV, H / KV, D]
    return out.view(batch, 1, n_heads, head_dim).to(values.dtype)


class LayerCache:
    def __init__(self, cache: KVCache, size: int, batch: int, args: GptOssModelArgs, device, dtype) -> None:
        self.cache, self.device, self.size = cache, device, size
        self.shape = (batch, args.num_key_value_heads, size + 1, args.head_dim)  # + the padding slot
        self.k = self.v = None  # allocated by the first write when no dtype is given
        if dtype is not None:
            self._allocate(dtype)
        self.key_positions = torch.full((batch, size + 1), -1, dtype=torch.long, device=device)

    def _allocate(self, dtype: torch.dtype) -> None:
        self.k = torch.zeros(self.shape, device=self.device, dtype=dtype)
        self.v = torch.zeros(self.shape, device=self.device, dtype=dtype)

    def _write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store ``k``/``v [B, T, KV, D]`` of tokens at ``positions [B, T]`` in their slots."""
        if self.k is None:  # the dtype the model computes in (FSDP mixed precision casts on the fly)
            self._allocate(k.dtype)
        # a ring keeps only the last `size` keys of a row; those have distinct slots (consecutive
        # positions), so no two writes of a row collide except padding, all in the unread last slot
        keep = min(k.shape[1], self.size)
        positions = positions[:, -keep:]
        slots = torch.where(positions >= 0, positions % self.size, self.size)
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[rows, :, slots] = k[:, -keep:]  # advanced indices first: [B, keep, KV, D]
        self.v[rows, :, slots] = v[:, -keep:]
        self.key_positions[rows, slots] = positions

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
        used = min(self.cache.reach, self.size)  # slots past every position stay empty
        if q.shape[1] == 1:  # decode: store the key, then attend over the row's slots
            self._write(k, v, positions)
            visible = self.key_positions[:, :used] >= 0
            return decode_sink_attention(q, self.k[:, :, :used], self.v[:, :, :used], visible, sinks, scale)
        # several new tokens: attend over the stored keys plus the new ones (storing first could
        # overwrite ring slots that the earlier of the new queries still see), then store
        keys = torch.cat([self.k[:, :, :used].transpose(1, 2), k], dim=1)  # [B, S + T, KV, D]
        values = torch.cat([self.v[:, :, :used].transpose(1, 2), v], dim=1)
        key_pos = torch.cat([self.key_positions[:, :used], positions], dim=1)[:, None, None, :]
        query_pos = positions[:, None, :, None]  # [B, 1, T, 1]
        allowed = (key_pos >= 0) & (key_pos <= query_pos)
        if window is not None:
            allowed = allowed & (query_pos - key_pos < window)
        out = sink_softmax_attention(q, keys, values, sinks, scale, allowed)
        self._write(k, v, positions)
        return out


class KVCache:
    """One ``LayerCache`` per layer, for ``batch`` rows of at most ``max_len`` positions each."""

    def __init__(
        self,
        args: GptOssModelArgs,
        batch: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        """``dtype`` of the keys and values; None: the dtype of the first keys written."""
        self.max_len = max_len
        self.index = 0  # new-token columns seen so far (0: the next forward is the prefill)
        self.extent: int | None = None
        """Set by a caller whose rows are not one left-padded batch (refilled rows): every position
        stored or in the next forward is < ``extent``. None: ``index`` + the new tokens, right for
        left-padded rows that all started together."""
        self.reach = 0  # the bound in force for the current forward
        self.positions: torch.Tensor | None = None
        self.layers = []
        for layer in range(args.num_hidden_layers):
            window = args.window_of(layer)
            size = max_len if window is None else min(window, max_len)
            self.layers.append(LayerCache(self, size, batch, args, device, dtype))

    def begin(self, positions: torch.Tensor) -> None:
        """Called by the model before a forward over new tokens at ``positions [B, T]``."""
        self.reach = self.index + positions.shape[1] if self.extent is None else self.extent
        if self.reach > self.max_len:
            raise ValueError(
                f"KV cache holds {self.max_len} positions per row; {self.reach} needed: "
                "allocate it with max_len >= the longest prompt + max_new_tokens"
            )
        self.positions = positions

    def end(self) -> None:
        self.index += self.positions.shape[1]
        self.positions = None

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (int64 indices, in their new order), e.g. to drop
        finished episodes so later steps decode fewer rows."""
        for layer in self.layers:
            if layer.k is None:
                continue
            layer.k = layer.k.index_select(0, rows)
            layer.v = layer.v.index_select(0, rows)
            layer.key_positions = layer.key_positions.index_select(0, rows)

    def replace_rows(self, rows: torch.Tensor, other: KVCache) -> None:
        """Overwrite the batch rows ``rows`` (int64) with all of ``other``'s rows, in order: a freed
        row gets a new prompt's prefill. Whole rows are copied, empty slots (-1) included, so
        nothing of the previous occupant stays visible. ``other`` must have the same ``max_len``."""
        if other.max_len != self.max_len:
            raise ValueError(
                f"replace_rows needs caches of one max_len, got {other.max_len} != {self.max_len}"
            )
        for mine, theirs in zip(self.layers, other.layers):
            if mine.k is None:
                mine._allocate(theirs.k.dtype)
            mine.k.index_copy_(0, rows, theirs.k)
            mine.v.index_copy_(0, rows, theirs.v)
            mine.key_positions.index_copy_(0, rows, theirs.key_positions)
