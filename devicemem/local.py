"""The local executor: runs one validated Predictive request on this process's devices.

It asks the planner for a device and batch size, moves the guide's parameters and the tensor
arguments there (restoring them afterwards), samples batch by batch into a
:class:`~devicemem.results.Sink`, each batch one :meth:`devicemem.sampling.Sampler.draw`, and
when a batch runs out of memory, halves the batch size, and as the last resort moves to the
CPU. Draws are reproducible: closed-form latents (AutoNormal, AutoDelta) depend only on
(seed, sample index), whatever the batches; the model's own draws (the likelihood) and other
guides' draws come from a stream seeded from (seed, the batch's first sample index), so they
are the same for the same plan, and a seeded plan does not depend on the probe's timings.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

from devicemem import planner
from devicemem.backends import Backend, get_backend
from devicemem.checks import check_finite
from devicemem.placement import parameters_on, to_device
from devicemem.planner import Plan
from devicemem.results import (
    HOST,
    BatchRecord,
    Manifest,
    Sink,
    batch_seed,
    check_host,
    describe_sites,
    host_result_bytes,
    remedies,
    sample_seeds,
)
from devicemem.sampling import Sampler, Site, select_sites
from devicemem.units import format_bytes

logger = logging.getLogger("devicemem.local")


@dataclass(frozen=True)
class Request:
    """One validated Predictive call's options (see :class:`devicemem.Predictive`)."""

    model: Callable[..., Any]
    guide: Callable[..., Any] | None
    posterior_samples: Mapping[str, Tensor] | None
    num_samples: int
    return_sites: tuple[str, ...] = ()
    device: Any = "auto"
    minibatch_size: int | None = None
    safety_factor: float | None = None
    max_memory: Any = None
    seed: int | None = None
    progress: bool = True
    out: Path | None = None
    reduce: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    plan: Plan | None = None
    validate: bool = False
    allow_nonfinite: bool = False
    first_sample: int = 0  # index of this request's first sample in the whole run (a Ray shard's start)
    resume: bool = False


def choose_sites(request: Request, args: tuple, kwargs: dict) -> tuple[Sampler, dict[str, Site]]:
    """(this call's sampler, the sites it returns, as Pyro would choose them); ValueError
    for unknown ``return_sites`` or ``reduce`` sites. Runs the model once, unbatched."""
    sampler = Sampler(request.model, request.guide, args, kwargs, validate=request.validate)
    sites = sampler.sites
    latent = [name for name in sites if name != "_RETURN"]
    unknown = [s for s in request.return_sites if s not in sites]
    if unknown:
        raise ValueError(
            f"return_sites: the model has no site(s) {unknown}; it has {latent}"
            + ("" if "_RETURN" in sites else " (its return value is not a tensor)")
        )
    chosen = select_sites(sites, request.return_sites, request.guide is not None, request.posterior_samples)
    unknown = [s for s in request.reduce if s not in chosen]
    if unknown:
        raise ValueError(f"reduce: site(s) {unknown} are not among the returned sites {list(chosen)}")
    clashes = [f"{s}:{stat}" for s, stats in request.reduce.items() for stat in stats if f"{s}:{stat}" in sites]
    if clashes:
        raise ValueError(f"reduce: result name(s) {clashes} clash with model sites of the same name")
    return sampler, chosen


def _plan(
    request: Request, device: str, num_samples: int, args: tuple, kwargs: dict, output_bytes: int, sampler: Sampler
) -> Plan:
    return planner.plan_predictive(
        request.model, request.guide, num_samples, *args, device=device, minibatch_size=request.minibatch_size,
        safety_factor=request.safety_factor, max_memory=request.max_memory,
        return_sites=list(request.return_sites) or None, posterior_samples=request.posterior_samples,
        output_bytes=output_bytes, sampler=sampler, reproducible=request.seed is not None, **kwargs,
    )


def run(request: Request, args: tuple, kwargs: dict, report: list[BatchRecord]) -> tuple[dict[str, Tensor], Plan]:
    """(the results by name, the plan run): ``request.num_samples`` samples drawn on one
    device (the planned one, then the host if it cannot hold one sample). One
    :class:`BatchRecord` per finished batch is appended to ``report`` as it finishes."""
    sampler, sites = choose_sites(request, args, kwargs)
    result_bytes = host_result_bytes(sites, request.reduce, request.num_samples, request.out)
    manifest = _resumed(request, sites) if request.resume else None
    if manifest is not None:
        plan = Plan(**manifest.fields["plan"])
    else:
        plan = request.plan or _plan(request, request.device, request.num_samples, args, kwargs, result_bytes, sampler)
    if request.plan is not None:
        logger.info(
            "[MEMORY] Using the given plan: %d %s batch(es) of %d on %s",
            plan.n_batches, "vectorised" if plan.vectorized else "sequential", plan.batch_size, plan.device,
        )
    on_host = get_backend(plan.device).kind == HOST
    if request.plan is not None or manifest is not None or not on_host:  # a host plan made here counted both
        check_host(sites, request.reduce, request.num_samples, request.out, request.max_memory,
                   (plan.predicted_peak_bytes or 0) if on_host else 0)
    pin = request.out is None and get_backend(plan.device).torch_device(plan.device).type == "cuda"
    sink = Sink(sites, request.reduce, request.num_samples, request.out, pin, resume=manifest is not None)
    if manifest is None and request.out is not None:
        manifest = Manifest.begin(request.out, request.num_samples, request.seed, dataclasses.asdict(plan),
                                  describe_sites(sites, request.reduce))
    _Run(request, plan, sink, sampler, args, kwargs, result_bytes, report, manifest).execute()
    working = [row.working_bytes for row in report if row.working_bytes is not None]
    logger.info(
        "[MEMORY] Drew %d samples in %d batch(es) on %s; largest batch needed %s (predicted %s)",
        request.num_samples, len(report), ", ".join(dict.fromkeys(row.device for row in report)),
        format_bytes(max(working) if working else None), format_bytes(plan.predicted_peak_bytes),
    )
    return sink.result(), plan


def _resumed(request: Request, sites: dict[str, Site]) -> Manifest:
    """The manifest of the run in ``request.out`` that this call continues; ValueError when it
    is another run's (samples, seed or sites differ)."""
    assert request.out is not None  # Predictive checks that resume comes with out
    manifest = Manifest.load(request.out)
    mine = {"num_samples": request.num_samples, "seed": request.seed, "sites": describe_sites(sites, request.reduce)}
    for key, value in mine.items():
        if manifest.fields.get(key) != value:
            raise ValueError(
                f"resume: {manifest.path} records a run with {key}={manifest.fields.get(key)!r:.200}; this call has "
                f"{value!r:.200}"
            )
    done, step = manifest.fields["complete_samples"], manifest.fields["next_batch"]
    logger.info(
        "[MEMORY] Resuming the run in %s: samples 0-%d are on disk; continuing from %d in batches of %d on %s",
        request.out, done - 1, done, step["batch_size"], step["device"],
    )
    return manifest


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


class _Run:
    """The state of one call: where the next batch starts, its size, its device."""

    def __init__(
        self, request: Request, plan: Plan, sink: Sink, sampler: Sampler, args: tuple, kwargs: dict,
        result_bytes: int, report: list[BatchRecord], manifest: Manifest | None = None,
    ) -> None:
        self.request = request
        self.manifest = manifest
        self.sampler = sampler
        self.result_bytes = result_bytes
        self.sink = sink
        self.args = args
        self.kwargs = kwargs
        self.report = report
        self.device = plan.device
        self.batch_size = plan.batch_size
        self.budget = plan.budget_bytes
        self.vectorized = plan.vectorized
        self.start = 0
        self.retries = 0
        if manifest is not None:  # where the run (perhaps an interrupted one) stands
            step = manifest.fields["next_batch"]
            self.start = manifest.fields["complete_samples"]
            self.device, self.batch_size, self.vectorized = step["device"], step["batch_size"], step["vectorized"]

    def execute(self) -> None:
        total = self.request.num_samples
        with tqdm(total=total, initial=self.start, unit="sample", disable=not self.request.progress,
                  desc="Predictive") as bar:
            while self.start < total:
                backend = get_backend(self.device)
                moved = False
                try:
                    with parameters_on(backend.torch_device(self.device), self.request.guide):
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
        remaining = self.request.num_samples - self.start
        plan = _plan(self.request, HOST, remaining, self.args, self.kwargs, self.result_bytes, self.sampler)
        logger.warning(
            "[MEMORY] %s cannot hold one sample; moving the remaining %d samples (from %d) to %s "
            "in batches of %d", self.device, remaining, self.start, HOST, plan.batch_size,
        )
        self.device, self.batch_size, self.budget = HOST, plan.batch_size, plan.budget_bytes
        self.vectorized = plan.vectorized

    def _batches(self, backend: Backend, bar: tqdm) -> None:
        request = self.request
        where = backend.torch_device(self.device)
        args, kwargs = to_device((self.args, self.kwargs), where)
        bar.set_description(f"Predictive [{self.device}]")
        while self.start < request.num_samples:
            size = min(self.batch_size, request.num_samples - self.start)
            base = backend.current_bytes(self.device)
            backend.reset_peak(self.device)
            began = time.perf_counter()
            failed = False
            try:
                with _seeded(request.seed, request.first_sample + self.start, where):
                    self._draw(size, where, args, kwargs)
            except Exception as exc:
                if not backend.is_oom(exc):
                    raise
                if size == 1 and backend.kind == HOST:
                    raise MemoryError(self._one_sample_advice()) from exc
                if size == 1:
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
            self.report.append(record)
            self.start += size
            self.retries = 0
            if self.manifest is not None:
                self.manifest.record(self.start, self.device, self.batch_size, self.vectorized)
            bar.update(size)
            bar.set_postfix(
                mem=format_bytes(backend.current_bytes(self.device)),
                peak=f"{format_bytes(record.working_bytes)}/{format_bytes(self.budget)}",
            )

    def _draw(self, size: int, where: torch.device, args: tuple, kwargs: dict) -> None:
        """Samples ``start:start + size`` into the sink: one vectorised draw, or (sequential
        plans) one sample at a time, each written before the next is drawn. On the host the
        guide's closed-form draws go straight into the sink's tensors."""
        posterior = self.request.posterior_samples
        chunks = [(self.start, size)] if self.vectorized else [(i, 1) for i in range(self.start, self.start + size)]
        for first, count in chunks:
            batch = None
            if posterior is not None:
                batch = to_device({n: v[first : first + count] for n, v in posterior.items()}, where)
            out = self.sink.slices(first, count) if where.type == HOST else None
            seeds = None if self.request.seed is None else sample_seeds(
                self.request.seed, self.request.first_sample + first, count
            )
            samples = self.sampler.draw(count, args, kwargs, self.sink.sites, batch, out, seeds)
            if not self.request.allow_nonfinite:
                check_finite(samples, first)
            self.sink.write(first, samples, non_blocking=where.type == "cuda")
            del samples, batch

    def _one_sample_advice(self) -> str:
        request = self.request
        return (
            f"[MEMORY] out of host memory drawing one sample (sample {self.start} of {request.num_samples}), "
            f"after {len(self.report)} batch(es) had finished; the budget was {format_bytes(self.budget)}. Other "
            "processes may have taken the memory the plan counted on: free some, or "
            + remedies(request.out, request.reduce, ("a model with smaller intermediate tensors",))
        )

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
