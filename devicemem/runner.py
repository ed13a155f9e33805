"""The runner: executes a Plan as batched, vectorised Predictive draws that survive OOM.

``Predictive`` is a drop-in for ``pyro.infer.Predictive(..., parallel=True)``: same keys,
shapes and dtypes, on the CPU. It asks the planner for a device and batch size, moves the
guide's parameters and the tensor arguments there (restoring them afterwards), samples batch
by batch into preallocated host tensors (or numpy memmaps, or streaming mean/var reducers),
each batch one :meth:`devicemem.sampling.Sampler.draw` (Pyro's vectorised Predictive without
its per-call shape-guessing runs), and when a batch runs out of memory, halves the batch
size, and as the last resort moves to the CPU. Draws are reproducible per (seed, plan): each batch is seeded from the seed and the
index of its first sample, so a different plan gives different, equally valid draws.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import quote

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from devicemem.backends import Backend, device_memory, get_backend
from devicemem.placement import parameters_on, to_device
from devicemem import planner
from devicemem.planner import Plan
from devicemem.sampling import Sampler, Site, select_sites
from devicemem.units import format_bytes

logger = logging.getLogger("devicemem.runner")

HOST = "cpu"
STATISTICS = ("mean", "var")
_WELFORD_BYTES = 3 * 8  # float64 mean, sum of squares and one temporary per element


@dataclass(frozen=True)
class BatchRecord:
    """One finished batch: samples ``start:start + size`` on ``device``.

    ``peak_bytes`` is the device's high-water mark during the batch as its backend measures it
    (host: the process's peak RSS; CUDA: peak reserved) and ``base_bytes`` what the process
    held there when the batch started, so ``working_bytes`` is what the batch itself needed,
    the figure the plan's predicted peak and budget speak of. ``retries`` counts the
    out-of-memory attempts at this start before the one that worked.
    """

    start: int
    size: int
    device: str
    wall_s: float
    peak_bytes: int | None
    retries: int
    base_bytes: int | None = None

    @property
    def working_bytes(self) -> int | None:
        """Peak above what was held when the batch started (None when either is unknown)."""
        if self.peak_bytes is None or self.base_bytes is None:
            return None
        return max(self.peak_bytes - self.base_bytes, 0)


def batch_seed(seed: int, start: int) -> int:
    """The torch seed of the batch whose first sample has index ``start``."""
    return int(np.random.SeedSequence([seed, start]).generate_state(1, np.uint64)[0])


@contextmanager
def _seeded(seed: int | None, start: int, device: torch.device) -> Iterator[None]:
    """Seed the host RNG and ``device``'s RNG for one batch; restore both afterwards."""
    if seed is None:
        yield
        return
    value = batch_seed(seed, start)
    accelerator = [device.index or 0] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=accelerator, device_type=device.type if accelerator else "cuda"):
        torch.default_generator.manual_seed(value)
        if device.type == "cuda":
            with torch.cuda.device(accelerator[0]):
                torch.cuda.manual_seed(value)
        elif accelerator:
            getattr(torch, device.type).manual_seed(value)
        yield


class _Welford:
    """Streaming mean and unbiased variance over samples, float64 accumulators on the host."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.count = 0
        self.mean = torch.zeros(shape, dtype=torch.float64)
        self.m2 = torch.zeros(shape, dtype=torch.float64)

    def update(self, batch: Tensor) -> None:
        for sample in batch:
            self.count += 1
            delta = sample.to(device=HOST, dtype=torch.float64, copy=True)
            delta -= self.mean
            self.mean.add_(delta, alpha=1.0 / self.count)
            self.m2.addcmul_(delta, delta, value=(self.count - 1) / self.count)

    def result(self, statistic: str) -> Tensor:
        if statistic == "mean":
            return self.mean
        return self.m2 / (self.count - 1) if self.count > 1 else torch.full_like(self.m2, float("nan"))


class _Sink:
    """Where batches go: preallocated host tensors (pinned, or numpy memmaps) and reducers."""

    def __init__(
        self,
        sites: dict[str, Site],
        reduce: Mapping[str, tuple[str, ...]],
        num_samples: int,
        out: Path | None,
        pin: bool,
    ) -> None:
        self.sites = sites
        self.reduce = reduce
        self.memmaps: list[np.memmap] = []
        self.tensors: dict[str, Tensor] = {}
        for name, site in sites.items():
            if name in reduce:
                continue
            shape = (num_samples,) + site.shape
            if out is None:  # zeroed: the pages are the run's from the start, not a batch's working memory
                self.tensors[name] = torch.zeros(shape, dtype=site.dtype, pin_memory=pin)
            else:
                self.tensors[name] = self._memmap(out, name, shape, site.dtype)
        self.reducers = {name: _Welford(sites[name].shape) for name in reduce}

    def _memmap(self, out: Path, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        try:
            np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        except TypeError as exc:
            raise ValueError(f"out: site {name!r} has dtype {dtype}, which numpy memmaps cannot hold") from exc
        array = np.lib.format.open_memmap(out / f"{quote(name, safe='')}.npy", mode="w+", dtype=np_dtype, shape=shape)
        self.memmaps.append(array)
        return torch.from_numpy(array)

    def slices(self, start: int, count: int) -> dict[str, Tensor]:
        """The stored sites' rows ``start:start + count``, to be drawn into directly."""
        return {name: tensor[start : start + count] for name, tensor in self.tensors.items()}

    def write(self, start: int, samples: Mapping[str, Tensor], non_blocking: bool) -> None:
        missing = set(self.sites) - set(samples)
        if missing:
            raise RuntimeError(f"the model did not produce sites {sorted(missing)}")
        for name, site in self.sites.items():
            value = samples[name]
            if tuple(value.shape[1:]) != site.shape or value.dtype != site.dtype:
                raise RuntimeError(
                    f"site {name!r}: a batch gave {tuple(value.shape)} {value.dtype}, expected "
                    f"[batch, {', '.join(map(str, site.shape))}] {site.dtype}"
                )
            if name in self.reducers:
                self.reducers[name].update(value)
            else:
                rows = self.tensors[name][start : start + value.shape[0]]
                if not _same_memory(rows, value):  # drawn straight into the rows
                    rows.copy_(value, non_blocking=non_blocking)
        for array in self.memmaps:
            array.flush()

    def result(self) -> dict[str, Tensor]:
        result = dict(self.tensors)
        for name, statistics in self.reduce.items():
            for statistic in statistics:
                result[f"{name}:{statistic}"] = self.reducers[name].result(statistic)
        return result


def _same_memory(a: Tensor, b: Tensor) -> bool:
    return a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


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
    if out is None:
        return None
    path = Path(out)
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
      they exceed host memory; without ``out`` that case fails before sampling).
    - ``reduce``: ``{"site": ("mean", "var")}`` returns ``"site:mean"`` and ``"site:var"``
      (float64, unbiased variance, streamed with Welford) instead of ``site``.
    - ``progress``: a tqdm bar over samples with device memory in use and peak vs budget.
    - ``validate``: keep Pyro's argument checks inside the draws. By default only the first,
      unbatched run of the model checks them (they cost ~20% of a likelihood draw).
    - ``device="all"``, a list of devices (``["cuda:0", "cuda:1"]``) or ``backend="ray"`` (or a
      :class:`devicemem.distributed.RayOptions`) split the samples into shards run on Ray, one
      device each (see :mod:`devicemem.distributed`); needs ``pip install 'devicemem[ray]'``.

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
    ) -> None:
        if guide is not None and posterior_samples is not None:
            raise ValueError("pass either guide or posterior_samples, not both")
        if posterior_samples is not None:
            num_samples = _check_posterior(posterior_samples, num_samples)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: expected a positive integer; got {num_samples!r}")
        if return_sites is not None and (
            isinstance(return_sites, str) or not all(isinstance(s, str) for s in return_sites)
        ):
            raise ValueError(f"return_sites: expected a list, tuple or set of site names; got {return_sites!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed: expected None or a non-negative integer; got {seed!r}")
        if plan is not None:
            if device != "auto" or minibatch_size is not None or safety_factor is not None:
                raise ValueError("plan replaces the planner: pass either plan or device/minibatch_size/safety_factor")
            if plan.num_samples != num_samples:
                raise ValueError(f"plan is for {plan.num_samples} samples but num_samples is {num_samples}")
        from devicemem.distributed import check_backend  # imported here: it builds on this module

        self.sharding = check_backend(backend, device, plan)
        self.model = model
        self.guide = guide
        self.posterior_samples = dict(posterior_samples) if posterior_samples is not None else None
        self.num_samples = num_samples
        self.return_sites = tuple(return_sites) if return_sites else ()
        self.device = device
        self.minibatch_size = minibatch_size
        self.safety_factor = safety_factor
        self.max_memory = max_memory
        self.seed = seed
        self.progress = progress
        self.out = _check_out(out)
        self.reduce = _check_reduce(reduce)
        self.plan = plan
        self.validate = bool(validate)
        self.report: list[BatchRecord] = []
        self._given_plan = plan

    def _returned_sites(self, args: tuple, kwargs: dict) -> tuple[Sampler, dict[str, Site]]:
        """(this call's sampler, the sites it returns, as Pyro would choose them); ValueError
        for unknown ``return_sites`` or ``reduce`` sites. Runs the model once, unbatched."""
        sampler = Sampler(self.model, self.guide, args, kwargs, validate=self.validate)
        sites = sampler.sites
        latent = [name for name in sites if name != "_RETURN"]
        unknown = [s for s in self.return_sites if s not in sites]
        if unknown:
            raise ValueError(
                f"return_sites: the model has no site(s) {unknown}; it has {latent}"
                + ("" if "_RETURN" in sites else " (its return value is not a tensor)")
            )
        chosen = select_sites(sites, self.return_sites, self.guide is not None, self.posterior_samples)
        unknown = [s for s in self.reduce if s not in chosen]
        if unknown:
            raise ValueError(f"reduce: site(s) {unknown} are not among the returned sites {list(chosen)}")
        clashes = [f"{s}:{stat}" for s, stats in self.reduce.items() for stat in stats if f"{s}:{stat}" in sites]
        if clashes:
            raise ValueError(f"reduce: result name(s) {clashes} clash with model sites of the same name")
        return sampler, chosen

    def _plan(
        self, device: str, num_samples: int, args: tuple, kwargs: dict, output_bytes: int, sampler: Sampler
    ) -> Plan:
        return planner.plan_predictive(
            self.model, self.guide, num_samples, *args, device=device, minibatch_size=self.minibatch_size,
            safety_factor=self.safety_factor, max_memory=self.max_memory,
            return_sites=list(self.return_sites) or None, posterior_samples=self.posterior_samples,
            output_bytes=output_bytes, sampler=sampler, **kwargs,
        )

    def _host_result_bytes(self, sites: dict[str, Site]) -> int:
        """Host RAM the results take: reducers, plus the stored sites unless they go to ``out``."""
        need = sum(s.numel * _WELFORD_BYTES for n, s in sites.items() if n in self.reduce)
        if self.out is None:
            need += sum(s.nbytes * self.num_samples for n, s in sites.items() if n not in self.reduce)
        return need

    def _check_host(self, sites: dict[str, Site], working: int = 0) -> None:
        """Fail before sampling when the results (and ``working`` bytes of batches on the host)
        cannot fit."""
        stored = {n: s.nbytes * self.num_samples for n, s in sites.items() if n not in self.reduce}
        need = self._host_result_bytes(sites)
        usable = device_memory(HOST, max_memory=self.max_memory).usable_bytes
        if usable is None or need + working <= usable:
            return
        parts = [f"{n} {format_bytes(b)}" for n, b in stored.items()] if self.out is None else []
        parts += [f"{n} reducer {format_bytes(sites[n].numel * _WELFORD_BYTES)}" for n in self.reduce]
        batches = f" plus {format_bytes(working)} for the batches" if working else ""
        raise ValueError(
            f"[MEMORY] the results need {format_bytes(need)} of host memory ({', '.join(parts)}){batches}, "
            f"but only {format_bytes(usable)} is usable; "
            + ("pass out=DIR to write them to numpy memmaps, reduce={site: ('mean', 'var')}, fewer "
               "return_sites or fewer samples" if self.out is None else "reduce the batch size or the reducers")
        )

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        if self.sharding is not None:
            from devicemem.distributed import run

            return run(self, self.sharding, args, kwargs)
        sampler, sites = self._returned_sites(args, kwargs)
        result_bytes = self._host_result_bytes(sites)
        plan = self._given_plan or self._plan(self.device, self.num_samples, args, kwargs, result_bytes, sampler)
        self.plan = plan
        if self._given_plan is not None:
            logger.info(
                "[MEMORY] Using the given plan: %d %s batch(es) of %d on %s",
                plan.n_batches, "vectorised" if plan.vectorized else "sequential", plan.batch_size, plan.device,
            )
        self._check_host(sites, (plan.predicted_peak_bytes or 0) if get_backend(plan.device).kind == HOST else 0)
        pin = self.out is None and get_backend(plan.device).torch_device(plan.device).type == "cuda"
        sink = _Sink(sites, self.reduce, self.num_samples, self.out, pin)
        self.report = []
        _Run(self, plan, sink, sampler, args, kwargs, result_bytes).execute()
        working = [row.working_bytes for row in self.report if row.working_bytes is not None]
        logger.info(
            "[MEMORY] Drew %d samples in %d batch(es) on %s; largest batch needed %s (predicted %s)",
            self.num_samples, len(self.report), ", ".join(dict.fromkeys(row.device for row in self.report)),
            format_bytes(max(working) if working else None), format_bytes(plan.predicted_peak_bytes),
        )
        return sink.result()


class _Run:
    """The state of one call: where the next batch starts, its size, its device."""

    def __init__(
        self, owner: Predictive, plan: Plan, sink: _Sink, sampler: Sampler, args: tuple, kwargs: dict,
        result_bytes: int,
    ) -> None:
        self.owner = owner
        self.sampler = sampler
        self.result_bytes = result_bytes
        self.sink = sink
        self.args = args
        self.kwargs = kwargs
        self.device = plan.device
        self.batch_size = plan.batch_size
        self.budget = plan.budget_bytes
        self.vectorized = plan.vectorized
        self.start = 0
        self.retries = 0

    def execute(self) -> None:
        total = self.owner.num_samples
        with tqdm(total=total, unit="sample", disable=not self.owner.progress, desc="Predictive") as bar:
            while self.start < total:
                backend = get_backend(self.device)
                moved = False
                try:
                    with parameters_on(backend.torch_device(self.device), self.owner.guide):
                        self._batches(backend, bar)
                except Exception as exc:
                    if backend.kind == HOST or not backend.is_oom(exc):
                        raise
                    moved = True
                if moved:
                    self._move_to_host(backend)

    def _move_to_host(self, backend: Backend) -> None:
        """The device cannot hold one sample (or the data): continue on the host."""
        gc.collect()
        backend.empty_cache(self.device)
        self.retries += 1
        remaining = self.owner.num_samples - self.start
        plan = self.owner._plan(HOST, remaining, self.args, self.kwargs, self.result_bytes, self.sampler)
        logger.warning(
            "[MEMORY] %s cannot hold one sample; moving the remaining %d samples (from %d) to %s "
            "in batches of %d", self.device, remaining, self.start, HOST, plan.batch_size,
        )
        self.device, self.batch_size, self.budget = HOST, plan.batch_size, plan.budget_bytes
        self.vectorized = plan.vectorized

    def _batches(self, backend: Backend, bar: tqdm) -> None:
        owner = self.owner
        where = backend.torch_device(self.device)
        args, kwargs = to_device((self.args, self.kwargs), where)
        bar.set_description(f"Predictive [{self.device}]")
        while self.start < owner.num_samples:
            size = min(self.batch_size, owner.num_samples - self.start)
            base = backend.current_bytes(self.device)
            backend.reset_peak(self.device)
            began = time.perf_counter()
            failed = False
            try:
                with _seeded(owner.seed, self.start, where):
                    self._draw(size, where, args, kwargs)
            except Exception as exc:
                if size == 1 or not backend.is_oom(exc):
                    raise
                failed = True
            if failed:
                self._retry_smaller(backend, size)
                continue
            if where.type == "cuda":
                torch.cuda.synchronize(where)
            record = BatchRecord(
                self.start, size, self.device, time.perf_counter() - began,
                backend.peak_bytes(self.device), self.retries, base,
            )
            owner.report.append(record)
            self.start += size
            self.retries = 0
            bar.update(size)
            bar.set_postfix(
                mem=format_bytes(backend.current_bytes(self.device)),
                peak=f"{format_bytes(record.working_bytes)}/{format_bytes(self.budget)}",
            )

    def _draw(self, size: int, where: torch.device, args: tuple, kwargs: dict) -> None:
        """Samples ``start:start + size`` into the sink: one vectorised draw, or (sequential
        plans) one sample at a time, each written before the next is drawn. On the host the
        guide's closed-form draws go straight into the sink's tensors."""
        posterior = self.owner.posterior_samples
        chunks = [(self.start, size)] if self.vectorized else [(i, 1) for i in range(self.start, self.start + size)]
        for first, count in chunks:
            batch = None
            if posterior is not None:
                batch = to_device({n: v[first : first + count] for n, v in posterior.items()}, where)
            out = self.sink.slices(first, count) if where.type == HOST else None
            samples = self.sampler.draw(count, args, kwargs, self.sink.sites, batch, out)
            self.sink.write(first, samples, non_blocking=where.type == "cuda")
            del samples, batch

    def _retry_smaller(self, backend: Backend, size: int) -> None:
        """After an OOM (outside the ``except`` block, so its frames are gone): free, halve."""
        gc.collect()
        backend.empty_cache(self.device)
        self.retries += 1
        self.batch_size = size // 2
        logger.warning(
            "[MEMORY] out of memory on %s with a batch of %d samples (from sample %d); retrying with %d",
            self.device, size, self.start, self.batch_size,
        )
