"""W8: memory-aware SVI (the exact chunked gradient) against full-data SVI on the CPU.

``run(quick)`` measures, each configuration in a fresh child (``python -m bench.w8_svi
'<spec>'``, started by ``tests.support.child.run_child``):

* speed: full-data steps vs chunked steps at a size where both fit, repetitions round-robin;
  ms/step is the training loop's wall time over its steps after the first (the first is
  validated and builds the guide: ``TrainResult.steady_ms_per_step``), the
  peak the child's whole-life RSS and the first step's own peak (``TrainingPlan.
  measured_peak_bytes``: VmHWM over the RSS when training started, i.e. what training adds
  to the resident data);
* peak vs N at a fixed chunk: what training adds should stay flat as N grows past the chunk
  (only the resident data grows).

:func:`measure_seed` (W8b, ``bench.w8b_seed``) is the seed's size: 5 chunked steps on the CPU
inside a 16 GiB cgroup.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from typing import Any

from bench.child import MARKER
from bench.harness import REPO_ROOT

SIZES = {
    "quick": dict(speed=dict(N=2000, T=1000, chunk=500, steps=8, reps=1), flat=dict(T=1000, chunk=250, Ns=(500, 1000, 2000), steps=3)),
    "full": dict(speed=dict(N=3000, T=2000, chunk=750, steps=12, reps=3), flat=dict(T=2000, chunk=500, Ns=(1000, 2000, 4000, 8000), steps=3)),
}


def _synthetic(n_cells: int, n_features: int, n_groups: int, seed: int = 0) -> tuple[Any, Any, Any]:
    """Counts [N, T] float32 drawn a block of cells at a time (never a float64 [N, T]), groups, sum factors."""
    import numpy as np

    rng = np.random.default_rng(seed)
    groups = np.sort(np.arange(n_cells) % n_groups)
    factors = rng.lognormal(0.0, 0.3, size=n_cells).astype(np.float32)
    mu = rng.lognormal(1.0, 1.2, size=n_features)
    effects = np.vstack([np.ones((1, n_features)), 2.0 ** rng.normal(0.0, 0.5, size=(n_groups - 1, n_features))])
    phi = rng.gamma(5.0, 2.0, size=n_features)
    counts = np.empty((n_cells, n_features), dtype=np.float32)
    block = max(1, 2**24 // n_features)
    for start in range(0, n_cells, block):
        rows = slice(start, start + block)
        mean = mu[None, :] * effects[groups[rows]] * factors[rows, None]
        counts[rows] = rng.negative_binomial(phi[None, :], phi[None, :] / (phi[None, :] + mean))
    return counts, groups, factors


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """In the child: prepare data (untimed), train ``steps`` SVI steps on the CPU, report."""
    import torch

    from bayesDREAM_ext.data import prepare_technical
    from bayesDREAM_ext.model import build_model_inputs
    from bayesDREAM_ext.memory import plan_training
    from bayesDREAM_ext.training import SVIOptions, train

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("checkpoint"):  # a line with its time on stderr after every step, readable even if the child is stopped
        logging.basicConfig(level=logging.INFO, format="%(created).3f %(message)s")
    began = time.perf_counter()
    counts, groups, factors = _synthetic(spec["N"], spec["T"], spec.get("C", 2))
    data = prepare_technical(counts, groups, factors)
    del counts
    inputs = build_model_inputs(data)
    prepared_s = time.perf_counter() - began
    plan = plan_training(data.n_cells, data.n_features, data.n_groups, device="cpu", safety_factor=0.8, chunk_cells=spec.get("chunk"))
    result = train(inputs, plan, SVIOptions(niters=spec["steps"], lr=1e-3, tolerance=0.0, alpha_ewma=0.05, seed=0, progress=False, checkpoint=spec.get("checkpoint"), checkpoint_every=1))
    return {
        "ms_per_step": result.steady_ms_per_step, "first_step_s": result.first_step_s, "steps": len(result.losses), "chunk_cells": result.plan.chunk_cells,
        "chunks_per_step": result.plan.chunks_per_step, "training_peak_bytes": result.plan.measured_peak_bytes,
        "predicted_bytes": result.plan.predicted_peak_bytes, "budget_bytes": result.plan.budget_bytes,
        "data_bytes": data.counts.nbytes, "prepare_s": prepared_s, "last_loss": result.losses[-1],
    }


def steps_from_log(stderr: str) -> dict[str, Any]:
    """Steps done and steady ms/step from a checkpointing child's timed log lines (what is
    known of a child stopped before it could report)."""
    times = [float(line.split()[0]) for line in stderr.splitlines() if "[MEMORY] checkpoint after step" in line]
    first_peak = next((line.split("measured peak ")[1].split(" (")[0] for line in stderr.splitlines() if "First SVI step" in line), None)
    steady = 1e3 * (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return {"steps": len(times), "ms_per_step": steady, "training_peak": first_peak}


def run_spec(spec: dict[str, Any], cap_bytes: int | None = None, timeout: float = 1800) -> dict[str, Any]:
    """One child; its payload with the child's peak RSS and outcome (status "ok", "killed", ...)."""
    from tests.support.child import run_child

    child = run_child([sys.executable, "-m", "bench.w8_svi", json.dumps(spec)], cap_bytes=cap_bytes, timeout=timeout, cwd=REPO_ROOT)
    payload = next((json.loads(line[len(MARKER):]) for line in child.stdout.splitlines() if line.startswith(MARKER)), None)
    status = "ok" if child.ok and payload else "killed" if child.killed else "timeout" if child.timed_out else "failed"
    error = None if status == "ok" else (child.stderr.strip().splitlines() or ["?"])[-1][:300]
    logged = steps_from_log(child.stderr) if spec.get("checkpoint") and payload is None else {}
    return {**logged, **(payload or {}), "status": status, "peak_rss_bytes": child.peak_rss_bytes, "cap_method": child.cap_method,
            "wall_s": child.wall_s, "error": error}


def run(quick: bool = False) -> dict[str, Any]:
    """W8a (full vs chunked, same size) and W8c (peak vs N at a fixed chunk)."""
    size = SIZES["quick" if quick else "full"]
    speed, flat = size["speed"], size["flat"]
    runs: dict[str, list[dict[str, Any]]] = {"full": [], "chunked": []}
    for _ in range(speed["reps"]):
        for name in runs:
            spec = {"N": speed["N"], "T": speed["T"], "steps": speed["steps"], "chunk": speed["chunk"] if name == "chunked" else None}
            runs[name].append(run_spec(spec))
    points = []
    for name, reps in runs.items():
        ok = [rep for rep in reps if rep["status"] == "ok"]
        points.append({
            "config": f"W8a {name}, N={speed['N']}, T={speed['T']}" + (f", chunks of {speed['chunk']}" if name == "chunked" else ""),
            "status": reps[0]["status"] if not ok else "ok",
            "ms_per_step": statistics.median(rep["ms_per_step"] for rep in ok) if ok else None,
            "chunks_per_step": ok[0]["chunks_per_step"] if ok else None,
            "training_peak_bytes": max(rep["training_peak_bytes"] or 0 for rep in ok) if ok else None,
            "peak_rss_bytes": max(rep["peak_rss_bytes"] for rep in reps),
        })
    for n_cells in flat["Ns"]:
        rep = run_spec({"N": n_cells, "T": flat["T"], "steps": flat["steps"], "chunk": flat["chunk"]})
        points.append({
            "config": f"W8c chunks of {flat['chunk']}, N={n_cells}, T={flat['T']}", "status": rep["status"],
            "ms_per_step": rep.get("ms_per_step"), "chunks_per_step": rep.get("chunks_per_step"),
            "training_peak_bytes": rep.get("training_peak_bytes"), "peak_rss_bytes": rep["peak_rss_bytes"],
            "data_bytes": rep.get("data_bytes"),
        })
    figures = {}
    full, chunked = points[0], points[1]
    if full["ms_per_step"] and chunked["ms_per_step"]:
        figures["chunked_vs_full_time_per_step"] = chunked["ms_per_step"] / full["ms_per_step"]
        figures["chunked_vs_full_training_peak"] = chunked["training_peak_bytes"] / full["training_peak_bytes"]
    grown = [p for p in points[2:] if p["status"] == "ok" and p["training_peak_bytes"]]
    if len(grown) >= 2:
        figures["training_peak_largest_vs_smallest_N"] = grown[-1]["training_peak_bytes"] / grown[0]["training_peak_bytes"]
    return {
        "status": "done", "params": {"speed": speed, "flat": {**flat, "Ns": list(flat["Ns"])}}, "points": points, "figures": figures,
        "notes": [
            f"negbinom, C=2, AutoNormal, CPU, {speed['steps']} steps per child (ms/step over all but the first); "
            f"W8a median of {speed['reps']} round-robin repetitions; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end.",
            "training_peak = the first step's VmHWM over the RSS when training started (what training adds to the resident "
            "data); peak_rss = the child's whole life (data generation and preparation included).",
        ],
    }


if __name__ == "__main__":
    print(MARKER + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
