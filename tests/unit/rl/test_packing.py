"""titan_rl.rl.packing: every per-position field lands where the trainer reads it.

Position p of a row predicts token p + 1 of the same document, so ``targets``, ``target_mask``,
``rollout_logprobs``, ``seq_ids`` and ``advantages`` at p all belong to token p + 1 of the
trajectory; a packer that scores a token against itself, or across a document boundary, fails here.
"""

from __future__ import annotations

import pytest
import torch

from titan_rl.model.moe import UNROUTED
from titan_rl.rl.packing import DeviceBatch, pack_trajectories
from titan_rl.rl.types import Trajectory

SEQ_LEN = 12
LENGTHS = [5, 9, 3, 12, 2, 4, 7, 3]
# first fit in order, by hand: 5 | 9 | 5+3 | 12 (full row) | 5+3+2 | 4 (no room left) | 4+7 | 9+3 (full)
ROWS = [[0, 2, 4], [1, 7], [3], [5, 6]]
UNTRAINED = 5  # a trajectory without a sampled token (e.g. cut off inside the prompt)


def trajectories(seed: int = 0) -> tuple[list[Trajectory], list[float]]:
    """Random tokens (trajectory i starts with the marker 100 + i), a prompt, response tokens with a
    tool-output hole where the length allows, engine log-probs on the sampled tokens only."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(LENGTHS):
        tokens = [100 + i, *torch.randint(0, 100, (n - 1,), generator=g).tolist()]
        prompt = 1 + int(torch.randint(0, max(1, n // 3), (), generator=g))
        mask = [0] * prompt + [1] * (n - prompt)
        if n - prompt >= 4:
            mask[prompt + 1] = 0  # environment text between two assistant turns
        if i == UNTRAINED:
            mask = [0] * n
        logprobs = [-float(torch.rand((), generator=g)) - 0.1 if m else 0.0 for m in mask]
        out.append(Trajectory(tokens, mask, logprobs, reward=0.0, group=i // 2))
    advantages = (torch.randn(len(LENGTHS), generator=g) + 0.5).tolist()
    return out, advantages


@pytest.fixture(scope="module")
def packed():
    trajs, advantages = trajectories()
    return trajs, advantages, pack_trajectories(trajs, advantages, SEQ_LEN)


def test_first_fit_rows_never_split_a_trajectory(packed):
    trajs, _, batch = packed
    assert batch.tokens.shape == (len(ROWS), SEQ_LEN)
    starts = batch.tokens[:, :, None] == torch.tensor([100 + i for i in range(len(trajs))])
    rows = [[i for i in range(len(trajs)) if starts[r, :, i].any()] for r in range(len(ROWS))]
    assert rows == ROWS


def test_each_document_is_aligned_to_its_next_token(packed):
    trajs, advantages, batch = packed
    for r, members in enumerate(ROWS):
        start, doc_ids = 0, []
        for i in members:
            traj, n = trajs[i], LENGTHS[i]
            span = slice(start, start + n)
            assert batch.tokens[r, span].tolist() == traj.tokens
            assert batch.positions[r, span].tolist() == list(range(n))  # RoPE restarts per document
            assert batch.document_ids[r, span].unique().numel() == 1
            doc_ids.append(int(batch.document_ids[r, start]))
            for t in range(n - 1):  # position start + t predicts token t + 1
                p = start + t
                trained = bool(traj.loss_mask[t + 1])
                assert int(batch.targets[r, p]) == traj.tokens[t + 1], (i, t)
                assert bool(batch.target_mask[r, p]) == trained, (i, t)
                if trained:
                    assert float(batch.rollout_logprobs[r, p]) == pytest.approx(traj.rollout_logprobs[t + 1])
                    assert float(batch.advantages[r, p]) == pytest.approx(advantages[i])
                    assert int(batch.seq_ids[r, p]) == i
                else:
                    assert float(batch.advantages[r, p]) == 0.0 and int(batch.seq_ids[r, p]) == 0
            last = start + n - 1  # the last token predicts nothing (the next document is not its text)
            assert not batch.target_mask[r, last] and batch.advantages[r, last] == 0
            start += n
        padding = slice(start, SEQ_LEN)
        assert not batch.tokens[r, padding].any() and not batch.target_mask[r, padding].any()
        assert not batch.advantages[r, padding].any()
        if start < SEQ_LEN:  # padding is a document of its own, and its positions restart too
            assert batch.document_ids[r, padding].unique().numel() == 1
            doc_ids.append(int(batch.document_ids[r, start]))
            assert batch.positions[r, padding].tolist() == list(range(SEQ_LEN - start))
        assert len(set(doc_ids)) == len(doc_ids), f"row {r}: two documents share an id"


def test_every_trained_position_scores_the_next_token_of_its_own_document(packed):
    """The invariant the trainer relies on (``hidden[p]`` scores ``targets[p]``), layout-free."""
    _, _, batch = packed
    r, p = torch.nonzero(batch.target_mask, as_tuple=True)
    assert (p < SEQ_LEN - 1).all()
    assert torch.equal(batch.document_ids[r, p + 1], batch.document_ids[r, p])
    assert torch.equal(batch.targets[r, p], batch.tokens[r, p + 1])
    assert int(batch.target_mask.sum()) == sum(sum(t.loss_mask) for t in packed[0])


def test_documents_are_the_trained_trajectories_in_row_major_order(packed):
    trajs, _, batch = packed
    docs = batch.documents()
    expected = [i for row in ROWS for i in row if i != UNTRAINED]
    assert [d.tokens[0].tolist() for d in docs] == [trajs[i].tokens for i in expected]
    for doc, i in zip(docs, expected):
        assert doc.positions[0].tolist() == list(range(LENGTHS[i]))
        assert doc.seq_ids[doc.target_mask].eq(i).all()


def test_a_trajectory_longer_than_a_row_is_an_error_that_says_what_to_raise():
    trajs, advantages = trajectories()
    with pytest.raises(ValueError, match=r"trajectory 3 has 12 tokens > training\.seq_len = 11"):
        pack_trajectories(trajs, advantages, 11)


def test_routing_is_packed_with_its_tokens_and_unrouted_elsewhere():
    """Each trajectory's routing lands at its tokens' positions (it belongs to the input token, not
    to the predicting position); trajectories without one, the padding, padded rows are -1; a
    document keeps its slice; the device batch holds it per layer. None when nobody recorded."""
    trajs, advantages = trajectories()
    assert pack_trajectories(trajs, advantages, SEQ_LEN).routing is None
    layers, top_k, g = 3, 2, torch.Generator().manual_seed(5)
    for i, traj in enumerate(trajs):
        if i != 2:  # trajectory 2 recorded nothing
            traj.routing = torch.randint(
                0, 8, (len(traj.tokens), layers, top_k), generator=g, dtype=torch.int16
            )
    batch = pack_trajectories(trajs, advantages, SEQ_LEN)
    assert batch.routing.shape == (len(ROWS), SEQ_LEN, layers, top_k) and batch.routing.dtype == torch.int16
    for r, members in enumerate(ROWS):
        start = 0
        for i in members:
            span = slice(start, start + LENGTHS[i])
            expected = trajs[i].routing if i != 2 else torch.full((LENGTHS[i], layers, top_k), UNROUTED)
            assert torch.equal(batch.routing[r, span], expected.to(torch.int16)), i
            start += LENGTHS[i]
        assert (batch.routing[r, start:] == UNROUTED).all()
    padded = batch.padded_rows(len(ROWS) + 2)
    assert (
        torch.equal(padded.routing[: len(ROWS)], batch.routing) and (padded.routing[len(ROWS) :] == -1).all()
    )
    expected_docs = [i for row in ROWS for i in row if i != UNTRAINED]
    for doc, i in zip(batch.documents(), expected_docs):
        if i != 2:
            assert torch.equal(doc.routing[0], trajs[i].routing)
    device_batch = DeviceBatch.of(batch, "cpu")
    assert torch.equal(device_batch.expert_indices[1], batch.routing[:, :, 1])  # [layers, R, S, k]


def test_routing_must_cover_every_token():
    with pytest.raises(ValueError, match="routing covers 2 positions, tokens 3"):
        Trajectory([1, 2, 3], [0, 1, 1], [0.0, -1.0, -1.0], 0.0, 0, routing=torch.zeros(2, 1, 1))


def test_token_seqs_mark_every_token_of_each_trained_trajectory(packed):
    """1 + the trajectory's index on every one of its tokens (prompt and tool text too); 0 in the
    padding and on a trajectory with nothing trained (it is not one of the minibatch's trajectories)."""
    trajs, _, batch = packed
    for r, members in enumerate(ROWS):
        start = 0
        for i in members:
            n = len(trajs[i].tokens)
            want = 0 if i == UNTRAINED else i + 1
            assert batch.token_seqs[r, start : start + n].tolist() == [want] * n, (r, i)
            start += n
        assert (batch.token_seqs[r, start:] == 0).all()
    assert (batch.padded_rows(len(ROWS) + 2).token_seqs[len(ROWS) :] == 0).all()
