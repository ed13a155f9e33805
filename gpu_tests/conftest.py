"""gpu_tests: what only a real CUDA device can prove. Skipped, with the reason, without one.

Every test here is marked ``gpu`` and skipped at collection when ``torch.cuda.is_available()``
is False, so CI collects the suite and skips it cleanly. On a GPU machine run
``gpu_tests/run.sh OUTDIR``: with ``GPU_TESTS_OUT`` set, the session writes
``$GPU_TESTS_OUT/gpu_tests.json`` with each test's outcome and the figures tests record
through the ``figures`` fixture (memory ratios, speed-ups), even when some tests fail.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from gpu_tests.support import (
    SEED_C,
    SEED_N,
    SEED_T,
    TechnicalProblem,
    cuda_unavailable_reason,
    release_cuda,
    technical_problem,
)

HERE = Path(__file__).resolve().parent
OUT_ENV = "GPU_TESTS_OUT"
RESULT_FILE = "gpu_tests.json"


class Figures:
    """Named figures the tests measure, written to the JSON summary at the end of the session."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def record(self, name: str, **values: Any) -> None:
        """Add (or extend) the entry ``name``; values must be JSON-serialisable."""
        self.values.setdefault(name, {}).update(values)


_FIGURES = Figures()
_OUTCOMES: dict[str, dict[str, Any]] = {}  # nodeid -> outcome, for this directory's tests only


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = cuda_unavailable_reason()
    for item in items:
        if HERE not in item.path.resolve().parents:
            continue  # this hook sees the whole session's items, tests/ included
        _OUTCOMES[item.nodeid] = {"outcome": "not run"}
        item.add_marker(pytest.mark.gpu)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid not in _OUTCOMES or (report.when != "call" and report.outcome == "passed"):
        return
    entry: dict[str, Any] = {"outcome": report.outcome, "when": report.when, "duration_s": round(report.duration, 3)}
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        entry["reason"] = report.longrepr[2]
    elif report.outcome == "failed":
        lines = report.longreprtext.strip().splitlines()
        entry["error"] = lines[-1] if lines else ""
    if _OUTCOMES[report.nodeid].get("outcome") != "failed":  # a teardown error keeps the call's failure
        _OUTCOMES[report.nodeid] = entry


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = os.environ.get(OUT_ENV)
    if not out:
        return
    cuda = torch.cuda.is_available()
    summary = {
        "exitstatus": int(exitstatus),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if cuda else None,
        "tests": _OUTCOMES,
        "figures": _FIGURES.values,
    }
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / RESULT_FILE).write_text(json.dumps(summary, indent=1, default=str))


@pytest.fixture(scope="session")
def figures() -> Figures:
    """Where tests record what they measured (written to ``$GPU_TESTS_OUT/gpu_tests.json``)."""
    return _FIGURES


@pytest.fixture(autouse=True)
def clean_cuda() -> Iterator[None]:
    """Each test starts and ends with an empty param store and no cached CUDA blocks."""
    import pyro

    pyro.clear_param_store()
    release_cuda()
    yield
    pyro.clear_param_store()
    release_cuda()


@pytest.fixture(scope="session")
def seed_problem() -> TechnicalProblem:
    """The seed's size: N=21,761, T=31,467, C=2 (params only needs no counts)."""
    return technical_problem(SEED_N, SEED_T, SEED_C)
