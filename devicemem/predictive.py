"""The public ``Predictive``: checks its arguments, then runs on one device or in Ray shards.

``Predictive`` is a drop-in for ``pyro.infer.Predictive(..., parallel=True)``: same keys,
shapes and dtypes, on the CPU. Each call becomes a :class:`devicemem.local.Request`, executed
by :mod:`devicemem.local` (batches on this process's devices) or :mod:`devicemem.distributed`
(shards on Ray).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from devicemem import distributed, local
from devicemem.checks import check_int, check_path, check_site_names
from devicemem.planner import Plan
from devicemem.results import STATISTICS, BatchRecord
from devicemem.sampling import PYRO_LOCK


def _check_reduce(reduce: Mapping[str, Any] | None) -> dict[str, tuple[str, ...]]:
    if reduce is None:
        return {}
    form = 'a dict like {"y_obs": ("mean", "var")}'
    if not isinstance(reduce, Mapping):
        raise ValueError(f"reduce: expected {form}; got {type(reduce).__name__}")
    checked = {}
    for site, statistics in reduce.items():
        statistics = (statistics,) if isinstance(statistics, str) else tuple(statistics)
        unknown = [s for s in statistics if s not in STATISTICS]
        if not statistics or unknown:
            raise ValueError(
                f"reduce[{site!r}]: unknown statistic(s) {unknown or statistics}; accepted: {', '.join(STATISTICS)}"
            )
        checked[site] = statistics
    return checked


def _check_posterior(posterior_samples: Mapping[str, Tensor], num_samples: int | None) -> int:
    leading = {}
    for name, value in posterior_samples.items():
        if not torch.is_tensor(value) or value.dim() == 0:
            raise ValueError(f"posterior_samples[{name!r}]: expected a tensor [num_samples, ...]; got {value!r:.60}")
        leading[name] = value.shape[0]
    sizes = set(leading.values())
    if len(sizes) > 1:
        raise ValueError(f"posterior_samples: leading dims differ: {leading}; every site needs the same num_samples")
    if not sizes:
        raise ValueError("posterior_samples: empty; pass a guide or num_samples instead")
    (size,) = sizes
    if num_samples is not None and num_samples != size:
        raise ValueError(f"num_samples={num_samples} but posterior_samples hold {size} samples; pass one or the other")
    return size


def _check_out(out: str | Path | None) -> Path | None:
    path = check_path(out, "out")
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"out: cannot write numpy memmaps into {str(path)!r}: {exc}") from exc
    return path


class Predictive:
    """Device-aware, batched, OOM-proof ``pyro.infer.Predictive``.

    Calling it with the model's ``*args, **kwargs`` returns ``dict[str, Tensor]`` on the CPU
    with the keys, shapes and dtypes ``pyro.infer.Predictive(..., parallel=True)`` returns.
    ``return_sites=None`` means Pyro's default (every model site with a guide or without
    posterior samples; else the sites not in ``posterior_samples``).

    - ``device``, ``minibatch_size``, ``safety_factor``, ``max_memory`` go to
      :func:`devicemem.plan_predictive`; ``plan`` replaces that call (the same seed with the
      same plan gives the same draws).
    - ``seed``: each batch is seeded from (seed, index of its first sample) and the global RNG
      is left as it was; None draws from the global RNG like Pyro.
    - ``out``: a directory; results become numpy memmaps ``<site>.npy`` there (needed when
      they exceed host memory; without ``out`` that case fails before sampling), with a
      ``manifest.json`` rewritten after each batch (samples complete, seed, plan, sites;
      ``"complete": false`` until the last batch is on disk).
    - ``resume``: continue the interrupted run in ``out`` from its last complete batch, with its
      plan and the batch size it had reached: with the same seed, the result equals an
      uninterrupted run's. Single-device runs without ``reduce`` only.
    - ``reduce``: ``{"site": ("mean", "var")}`` returns ``"site:mean"`` and ``"site:var"``
      (float64, unbiased variance, streamed with Welford) instead of ``site``.
    - ``progress``: a tqdm bar over samples with device memory in use and peak vs budget.
    - ``validate``: keep Pyro's argument checks inside the draws. By default only the first,
      unbatched run of the model checks them (they cost ~20% of a likelihood draw).
    - ``allow_nonfinite``: return NaN or infinite draws. By default each batch's returned sites
      are checked (one float64 sum per site) and a NaN or infinity is a ValueError naming the
      site and the first bad sample, where Pyro, validating, would raise too.
    - ``device``: a name ("auto", "cpu", "cuda:1"...) or a ``torch.device``. ``"all"``, a list of
      several devices (``["cuda:0", "cuda:1"]``) or ``backend="ray"`` (or a
      :class:`devicemem.distributed.RayOptions`) split the samples into shards run on Ray, one
      device each (see :mod:`devicemem.distributed`); needs ``pip install 'devicemem[ray]'``.
      A list of one device runs here, as that device would.

    Threads: Pyro's handler stack and the RNG are global to the process, so calls from several
    threads are serialised by one process-wide lock (``devicemem.sampling.PYRO_LOCK``, also
    held by the planner's probe): each returns what it would alone, one after the other.

    After a call, ``.plan`` is the plan used and ``.report`` one :class:`BatchRecord` per batch
    (sharded: ``.plan`` is None and ``.report`` one ``ShardRecord`` per shard, with its plan).
    """

    def __init__(
        self,
        model: Callable[..., Any],
        guide: Callable[..., Any] | None = None,
        posterior_samples: Mapping[str, Tensor] | None = None,
        num_samples: int | None = None,
        return_sites: Sequence[str] | None = None,
        device: str | Sequence[str] = "auto",
        minibatch_size: int | None = None,
        safety_factor: float | None = None,
        max_memory: Any = None,
        seed: int | None = None,
        progress: bool = True,
        out: str | Path | None = None,
        reduce: Mapping[str, Sequence[str] | str] | None = None,
        plan: Plan | None = None,
        backend: Any = None,
        validate: bool = False,
        allow_nonfinite: bool = False,
        resume: bool = False,
    ) -> None:
        if guide is not None and posterior_samples is not None:
            raise ValueError("pass either guide or posterior_samples, not both")
        if posterior_samples is not None:
            num_samples = _check_posterior(posterior_samples, num_samples)
        num_samples = check_int(num_samples, "num_samples")
        sites = check_site_names(return_sites)
        seed = None if seed is None else check_int(seed, "seed", minimum=0)
        device = distributed.local_device(device, backend)
        if plan is not None:
            if device != "auto" or minibatch_size is not None or safety_factor is not None:
                raise ValueError("plan replaces the planner: pass either plan or device/minibatch_size/safety_factor")
            if plan.num_samples != num_samples:
                raise ValueError(f"plan is for {plan.num_samples} samples but num_samples is {num_samples}")
        self.sharding = distributed.check_backend(backend, device, plan)
        if resume and (out is None or reduce or plan is not None or self.sharding is not None):
            raise ValueError(
                "resume: continues a single-device run written to out=DIR, with its own plan; it cannot be "
                "combined with reduce=, plan= or sharding, and needs out="
            )
        self.request = local.Request(
            model, guide, dict(posterior_samples) if posterior_samples is not None else None, num_samples,
            return_sites=sites, device=device, minibatch_size=minibatch_size,
            safety_factor=safety_factor, max_memory=max_memory, seed=seed, progress=progress, out=_check_out(out),
            reduce=_check_reduce(reduce), plan=plan, validate=bool(validate), allow_nonfinite=bool(allow_nonfinite),
            resume=bool(resume),
        )
        self.model = model
        self.guide = guide
        self.num_samples = num_samples
        self.plan = plan
        self.report: list[Any] = []

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        with PYRO_LOCK:
            self.report = []
            if self.sharding is not None:
                self.plan = None
                return distributed.run(self.request, self.sharding, args, kwargs, self.report)
            report: list[BatchRecord] = self.report
            samples, self.plan = local.run(self.request, args, kwargs, report)
            return samples
