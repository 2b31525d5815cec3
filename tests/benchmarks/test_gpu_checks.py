"""benchmarks/gpu_checks.py: its parts run (tiny shapes, CPU), and a part that hangs costs only its limit."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from tests.benchmarks import REPO, import_benchmark

gpu_checks = import_benchmark("gpu_checks")


@pytest.mark.timeout(300)
def test_tiny_dry_run_of_env_and_train_parts_in_the_order_asked(tmp_path):
    cmd = [
        sys.executable,
        "benchmarks/gpu_checks.py",
        "--out",
        str(tmp_path),
        "--tiny",
        "--only",
        "train",
        "env",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["train", "env"]
    assert all(line.split(": ", 1)[1].startswith("rc 0,") for line in summary), summary
    assert "torch" in (tmp_path / "env.txt").read_text()
    assert "done: 3 steps" in (tmp_path / "train.txt").read_text()


def test_a_hung_part_is_killed_at_its_limit_and_the_summary_says_so(tmp_path):
    start = time.monotonic()
    rc = gpu_checks.run_part("hang", 1, [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, {})
    assert rc == 124 and time.monotonic() - start < 20
    assert (tmp_path / "summary.txt").read_text().startswith("hang: rc 124")
    assert "killed after 1 s" in (tmp_path / "hang.txt").read_text()


def test_an_unknown_part_is_a_usage_error(tmp_path):
    cmd = [sys.executable, "benchmarks/gpu_checks.py", "--out", str(tmp_path), "--only", "bench_modle"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown part(s) bench_modle" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure path: needs a machine without CUDA")
def test_the_cuda_tests_run_without_pytest():
    """The lent GPU machine's interpreter may lack pytest: the fallback imports the test module with
    a stand-in for pytest's decorators and calls each CUDA test. Here (no CUDA, pytest hidden, the
    device check forced past) every call must be reached and fail on CUDA, not on an import."""
    calls = gpu_checks.CUDA_TEST_CALLS.replace("if not torch.cuda.is_available():", "if False:")
    prelude = "import sys; sys.modules['pytest'] = None\n"  # import pytest -> ImportError
    proc = subprocess.run(
        [sys.executable, "-c", prelude + calls], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert out.count("FAIL test_flash_matches_eager_on_cuda") == 4, out
    assert "FAIL test_flash_with_a_host_layout_and_gqa_matches_eager_on_cuda" in out
    assert out.count("FAIL test_cuda_graph_decode_returns_what_static_decode_returns") == 2, out
    assert "FAIL test_cuda_graph_decode_refuses_an_fp32_model" in out
    assert "FAIL test_fp32_activations_on_cuda_graph_decode_agree_with_the_trainer" in out
    assert "FAIL test_fp32_input_over_bf16_weight_is_an_unrounded_gemm_of_rounded_operands" in out
    assert "FAIL test_triton_kernel_on_cuda_and_in_a_cuda_graph" in out
    assert "ModuleNotFoundError" not in out and "ImportError" not in out, out


def test_the_pytest_stand_in_raises_checks_type_and_message():
    """``test_cuda_graph_decode_refuses_an_fp32_model`` runs ``pytest.raises`` on the GPU; without
    pytest the stand-in must pass a matching error and fail a missing or different one."""
    checks = """
import pytest
with pytest.raises(ValueError, match="only in bf16"):
    raise ValueError("cuda_graph decode runs only in bf16 on sm90")
for body, why in ((lambda: None, "did not raise"), (lambda: int("x"), "does not match")):
    try:
        with pytest.raises(ValueError, match="only in bf16"):
            body()
    except AssertionError as error:
        assert why in str(error), error
    else:
        raise SystemExit("the stand-in let a wrong outcome pass")
print("ok")
"""
    prelude = "import sys; sys.modules['pytest'] = None\n"  # import pytest -> ImportError
    proc = subprocess.run(
        [sys.executable, "-c", prelude + gpu_checks.PYTEST_STAND_IN + checks],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_the_default_parts_fit_one_device_call(tmp_path):
    """A device call runs at most 600 s; the default parts' limits must leave room to start."""
    default = [(name, limit) for name, limit, _ in gpu_checks.parts(True, tmp_path, sys.executable)]
    default = [(name, limit) for name, limit in default if name not in gpu_checks.OPT_IN]
    assert sum(limit for _, limit in default) <= 540, default
    assert {name for name, _ in default} >= {"cuda_tests", "train", "bench_model", "bench_generate"}


MAIN_WITH_PARTS = """
import sys
sys.path.insert(0, "benchmarks")
import gpu_checks
gpu_checks.MIN_PART_S = 2
printer = "print('the table', flush=False); import time; time.sleep(60)"  # block-buffered to a file
spawner = "import subprocess, sys, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
gpu_checks.parts = lambda tiny, out, python: [
    ("printer", 100, [sys.executable, "-c", printer]),
    ("spawner", 100, ["bash", "-c", f"{sys.executable} -c \\"{spawner}\\"; sleep 300"]),
    ("last", 100, [sys.executable, "-c", "print('never')"]),
]
sys.argv = ["gpu_checks.py", "--out", *sys.argv[1:]]
raise SystemExit(gpu_checks.main())
"""
PARTS = ["printer", "spawner", "last"]


def sleepers(pattern: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return found


def test_budget_caps_each_part_skips_the_rest_and_keeps_printed_output(tmp_path):
    """--budget 4 with 2 s minimum: the first part gets what is left of 4 s (not its 100), is killed with what
    it printed kept (parts run unbuffered), and the next parts, with under 2 s left, are skipped."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", MAIN_WITH_PARTS, str(tmp_path), "--budget", "4", "--only", *PARTS],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},  # gpu_checks sets it
    )  # fmt: skip
    assert proc.returncode == 1 and time.monotonic() - start < 30, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("printer: rc 124"), summary
    assert "(limit 3 s)" in summary[0] or "(limit 4 s)" in summary[0], summary  # what was left
    assert summary[1].startswith("spawner: skipped") and summary[2].startswith("last: skipped"), summary
    assert "the table" in (tmp_path / "printer.txt").read_text().splitlines()  # (line 1: the command)


@pytest.mark.skipif(sys.platform != "linux", reason="pgrep and process groups")
def test_sigterm_stops_the_running_part_and_what_it_started(tmp_path):
    """The device call's timeout stops gpu_checks with SIGTERM; the part runs in a session of its own
    and must not outlive it (it would hold the GPU into the next call)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", MAIN_WITH_PARTS.replace("300", "301"), str(tmp_path), "--only", "spawner"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        for _ in range(200):  # the spawner part has started its own child
            if sleepers("^sleep 301"):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the spawner part did not start")
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + 15, out
    deadline = time.monotonic() + 10
    while sleepers("^sleep 301") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sleepers("^sleep 301") == [], "the part's processes outlived gpu_checks"
    assert "stopped by signal 15" in (tmp_path / "summary.txt").read_text()


def test_the_fp32_activations_decode_half_runs_when_the_training_half_fails(tmp_path):
    """Its two halves are independent: a failed loss check in bench_model must not skip the decode
    table; the part still exits non-zero."""
    fake = tmp_path / "python"
    calls = tmp_path / "calls.txt"
    fake.write_text(
        f'#!/bin/bash\necho "$@" >> {calls}\ncase "$*" in *bench_model.py*) exit 3;; esac\nexit 0\n'
    )
    fake.chmod(0o755)
    named = {name: cmd for name, _, cmd in gpu_checks.parts(True, tmp_path, str(fake))}
    rc = subprocess.run(named["fp32_activations"], capture_output=True, timeout=30).returncode
    invoked = calls.read_text()
    assert rc == 3 and "bench_model.py" in invoked and "bench_generate.py" in invoked, invoked
