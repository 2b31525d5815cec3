"""Pack trajectories into fixed-length rows of documents for one trainer forward.

Row position p predicts token p + 1 of the same document; per-position tensors below are aligned
to the *predicting* position, so ``hidden[p]`` scores ``targets[p]``. ``routing`` is the exception:
it belongs to the input ``tokens[p]`` (the experts the engine ran that token through).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from titan_rl.model import positions_from_document_ids
from titan_rl.model.moe import UNROUTED
from titan_rl.model.sink_kernels import DocumentLayout
from titan_rl.rl.types import Trajectory


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # [R, S] int64, padding 0
    document_ids: torch.Tensor  # [R, S] int64; each trajectory (and the padding) its own document
    targets: torch.Tensor  # [R, S] int64, the next token
    target_mask: torch.Tensor  # [R, S] bool, True where targets[p] is a trained (sampled) token
    rollout_logprobs: torch.Tensor  # [R, S] fp32, engine log-prob of targets[p]
    seq_ids: torch.Tensor  # [R, S] int64, trajectory index of targets[p] (0 where unmasked)
    advantages: torch.Tensor  # [R, S] fp32, the trajectory's advantage at trained positions
    positions: torch.Tensor  # [R, S] int64, position within the document (RoPE), restarting at 0
    # [R, S, layers, top_k] int16: the engine's experts for tokens[p] (-1: route yourself), or None
    # when the trajectories carry no routing (titan_rl.rl.routing_replay)
    routing: torch.Tensor | None = None
    # [R, S] int64: 1 + the trajectory index of tokens[p] (every token of it, the prompt's too), 0 in
    # the padding: which tokens a per-trajectory load-balancing loss counts (None: not packed so)
    token_seqs: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def map(self, fn) -> PackedBatch:
        """The batch with ``fn`` applied to every field (a None field stays None)."""
        fields = (getattr(self, f) for f in self.__dataclass_fields__)
        return PackedBatch(*(None if t is None else fn(t) for t in fields))

    def rows(self, index: slice | torch.Tensor) -> PackedBatch:
        return self.map(lambda t: t[index])

    def padded_rows(self, num_rows: int) -> PackedBatch:
        """The same batch with empty rows (nothing trained) appended up to ``num_rows``."""
        extra = num_rows - self.num_rows
        if extra <= 0:
            return self
        padded = self.map(lambda t: torch.cat([t, t.new_zeros((extra, *t.shape[1:]))]))
        if padded.routing is not None:  # nothing recorded there: expert 0 k times is no routing
            padded.routing[self.num_rows :] = UNROUTED
        return padded

    def documents(self) -> list[PackedBatch]:
        """Each trained document on its own as a one-row batch, in row-major order."""
        out = []
        for r in range(self.num_rows):
            ids = self.document_ids[r]
            for doc in ids.unique(sorted=True).tolist():
                cols = torch.nonzero(ids == doc).flatten()
                span = slice(int(cols[0]), int(cols[-1]) + 1)
                if self.target_mask[r, span].any():
                    out.append(self.map(lambda t, r=r, span=span: t[r : r + 1, span]))
        return out


def pack_trajectories(trajectories: list[Trajectory], advantages: list[float], seq_len: int) -> PackedBatch:
    """First-fit packing in order; a trajectory never spans two rows."""
    rows: list[list[int]] = []  # trajectory indices per row
    used: list[int] = []
    for i, traj in enumerate(trajectories):
        n = len(traj.tokens)
        if n > seq_len:
            raise ValueError(
                f"trajectory {i} has {n} tokens > training.seq_len = {seq_len}; raise training.seq_len "
                f"or lower rollout.max_new_tokens"
            )
        for r, fill in enumerate(used):
            if fill + n <= seq_len:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)

    shape = (len(rows), seq_len)
    tokens = torch.zeros(shape, dtype=torch.long)
    document_ids = torch.zeros(shape, dtype=torch.long)
    targets = torch.zeros(shape, dtype=torch.long)
    target_mask = torch.zeros(shape, dtype=torch.bool)
    rollout_logprobs = torch.zeros(shape, dtype=torch.float32)
    seq_ids = torch.zeros(shape, dtype=torch.long)
    advantage = torch.zeros(shape, dtype=torch.float32)
    token_seqs = torch.zeros(shape, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for doc, i in enumerate(members):
            traj = trajectories[i]
            n = len(traj.tokens)
            span = slice(start, start + n)
            predictor = slice(start, start + n - 1)  # position p predicts p + 1
            tokens[r, span] = torch.tensor(traj.tokens)
            document_ids[r, span] = doc
            # (a trajectory with nothing trained, e.g. an episode cut before sampling, is not counted
            # in the minibatch's trajectories; its tokens stay out of per-trajectory terms too)
            token_seqs[r, span] = i + 1 if any(traj.loss_mask[1:]) else 0
            targets[r, predictor] = torch.tensor(traj.tokens[1:])
            target_mask[r, predictor] = torch.tensor(traj.loss_mask[1:], dtype=torch.bool)
            rollout_logprobs[r, predictor] = torch.tensor(traj.rollout_logprobs[1:])
            seq_ids[r, predictor] = i
            advantage[r, predictor] = advantages[i]
            start += n
        document_ids[r, start:] = len(members)  # padding: a document of its own
    seq_ids = seq_ids * target_mask
    advantage = advantage * target_mask
    positions = positions_from_document_ids(document_ids)
    routing = _pack_routing(trajectories, rows, shape)
    return PackedBatch(
        tokens,
        document_ids,
        targets,
        target_mask,
        rollout_logprobs,
        seq_ids,
        advantage,
        positions,
        routing,
        token_seqs,
    )


def _pack_routing(
    trajectories: list[Trajectory], rows: list[list[int]], shape: tuple[int, int]
) -> torch.Tensor | None:
    """The trajectories' routing laid out like their tokens; -1 where a trajectory has none, and in
    the padding. None when no trajectory carries one."""
    recorded = next((t.routing for t in trajectories if t.routing is not None), None)
    if recorded is None:
        return None
    routing = torch.full((*shape, *recorded.shape[1:]), UNROUTED, dtype=torch.int16)
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            traj = trajectories[i]
            if traj.routing is not None:
                routing[r, start : start + len(traj.tokens)] = traj.routing
            start += len(traj.tokens)
    return routing


@dataclass
class DeviceBatch:
    """One forward's inputs on the model's device. Everything the host already knows (document
    boundaries, which positions are trained, how many) is computed on the host once, so neither the
    forward nor the loss asks the device (no boolean indexing, no ``.item()``)."""

    tokens: torch.Tensor  # [R, S]
    positions: torch.Tensor  # [R, S]
    document_ids: torch.Tensor  # [R, S]
    documents: DocumentLayout  # the documents as varlen sequences (flash kernels)
    target_index: torch.Tensor  # [N] flat index into R * S of each trained position
    targets: torch.Tensor  # [N] the token each trained position predicts
    rollout_logprobs: torch.Tensor  # [N] fp32
    advantages: torch.Tensor  # [N] fp32
    seq_ids: torch.Tensor  # [N] trajectory index
    num_tokens: int  # N
    expert_indices: torch.Tensor | None = None  # [layers, R, S, top_k] the routing to replay, or None
    token_seqs: torch.Tensor | None = None  # [R, S] 1 + trajectory index of each token, 0: padding

    @classmethod
    def of(cls, batch: PackedBatch, device: torch.device | str) -> DeviceBatch:
        """From a packed batch that is still on the host (CPU tensors)."""
        index = batch.target_mask.reshape(-1).nonzero().squeeze(1)  # on the host: no device sync

        def trained(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(-1).index_select(0, index).to(device)

        rows, seq = batch.tokens.shape
        return cls(
            tokens=batch.tokens.to(device),
            positions=batch.positions.to(device),
            document_ids=batch.document_ids.to(device),
            documents=DocumentLayout.of(rows, seq, batch.document_ids, device),
            target_index=index.to(device),
            targets=trained(batch.targets),
            rollout_logprobs=trained(batch.rollout_logprobs),
            advantages=trained(batch.advantages),
            seq_ids=trained(batch.seq_ids),
            num_tokens=index.numel(),
            expert_indices=None
            if batch.routing is None
            else batch.routing.permute(2, 0, 1, 3).contiguous().to(device),
            token_seqs=None if batch.token_seqs is None else batch.token_seqs.to(device),
        )
