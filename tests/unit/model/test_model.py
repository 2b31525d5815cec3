"""GptOss construction, meta-device init, positions for packed rows."""

from __future__ import annotations

import torch

from tests.conftest import rel_err, tiny_args
from titan_rl.model import GptOss, positions_from_document_ids
from titan_rl.model.rope import rope_inv_freq


def test_positions_restart_at_each_document():
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 7, 7]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    assert torch.equal(positions_from_document_ids(document_ids), expected)


def test_meta_device_construction_then_init():
    args = tiny_args()
    with torch.device("meta"):
        model = GptOss(args)
    assert model.lm_head.weight.is_meta
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert torch.equal(model.rope_inv_freq, rope_inv_freq(args))
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    tokens = torch.randint(0, args.vocab_size, (2, 9))
    logits = model(tokens)
    assert logits.shape == (2, 9, args.vocab_size) and torch.isfinite(logits).all()


def test_hidden_output_feeds_lm_head():
    torch.manual_seed(0)
    model = GptOss(tiny_args())
    tokens = torch.randint(0, model.args.vocab_size, (2, 9))
    hidden = model(tokens, return_hidden=True)
    assert hidden.shape == (2, 9, model.args.hidden_size)
    assert rel_err(model.lm_head(hidden), model(tokens)) <= 1e-6


def test_bf16_forward_close_to_fp32():
    torch.manual_seed(0)
    model = GptOss(tiny_args(initializer_range=0.05))
    tokens = torch.randint(0, model.args.vocab_size, (2, 16))
    with torch.no_grad():
        ref = model(tokens)
        low = model.to(torch.bfloat16)(tokens)
    assert low.dtype == torch.bfloat16
    assert rel_err(low.float(), ref) <= 5e-2
