"""A recording stand-in for the ``vllm`` package, so ``VllmEngine`` runs on CPU without vLLM.

It plays vLLM's part, it does not replace the engine: ``VllmEngine`` runs unchanged and calls
``vllm.LLM``; the stand-in records every call and refuses what vLLM documents as wrong or what
would silently sample from the wrong weights. Facts it encodes (vllm-project/vllm):

- ``vllm/model_executor/models/gpt_oss.py``: ``GptOssForCausalLM.hf_to_vllm_mapper`` renames HF
  names (``.self_attn.`` -> ``.attn.``, ``.embed_tokens.weight`` -> ``.embedding.weight``,
  ``.gate_up_proj`` -> ``.w13_weight``, ``.down_proj`` -> ``.w2_weight``, ``.gate_up_proj_bias`` ->
  ``.w13_bias``, ``.down_proj_bias`` -> ``.w2_bias``); ``GptOssModel.load_weights`` stacks
  ``q_proj`` / ``k_proj`` / ``v_proj`` into ``qkv_proj``; for unquantized weights
  ``_load_weights_other`` reads ``w13`` as HF ``[E, H, 2I]`` (gate / up interleaved in the last
  dim, narrowed there for tensor parallelism) and stores ``permute(0, 2, 1)``, ``w2`` as
  ``[E, I, H]`` (stored permuted), ``w13_bias [E, 2I]``, ``w2_bias [E, H]``, ``sinks [heads]``;
  a name it does not know is skipped without a word.
- ``vllm/entrypoints/llm.py``: ``LLM.sleep(level)`` frees the pools of a fully awake engine (level 1
  offloads the weights to host RAM and brings them back; level 2 discards them: "for updating the
  weights" afterwards), ``LLM.wake_up(tags)`` brings back the named pools (``weights``,
  ``kv_cache``); ``collective_rpc(fn, args)`` runs ``fn(worker, *args)`` on each worker;
  ``reset_prefix_cache()`` returns False (and only logs) when blocks are still in use.
- ``vllm/v1/engine/__init__.py``: a request can also finish with ``"abort"`` (and in later
  releases ``"error"``), not only ``"stop"`` / ``"length"``.
- ``examples/offline_inference/rlhf_utils.py``: after ``load_weights``, the model is finished with
  ``process_weights_after_loading``; cached prefixes hold keys / values of the old weights.
- ``vllm/outputs.py`` (pull request 28284): with ``LLM(enable_return_routed_experts=True)`` each
  ``CompletionOutput.routed_experts`` is a numpy int16 ``[prompt + completion - 1, layers, top_k]``
  (some releases add a row for the last token: ``ROUTING_EXTRA_ROWS``); ``LLM(**kwargs)`` passes its
  keywords to ``EngineArgs``, so a release without the option raises ``TypeError`` naming it.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

SUFFIXES = {  # hf_to_vllm_mapper.orig_to_new_suffix (matched with endswith)
    ".embed_tokens.weight": ".embedding.weight",
    ".gate_up_proj_bias": ".w13_bias",
    ".down_proj_bias": ".w2_bias",
    ".gate_up_proj": ".w13_weight",
    ".down_proj": ".w2_weight",
}
STACKED = {".q_proj": "q", ".k_proj": "k", ".v_proj": "v"}  # -> .qkv_proj, shard id


def vllm_name(hf_name: str) -> tuple[str, str | None]:
    """The vLLM parameter an HF tensor loads into, and its qkv shard id (None if not stacked)."""
    name = hf_name.replace(".self_attn.", ".attn.")
    for old, new in SUFFIXES.items():
        if name.endswith(old):
            return name[: -len(old)] + new, None
    for old, shard in STACKED.items():
        if old + "." in name:
            return name.replace(old + ".", ".qkv_proj."), shard
    return name, None


def vllm_params(config: dict) -> dict[str, tuple[int, ...]]:
    """vLLM's GptOssForCausalLM parameters (tensor parallel size 1) and their shapes."""
    h, v, i = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    e, d = config["num_local_experts"], config["head_dim"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    params = {"model.embedding.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        params |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "attn.qkv_proj.weight": ((heads + 2 * kv) * d, h),
            p + "attn.qkv_proj.bias": ((heads + 2 * kv) * d,),
            p + "attn.o_proj.weight": (h, heads * d),
            p + "attn.o_proj.bias": (h,),
            p + "attn.sinks": (heads,),
            p + "mlp.router.weight": (e, h),
            p + "mlp.router.bias": (e,),
            p + "mlp.experts.w13_weight": (e, 2 * i, h),
            p + "mlp.experts.w13_bias": (e, 2 * i),
            p + "mlp.experts.w2_weight": (e, h, i),
            p + "mlp.experts.w2_bias": (e, h),
        }
    return params


class StandinModel:
    """``worker.model_runner.model``: loads HF-named tensors the way vLLM's GPT-OSS loader does."""

    def __init__(self, llm: StandinLLM, config: dict) -> None:
        self.llm, self.config = llm, config
        self.shapes = vllm_params(config)
        self.params: dict[str, torch.Tensor] = {}  # vLLM name -> the tensor as vLLM stores it
        self.received: list[tuple[str, tuple[int, ...], torch.dtype]] = []  # (HF name, shape, dtype)
        self.skipped: list[str] = []  # names vLLM's loader would drop silently

    def load_weights(self, weights) -> set[str]:
        if "weights" in self.llm.asleep:
            raise AssertionError("load_weights while the weights pool is asleep (offloaded)")
        loaded = set()
        for hf_name, tensor in weights:
            self.received.append((hf_name, tuple(tensor.shape), tensor.dtype))
            name, shard = vllm_name(hf_name)
            if name not in self.shapes:
                self.skipped.append(hf_name)
                continue
            if name.endswith((".w13_weight", ".w2_weight")):
                tensor = tensor.permute(0, 2, 1)  # _load_weights_other: HF [E, in, out] -> [E, out, in]
            if shard is not None:
                tensor = self._stack(name, shard, tensor)
            if tuple(tensor.shape) != self.shapes[name]:
                raise AssertionError(
                    f"{hf_name}: vLLM's {name} is {self.shapes[name]}, got {tuple(tensor.shape)}"
                )
            self.params[name] = tensor.clone()
            loaded.add(name)
        self.llm.loads_pending = True
        return loaded

    def _stack(self, name: str, shard: str, tensor: torch.Tensor) -> torch.Tensor:
        """QKVParallelLinear's weight_loader: q rows, then k rows, then v rows."""
        c, d = self.config, self.config["head_dim"]
        rows = {"q": c["num_attention_heads"] * d, "k": c["num_key_value_heads"] * d}
        rows["v"] = rows["k"]
        if tensor.shape[0] != rows[shard]:
            raise AssertionError(f"{name} shard {shard}: {rows[shard]} rows expected, got {tensor.shape[0]}")
        full = self.params.get(name, torch.full(self.shapes[name], float("nan"), dtype=tensor.dtype)).clone()
        start = {"q": 0, "k": rows["q"], "v": rows["q"] + rows["k"]}[shard]
        full[start : start + rows[shard]] = tensor
        return full


def standin_routing(sequence: list[int], layers: int, top_k: int, experts: int) -> np.ndarray:
    """The experts the stand-in "routes" each token of ``sequence`` to: they name the token, so a
    routing read at the wrong positions is seen."""
    ids = np.asarray(sequence)[:, None, None] + np.arange(layers)[None, :, None] + np.arange(top_k)
    return (ids % experts).astype(np.int16)


class StandinLLM:
    """``vllm.LLM``: records calls; generation echoes which prompt it got and under which weights."""

    ROUTING_RELEASE = True  # False: a release without enable_return_routed_experts
    FINISH_REASON = "length"  # what every request ends with
    RESET_OK = True  # False: reset_prefix_cache fails (blocks in use)
    ROUTING_EXTRA_ROWS = 0  # rows after prompt + completion - 1 that a release returns

    def __init__(self, model: str, **kwargs) -> None:
        if "enable_return_routed_experts" in kwargs and not self.ROUTING_RELEASE:
            raise TypeError(
                "EngineArgs.__init__() got an unexpected keyword argument 'enable_return_routed_experts'"
            )
        self.kwargs = {"model": model, **kwargs}
        self.calls: list[tuple] = []
        self.asleep: set[str] = set()
        self.weights_version = 0  # completed syncs (process_weights_after_loading calls)
        self.loads_pending = False
        self.weights_lost = False  # sleep level 2 discarded them; a full sync brings them back
        self.cache_version: int | None = None  # weights the cached prefixes were computed with
        self.prompts: list[list[int]] = []
        config = json.loads((Path(model) / "config.json").read_text())
        self.model = StandinModel(self, config)
        self.worker = SimpleNamespace(
            model_runner=SimpleNamespace(model=self.model), model_config=None, device=None
        )

    def collective_rpc(self, method, args=(), kwargs=None):
        self.calls.append(("collective_rpc", method.__name__))
        return [method(self.worker, *args, **(kwargs or {}))]

    def finish_loading(self) -> None:
        self.calls.append(("process_weights_after_loading",))
        if self.weights_lost and set(self.model.params) != set(self.model.shapes):
            raise AssertionError("after a level-2 sleep only part of the weights were loaded again")
        self.weights_version += 1
        self.loads_pending = self.weights_lost = False

    def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))
        if not self.kwargs.get("enable_sleep_mode") or self.asleep:
            raise AssertionError(f"sleep needs enable_sleep_mode and an awake engine (asleep: {self.asleep})")
        self.asleep = {"weights", "kv_cache"}
        self.cache_version = None  # the KV cache is freed
        if level == 2:  # the weights are discarded: what wakes up is garbage until loaded again
            self.weights_lost = True
            self.model.params.clear()

    def wake_up(self, tags: list[str] | None = None) -> None:
        tags = ["weights", "kv_cache"] if tags is None else list(tags)
        self.calls.append(("wake_up", tuple(tags)))
        if not set(tags) <= self.asleep:
            raise AssertionError(f"wake_up({tags}) but asleep is {sorted(self.asleep)}")
        self.asleep -= set(tags)

    def reset_prefix_cache(self) -> bool:
        self.calls.append(("reset_prefix_cache",))
        if not self.RESET_OK:
            return False
        self.cache_version = None
        return True

    def generate(self, requests, sampling_params, use_tqdm=True):
        self.calls.append(("generate", len(requests)))
        if self.asleep:
            raise AssertionError(f"generate while {sorted(self.asleep)} asleep")
        if self.loads_pending or (self.kwargs.get("load_format") == "dummy" and not self.weights_version):
            raise AssertionError("generate before the weights were loaded and processed")
        if self.weights_lost:
            raise AssertionError("generate with the weights a level-2 sleep discarded")
        if self.cache_version not in (None, self.weights_version):
            raise AssertionError("generate with a prefix cache computed under older weights")
        self.cache_version = self.weights_version
        outputs = []
        for request in requests:
            prompt = list(request["prompt_token_ids"])
            self.prompts.append(prompt)
            tokens = echo_tokens(prompt, self.weights_version)
            steps = [{t: SimpleNamespace(logprob=-0.25 * k)} for k, t in enumerate(tokens)]
            output = SimpleNamespace(token_ids=tokens, logprobs=steps, finish_reason=self.FINISH_REASON)
            if self.kwargs.get("enable_return_routed_experts"):
                c = self.model.config
                rows = len(prompt) + len(tokens) - 1 + self.ROUTING_EXTRA_ROWS
                sequence = (prompt + tokens + [0])[:rows]
                args = (c["num_hidden_layers"], c["num_experts_per_tok"], c["num_local_experts"])
                output.routed_experts = standin_routing(sequence, *args)
            outputs.append(SimpleNamespace(outputs=[output]))
        return outputs


def echo_tokens(prompt: list[int], weights_version: int) -> list[int]:
    """What the stand-in "samples" for ``prompt``: tells which prompt and weights produced it."""
    return [len(prompt), prompt[0], sum(prompt) % 1000, weights_version]


class StandinSamplingParams:
    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs


def modules() -> dict[str, types.ModuleType]:
    """``sys.modules`` entries for ``vllm`` and the one submodule the engine imports."""
    vllm = types.ModuleType("vllm")
    vllm.__version__ = "0.11.0"
    vllm.LLM, vllm.SamplingParams = StandinLLM, StandinSamplingParams
    utils = types.ModuleType("vllm.model_executor.model_loader.utils")
    utils.process_weights_after_loading = lambda model, model_config, device: model.llm.finish_loading()
    return {
        "vllm": vllm,
        "vllm.model_executor": types.ModuleType("vllm.model_executor"),
        "vllm.model_executor.model_loader": types.ModuleType("vllm.model_executor.model_loader"),
        "vllm.model_executor.model_loader.utils": utils,
    }


def install(setitem, setattr_) -> list[torch.device]:
    """Put the stand-in in place with ``setitem`` / ``setattr_`` (pytest's monkeypatch, or plain
    assignment in a worker); returns the list the devices the engine asks tensors for are added to.

    CPU-only stand-ins for CUDA: ``torch.cuda.is_available`` and ``current_device``; the engine's
    ``hf_tensors`` still runs (gathering shards), on the CPU instead of the device it names.
    """
    from titan_rl.rl.rollout import vllm_engine

    for name, module in modules().items():
        setitem(sys.modules, name, module)
    setattr_(torch.cuda, "is_available", lambda: True)
    setattr_(torch.cuda, "current_device", lambda: 0)
    devices: list[torch.device] = []
    real = vllm_engine.hf_tensors

    def hf_tensors_on_cpu(model, dtype=torch.bfloat16, device="cpu"):
        devices.append(torch.device(device))
        return real(model, dtype, "cpu")

    setattr_(vllm_engine, "hf_tensors", hf_tensors_on_cpu)
    return devices
