"""Parallelism for GPT-OSS, applied to an unmodified model (see ``parallelize.py``)."""

from titan_rl.parallel.fsdp import clip_grad_norm_
from titan_rl.parallel.parallel_dims import ParallelDims
from titan_rl.parallel.parallelize import ParallelConfig, parallelize_gpt_oss

__all__ = ["ParallelConfig", "ParallelDims", "clip_grad_norm_", "parallelize_gpt_oss"]
