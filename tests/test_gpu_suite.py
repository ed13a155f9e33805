"""gpu_tests/ without a GPU: collected and skipped with the reason; run.sh refuses before doing
anything; its dry run rehearses the GPU node's set-up; the run's summary is judged right. (The GPU
tests themselves need CUDA.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from gpu_tests import summarize
from gpu_tests.support import cuda_unavailable_reason

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "gpu_tests" / "run.sh"

WHEELS = REPO / "gpu_tests" / "wheels"
CARRIED = ("pyro_ppl", "opt_einsum", "pyro_api", "pytest", "iniconfig", "pluggy", "packaging", "pygments")

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path; this machine has CUDA")


@needs_no_cuda
def test_gpu_suite_is_collected_and_every_test_skipped_with_the_reason(tmp_path):
    junit = tmp_path / "junit.xml"
    env = {**os.environ, "GPU_TESTS_OUT": str(tmp_path / "out")}
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={junit}", "gpu_tests"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    cases = ET.parse(junit).getroot().iter("testcase")
    reasons = {f"{case.get('classname')}.{case.get('name')}": [s.get("message", "") for s in case.iter("skipped")]
               for case in cases}
    assert len(reasons) >= 10, f"expected the whole GPU suite to be collected, got {sorted(reasons)}"
    reason = cuda_unavailable_reason()
    assert reason is not None and "CUDA is not available" in reason
    not_skipped = [name for name, messages in reasons.items() if not any(reason in m for m in messages)]
    assert not not_skipped, f"not skipped with the reason: {not_skipped}"
    session = json.loads((tmp_path / "out" / "gpu_tests.json").read_text())
    assert set(session["tests"]) and {entry["outcome"] for entry in session["tests"].values()} == {"skipped"}
    assert len(session["tests"]) == len(reasons)


def test_run_sh_is_valid_bash():
    child = subprocess.run(["bash", "-n", str(RUN_SH)], capture_output=True, text=True)
    assert child.returncode == 0, child.stderr


@needs_no_cuda
def test_run_sh_refuses_without_a_gpu_before_installing_anything(tmp_path):
    # A python that logs every invocation: the GPU check may run, pip and the tests may not.
    calls = tmp_path / "python-calls"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "pyro_ppl-1.9.2-py3-none-any.whl").write_bytes(b"not a wheel")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(python), "DEVICEMEM_WHEELS": str(wheels), "TMPDIR": str(tmp_path)}
    child = subprocess.run(["bash", str(RUN_SH), str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == 2, child.stdout + child.stderr
    assert "refusing to run" in child.stderr and "torch.cuda.is_available() is False" in child.stderr
    assert "nothing was installed" in child.stderr
    assert calls.read_text().split() == ["-"], "only the GPU check may run python"
    assert not out.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["python", "python-calls", "wheels"]


def _carried_wheels(tmp_path: Path) -> Path:
    """gpu_tests/wheels when it holds every carried wheel, else a fresh ``make gpu-wheels`` into
    ``tmp_path`` (skips when PyPI cannot be reached)."""
    if all(len(list(WHEELS.glob(f"{name}-*-py3-none-any.whl"))) == 1 for name in CARRIED):
        return WHEELS
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError as exc:
        pytest.skip(f"gpu_tests/wheels is incomplete and PyPI is unreachable ({exc}): run make gpu-wheels")
    wheels = tmp_path / "wheels"
    make = subprocess.run(["make", "-C", str(REPO), "gpu-wheels", f"PYTHON={sys.executable}", f"GPU_WHEELS_DIR={wheels}"],
                          capture_output=True, text=True, timeout=300)
    assert make.returncode == 0, make.stdout[-2000:] + make.stderr[-2000:]
    return wheels


def _dry_run(out: Path, wheels: Path, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "DEVICEMEM_WHEELS": str(wheels), "TMPDIR": str(tmp),
           "PYTHONPATH": str(REPO)}
    return subprocess.run(["bash", str(RUN_SH), "--dry-run", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_dry_run_sets_up_as_on_the_gpu_node_and_collects_the_suite(tmp_path):
    wheels = _carried_wheels(tmp_path)
    assert sum(path.stat().st_size for path in wheels.glob("*.whl")) < 16 * 2**20, "carried wheels should stay small"
    child = _dry_run(tmp_path / "out", wheels, tmp_path)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    # The node view hid this venv's pyro and pytest: every carried wheel was unpacked, none pip-installed.
    unpacked = next(line for line in child.stderr.splitlines() if "unpacking" in line)
    assert all(f"{name}-" in unpacked for name in CARRIED), unpacked
    linked = {path.name for path in (tmp_path / "out" / "node-site").iterdir()}
    assert {"torch", "numpy", "psutil", "tqdm"} <= linked and not {"pyro", "pytest", "_pytest", "scipy"} & linked
    collected = (tmp_path / "out" / "collect.log").read_text()
    assert "gpu_tests/test_gpu_runner.py::test_real_oom_bisects_the_batch_and_completes_on_the_gpu" in collected
    assert "stopping before CUDA is needed" in child.stderr
    assert not list(tmp_path.glob("devicemem-gpu-site.*")), "the scratch target is removed on exit"


def test_dry_run_without_a_needed_wheel_says_how_to_make_them(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    child = _dry_run(tmp_path / "out", wheels, tmp_path)
    assert child.returncode == 2, child.stdout + child.stderr
    assert "pyro is not installed" in child.stderr and "make gpu-wheels" in child.stderr
    assert not (tmp_path / "out" / "collect.log").exists()


def _write_session(out: Path, outcomes: dict[str, str]) -> None:
    tests = {f"gpu_tests/test_x.py::{name}": {"outcome": outcome} for name, outcome in outcomes.items()}
    figures = {"7 seed params-only speed": {"speedup": 31.5}}
    (out / summarize.TESTS_FILE).write_text(json.dumps({"torch": "2.x", "tests": tests, "figures": figures}))


def _write_bench(out: Path, statuses: dict[str, str]) -> None:
    (out / "bench").mkdir()
    rows = [{"name": name, "status": status, "median_wall_s": 0.1} for name, status in statuses.items()]
    workloads = [
        {"name": "W1a", "group": "W1", "status": "done", "rows": [{"name": "pyro-full", "status": "oom"}]},
        {"name": "W6a", "group": "W6", "status": "done", "title": "CUDA", "rows": rows},
    ]
    (out / "bench" / "host-2025-01-01-quick.json").write_text(json.dumps({"workloads": workloads}))


def _summarize(out: Path, *steps: str) -> tuple[int, dict]:
    rc = summarize.main([str(out), "--gpu", "NVIDIA H200", "--total-s", "300", *[f"--step={s}" for s in steps]])
    return rc, json.loads((out / summarize.SUMMARY_FILE).read_text())


def test_summary_is_ok_only_when_every_step_and_test_passed(tmp_path):
    _write_session(tmp_path, {"a": "passed", "b": "passed"})
    _write_bench(tmp_path, {"devicemem-auto [cuda]": "ok", "pyro-full [cpu]": "ok"})
    rc, summary = _summarize(tmp_path, "pytest=0:90", "bench=0:150")
    assert rc == 0 and summary["ok"] and summary["problems"] == []
    assert summary["test_counts"] == {"passed": 2}
    assert summary["figures"]["7 seed params-only speed"]["speedup"] == 31.5
    (workload,) = summary["bench"]["workloads"]  # W6 only: other groups are not this run's business
    assert workload["name"] == "W6a"
    assert [row["name"] for row in workload["rows"]] == ["devicemem-auto [cuda]", "pyro-full [cpu]"]
    assert summary["steps"]["bench"] == {"rc": 0, "duration_s": 150} and summary["gpu"] == "NVIDIA H200"


@pytest.mark.parametrize(
    "outcomes, bench, steps, problem",
    [
        ({"a": "passed", "b": "failed"}, {"x": "ok"}, ("pytest=1:90", "bench=0:1"), "1 test(s) failed"),
        ({"a": "passed", "b": "skipped"}, {"x": "ok"}, ("pytest=0:90", "bench=0:1"), "1 test(s) skipped"),
        ({"a": "passed"}, {"x": "oom"}, ("pytest=0:90", "bench=0:1"), "bench W6a: done, x=oom"),
        ({"a": "passed"}, None, ("pytest=0:90", "bench=124:300"), "bench exited 124"),
        ({"a": "skipped"}, {"x": "ok"}, ("pytest=0:90", "bench=0:1"), "no test passed"),
    ],
)
def test_summary_fails_on_any_failure(tmp_path, outcomes, bench, steps, problem):
    _write_session(tmp_path, outcomes)
    if bench is not None:
        _write_bench(tmp_path, bench)
    rc, summary = _summarize(tmp_path, *steps)
    assert rc == 1 and not summary["ok"]
    assert problem in summary["problems"]


def test_summary_fails_when_the_session_wrote_nothing(tmp_path):
    rc, summary = _summarize(tmp_path, "pytest=4:3", "bench=0:1")
    assert rc == 1
    assert "the test session wrote no gpu_tests.json (see pytest.log)" in summary["problems"]
    assert "the bench wrote no JSON report (see bench.log)" in summary["problems"]
