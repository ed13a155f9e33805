"""W9: a model that needs Pyro's sequential mode, Pyro ``parallel=False`` vs devicemem's.

The model is shaped like bayesDREAM's cis model: a scalar latent broadcast with ``expand(G)``
(G fixed) and a Python float taken from a latent with ``.item()``, so it cannot run under
Pyro's sample plate; each sample draws an observation site y [N, G]. Both sides return the
small latents only (``return_sites=["loc", "scale"]``): Pyro's sequential mode keeps every
sample's trace (y and its distribution) until the call ends, devicemem writes each sample into
the preallocated result and drops it, so its peak must not grow with S.

``run(quick)`` measures each configuration in a fresh child (``python -m bench.w9_sequential
'<spec>'``) under ``tests.support.child.run_child`` (exact peak RSS) and returns the points and
the figures: time and peak of each side at two S, their ratios, and devicemem's peak growth.
Configurations: ``pyro-sequential`` (``pyro.infer.Predictive(parallel=False)``),
``devicemem-sequential`` (``devicemem.Predictive(parallel=False, device="cpu")``) and
``devicemem-auto`` (``parallel=None``: detects that the model does not vectorise, then the same).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from bench.child import MARKER
from bench.harness import REPO_ROOT, error_line

SIZES = {
    "quick": dict(N=200, G=500, S=(50, 200)),
    "full": dict(N=200, G=1000, S=(200, 800)),
}
CONFIGS = ("pyro-sequential", "devicemem-sequential", "devicemem-auto")
SITES = ["loc", "scale"]


def cis_like_model(n_cells: int, n_genes: int) -> None:
    import pyro
    import pyro.distributions as dist

    scale = pyro.sample("scale", dist.HalfNormal(1.0))
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("cells", n_cells, dim=-2), pyro.plate("genes", n_genes, dim=-1):
        pyro.sample("y", dist.Normal(loc.expand(n_genes), scale.item()))


def measure(spec: dict) -> dict[str, Any]:
    """Runs in the child: one configuration, one call, timed."""
    import pyro
    import torch

    import devicemem

    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    args = (spec["N"], spec["G"])
    if spec["config"] == "pyro-sequential":
        predictive = pyro.infer.Predictive(cis_like_model, num_samples=spec["S"], parallel=False, return_sites=SITES)
    else:
        parallel = False if spec["config"] == "devicemem-sequential" else None
        predictive = devicemem.Predictive(cis_like_model, num_samples=spec["S"], parallel=parallel, return_sites=SITES,
                                          device="cpu", progress=False)
    began = time.perf_counter()
    samples = predictive(*args)
    wall = time.perf_counter() - began
    assert samples["loc"].shape[0] == spec["S"], samples["loc"].shape
    return {"wall_s": wall}


def run(quick: bool = False) -> dict[str, Any]:
    """Measure W9: every configuration at both S, each in a fresh child."""
    from tests.support.child import run_child

    size = SIZES["quick" if quick else "full"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    points: list[dict[str, Any]] = []
    for num_samples in size["S"]:
        for config in CONFIGS:
            spec = {"N": size["N"], "G": size["G"], "S": num_samples, "config": config}
            child = run_child([sys.executable, "-m", "bench.w9_sequential", json.dumps(spec)], timeout=1800,
                              cwd=REPO_ROOT, env=env)
            payload = next((json.loads(line[len(MARKER):]) for line in child.stdout.splitlines()
                            if line.startswith(MARKER)), None)
            if not child.ok or payload is None:
                points.append({"config": config, "S": num_samples, "outcome": error_line(child.stderr) or "failed"})
                continue
            points.append({"config": config, "S": num_samples, "outcome": "ok", "wall_s": payload["wall_s"],
                           "peak_rss_bytes": child.peak_rss_bytes})
    return {"status": "done", "params": {**size, "S": list(size["S"])}, "points": points,
            "figures": _figures(points, size["S"]),
            "notes": [f"cis-like model (expand(G) of a scalar latent, .item()), N={size['N']}, G={size['G']}: "
                      f"one y [N, G] per sample; return_sites={SITES}; one call per child, 1 torch thread."]}


def _figures(points: list[dict[str, Any]], sizes: tuple[int, int]) -> dict[str, float]:
    by = {(p["config"], p["S"]): p for p in points if p.get("outcome") == "ok"}
    figures: dict[str, float] = {}
    for num_samples in sizes:
        pyro_point, ours = by.get(("pyro-sequential", num_samples)), by.get(("devicemem-sequential", num_samples))
        if pyro_point and ours:
            figures[f"time_pyro_over_devicemem_S{num_samples}"] = pyro_point["wall_s"] / ours["wall_s"]
            figures[f"peak_pyro_over_devicemem_S{num_samples}"] = pyro_point["peak_rss_bytes"] / ours["peak_rss_bytes"]
    small, large = sizes
    for config in CONFIGS:
        if (config, small) in by and (config, large) in by:
            figures[f"peak_growth_{config}_S{large}_over_S{small}"] = (
                by[(config, large)]["peak_rss_bytes"] / by[(config, small)]["peak_rss_bytes"]
            )
    return figures


if __name__ == "__main__":
    print(MARKER + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
