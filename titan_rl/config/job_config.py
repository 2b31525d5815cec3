"""The run configuration: one dataclass per TOML section, every field documented.

A TOML file mirrors these sections (``[job]``, ``[model]``, ...); any field can be overridden on
the command line as ``--section.key=value``. See ``train_configs/debug_cpu.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Job:
    dump_folder: str = "./outputs/debug"
    """Folder for metrics.jsonl, the resolved config and checkpoints."""
    seed: int = 0
    """Seed of every random generator (model init, sampling, environment)."""
    description: str = ""
    """Free text shown at start-up."""


@dataclass
class Model:
    preset: str = "debug"
    """Model shape when no HF folder is given: debug, 20b or 120b."""
    hf_path: str = ""
    """HF checkpoint folder (config.json + safetensors) to start from; empty: random init."""
    attn_backend: str = "auto"
    """Attention backend: auto, eager, chunked or flash."""
    dtype: str = "float32"
    """Parameter dtype: float32 or bfloat16."""
    activation_dtype: str = "auto"
    """auto (activations in the compute dtype: bf16 under mixed precision) or float32: bf16 weights
    with the residual stream, norms, attention and every GEMM's result in fp32 (its operands
    rounded to bf16; the expert GEMMs by a Triton kernel on CUDA); the native engine's log-probs then
    agree with the trainer's far closer (benchmarks/README.md), for 1.7x activation memory, an fp32
    KV cache and fp32 attention (the chunked kernel, not flash). Native engine only."""


@dataclass
class Checkpoint:
    enable: bool = False
    """Write training-state checkpoints (DCP) and resume from the newest complete one."""
    interval: int = 50
    """Save every this many steps (and at the last step)."""
    folder: str = "checkpoint"
    """Checkpoint folder, relative to job.dump_folder unless absolute."""
    keep_last: int = 2
    """How many complete checkpoints to keep."""
    load_path: str = ""
    """Resume from this checkpoint folder instead of the newest one in `folder` (a branch: later
    checkpoints of other runs in `folder` move to `folder`/superseded; a restart of this branch
    with the same load_path resumes its own newest checkpoint)."""


@dataclass
class Parallelism:
    dp_replicate: int = 1
    """Data-parallel replicas (HSDP outer dimension)."""
    dp_shard: int = 1
    """FSDP shards; dp_replicate x dp_shard x cp must equal the number of processes."""
    cp: int = 1
    """Context-parallel degree (sequence sharding)."""
    cp_mode: str = "ulysses"
    """Context parallelism: ulysses or ring."""
    ep: int = 1
    """Expert-parallel degree, borrowed from dp_shard x cp."""
    activation_checkpoint: str = "none"
    """Recompute activations in backward: none, full (every block) or selective (every 2nd block)."""
    mixed_precision: str = "auto"
    """auto (bf16 compute with fp32 master weights on CUDA, also on one GPU; fp32 on CPU), bf16 or fp32."""
    gemm_reductions: str = "full"
    """cuBLAS bf16/fp16 GEMMs it splits along K sum their parts in fp32 (full) or, where faster, in
    bf16/fp16 (reduced: PyTorch's default). Few-row GEMMs, like decode steps', are likely split: full
    keeps that rounding out of the rollout engine's activations. Process-wide (vLLM runs in-process);
    not the grouped expert GEMMs; no effect on CPU."""
    compile: bool = False
    """torch.compile each transformer block (meant for CUDA bf16)."""
    compile_backend: str = "inductor"
    """torch.compile backend: inductor (kernels), or aot_eager / eager to debug tracing."""
    collective_timeout_s: float = 600.0
    """A collective that waits longer than this (e.g. on a dead rank) raises instead of hanging."""


@dataclass
class Training:
    steps: int = 10
    """RL steps (one rollout batch each)."""
    minibatches: int = 1
    """Optimizer steps per pass over a rollout batch (at most one per packed row per data-parallel
    rank; the LR schedule counts steps x minibatches x epochs); 1 with epochs = 1 is fully on-policy
    (old log-probs = new, detached)."""
    epochs: int = 1
    """Passes over each rollout batch (PPO epochs), each of minibatches optimizer steps; old
    log-probs and the recorded routing come from one no-grad pass before the first."""
    micro_batch_rows: int = 8
    """Packed rows per forward/backward (gradient accumulation inside a minibatch)."""
    seq_len: int = 256
    """Tokens per packed row; a trajectory longer than this is an error."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (<= 0 disables)."""
    max_skipped_steps: int = 3
    """Stop after this many consecutive steps with a non-finite loss or gradient (in any of their
    updates; such an update is skipped)."""


@dataclass
class Optimizer:
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""


@dataclass
class LRScheduler:
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps (the first at optimizer.lr / warmup_steps)."""
    decay: str = "cosine"
    """After warmup: cosine or constant."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of the peak learning rate."""


@dataclass
class RL:
    old_logprob_mode: str = "unified"
    """unified: old log-probs are the grad forward's own (ratio exactly 1); recompute: a second
    no-grad forward over each trajectory unpacked, as other frameworks do (for comparison)."""
    routing_replay: bool = True
    """With several minibatches or epochs, replay the experts recorded by the no-grad pass in the
    grad passes."""
    rollout_routing_replay: bool = False
    """The trainer's forwards use the experts the rollout engine chose at every position: no bf16
    near-tie routes a token to other experts in the trainer than in the engine (vLLM: needs a release
    with enable_return_routed_experts)."""
    advantage: str = "grpo"
    """Advantage estimator: grpo, dr_grpo (no std normalization; Dr.GRPO's loss is aggregation =
    seq-mean-token-sum-norm, a warning says so) or rloo."""
    drop_uninformative_groups: bool = False
    """DAPO dynamic sampling: train without the groups whose rewards are all equal (their tokens would
    still count in the loss's normalizer); if every group is so, the step trains on all."""
    policy_loss: str = "ppo"
    """ppo (token ratio, clip-higher) or gspo (sequence ratio)."""
    clip_eps_low: float = 0.2
    """PPO lower clip: ratio >= 1 - clip_eps_low."""
    clip_eps_high: float = 0.28
    """PPO upper clip (clip-higher): ratio <= 1 + clip_eps_high."""
    dual_clip: float = 0.0
    """Dual-clip constant c > 1 for negative advantages (policy_loss = ppo); 0 disables."""
    gspo_eps_low: float = 3e-4
    """GSPO lower clip of the sequence ratio."""
    gspo_eps_high: float = 4e-4
    """GSPO upper clip of the sequence ratio."""
    aggregation: str = "token-mean"
    """token-mean, seq-mean-token-mean or seq-mean-token-sum-norm (Dr.GRPO: each sequence's token sum
    over a constant, rollout.max_new_tokens, or env.max_episode_tokens for multi-turn environments)."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to a frozen reference model; 0 runs no reference."""
    kl_estimator: str = "k3"
    """KL estimator: k1, k2 or k3."""
    kl_penalty: str = "loss"
    """Where the KL to the reference goes: loss (kl_coef x the per-token estimate, a loss term) or
    reward (each trajectory's reward minus kl_coef x the sum of the estimate over its sampled tokens,
    before the advantages; the policy's log-probs are the rollout engine's)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (entropy is always logged)."""
    router_aux_loss_coef: float = 0.0
    """Weight of the MoE load-balancing loss (0: off, the RL default): each trajectory's Switch
    balance term (experts / top_k) x sum_e f_e P_e (1 when balanced), averaged over layers and the
    minibatch's trajectories (router/balance_loss); HF's router_aux_loss_coef weighs a batch-wide
    sum, top_k times this. With correction = mis it is rescaled with the loss by the kept share."""
    correction: str = "none"
    """Rollout correction: none, tis (truncated weights) or mis (masked: the dropped tokens leave the
    loss, its normalizer and the metrics over the kept tokens, as if they were not in the batch)."""
    correction_level: str = "token"
    """Importance weights per token or per sequence."""
    correction_threshold: float = 2.0
    """Threshold C of TIS / MIS."""


@dataclass
class Rollout:
    engine: str = "native"
    """Rollout engine: native (the trainer's own model, CPU or GPU) or vllm (CUDA; extra '.[gpu]')."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs use the same one."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1 disables)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 disables)."""
    max_new_tokens: int = 16
    """Tokens per response (agentic environments: per assistant turn)."""
    group_size: int = 4
    """Samples per prompt (the advantage group)."""
    prompts_per_step: int = 8
    """Prompts per RL step; a step trains on prompts_per_step x group_size trajectories."""
    max_batch_rows: int = 0
    """native: sequences decoding at once per rank; more wait in a queue and take the rows of
    finished ones (continuous batching); 0: all of them at once."""
    check_every: int = 0
    """native: decode steps between two host reads of the sampled tokens (stop-token checks); 0: 8 on
    a GPU, 1 on the CPU."""
    decode: str = "auto"
    """native: eager (finished rows leave the batch), static (fixed shapes: finished rows stay parked,
    attention over a few fixed cache extents), cuda_graph (static, each step replayed as a CUDA graph;
    bf16 compute on sm90 / sm100, no expert parallelism), or auto (cuda_graph where it can run, else
    eager)."""
    vllm_gpu_memory_utilization: float = 0.4
    """vllm: fraction of GPU memory vLLM may take (weights + KV cache), colocated with training."""
    vllm_tensor_parallel_size: int = 1
    """vllm: tensor-parallel degree of each vLLM engine."""
    vllm_sleep: bool = True
    """vllm: put vLLM to sleep (free its KV cache) while the trainer runs; wake it for rollouts."""
    vllm_batch_invariant: bool = False
    """vllm: ask vLLM (>= 0.12) for batch-invariant kernels (results independent of batch composition)."""
    vllm_max_model_len: int = 0
    """vllm: longest sequence vLLM serves; 0 uses training.seq_len."""


@dataclass
class Env:
    name: str = "token_preference"
    """token_preference (single-turn toy), tool_lookup (multi-turn tool task), math (GSM8K-style), or
    your own AgentEnvironment as "package.module:Factory" (importable; built with no arguments)."""
    prompt_len: int = 8
    """token_preference: prompt tokens per episode."""
    target_modulus: int = 8
    """token_preference: token ids divisible by this are rewarded."""
    num_tasks: int = 1000
    """tool_lookup: number of distinct tasks."""
    keys_per_task: int = 3
    """tool_lookup: keys the lookup tool knows per task."""
    data_path: str = ""
    """math: a JSONL file of {"question", "answer"}; empty: the shipped sample."""
    python_tool: bool = False
    """math: offer a sandboxed Python tool (isolated: needs root and Linux namespaces)."""
    allow_unisolated_python_tool: bool = False
    """math: allow python_tool where the sandbox cannot isolate; its code can read the task's answers."""
    max_turns: int = 4
    """Agentic episodes: assistant turns per episode."""
    max_episode_tokens: int = 256
    """Agentic episodes: token budget of a whole episode (prompt, turns, tool results)."""
    tool_timeout_s: float = 10.0
    """Agentic episodes: wall-clock limit of one tool call (math's Python tool: its code gets a second
    less, as wall-clock and CPU limit, so the sandbox stops it and the model sees its output)."""
    reward_timeout_s: float = 60.0
    """Wall-clock limit of one reward call: past it the episode scores 0 and counts in
    env/reward_errors (as a reward that raises or returns NaN does); 0 calls the reward on the main
    thread with no limit (for reward code that uses signals, e.g. signal.alarm)."""
    reward_concurrency: int = 1
    """Reward calls a rank runs at once, on worker threads (with reward_timeout_s > 0): more for
    I/O-bound rewards (a judge service, where one that hangs then costs one limit per this many
    calls); CPU-bound Python rewards share the GIL and would each take this many times as long. The
    reward function must be thread-safe."""
    system_prompt: str = "auto"
    """Agentic episodes: gpt-oss (the system message the released models were trained on; the
    environment's instructions go in the developer message), minimal (the environment's messages as
    they are: short prompts for models trained from scratch), or auto: gpt-oss with model.hf_path
    (minimal if its tokenizer is the built-in 512-token one of the debug preset)."""


@dataclass
class Sft:
    steps: int = 0
    """Supervised warm-up steps on the environment's demonstrations before RL (0: none)."""
    lr: float = 3e-3
    """Warm-up learning rate (AdamW, constant)."""
    batch_size: int = 16
    """Demonstrations per warm-up step."""


@dataclass
class Metrics:
    log_freq: int = 1
    """Print a console line every this many steps (metrics.jsonl gets every step)."""
    enable_wandb: bool = False
    """Also log to Weights & Biases (pip install -e '.[wandb]')."""
    wandb_project: str = "titan_rl"
    """wandb project."""
    wandb_mode: str = "offline"
    """wandb mode: offline (no network), online or disabled."""


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    parallelism: Parallelism = field(default_factory=Parallelism)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    rl: RL = field(default_factory=RL)
    rollout: Rollout = field(default_factory=Rollout)
    env: Env = field(default_factory=Env)
    sft: Sft = field(default_factory=Sft)
    metrics: Metrics = field(default_factory=Metrics)
