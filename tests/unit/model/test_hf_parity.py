"""Parity with Hugging Face transformers' GptOssForCausalLM (the checkpoint format users hold)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import rel_err, tiny_model
from titan_rl.checkpoint.names import from_hf_name, to_hf_state_dict

transformers = pytest.importorskip("transformers")


def hf_twin(model):
    """A transformers GptOssForCausalLM with our model's config and weights."""
    from transformers import GptOssConfig, GptOssForCausalLM

    hf_dict = model.args.to_hf_config()
    keep = {k: v for k, v in hf_dict.items() if k not in ("architectures", "model_type", "rope_scaling")}
    config = GptOssConfig(**keep)
    config._attn_implementation = "eager"
    torch.manual_seed(123)
    hf = GptOssForCausalLM(config).float()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return hf


@pytest.mark.parametrize("seq", [5, 23])  # shorter and longer than the window (6)
@pytest.mark.parametrize("backend", ["eager", "chunked"])
def test_logits_match_transformers(seq, backend):
    model = tiny_model(seed=seq)
    model.set_attention_backend(backend)
    hf = hf_twin(model).eval()
    tokens = torch.randint(0, model.args.vocab_size, (3, seq))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(input_ids=tokens).logits
    assert rel_err(ours, theirs) <= 1e-5


def test_hf_rope_matches_ours():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    model = tiny_model()
    hf = hf_twin(model)
    rotary = GptOssRotaryEmbedding(hf.config)
    assert torch.allclose(rotary.inv_freq, model.rope_inv_freq, rtol=1e-6, atol=0)
    assert rotary.attention_scaling == pytest.approx(model.args.yarn_attention_factor)


@pytest.mark.parametrize("backend", ["eager", "chunked"])
def test_gradients_match_transformers(backend):
    model = tiny_model(seed=7)
    model.set_attention_backend(backend)
    hf = hf_twin(model).train()
    tokens = torch.randint(0, model.args.vocab_size, (2, 17))
    weights = torch.randn(2, 17, model.args.vocab_size)  # random scalar loss, every logit matters
    (model(tokens) * weights).sum().backward()
    (hf(input_ids=tokens).logits * weights).sum().backward()
    hf_grads = {from_hf_name(n): p.grad for n, p in hf.named_parameters()}
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert rel_err(param.grad, hf_grads[name]) <= 1e-4, name
