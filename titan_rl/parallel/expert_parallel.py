"""Expert parallelism: each rank of an ``ep`` group holds num_local_experts / ep experts per layer.

``MoE.forward`` (unchanged) routes with its replicated router, sorts the token copies by expert and
calls ``self.experts(x_sorted, experts_sorted, counts)``. ``apply_expert_parallel`` replaces each
``block.mlp.experts`` by an ``ExpertParallelExperts`` with that same call signature:

    dispatch: all_to_all the sorted rows to the ranks owning their experts (uneven splits)
    compute:  this rank's experts on the rows it received, with the unchanged ``Experts`` math
    combine:  all_to_all the results back, in the caller's row order

Both all_to_alls have autograd (their backward is the reverse all_to_all), so gradients of the
router, the attention below and the local experts are those of the single-process model.

The expert parameters keep their names (``layers.0.mlp.experts.gate_up_proj``) and become
DTensors ``Shard(0)`` over the ep mesh: their global shape is unchanged, so state dicts and
``full_tensor()`` see the whole ``[num_experts, ...]`` tensor, while each rank stores and computes
only its own experts. FSDP later shards them further over the efsdp mesh.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.func import functional_call

from titan_rl.model.linear import widens
from titan_rl.model.model import GptOss
from titan_rl.model.moe import Experts


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class _AllToAll(torch.autograd.Function):
    """Rows ``x [sum(send_splits), D]`` -> ``[sum(recv_splits), D]``; backward is the reverse exchange.
    With ``wire_dtype`` the rows travel rounded to it (and arrive in ``x``'s dtype); their gradient
    travels in its own dtype."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, wire_dtype=None):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        sent = x if wire_dtype is None else x.to(wire_dtype)
        out = sent.new_empty(sum(recv_splits), *x.shape[1:])
        dist.all_to_all_single(out, sent.contiguous(), recv_splits, send_splits, group=group)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), recv_splits, send_splits, ctx.group), None, None, None, None


def all_to_all(
    x: torch.Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group: dist.ProcessGroup,
    wire_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Send ``send_splits[r]`` consecutive rows of ``x`` to rank ``r``; receive ``recv_splits[r]`` from
    it. ``wire_dtype``: the rows (not their gradient) travel rounded to it."""
    return _AllToAll.apply(x, send_splits, recv_splits, group, wire_dtype)


class ExpertParallelExperts(nn.Module):
    """Drop-in for ``moe.Experts`` holding experts ``[r * E/ep, (r+1) * E/ep)`` on ep rank ``r``."""

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh) -> None:
        super().__init__()
        self.ep_size = ep_mesh.size()
        self.num_experts = experts.gate_up_proj.shape[0]
        if self.num_experts % self.ep_size:
            raise ValueError(
                f"parallelism.ep = {self.ep_size} must divide num_local_experts = {self.num_experts}"
            )
        self.experts_per_rank = self.num_experts // self.ep_size
        self.ep_group = ep_mesh.get_group()
        rank = ep_mesh.get_local_rank()
        first = rank * self.experts_per_rank
        for name, param in experts.named_parameters(recurse=False):
            # every rank built the same full tensor: keep our slice, no communication
            local = param.detach()[first : first + self.experts_per_rank].clone()
            shard = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            self.register_parameter(name, nn.Parameter(shard, requires_grad=param.requires_grad))
        # The unchanged ``Experts`` math runs on the original module, moved to the meta device (its
        # full tensors are freed), with this rank's local tensors swapped in by ``functional_call``.
        self._math = [experts.to("meta")]  # in a list: not a submodule, so no duplicate parameters

    def extra_repr(self) -> str:
        return f"{self.experts_per_rank} of {self.num_experts} experts per rank, ep={self.ep_size}"

    def forward(
        self, x_sorted: torch.Tensor, experts_sorted: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """Rows of ``x_sorted [M, hidden]`` grouped by global expert (``counts [E]``) -> ``[M, hidden]``."""
        del experts_sorted  # recomputed for the local experts from the exchanged counts
        ep, per_rank = self.ep_size, self.experts_per_rank
        send_counts = counts.view(ep, per_rank)  # [dest rank, its local expert]
        recv_counts = torch.empty_like(send_counts)  # [source rank, my local expert]
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.ep_group)
        send_splits, recv_splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # one sync

        params = {name: _local(p) for name, p in self.named_parameters()}
        # [rows received, hidden], ordered by (source rank, local expert). fp32 activations over bf16
        # experts (model.activation_dtype) travel in bf16, half the bytes: the experts' GEMM rounds
        # them to that anyway. Their gradient is fp32 (that GEMM's input gradient) and travels so
        experts = params["gate_up_proj"]
        wire = experts.dtype if widens(x_sorted, experts) else None
        x_recv = all_to_all(x_sorted, send_splits, recv_splits, self.ep_group, wire)
        block_expert = torch.arange(per_rank, device=counts.device).repeat(ep)  # expert of block (s, e)
        row_expert = block_expert.repeat_interleave(recv_counts.flatten())
        order = torch.argsort(row_expert, stable=True)  # regroup the rows by local expert
        local_counts = recv_counts.sum(0)
        y_local = functional_call(
            self._math[0],
            params,
            (x_recv.index_select(0, order), row_expert.index_select(0, order), local_counts),
        )
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y_recv = y_local.index_select(0, inverse)  # back to (source rank, local expert) order

        return all_to_all(y_recv, recv_splits, send_splits, self.ep_group)


def apply_expert_parallel(model: GptOss, ep_mesh: DeviceMesh) -> None:
    """Replace every ``block.mlp.experts`` by an ``ExpertParallelExperts`` over ``ep_mesh``."""
    for block in model.layers:
        experts = block.mlp.experts
        if isinstance(experts, ExpertParallelExperts):
            raise RuntimeError("expert parallelism is already applied to this model")
        block.mlp.experts = ExpertParallelExperts(experts, ep_mesh)
