"""Every GPU check of the open GPU work in one run: each part under its own timeout, results in a folder.

A borrowed GPU comes with minutes, not hours, so this is the one command to run there. Each part
runs in its own process (a crash or hang costs that part only) and writes ``<out>/<part>.txt``;
``<out>/summary.txt`` gets one line per part (exit code, seconds) as it finishes, so a run cut
short still says what it did. From the repo root:

    python benchmarks/gpu_checks.py --out $OUT                     # a CUDA machine
    python benchmarks/gpu_checks.py --out $OUT --only bench_model  # some parts
    python benchmarks/gpu_checks.py --out /tmp/dry --tiny          # the same parts, tiny shapes (CPU)

Parts, in order (seconds allowed; the default five fit one 10-minute device call, 540 s in all):
- ``env`` (20): torch / transformers versions, the device (and ``nvidia-smi.txt`` where it exists).
- ``cuda_tests`` (90): the CUDA-only tests (flash sink kernels with and without a host layout, GQA)
  and the bf16 numerics tests, through pytest when the interpreter has it, else by calling them.
- ``train`` (80): 3 steps of ``train_configs/smoke_cpu.toml`` on the device (one-rank FSDP mixed
  precision, flash attention, device sampling, the out_dtype log-prob GEMMs, rollout routing
  replay).
- ``bench_model`` (180): the training-step table of benchmarks/README.md (gpt-oss-20b shapes, 4
  layers, bf16, T = 4,096 and 65,536 against HF eager and flex_attention).
- ``bench_generate`` (170): native engine (eager and CUDA-graph decode) vs HF ``generate``,
  batches 32 and 128, with the engine / trainer log-prob agreement, then (bf16, batch 32) where
  the difference comes from: routing flips vs rounding, and bf16 vs fp32. A decode mode that fails is
  reported in the table and the others still run.
- ``bench_model_compile`` (200): the T = 4,096 row again with ``--compile``; only with ``--only``.
- ``train_cuda_graph`` (90): the ``train`` part with ``--rollout.decode=cuda_graph`` (rollouts
  replayed as CUDA graphs under one-rank FSDP); only with ``--only``.
- ``bench_routing_replay`` (150): the bf16 training run with and without rollout routing replay,
  6 steps each, on the device's kernels (benchmarks/README.md); only with ``--only``.
- ``bench_agreement`` (240): the bf16 engine / trainer agreement at gpt-oss-20b shapes (2 layers)
  on random weights and after 200 steps of training on a Markov language; only with ``--only``.
- ``bench_precision`` (200): which roundings separate the bf16 engine and trainer, at gpt-oss-20b
  shapes (4 layers); only with ``--only``.
- ``bench_precision_trained`` (300): ``bench_precision``'s variants on the weights
  ``bench_agreement`` trained for 200 steps (its shapes, 2 layers; saved outside ``--out``, in
  ``<tmp>/titan_rl_trained``), where the routers no longer nearly tie; only with ``--only``.
- ``fp32_activations`` (300): what ``model.activation_dtype = "float32"`` costs: the training step
  (``bench_model``, T = 4,096) and CUDA-graph decoding (``bench_generate``, batches 32 and 128),
  each against HF in the same run as the default parts measure bf16; only with ``--only``.
- ``bench_gemm_out`` (100): what fp32 outputs cost a bf16 GEMM (linears, LM head, grouped experts) at
  gpt-oss-20b shapes, and whether the overloads exist and differentiate; only with ``--only``.

``--only`` runs the parts it names in the order it names them (the most wanted first, so a run cut
short by the device's time limit loses the least). ``--budget SECONDS`` (a little under the device
call's timeout) caps the whole run: each part gets at most what is left and one that would get
under 30 s is skipped, so the call's own timeout never cuts a part off. A SIGTERM stops the running
part's process group with this script; parts print unbuffered, so a part killed at its limit keeps
the tables it printed.

``--python`` picks the interpreter for the parts (default: this one); the lent GPU machines keep
torch in ``/opt/torch/.venv/bin/python3``, which ``--python auto`` picks when it exists.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LENT_PYTHON = "/opt/torch/.venv/bin/python3"
OPT_IN = (
    "bench_model_compile",
    "train_cuda_graph",
    "bench_routing_replay",
    "bench_agreement",
    "bench_precision",
    "bench_precision_trained",
    "bench_gemm_out",
    "fp32_activations",
)  # run only when --only names them

TRAINED_VARIANTS = (  # bench_precision's rows that bench_precision_trained runs
    "bf16",
    "fp32 activations",
    "fp32 activations, bf16 expert outputs",
    "model.activation_dtype = float32",
    "fp32",
)
CUDA_TESTS = [
    "tests/unit/model/test_attention.py",
    "tests/unit/model/test_bf16.py",
    "tests/unit/model/test_logprobs.py",
    "tests/unit/rl/rollout/test_native_cuda.py",
    "tests/unit/model/test_linear.py",
    "tests/unit/model/test_grouped_gemm.py",
]
# without pytest: what the CUDA test modules use of it (decorators, pytest.raises)
PYTEST_STAND_IN = """
import contextlib, re, sys, types
try:
    import pytest
except ImportError:
    class _Mark:
        def __getattr__(self, name):
            return lambda *args, **kwargs: (lambda fn: fn)
    @contextlib.contextmanager
    def _raises(expected, match=None):  # one exception type; no ExceptionInfo (no caller needs them)
        try:
            yield
        except expected as error:
            if match is not None and not re.search(match, str(error)):
                raise AssertionError(f"{error!r} does not match {match!r}") from error
        else:
            raise AssertionError(f"did not raise {expected.__name__}")
    sys.modules["pytest"] = types.SimpleNamespace(
        mark=_Mark(), fixture=lambda *a, **k: (lambda fn: fn), raises=_raises
    )
"""
# without pytest: the CUDA-only test functions, called with each of their parameters
CUDA_TEST_CALLS = (
    PYTEST_STAND_IN
    + """
import itertools, sys, traceback
sys.path.insert(0, ".")
import torch
if not torch.cuda.is_available():
    print("SKIP: no CUDA device")
    sys.exit(0)
from tests.unit.model import test_attention as t
calls = [(t.test_flash_matches_eager_on_cuda, dict(window=w, packed=p))
         for w, p in itertools.product([None, 5], [False, True])]
calls.append((t.test_flash_with_a_host_layout_and_gqa_matches_eager_on_cuda, {}))
from tests.unit.rl.rollout import test_native_cuda as n  # sm90+, as the lent H100 / H200
graph_test = n.test_cuda_graph_decode_returns_what_static_decode_returns
calls += [(graph_test, dict(sampled=s)) for s in (False, True)]
calls.append((n.test_cuda_graph_decode_refuses_an_fp32_model, {}))
calls.append((n.test_fp32_activations_on_cuda_graph_decode_agree_with_the_trainer, {}))
from tests.unit.model import test_linear as lin
linear_test = lin.test_fp32_input_over_bf16_weight_is_an_unrounded_gemm_of_rounded_operands
calls.append((linear_test, dict(device="cuda")))
from tests.unit.model import test_grouped_gemm as grouped
calls.append((grouped.test_triton_kernel_on_cuda_and_in_a_cuda_graph, {}))
failed = 0
for fn, kw in calls:
    try:
        fn(**kw)
        print("PASS", fn.__name__, kw)
    except Exception:
        failed += 1
        print("FAIL", fn.__name__, kw)
        traceback.print_exc()
sys.exit(1 if failed else 0)
"""
)
ENV = """
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
"""


def parts(tiny: bool, out: Path, python: str) -> list[tuple[str, int, list[str]]]:
    """(name, seconds allowed, command) of every part; ``tiny`` swaps in shapes a CPU runs in seconds."""
    model = ["--preset", "debug", "--layers", "2"] if tiny else ["--preset", "20b", "--layers", "4"]
    dtype = ["--dtype", "bfloat16"]
    seqs = (
        ["--seq", "32", "64", "--ac-from", "64"] if tiny else ["--seq", "4096", "65536", "--ac-from", "65536"]
    )
    short = ["--steps", "1", "--warmup", "0"] if tiny else []
    has_pytest = subprocess.run([python, "-c", "import pytest"], capture_output=True).returncode == 0
    tests = (
        [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *CUDA_TESTS]
        if has_pytest
        else [python, "-c", CUDA_TEST_CALLS]
    )
    smoke = [python, "-m", "titan_rl.train", "--config", "train_configs/smoke_cpu.toml", "--training.steps=3"]
    train = [*smoke, f"--job.dump_folder={out / 'train_run'}", "--rl.rollout_routing_replay=true"]
    train_graph = [*smoke, f"--job.dump_folder={out / 'train_graph_run'}", "--rollout.decode=cuda_graph"]
    generate = [python, "benchmarks/bench_generate.py", *model, *dtype]
    generate += ["--decode", "eager", "static"] if tiny else ["--decode", "eager", "cuda_graph"]
    generate += (
        ["--batch", "2", "--new", "4", "--prompt", "8", "--repeats", "1"]
        if tiny
        else ["--batch", "32", "128", "--sources", "32"]  # the bf16 sources table once: time
    )
    generate += ["--profile", "25"]
    bench = [
        python,
        "benchmarks/bench_model.py",
        *model,
        *dtype,
        "--batch",
        "1",
        *seqs,
        *short,
        "--profile",
        "25",
    ]
    bench += ["--hf-attn", "eager"] if tiny else ["--hf-attn", "eager", "flex_attention"]
    compiled = [python, "benchmarks/bench_model.py", *model, *dtype, "--batch", "1", *short, "--compile"]
    compiled += (
        ["--seq", "32", "--hf-attn", "eager"] if tiny else ["--seq", "4096", "--hf-attn", "flex_attention"]
    )
    replay = [python, "benchmarks/bench_routing_replay.py", "--steps", "1" if tiny else "6", "--"]
    replay += ["--sft.steps=1", "--rollout.prompts_per_step=2"] if tiny else []
    agreement = [python, "benchmarks/bench_agreement.py", *model[:2], "--layers", "2", *dtype]
    agreement += (
        ["--states", "64", "--batch", "2", "--prompt", "8", "--new", "4", "--seq", "32"]
        if tiny
        else ["--lr", "3e-4", "--batch", "32", "--prompt", "128", "--new", "128"]
    )
    last = "5" if tiny else "200"
    precision = [python, "benchmarks/bench_precision.py", *model]
    precision += (
        ["--batch", "2", "--prompt", "8", "--new", "4"]
        if tiny
        else ["--batch", "32", "--prompt", "128", "--new", "128"]
    )
    trained = Path(tempfile.gettempdir()) / "titan_rl_trained"  # gigabytes: not under --out
    train_then_precision = (
        shlex.join([*agreement, "--steps", last, "--save-hf", str(trained)])
        + " && "
        + shlex.join([*precision, "--hf-path", str(trained), "--variants", *TRAINED_VARIANTS])
    )
    fp32_act = ["--activation-dtype", "float32"]
    mode_model = [*bench[: bench.index("--seq")], *fp32_act, "--tol", "0.05"]
    mode_model += (
        ["--seq", "32", *short, "--hf-attn", "eager"]
        if tiny
        else ["--seq", "4096", "--hf-attn", "flex_attention"]
    )
    mode_generate = [python, "benchmarks/bench_generate.py", *model, *dtype, *fp32_act]
    mode_generate += (
        [
            "--decode",
            "static",
            "--batch",
            "2",
            "--new",
            "4",
            "--prompt",
            "8",
            "--repeats",
            "1",
            "--sources",
            "2",
        ]
        if tiny
        else ["--decode", "cuda_graph", "--batch", "32", "128", "--sources", "32"]
    )
    # independent halves: the decode table runs even if the training step's loss check fails
    fp32_activations = f"{shlex.join(mode_model)}; r=$?; {shlex.join(mode_generate)} || r=$?; exit $r"
    gemm_out = [python, "benchmarks/bench_gemm_out.py", *(["--tiny", "--iters", "2"] if tiny else [])]
    env = [python, "-c", ENV]
    return [
        ("env", 20, env),
        ("cuda_tests", 90, tests),
        ("train", 80, train),
        ("bench_model", 180, bench),
        ("bench_generate", 170, generate),
        ("bench_model_compile", 200, compiled),  # only when named in --only
        ("train_cuda_graph", 90, train_graph),  # only when named in --only
        ("bench_routing_replay", 150, replay),  # only when named in --only
        ("bench_agreement", 240, [*agreement, "--steps", "0", last]),  # only when named in --only
        ("bench_precision", 200, precision),  # only when named in --only
        ("bench_precision_trained", 300, ["bash", "-c", train_then_precision]),
        ("bench_gemm_out", 100, gemm_out),  # (first use compiles four Triton variants)
        ("fp32_activations", 300, ["bash", "-c", fp32_activations]),  # only when named in --only
    ]


MIN_PART_S = 30  # with --budget: a part that would get fewer seconds is skipped, not started
RUNNING: list[subprocess.Popen] = []  # the part running now (SIGTERM stops it too)


def summarize(out: Path, line: str) -> None:
    with (out / "summary.txt").open("a") as s:
        s.write(line + "\n")
    print(line, flush=True)


def run_part(name: str, limit: int, cmd: list[str], out: Path, env: dict[str, str]) -> int:
    """Run one part under ``limit`` seconds; its output goes to ``out/<name>.txt``. Returns its exit
    code (124 when it ran out of time, as coreutils ``timeout`` says; 127 when it could not start)."""
    log = out / f"{name}.txt"
    start = time.monotonic()
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        except OSError as e:  # the next parts still run
            f.write(f"[gpu_checks] {name}: could not start: {e}\n")
            rc = 127
        else:
            RUNNING.append(proc)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                kill_group(proc)  # the part and anything it started
                rc = 124
                f.write(f"\n[gpu_checks] {name}: killed after {limit} s\n")
            finally:
                RUNNING.remove(proc)
    summarize(out, f"{name}: rc {rc}, {time.monotonic() - start:.0f} s (limit {limit} s), {log.name}")
    return rc


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stop_on_sigterm(out: Path) -> None:
    """When this script is stopped (the device call's own timeout), stop the running part's process
    group too: it runs in a session of its own and would go on using the GPU after us."""

    def handler(signum, frame):
        for proc in list(RUNNING):  # no wait(): the main thread may hold its lock, mid-wait
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        summarize(out, f"gpu_checks: stopped by signal {signum}")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for <part>.txt and summary.txt")
    p.add_argument("--only", nargs="+", help="run just these parts (names as listed above)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a dry run of every part on a CPU")
    p.add_argument("--python", default=sys.executable, help=f"interpreter for the parts; auto: {LENT_PYTHON}")
    p.add_argument(
        "--budget",
        type=int,
        default=0,
        help="seconds for the whole run (below the device call's timeout): each part gets at most what "
        f"is left, and one that would get under {MIN_PART_S} s is skipped; 0: each part's own limit",
    )
    a = p.parse_args()
    python = a.python
    if python == "auto":
        python = LENT_PYTHON if os.path.exists(LENT_PYTHON) else sys.executable
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.txt").write_text("")
    stop_on_sigterm(out)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",  # a part killed at its limit keeps the tables it already printed
    }
    deadline = time.monotonic() + a.budget if a.budget else None
    selected = parts(a.tiny, out, python)
    known = [name for name, _, _ in selected]
    unknown = sorted(set(a.only or []) - set(known))
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(known)}")
    if a.only:  # in the order asked for
        selected = sorted(
            (part for part in selected if part[0] in a.only), key=lambda part: a.only.index(part[0])
        )
    else:
        selected = [part for part in selected if part[0] not in OPT_IN]
    failed = []
    for name, limit, cmd in selected:
        if deadline is not None:
            left = int(deadline - time.monotonic())
            if left < MIN_PART_S:
                summarize(out, f"{name}: skipped, {max(left, 0)} s of --budget left")
                failed.append(name)
                continue
            limit = min(limit, left)
        if run_part(name, limit, cmd, out, env) != 0:
            failed.append(name)
        if name == "env" and shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
            (out / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr)
    print("failed: " + (", ".join(failed) if failed else "none"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
