"""The built-in rollout engine: sampling with the trainer's own ``GptOss`` module.

Same module, same attention and MoE code as the trainer, so there is no second model
implementation and no weight sync (the engine holds a reference to the live module). This
engine prefills the left-padded prompts with the model's ordinary attention backend, then decodes
one token at a time against a preallocated KV cache (``titan_rl.model.kv_cache``; sliding-window
layers keep only their window). Decode steps take one-query attention against the cache, the
grouped expert kernel as in training (it reads no counts on the host), and the LM head through
``DecodeHead``.

A step samples every row's next token from its hidden state, then decodes that token (key and
value written, the next hidden state computed). It does not wait for the device: sampling
(temperature, top-k, top-p, the token's log-prob) runs where the model runs, and the host reads the
sampled ids and log-probs once every ``check_every`` steps to find stop tokens. A row whose episode
ended then leaves the batch and the cache (``decode="eager"``) or stays parked in it (``static``
and ``cuda_graph``, whose shapes never change), or, while prompts wait (``max_batch_rows`` fewer
than the prompts), takes the next prompt: its prefill is written over the freed cache row, so a few
long episodes do not keep the others waiting. ``cuda_graph`` replays the step as a CUDA graph.

Under ``torch.distributed`` every rank generates its contiguous share of the prompts and the ranks
all-gather the completions (every rank returns all of them, in order), with each FSDP module's
weights gathered once per ``generate`` (``titan_rl.parallel.fsdp.gathered_weights``), not once per
token. With expert parallelism every MoE forward is an all-to-all that all ranks must join with
the same tokens, so there every rank generates every prompt. The sampling noise is keyed by prompt
and token index (``titan_rl.rl.rollout.noise``), so the completions do not depend on how the
prompts are split across ranks or scheduled into rows.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from titan_rl.model import GptOss
from titan_rl.model.grouped_gemm import fused_grouped_mm_on, grouped_mm_aligned
from titan_rl.model.kv_cache import KVCache
from titan_rl.model.moe import cpu_decode_experts
from titan_rl.parallel.expert_parallel import ExpertParallelExperts
from titan_rl.parallel.fsdp import gathered_weights
from titan_rl.rl.rollout.decode_rows import CudaGraphStep, DecodeRows
from titan_rl.rl.rollout.noise import draw_call_seed, exponential_noise, row_keys
from titan_rl.rl.rollout.sampling import DecodeHead, SamplingParams, sample_next


@dataclass
class Completion:
    tokens: list[int]  # sampled tokens, the stop token included when one ended the episode
    logprobs: list[float]  # log-prob of each sampled token under the tempered distribution
    finish_reason: str  # "stop" or "length"
    # with NativeEngine(record_routing=True): the experts every MoE layer chose for each token the
    # engine ran to sample the tokens after it, i.e. prompt + tokens[:-1] (vLLM's routed_experts
    # layout): int16 [len(prompt) + len(tokens) - 1, layers, top_k]. None without tokens.
    routing: torch.Tensor | None = None


@contextmanager
def full_sequence_attention(model: GptOss):
    """Undo a context-parallel re-placement of attention for the duration (rollouts see whole rows)."""
    saved = [block.self_attn.attention_fn for block in model.layers]
    for block in model.layers:
        block.self_attn.attention_fn = None
    try:
        yield
    finally:
        for block, fn in zip(model.layers, saved):
            block.self_attn.attention_fn = fn


def share_of(count: int, world: int, rank: int) -> range:
    """Rank ``rank``'s contiguous, balanced share of ``count`` prompts (the first ``count % world``
    ranks get one more): concatenating the shares in rank order gives back the original order."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


DECODE_MODES = ("auto", "eager", "static", "cuda_graph")


def same_tokens_everywhere(tokens: torch.Tensor) -> None:
    """Under expert parallelism every rank decodes every row and decides on its own when a row ends
    and which prompt takes it: the ranks must sample the same tokens, or they run different steps
    and a collective of the next MoE layer hangs. They do when their logits are bitwise equal; this
    checks it at each host read (a checksum, MIN and MAX over the ranks) and raises on every rank
    instead of hanging. ``tokens [rows, steps]`` int64, on the model's device."""
    weights = torch.arange(1, tokens.numel() + 1, device=tokens.device).view_as(tokens)
    checksum = (tokens * (2 * weights + 1)).sum().view(1).repeat(2)
    checksum[1] = -checksum[1]
    dist.all_reduce(checksum, op=dist.ReduceOp.MAX)  # [max, -min]
    if checksum[0] != -checksum[1]:
        raise RuntimeError(
            "expert-parallel ranks sampled different tokens in the same decode steps (their logits "
            "differ bitwise): they would stop decoding at different steps and hang"
        )


class NativeEngine:
    """Batched sampling from a live ``GptOss``; reproducible through its own generator.

    ``max_batch_rows``: at most this many prompts decode at once (None: all of them); the rest wait
    and take the rows of finished episodes. ``check_every``: decode steps between two host reads of
    the sampled tokens (a finished row may decode up to ``check_every`` wasted steps); None: 8
    on an accelerator, 1 on CPU, where the host computes anyway and reading costs nothing, so
    finished rows may as well leave at once. The completions do not depend on it.

    ``record_routing``: also return, per completion, the experts each MoE layer chose for every
    position (``Completion.routing``), so that the trainer can replay them (``rl.rollout_routing_replay``):
    recorded on the device with the step, read with the sampled tokens.

    ``decode``: how decode steps run.

    - ``eager`` (default): finished rows leave the batch and attention reads only the cache slots
      that can hold keys yet; every step's shapes follow the batch.
    - ``static``: fixed shapes, what a CUDA graph needs: a finished row stays in the batch, parked,
      until a waiting prompt takes it, and attention reads a fixed number of cache slots (with the
      slot mask): the longest position yet rounded up to a power of two from ``min_extent``, capped
      at the row length. Whole-cache reads would cost bandwidth with long rows (gpt-oss-20b, 12
      full-attention layers, bf16: 24 KB per slot and row, so 128 rows x 4,096 slots would read
      12.9 GB a step); the buckets keep it within 2x of ``eager``'s. Same completions as
      ``eager``; runs anywhere (on its own only slower: for tests and comparison).
    - ``cuda_graph``: ``static`` with the step (sampling, then the decode of the sampled tokens)
      captured as a CUDA graph once per extent a ``generate`` call reaches, and replayed: no kernel
      launches from Python per step. Needs CUDA, bf16 compute weights on sm90 or sm100 (the fused
      grouped expert kernel; elsewhere it reads counts on the host) and no expert parallelism; FSDP
      is fine (its weights are gathered for the call and its hooks paused: ``gathered_weights``),
      and so are activation checkpointing (no-grad forwards skip it) and compiled blocks (the two
      static modes run them uncompiled, their prefills included).
    - ``auto`` (the config's default): ``cuda_graph`` where it can run, checked at each call,
      else ``eager``. On one H200 with gpt-oss-20b shapes ``cuda_graph`` decoded 2.3x (batch 32)
      to 2.6x (batch 128) faster than ``eager`` (benchmarks/README.md).
    """

    min_extent = 128  # the static modes' smallest attention extent (cache slots read per step)

    def __init__(
        self,
        model: GptOss,
        seed: int = 0,
        max_batch_rows: int | None = None,
        check_every: int | None = None,
        decode: str = "eager",
        record_routing: bool = False,
    ) -> None:
        if max_batch_rows is not None and max_batch_rows < 1:
            raise ValueError(f"max_batch_rows = {max_batch_rows}: use None (all prompts at once) or >= 1")
        if check_every is not None and check_every < 1:
            raise ValueError(f"check_every = {check_every}: use >= 1 (1 reads the tokens every step)")
        if decode not in DECODE_MODES:
            raise ValueError(f"decode = {decode!r}: use one of {', '.join(DECODE_MODES)}")
        self.model = model
        self.generator = torch.Generator(device="cpu").manual_seed(seed)  # the state checkpoints save
        self.max_batch_rows = max_batch_rows
        self.check_every = check_every
        self.decode = decode
        self.mode = "eager" if decode == "auto" else decode  # this call's (auto: resolved in generate)
        self.record_routing = record_routing
        self.captures = 0  # CUDA graphs captured so far (cuda_graph: one per extent used in a call)
        self.capture_seconds = 0.0  # host time spent on them (warm-up step, capture, instantiation)

    def update_weights(self, model: torch.nn.Module) -> None:
        """Nothing to copy: the engine samples from the trainer's module itself."""
        self.model = model

    # The rest of the RolloutEngine lifecycle (titan_rl/rl/rollout/engine.py). Nothing to release
    # or take back: the weights are the trainer's own and the KV cache lives only within a call.
    def sleep(self) -> None:
        """Nothing to free between calls (see above)."""

    def wake_up(self) -> None:
        """Nothing to take back (see above)."""

    def rng_state(self) -> list[int]:
        """The sampling generator's state as ints (its bytes): all a resumed run needs to draw the
        same tokens, since the weights and prompts come back from the checkpoint and the step."""
        return self.generator.get_state().tolist()

    def set_rng_state(self, state: list[int]) -> None:
        self.generator.set_state(torch.tensor(state, dtype=torch.uint8))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """One completion per prompt, in order; under ``torch.distributed`` every rank returns all."""
        if params.max_new_tokens < 1:
            return [Completion([], [], "length") for _ in prompts]
        world, rank = self._split()
        share = share_of(len(prompts), world, rank)
        mine, start = [prompts[i] for i in share], share.start
        # every rank gathers the weights, also one without prompts (the gathers are collective)
        with (
            full_sequence_attention(self.model),
            gathered_weights(self.model),
        ):
            self.mode = self._resolve_mode()  # here: FSDP's gathered weights are in its compute dtype
            # eager only: a captured step cannot read the experts' counts, and static decode is the
            # CPU stand-in of the captured one (the same products)
            experts = cpu_decode_experts(self.model) if self.mode == "eager" else nullcontext()
            with self._compile_stance(), experts:
                seed = draw_call_seed(self.generator)  # on every rank: their generators stay equal
                completions = self._generate(mine, params, seed, start) if mine else []
        if world == 1:
            return completions
        parts: list[list[Completion] | None] = [None] * world
        dist.all_gather_object(parts, completions)
        return [c for part in parts for c in part]

    def _resolve_mode(self) -> str:
        """The decode mode of this call: ``cuda_graph`` (checked) as configured, or for ``auto`` where
        it can run, else ``eager``."""
        if self.decode == "cuda_graph":
            self._check_graphable()
        elif self.decode == "auto":
            try:
                self._check_graphable()
            except ValueError:
                return "eager"
            return "cuda_graph"
        return self.decode

    def _compile_stance(self):
        """``static`` and ``cuda_graph`` run compiled blocks (``parallelism.compile``) uncompiled: a
        recompile for a new cache length inside a capture would compile (and autotune, which
        synchronizes) where nothing may, and the graph already removes the launches compiling saves."""
        if self.mode == "eager":
            return nullcontext()
        return torch.compiler.set_stance("force_eager")

    def _check_graphable(self) -> None:
        """Why ``cuda_graph`` cannot run for this model, as a ``ValueError``; nothing if it can. Every
        case is a place where a decode step would read a value on the host, which a capture refuses."""
        weight, args = self.model.lm_head.weight, self.model.args
        why = None
        if weight.device.type != "cuda":
            why = f"the model is on {weight.device.type}, not CUDA"
        elif any(isinstance(block.mlp.experts, ExpertParallelExperts) for block in self.model.layers):
            why = "expert parallelism runs an all-to-all with host-side split sizes"
        elif not fused_grouped_mm_on(weight.device, weight.dtype):
            major, minor = torch.cuda.get_device_capability(weight.device)
            why = (
                "the grouped expert kernel reads no counts on the host only in bf16 on sm90 or sm100 "
                f"(have {weight.dtype}, sm{major}{minor})"
            )
        elif not grouped_mm_aligned(weight.dtype, args.hidden_size, args.intermediate_size):
            why = (
                "the grouped expert kernel needs 16-byte rows: hidden_size and intermediate_size "
                f"divisible by 8 in bf16 (have {args.hidden_size} and {args.intermediate_size})"
            )
        if why:
            raise ValueError(f"decode = 'cuda_graph' cannot run here: {why}; use decode = 'eager'")

    def _extent(self, need: int, max_len: int) -> int:
        """The static modes' attention extent for positions < ``need``: a power of two from
        ``min_extent``, capped at ``max_len``, so a call captures a few graphs, not one per step."""
        extent = self.min_extent
        while extent < need:
            extent *= 2
        return min(extent, max_len)

    def _split(self) -> tuple[int, int]:
        """(ranks sharing the prompts, this rank's index among them): 1 and 0 without
        ``torch.distributed``, or with expert parallelism (see the module docstring)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return 1, 0
        if self._expert_parallel():
            return 1, 0
        return dist.get_world_size(), dist.get_rank()

    def _expert_parallel(self) -> bool:
        return any(isinstance(block.mlp.experts, ExpertParallelExperts) for block in self.model.layers)

    def _prefill(
        self, prompts: list[list[int]], cache: KVCache
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Left-padded prompts through a fresh ``cache`` -> each row's last hidden state ``[B, hidden]``,
        and with ``record_routing`` each prompt's routing ``[len(prompt), layers, top_k]`` (int16, on
        the device)."""
        model = self.model
        device = model.lm_head.weight.device
        batch, width = len(prompts), max(len(p) for p in prompts)
        tokens = torch.zeros(batch, width, dtype=torch.long)
        positions = torch.full((batch, width), -1, dtype=torch.long)
        document_ids = torch.zeros(batch, width, dtype=torch.long)  # padding 0, prompt 1
        for i, prompt in enumerate(prompts):
            pad = width - len(prompt)
            tokens[i, pad:] = torch.tensor(prompt)
            positions[i, pad:] = torch.arange(len(prompt))
            document_ids[i, pad:] = 1
        out = model(
            tokens.to(device),
            positions=positions.to(device),
            document_ids=document_ids.to(device),
            return_hidden=True,
            return_expert_indices=self.record_routing,
            kv_cache=cache,
        )
        hidden, routing = out if self.record_routing else (out, None)
        last = hidden[:, -1].contiguous()  # a copy: a view would keep the whole [B, T, hidden] output alive
        if routing is None:
            return last, None
        routing = routing.to(torch.int16).permute(1, 2, 0, 3)  # [B, T, layers, top_k]
        return last, [routing[i, width - len(p) :].clone() for i, p in enumerate(prompts)]

    def _decode(
        self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, reach: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One token per row, ``tokens [B]`` at ``positions [B, 1]`` (all < ``reach``) -> ``[B, hidden]``,
        and with ``record_routing`` the tokens' routing ``[B, layers, top_k]`` (int16)."""
        cache.extent = reach
        out = self.model(
            tokens[:, None],
            positions=positions,
            return_hidden=True,
            return_expert_indices=self.record_routing,
            kv_cache=cache,
        )
        if not self.record_routing:
            return out[:, -1], None
        hidden, routing = out
        return hidden[:, -1], routing[:, :, -1].transpose(0, 1).to(torch.int16)

    def _step(
        self, head: DecodeHead, cache: KVCache, rows: DecodeRows, params: SamplingParams, reach: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Sample every row's next token from ``rows.hidden``, then decode it (KV written, the next
        hidden state computed); ``rows`` advances in place. -> (tokens ``[R]``, log-probs ``[R]``,
        the tokens' routing ``[R, layers, top_k]`` or None)."""
        tokens, logprobs = self._sample(head, rows.hidden, params, rows.keys, rows.drawn)
        hidden, routing = self._decode(cache, tokens, rows.positions, reach)
        rows.hidden.copy_(hidden)
        rows.positions.add_((rows.positions >= 0).long())  # parked rows stay at -1
        rows.drawn.add_(1)
        return tokens, logprobs, routing

    def _generate(
        self, prompts: list[list[int]], params: SamplingParams, seed: int, first_id: int = 0
    ) -> list[Completion]:
        """``prompts`` are the call's prompts ``first_id``, ``first_id + 1``, ...: their noise keys."""
        model = self.model
        device = model.lm_head.weight.device
        static = self.mode != "eager"
        max_len = max(len(p) for p in prompts) + params.max_new_tokens  # any prompt fits any row
        outputs = [Completion([], [], "length") for _ in prompts]
        stop = set(params.stop_token_ids)
        waiting = deque(range(len(prompts)))
        check_every = self.check_every or (1 if device.type == "cpu" else 8)
        first = [waiting.popleft() for _ in range(min(self.max_batch_rows or len(prompts), len(prompts)))]
        cache = KVCache(model.args, len(first), max_len, device)  # the keys' dtype: fp32 activations too
        head = DecodeHead(model.lm_head.weight, len(first))
        # record_routing: each prompt's routing pieces on the host, in position order, and the
        # prefills' pieces still on the device (moved with the next read: a prefill does not wait)
        routes: list[list[torch.Tensor]] = [[] for _ in prompts]
        prefilled: list[tuple[int, torch.Tensor]] = []

        def fresh_rows(ids: list[int], cache: KVCache) -> DecodeRows:
            """Prompts ``ids`` prefilled into ``cache``: their rows' state before the first token."""
            hidden, routing = self._prefill([prompts[i] for i in ids], cache)
            prefilled.extend(zip(ids, routing or []))
            return DecodeRows(
                hidden=hidden,
                positions=torch.tensor([[len(prompts[i])] for i in ids], device=device),
                keys=row_keys(seed, torch.tensor([first_id + i for i in ids], device=device)),
                drawn=torch.zeros(len(ids), dtype=torch.long, device=device),
            )

        rows = fresh_rows(first, cache)
        # host-side state of each batch (and cache) row: its prompt (None: parked), its next position
        prompt_of: list[int | None] = list(first)
        position = [len(prompts[i]) for i in first]

        def step(reach: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            return self._step(head, cache, rows, params, reach)

        graphs: dict[int, CudaGraphStep] = {}  # cuda_graph: one per attention extent, one pool
        pool = torch.cuda.graph_pool_handle() if self.mode == "cuda_graph" else None
        while True:
            live = [r for r, i in enumerate(prompt_of) if i is not None]
            remaining = [params.max_new_tokens - len(outputs[prompt_of[r]].tokens) for r in live]
            steps = min(check_every, *remaining)
            # every row reaches max_new_tokens with this read and nobody waits: the last step need not
            # decode its tokens (the only decode whose result nothing would read)
            ending = not waiting and all(n == steps for n in remaining)
            drawn, logprobs, routed = [], [], []
            for s in range(steps):  # no host reads in here: the device runs ahead
                # attention reads only the slots that can hold keys by now: exactly that many in
                # eager mode, rounded up to a few fixed extents in the static ones
                reach = max(position[r] for r in live) + s + 1
                reach = self._extent(reach, max_len) if static else reach
                if ending and s == steps - 1:
                    tokens, token_logprobs = self._sample(head, rows.hidden, params, rows.keys, rows.drawn)
                    routing = None  # never fed: the last token of every row, which routing leaves out
                elif self.mode == "cuda_graph":
                    if reach not in graphs:
                        started = time.perf_counter()
                        graphs[reach] = CudaGraphStep(functools.partial(step, reach), rows, pool)
                        self.captures += 1
                        self.capture_seconds += time.perf_counter() - started
                    tokens, token_logprobs, routing = graphs[reach]()
                else:
                    tokens, token_logprobs, routing = step(reach)
                drawn.append(tokens)
                logprobs.append(token_logprobs)
                if routing is not None:
                    routed.append(routing)
            finished = []
            if self._expert_parallel() and dist.is_initialized():
                same_tokens_everywhere(torch.stack(drawn, dim=1))
            read_ids, read_logprobs = self._read(drawn, logprobs)
            for i, piece in prefilled:  # the same read: the decoded steps' [rows, steps, layers, top_k]
                routes[i].append(piece.cpu())
            prefilled.clear()
            read_routing = torch.stack(routed, dim=1).cpu() if routed else None
            for row, (i, ids, lps) in enumerate(zip(prompt_of, read_ids, read_logprobs)):
                if i is None:
                    continue
                taken = len(outputs[i].tokens)
                for token, logprob in zip(ids, lps):
                    outputs[i].tokens.append(token)
                    outputs[i].logprobs.append(logprob)
                    if token in stop:  # later tokens of this row were decoded in vain
                        outputs[i].finish_reason = "stop"
                        break
                if read_routing is not None:  # (a row's last token never has a decoded step)
                    routes[i].append(read_routing[row, : len(outputs[i].tokens) - taken])
                if outputs[i].finish_reason == "stop" or len(outputs[i].tokens) == params.max_new_tokens:
                    finished.append(row)
                position[row] += steps
            refill = finished[: len(waiting)]  # rows that take the next waiting prompts
            leaving = finished[len(refill) :]
            if len(finished) == len(live) and not refill:
                if self.record_routing:  # the last token's experts decided nothing that was kept
                    for prompt, output, pieces in zip(prompts, outputs, routes):
                        output.routing = torch.cat(pieces)[: len(prompt) + len(output.tokens) - 1]
                return outputs
            if leaving and static:  # parked: they stay in the batch, their writes go nowhere
                parked = torch.tensor(leaving, device=device)
                rows.positions.index_fill_(0, parked, -1)
                for row in leaving:
                    prompt_of[row] = None
            elif leaving:  # they leave the batch and the cache
                keep = [r for r in range(len(prompt_of)) if r not in leaving]
                kept = torch.tensor(keep, device=device)
                cache.keep_rows(kept)
                rows = rows.select(kept)
                prompt_of, position = [prompt_of[r] for r in keep], [position[r] for r in keep]
                refill = [keep.index(r) for r in refill]
            if refill:  # their prefill replaces the whole cache row and the row's state
                new = [waiting.popleft() for _ in refill]
                fresh = KVCache(model.args, len(new), max_len, device)
                at = torch.tensor(refill, device=device)
                rows.index_copy_(at, fresh_rows(new, fresh))
                cache.replace_rows(at, fresh)
                for row, i in zip(refill, new):
                    prompt_of[row], position[row] = i, len(prompts[i])

    @staticmethod
    def _read(
        drawn: list[torch.Tensor], logprobs: list[torch.Tensor]
    ) -> tuple[list[list[int]], list[list[float]]]:
        """The host's one read per ``check_every`` steps: sampled ids and log-probs ``[B][steps]``."""
        return torch.stack(drawn, dim=1).tolist(), torch.stack(logprobs, dim=1).tolist()

    def _sample(
        self,
        head: DecodeHead,
        hidden: torch.Tensor,
        params: SamplingParams,
        keys: torch.Tensor,
        steps: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next tokens ``[B]`` from the final hidden states ``[B, hidden]`` of rows with noise
        ``keys [B]`` at token index ``steps [B]``, and their log-probs under the tempered
        distribution (before top-k / top-p filtering), on the model's device."""
        logits = head(hidden)  # [B, vocab]
        noise = None if params.top_k == 1 else exponential_noise(keys, steps, logits.shape[-1])
        return sample_next(logits, params, noise)
