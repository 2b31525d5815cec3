"""bf16 numerics: every way to get a bf16 model is as exact as HF transformers' own bf16 model.

The reference is the same weights in fp32. The model has large sinks and large q/k biases (a
strongly position-dependent score, so a rounded RoPE frequency shows) and sequences of 1,024
positions (bf16 inverse frequencies put the rotary angles off past a few hundred positions). A
``.to(torch.bfloat16)`` that rounds the RoPE frequencies fails this test (about 1.24x HF's error
here; the exact paths give about 0.9x).
"""

from __future__ import annotations

import pytest
import torch

from titan_rl.checkpoint.hf import load_hf_model, save_hf_model
from titan_rl.config import load_config
from titan_rl.model import GptOss, GptOssModelArgs, token_logprobs_and_entropy

transformers = pytest.importorskip("transformers")

SEQ = 1024
TOLERANCE = 1.1  # x HF bf16's mean |log-prob error|, as the issue's acceptance asks


def reference_model() -> GptOss:
    torch.manual_seed(0)
    model = GptOss(GptOssModelArgs.from_preset("debug"))
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 0.2)
        for block in model.layers:
            attn = block.self_attn
            attn.sinks.normal_(0, 3.0)  # large sinks of both signs
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight.normal_(0, 0.15)
                proj.bias.normal_(0, 2.0)  # large biases: scores that depend on relative position
            attn.v_proj.weight.normal_(0, 0.3)
            attn.o_proj.weight.normal_(0, 0.3)  # attention moves the residual stream
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = reference_model()
    folder = tmp_path_factory.mktemp("hf")
    save_hf_model(model, folder, dtype=torch.float32)
    tokens = torch.randint(0, model.args.vocab_size, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))
    reference = logprobs_of(model, tokens)
    hf = transformers.GptOssForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, attn_implementation="eager"
    )
    with torch.no_grad():
        logits = hf(input_ids=tokens[:, :-1]).logits.float()
    hf_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    hf_error = (hf_logprobs - reference).abs().mean().item()
    return model, folder, tokens, reference, hf_error


@torch.no_grad()
def logprobs_of(model: GptOss, tokens: torch.Tensor) -> torch.Tensor:
    """On the model's device (a one-process trainer puts it on the GPU where there is one), on the CPU."""
    tokens = tokens.to(model.lm_head.weight.device)
    hidden = model(tokens[:, :-1], return_hidden=True)
    return token_logprobs_and_entropy(hidden, model.lm_head.weight, tokens[:, 1:])[0].cpu()


def preset_bf16(model: GptOss, folder) -> GptOss:
    """What ``model.preset = "debug"`` with ``model.dtype = "bfloat16"`` builds, given these weights."""
    from titan_rl.train import build_model

    cfg = load_config(None, ["--model.preset=debug", "--model.dtype=bfloat16"])
    built, _ = build_model(cfg, torch.device("cpu"))
    built.load_state_dict(model.state_dict())
    return built


def mixed_precision(model: GptOss, folder) -> GptOss:
    """A one-process trainer with ``parallelism.mixed_precision = "bf16"`` (FSDP2 on one rank)."""
    from titan_rl.trainer import Trainer

    cfg = load_config(None, ["--parallelism.mixed_precision=bf16"])
    policy = load_hf_model(folder)
    trainer = Trainer(policy, cfg)
    assert "bf16 compute, fp32 master weights" in trainer.precision
    return trainer.model


WAYS = {
    "load_hf_model(dtype=bf16)": lambda model, folder: load_hf_model(folder, dtype=torch.bfloat16),
    "load_hf_model().to(bf16)": lambda model, folder: load_hf_model(folder).to(torch.bfloat16),
    "preset with model.dtype=bfloat16": preset_bf16,
    "one-process mixed precision": mixed_precision,
}


@pytest.mark.parametrize("way", list(WAYS))
def test_bf16_logprobs_as_exact_as_transformers_bf16(setup, way, single_process_group):
    model, folder, tokens, reference, hf_error = setup
    low = WAYS[way](model, folder)
    for name, buffer in low.named_buffers():
        assert not buffer.is_floating_point() or buffer.dtype == torch.float32, name
    assert low.rope_inv_freq.dtype == torch.float32
    ours = logprobs_of(low, tokens)
    error = (ours - reference).abs().mean().item()
    assert error <= TOLERANCE * hf_error, f"{way}: mean |error| {error:.4g} vs HF bf16 {hf_error:.4g}"
    assert error > 0  # it really computed in bf16


def test_fp32_activations_through_config_and_one_process_mixed_precision(setup, single_process_group):
    """``model.activation_dtype = "float32"`` reaches the model from the config (preset and HF folder)
    and survives one-rank FSDP mixed precision: its log-probs are the bf16-weight model's in the mode
    (FSDP must not round the residual stream at block inputs), closer to fp32 than HF's bf16.
    Planted: FSDP casting block inputs to bf16 fails it."""
    from titan_rl.train import build_model
    from titan_rl.trainer import Trainer

    _, folder, tokens, reference, hf_error = setup
    flags = ["--model.activation_dtype=float32"]
    built, _ = build_model(load_config(None, flags), torch.device("cpu"))
    assert built.args.activation_dtype == "float32"
    built, _ = build_model(load_config(None, [*flags, f"--model.hf_path={folder}"]), torch.device("cpu"))
    assert built.args.activation_dtype == "float32"
    alone = load_hf_model(folder, dtype=torch.bfloat16)
    alone.args.activation_dtype = "float32"
    expected = logprobs_of(alone, tokens)
    policy = load_hf_model(folder)
    policy.args.activation_dtype = "float32"
    trainer = Trainer(policy, load_config(None, ["--parallelism.mixed_precision=bf16", *flags]))
    assert "bf16 compute, fp32 activations" in trainer.precision
    ours = logprobs_of(trainer.model, tokens)
    assert (ours - expected).abs().max() <= 1e-5
    error = (ours - reference).abs().mean().item()
    # the weights stay bf16; the activations' rounding is gone (measured 0.43x HF's; plain bf16 0.9x)
    assert error <= 0.6 * hf_error, f"mean |error| {error:.4g} vs HF bf16 {hf_error:.4g}"


def test_rms_norm_in_bf16_equals_transformers_bitwise():
    """GPT_OSS.md: RMSNorm computes in fp32 and casts once at the end. A norm computed in bf16 (or
    casting the weight first) is within bf16 noise of the model's output, so only an exact
    comparison of the norm alone catches it (it differs on about a third of the entries)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    from titan_rl.model.model import RMSNorm

    torch.manual_seed(int(torch.randint(0, 10_000, ())))
    dim, eps = 2880, 1e-5
    ours, theirs = RMSNorm(dim, eps), GptOssRMSNorm(dim, eps=eps)
    with torch.no_grad():
        ours.weight.normal_(1.0, 0.3)
        theirs.weight.copy_(ours.weight)
    ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    scales = torch.logspace(-2, 2, 64)[:, None]  # rows from 1e-2 to 1e2
    x = (torch.randn(64, dim) * scales).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
