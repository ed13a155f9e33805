"""The ways a user would otherwise run Predictive, reimplemented from their published behaviour.

Every baseline draws ``num_samples`` samples of ``model`` (with ``guide``). The pyro baselines
hand each batch to a sink: ``Collect`` keeps and concatenates them (what bayesDREAM does with
its parameter samples), ``MeanVar`` streams them into per-entry mean and variance (a posterior
predictive summary, the only way [S, N, T] fits under a cap; devicemem does the same through
its ``reduce``). ``run_baseline`` returns the result and a small ``info`` dict (batch size,
vectorised or not, number of batches) for the results table.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from typing import Any, Callable, Sequence

import psutil
import pyro.infer
import torch
from torch import Tensor

BASELINES = (
    "pyro-full",
    "pyro-sequential",
    "bayesdream-rule",
    "conservative-50",
    "sweep",
    "devicemem-auto",
)


class Collect:
    """Keeps every batch on the CPU and concatenates them along the sample dimension."""

    def __init__(self) -> None:
        self._parts: dict[str, list[Tensor]] = defaultdict(list)

    def add(self, samples: dict[str, Tensor]) -> None:
        for name, value in samples.items():
            self._parts[name].append(value.detach().cpu())

    def result(self) -> dict[str, Tensor]:
        return {name: torch.cat(parts) for name, parts in self._parts.items()}


class MeanVar:
    """Streams batches of ``sites`` into float64 per-entry sums; never holds [S, ...].

    Samples are folded in one at a time so the float64 temporaries are one sample big. The
    result names match devicemem's ``reduce``: ``"site:mean"``, ``"site:var"`` (unbiased).
    """

    def __init__(self, sites: Sequence[str]) -> None:
        self.sites = tuple(sites)
        self.count = 0
        self._sum: dict[str, Tensor] = {}
        self._sumsq: dict[str, Tensor] = {}

    def add(self, samples: dict[str, Tensor]) -> None:
        for name in self.sites:
            values = samples[name].detach()
            if name not in self._sum:
                self._sum[name] = torch.zeros(values.shape[1:], dtype=torch.float64)
                self._sumsq[name] = torch.zeros(values.shape[1:], dtype=torch.float64)
            for row in values:
                row64 = row.to("cpu", torch.float64)
                self._sum[name].add_(row64)
                self._sumsq[name].addcmul_(row64, row64)
        self.count += samples[self.sites[0]].shape[0]

    def result(self) -> dict[str, Tensor]:
        out = {}
        for name in self.sites:
            mean = self._sum[name] / self.count
            out[f"{name}:mean"] = mean
            out[f"{name}:var"] = (self._sumsq[name] - self.count * mean**2) / max(self.count - 1, 1)
        return out


Sink = Collect | MeanVar


def batch_sizes(num_samples: int, batch_size: int) -> list[int]:
    """Sizes of consecutive batches covering exactly ``num_samples`` (the last may be smaller)."""
    full, rest = divmod(num_samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def bayesdream_batch_size(
    n_cells: int, n_features: int, n_groups: int, num_samples: int, available_bytes: int
) -> int:
    """bayesDREAM's rule: usable = 0.35 * available host RAM, per-sample bytes =
    (2CT + 3T) * 4 + 16NT, batch = clamp(usable // per-sample, 10, 100), at most num_samples."""
    usable = available_bytes * 0.35
    per_sample = (2 * n_groups * n_features + 3 * n_features) * 4 + 16 * n_cells * n_features
    max_fit = int(usable // per_sample)
    return min(max(10, min(100, max_fit)), num_samples)


def pyro_batches(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, num_samples: int,
    batch_size: int, parallel: bool, return_sites: Sequence[str] | None, sink: Sink,
) -> dict[str, Any]:
    """Plain ``pyro.infer.Predictive`` over consecutive batches, one Predictive per batch size
    (reused), ``gc.collect()`` after each batch as bayesDREAM does."""
    predictives: dict[int, pyro.infer.Predictive] = {}
    sizes = batch_sizes(num_samples, batch_size)
    for size in sizes:
        if size not in predictives:
            predictives[size] = pyro.infer.Predictive(
                model, guide=guide, num_samples=size, parallel=parallel,
                return_sites=return_sites or (),
            )
        with torch.no_grad():
            sink.add(predictives[size](*args, **kwargs))
        gc.collect()
    return {"batch_size": batch_size, "n_batches": len(sizes), "vectorized": parallel,
            "samples_drawn": sum(sizes)}


def run_baseline(
    name: str, model: Callable, guide: Callable, args: tuple, kwargs: dict, num_samples: int,
    return_sites: Sequence[str] | None, *, reduce_sites: Sequence[str] | None = None,
    batch_size: int | None = None, shape: tuple[int, int, int], device: str = "cpu",
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Run baseline ``name`` (one of ``BASELINES``) and return (result, info).

    The result holds every returned site [num_samples, ...] on the CPU, or with
    ``reduce_sites`` their streamed ``"site:mean"`` / ``"site:var"``. ``shape`` is (N, T, C)
    for bayesdream-rule, ``batch_size`` the fixed B of ``sweep``. Pyro baselines expect args
    and guide on ``device``; devicemem-auto places them itself.
    """
    if name == "devicemem-auto":
        return _devicemem_auto(model, guide, args, kwargs, num_samples, return_sites,
                               reduce_sites, device)
    sink: Sink = MeanVar(reduce_sites) if reduce_sites else Collect()

    def run(size: int, parallel: bool) -> dict[str, Any]:
        return pyro_batches(
            model, guide, args, kwargs, num_samples, size, parallel, return_sites, sink)

    if name == "pyro-full":
        info = run(num_samples, True)
    elif name == "pyro-sequential":
        info = run(num_samples, False)
    elif name == "bayesdream-rule":
        available = psutil.virtual_memory().available
        size = bayesdream_batch_size(*shape, num_samples, available)
        info = {**run(size, False), "available_bytes": available}
    elif name == "conservative-50":
        info = run(min(50, num_samples), False)
    elif name == "sweep":
        if batch_size is None:
            raise ValueError("baseline sweep: batch_size is required")
        info = run(min(batch_size, num_samples), True)
    else:
        raise ValueError(f"baseline: unknown {name!r}; expected one of {', '.join(BASELINES)}")
    return sink.result(), info


def _devicemem_auto(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, num_samples: int,
    return_sites: Sequence[str] | None, reduce_sites: Sequence[str] | None, device: str,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """devicemem.Predictive with no hand tuning; ``reduce_sites`` become its ``reduce``."""
    import devicemem

    predictive = devicemem.Predictive(
        model, guide=guide, num_samples=num_samples, return_sites=return_sites, device=device,
        progress=False, reduce={site: ("mean", "var") for site in reduce_sites or ()} or None,
    )
    result = predictive(*args, **kwargs)
    plan = predictive.plan
    return result, {
        "batch_size": plan.batch_size, "n_batches": len(predictive.report),
        "vectorized": plan.vectorized, "device": plan.device,
        "samples_drawn": sum(row.size for row in predictive.report),
        "batches_s": sum(row.wall_s for row in predictive.report),
        "max_batch_peak_bytes": max((row.peak_bytes or 0 for row in predictive.report), default=0),
        "retries": sum(row.retries for row in predictive.report),
        "predicted_peak_bytes": plan.predicted_peak_bytes, "budget_bytes": plan.budget_bytes,
        "reasons": list(plan.reasons),
    }
