"""The parallel layout of a run: its degrees, their validation, and the DeviceMesh they build.

World ranks are laid out as ``(dp_replicate, dp_shard, cp)``, cp fastest. Named meshes
(``parallel_dims.get_mesh(name)`` after ``build_mesh()``):

  dp_replicate  HSDP replicas; gradients are all-reduced across them
  dp_shard      FSDP shards within one replica
  cp            context parallelism: ranks holding pieces of the same sequences
  dp            dp_replicate x dp_shard: ranks that read different rows of the batch
  dp_shard_cp   dp_shard x cp: FSDP shards the non-expert parameters over these
  dp_cp         every rank with distinct tokens: reduce the loss and token counts over it
  ep            the dp_shard_cp ranks cut into groups of ``ep`` consecutive ranks; each rank of a
                group holds num_local_experts / ep experts of every layer
  efsdp         the dp_shard_cp / ep ranks that hold the same experts; FSDP shards expert params over them

``fsdp_mesh`` and ``expert_fsdp_mesh`` are what ``fully_shard`` gets: 1-D, or 2-D with a leading
``dp_replicate`` dimension (HSDP) when dp_replicate > 1.

Every check runs in ``__post_init__`` / ``validate_model``, before any process group exists, and
names the setting to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from titan_rl.model.args import GptOssModelArgs

if TYPE_CHECKING:
    from titan_rl.config.job_config import Parallelism

CP_MODES = ("ulysses", "ring")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ParallelDims:
    """Degrees of data, context and expert parallelism; ``ep`` is borrowed from dp_shard x cp."""

    dp_replicate: int
    """HSDP replicas (outer data-parallel dimension)."""
    dp_shard: int
    """FSDP shards per replica."""
    cp: int
    """Context-parallel degree (sequence sharding)."""
    ep: int
    """Expert-parallel degree; must divide dp_shard x cp and the number of experts."""
    world_size: int
    """Number of processes; must equal dp_replicate x dp_shard x cp."""
    cp_mode: str = "ulysses"
    """Context parallelism flavour: ``ulysses`` (all-to-all over heads) or ``ring``."""
    device_type: str = ""
    """``cuda`` (NCCL) or ``cpu`` (gloo); empty picks cuda when available."""
    _meshes: dict[str, DeviceMesh] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.device_type:
            self.device_type = "cuda" if torch.cuda.is_available() else "cpu"
        for name in ("dp_replicate", "dp_shard", "cp", "ep", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallelism.{name} = {value!r} must be an integer >= 1")
        mesh = self.dp_replicate * self.dp_shard * self.cp
        if mesh != self.world_size:
            other = self.dp_replicate * self.cp
            fix = (
                f"set parallelism.dp_shard = {self.world_size // other}"
                if self.world_size % other == 0
                else f"launch {mesh} processes"
            )
            raise ValueError(
                f"mesh dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x cp={self.cp} = {mesh} "
                f"!= world size {self.world_size}; {fix}"
            )
        shard_cp = self.dp_shard * self.cp
        if shard_cp % self.ep:
            raise ValueError(
                f"parallelism.ep = {self.ep} must divide dp_shard x cp = {self.dp_shard} x {self.cp} = "
                f"{shard_cp} (expert-parallel ranks are borrowed from them); set parallelism.ep to one of "
                f"{_divisors(shard_cp)}"
            )
        if self.cp_mode not in CP_MODES:
            raise ValueError(f"parallelism.cp_mode = {self.cp_mode!r} is not one of {', '.join(CP_MODES)}")
        if self.device_type not in ("cpu", "cuda"):
            raise ValueError(f"device_type = {self.device_type!r}; use 'cpu' (gloo) or 'cuda' (NCCL)")

    @classmethod
    def from_config(cls, parallelism: Parallelism, world_size: int) -> ParallelDims:
        """From a ``JobConfig.parallelism`` section."""
        return cls(
            dp_replicate=parallelism.dp_replicate,
            dp_shard=parallelism.dp_shard,
            cp=parallelism.cp,
            ep=parallelism.ep,
            world_size=world_size,
            cp_mode=parallelism.cp_mode,
        )

    def validate_model(self, args: GptOssModelArgs) -> None:
        """Checks that depend on the model: experts split over ep, heads over Ulysses cp."""
        experts = args.num_local_experts
        if experts % self.ep:
            valid = [d for d in _divisors(experts) if (self.dp_shard * self.cp) % d == 0]
            raise ValueError(
                f"parallelism.ep = {self.ep} must divide the model's num_local_experts = {experts}; "
                f"set parallelism.ep to one of {valid}"
            )
        heads = args.num_attention_heads
        if self.cp > 1 and self.cp_mode == "ulysses" and heads % self.cp:
            raise ValueError(
                f"parallelism.cp = {self.cp} with cp_mode = 'ulysses' must divide num_attention_heads = "
                f"{heads}; set parallelism.cp to a divisor of {heads} or parallelism.cp_mode = 'ring'"
            )

    # degrees and switches
    @property
    def dp(self) -> int:
        """Ranks that read different rows of the batch (dp_replicate x dp_shard)."""
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        """Ranks of one replica holding the same experts: dp_shard x cp / ep."""
        return self.dp_shard * self.cp // self.ep

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def fsdp_enabled(self) -> bool:
        """Parameters are sharded (dp_shard x cp > 1)."""
        return self.dp_shard * self.cp > 1

    @property
    def distributed(self) -> bool:
        """More than one process: parameters go through FSDP (sharded, replicated or both)."""
        return self.world_size > 1

    # meshes
    def build_mesh(self) -> DeviceMesh:
        """Create every named mesh (a collective: all ranks call it); returns the world mesh."""
        if self._meshes:
            return self._meshes["world"]
        if self.device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if self.world_size == 1 and not torch.distributed.is_initialized():
            # one process: FSDP2 mixed precision on one device still needs a (one-rank) mesh
            torch.distributed.init_process_group(
                "nccl" if self.device_type == "cuda" else "gloo",
                store=torch.distributed.HashStore(),
                rank=0,
                world_size=1,
            )
        world = init_device_mesh(
            self.device_type,
            (self.dp_replicate, self.dp_shard, self.cp),
            mesh_dim_names=("dp_replicate", "dp_shard", "cp"),
        )
        meshes = {name: world[name] for name in ("dp_replicate", "dp_shard", "cp")}
        meshes["world"] = world
        meshes["dp"] = world["dp_replicate", "dp_shard"]._flatten("dp")
        meshes["dp_shard_cp"] = world["dp_shard", "cp"]._flatten("dp_shard_cp")
        meshes["dp_cp"] = world._flatten("dp_cp")
        # (dp_replicate, dp_shard_cp) and its split (dp_replicate, efsdp, ep): views of the same ranks
        dense = meshes["dp_cp"]._unflatten(
            0, (self.dp_replicate, self.dp_shard * self.cp), ("dp_replicate", "dp_shard_cp")
        )
        sparse = dense._unflatten(1, (self.efsdp, self.ep), ("efsdp", "ep"))
        meshes["ep"], meshes["efsdp"] = sparse["ep"], sparse["efsdp"]
        hsdp = self.dp_replicate_enabled
        meshes["fsdp"] = dense if hsdp else meshes["dp_shard_cp"]
        meshes["expert_fsdp"] = sparse["dp_replicate", "efsdp"] if hsdp else sparse["efsdp"]
        self._meshes = meshes
        return world

    def get_mesh(self, name: str) -> DeviceMesh:
        """A named mesh (see the module docstring); ``build_mesh()`` must have run."""
        if not self._meshes:
            raise RuntimeError("call parallel_dims.build_mesh() (on every rank) before asking for meshes")
        if name not in self._meshes:
            raise KeyError(f"no mesh named {name!r}; choose one of {sorted(self._meshes)}")
        return self._meshes[name]

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """Mesh for non-expert parameters: dp_shard_cp, or (dp_replicate, dp_shard_cp) for HSDP."""
        return self.get_mesh("fsdp")

    @property
    def expert_fsdp_mesh(self) -> DeviceMesh:
        """Mesh for expert parameters: efsdp, or (dp_replicate, efsdp) for HSDP."""
        return self.get_mesh("expert_fsdp")
