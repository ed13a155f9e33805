"""Run benchmark configurations in fresh, capped child processes and collect their numbers.

Each repetition of a configuration is one ``python -m bench.child`` process started through
``tests.support.child.run_child``: a real memory cap (child cgroup, else RLIMIT_AS), the peak
RSS of that child (``wait4`` and its sampled ``VmHWM``), its total wall time. The child reports
the wall time of the measured call itself. A configuration killed or failing under its cap is recorded with
that outcome and not repeated (the cap outcome does not change between repetitions).
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tests.support.child import ChildResult, run_child
from devicemem.units import format_bytes

from bench.child import MARKER
from bench.data import DataSpec

log = logging.getLogger("devicemem.bench")
REPO_ROOT = Path(__file__).resolve().parent.parent
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")
_OOM_MARKERS = ("can't allocate memory", "MemoryError", "OutOfMemoryError", "out of memory")


@dataclass(frozen=True)
class Config:
    """One measured configuration: the child's spec, its memory cap and its time limit.

    ``data``: the synthetic data set the child loads; its cached file's path is added to the
    spec as ``"data"`` when the configuration runs.
    """

    name: str
    spec: dict[str, Any]
    cap_bytes: int | None = None
    timeout_s: float = 600.0
    data: DataSpec | None = None


@dataclass(frozen=True)
class Rep:
    """One repetition: outcome ("ok", "killed", "oom", "failed", "timeout") and measurements."""

    status: str
    sample_wall_s: float | None
    total_wall_s: float
    peak_rss_bytes: int
    cuda_peak_bytes: int | None
    cap_method: str
    error: str | None = None
    payload: dict[str, Any] | None = None


@dataclass
class ConfigResult:
    """All repetitions of one configuration, with the summary statistics the tables show."""

    name: str
    cap_bytes: int | None
    reps: list[Rep] = field(default_factory=list)

    @property
    def status(self) -> str:
        failed = [rep.status for rep in self.reps if rep.status != "ok"]
        return failed[0] if failed else ("ok" if self.reps else "not run")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def median_wall_s(self) -> float | None:
        walls = [rep.sample_wall_s for rep in self.reps if rep.sample_wall_s is not None]
        return statistics.median(walls) if walls else None

    @property
    def median_total_s(self) -> float:
        return statistics.median(rep.total_wall_s for rep in self.reps)

    @property
    def peak_rss_bytes(self) -> int:
        return max(rep.peak_rss_bytes for rep in self.reps)

    @property
    def cuda_peak_bytes(self) -> int | None:
        peaks = [rep.cuda_peak_bytes for rep in self.reps if rep.cuda_peak_bytes is not None]
        return max(peaks) if peaks else None

    @property
    def info(self) -> dict[str, Any]:
        """The child's own details (batch size, plan...) from the last repetition that had them."""
        for rep in reversed(self.reps):
            if rep.payload is not None:
                return rep.payload.get("info", {})
        return {}

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "cap_bytes": self.cap_bytes, "status": self.status,
            "median_wall_s": self.median_wall_s, "median_total_s": self.median_total_s,
            "peak_rss_bytes": self.peak_rss_bytes, "cuda_peak_bytes": self.cuda_peak_bytes,
            "n_reps": len(self.reps), "reps": [asdict(rep) for rep in self.reps],
        }


def error_line(stderr: str) -> str | None:
    """The exception line of a traceback in ``stderr`` (else its last line), shortened."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if _EXCEPTION.match(line):
            return line[:300]
    return lines[-1][:300] if lines else None


def classify(child: ChildResult) -> tuple[str, str | None, dict[str, Any] | None]:
    """(status, error line, payload) of one finished child."""
    payload = None
    for line in child.stdout.splitlines():
        if line.startswith(MARKER):
            payload = json.loads(line[len(MARKER):])
    error = error_line(child.stderr)
    if child.timed_out:
        return "timeout", error, payload
    if child.killed:
        return "killed", error or "SIGKILL (over the cgroup memory cap)", payload
    if child.returncode != 0:
        oom = any(marker in child.stderr for marker in _OOM_MARKERS)
        return ("oom" if oom else "failed"), error, payload
    if payload is None:
        return "failed", error or "child printed no result line", None
    return "ok", None, payload


def run_rep(config: Config, cache_dir: Path) -> Rep:
    """Start one fresh child for ``config`` and measure it."""
    spec = config.spec
    if config.data is not None:
        spec = {**spec, "data": str(ensure_dataset(config.data, cache_dir))}
    argv = [sys.executable, "-m", "bench.child", json.dumps(spec)]
    child = run_child(argv, cap_bytes=config.cap_bytes, timeout=config.timeout_s, cwd=REPO_ROOT)
    status, error, payload = classify(child)
    return Rep(
        status=status,
        sample_wall_s=payload["sample_wall_s"] if status == "ok" and payload else None,
        total_wall_s=child.wall_s,
        peak_rss_bytes=child.peak_rss_bytes,
        cuda_peak_bytes=payload.get("cuda_peak_bytes") if payload else None,
        cap_method=child.cap_method,
        error=error,
        payload=payload,
    )


def run_configs(
    configs: Iterable[Config], reps: int, cache_dir: Path, label: str = ""
) -> list[ConfigResult]:
    """Run every configuration ``reps`` times, round-robin so drift in machine load spreads
    over all of them; a configuration that did not finish ok is not repeated. Data sets are
    generated into ``cache_dir`` on first use."""
    configs = list(configs)
    results = [ConfigResult(config.name, config.cap_bytes) for config in configs]
    for rep_index in range(reps):
        for config, result in zip(configs, results):
            if result.reps and not result.ok:
                continue
            rep = run_rep(config, cache_dir)
            result.reps.append(rep)
            wall = f"{rep.sample_wall_s:.2f} s" if rep.sample_wall_s is not None else "-"
            log.info("[bench] %s %s rep %d/%d: %s, %s, peak %s (total %.1f s)", label,
                     config.name, rep_index + 1, reps, rep.status, wall,
                     format_bytes(rep.peak_rss_bytes), rep.total_wall_s)
    return results


def ensure_dataset(spec: DataSpec, cache_dir: Path) -> Path:
    """Path of the cached data set for ``spec``, generated by a child process on first use
    (generation needs several [N, T] float64 temporaries; the driver stays small)."""
    path = cache_dir / f"{spec.key}.pt"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "bench.data", str(spec.n_cells), str(spec.n_features),
                str(spec.n_groups), str(spec.seed), str(path)]
        child = run_child(argv, cwd=REPO_ROOT)
        if not child.ok:
            raise RuntimeError(f"generating {spec.key} failed: {error_line(child.stderr)}")
    return path
