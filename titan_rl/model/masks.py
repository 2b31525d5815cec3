"""Which keys a query may attend to: causal, sliding window, packed documents."""

from __future__ import annotations

import torch


def allowed_keys(
    q_start: int,
    q_end: int,
    k_start: int,
    k_end: int,
    window: int | None,
    document_ids: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Boolean mask ``[B or 1, 1, q_end - q_start, k_end - k_start]``: may query i see key j."""
    q_idx = torch.arange(q_start, q_end, device=device)[:, None]
    k_idx = torch.arange(k_start, k_end, device=device)[None, :]
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (q_idx - k_idx < window)
    allowed = allowed[None, None]
    if document_ids is not None:
        same_doc = document_ids[:, q_start:q_end, None] == document_ids[:, None, k_start:k_end]
        allowed = allowed & same_doc[:, None]
    return allowed
