"""Mixture of experts: top-k router and experts run as grouped matmuls over expert-sorted tokens.

No path computes every expert for every token or copies the hidden states once per expert: each
token is gathered once per *chosen* expert (top_k copies), the copies are sorted by expert, and
each expert multiplies its contiguous slice. ``train()`` and ``eval()``, training and decoding,
run the same code, except that the rollout engine's eager decode on the CPU (fp32) multiplies a few
rows per expert by transposed copies of the weights (``cpu_decode_experts``: CPU BLAS streams them
twice as fast in that form; the same products summed in another order). (A padded
``[experts, capacity]`` batched matmul of the weights as stored was dropped: slower than torch
2.14's CPU ``_grouped_mm`` at every batch size measured, 1 to 64 tokens; benchmarks/README.md.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from titan_rl.model.args import GptOssModelArgs
from titan_rl.model.grouped_gemm import MOST_DECODE_ROWS, grouped_mm, small_grouped_mm
from titan_rl.model.linear import linear


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm needs strides)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


UNROUTED = -1  # a recorded routing's "nothing recorded here": the router chooses on its own


class Router(nn.Module):
    """``logits = x W^T + b``; top-k on the logits; weights = softmax over the k chosen logits, in
    fp32 whatever the activation dtype (ARCHITECTURE.md invariant 7; ``MoE`` combines the experts'
    outputs with them in fp32 and rounds the sum once)."""

    def __init__(self, args: GptOssModelArgs) -> None:
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(args.num_local_experts, args.hidden_size))
        self.bias = nn.Parameter(torch.empty(args.num_local_experts))

    def forward(
        self, x: torch.Tensor, expert_indices: torch.Tensor | None = None, return_logits: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """x ``[N, hidden]`` -> (weights ``[N, k]``, expert_indices ``[N, k]``), and the logits over
        every expert ``[N, experts]`` with ``return_logits`` (for a load-balancing loss).

        With ``expert_indices`` given (routing replay) those experts are used and their weights
        are recomputed from the current logits, so the router still trains. A token whose recorded
        experts are -1 (``UNROUTED``: nothing recorded there, e.g. a position the rollout engine never
        fed through the model) takes its own top-k.
        """
        logits = linear(x, self.weight, self.bias)  # [N, experts]
        chosen_logits, own = torch.topk(logits, self.top_k, dim=-1)
        if expert_indices is None:
            weights, expert_indices = torch.softmax(chosen_logits, dim=-1, dtype=torch.float32), own
        else:  # elementwise, no host read of which tokens are recorded (a token's k are all -1 or none)
            expert_indices = torch.where(expert_indices < 0, own, expert_indices.to(own.dtype))
            weights = torch.softmax(logits.gather(-1, expert_indices), dim=-1, dtype=torch.float32)
        return (weights, expert_indices, logits) if return_logits else (weights, expert_indices)


class Experts(nn.Module):
    """E clamped-SwiGLU experts in HF layout: interleaved ``gate_up_proj [E, hidden, 2I]``."""

    def __init__(self, args: GptOssModelArgs) -> None:
        super().__init__()
        e, h, i = args.num_local_experts, args.hidden_size, args.intermediate_size
        self.limit = args.swiglu_limit
        self.alpha = args.swiglu_alpha
        self.gate_up_proj = nn.Parameter(torch.empty(e, h, 2 * i))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(e, 2 * i))
        self.down_proj = nn.Parameter(torch.empty(e, i, h))
        self.down_proj_bias = nn.Parameter(torch.empty(e, h))
        # transposed copies of the two weights while the rollout engine decodes on the CPU
        # (``cpu_decode_experts``); None otherwise
        self.decode_copies: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(
        self, x_sorted: torch.Tensor, experts_sorted: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """Rows of ``x_sorted [M, hidden]`` grouped by expert (``counts [E]``) -> ``[M, hidden]``."""
        small = (
            self.decode_copies is not None
            and not torch.is_grad_enabled()
            and x_sorted.shape[0] <= MOST_DECODE_ROWS * counts.shape[0]
        )
        if small:
            gate_up_t, down_t = self.decode_copies
            gate_up = small_grouped_mm(x_sorted, self.gate_up_proj, gate_up_t, counts)
        else:
            gate_up = grouped_mm(x_sorted, self.gate_up_proj, counts)
        gate_up = gate_up + self.gate_up_proj_bias.index_select(0, experts_sorted)
        hidden = _ContiguousGrad.apply(self._clamped_swiglu(gate_up))
        if small:
            down = small_grouped_mm(hidden, self.down_proj, down_t, counts)
        else:
            down = grouped_mm(hidden, self.down_proj, counts)
        return down + self.down_proj_bias.index_select(0, experts_sorted)

    def _clamped_swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """Interleaved ``[..., 2I]`` -> ``[..., I]``: ``gate * sigmoid(alpha * gate) * (up + 1)``, clamped."""
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return gate * torch.sigmoid(self.alpha * gate) * (up + 1)


@contextlib.contextmanager
def cpu_decode_experts(model: nn.Module) -> Iterator[None]:
    """While generating on the CPU in fp32: every ``Experts`` holds contiguous transposed copies of
    its weights, and its no-grad forwards of a few rows per expert (decode steps) multiply with them
    (``small_grouped_mm``). Made once per call from the weights as they are (gathered under FSDP);
    the copies double the experts' memory for the call. Anywhere else a no-op."""
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    usable = [
        m
        for m in experts
        if type(m.gate_up_proj.data) is torch.Tensor  # (not a DTensor shard)
        and m.gate_up_proj.device.type == "cpu"
        and m.gate_up_proj.dtype == torch.float32
    ]
    try:
        with torch.no_grad():
            for m in usable:
                m.decode_copies = (
                    m.gate_up_proj.transpose(1, 2).contiguous(),
                    m.down_proj.transpose(1, 2).contiguous(),
                )
        yield
    finally:
        for m in usable:
            m.decode_copies = None


class MoE(nn.Module):
    """Router + experts. Returns the output and the expert indices it used."""

    def __init__(self, args: GptOssModelArgs) -> None:
        super().__init__()
        self.num_experts = args.num_local_experts
        self.router = Router(args)
        self.experts = Experts(args)

    def forward(
        self, x: torch.Tensor, expert_indices: torch.Tensor | None = None, return_router_logits: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """x ``[..., hidden]``; ``expert_indices [..., k]`` forces the routing (replay). Returns the
        output and the experts used ``[..., k]``, and with ``return_router_logits`` the router's
        logits ``[..., experts]``."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, hidden]
        forced = None if expert_indices is None else expert_indices.reshape(x.shape[0], -1)
        weights, expert_indices, *logits = self.router(x, forced, return_logits=return_router_logits)
        top_k = expert_indices.shape[-1]
        flat_experts = expert_indices.reshape(-1)  # [N * k]
        # (bincount would size its output from the largest id: a host sync on CUDA)
        counts = flat_experts.new_zeros(self.num_experts).index_add_(
            0, flat_experts, torch.ones_like(flat_experts)
        )
        order = torch.argsort(flat_experts, stable=True)
        # index_select, not x[idx]: its backward is index_add, far faster than index_put on CPU
        x_sorted = x.index_select(0, order // top_k)  # [N * k, hidden]: a token once per chosen expert
        y_sorted = self.experts(x_sorted, flat_experts.index_select(0, order), counts)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y = y_sorted.index_select(0, inverse)  # back to (token, slot) order: a gather, no atomics
        # fp32 weights times the experts' outputs, summed in fp32, rounded once (a bf16 model keeps
        # only y and the weights for the backward; the fp32 product is a temporary)
        out = (y.view(-1, top_k, shape[-1]) * weights[..., None]).sum(dim=1).to(y.dtype)
        out, expert_indices = out.view(shape), expert_indices.view(*shape[:-1], top_k)
        if return_router_logits:
            return out, expert_indices, logits[0].view(*shape[:-1], -1)
        return out, expert_indices

    def init_weights(self, std: float) -> None:
        for p in (self.router.weight, self.router.bias, *self.experts.parameters()):
            nn.init.normal_(p, std=std)
