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
    "raw_fill" (W4), "plan" (W5), "external" (W3, W7: measured by ``params["module"]``'s
    ``run(quick)``), "skipped" (W6 without CUDA)."""

    name: str
    group: str
    title: str
    kind: str
    reps: int = 3
    data: DataSpec | None = None
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
    size = {**size, "device": device}
    configs = [
        Config(name, _predictive_spec(name, size), cap, timeout_s)
        for name in ("pyro-full", "pyro-sequential", "bayesdream-rule", "conservative-50")
    ]
    sizes = sorted({min(b, size["S"]) for b in sweep})
    configs += [Config(f"sweep-B={b}", _predictive_spec("sweep", size, batch_size=b), cap, timeout_s)
                for b in sizes]
    configs.append(Config("devicemem-auto", _predictive_spec("devicemem-auto", size), cap, timeout_s))
    return tuple(configs)


def _w1(quick: bool) -> list[Workload]:
    sizes = [("W1a", dict(N=3000, T=4000, C=2, S=1000)),
             ("W1b", dict(N=2000, T=31467, C=2, S=1000))]
    out = []
    for name, size in sizes:
        notes: tuple[str, ...] = ()
        if quick and name == "W1b":
            size = {**size, "S": 200}
            notes = ("quick: S=200 instead of 1000 (sequential baselines trace every sample).",)
        size = {**size, "observe": False}
        out.append(Workload(
            name=name, group="W1", kind="predictive", reps=1 if quick else 3,
            title=(f"technical params-only Predictive, N={size['N']}, T={size['T']}, "
                   f"C={size['C']}, S={size['S']}, no cap"),
            data=DataSpec(size["N"], size["T"], size["C"]),
            configs=baseline_configs(size, timeout_s=300),
            params=size, notes=notes,
            reference="devicemem-auto",
        ))
    return out


def _w2(quick: bool) -> list[Workload]:
    common = dict(C=2, observe=True, return_sites=["y_obs"], reduce_sites=["y_obs"])
    if quick:
        sizes = [
            ("W2a", dict(N=1000, T=1000, S=40, cap=int(0.8 * GIB)),
             ("quick: N=T=1000, S=40 under a 0.8 GiB cap, the same regime in miniature "
              "(the cap fits a batch of about 20); the full run uses N=T=2000 under 4 GiB.",)),
        ]
        sweep: tuple[int, ...] = (10, 25, 50)
    else:
        sizes = [
            ("W2a", dict(N=2000, T=2000, S=100, cap=4 * GIB),
             ("S=100 instead of 1000: sampling the observation site costs about 0.5 s per "
              "sample here, so every batch size is measured on the same 100 samples; the "
              "memory regime (cap vs batch) is the issue's.",)),
            ("W2b", dict(N=5000, T=8000, S=20, cap=8 * GIB),
             ("S=20 instead of 200 (about 6 s per sample here); 1 repetition.",)),
        ]
        sweep = (10, 25, 50, 100)
    out = []
    for name, size, notes in sizes:
        size = {**common, **size}
        reps = 1 if quick or name == "W2b" else 3
        out.append(Workload(
            name=name, group="W2", kind="predictive", reps=reps,
            title=(f"posterior predictive with y_obs, N={size['N']}, T={size['T']}, "
                   f"S={size['S']}, cap {size['cap'] / GIB:.1f} GiB"),
            data=DataSpec(size["N"], size["T"], size["C"]),
            configs=baseline_configs(size, timeout_s=900, sweep=sweep),
            params={**size, "cap_bytes": size["cap"]}, notes=notes + (
                "Each batch is streamed into per-entry mean/variance of y_obs (float64), the "
                "same consumer for every configuration.",),
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
    """devicemem's plan (probe included) alone, cold, for the same work as a devicemem-auto run."""
    configs = []
    for workload in workloads:
        auto = next(c for c in workload.configs if c.name == "devicemem-auto")
        spec = {**auto.spec, "kind": "plan", "device": "auto"}
        configs.append(Config(f"plan {workload.name}", spec, auto.cap_bytes, auto.timeout_s))
    return Workload(
        name="W5", group="W5", kind="plan", reps=workloads[0].reps,
        title="planning overhead: devicemem plan + probe time / devicemem-auto run time",
        configs=tuple(configs),
        params={"compares": [w.name for w in workloads]},
    )


def _w6(quick: bool, cuda: bool) -> Workload:
    title = "CUDA: W1 and W2 at the seed's full size, GPU vs CPU"
    if not cuda:
        return Workload(name="W6", group="W6", kind="skipped", title=title,
                        notes=("skipped: no CUDA device (torch.cuda.is_available() is False).",))
    size = dict(N=21761, T=31467, C=2, S=1000 if not quick else 200, observe=False)
    configs = tuple(
        replace(config, name=f"{config.name} [{device}]")
        for device in ("cuda", "cpu")
        for config in baseline_configs(size, timeout_s=600, sweep=(), device=device)
        if config.name in ("pyro-full", "devicemem-auto")
    )
    return Workload(
        name="W6", group="W6", kind="predictive", reps=1 if quick else 3, title=title,
        data=DataSpec(size["N"], size["T"], size["C"]), configs=configs, params=size,
        notes=("params-only (W1's work) at N=21761, T=31467; devicemem-auto [cuda] means "
               "device='cuda'.",),
        reference="devicemem-auto [cuda]",
    )


def build_workloads(quick: bool, cuda: bool) -> list[Workload]:
    """All workloads in run order (W1, W2, W3, W4, W5, W6, W7)."""
    w1, w2 = _w1(quick), _w2(quick)
    w3 = Workload(name="W3", group="W3", kind="external",
                  title="estimator accuracy: predicted / measured peak (bench.w3_accuracy)",
                  params={"quick": quick, "module": "bench.w3_accuracy"})
    w7 = Workload(name="W7", group="W7", kind="external",
                  title="Ray: one posterior predictive sharded over workers (bench.w7_ray)",
                  params={"quick": quick, "module": "bench.w7_ray"})
    return [*w1, *w2, w3, _w4(w1), _w5([w1[0], w2[0]]), _w6(quick, cuda), w7]
