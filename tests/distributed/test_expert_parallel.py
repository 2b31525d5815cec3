"""Expert parallelism on one process (an ep group of 1): the local experts multiply only the rows
routed to them, and the results equal the unparallelized MoE. Several ranks: test_parallel_layouts."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from tests.conftest import MatmulCounter, moe_macs, tiny_args
from tests.distributed.launcher import free_port
from titan_rl.model.moe import MoE
from titan_rl.parallel.expert_parallel import ExpertParallelExperts


@pytest.fixture
def ep_mesh():
    """A one-rank gloo group and ``ep`` mesh, torn down after the test."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("ep",))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_expert_parallel_experts_multiply_only_their_routed_rows(ep_mesh):
    torch.manual_seed(3)
    moe = MoE(tiny_args(num_local_experts=8, num_experts_per_tok=2))
    moe.init_weights(std=0.5)
    x = torch.randn(5, moe.router.weight.shape[1], requires_grad=True)  # 10 copies, some experts idle
    grad = torch.randn_like(x)
    reference, _ = moe(x)
    moe.experts = ExpertParallelExperts(moe.experts, ep_mesh)
    with MatmulCounter() as forward:
        out, chosen = moe(x)
    with MatmulCounter() as backward:
        out.backward(grad)
    assert torch.equal(out, reference)
    expected = moe_macs(moe, tokens=5, expert_rows=10)
    assert forward.macs == expected and backward.macs == 2 * expected
    counts = torch.bincount(chosen.flatten(), minlength=8).tolist()
    assert 0 in counts
    for rows in forward.group_rows + backward.group_rows:
        assert rows == counts
