"""README sections generated from the code: the config reference and the GPU memory estimates.

    python -m titan_rl.config.reference                  # print the config reference (markdown)
    python -m titan_rl.config.reference --memory         # print the memory-estimate table
    python -m titan_rl.config.reference --write README.md  # rewrite both blocks between their markers
    python -m titan_rl.config.reference --check README.md  # exit 1 if README.md's blocks are stale
    python -m titan_rl.config.reference --measure        # re-measure the activation constant (30-75 s)

The config reference lists every section and key of ``JobConfig`` with its type, default and the
one-line doc written right after the field in ``job_config.py`` (read with ``ast``). The memory
table estimates per-GPU memory of the shipped GPU configs from the exact parameter counts; see
``estimate_memory`` for what it counts and what it leaves out. The configs are read from the
repository's ``train_configs/`` (an in-place or editable install).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from titan_rl.config import job_config
from titan_rl.config.job_config import JobConfig

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "train_configs"
MARKERS = {
    "config-reference": ("<!-- config-reference:start -->", "<!-- config-reference:end -->"),
    "memory-table": ("<!-- memory-table:start -->", "<!-- memory-table:end -->"),
}
_WORLD_SIZE = re.compile(r"^#\s*world_size\s*=\s*(\d+)\s*$", re.MULTILINE)


# ---------------------------------------------------------------------------------------------
# config reference


def field_docs() -> dict[str, dict[str, str]]:
    """``{class name: {field: doc}}``: the string literal right after each field in job_config.py."""
    tree = ast.parse(Path(job_config.__file__).read_text())
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields: dict[str, str] = {}
        for stmt, nxt in zip(node.body, [*node.body[1:], None]):
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            if (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                fields[stmt.target.id] = " ".join(nxt.value.value.split())
        docs[node.name] = fields
    return docs


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_config_reference() -> str:
    """Markdown: one table per section (key, type, default, doc); raises if a field has no doc."""
    docs = field_docs()
    defaults = JobConfig()
    sections = typing.get_type_hints(JobConfig)
    out = [
        "Generated from `titan_rl/config/job_config.py` by `python -m titan_rl.config.reference "
        "--write README.md` (a test fails when it is stale). Defaults are the dataclass defaults; the "
        "files in `train_configs/` override some of them.",
    ]
    for section in dataclasses.fields(JobConfig):
        cls = sections[section.name]
        hints = typing.get_type_hints(cls)
        values = getattr(defaults, section.name)
        out += [
            "",
            f"### `[{section.name}]`",
            "",
            "| key | type | default | description |",
            "|---|---|---|---|",
        ]
        for f in dataclasses.fields(cls):
            doc = docs.get(cls.__name__, {}).get(f.name)
            if not doc:
                raise ValueError(
                    f"{cls.__name__}.{f.name} in titan_rl/config/job_config.py has no doc string; "
                    'add a """one-line doc""" right after the field'
                )
            default = json.dumps(getattr(values, f.name))
            out.append(f"| `{f.name}` | {_type_name(hints[f.name])} | `{default}` | {_cell(doc)} |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# memory estimates

GPU_GB = 80.0
"""H100 memory in GB (1e9 bytes, as ``mem/peak_gb`` reports it); the card has a little more."""
GPUS_PER_NODE = 8
ACTIVATION_BYTES_PER_TOKEN_LAYER = 0.32e6
"""Bytes autograd keeps per token per transformer layer in a bf16 grad forward of the gpt-oss
shape (hidden 2880, top-4 of experts of 2880, 64 query heads): the bytes of the tensors saved for
backward, measured on CPU with the chunked attention backend (``measure_activation_bytes``:
313.7k at 1024 tokens, 319.8k at 2048). No activation checkpointing (the trainer applies none)."""
FP32_ACTIVATION_BYTES_PER_TOKEN_LAYER = 0.53e6
"""The same with ``model.activation_dtype = "float32"`` (bf16 weights, fp32 activations): 526.6k
at 1024 tokens (``measure_activation_bytes(activation_dtype="float32")``), 1.68x."""
STATE_BYTES = {"float32": 16, "bfloat16": 8}
"""Persistent bytes per parameter: weight + gradient + AdamW exp_avg + exp_avg_sq, all in
``model.dtype`` (torch's AdamW keeps its states in the parameter's dtype; no fp32 master copy)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def stated_world_size(path: str | Path) -> int:
    """The ``# world_size = N`` comment of a config file (1 when it has none)."""
    match = _WORLD_SIZE.search(Path(path).read_text())
    return int(match.group(1)) if match else 1


@dataclass
class ParamCounts:
    total: int
    root: int  # embedding + final norm + lm_head (one FSDP unit, kept gathered through backward)
    block_dense: int  # one block without its experts
    expert: int  # one expert of one block
    largest: int  # the largest single tensor (one layer's gate_up_proj, or the embedding)
    layers: int
    experts: int
    hidden: int
    kv_bytes_per_token: int  # bf16 K and V of every layer (vLLM may store sliding layers in less)

    @classmethod
    def of_preset(cls, preset: str) -> ParamCounts:
        from titan_rl.model import GptOssModelArgs

        return cls.of_args(GptOssModelArgs.from_preset(preset))

    @classmethod
    def of_args(cls, args: Any) -> ParamCounts:
        """Exact counts of a meta-device model (no memory); ``total`` equals ``num_params()``."""
        import torch

        from titan_rl.model import GptOss

        with torch.device("meta"):
            model = GptOss(args)
        params = dict(model.named_parameters())
        total = sum(p.numel() for p in params.values())
        if total != args.num_params()["total"]:
            raise RuntimeError(
                f"num_params() ({args.num_params()['total']}) disagrees with the model ({total})"
            )
        experts = sum(p.numel() for n, p in params.items() if ".mlp.experts." in n)
        root = sum(p.numel() for n, p in params.items() if not n.startswith("layers."))
        layers, n_experts = args.num_hidden_layers, args.num_local_experts
        return cls(
            total=total,
            root=root,
            block_dense=(total - experts - root) // layers,
            expert=experts // (layers * n_experts),
            largest=max(p.numel() for p in params.values()),
            layers=layers,
            experts=n_experts,
            hidden=args.hidden_size,
            kv_bytes_per_token=2 * args.num_key_value_heads * args.head_dim * 2 * layers,
        )


@dataclass
class MemoryEstimate:
    """Per-GPU memory of one layout in GB (1e9 bytes) by phase of an RL step; see ``estimate_memory``."""

    world_size: int
    params: int
    state_total: float
    state_per_gpu: float  # weights + grads + AdamW states (+ a frozen reference), this GPU's shard
    vllm_weights_per_gpu: float
    vllm_budget: float  # vllm_gpu_memory_utilization x GPU memory: weights + KV cache
    vllm_asleep: float  # what vLLM keeps on the GPU while the trainer runs
    kv_tokens_per_engine: int  # tokens the KV cache of one vLLM engine (TP GPUs) holds
    sync_transient: float  # one whole tensor gathered in bf16 for the weight sync (shards cast first)
    tokens_per_micro_batch: int
    activations: float
    gathered: float
    host_ram_load: float  # per node, while every rank reads one whole tensor at a time

    @property
    def kv_cache(self) -> float:
        return self.vllm_budget - self.vllm_weights_per_gpu

    @property
    def rollout_peak(self) -> float:
        return self.state_per_gpu + self.vllm_budget

    @property
    def sync_peak(self) -> float:
        return self.state_per_gpu + max(self.vllm_weights_per_gpu, self.vllm_asleep) + self.sync_transient

    @property
    def train_peak(self) -> float:
        return self.state_per_gpu + self.vllm_asleep + self.activations + self.gathered

    @property
    def peak(self) -> float:
        return max(self.rollout_peak, self.sync_peak, self.train_peak)


def activation_bytes(
    tokens: int, counts: ParamCounts, checkpoint: str = "none", fp32_activations: bool = False
) -> float:
    """Bytes autograd keeps for backward over one micro-batch of ``tokens`` per GPU."""
    per_layer = (
        FP32_ACTIVATION_BYTES_PER_TOKEN_LAYER if fp32_activations else ACTIVATION_BYTES_PER_TOKEN_LAYER
    )
    checkpointed = {"none": 0, "full": counts.layers, "selective": (counts.layers + 1) // 2}[checkpoint]
    kept = (counts.layers - checkpointed) * per_layer
    block_input = counts.hidden * (4 if fp32_activations else 2)
    recomputed = checkpointed * block_input + (per_layer if checkpointed else 0)
    return tokens * (kept + recomputed)


def estimate_memory(
    cfg: JobConfig, world_size: int, gpu_gb: float = GPU_GB, args: Any = None
) -> MemoryEstimate:
    """Estimated per-GPU memory of ``cfg`` on ``world_size`` GPUs, from exact parameter counts.

    - training state: ``STATE_BYTES[model.dtype]`` per parameter, sharded over dp_shard x cp
      (FSDP2 shards the dense parameters over dp_shard x cp, the experts over ep x efsdp, which is
      the same number of ranks; dp_replicate replicates); plus the weights of a frozen reference
      model, sharded the same way, when ``rl.kl_coef > 0``;
    - vLLM (``rollout.engine = "vllm"``): bf16 weights split over ``vllm_tensor_parallel_size``;
      ``vllm_gpu_memory_utilization x gpu_gb`` (weights + KV cache) while it generates; nothing
      while the trainer runs with ``vllm_sleep`` (sleep level 2 drops the weights, copied again
      from the trainer after its step, and frees the KV cache; no host RAM), everything without it;
    - weight sync (``VllmEngine.update_weights``): vLLM's weights are back on the GPU, and one
      parameter at a time is gathered whole in ``model.dtype`` plus its bf16 copy;
    - activations of one micro-batch: micro_batch_rows x seq_len / cp tokens x
      ``ACTIVATION_BYTES_PER_TOKEN_LAYER`` (``FP32_ACTIVATION_BYTES_PER_TOKEN_LAYER`` with
      ``model.activation_dtype = "float32"``) per layer that keeps its activations; a layer under
      ``parallelism.activation_checkpoint`` keeps only its input (bf16, or fp32 in that mode), plus
      one layer's activations while it is recomputed;
    - gathered (transient, training): bf16 weight + bf16 gradient of the root (embedding,
      lm_head: FSDP keeps it gathered from forward to backward) and of two blocks (one computing,
      one prefetched), each block holding num_local_experts / ep experts.
    Not counted: the CUDA context and NCCL buffers (~1-3 GB), allocator fragmentation, the fp32
    gradient-reduction buffers, vLLM's own activations and CUDA graphs. ``args``: the model's shapes
    (``GptOssModelArgs``, e.g. from ``model.hf_path``); default ``model.preset``'s.
    """
    counts = ParamCounts.of_preset(cfg.model.preset) if args is None else ParamCounts.of_args(args)
    par, train, rollout = cfg.parallelism, cfg.training, cfg.rollout
    shards = par.dp_shard * par.cp
    dtype_bytes = DTYPE_BYTES[cfg.model.dtype]
    state_total = counts.total * STATE_BYTES[cfg.model.dtype]
    reference = counts.total * dtype_bytes if cfg.rl.kl_coef > 0 else 0
    vllm = rollout.engine == "vllm"
    tp = rollout.vllm_tensor_parallel_size
    weights = counts.total * 2 / tp if vllm else 0.0
    budget = rollout.vllm_gpu_memory_utilization * gpu_gb * 1e9 if vllm else 0.0
    asleep = 0.0 if rollout.vllm_sleep else budget
    tokens = train.micro_batch_rows * train.seq_len // par.cp
    block = counts.block_dense + counts.experts // par.ep * counts.expert
    ranks_per_node = min(world_size, GPUS_PER_NODE)
    return MemoryEstimate(
        world_size=world_size,
        params=counts.total,
        state_total=state_total / 1e9,
        state_per_gpu=(state_total + reference) / shards / 1e9,
        vllm_weights_per_gpu=weights / 1e9,
        vllm_budget=budget / 1e9,
        vllm_asleep=asleep / 1e9,
        kv_tokens_per_engine=int(max(budget - weights, 0) * tp // counts.kv_bytes_per_token),
        sync_transient=counts.largest * 2 / 1e9 if vllm else 0.0,
        tokens_per_micro_batch=tokens,
        activations=activation_bytes(
            tokens, counts, par.activation_checkpoint, cfg.model.activation_dtype == "float32"
        )
        / 1e9,
        gathered=4 * (counts.root + 2 * block) / 1e9,
        host_ram_load=ranks_per_node * counts.largest * (dtype_bytes + 1) / 1e9,  # + MXFP4 blocks
    )


def memory_check(cfg: JobConfig, world_size: int) -> None:
    """For a GPU-sized model: the estimated peak memory per GPU (README, "Memory per GPU"), and a
    warning when it exceeds the GPU's (this machine's, else 80 GB)."""
    from titan_rl.preflight import model_args

    args = model_args(cfg)  # model.hf_path's shapes, else the preset's
    if args.num_params()["total"] < 1e9:  # the debug preset and other CPU-sized models
        return
    import torch

    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if torch.cuda.is_available() else GPU_GB
    peak = estimate_memory(cfg, world_size, gpu_gb, args).peak
    print(f"estimated peak {peak:.1f} GB per GPU of {gpu_gb:.0f} GB (README, 'Memory per GPU')")
    if peak > gpu_gb:
        print(
            "warning: that is more than the GPU holds: shard wider (parallelism.dp_shard, cp), "
            "parallelism.activation_checkpoint, fewer training.micro_batch_rows or a lower "
            "rollout.vllm_gpu_memory_utilization",
            file=sys.stderr,
        )


MEMORY_LAYOUTS: list[tuple[str, str, list[str], int | None]] = [
    ("20b, 1 node", "gpt_oss_20b_8xh100.toml", [], None),
    ("20b, 2 nodes", "gpt_oss_20b_multinode.toml", [], None),
    ("120b, 8 nodes", "gpt_oss_120b_multinode.toml", [], None),
    (
        "120b, 1 node (no config)",
        "gpt_oss_120b_multinode.toml",
        ["--model.dtype=bfloat16", "--parallelism.dp_shard=8", "--parallelism.cp=1"],
        8,
    ),
]
"""Table columns: (title, config file in train_configs/, overrides, world size or None = stated)."""


def _gb(value: float) -> str:
    return f"{value:,.1f} GB"


@dataclass
class _Column:
    title: str
    config: str
    overrides: list[str]
    cfg: JobConfig
    est: MemoryEstimate


def render_memory_table(gpu_gb: float = GPU_GB) -> str:
    """Markdown table of ``estimate_memory`` for ``MEMORY_LAYOUTS`` (one column each)."""
    from titan_rl.config.loader import load_config

    columns = []
    for title, name, overrides, world in MEMORY_LAYOUTS:
        path = CONFIG_DIR / name
        cfg = load_config(path, overrides)
        est = estimate_memory(cfg, world or stated_world_size(path), gpu_gb)
        columns.append(_Column(title, name, overrides, cfg, est))

    def layout(c: _Column) -> str:
        p, tp = c.cfg.parallelism, c.cfg.rollout.vllm_tensor_parallel_size
        return f"{c.est.world_size} = {p.dp_shard} x {p.cp}; ep {p.ep}; TP {tp}"

    rows = {
        "config": lambda c: f"`{c.config}`" + "".join(f" `{o}`" for o in c.overrides),
        "GPUs = dp_shard x cp; ep; vLLM TP": layout,
        "parameters": lambda c: f"{c.est.params / 1e9:.2f} B",
        "weights + grads + AdamW states": lambda c: (
            f"{_gb(c.est.state_total)} ({STATE_BYTES[c.cfg.model.dtype]} B/param, {c.cfg.model.dtype})"
        ),
        "**state** per GPU (/ dp_shard x cp)": lambda c: _gb(c.est.state_per_gpu),
        "**vLLM weights** per GPU (bf16, / TP)": lambda c: _gb(c.est.vllm_weights_per_gpu),
        f"**vLLM budget** = utilization x {gpu_gb:g} GB": lambda c: (
            f"{_gb(c.est.vllm_budget)} ({c.cfg.rollout.vllm_gpu_memory_utilization:g})"
        ),
        "&nbsp;&nbsp;of which KV cache": lambda c: (
            f"{_gb(c.est.kv_cache)}: {c.est.kv_tokens_per_engine / 1e6:.1f} M tokens per engine"
        ),
        "**sync** transient: one whole tensor in bf16": lambda c: _gb(c.est.sync_transient),
        "**activations** of one micro-batch": lambda c: (
            f"{_gb(c.est.activations)} ({c.est.tokens_per_micro_batch:,} tokens)"
        ),
        "**gathered** params + grads (transient)": lambda c: _gb(c.est.gathered),
        "rollout phase: state + vLLM budget": lambda c: _gb(c.est.rollout_peak),
        "weight-sync phase: state + vLLM weights + sync": lambda c: _gb(c.est.sync_peak),
        "training phase: state + activations + gathered": lambda c: _gb(c.est.train_peak),
        f"peak per GPU (of {gpu_gb:g} GB)": lambda c: (
            f"**{_gb(c.est.peak)}**" + ("" if c.est.peak <= gpu_gb else ": **does not fit**")
        ),
        "host RAM per node while loading": lambda c: _gb(c.est.host_ram_load),
    }
    lines = ["| | " + " | ".join(c.title for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cell(c) for c in columns) + " |" for label, cell in rows.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# measuring the activation constant, README blocks, command line


def measure_activation_bytes(
    tokens: int = 1024, preset: str = "20b", activation_dtype: str = "auto"
) -> float:
    """Saved-for-backward bytes per token per layer of a bf16 grad forward of ``preset``'s shape
    (``activation_dtype``: the model's, ``float32`` for fp32 activations over the bf16 weights).

    Two models (2 and 4 layers, 4 experts, vocabulary 512) differ by two layers; their difference
    over 2 x ``tokens`` is the per-layer cost. Takes about 30 s on a 2-core CPU at 1024 tokens.
    """
    import torch

    from titan_rl.model import GptOss, GptOssModelArgs

    def saved_bytes(layers: int) -> int:
        torch.manual_seed(0)
        args = GptOssModelArgs.from_preset(
            preset,
            num_hidden_layers=layers,
            num_local_experts=4,
            vocab_size=512,
            activation_dtype=activation_dtype,
        )
        model = GptOss(args).to(torch.bfloat16)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randint(0, 512, (1, tokens)), return_hidden=True)
        return sum(seen.values())

    return (saved_bytes(4) - saved_bytes(2)) / (2 * tokens)


def replace_block(text: str, name: str, content: str) -> str:
    """``text`` with the part between ``name``'s markers replaced by ``content``."""
    start, end = MARKERS[name]
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"expected one {start} ... {end} block")
    before, rest = text.split(start)
    _, after = rest.split(end)
    return f"{before}{start}\n{content}{end}{after}"


def read_block(text: str, name: str) -> str:
    start, end = MARKERS[name]
    return text.split(start, 1)[1].split(end, 1)[0].removeprefix("\n")


def generated_blocks() -> dict[str, str]:
    return {"config-reference": render_config_reference(), "memory-table": render_memory_table()}


def update_readme(text: str) -> str:
    for name, content in generated_blocks().items():
        text = replace_block(text, name, content)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="titan_rl.config.reference", description=__doc__.split("\n")[0])
    parser.add_argument("--memory", action="store_true", help="print the memory-estimate table instead")
    parser.add_argument("--write", metavar="README", help="rewrite the generated blocks of this file")
    parser.add_argument("--check", metavar="README", help="exit 1 if this file's generated blocks are stale")
    parser.add_argument(
        "--measure",
        action="store_true",
        help="measure the ACTIVATION_BYTES_PER_TOKEN_LAYER constants (~75 s)",
    )
    args = parser.parse_args(argv)
    if args.measure:
        print(f"{measure_activation_bytes():,.0f} bytes per token per layer")
        fp32 = measure_activation_bytes(activation_dtype="float32")
        print(f"{fp32:,.0f} with model.activation_dtype = float32")
        return 0
    if args.write or args.check:
        path = Path(args.write or args.check)
        text = path.read_text()
        new = update_readme(text)
        if args.check:
            if new != text:
                print(
                    f"{path} is stale: run python -m titan_rl.config.reference --write {path}",
                    file=sys.stderr,
                )
                return 1
            return 0
        path.write_text(new)
        print(f"updated {path}")
        return 0
    print(render_memory_table() if args.memory else render_config_reference(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
