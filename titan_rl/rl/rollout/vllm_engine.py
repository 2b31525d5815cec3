"""The vLLM rollout engine: colocated vLLM sampling with in-place weight sync from the trainer.

Needs CUDA and vLLM >= 0.10.2 (``pip install -e '.[gpu]'``). vLLM is imported inside
``VllmEngine`` only, so importing titan_rl (or this module) never imports it.

- **Where vLLM runs.** In the trainer's own process(es): ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps
  vLLM's engine core in this process, so weights are handed over by reference. One process: a plain
  ``LLM``. Under torchrun every rank builds one with ``distributed_executor_backend=
  "external_launcher"``; each run of ``vllm_tensor_parallel_size`` consecutive ranks is one vLLM
  replica (vLLM: vllm/v1/executor/uniproc_executor.py, ``ExecutorWithExternalLauncher``, and
  examples/offline_inference/torchrun_example.py). Replicas split the prompts; the results are
  all-gathered so that every rank returns the same completions (the trainer needs that).
- **Weights.** ``from_config`` writes only ``config.json`` (bf16, no MXFP4) to
  ``<job.dump_folder>/vllm_init``; vLLM starts from dummy weights (``load_format="dummy"``) and the
  trainer's weights are copied in before the first ``generate`` (then after every optimizer step).
  No weight goes through disk, and ``model.hf_path`` may be empty or a released MXFP4 folder.
- **Sync.** ``titan_rl.checkpoint.hf.hf_tensors`` yields ``(HF name, whole bf16 tensor)`` exactly as
  ``save_hf_model`` writes them (FSDP / EP shards gathered: every rank joins; each shard is cast to
  bf16 before the gather, so the collectives move half the bytes of fp32); each vLLM worker then
  keeps its tensor-parallel slice via vLLM's own ``GptOssForCausalLM.load_weights``, which maps HF
  names (vllm/model_executor/models/gpt_oss.py, ``hf_to_vllm_mapper``: ``.self_attn.`` -> ``.attn.``,
  ``embed_tokens`` -> ``embedding``, ``gate_up_proj`` -> ``w13_weight``, ...) and, for bf16 weights,
  reads the HF layouts: interleaved ``gate_up_proj [E, H, 2I]`` narrowed on the ``2I`` dim, ``sinks``
  narrowed by heads (``GptOssModel._load_weights_other``). Then ``process_weights_after_loading``,
  as vLLM's own colocated example does (examples/offline_inference/rlhf_utils.py,
  ``ColocateWorkerExtension.update_weights_from_ipc``), and the prefix cache is reset.
- **Sleep.** With ``vllm_sleep``, ``LLM(enable_sleep_mode=True)``; ``sleep()`` frees the KV cache
  and the weights. An engine that has the trainer's module to copy from (``train.py``'s) sleeps at
  level 2: the weights are dropped, not offloaded, since the sync after the optimizer step
  overwrites them anyway (level 1 would copy them to pinned host RAM and back each step: a whole
  bf16 model per rank, 8 per node). One without (``model=None``: the folder's weights) sleeps at
  level 1, which keeps them in host RAM (vllm/entrypoints/llm.py, ``LLM.sleep``: level 2 is the
  one for updating the weights afterwards). ``update_weights`` wakes only the weights
  (``wake_up(tags=["weights"])``), ``wake_up`` (the trainer's, before its rollouts; ``generate``
  calls it too) copies them first if they were dropped, then wakes the rest.
- **RNG state.** None (``rng_state``): vLLM draws its samples inside its sampler (from which
  generator depends on the version and the sampling kernel) and ``LLM`` has no call to read or
  restore that state; its batch-dependent kernels would not replay a run bitwise anyway. A resumed
  run therefore samples afresh from the restored weights: on-policy, but not a replay.
- **Log-probs.** ``logprobs_mode="processed_logprobs"`` with ``logprobs=0``: the sampled token's
  log-prob after temperature *and* top-k / top-p masking (vllm/v1/sample/sampler.py, ``Sampler``;
  vllm/v1/sample/ops/topk_topp_sampler.py, ``forward_native``). With top_k = 0 and top_p = 1 (the
  defaults) that is exactly the trainer's tempered log-prob; with masking it is the log-prob of the
  truncated distribution actually sampled from (the native engine reports the unmasked one). Greedy
  (top_k = 1) runs as vLLM temperature 0, whose log-probs are untempered.
- **Routing.** With ``record_routing`` (``rl.rollout_routing_replay``), ``LLM(
  enable_return_routed_experts=True)``: vLLM records the experts every MoE layer chose for each token
  it ran and returns them as ``CompletionOutput.routed_experts`` (int16 ``[prompt + completion - 1,
  layers, top_k]``; vllm/outputs.py, vLLM pull request 28284 "Support recording expert indices for
  rollout router replay"), the layout of ``Completion.routing``. Releases without the option refuse
  it at construction; a model whose MoE kernels do not record returns None, which ``generate``
  reports. Checked here against a stand-in of vLLM only, not a real vLLM.
- **Batch invariance.** ``vllm_batch_invariant`` (vLLM >= 0.12; earlier releases have no such
  kernels and are refused) sets ``VLLM_BATCH_INVARIANT=1`` before vLLM starts
  (read by ``vllm_is_batch_invariant`` in vllm/model_executor/layers/batch_invariant.py; applied by
  ``init_batch_invariance`` at worker start). In this colocated process that is process-wide: vLLM
  replaces the CUDA kernels of ``aten::mm/addmm/bmm/matmul/linear/softmax/log_softmax/mean`` (the
  trainer's too), disables TF32, forces its FLASH_ATTN backend and sets NCCL determinism variables
  (one channel, tree all-reduce) that also slow the trainer's collectives created afterwards.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from titan_rl.checkpoint.hf import hf_tensors, write_hf_config
from titan_rl.rl.rollout.native import Completion
from titan_rl.rl.rollout.sampling import SamplingParams
from titan_rl.rl.shared import ranks

if TYPE_CHECKING:
    from titan_rl.config import JobConfig

MIN_VLLM = (0, 10, 2)  # first release with logprobs_mode ("processed_logprobs")
BATCH_INVARIANT_VLLM = (0, 12, 0)  # first with vllm/model_executor/layers/batch_invariant.py
INSTALL_HINT = "pip install -e '.[gpu]'"
INIT_FOLDER = "vllm_init"  # under job.dump_folder: config.json only
TAGS = ("weights", "kv_cache")  # vLLM's sleep-mode memory pools
# vLLM environment variables choosing MoE kernels whose process_weights_after_loading replaces the
# expert tensors with repacked copies (vllm/model_executor/layers/fused_moe/
# unquantized_fused_moe_method.py, 0.11-0.12): FlashInfer's bf16 MoE and ROCm's AITER kernels
REPACKING_MOE_KERNELS = ("VLLM_USE_FLASHINFER_MOE_FP16", "VLLM_ROCM_USE_AITER")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


class VllmUnavailable(RuntimeError):
    """vLLM cannot run here (not installed, too old, no CUDA): a setup problem, not a bug."""


def import_vllm() -> ModuleType:
    """``vllm``, or a VllmUnavailable error that says what to install / that CUDA is needed.

    Sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` first: vLLM's engine core then runs in this process
    (required by ``external_launcher``, and what lets weights be passed by reference).
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ImportError as e:
        raise VllmUnavailable(
            f"rollout.engine = 'vllm' needs vLLM, which cannot be imported here ({e}); "
            f"install it with: {INSTALL_HINT} (or use rollout.engine = 'native')"
        ) from e
    version = str(getattr(vllm, "__version__", ""))
    if "dev" not in version and () < _version(version) < MIN_VLLM:
        raise VllmUnavailable(
            f"vLLM {version} is too old for rollout.engine = 'vllm' (needs >= "
            f"{'.'.join(map(str, MIN_VLLM))} for logprobs_mode); upgrade with: {INSTALL_HINT}"
        )
    if not torch.cuda.is_available():
        raise VllmUnavailable(
            "rollout.engine = 'vllm' needs CUDA, but torch.cuda.is_available() is False; "
            "on CPU use rollout.engine = 'native'"
        )
    return vllm


def replica_count(world_size: int, tensor_parallel_size: int) -> int:
    """vLLM replicas in a job of ``world_size`` colocated processes (one vLLM worker per process)."""
    tp = tensor_parallel_size
    if tp < 1:
        raise ValueError(f"rollout.vllm_tensor_parallel_size = {tp} must be >= 1")
    if world_size == 1 and tp > 1:
        raise ValueError(
            f"rollout.vllm_tensor_parallel_size = {tp} needs {tp} processes (one vLLM worker per "
            f"trainer process and GPU): launch with NPROC={tp}, or set it to 1"
        )
    if world_size % tp:
        raise ValueError(
            f"rollout.vllm_tensor_parallel_size = {tp} must divide the number of processes "
            f"{world_size}; use a divisor of {world_size}"
        )
    return world_size // tp


def replica_slice(num_prompts: int, replicas: int, replica: int) -> slice:
    """Replica ``replica``'s contiguous share of the prompts (a prompt's copies mostly share a replica,
    and with it the prefix cache)."""
    per = -(-num_prompts // replicas)
    return slice(min(replica * per, num_prompts), min((replica + 1) * per, num_prompts))


def vllm_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for ``params``: token ids in and out.

    ``ignore_eos``: only ``params.stop_token_ids`` end a completion, as in the native engine.
    ``logprobs=0``: the sampled token's log-prob only. top_k = 1 (greedy) is vLLM temperature 0.
    """
    greedy = params.top_k == 1
    return {
        "n": 1,
        "temperature": 0.0 if greedy else params.temperature,
        "top_p": 1.0 if greedy else params.top_p,
        "top_k": -1 if greedy or params.top_k <= 0 else params.top_k,  # -1: all tokens, every version
        "max_tokens": params.max_new_tokens,
        "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": True,
        "logprobs": 0,
        "detokenize": False,
    }


def completion_from_output(output: Any, routed_prompt_len: int | None = None) -> Completion:
    """A vLLM ``CompletionOutput`` (``token_ids``, ``logprobs``, ``finish_reason``) as a ``Completion``.

    A stop token is part of ``token_ids`` (vLLM keeps ``stop_token_ids`` in the output). With
    ``routed_prompt_len`` (the prompt's length) its ``routed_experts`` become ``Completion.routing``.
    """
    tokens = [int(t) for t in output.token_ids]
    steps = output.logprobs
    if steps is None or len(steps) != len(tokens):
        got = "none" if steps is None else len(steps)
        raise RuntimeError(
            f"vLLM returned {got} log-prob entries for {len(tokens)} tokens; expected one each"
        )
    try:
        logprobs = [float(step[token].logprob) for token, step in zip(tokens, steps)]
    except KeyError as e:
        raise RuntimeError(f"vLLM returned no log-prob for sampled token {e}") from e
    routing = None
    if routed_prompt_len is not None and tokens:
        routing = routing_from_output(output, routed_prompt_len + len(tokens) - 1)
    if output.finish_reason not in ("stop", "length"):  # e.g. "abort", "error": not a completion
        raise RuntimeError(
            f"vLLM ended a request with finish_reason {output.finish_reason!r} after {len(tokens)} "
            "tokens, not 'stop' or 'length': its completion is not a sample to train on"
        )
    return Completion(tokens, logprobs, output.finish_reason, routing)


def routing_from_output(output: Any, positions: int) -> torch.Tensor:
    """``output.routed_experts`` for the first ``positions`` tokens (prompt + completion[:-1]), int16
    ``[positions, layers, top_k]``. Releases differ on whether a row for the last token follows; it
    decided nothing that was kept, so it is dropped."""
    recorded = getattr(output, "routed_experts", None)
    if recorded is None:
        raise RuntimeError(
            "vLLM returned no routed_experts although enable_return_routed_experts is on: this "
            "model's MoE kernels in this vLLM do not record routing; set rl.rollout_routing_replay = false"
        )
    routing = torch.as_tensor(recorded)
    if routing.dim() != 3 or routing.shape[0] < positions:
        raise RuntimeError(
            f"vLLM's routed_experts has shape {tuple(routing.shape)}; expected [{positions} (prompt + "
            f"completion - 1), layers, top_k]"
        )
    return routing[:positions].to(torch.int16)


# The two functions below run inside vLLM's worker (in this process) through ``LLM.collective_rpc``,
# which calls ``fn(worker, *args)`` (vllm/v1/serial_utils.py, ``run_method``).


def _load_weights(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    worker.model_runner.model.load_weights(weights=weights)


def _finish_loading(worker: Any) -> None:
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    process_weights_after_loading(worker.model_runner.model, worker.model_config, worker.device)


class VllmEngine:
    """Samples with a colocated vLLM engine; ``update_weights`` copies the trainer's weights in place.

    ``folder`` is a HF folder with ``config.json`` (weights only for ``load_format != "dummy"``).
    ``model`` is the trainer's module: its weights are copied in before the first ``generate``;
    ``None`` keeps the folder's weights until ``update_weights``. Every rank of a torchrun job must
    construct the engine and call ``generate`` / ``update_weights`` / ``sleep`` together.
    """

    def __init__(
        self,
        model: nn.Module | None,
        folder: str | Path,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.4,
        max_model_len: int = 4096,
        seed: int = 0,
        sleep: bool = True,
        batch_invariant: bool = False,
        load_format: str = "dummy",
        record_routing: bool = False,
    ) -> None:
        for variable in REPACKING_MOE_KERNELS:
            if os.environ.get(variable, "0").lower() in ("1", "true"):  # vLLM's own reading
                raise VllmUnavailable(
                    f"{variable} is set: that MoE kernel repacks the experts into new tensors after "
                    "every weight load, outside sleep mode's memory pool and behind captured CUDA "
                    "graphs, so in-place weight syncs would not reach it; unset it for rollouts"
                )
        if batch_invariant:
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
        vllm = import_vllm()
        version = str(getattr(vllm, "__version__", ""))
        if batch_invariant and "dev" not in version and _version(version) < BATCH_INVARIANT_VLLM:
            raise VllmUnavailable(
                f"rollout.vllm_batch_invariant needs vLLM >= 0.12 (vLLM {version} has no batch-"
                f"invariant kernels: VLLM_BATCH_INVARIANT would do nothing); upgrade with: {INSTALL_HINT}"
            )
        world_size, rank = ranks()
        self.replicas = replica_count(world_size, tensor_parallel_size)
        self.replica, self.tp_rank = divmod(rank, tensor_parallel_size)
        self.world_size = world_size
        self.model = model
        self.max_model_len = max_model_len
        self.sleep_enabled = sleep
        self.record_routing = record_routing
        kwargs: dict[str, Any] = dict(
            model=str(folder),
            skip_tokenizer_init=True,  # token ids in and out: no tokenizer files needed
            load_format=load_format,
            dtype="bfloat16",  # what vLLM's GPT-OSS kernels run; fp32 trainer weights are rounded
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend="external_launcher" if world_size > 1 else None,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed + self.replica,  # replicas must not draw the same random numbers
            enable_sleep_mode=sleep,
            enable_prefix_caching=True,  # agent turns re-send their episode: reset on weight updates
            logprobs_mode="processed_logprobs",
            disable_custom_all_reduce=True,
        )
        if record_routing:
            kwargs["enable_return_routed_experts"] = True
        try:
            self.llm = vllm.LLM(**kwargs)
        except TypeError as e:  # EngineArgs(**kwargs) of a release without the option
            if record_routing and "enable_return_routed_experts" in str(e):
                raise VllmUnavailable(
                    f"vLLM {getattr(vllm, '__version__', '')} cannot record routing for "
                    "rl.rollout_routing_replay (no enable_return_routed_experts: it came in a later "
                    f"release); upgrade with: {INSTALL_HINT}, or set rl.rollout_routing_replay = false"
                ) from e
            raise
        self._sampling_params = vllm.SamplingParams
        self._asleep: set[str] = set()
        self._stale = model is not None
        self.sleep()

    @classmethod
    def from_config(cls, cfg: JobConfig, model: nn.Module) -> VllmEngine:
        """The engine ``train.py`` builds: config.json in ``<job.dump_folder>/vllm_init``, dummy weights."""
        import_vllm()  # fail before writing anything
        rollout = cfg.rollout
        folder = Path(cfg.job.dump_folder) / INIT_FOLDER
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one writer per node (atomic rename)
            write_hf_config(model, folder, torch.bfloat16, source=cfg.model.hf_path or None)
        if ranks()[0] > 1:
            torch.distributed.barrier()
        return cls(
            model,
            folder,
            tensor_parallel_size=rollout.vllm_tensor_parallel_size,
            gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
            max_model_len=rollout.vllm_max_model_len or cfg.training.seq_len,
            seed=cfg.job.seed,
            sleep=rollout.vllm_sleep,
            batch_invariant=rollout.vllm_batch_invariant,
            record_routing=cfg.rl.rollout_routing_replay,
        )

    @torch.no_grad()
    def update_weights(self, model: nn.Module) -> None:
        """Copy ``model``'s weights into vLLM in place (every rank gathers, every vLLM worker loads)."""
        self.model = model
        self._wake("weights")
        device = torch.device("cuda", torch.cuda.current_device())
        for name, tensor in hf_tensors(model, torch.bfloat16, device):
            self.llm.collective_rpc(_load_weights, args=([(name, tensor)],))
            del tensor
        self.llm.collective_rpc(_finish_loading)
        # cached prefixes hold keys / values of the old weights (sleep() dropped them if asleep);
        # vLLM only logs when it cannot reset (blocks in use: a generate still running)
        if "kv_cache" not in self._asleep and self.llm.reset_prefix_cache() is False:
            raise RuntimeError(
                "vLLM could not reset its prefix cache after a weight update (blocks still in use); "
                "its cached prefixes would be computed with the old weights"
            )
        self._stale = False

    def sleep(self) -> None:
        """Free the KV cache and the weights while the trainer runs (module docstring, "Sleep"):
        dropped (level 2) when they can be copied again from the trainer's module, else offloaded
        to host RAM (level 1)."""
        if not self.sleep_enabled or self._asleep == set(TAGS):
            return
        self._wake(*TAGS)  # vLLM sleeps from a fully awake engine
        self.llm.reset_prefix_cache()
        level = self.sleep_level
        self.llm.sleep(level=level)
        self._asleep = set(TAGS)
        self._stale = self._stale or level == 2  # dropped: copied again before the next generate

    @property
    def sleep_level(self) -> int:
        """2 (drop the weights) with a trainer's module to copy them from, else 1 (offload them)."""
        return 2 if self.model is not None else 1

    def wake_up(self) -> None:
        """Ready to generate: the trainer's current weights (copied if pending) and a KV cache."""
        if self._stale:
            self.update_weights(self.model)
        self._wake(*TAGS)

    def rng_state(self) -> None:
        """None: vLLM's sampler state cannot be read back (module docstring, "RNG state")."""
        return None

    def set_rng_state(self, state: Any) -> None:
        """Cannot apply ``state`` (a native-engine checkpoint's): vLLM's sampler state is not settable."""
        warnings.warn(
            "rollout.engine = 'vllm' cannot restore the sampler state saved in the checkpoint; "
            "rollouts after the resume are a fresh random draw",
            stacklevel=2,
        )

    def _wake(self, *tags: str) -> None:
        todo = [tag for tag in tags if tag in self._asleep]
        if todo:
            self.llm.wake_up(tags=todo)
            self._asleep.difference_update(todo)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """One completion per prompt; every rank gets the same list (replicas' shares all-gathered)."""
        if not prompts:
            return []
        if params.max_new_tokens < 1:
            return [Completion([], [], "length") for _ in prompts]
        longest = max(len(p) for p in prompts)
        if longest >= self.max_model_len:
            raise ValueError(
                f"a prompt of {longest} tokens leaves no room under vLLM's max_model_len = "
                f"{self.max_model_len}; raise rollout.vllm_max_model_len (0 = training.seq_len)"
            )
        self.wake_up()
        share = prompts[replica_slice(len(prompts), self.replicas, self.replica)]
        mine: list[Completion] = []
        if share:
            requests = [{"prompt_token_ids": list(p)} for p in share]  # vllm.inputs.TokensPrompt
            outputs = self.llm.generate(
                requests, self._sampling_params(**vllm_sampling_kwargs(params)), use_tqdm=False
            )
            recorded = [len(p) if self.record_routing else None for p in share]
            mine = [completion_from_output(out.outputs[0], n) for out, n in zip(outputs, recorded)]
        if self.world_size == 1:
            return mine
        parts: list[list[Completion] | None] = [None] * self.world_size
        torch.distributed.all_gather_object(parts, mine if self.tp_rank == 0 else None)
        return [c for part in parts if part is not None for c in part]  # leaders in replica order
