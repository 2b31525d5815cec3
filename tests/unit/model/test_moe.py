"""MoE: grouped path equals a per-token loop; train == eval; replayed routing reproduces itself;
no path multiplies a token by an expert it did not choose."""

from __future__ import annotations

import pytest
import torch

import titan_rl.model.grouped_gemm as grouped_gemm
from tests.conftest import MatmulCounter, moe_macs, rel_err, tiny_args, tiny_model
from titan_rl.model.moe import UNROUTED, MoE


def per_token_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE written as math, one token and one chosen expert at a time."""
    experts = moe.experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = x[t] @ moe.router.weight.T + moe.router.bias
        top_logits, top_experts = torch.topk(logits, moe.router.top_k)
        weights = torch.softmax(top_logits, dim=-1)
        for w, e in zip(weights, top_experts.tolist()):
            gate_up = x[t] @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
            gate = gate_up[0::2].clamp(max=experts.limit)
            up = gate_up[1::2].clamp(-experts.limit, experts.limit)
            h = gate * torch.sigmoid(experts.alpha * gate) * (up + 1)
            out[t] = out[t] + w * (h @ experts.down_proj[e] + experts.down_proj_bias[e])
    return out


def random_moe(seed: int, **overrides) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(tiny_args(**overrides))
    moe.init_weights(std=0.5)  # large enough that the clamps at +-7 are hit
    return moe


@pytest.mark.parametrize("use_grouped_mm", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize("experts,top_k", [(4, 2), (8, 3)])
def test_grouped_equals_per_token_loop(monkeypatch, use_grouped_mm, experts, top_k):
    if not use_grouped_mm:
        monkeypatch.setattr(grouped_gemm, "_fused_ok", lambda a, b: False)
    moe = random_moe(experts, num_local_experts=experts, num_experts_per_tok=top_k)
    x = torch.randn(37, moe.router.weight.shape[1]) * 2
    grad = torch.randn_like(x)

    out, _ = moe(x.clone().requires_grad_())
    out.backward(grad)
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    moe.zero_grad()
    ref = per_token_reference(moe, x)
    ref.backward(grad)
    gate_up = x @ moe.experts.gate_up_proj[0]
    assert (gate_up.abs() > moe.experts.limit).any(), "test inputs should exercise the clamps"
    assert rel_err(out, ref) <= 1e-5
    for name, p in moe.named_parameters():
        assert rel_err(grads[name], p.grad) <= 1e-5, name


def test_unused_experts_get_no_compute_and_zero_grad():
    moe = random_moe(1, num_local_experts=8, num_experts_per_tok=2)
    x = torch.randn(3, moe.router.weight.shape[1])
    out, chosen = moe(x)
    out.sum().backward()
    unused = sorted(set(range(8)) - set(chosen.flatten().tolist()))
    assert unused, "with 3 tokens x 2 experts some of 8 experts are unused"
    assert moe.experts.gate_up_proj.grad[unused].abs().max() == 0


def test_train_and_eval_are_bitwise_identical():
    model = tiny_model(seed=11)
    tokens = torch.randint(0, model.args.vocab_size, (2, 19))
    with torch.no_grad():
        train_logits = model.train()(tokens)
        eval_logits = model.eval()(tokens)
    assert torch.equal(train_logits, eval_logits)


def test_forced_routing_reproduces_output_and_gradients():
    model = tiny_model(seed=5)
    tokens = torch.randint(0, model.args.vocab_size, (2, 15))
    weights = torch.randn(2, 15, model.args.vocab_size)
    logits, experts = model(tokens, return_expert_indices=True)
    assert experts.shape == (model.args.num_hidden_layers, 2, 15, model.args.num_experts_per_tok)
    (logits * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    replayed = model(tokens, expert_indices=experts)
    (replayed * weights).sum().backward()
    assert torch.equal(replayed, logits)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name


def test_forced_routing_uses_the_given_experts():
    moe = random_moe(2)
    x = torch.randn(9, moe.router.weight.shape[1])
    _, natural = moe(x)
    forced = (natural + 1) % moe.num_experts  # different experts for every token
    out, used = moe(x, forced)
    assert torch.equal(used, forced)
    expected_weights = torch.softmax((x @ moe.router.weight.T + moe.router.bias).gather(1, forced), -1)
    y_manual = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(expected_weights[t], forced[t].tolist()):
            single = torch.zeros(1, moe.router.top_k, dtype=torch.long) + e
            y_e, _ = moe(x[t : t + 1], single)  # all slots on expert e: output is y_e exactly
            y_manual[t] += w * y_e[0]
    assert rel_err(out, y_manual) <= 1e-5


def test_unrouted_tokens_of_a_replay_take_their_own_experts():
    """A recorded routing with -1 rows (positions the engine never fed) replays the other rows and
    lets the router choose for those: int16 as trajectories store it."""
    moe = random_moe(4, num_local_experts=8)
    x = torch.randn(12, moe.router.weight.shape[1])
    natural_out, natural = moe(x)
    forced = ((natural + 3) % moe.num_experts).to(torch.int16)  # other experts for every token
    unrouted = torch.tensor([1, 4, 5, 11])
    forced[unrouted] = UNROUTED
    out, used = moe(x, forced)
    recorded = torch.ones(12, dtype=torch.bool)
    recorded[unrouted] = False
    assert torch.equal(used[~recorded], natural[~recorded])
    assert torch.equal(used[recorded], forced[recorded].long())
    # (to fp32 round-off: the experts' row groups differ between the calls)
    assert rel_err(out[~recorded], natural_out[~recorded]) <= 1e-6
    expected, _ = moe(x[recorded], forced[recorded])
    assert rel_err(out[recorded], expected) <= 1e-6
    assert (out[recorded] - natural_out[recorded]).abs().amax() > 1e-3  # the replay changed them


def test_sorted_path_multiplies_each_token_by_its_chosen_experts_only():
    """5 tokens x 2 of 8 experts: forward and backward multiply exactly the 10 chosen copies, each
    expert's matmul gets exactly the rows routed to it (computing all experts densely would be 4x)."""
    moe = random_moe(3, num_local_experts=8, num_experts_per_tok=2)
    x = torch.randn(5, moe.router.weight.shape[1], requires_grad=True)
    with MatmulCounter() as forward:
        out, chosen = moe(x)
    with MatmulCounter() as backward:
        out.backward(torch.randn_like(out))
    expected = moe_macs(moe, tokens=5, expert_rows=10)
    assert forward.macs == expected
    assert backward.macs == 2 * expected  # input and weight gradients of each matmul
    counts = torch.bincount(chosen.flatten(), minlength=8).tolist()
    assert 0 in counts, "some expert should be idle for this test to mean anything"
    for rows in forward.group_rows + backward.group_rows:  # empty when grouped_mm is unavailable
        assert rows == counts


@pytest.mark.parametrize("replay", [False, True])
def test_router_weights_are_fp32_in_a_bf16_model(replay):
    """ARCHITECTURE.md invariant 7: the router's softmax stays fp32 when the module is bf16 (its
    weights are rounded once, where they scale the experts' outputs)."""
    moe = random_moe(5, num_local_experts=8).to(torch.bfloat16)
    x = torch.randn(16, moe.router.weight.shape[1], dtype=torch.bfloat16)
    logits = (x.float() @ moe.router.weight.float().T + moe.router.bias.float()).to(torch.bfloat16)
    _, own = torch.topk(logits, moe.router.top_k)
    forced = (own + 1) % moe.num_experts if replay else None
    weights, used = moe.router(x, forced)
    assert weights.dtype == torch.float32
    expected = torch.softmax(logits.float().gather(1, used), dim=-1)  # of the same bf16 logits
    assert (weights - expected).abs().max() <= 1e-6
    assert weights.sum(-1).sub(1).abs().max() <= 1e-6  # a bf16 softmax is ~4e-3 from 1


def test_a_bf16_moe_combines_the_experts_with_fp32_weights():
    """Every expert outputs exactly 1.0 (zero weights, down_proj bias 1): a token's output is then
    the sum of its routing weights, 1 to fp32 round-off, which rounds to exactly 1.0 in bf16 when
    the fp32 weights scale the outputs and the sum is rounded once. With the weights rounded to
    bf16 first (2^-9 each) some tokens' sums land a bf16 step away from 1."""
    moe = random_moe(6, num_local_experts=8, num_experts_per_tok=3).to(torch.bfloat16)
    with torch.no_grad():
        for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj"):
            getattr(moe.experts, name).zero_()
        moe.experts.down_proj_bias.fill_(1.0)
    x = torch.randn(256, moe.router.weight.shape[1], dtype=torch.bfloat16)
    out, _ = moe(x)
    assert (out == 1.0).all(), f"{int((out != 1.0).any(-1).sum())} of 256 tokens off 1.0"
