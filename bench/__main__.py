"""``python -m bench [--quick] [--only NAME ...]``: run the workloads and write the report."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import logging
import os
import platform
import re
import socket
import tempfile
import sys
import time
from dataclasses import replace
from pathlib import Path
from importlib.metadata import version
from typing import Any

import psutil

from tests.support.child import cgroup_unavailable_reason, run_child

from bench import report
from bench.harness import REPO_ROOT, run_configs
from bench.workloads import Workload, build_workloads

log = logging.getLogger("devicemem.bench")


def _cuda_device() -> str | None:
    """Name of CUDA device 0, or None; asked of a child so the driver never imports torch or
    creates a CUDA context (it stays small and leaves the GPU to the measured children)."""
    code = ("import torch; print(torch.cuda.get_device_name(0) "
            "if torch.cuda.is_available() else '')")
    child = run_child([sys.executable, "-c", code])
    return (child.stdout.strip() or None) if child.ok else None


def machine_info(cuda: str | None) -> dict[str, Any]:
    """Host, CPU, memory, library versions and how caps are applied on this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    reason = cgroup_unavailable_reason()
    return {
        "host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total, "torch": version("torch"),
        "pyro": version("pyro-ppl"), "cuda": cuda,
        "cap_method": "child memory cgroup" if reason is None else f"RLIMIT_AS ({reason})",
        "load_before": _load(),
    }


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run_workload(workload: Workload, cache_dir: Path) -> dict[str, Any]:
    """Measure one workload and return its JSON record."""
    record: dict[str, Any] = {
        "name": workload.name, "group": workload.group, "title": workload.title,
        "reps": workload.reps, "params": workload.params, "notes": list(workload.notes),
        "reference": workload.reference, "load_before": _load(),
    }
    start = time.perf_counter()
    if workload.kind == "skipped":
        record["status"] = "skipped"
    elif workload.kind == "derived":
        record["status"] = "derived"
    elif workload.kind == "external":
        record.update(_run_external(workload))
    else:
        rows = run_configs(workload.configs, workload.reps, cache_dir, label=workload.name)
        record["rows"] = [{**row.to_json(), "info": row.info} for row in rows]
        record["status"] = "done"
    record["duration_s"] = time.perf_counter() - start
    record["load_after"] = _load()
    return record


def _run_external(workload: Workload) -> dict[str, Any]:
    """A workload its own module measures (W3: bench.w3_accuracy, W7: bench.w7_ray, W9: bench.w9_sequential): its
    ``run(quick)`` returns ``{"status", "params", "points", "notes", ...}``."""
    module_name = workload.params["module"]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return {"status": "skipped", "notes": [f"skipped: {module_name} is missing ({exc})"]}
    found = module.run(quick=workload.params["quick"])
    return {**found, "notes": list(workload.notes) + list(found.get("notes", [])),
            "params": {**workload.params, **found.get("params", {})}}


def _selected(workloads: list[Workload], only: list[str] | None) -> list[Workload]:
    if not only:
        return workloads
    wanted = {name.lower() for item in only for name in item.split(",")}
    chosen = [w for w in workloads if w.name.lower() in wanted or w.group.lower() in wanted]
    if not chosen:
        names = ", ".join(sorted({w.name for w in workloads} | {w.group for w in workloads}))
        raise SystemExit(f"--only: no workload named {', '.join(sorted(wanted))}; "
                         f"choose from {names}")
    return chosen


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and 1 repetition (under 5 minutes on 2 cores)")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only these workloads, by name or group (W1, W2a, ...)")
    parser.add_argument("--reps", type=int, metavar="N",
                        help="repetitions of every configuration (default: each workload's)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch/OpenMP threads in every child (default: torch's, one per "
                        "core); 1 keeps timings sane while other jobs load the machine")
    parser.add_argument("--issue-size", action="store_true",
                        help="W2 at the issue's S (W2a 1000, W2b 200) instead of 100 and 12: about "
                        "40 minutes for W2a alone on 2 cores")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results",
                        help="directory for the JSON, Markdown and PNG (default bench/results)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: expected a positive integer; got {args.threads}")
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps: expected a positive integer; got {args.reps}")
    cuda = _cuda_device()
    workloads = _selected(build_workloads(args.quick, cuda is not None, args.issue_size), args.only)
    if args.reps is not None:
        workloads = [replace(w, reps=args.reps) for w in workloads]
    started = time.perf_counter()
    now = dt.datetime.now()
    results: dict[str, Any] = {
        "date": now.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "only": args.only,
        "issue_size": args.issue_size,
        "threads": args.threads,
        "machine": machine_info(cuda), "workloads": [],
    }
    with tempfile.TemporaryDirectory(prefix="devicemem-bench-") as cache:
        for workload in workloads:
            log.info("[bench] %s: %s", workload.name, workload.title)
            results["workloads"].append(run_workload(workload, Path(cache)))
    for record in results["workloads"]:
        if record["status"] == "derived":
            record["points"] = report.overhead_points(results, record["params"]["compares"])
    results["machine"]["load_after"] = _load()
    results["duration_s"] = time.perf_counter() - started
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", results["machine"]["host"])
    stem = f"{host}-{now:%Y-%m-%d}" + ("-quick" if args.quick else "")
    paths = report.write(results, args.out, stem)
    print(paths["md"].read_text())
    for kind, path in paths.items():
        log.info("[bench] wrote %s", path)
    return paths


if __name__ == "__main__":
    main()
