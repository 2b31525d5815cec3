"""torchrun worker: HF save / load / weight-sync tensors of an expert-parallel model (dp_shard=2 x
ep=2 on 2 CPU ranks, gloo) against the same weights in one process. Exits non-zero on a mismatch.

Expert weights are DTensors sharded over the ep (and expert-FSDP) dims; every other weight over
dp_shard. Saving gathers each tensor (every rank calls), loading keeps each rank's part, and
``hf_tensors`` (the vLLM weight sync) yields whole tensors on every rank."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tests.conftest import randomize_biases, tiny_model
from tests.distributed.worker_checks import check, finish
from titan_rl.checkpoint import hf
from titan_rl.checkpoint.hf import hf_tensors, load_hf_model, load_hf_state_dict_into, save_hf_model
from titan_rl.checkpoint.names import from_hf_name
from titan_rl.parallel import ParallelConfig, ParallelDims, parallelize_gpt_oss
from titan_rl.parallel.expert_parallel import ExpertParallelExperts

DIMS = dict(hidden_size=64, intermediate_size=32)  # MXFP4 blocks of 32 along both expert dims


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def expert_parallel(seed: int, dims: ParallelDims):
    model = parallelize_gpt_oss(randomize_biases(tiny_model(seed, **DIMS), seed + 1), dims, ParallelConfig())
    check(all(isinstance(b.mlp.experts, ExpertParallelExperts) for b in model.layers), "experts not EP")
    return model


def compare(model, expected: dict[str, torch.Tensor], what: str) -> None:
    state = model.state_dict()
    check(set(state) == set(expected), f"{what}: names {sorted(set(state) ^ set(expected))}")
    for name, tensor in state.items():
        check(torch.equal(whole(tensor).detach(), expected[name]), f"{what}: {name} differs")


def main(folder: Path) -> None:
    dist.init_process_group("gloo")
    dims = ParallelDims(dp_replicate=1, dp_shard=2, cp=1, ep=2, world_size=dist.get_world_size())
    dims.build_mesh()
    plain = randomize_biases(tiny_model(3, **DIMS), 4)  # the weights, in one process
    expected = {name: tensor.detach().clone() for name, tensor in plain.state_dict().items()}
    model = expert_parallel(3, dims)
    experts = model.layers[0].mlp.experts.gate_up_proj
    check(experts.to_local().shape[0] < experts.shape[0], f"not sharded: {experts.to_local().shape}")

    # the weight sync's tensors: whole, on every rank, in the dtype asked for
    synced = {from_hf_name(name): tensor for name, tensor in hf_tensors(model, torch.float32)}
    check(set(synced) == set(expected), "hf_tensors names")
    for name, tensor in synced.items():
        check(torch.equal(tensor, expected[name]), f"hf_tensors: {name} differs")
    for name, tensor in hf_tensors(model, torch.bfloat16):
        check(torch.equal(tensor, expected[from_hf_name(name)].bfloat16()), f"hf_tensors bf16: {name}")

    save_hf_model(model, folder / "hf", dtype=torch.float32, max_shard_bytes=20_000)  # several shards
    dist.barrier()
    compare(load_hf_model(folder / "hf"), expected, "one-process load of the EP save")
    fresh = expert_parallel(11, dims)  # other weights, overwritten by the load
    load_hf_state_dict_into(fresh, folder / "hf")
    compare(fresh, expected, "EP load")

    # MXFP4 experts: an EP save and an EP load give what one process reads from that folder
    save_hf_model(model, folder / "mxfp4", mxfp4=True, dtype=torch.float32)
    dist.barrier()
    quantized = {name: t.detach() for name, t in load_hf_model(folder / "mxfp4").state_dict().items()}
    name = "layers.0.mlp.experts.gate_up_proj"
    check(not torch.equal(quantized[name], expected[name]), "MXFP4 did not quantize")
    fresh = expert_parallel(12, dims)
    dequantized = []  # each rank dequantizes only the experts its shard holds
    real, real_get, real_slice = hf.dequantize_mxfp4, hf._ShardReader.get, hf._ShardReader.slice
    read_whole, rows_read = [], {}  # ... and reads only their rows of the MXFP4 tensors

    class Rows:
        def __init__(self, name, inner):
            self.name, self.inner = name, inner

        def get_shape(self):
            return self.inner.get_shape()

        def __getitem__(self, index):
            rows = range(*index.indices(self.inner.get_shape()[0]))  # a range of experts
            rows_read.setdefault(self.name, []).extend(rows)
            return self.inner[index]

    hf.dequantize_mxfp4 = lambda *a, **k: dequantized.append(1) or real(*a, **k)
    hf._ShardReader.get = lambda self, name: read_whole.append(name) or real_get(self, name)
    hf._ShardReader.slice = lambda self, name: Rows(name, real_slice(self, name))
    try:
        load_hf_state_dict_into(fresh, folder / "mxfp4")
    finally:
        hf.dequantize_mxfp4, hf._ShardReader.get, hf._ShardReader.slice = real, real_get, real_slice
    compare(fresh, quantized, "EP load of MXFP4")
    layers, local = len(fresh.layers), fresh.layers[0].mlp.experts.gate_up_proj.to_local().shape[0]
    check(
        len(dequantized) == 2 * layers * local,
        f"{len(dequantized)} experts dequantized, not {2 * layers * local}",
    )
    whole = [name for name in read_whole if name.endswith(("_blocks", "_scales"))]
    check(not whole, f"MXFP4 tensors read whole: {whole[:3]}")
    mine = hf._local_experts(fresh.layers[0].mlp.experts.gate_up_proj)
    check(len(rows_read) == 4 * layers, f"MXFP4 tensors sliced: {sorted(rows_read)}")
    for name, rows in rows_read.items():
        check(rows == mine, f"{name}: rows {rows} read, this rank holds experts {mine}")
    finish(20)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
