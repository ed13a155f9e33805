"""W10: bayesDREAM's three stages as a user runs them, unrouted vs inside ``bayesdream_routing``.

The stages are the fakes of ``tests/bayesdream_fakes.py``, which reproduce bayesDREAM's
Predictive patterns (bayesDREAM itself is not on the package index): ``fit_technical`` with
its batch rule's sequential batches of 100 (what the real rule chose at 1600 x 800), ``fit_cis``
(an unvectorisable model, Predictive with no ``parallel``) and ``fit_trans`` (memory [B, B, N,
T] under a sample plate, ``y_obs`` returned). Each (stage, mode) runs in a fresh child under
one memory cgroup cap: outcome, time of the stage's call, peak RSS of the whole child. Before
cis and trans, the child writes a short technical fit into the object (untimed), as a user's
script would have.

``python -m bench --only W10`` or, alone, ``python -m bench.w10_bayesdream [--quick]``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from bench.child import MARKER
from bench.harness import REPO_ROOT

STAGES = ("technical", "cis", "trans")
SIZES = {
    "quick": dict(N=400, T=200, S=1000, cap_bytes=1 << 30),
    "full": dict(N=1600, T=800, S=1000, cap_bytes=6 << 30),
}
RULE = (100, False)  # bayesDREAM's rule at 1600 x 800: sequential batches of 100


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in the child: one stage, routed or not; the keys and shapes it returned."""
    from bayesDREAM_ext.fit import fit_technical
    from bayesDREAM_ext.routing import bayesdream_routing
    from tests.bayesdream_fakes import make_object

    obj = make_object(spec["N"], spec["T"], seed=0)
    obj._technical_fitter.rule = RULE
    if spec["stage"] != "technical":
        fit_technical(obj, niters=5, nsamples=8, progress=False, seed=0)
    stage = getattr(obj, f"fit_{spec['stage']}")
    began = time.perf_counter()
    if spec["routed"]:
        with bayesdream_routing(obj, progress=False, seed=0):
            samples = stage(nsamples=spec["S"])
    else:
        samples = stage(nsamples=spec["S"])
    wall = time.perf_counter() - began
    return {
        "wall_s": wall,
        "shapes": {name: list(value.shape) for name, value in samples.items()},
        "technical_calls": len(obj._technical_fitter.predictive_calls),
    }


def _point(spec: dict[str, Any]) -> dict[str, Any]:
    from tests.support.child import run_child

    child = run_child([sys.executable, "-m", "bench.w10_bayesdream", json.dumps(spec)], cap_bytes=spec["cap_bytes"],
                      timeout=1800, cwd=REPO_ROOT)
    payload = next((json.loads(line[len(MARKER):]) for line in child.stdout.splitlines() if line.startswith(MARKER)), None)
    outcome = "killed" if child.killed else "timeout" if child.timed_out else "ok" if child.ok and payload else "failed"
    point = {
        "stage": spec["stage"], "mode": "routed" if spec["routed"] else "unrouted", "outcome": outcome,
        "wall_s": payload["wall_s"] if payload else None, "peak_rss_bytes": child.peak_rss_bytes,
        "predictive_calls": payload["technical_calls"] if payload and spec["stage"] == "technical" else None,
        "cap": child.cap_method,
    }
    if outcome == "failed":
        point["error"] = (child.stderr.strip().splitlines() or [""])[-1][:300]
    return point


def _figures(points: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(point["stage"], point["mode"]): point for point in points}
    figures: dict[str, Any] = {}
    for stage in STAGES:
        plain, routed = by[(stage, "unrouted")], by[(stage, "routed")]
        if plain["outcome"] == routed["outcome"] == "ok":
            figures[f"{stage}_time_unrouted_over_routed"] = plain["wall_s"] / routed["wall_s"]
            figures[f"{stage}_peak_unrouted_over_routed"] = plain["peak_rss_bytes"] / routed["peak_rss_bytes"]
        else:
            figures[f"{stage}_outcomes"] = f"unrouted {plain['outcome']}, routed {routed['outcome']}"
    return figures


def run(quick: bool = False) -> dict[str, Any]:
    """Measure W10: every stage unrouted then routed, each in a fresh capped child."""
    size = SIZES["quick" if quick else "full"]
    points = [_point({**size, "stage": stage, "routed": routed}) for stage in STAGES for routed in (False, True)]
    return {
        "status": "done", "params": size, "points": points, "figures": _figures(points),
        "notes": [
            f"fake bayesDREAM stages (tests/bayesdream_fakes.py), N={size['N']} cells, T={size['T']} genes, "
            f"S={size['S']}, one cap of {size['cap_bytes'] >> 20} MiB for every child; time = the stage's call only.",
            "technical unrouted: its batch rule's sequential (parallel=False) batches of 100; routed: the rule is "
            "replaced and devicemem plans one call.",
        ],
    }


if __name__ == "__main__":
    if sys.argv[1:] and sys.argv[1].startswith("{"):
        print(MARKER + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
    else:
        print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=1))
