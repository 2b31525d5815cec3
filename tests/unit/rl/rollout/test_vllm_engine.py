"""The vLLM engine: weight-sync tensors, lazy import and clear errors, parameter / output mapping,
and the engine itself against a recording stand-in for vLLM (``vllm_standin.py``).

The CPU tests need no vLLM. The GPU tests (a real engine on a tiny model) run only with CUDA and
vLLM installed. Run as a script, this file is the torchrun worker of the 2-process replica test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import read_hf_folder
from tests.distributed.launcher import REPO, run_torchrun
from tests.unit.rl.rollout import vllm_standin
from titan_rl.checkpoint.hf import CONFIG_FILE, hf_tensors, save_hf_model, write_hf_config
from titan_rl.checkpoint.names import to_hf_name
from titan_rl.config import JobConfig
from titan_rl.model import GptOss, GptOssModelArgs, token_logprobs_and_entropy
from titan_rl.rl.rollout import Completion, NativeEngine, SamplingParams
from titan_rl.rl.rollout.vllm_engine import (
    INSTALL_HINT,
    VllmEngine,
    VllmUnavailable,
    completion_from_output,
    replica_count,
    replica_slice,
    vllm_sampling_kwargs,
)


def debug_model(seed: int) -> GptOss:
    torch.manual_seed(seed)
    model = GptOss(GptOssModelArgs.from_preset("debug"))
    with torch.no_grad():
        for block in model.layers:
            block.self_attn.sinks.normal_(0.0, 1.5)
    return model


# --- weight sync tensors ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hf_tensors_equal_what_save_hf_model_writes(tmp_path, dtype):
    model = debug_model(seed=0)
    save_hf_model(model, tmp_path, dtype=dtype, max_shard_bytes=20_000)  # several shards
    saved = read_hf_folder(tmp_path)
    pairs = list(hf_tensors(model, dtype))
    assert [name for name, _ in pairs] == [to_hf_name(native) for native in model.state_dict()]
    assert sorted(name for name, _ in pairs) == sorted(saved)
    for name, tensor in pairs:
        assert tensor.dtype == saved[name].dtype and tensor.shape == saved[name].shape, name
        assert torch.equal(tensor, saved[name]), name
    # what vLLM's GptOssForCausalLM.load_weights reads for bf16: HF names, gate_up_proj [E, H, 2I]
    # with gate / up interleaved in the last dim (the native layout, unchanged), one sink per head
    tensors, args, experts = dict(pairs), model.args, model.layers[0].mlp.experts
    gate_up = tensors["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (args.num_local_experts, args.hidden_size, 2 * args.intermediate_size)
    assert torch.equal(gate_up, experts.gate_up_proj.detach().to(dtype))
    sinks = tensors["model.layers.1.self_attn.sinks"]
    assert torch.equal(sinks, model.layers[1].self_attn.sinks.detach().to(dtype))
    assert sinks.shape == (args.num_attention_heads,)


def test_hf_tensors_are_copies_not_views():
    model = debug_model(seed=1)
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    for _, tensor in hf_tensors(model, torch.float32):
        tensor.zero_()  # vLLM's loader zeroes down_proj_bias in place on tensor-parallel ranks > 0
    for name, p in model.state_dict().items():
        assert torch.equal(p, before[name]), name


def test_hf_tensors_of_one_rank_fsdp_in_their_own_dtype_are_copies():
    """A one-rank mesh's DTensor (one GPU, or a shard dimension of size 1) in the dtype asked for:
    neither the cast nor ``full_tensor()`` copies it, so the tensor handed over was the parameter's
    own storage, and vLLM's in-place ``w2_bias.zero_()`` would zero the trainer's bias."""
    from titan_rl.parallel.parallel_dims import ParallelDims
    from titan_rl.parallel.parallelize import ParallelConfig, parallelize_gpt_oss

    dims = ParallelDims(1, 1, 1, 1, world_size=1, device_type="cpu")
    model = parallelize_gpt_oss(
        debug_model(seed=2).to(torch.bfloat16), dims, ParallelConfig(mixed_precision="bf16")
    )
    before = {name: p.full_tensor().clone() for name, p in model.state_dict().items()}
    for _, tensor in hf_tensors(model, torch.bfloat16):
        tensor.zero_()
    for name, p in model.state_dict().items():
        assert torch.equal(p.full_tensor(), before[name]), name


def test_write_hf_config_is_save_hf_models_config(tmp_path):
    model = debug_model(seed=3)
    save_hf_model(model, tmp_path / "saved")
    write_hf_config(model, tmp_path / "config_only")
    written = json.loads((tmp_path / "config_only" / CONFIG_FILE).read_text())
    assert written == json.loads((tmp_path / "saved" / CONFIG_FILE).read_text())
    assert "quantization_config" not in written and written["dtype"] == "bfloat16"
    assert sorted(p.name for p in (tmp_path / "config_only").iterdir()) == [CONFIG_FILE]


# --- lazy import and clear errors ------------------------------------------------------------


def test_importing_titan_rl_never_imports_vllm():
    code = (
        "import sys, titan_rl, titan_rl.train, titan_rl.rl.rollout.vllm_engine\n"
        "assert 'vllm' not in sys.modules, 'vllm was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


@pytest.fixture
def clean_vllm_env(monkeypatch):
    """Undo the environment variables the engine sets for vLLM."""
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_BATCH_INVARIANT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def fake_vllm(monkeypatch, version: str) -> None:
    module = types.ModuleType("vllm")
    module.__version__ = version
    monkeypatch.setitem(sys.modules, "vllm", module)


def test_without_vllm_construction_says_what_to_install(clean_vllm_env, tmp_path):
    clean_vllm_env.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[gpu\]'") as error:
        VllmEngine(debug_model(seed=0), tmp_path)
    assert INSTALL_HINT in str(error.value)
    cfg = JobConfig()
    cfg.job.dump_folder = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[gpu\]'"):
        VllmEngine.from_config(cfg, debug_model(seed=0))
    assert not (tmp_path / "run").exists(), "from_config wrote files before failing"


def test_without_cuda_construction_says_cuda_is_needed(clean_vllm_env, tmp_path):
    fake_vllm(clean_vllm_env, "0.11.0")
    clean_vllm_env.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        VllmEngine(debug_model(seed=0), tmp_path)


def test_too_old_vllm_is_refused(clean_vllm_env, tmp_path):
    fake_vllm(clean_vllm_env, "0.10.1")
    with pytest.raises(RuntimeError, match=r"too old.*0\.10\.2"):
        VllmEngine(debug_model(seed=0), tmp_path)


@pytest.mark.parametrize("variable", ["VLLM_USE_FLASHINFER_MOE_FP16", "VLLM_ROCM_USE_AITER"])
def test_moe_kernels_that_repack_the_experts_are_refused(clean_vllm_env, tmp_path, variable):
    fake_vllm(clean_vllm_env, "0.11.0")
    clean_vllm_env.setenv(variable, "1")
    with pytest.raises(RuntimeError, match=f"{variable} is set"):
        VllmEngine(debug_model(seed=0), tmp_path)


def test_batch_invariance_on_a_vllm_without_it_is_refused(clean_vllm_env, tmp_path):
    fake_vllm(clean_vllm_env, "0.11.0")
    clean_vllm_env.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match=r"needs vLLM >= 0\.12"):
        VllmEngine(debug_model(seed=0), tmp_path, batch_invariant=True)


# --- pure mappings ---------------------------------------------------------------------------


def test_sampling_params_translation():
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=12, stop_token_ids=(3, 5))
    assert vllm_sampling_kwargs(params) == {
        "n": 1,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,
        "max_tokens": 12,
        "stop_token_ids": [3, 5],
        "ignore_eos": True,
        "logprobs": 0,
        "detokenize": False,
    }
    assert vllm_sampling_kwargs(SamplingParams(top_k=20))["top_k"] == 20
    greedy = vllm_sampling_kwargs(SamplingParams(temperature=0.7, top_p=0.5, top_k=1))
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"]) == (0.0, 1.0, -1)


def test_completion_from_vllm_output():
    def step(token: int, logprob: float) -> dict[int, SimpleNamespace]:
        return {token: SimpleNamespace(logprob=logprob), 99: SimpleNamespace(logprob=-9.0)}

    output = SimpleNamespace(token_ids=(4, 7), logprobs=[step(4, -0.5), step(7, -1.25)], finish_reason="stop")
    assert completion_from_output(output) == Completion([4, 7], [-0.5, -1.25], "stop")
    output.finish_reason = "length"
    assert completion_from_output(output).finish_reason == "length"
    output.logprobs = None
    with pytest.raises(RuntimeError, match="log-prob"):
        completion_from_output(output)


def test_replicas_split_prompts_contiguously():
    assert replica_count(1, 1) == 1 and replica_count(8, 2) == 4 and replica_count(4, 4) == 1
    for world, tp in ((1, 2), (6, 4)):
        with pytest.raises(ValueError, match="vllm_tensor_parallel_size"):
            replica_count(world, tp)
    for n in (0, 1, 5, 16, 17):
        for replicas in (1, 2, 3, 4):
            shares = [list(range(n))[replica_slice(n, replicas, r)] for r in range(replicas)]
            assert [i for share in shares for i in share] == list(range(n))
            # no replica has more than its fair share: the slowest replica sets the step time
            assert max(map(len, shares)) == -(-n // replicas)


# --- the engine against a recording vLLM stand-in (CPU) -------------------------------------


@pytest.fixture
def standin(clean_vllm_env):
    """``vllm`` is the recording stand-in (tests/unit/rl/rollout/vllm_standin.py); returns the
    devices the engine asked its synced tensors for."""
    return vllm_standin.install(clean_vllm_env.setitem, clean_vllm_env.setattr)


def random_model(seed: int) -> GptOss:
    """debug_model with random attention biases, so a dropped or misplaced bias shows."""
    model = debug_model(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


def engine_for(model: GptOss, folder: Path, **kwargs) -> VllmEngine:
    write_hf_config(model, folder)
    return VllmEngine(model, folder, **kwargs)


def expected_completion(prompt: list[int], weights_version: int) -> Completion:
    tokens = vllm_standin.echo_tokens(prompt, weights_version)
    return Completion(tokens, [-0.25 * k for k in range(len(tokens))], "length")


def check_synced(llm, model: GptOss) -> None:
    """vLLM holds every parameter of ``model`` in bf16, in its own layout, and skipped nothing."""
    vllm_model = llm.model
    assert not vllm_model.skipped, f"vLLM's loader would drop {vllm_model.skipped}"
    assert set(vllm_model.params) == set(vllm_model.shapes), set(vllm_model.shapes) ^ set(vllm_model.params)
    native = {to_hf_name(n): t.detach().to(torch.bfloat16) for n, t in model.state_dict().items()}
    assert [name for name, _, _ in vllm_model.received] == list(native)  # each tensor once, in order
    assert all(dtype == torch.bfloat16 for _, _, dtype in vllm_model.received)
    args, p = model.args, vllm_model.params
    for layer in range(args.num_hidden_layers):
        hf, ours = f"model.layers.{layer}.", f"model.layers.{layer}."
        qkv = torch.cat([native[f"{hf}self_attn.{x}_proj.bias"] for x in "qkv"])
        assert torch.equal(p[f"{ours}attn.qkv_proj.bias"], qkv)
        # vLLM stores w13 [E, 2I, H] with gate / up rows interleaved: row 2j is gate unit j
        gate_up = model.layers[layer].mlp.experts.gate_up_proj.detach().to(torch.bfloat16)  # [E, H, 2I]
        assert torch.equal(p[f"{ours}mlp.experts.w13_weight"], gate_up.transpose(1, 2))
        down = model.layers[layer].mlp.experts.down_proj.detach().to(torch.bfloat16)  # [E, I, H]
        assert torch.equal(p[f"{ours}mlp.experts.w2_weight"], down.transpose(1, 2))
        assert torch.equal(p[f"{ours}attn.sinks"], native[f"{hf}self_attn.sinks"])
    for hf_name, tensor in native.items():
        name, shard = vllm_standin.vllm_name(hf_name)
        if shard is None and "experts.w" not in name:
            assert torch.equal(p[name], tensor), hf_name


@pytest.mark.parametrize("extra_rows", [0, 1], ids=["routed_prompt_and_completion_but_last", "and_last"])
def test_recorded_routing_comes_back_for_prompt_and_completion_but_the_last_token(
    standin, tmp_path, monkeypatch, extra_rows
):
    """``record_routing``: vLLM is asked to record (``enable_return_routed_experts``) and each
    completion's routing is its ``routed_experts`` for prompt + completion[:-1], whatever a release
    appends after them; without it nothing is asked or returned. Planted, each fails: the flag not
    passed; the routing cut one row short; the prompt's rows dropped."""
    monkeypatch.setattr(vllm_standin.StandinLLM, "ROUTING_EXTRA_ROWS", extra_rows)
    model = random_model(seed=6)
    prompts = [[5, 9, 13], [1, 2, 3, 4, 5, 6, 7], [42]]
    plain = engine_for(model, tmp_path / "plain")
    assert "enable_return_routed_experts" not in plain.llm.kwargs
    assert all(c.routing is None for c in plain.generate(prompts, SamplingParams(max_new_tokens=4)))
    engine = engine_for(model, tmp_path / "routing", record_routing=True)
    assert engine.llm.kwargs["enable_return_routed_experts"] is True
    args = model.args
    for prompt, c in zip(prompts, engine.generate(prompts, SamplingParams(max_new_tokens=4))):
        sequence = (prompt + c.tokens)[:-1]
        expected = vllm_standin.standin_routing(
            sequence, args.num_hidden_layers, args.num_experts_per_tok, args.num_local_experts
        )
        assert c.routing.dtype == torch.int16 and torch.equal(c.routing, torch.as_tensor(expected))


def test_routing_from_vllm_that_cannot_record_it_is_a_clear_error(standin, tmp_path, monkeypatch):
    model = random_model(seed=7)
    monkeypatch.setattr(vllm_standin.StandinLLM, "ROUTING_RELEASE", False)
    with pytest.raises(
        VllmUnavailable, match=re.escape("cannot record routing for rl.rollout_routing_replay")
    ):
        engine_for(model, tmp_path / "old", record_routing=True)
    output = SimpleNamespace(
        token_ids=(4, 7),
        logprobs=[{4: SimpleNamespace(logprob=-0.5)}, {7: SimpleNamespace(logprob=-1.0)}],
        finish_reason="stop",
    )
    with pytest.raises(RuntimeError, match="returned no routed_experts"):  # a model it does not record
        completion_from_output(output, routed_prompt_len=3)
    output.routed_experts = torch.zeros(3, 2, 2, dtype=torch.int16).numpy()  # 3 + 2 - 1 = 4 rows needed
    with pytest.raises(RuntimeError, match=r"shape \(3, 2, 2\); expected \[4 \(prompt"):
        completion_from_output(output, routed_prompt_len=3)


def test_update_weights_hands_vllm_every_tensor_in_its_layout(standin, tmp_path):
    model = random_model(seed=4)
    engine = engine_for(model, tmp_path)
    assert engine.llm.kwargs["load_format"] == "dummy" and engine.llm.kwargs["dtype"] == "bfloat16"
    engine.update_weights(model)
    check_synced(engine.llm, model)
    assert standin == [torch.device("cuda", 0)]  # tensors go to the GPU vLLM runs on
    other = random_model(seed=5)
    engine.llm.model.received.clear()
    engine.update_weights(other)  # every tensor again: nothing of the old model is left
    check_synced(engine.llm, other)


def calls(llm, start: int = 0) -> list[tuple]:
    """The recorded calls since ``start``, one collective_rpc per weight sync folded into one."""
    out = []
    for call in llm.calls[start:]:
        if call == ("collective_rpc", "_load_weights") and out and out[-1] == ("load_weights",):
            continue
        out.append(("load_weights",) if call == ("collective_rpc", "_load_weights") else call)
    return out


SYNC = [("load_weights",), ("collective_rpc", "_finish_loading"), ("process_weights_after_loading",)]


def test_sleep_wake_tags_and_prefix_cache_reset_in_order(standin, tmp_path):
    """With vllm_sleep: asleep after construction; the first generate wakes the weights, syncs, then
    wakes the KV cache; sleep frees both (and with them the prefix cache). With the trainer's
    module to copy from it sleeps at level 2 (weights dropped, not offloaded to host RAM)."""
    model = random_model(seed=6)
    engine = engine_for(model, tmp_path, sleep=True)
    llm = engine.llm
    assert llm.kwargs["enable_sleep_mode"] and llm.kwargs["enable_prefix_caching"]
    assert calls(llm) == [("reset_prefix_cache",), ("sleep", 2)]
    prompts = [[5, 9, 13], [1, 2], [42, 7, 7, 7]]
    start = len(llm.calls)
    assert engine.generate(prompts, SamplingParams()) == [expected_completion(p, 1) for p in prompts]
    assert calls(llm, start) == [
        ("wake_up", ("weights",)),
        *SYNC,
        ("wake_up", ("kv_cache",)),
        ("generate", 3),
    ]
    start = len(llm.calls)
    engine.generate(prompts, SamplingParams())  # awake and current: nothing else
    assert calls(llm, start) == [("generate", 3)]
    start = len(llm.calls)
    engine.sleep()
    engine.update_weights(random_model(seed=7))  # the trainer's step: asleep, then sync
    assert engine.generate(prompts[:1], SamplingParams()) == [expected_completion(prompts[0], 2)]
    assert calls(llm, start) == [
        ("reset_prefix_cache",),
        ("sleep", 2),
        ("wake_up", ("weights",)),
        *SYNC,
        ("wake_up", ("kv_cache",)),
        ("generate", 1),
    ]


def test_a_dropped_model_is_copied_again_before_generating(standin, tmp_path):
    """Level 2 drops the weights: a wake_up without the trainer's own sync (e.g. after a restore)
    copies them again before anything generates; the stand-in refuses to generate otherwise."""
    model = random_model(seed=12)
    engine = engine_for(model, tmp_path, sleep=True)
    prompts = [[4, 4, 2], [9]]
    engine.generate(prompts, SamplingParams())
    engine.sleep()
    start = len(engine.llm.calls)
    assert engine.generate(prompts, SamplingParams()) == [expected_completion(p, 2) for p in prompts]
    assert calls(engine.llm, start) == [
        ("wake_up", ("weights",)),
        *SYNC,
        ("wake_up", ("kv_cache",)),
        ("generate", 2),
    ]


def test_without_the_trainers_module_sleep_keeps_the_folder_weights(standin, tmp_path):
    """model=None: the folder's weights are all there is, so sleep offloads them (level 1)."""
    write_hf_config(random_model(seed=13), tmp_path)
    engine = VllmEngine(None, tmp_path, sleep=True, load_format="auto")
    assert calls(engine.llm) == [("reset_prefix_cache",), ("sleep", 1)]
    assert engine.generate([[1, 2, 3]], SamplingParams()) == [expected_completion([1, 2, 3], 0)]


@pytest.mark.parametrize("reason", ["abort", "error"])
def test_a_request_that_did_not_finish_is_an_error(standin, tmp_path, monkeypatch, reason):
    engine = engine_for(random_model(seed=14), tmp_path, sleep=False)
    monkeypatch.setattr(engine.llm, "FINISH_REASON", reason)
    with pytest.raises(RuntimeError, match=f"finish_reason '{reason}'"):
        engine.generate([[1, 2]], SamplingParams())


def test_a_prefix_cache_that_cannot_be_reset_after_a_sync_is_an_error(standin, tmp_path, monkeypatch):
    engine = engine_for(random_model(seed=15), tmp_path, sleep=False)
    engine.generate([[1, 2]], SamplingParams())
    monkeypatch.setattr(engine.llm, "RESET_OK", False)
    with pytest.raises(RuntimeError, match="could not reset its prefix cache"):
        engine.update_weights(random_model(seed=16))


def test_without_sleep_a_sync_resets_the_prefix_cache(standin, tmp_path):
    model = random_model(seed=8)
    engine = engine_for(model, tmp_path, sleep=False)
    llm = engine.llm
    assert calls(llm) == [] and not llm.kwargs["enable_sleep_mode"]
    prompts = [[3, 1, 4], [1, 5]]
    assert engine.generate(prompts, SamplingParams()) == [expected_completion(p, 1) for p in prompts]
    start = len(llm.calls)
    engine.update_weights(random_model(seed=9))
    assert calls(llm, start) == [*SYNC, ("reset_prefix_cache",)]  # after the new weights are in
    assert engine.generate(prompts, SamplingParams()) == [expected_completion(p, 2) for p in prompts]
    assert llm.prompts == prompts + prompts


def test_rng_state_is_none_and_a_saved_state_is_refused_with_a_warning(standin, tmp_path):
    """vLLM's sampler state cannot be read back: nothing goes into the checkpoint, and a native
    run's saved state is not silently taken as restored."""
    engine = engine_for(random_model(seed=11), tmp_path)
    assert engine.rng_state() is None
    with pytest.warns(UserWarning, match="fresh random draw"):
        engine.set_rng_state([1, 2, 3])


def test_replicas_split_prompts_and_gather_them_in_order(tmp_path):
    """2 processes: tensor_parallel_size 1 (two replicas, each its share) and 2 (one replica);
    every rank returns every prompt's completion in prompt order; weights synced from a model
    sharded by FSDP x EP (and checkpointed) arrive whole, bitwise the unsharded model's, and every
    shard was cast to bf16 before its gather (half the bytes of the fp32 master weights)."""
    output = run_torchrun(Path(__file__), "replicas", str(tmp_path), nproc=2, timeout=120)
    assert "rank 0: ok" in output and "rank 1: ok" in output, output[-3000:]


def record_gathered_dtypes() -> list[torch.dtype]:
    """From now on, the dtype of every DTensor ``full_tensor()`` gathers is appended to the list."""
    from torch.distributed.tensor import DTensor

    gathered: list[torch.dtype] = []
    full_tensor = DTensor.full_tensor

    def recording(self, *args, **kwargs):
        gathered.append(self.dtype)
        return full_tensor(self, *args, **kwargs)

    DTensor.full_tensor = recording
    return gathered


def replicas_worker(folder: Path) -> None:
    import torch.distributed as dist

    from titan_rl.parallel import ParallelDims
    from titan_rl.parallel.parallelize import ParallelConfig, parallelize_gpt_oss

    def put(obj, name, value):
        obj[name] = value

    vllm_standin.install(put, setattr)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    reference = random_model(seed=10)
    dims = ParallelDims(dp_replicate=1, dp_shard=2, cp=1, ep=2, world_size=2, device_type="cpu")
    model = parallelize_gpt_oss(random_model(seed=10), dims, ParallelConfig(activation_checkpoint="full"))
    assert any(type(p).__name__ == "DTensor" for p in model.parameters()), "nothing was sharded"
    if rank == 0:
        write_hf_config(reference, folder)
    dist.barrier()
    gathered = record_gathered_dtypes()
    prompts = [[p, p + 1, 2 * p][: 1 + p % 3] for p in range(1, 8)]  # 7 prompts, 1-3 tokens
    for tp, replicas in ((1, 2), (2, 1)):
        engine = VllmEngine(model, folder, tensor_parallel_size=tp, seed=3)
        llm = engine.llm
        assert llm.kwargs["distributed_executor_backend"] == "external_launcher"
        assert llm.kwargs["seed"] == 3 + (rank if tp == 1 else 0)  # replicas draw different numbers
        got = engine.generate(prompts, SamplingParams())
        assert got == [expected_completion(p, 1) for p in prompts], (tp, got)
        shares: list = [None] * 2
        dist.all_gather_object(shares, llm.prompts)
        if replicas == 2:  # contiguous shares in replica order, the busiest with ceil(7 / 2) prompts
            assert shares[0] + shares[1] == prompts and max(map(len, shares)) == 4, shares
        else:  # one replica: both tensor-parallel ranks run every prompt (vLLM's external launcher)
            assert shares[0] == shares[1] == prompts, shares
        check_synced(llm, reference)
        assert gathered and set(gathered) == {torch.bfloat16}, f"gathered {set(gathered)}, not bf16"
        gathered.clear()
    print(f"rank {rank}: ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


# --- GPU: a real engine ----------------------------------------------------------------------

gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
    reason="needs CUDA and vLLM (pip install -e '.[gpu]')",
)
PROMPTS = [[5, 9, 13, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [42]]


def gpu_model(seed: int) -> GptOss:
    """A tiny GPT-OSS vLLM's attention backends accept (head_dim 64), bf16-exact weights, fp32 math."""
    torch.manual_seed(seed)
    args = GptOssModelArgs.from_preset(
        "debug",
        hidden_size=128,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    model = GptOss(args)
    with torch.no_grad():
        for block in model.layers:
            block.self_attn.sinks.normal_(0.0, 1.5)
    return model.to(torch.bfloat16).float().cuda().eval()  # what vLLM gets: bf16 weights


def assert_greedy(model: GptOss, prompt: list[int], completion: Completion, tol: float = 0.05) -> None:
    """Every token is the model's argmax given the prefix (up to bf16 ties)."""
    row = torch.tensor([prompt + completion.tokens], device="cuda")
    logits = model(row)[0, len(prompt) - 1 : -1].float()
    chosen = logits.gather(1, torch.tensor(completion.tokens, device="cuda")[:, None])[:, 0]
    assert (logits.max(-1).values - chosen).max().item() < tol


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """One engine for the module (vLLM holds process-wide state): built from a save_hf_model folder."""
    folder = tmp_path_factory.mktemp("vllm_hf")
    save_hf_model(gpu_model(seed=0), folder)
    return VllmEngine(None, folder, load_format="auto", gpu_memory_utilization=0.3, max_model_len=256)


@gpu
def test_engine_from_saved_folder_decodes_greedily_like_the_native_model(engine):
    model = gpu_model(seed=0)
    completions = engine.generate(PROMPTS, SamplingParams(top_k=1, max_new_tokens=16))
    native = NativeEngine(model).generate(PROMPTS, SamplingParams(top_k=1, max_new_tokens=16))
    for prompt, completion, reference in zip(PROMPTS, completions, native):
        assert len(completion.tokens) == 16 and completion.finish_reason == "length"
        assert_greedy(model, prompt, completion)
        assert completion.tokens[0] == reference.tokens[0]


@gpu
def test_engine_logprobs_are_the_trainers_tempered_logprobs(engine):
    model = gpu_model(seed=0)
    engine.update_weights(model)  # whatever an earlier test left loaded
    completions = engine.generate(PROMPTS, SamplingParams(temperature=0.8, max_new_tokens=16))
    for prompt, completion in zip(PROMPTS, completions):
        row = torch.tensor([prompt + completion.tokens], device="cuda")
        hidden = model(row, return_hidden=True)[:, len(prompt) - 1 : -1]
        trainer, _ = token_logprobs_and_entropy(hidden, model.lm_head.weight, row[:, len(prompt) :], 0.8)
        diff = (trainer[0].cpu() - torch.tensor(completion.logprobs)).abs()
        assert diff.max().item() < 0.1 and diff.mean().item() < 0.02


@gpu
def test_engine_stop_tokens_end_and_are_returned(engine):
    params = SamplingParams(max_new_tokens=30, stop_token_ids=tuple(range(0, 512, 2)))
    for completion in engine.generate(PROMPTS, params):
        assert completion.finish_reason == "stop" and completion.tokens[-1] % 2 == 0
        assert all(t % 2 for t in completion.tokens[:-1])


@gpu
def test_update_weights_switches_engine_to_the_new_weights(engine):
    greedy = SamplingParams(top_k=1, max_new_tokens=16)
    before = engine.generate(PROMPTS, greedy)
    other = gpu_model(seed=1)
    engine.update_weights(other)
    after = engine.generate(PROMPTS, greedy)
    assert [c.tokens for c in after] != [c.tokens for c in before]
    for prompt, completion in zip(PROMPTS, after):
        assert_greedy(other, prompt, completion)


@gpu
def test_sleep_frees_memory_and_generation_resumes_unchanged(engine):
    greedy, model = SamplingParams(top_k=1, max_new_tokens=16), gpu_model(seed=2)
    engine.update_weights(model)
    before = engine.generate(PROMPTS, greedy)
    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep()  # the KV cache and the weights leave the GPU
    assert torch.cuda.mem_get_info()[0] > free_awake
    engine.update_weights(model)  # wakes the weights only; generate wakes the KV cache
    after = engine.generate(PROMPTS, greedy)
    assert [c.tokens for c in after] == [c.tokens for c in before]
    for a, b in zip(after, before):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-3)


@gpu
def test_from_config_engine_samples_the_trainers_weights(tmp_path):
    # a second engine needs a fresh process: vLLM keeps one distributed state per process
    command = [sys.executable, str(Path(__file__)), "from_config", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(command, cwd=REPO, env=env, check=True, timeout=600)


def from_config_worker(folder: Path) -> None:
    cfg = JobConfig()
    cfg.job.dump_folder = str(folder)
    cfg.rollout.vllm_gpu_memory_utilization = 0.3
    model = gpu_model(seed=3)
    engine = VllmEngine.from_config(cfg, model)  # dummy weights, synced before the first generate
    assert sorted(p.name for p in (folder / "vllm_init").iterdir()) == [CONFIG_FILE]
    for prompt, completion in zip(
        PROMPTS, engine.generate(PROMPTS, SamplingParams(top_k=1, max_new_tokens=16))
    ):
        assert_greedy(model, prompt, completion)
    print("ok", flush=True)


if __name__ == "__main__":
    workers = {"from_config": from_config_worker, "replicas": replicas_worker}
    workers[sys.argv[1]](Path(sys.argv[2]))
