"""W7: one posterior predictive sharded on Ray, 2 CPU workers vs 1 (the Ray issue).

``run(quick)`` measures in a fresh child (``python -m bench.w7_ray '<spec>'``), so Ray starts
cold there, and returns ``{"status", "params", "points", "figures", "notes"}``: one point per
configuration and the figures the issue asks for (speed ratio of 2 workers vs 1, Ray start-up,
first-call worker start, per-call dispatch and result-transfer overhead).

The work is W2's: the technical model's posterior predictive with the observation site
``y_obs``, streamed into per-entry mean/variance (``reduce``), plus a ``collect`` variant that
stores every ``y_obs`` draw so the transfer of full results through Ray's object store shows.
Configurations: devicemem in this process (1 and 2 torch threads), then Ray with 1 CPU and
1 shard, and Ray with 2 CPUs and 2 shards (each shard one worker with 1 torch thread).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.child import MARKER
from bench.data import DataSpec
from bench.harness import REPO_ROOT, error_line, ensure_dataset

SIZES = {
    "quick": dict(N=500, T=500, C=2, S=32, reps=1),
    "full": dict(N=1000, T=1000, C=2, S=96, reps=3),
}


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _timed(runner: Any, args: tuple, kwargs: dict) -> tuple[float, Any]:
    began = time.perf_counter()
    result = runner(*args, **kwargs)
    return time.perf_counter() - began, result


def measure(spec: dict) -> dict[str, Any]:
    """Runs in the child: every configuration, ``spec["reps"]`` warm calls each."""
    import ray
    import torch

    import devicemem
    from bench.child import technical_setup
    from devicemem.options import RayOptions

    model, guide, args, kwargs, data = technical_setup({**spec, "observe": True})
    n_cells, n_features = data["counts"].shape
    common = dict(guide=guide, num_samples=spec["S"], return_sites=["y_obs"], seed=0, progress=False)
    reduce = {"y_obs": ("mean", "var")}
    points: list[dict[str, Any]] = []

    for threads in (1, 2):
        torch.set_num_threads(threads)
        runner = devicemem.Predictive(model, device="cpu", reduce=reduce, **common)
        walls = [_timed(runner, args, kwargs)[0] for _ in range(spec["reps"])]
        points.append({"config": f"in-process, {threads} torch thread(s)", "wall_s": _median(walls),
                       "batches": len(runner.report)})

    for workers in (1, 2):
        began = time.perf_counter()
        ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - began
        for sink in ("reduce", "collect"):
            runner = devicemem.Predictive(
                model, backend=RayOptions(num_shards=workers), reduce=reduce if sink == "reduce" else None,
                device="cpu", **common,
            )
            cold, _ = _timed(runner, args, kwargs)
            walls, compute, writes = [], [], []
            for _ in range(spec["reps"]):
                wall, result = _timed(runner, args, kwargs)
                walls.append(wall)
                compute.append(max(record.wall_s for record in runner.report))
                writes.append(sum(record.write_s for record in runner.report))
                del result
            wall = _median(walls)
            points.append({
                "config": f"ray, {workers} worker(s), {sink}", "wall_s": wall, "cold_call_s": cold,
                "ray_init_s": startup, "slowest_shard_s": _median(compute),
                "overhead_s": wall - _median(compute), "driver_store_s": _median(writes),
                "result_bytes": spec["S"] * n_cells * n_features * 4 if sink == "collect" else None,
                "shards": [(record.start, record.size, record.device, len(record.batches))
                           for record in runner.report],
            })
        ray.shutdown()
    return {"points": points, "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}


def _figures(points: list[dict[str, Any]]) -> dict[str, float]:
    by = {point["config"]: point for point in points}
    one, two = by["ray, 1 worker(s), reduce"], by["ray, 2 worker(s), reduce"]
    collect = by["ray, 2 worker(s), collect"]
    return {
        "speed_ratio_2_vs_1_workers": one["wall_s"] / two["wall_s"],
        "ray_2_workers_vs_in_process_2_threads": by["in-process, 2 torch thread(s)"]["wall_s"] / two["wall_s"],
        "ray_init_s": two["ray_init_s"],
        "first_call_extra_s": two["cold_call_s"] - two["wall_s"],
        "overhead_per_call_s": two["overhead_s"],
        "collect_overhead_per_call_s": collect["overhead_s"],
        "collect_driver_store_s": collect["driver_store_s"],
        "collect_result_bytes": collect["result_bytes"],
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Measure W7 in a fresh child process; the figures, or status "skipped" without Ray."""
    if importlib.util.find_spec("ray") is None:
        return {"status": "skipped", "notes": ["skipped: Ray is not installed (pip install 'devicemem[ray]')."]}
    from tests.support.child import run_child

    size = SIZES["quick" if quick else "full"]
    with tempfile.TemporaryDirectory(prefix="devicemem-w7-") as cache:
        data = ensure_dataset(DataSpec(size["N"], size["T"], size["C"]), Path(cache))
        spec = {**size, "data": str(data), "seed": 0}
        child = run_child([sys.executable, "-m", "bench.w7_ray", json.dumps(spec)], timeout=1800, cwd=REPO_ROOT)
    payload = next((json.loads(line[len(MARKER):]) for line in child.stdout.splitlines()
                    if line.startswith(MARKER)), None)
    if not child.ok or payload is None:
        return {"status": "failed", "params": size, "notes": [f"failed: {error_line(child.stderr)}"]}
    return {
        "status": "done", "params": size, "points": payload["points"], "figures": _figures(payload["points"]),
        "notes": [
            f"posterior predictive of the technical model with y_obs, N={size['N']}, T={size['T']}, "
            f"S={size['S']}; median of {size['reps']} warm call(s); load average {payload['load']} at the end.",
            "overhead = call wall - slowest shard's own sampling time (model trace on the driver, "
            "shipping model/guide/args, scheduling, result transfer and stores); ray_init_s = ray.init.",
        ],
    }


if __name__ == "__main__":
    print(MARKER + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
