"""``python -m gpu_tests.summarize OUTDIR ...``: gpu_tests/run.sh's last step.

Merges what the steps left in OUTDIR (``gpu_tests.json`` from the test session, the bench's
JSON report under ``bench/``) with each step's exit status and duration into
``OUTDIR/summary.json``, prints a short account, and exits 0 only when every step exited 0,
at least one test ran, and no test failed or was skipped (on a GPU machine none may skip).
Standard library only: it must work whatever else the machine lacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"
TESTS_FILE = "gpu_tests.json"
BENCH_GROUP = "W6"
ROW_KEYS = ("name", "status", "median_wall_s", "cuda_peak_bytes", "peak_rss_bytes", "info")


def _step(text: str) -> tuple[str, dict[str, int]]:
    """``name=rc:seconds`` -> (name, {"rc": rc, "duration_s": seconds})."""
    name, _, rest = text.partition("=")
    rc, _, seconds = rest.partition(":")
    try:
        return name, {"rc": int(rc), "duration_s": int(seconds)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--step: expected name=rc:seconds, got {text!r}") from None


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _bench(out: Path) -> dict[str, Any] | None:
    """The bench's CUDA workloads (group W6: W6, or W6a, W6b...) from the newest bench JSON
    report in ``out/bench``; None when there is no readable report."""
    reports = sorted((out / "bench").glob("*.json"), key=lambda path: path.stat().st_mtime)
    results = _load(reports[-1]) if reports else None
    if results is None:
        return None
    workloads = [
        {
            "name": workload.get("name"), "status": workload.get("status"), "title": workload.get("title"),
            "notes": workload.get("notes"),
            "rows": [{key: row.get(key) for key in ROW_KEYS} for row in workload.get("rows", [])],
        }
        for workload in results.get("workloads", [])
        if workload.get("group") == BENCH_GROUP
    ]
    return {"report": str(reports[-1]), "workloads": workloads}


def _bench_problems(bench: dict[str, Any] | None) -> list[str]:
    if bench is None:
        return ["the bench wrote no JSON report (see bench.log)"]
    if not bench["workloads"]:
        return [f"the bench report has no {BENCH_GROUP} workload"]
    return [
        f"bench {workload['name']}: {workload['status']}"
        + "".join(f", {row['name']}={row['status']}" for row in workload["rows"])
        for workload in bench["workloads"]
        if workload["status"] != "done" or any(row["status"] != "ok" for row in workload["rows"])
    ]


def summarize(out: Path, steps: dict[str, dict[str, int]], **facts: Any) -> dict[str, Any]:
    """The summary of one run.sh run (also written to ``out/summary.json``)."""
    session = _load(out / TESTS_FILE)
    tests = session.get("tests", {}) if session else {}
    counts: dict[str, int] = {}
    for entry in tests.values():
        counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
    bench = _bench(out)
    problems = [f"{name} exited {step['rc']}" for name, step in steps.items() if step["rc"] != 0]
    if session is None:
        problems.append(f"the test session wrote no {TESTS_FILE} (see pytest.log)")
    if counts.get("passed", 0) == 0:
        problems.append("no test passed")
    problems += [f"{counts[kind]} test(s) {kind}" for kind in ("failed", "skipped", "not run") if counts.get(kind)]
    problems += _bench_problems(bench)
    summary = {
        "ok": not problems,
        "problems": problems,
        **facts,
        "steps": steps,
        "test_counts": counts,
        "torch": session.get("torch") if session else None,
        "torch_cuda": session.get("torch_cuda") if session else None,
        "tests": tests,
        "figures": session.get("figures", {}) if session else {},
        "bench": bench,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_tests.summarize", description=__doc__)
    parser.add_argument("out", type=Path, help="run.sh's OUTDIR")
    parser.add_argument("--gpu", default=None, help="the GPU's name")
    parser.add_argument("--pyro", default=None, help="pyro-ppl's version")
    parser.add_argument("--step", type=_step, action="append", default=[], help="name=rc:seconds")
    parser.add_argument("--total-s", type=int, default=None, help="the whole run's seconds")
    args = parser.parse_args(argv)
    summary = summarize(args.out, dict(args.step), gpu=args.gpu, pyro=args.pyro, total_s=args.total_s)
    for name, step in summary["steps"].items():
        print(f"{name}: exit {step['rc']} in {step['duration_s']} s")
    print("tests:", ", ".join(f"{count} {kind}" for kind, count in sorted(summary["test_counts"].items())) or "none")
    for name, values in summary["figures"].items():
        print(f"  {name}: {json.dumps(values, default=str)[:300]}")
    print(f"{'OK' if summary['ok'] else 'FAILED: ' + '; '.join(summary['problems'])} "
          f"({summary['total_s']} s); {args.out / SUMMARY_FILE}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
