"""Parity with Hugging Face transformers' GptOssForCausalLM (the checkpoint format users hold).

The model under test exercises every GPT-OSS feature, so a feature we got wrong (or dropped) shows
up as a mismatch: random q/k/v/o biases, norm weights and router biases (not zeros and ones); sinks
of both signs; sliding windows (6) shorter than the sequence; YaRN RoPE (factor 4 over 32
positions); experts scaled so the SwiGLU clamp at +-7 is reached for a good fraction of entries
(checked by ``clamp_fractions``, so the test cannot silently stop reaching it).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import rel_err, tiny_model
from titan_rl.checkpoint.names import from_hf_name, to_hf_state_dict

transformers = pytest.importorskip("transformers")

EXPERT_SCALE = 8.0
"""gate_up_proj std 0.2 -> 1.6: a pre-activation over hidden 32 has std ~9, so ~1/5 of the gates and
~2/5 of the ups pass the clamp limit (7) on the side(s) it clamps."""


def every_feature_model(seed: int):
    """``tiny_model`` (sinks of both signs, window 6, YaRN) with every parameter random and the
    expert pre-activations large enough to be clamped."""
    model = tiny_model(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1000)

    def rand(p: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(p.shape, generator=gen) * std

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias") or name.endswith("router.bias"):
                p.copy_(rand(p, 0.3))
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + rand(p, 0.3))
            elif name.endswith("experts.gate_up_proj"):
                p.mul_(EXPERT_SCALE)
            elif name.endswith("experts.down_proj"):
                p.mul_(0.2)  # keeps the residual stream O(1) after the large clamped activations
    sinks = torch.cat([block.self_attn.sinks for block in model.layers])
    assert (sinks > 0.5).any() and (sinks < -0.5).any(), "sinks of both signs"
    return model


def clamp_fractions(model, tokens: torch.Tensor) -> list[tuple[float, float]]:
    """Per layer: the fraction of the chosen experts' gate entries above the limit, and of up
    entries outside +-limit, on ``tokens`` (read from the MoE's input and its chosen experts)."""
    seen = []
    hooks = [
        block.mlp.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out[1])))
        for block in model.layers
    ]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    fractions = []
    for moe, x, chosen in seen:
        x, chosen = x.reshape(-1, x.shape[-1]), chosen.reshape(x.numel() // x.shape[-1], -1)
        experts = moe.experts
        # [N, k, 2I], interleaved gate / up columns (HF layout)
        gate_up = torch.einsum("nh,nkhi->nki", x, experts.gate_up_proj[chosen])
        gate_up = gate_up + experts.gate_up_proj_bias[chosen]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        limit = experts.limit
        fractions.append(((gate > limit).float().mean().item(), (up.abs() > limit).float().mean().item()))
    return fractions


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


def test_the_parity_model_reaches_every_feature():
    model = every_feature_model(seed=23)
    assert model.args.rope_type == "yarn" and model.args.rope_factor > 1
    assert min(w for w in (model.args.window_of(i) for i in range(3)) if w) < 23
    tokens = torch.randint(0, model.args.vocab_size, (3, 23), generator=torch.Generator().manual_seed(0))
    for layer, (gate, up) in enumerate(clamp_fractions(model, tokens)):
        # a good fraction clamped, and most not: both branches of the clamp are compared to HF
        assert 0.1 < gate < 0.6 and 0.1 < up < 0.8, (layer, gate, up)


@pytest.mark.parametrize("seq", [5, 23])  # shorter and longer than the window (6)
@pytest.mark.parametrize("backend", ["eager", "chunked"])
def test_logits_match_transformers(seq, backend):
    model = every_feature_model(seed=seq)
    model.set_attention_backend(backend)
    hf = hf_twin(model).eval()
    tokens = torch.randint(0, model.args.vocab_size, (3, seq), generator=torch.Generator().manual_seed(seq))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(input_ids=tokens).logits
    # fp32 on both sides, same math in another order: round-off is ~1e-6 of the largest logit
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
    model = every_feature_model(seed=7)
    model.set_attention_backend(backend)
    hf = hf_twin(model).train()
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, model.args.vocab_size, (2, 17), generator=gen)
    weights = torch.randn(2, 17, model.args.vocab_size, generator=gen)  # random scalar loss
    (model(tokens) * weights).sum().backward()
    (hf(input_ids=tokens).logits * weights).sum().backward()
    hf_grads = {from_hf_name(n): p.grad for n, p in hf.named_parameters()}
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().max() > 0, name
        # gradients go through the whole network backwards: fp32 round-off grows to ~1e-5
        assert rel_err(param.grad, hf_grads[name]) <= 1e-4, name
