"""The workloads W1-W6: sizes, caps, configurations, and what each one's quick variant changes.

Sizes follow the benchmark issue; where this 2-core machine cannot afford them within the run
budget the variant says what it changes and why in ``notes`` (printed under its table).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from devicemem.units import parse_bytes

from bench.data import DataSpec
from bench.harness import Config

GIB = parse_bytes("1GiB")
SWEEP_SIZES = (10, 25, 50, 100, 250, 1000)


@dataclass(frozen=True)
class Workload:
    """One table of the report. ``kind``: "predictive" (baselines on the technical model),
    "raw_fill" (W4), "derived" (W5, computed from the other workloads' rows), "external"
    (W3, W7 and later: measured by ``params["module"]``'s ``run(quick)``), "skipped" (W6 without CUDA).
    """

    name: str
    group: str
    title: str
    kind: str
    reps: int = 3
    configs: tuple[Config, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    reference: str | None = None


def _predictive_spec(baseline: str, size: dict, **extra: Any) -> dict[str, Any]:
    spec = {"kind": "predictive", "baseline": baseline, "num_samples": size["S"],
            "observe": size["observe"], "return_sites": size.get("return_sites"),
            "reduce_sites": size.get("reduce_sites"), "device": size.get("device", "cpu"), "seed": 0}
    spec.update(extra)
    return spec


def baseline_configs(size: dict, timeout_s: float, sweep: tuple[int, ...] = SWEEP_SIZES,
                     device: str = "cpu") -> tuple[Config, ...]:
    """Every baseline of the issue for one size: pyro-full, pyro-sequential, bayesdream-rule,
    conservative-50, sweep-B for each B in ``sweep`` below num_samples (plus B = S), and
    devicemem-auto."""
    cap = size.get("cap")
    data = DataSpec(size["N"], size["T"], size["C"])
    size = {**size, "device": device}
    runs = [(name, _predictive_spec(name, size))
            for name in ("pyro-full", "pyro-sequential", "bayesdream-rule", "conservative-50")]
    runs += [(f"sweep-B={b}", _predictive_spec("sweep", size, batch_size=b))
             for b in sorted({min(b, size["S"]) for b in sweep})]
    runs.append(("devicemem-auto", _predictive_spec("devicemem-auto", size)))
    return tuple(Config(name, spec, cap, timeout_s, data) for name, spec in runs)


def _w1(quick: bool) -> list[Workload]:
    """Params-only Predictive (bayesDREAM's case): vectorising is everything here."""
    sizes = [("W1a", dict(N=3000, T=4000, C=2, S=1000)),
             ("W1b", dict(N=2000, T=31467, C=2, S=1000))]
    out = []
    for name, size in sizes:
        size = {**size, "observe": False}
        notes: tuple[str, ...] = ()
        configs = baseline_configs(size, timeout_s=300)
        if quick and name == "W1a":
            configs = tuple(c for c in configs
                            if not c.name.startswith("sweep-") or c.name == "sweep-B=50")
            notes = ("quick: 1 repetition; sweep-B only at B=50.",)
        elif quick:
            size = {**size, "S": 200}
            configs = tuple(c for c in baseline_configs(size, timeout_s=300)
                            if c.name in ("pyro-full", "bayesdream-rule", "devicemem-auto"))
            notes = ("quick: S=200 instead of 1000, 1 repetition, three configurations.",)
        out.append(Workload(
            name=name, group="W1", kind="predictive", reps=1 if quick else 3,
            title=(f"technical params-only Predictive, N={size['N']}, T={size['T']}, "
                   f"C={size['C']}, S={size['S']}, no cap"),
            configs=configs, params=size, notes=notes, reference="devicemem-auto",
        ))
    return out


def _w2(quick: bool, issue_size: bool = False) -> list[Workload]:
    """Posterior predictive with the observation site under a real cap: sampling-bound.
    ``issue_size``: the issue's S (W2a 1000, W2b 200) instead of the budget's, one run."""
    common = dict(C=2, observe=True, return_sites=["y_obs"], reduce_sites=["y_obs"])
    if quick:
        sizes = [
            ("W2a", dict(N=1000, T=1000, S=40, cap=int(0.8 * GIB)),
             ("quick: N=T=1000, S=40 under a 0.8 GiB cap, the full run's regime in miniature "
              "(the cap holds a vectorised batch of about 25); 1 repetition.",)),
        ]
        sweep: tuple[int, ...] = (10, 25, 50)
    else:
        sizes = [
            ("W2a", dict(N=2000, T=2000, S=100, issue_S=1000, cap=4 * GIB),
             ("S=100 instead of 1000, 1 repetition: one sample of y_obs costs 0.5-1 s on this "
              "machine (the NB draw is single-threaded), so one configuration at S=1000 takes "
              "10-15 minutes. Per-sample time is nearly flat in the batch size, so the ratios "
              "carry over, except devicemem's fixed plan + probe time (W5), which weighs 10x "
              "more here than at S=1000: the acceptance table adds the ratio extrapolated to "
              "S=1000 from this run's rates. The cap and batch regime are the issue's.",)),
            ("W2b", dict(N=5000, T=8000, S=12, issue_S=200, cap=8 * GIB),
             ("S=12 instead of 200, 1 repetition: one sample costs about 5 s here.",)),
        ]
        sweep = (10, 25, 50, 100)
        if issue_size:
            sizes = [(name, {**size, "S": size["issue_S"]},
                      (f"S={size['issue_S']}, the issue's size, 1 repetition (--issue-size).",))
                     for name, size, _ in sizes]
    out = []
    for name, size, notes in sizes:
        size = {**common, **size}
        out.append(Workload(
            name=name, group="W2", kind="predictive", reps=1,
            title=(f"posterior predictive with y_obs, N={size['N']}, T={size['T']}, "
                   f"S={size['S']}, cap {size['cap'] / GIB:.1f} GiB"),
            configs=baseline_configs(size, timeout_s=3600 if issue_size else 900, sweep=sweep),
            params={**size, "cap_bytes": size["cap"]}, notes=notes + (
                "Every configuration streams each batch into per-entry mean/variance of y_obs "
                "(float64; devicemem through reduce=), so [S, N, T] is never held.",
                "Peak RSS includes torch's shared-library pages (about 80 MB) that the cgroup "
                "does not charge to the child, so a run that completed can show a peak just "
                "above the cap."),
            reference="devicemem-auto",
        ))
    return out


def _w4(w1: list[Workload]) -> Workload:
    """Raw fill of as many float32 normals as each W1 size's Predictive draws (latent sites)."""
    configs = []
    for workload in w1:
        p = workload.params
        n_elements = p["S"] * ((p["C"] + 1) * p["T"] + 1)
        configs.append(Config(f"raw-fill {workload.name}",
                              {"kind": "raw_fill", "n_elements": n_elements, "device": "cpu"}))
    return Workload(
        name="W4", group="W4", kind="raw_fill", reps=w1[0].reps,
        title="physical limit: float32 normal_() into a preallocated, touched buffer",
        configs=tuple(configs),
        params={"compares": [w.name for w in w1]},
        notes=("n = S x ((C+1) T + 1), the elements of the latent sites Predictive draws.",),
    )


def _w5(workloads: list[Workload]) -> Workload:
    """devicemem's own overhead (planning, probe, site discovery): its run time outside its
    batches, derived from the devicemem-auto rows of ``workloads`` in the same run."""
    return Workload(
        name="W5", group="W5", kind="derived", reps=workloads[0].reps,
        title=("planning overhead: devicemem-auto time outside its batches (plan, probe, "
               "site discovery) / its run time"),
        params={"compares": [w.name for w in workloads]},
        notes=("Derived from each devicemem-auto row above: run time minus the sum of its "
               "batches' wall times (Predictive.report).",),
    )


def _w6(quick: bool, cuda: bool) -> list[Workload]:
    """W1's and W2's work at the seed's full size (N=21761, T=31467, C=2) on the GPU vs CPU."""
    if not cuda:
        return [Workload(name="W6", group="W6", kind="skipped",
                         title="CUDA: W1 and W2 at the seed's full size, GPU vs CPU",
                         notes=("skipped: no CUDA device (torch.cuda.is_available() is False).",))]
    full = dict(N=21761, T=31467, C=2)
    reps = 1 if quick else 3
    params_only = {**full, "S": 200 if quick else 1000, "observe": False}
    w6a = tuple(
        replace(config, name=f"{config.name} [{device}]")
        for device in ("cuda", "cpu")
        for config in baseline_configs(params_only, timeout_s=600, sweep=(),
                                       device=device if device == "cpu" else "auto")
        if config.name in ("pyro-full", "devicemem-auto")
    )
    with_obs = {**full, "S": 20 if quick else 50, "observe": True, "return_sites": ["y_obs"],
                "reduce_sites": ["y_obs"]}
    w6b = tuple(
        replace(config, name=f"{config.name} [cuda]")
        for config in baseline_configs(with_obs, timeout_s=900, sweep=(4,), device="auto")
        if config.name in ("sweep-B=4", "devicemem-auto")
    )
    return [
        Workload(name="W6a", group="W6", kind="predictive", reps=reps, configs=w6a,
                 title=(f"CUDA: W1's params-only Predictive at the seed's size, N={full['N']}, "
                        f"T={full['T']}, S={params_only['S']}, GPU vs CPU"),
                 params=params_only, reference="devicemem-auto [cuda]",
                 notes=("[cuda] rows: pyro-full with data and guide moved to cuda:0; "
                        "devicemem-auto with device='auto'. [cpu] rows: device='cpu'.",)),
        Workload(name="W6b", group="W6", kind="predictive", reps=reps, configs=w6b,
                 title=(f"CUDA: W2's posterior predictive with y_obs at the seed's size, "
                        f"S={with_obs['S']}, on the GPU"),
                 params=with_obs, reference="devicemem-auto [cuda]",
                 notes=("No CPU rows: one sample of y_obs at this size takes over a minute on "
                        "one CPU core (NB sampling is single-threaded); W2a is the CPU picture.",
                        "sweep-B=4: fixed vectorised batches of 4 on cuda:0 (about 55 GB).")),
    ]


# Workloads measured by a module's own ``run(quick)``, after W7: (name, title, module).
EXTERNAL = (
    ("W9", "a model that needs Pyro's sequential mode: Pyro vs devicemem parallel=False (bench.w9_sequential)",
     "bench.w9_sequential"),
    ("W10", "bayesDREAM's three stages, unrouted vs bayesdream_routing (bench.w10_bayesdream)", "bench.w10_bayesdream"),
    ("W11", "block-parallel draws on the host's cores, 1 thread vs all (bench.w11_threads)", "bench.w11_threads"),
)


def build_workloads(quick: bool, cuda: bool, issue_size: bool = False) -> list[Workload]:
    """All workloads in run order (W1-W7, then the external ones in :data:`EXTERNAL`); ``issue_size``: W2 at the
    issue's S (hours of CPU time on 2 cores; ignored with ``quick``)."""
    w1, w2 = _w1(quick), _w2(quick, issue_size)
    w3 = Workload(name="W3", group="W3", kind="external",
                  title="estimator accuracy: predicted / measured peak (bench.w3_accuracy)",
                  params={"quick": quick, "module": "bench.w3_accuracy"})
    w7 = Workload(name="W7", group="W7", kind="external",
                  title="Ray: one posterior predictive sharded over workers (bench.w7_ray)",
                  params={"quick": quick, "module": "bench.w7_ray"})
    external = [
        Workload(name=name, group=name, kind="external", title=title, params={"quick": quick, "module": module})
        for name, title, module in EXTERNAL
    ]
    return [*w1, *w2, w3, _w4(w1), _w5(w1 + w2), *_w6(quick, cuda), w7, *external]
