"""W3: how close the footprint estimators come to the real peak of a vectorised Predictive.

Every point runs in a fresh child (``python -m bench.w3_accuracy '<spec>'``): it sets up
(imports, data, an initialised AutoNormal / AutoIAFNormal / AutoDelta guide), collects garbage,
restarts the kernel's high-water mark (/proc/self/clear_refs, through devicemem's CPU backend),
runs one vectorised batch of B samples as devicemem's runner does (one
:meth:`devicemem.sampling.Sampler.draw`) and reads VmHWM. The
measured peak is VmHWM minus the RSS just before the call (the data and guide are already
resident); ``wait4``'s peak RSS of the whole child is reported next to it as a cross-check.

The prediction for the technical model is :func:`bayesDREAM_ext.memory.technical_footprint` (inputs
resident); for the non-technical model (a fit_trans-style Hill model), and once for the
technical model as a check of the probe itself, it is :func:`devicemem.probe_footprint`, run in
its own child (several batches in one process, as the planner runs it), margin included, then
compared with fresh children at larger batches. ``run(quick)`` is what ``python -m bench`` calls as W3.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from typing import Any

from bench.child import MARKER
from bench.harness import REPO_ROOT, error_line

RANGE = (0.9, 1.25)

# (distribution, guide, with_obs, N, T, C, B): sizes whose batch tensors are >= 32 MiB, where
# glibc mmaps them as it does at real sizes. Below that (the seed's 3000 x 4000 params-only case:
# 16 MB [B, T] tensors) glibc's heap keeps a varying share of dead temporaries resident: see
# SMALL, reported apart.
TECHNICAL_FULL = [
    ("negbinom", "normal", False, 500, 20000, 2, 600),
    ("negbinom", "normal", False, 500, 20000, 2, 1200),
    ("negbinom", "normal", False, 300, 24000, 4, 500),
    ("negbinom", "normal", False, 300, 24000, 4, 1000),
    ("negbinom", "normal", True, 1500, 3000, 2, 4),
    ("negbinom", "normal", True, 1500, 3000, 2, 12),
    ("negbinom", "normal", True, 2500, 4000, 3, 3),
    ("negbinom", "normal", True, 2500, 4000, 3, 8),
    ("normal", "normal", True, 1500, 3000, 2, 8),
    ("studentt", "normal", False, 300, 24000, 3, 600),
    ("binomial", "normal", False, 300, 24000, 3, 600),
    ("negbinom", "iaf", False, 200, 750, 2, 6000),
    ("negbinom", "delta", False, 300, 24000, 2, 1000),
]
SMALL = [("negbinom", "normal", False, 3000, 4000, 2, 1000)]
TECHNICAL_QUICK = [
    ("negbinom", "normal", False, 500, 20000, 2, 600),
    ("negbinom", "normal", False, 500, 20000, 2, 1200),
    ("negbinom", "normal", True, 1200, 2500, 2, 6),
    ("negbinom", "normal", True, 1200, 2500, 2, 12),
]
CAP_BYTES = 6 << 30  # a point that outgrows this is killed, not the shared machine
# Probed models (the Hill model and, as a check of the probe itself, the technical model with
# its observation site) and the larger batches measured in fresh children after the probe.
_TECHNICAL_OBS = dict(model="technical", distribution="negbinom", guide="normal", with_obs=True, C=2)
PROBES = {
    "full": [(dict(model="hill", N=1000, T=1000), (24, 48)), (dict(_TECHNICAL_OBS, N=1500, T=3000), (12,))],
    "quick": [(dict(model="hill", N=500, T=1000), (16, 32))],
}


# --- the non-technical model -------------------------------------------------------------


def hill_model(x_mean, n_features: int, y=None):
    """fit_trans-style: each cell's cis expression x drives every feature through a Hill curve,
    y[n, t] ~ Normal(b_t + a_t * x_n^h_t / (K_t^h_t + x_n^h_t), sigma_t)."""
    import pyro
    import pyro.distributions as dist
    import torch

    one = torch.ones((), dtype=x_mean.dtype)
    with pyro.plate("cells", x_mean.shape[0], dim=-2):
        x = pyro.sample("x", dist.LogNormal(x_mean.log().unsqueeze(-1), 0.3 * one))
    with pyro.plate("features", n_features, dim=-1):
        base = pyro.sample("b", dist.Normal(0.0 * one, 1.0))
        amplitude = pyro.sample("a", dist.HalfNormal(2.0 * one))
        half = pyro.sample("K", dist.LogNormal(0.0 * one, 0.5))
        hill = pyro.sample("h", dist.Gamma(4.0 * one, 2.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0 * one))
        xh = x**hill
        mean = base + amplitude * xh / (half**hill + xh)
        with pyro.plate("cells_y", x_mean.shape[0], dim=-2):
            pyro.sample("y", dist.Normal(mean, sigma), obs=y)


# --- the child -----------------------------------------------------------------------------


def _technical(spec: dict) -> tuple[Any, Any, dict, dict]:
    """Model, initialised guide, Predictive kwargs and the shapes, through bayesDREAM_ext."""
    import torch
    from pyro.infer.autoguide import AutoDelta, AutoIAFNormal, AutoNormal

    from bayesDREAM_ext.data import prepare_technical
    from bayesDREAM_ext.model import build_model_inputs
    from bayesDREAM_ext.synthetic import synthetic_data

    synthetic = synthetic_data(spec["distribution"], spec["N"], spec["T"], spec["C"], n_categories=spec.get("K", 3), seed=0)
    data = prepare_technical(synthetic.counts, synthetic.groups, synthetic.sum_factors,
                             distribution=spec["distribution"], denominator=synthetic.denominator)
    del synthetic
    inputs = build_model_inputs(data)
    guide = {"normal": AutoNormal, "iaf": AutoIAFNormal, "delta": AutoDelta}[spec["guide"]](inputs.model)
    with torch.no_grad():
        guide(**inputs.kwargs)
    if not spec["with_obs"]:
        kwargs = inputs.params_only()
    elif spec["distribution"] == "multinomial":  # its likelihood is a factor on the observed counts
        kwargs = dict(inputs.kwargs, observe=True)
    else:
        kwargs = dict(inputs.kwargs, observe=True, counts=None)
    shapes = {"n_cells": data.n_cells, "n_features": data.n_features, "n_groups": data.n_groups,
              "n_categories": data.n_categories}
    return inputs.model, guide, kwargs, shapes


def _hill(spec: dict) -> tuple[Any, Any, dict, dict]:
    import pyro
    import torch
    from pyro.infer.autoguide import AutoNormal

    pyro.set_rng_seed(0)
    kwargs = {"x_mean": torch.rand(spec["N"]) + 0.5, "n_features": spec["T"]}
    guide = AutoNormal(hill_model)
    with torch.no_grad():
        guide(**kwargs, y=torch.randn(spec["N"], spec["T"]))
    return hill_model, guide, kwargs, {"n_cells": spec["N"], "n_features": spec["T"]}


def measure(spec: dict) -> dict[str, Any]:
    """In the child: the peak of one vectorised batch of ``spec["B"]`` samples above the RSS
    just before it, or (``spec["probe"]``) the probed footprint."""
    import pyro

    from devicemem.backends import get_backend
    from devicemem.footprint import probe_footprint
    from devicemem.sampling import Sampler, select_sites

    pyro.set_rng_seed(0)
    model, guide, kwargs, shapes = (_hill if spec["model"] == "hill" else _technical)(spec)
    if spec.get("probe"):
        began = time.perf_counter()
        footprint = probe_footprint(model, guide, device="cpu", **kwargs)
        return {"footprint": footprint.__dict__, "seconds": time.perf_counter() - began, **shapes}
    sampler = Sampler(model, guide, (), kwargs)
    returned = select_sites(sampler.sites, (), True, None)
    backend = get_backend("cpu")
    gc.collect()
    backend.reset_peak("cpu")
    before = backend.current_bytes("cpu")
    samples = sampler.draw(spec["B"], (), kwargs, returned)
    peak = backend.peak_bytes("cpu")
    del samples
    return {"baseline_bytes": before, "delta_bytes": peak - before, **shapes}


def _child(spec: dict) -> tuple[dict | None, Any]:
    from tests.support.child import run_child

    child = run_child([sys.executable, "-m", "bench.w3_accuracy", json.dumps(spec)], cap_bytes=CAP_BYTES,
                      timeout=900, cwd=REPO_ROOT)
    payload = next((json.loads(line[len(MARKER):]) for line in child.stdout.splitlines()
                    if line.startswith(MARKER)), None)
    return (payload if child.ok else None), child


# --- the parent ----------------------------------------------------------------------------


def _point(name: str, predicted: int, payload: dict, child: Any) -> dict[str, Any]:
    measured = payload["delta_bytes"]
    return {
        "point": name, "predicted_bytes": predicted, "measured_bytes": measured,
        "ratio": predicted / measured, "child_peak_minus_baseline_bytes": child.peak_rss_bytes - payload["baseline_bytes"],
    }


def _technical_points(rows: list[tuple]) -> tuple[list[dict[str, Any]], list[str]]:
    from bayesDREAM_ext.memory import technical_footprint

    points, failures = [], []
    for distribution, guide, with_obs, n, t, c, b in rows:
        spec = dict(model="technical", distribution=distribution, guide=guide, with_obs=with_obs, N=n, T=t, C=c, B=b)
        name = f"technical {distribution}/{guide}{' +obs' if with_obs else ''} N={n} T={t} C={c} B={b}"
        payload, child = _child(spec)
        if payload is None:
            failures.append(f"{name}: {error_line(child.stderr)}")
            continue
        footprint = technical_footprint(payload["n_cells"], payload["n_features"], payload["n_groups"],
                                        payload["n_categories"], distribution, guide, with_obs)
        points.append(_point(name, footprint.peak_bytes(b, inputs_resident=True), payload, child))
    return points, failures


def _probe_points(shapes: dict, batches: tuple[int, ...]) -> tuple[list[dict[str, Any]], list[str]]:
    from devicemem.footprint import Footprint

    what = "Hill model" if shapes["model"] == "hill" else f"technical {shapes['distribution']}"
    label = f"probe: {what} +obs N={shapes['N']} T={shapes['T']}"
    probed, child = _child(dict(shapes, probe=True))
    if probed is None:
        return [], [f"{label}: {error_line(child.stderr)}"]
    footprint = Footprint(**probed["footprint"])
    points, failures = [], []
    for b in batches:
        payload, child = _child(dict(shapes, B=b))
        name = f"{label} B={b} ({footprint.source}, {probed['seconds']:.1f} s)"
        if payload is None:
            failures.append(f"{name}: {error_line(child.stderr)}")
            continue
        points.append(_point(name, footprint.peak_bytes(b, inputs_resident=True), payload, child))
    return points, failures


def run(quick: bool = False) -> dict[str, Any]:
    """Measure every point in fresh children; ``{"status", "params", "points", "notes"}``.
    The small-tensor points (full run only) are reported in the notes, outside the grid."""
    points, failures = _technical_points(TECHNICAL_QUICK if quick else TECHNICAL_FULL)
    for shapes, batches in PROBES["quick" if quick else "full"]:
        probe_points, probe_failures = _probe_points(shapes, batches)
        points += probe_points
        failures += probe_failures
    small, small_failures = ([], []) if quick else _technical_points(SMALL)
    failures += small_failures
    low, high = RANGE
    outside = [p["point"] for p in points if not low <= p["ratio"] <= high]
    return {
        "status": "failed" if failures else "done",
        "params": {"quick": quick, "range": RANGE},
        "points": points,
        "notes": [
            "predicted = footprint.peak_bytes(B, inputs_resident=True); measured = VmHWM during the "
            "call minus RSS just before it, in a fresh child per point (Linux clear_refs).",
            f"{len(points)} points, ratios {min(p['ratio'] for p in points):.3f} .. "
            f"{max(p['ratio'] for p in points):.3f}" if points else "no points",
            *(f"outside [{low}, {high}]: {name}" for name in outside),
            *(f"small-tensor regime (glibc heap, outside the grid): {p['point']}: predicted "
              f"{p['predicted_bytes'] / 1e6:.0f} MB, measured {p['measured_bytes'] / 1e6:.0f} MB, "
              f"ratio {p['ratio']:.2f}" for p in small),
            *(f"failed: {line}" for line in failures),
        ],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("{"):
        print(MARKER + json.dumps(measure(json.loads(argv[0]))), flush=True)
        return 0
    result = run(quick="--quick" in argv)
    print(f"{'point':<72} {'predicted':>10} {'measured':>10} {'ratio':>6}")
    for p in result["points"]:
        print(f"{p['point'][:72]:<72} {p['predicted_bytes'] / 1e6:>8.1f}MB {p['measured_bytes'] / 1e6:>8.1f}MB {p['ratio']:>6.3f}")
    print("\n".join(result["notes"]))
    return 0 if result["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
