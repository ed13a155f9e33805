"""W11: block-parallel draws on the host's cores (devicemem.blockdraw), 1 thread vs all usable.

``run(quick)`` measures in one fresh child (``python -m bench.w11_threads '<spec>'``, under W2a's
memory cap) and returns ``{"status", "params", "points", "figures", "notes"}``:

- ``control``: the NB draw split into k parts, one per thread with its own generator, torch's
  kernels only (the issue's 1.9x on 2 idle cores): how many cores the machine gives right now.
- ``raw NB``: one negative-binomial draw of N x T elements (N=T=2000: 4M) shaped as the
  technical model's ``y_obs`` ([N, T] logits, [1, T] dispersion): the distribution's own
  ``sample`` with one torch thread, then :func:`devicemem.blockdraw.block_sample` on 1 and on
  all usable threads. Median of ``reps``, round-robin.
- ``per element``: the same for every covered distribution, as ns per element.
- ``threshold``: own sample / blocks on all cores for NB and Normal at 1, 2, 4 and 16 blocks'
  worth of elements, the basis of :data:`devicemem.blockdraw.MIN_ELEMENTS`.
- ``W2a``: W2a's devicemem Predictive (y_obs streamed into mean/var, ``device="cpu"``) with
  ``threads=1`` and with all usable cores, in the same child, calls interleaved; each plans
  for itself (the probe's timings, and so the batch size, see its threads).
- ``obs site``: the technical model's ``y_obs`` inside ``Sampler.draw`` at B=1 with all cores:
  the draw's time with y_obs drawn minus with y_obs given (so the site's own time, its
  distribution's construction included), over the raw single-core draw of that same
  distribution.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench.child import MARKER
from bench.data import DataSpec
from bench.harness import REPO_ROOT, error_line, ensure_dataset

SIZES = {
    "quick": dict(N=500, T=500, C=2, S=8, reps=1, w2a_reps=1, cap="4GiB"),
    "full": dict(N=2000, T=2000, C=2, S=100, reps=5, w2a_reps=2, cap="4GiB"),
}


def _round_robin(configs: dict[Any, Callable[[], Any]], reps: int) -> dict[Any, float]:
    """Median seconds per configuration, repetitions interleaved so load drift spreads."""
    times: dict[Any, list[float]] = {name: [] for name in configs}
    for _ in range(reps):
        for name, fn in configs.items():
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in times.items()}


def _distributions(n: int, t: int) -> dict[str, Any]:
    import pyro.distributions as dist
    import torch

    grid = torch.rand(n, t)
    return {
        "NegativeBinomial": dist.NegativeBinomial(torch.rand(1, t) * 5 + 0.5, logits=grid * 6 - 3),
        "GammaPoisson": dist.GammaPoisson(torch.rand(1, t) * 5 + 0.5, grid + 0.1),
        "Poisson": dist.Poisson(grid * 20),
        "Gamma": dist.Gamma(grid * 5 + 0.5, torch.ones(1, t)),
        "Normal": dist.Normal(grid, 1.0),
        "LogNormal": dist.LogNormal(grid, 0.5),
        "StudentT": dist.StudentT(3.0, grid, 1.0),
        "Binomial": dist.Binomial(torch.full((1, t), 20.0), logits=grid * 4 - 2),
        "Beta": dist.Beta(grid * 5 + 0.5, 2.0),
        "Dirichlet": dist.Dirichlet(torch.rand(n, t // 4, 4) + 0.5),
    }


def measure(spec: dict) -> dict[str, Any]:
    """Runs in the child: every measurement above."""
    from concurrent.futures import ThreadPoolExecutor

    import pyro.poutine as poutine
    import torch

    import devicemem
    from bench.child import technical_setup
    from devicemem.backends import device_memory
    from devicemem.blockdraw import BLOCK_ELEMENTS, block_sample
    from devicemem.sampling import Sampler

    cores = device_memory("cpu").cores or 1
    torch_threads = torch.get_num_threads()
    reps = spec["reps"]
    points: list[dict[str, Any]] = []

    def own(d: Any) -> Callable[[], Any]:
        def draw() -> Any:
            torch.set_num_threads(1)
            try:
                return d.sample()
            finally:
                torch.set_num_threads(torch_threads)
        return draw

    pools = {1: ThreadPoolExecutor(1), cores: ThreadPoolExecutor(cores)}
    n, t = spec["N"], spec["T"]

    # control: the measurement of what this machine's cores give right now: k threads,
    # each a k-th of the NB draw with its own generator, torch's gamma and Poisson kernels only
    nb = _distributions(n, t)["NegativeBinomial"]

    def halves(k: int) -> None:
        def part(total_count: Any, logits: Any) -> Any:
            g = torch.Generator().manual_seed(0)
            rate = torch._standard_gamma(total_count, generator=g).div_(logits.neg().exp())
            return torch.poisson(rate, generator=g)

        torch.set_num_threads(1)
        try:
            list(pools[k].map(part, nb.total_count.chunk(k), nb.logits.chunk(k)))
        finally:
            torch.set_num_threads(torch_threads)

    control = _round_robin({k: (lambda k=k: halves(k)) for k in pools}, reps)
    points.append({"measure": f"control: NB in {cores} parts on {cores} threads vs 1 (the machine's free cores now)",
                   "speedup": control[1] / control[cores]})
    per_element: dict[str, dict[str, float]] = {}
    for name, d in _distributions(n, t).items():
        elements = d.batch_shape.numel() * d.event_shape.numel()
        configs = {"own, 1 torch thread": own(d)}
        configs.update({f"blocks, {k} thread(s)": (lambda k=k: block_sample(d, name, 0, pools[k], k)) for k in pools})
        timed = _round_robin(configs, reps if name == "NegativeBinomial" else max(1, reps // 2))
        per_element[name] = {config: 1e9 * seconds / elements for config, seconds in timed.items()}
        points.append({"measure": f"{name}, {elements} elements",
                       **{f"{config} ns/el": value for config, value in per_element[name].items()}})
    # the threshold: sizes around MIN_ELEMENTS, own sample vs blocks on all cores
    for elements in (BLOCK_ELEMENTS, 2 * BLOCK_ELEMENTS, 4 * BLOCK_ELEMENTS, 16 * BLOCK_ELEMENTS):
        for name in ("NegativeBinomial", "Normal"):
            d = _distributions(elements // 1024, 1024)[name]
            timed = _round_robin({"own": own(d), "blocks": lambda: block_sample(d, name, 0, pools[cores], cores)},
                                 max(3, reps) * 4)
            points.append({"measure": f"threshold: {name}, {elements} elements",
                           "own / blocks on all cores": timed["own"] / timed["blocks"]})
    for pool in pools.values():
        pool.shutdown()

    model, guide, args, kwargs, data = technical_setup({**spec, "observe": True})
    common = dict(guide=guide, num_samples=spec["S"], return_sites=["y_obs"], seed=0, progress=False,
                  reduce={"y_obs": ("mean", "var")}, device="cpu")
    runners = {k: devicemem.Predictive(model, threads=k, **common) for k in sorted({1, cores})}
    timed = _round_robin({k: (lambda runner=runner: runner(*args, **kwargs)) for k, runner in runners.items()},
                         spec["w2a_reps"])
    walls = {k: timed[k] for k in runners}
    for k, runner in runners.items():
        sizes = sorted({record.size for record in runner.report})
        points.append({"measure": f"W2a devicemem, threads={k}", "wall_s": walls[k],
                       "batches": f"{len(runner.report)} of {sizes}"})

    # the y_obs site at B=1 inside Sampler.draw: drawn vs given, and its raw single-core draw
    sampler = Sampler(model, guide, args, kwargs, threads=cores)
    with poutine.trace() as outer:
        sampler.draw(1, args, kwargs, ["y_obs"])
    obs = outer.trace.nodes["y_obs"]
    timed = _round_robin({
        "drawn": lambda: sampler.draw(1, args, kwargs, ["y_obs"]),
        "given": lambda: sampler.draw(1, args, kwargs, ["y_obs"], posterior={"y_obs": obs["value"]}),
        "raw": own(obs["fn"]),
    }, reps)
    site = timed["drawn"] - timed["given"]
    points.append({"measure": f"y_obs site at B=1 ({n * t} elements), {cores} threads", "wall_s": site,
                   "raw_s": timed["raw"], "draw_s": timed["drawn"]})
    nb = per_element["NegativeBinomial"]
    return {
        "points": points, "cores": cores, "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "figures": {
            "usable_cores": cores,
            "control_parallel_speedup_of_the_machine_now": control[1] / control[cores],
            "raw_nb_speedup_all_cores_vs_own": nb["own, 1 torch thread"] / nb[f"blocks, {cores} thread(s)"],
            "raw_nb_speedup_all_cores_vs_1_thread_blocks": nb["blocks, 1 thread(s)"] / nb[f"blocks, {cores} thread(s)"],
            "w2a_speedup_all_cores_vs_threads_1": walls[1] / walls[cores],
            "obs_site_over_raw_single_core": site / timed["raw"],
        },
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Measure W11 in a fresh child process under W2a's cap."""
    from tests.support.child import run_child
    from devicemem.units import parse_bytes

    size = SIZES["quick" if quick else "full"]
    with tempfile.TemporaryDirectory(prefix="devicemem-w11-") as cache:
        data = ensure_dataset(DataSpec(size["N"], size["T"], size["C"]), Path(cache))
        spec = {**size, "data": str(data), "seed": 0}
        child = run_child([sys.executable, "-m", "bench.w11_threads", json.dumps(spec)],
                          cap_bytes=parse_bytes(size["cap"]), timeout=3600, cwd=REPO_ROOT)
    payload = next((json.loads(line[len(MARKER):]) for line in child.stdout.splitlines()
                    if line.startswith(MARKER)), None)
    if not child.ok or payload is None:
        return {"status": "failed", "params": size, "notes": [f"failed: {error_line(child.stderr)}"]}
    return {
        "status": "done", "params": {**size, "cores": payload["cores"]}, "points": payload["points"],
        "figures": payload["figures"],
        "notes": [
            f"N={size['N']}, T={size['T']}, S={size['S']}, cap {size['cap']}; {payload['cores']} usable cores; "
            f"timings are medians of {size['reps']} interleaved repetitions (W2a: {size['w2a_reps']} "
            "interleaved calls each, the first of each also planning: its probe is timed with its threads); "
            f"load average {payload['load']} at the end.",
            "own = the distribution's own sample() with one torch thread; blocks = "
            "devicemem.blockdraw.block_sample on a pool of k threads (same values for any k).",
            "obs site = Sampler.draw(B=1) with y_obs drawn minus with y_obs given; raw = that y_obs "
            "distribution's own sample() on one core.",
        ],
    }


if __name__ == "__main__":
    print(MARKER + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
