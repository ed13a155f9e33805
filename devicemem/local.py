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
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

from devicemem import planner
from devicemem.backends import Backend, device_memory, get_backend
from devicemem.checks import check_finite
from devicemem.placement import parameters_on, to_device
from devicemem.planner import Plan
from devicemem.results import (
    HOST,
    STAGING_BYTES,
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
    """One validated Predictive call's options (see :class:`devicemem.Predictive`).

    ``posterior_samples`` is empty for a guide or the prior; ``return_sites`` follows Pyro
    (None, empty or names); ``parallel`` True, False or None (auto); ``with_observed=False``
    leaves unreduced observed sites out of the result (the Ray driver adds them itself)."""

    model: Callable[..., Any]
    guide: Callable[..., Any] | None
    posterior_samples: Mapping[str, Tensor]
    num_samples: int
    return_sites: Collection[str] | None = ()
    parallel: bool | None = None
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
    threads: int | None = None
    on_device: Callable[[torch.device], None] | None = None
    with_observed: bool = True
    first_sample: int = 0  # index of this request's first sample in the whole run (a Ray shard's start)
    resume: bool = False


@dataclass(frozen=True)
class Selection:
    """What a call returns: ``drawn`` sites (rows per sample) and ``constants`` (observed
    sites: their data, one host copy each), in Pyro's order (``order``)."""

    sampler: Sampler
    drawn: dict[str, Site]
    constants: dict[str, Tensor]
    order: tuple[str, ...]


def choose_sites(request: Request, args: tuple, kwargs: dict) -> Selection:
    """The sites the call returns, by Pyro's rules (:func:`~devicemem.sampling.select_sites`).
    Names in ``return_sites`` the model lacks, and a ``_RETURN`` that is not a tensor, are left
    out with a warning; ValueError for ``reduce`` sites that are not returned. Runs the model
    once, unbatched."""
    threads, origin = planner.resolve_threads(
        request.threads, lambda: device_memory(HOST, max_memory=request.max_memory).cores
    )
    logger.debug("[MEMORY] drawing large host sites on %d thread(s) (%s)", threads, origin)
    sampler = Sampler(request.model, request.guide, args, kwargs, validate=request.validate, threads=threads)
    sites = sampler.sites
    if request.return_sites:
        if "_RETURN" in request.return_sites and not sampler.returns_tensor:
            warnings.warn("return_sites: the model's return value is not a tensor; '_RETURN' is left out", UserWarning)
        unknown = [s for s in request.return_sites if s not in sites and s != "_RETURN"]
        if unknown:
            warnings.warn(
                f"return_sites: the model has no site(s) {unknown}; they are left out (it has "
                f"{[name for name in sites if name != '_RETURN']})", UserWarning,
            )
    chosen = select_sites(sites, request.return_sites, request.guide is not None, request.posterior_samples)
    unknown = [s for s in request.reduce if s not in chosen]
    if unknown:
        raise ValueError(f"reduce: site(s) {unknown} are not among the returned sites {list(chosen)}")
    clashes = [f"{s}:{stat}" for s, stats in request.reduce.items() for stat in stats if f"{s}:{stat}" in sites]
    if clashes:
        raise ValueError(f"reduce: result name(s) {clashes} clash with model sites of the same name")
    constants = {
        name: sampler.observed[name].to(HOST) for name, site in chosen.items()
        if site.observed and (request.with_observed or name in request.reduce)
    }
    drawn = {name: site for name, site in chosen.items() if not site.observed}
    return Selection(sampler, drawn, constants, tuple(chosen))


def _plan(
    request: Request, device: str, num_samples: int, args: tuple, kwargs: dict, output_bytes: int, sampler: Sampler
) -> Plan:
    return planner.plan_predictive(
        request.model, request.guide, num_samples, *args, device=device, minibatch_size=request.minibatch_size,
        safety_factor=request.safety_factor, max_memory=request.max_memory,
        return_sites=list(request.return_sites or ()) or None, posterior_samples=request.posterior_samples,
        output_bytes=output_bytes, sampler=sampler, reduce=tuple(request.reduce), reproducible=request.seed is not None,
        on_device=request.on_device, **kwargs,
    )


def _vectorises(request: Request, selection: Selection, args: tuple, kwargs: dict) -> tuple[bool, str]:
    """(whether to draw vectorised, why not): ``parallel`` when given; for None, whether a
    vectorised draw of two samples (where the inputs are, the RNG left as it was) gives every
    sampled site one value per sample of the unvectorised trace's shape. Two samples that run
    out of memory leave the smallest plan: one sample at a time."""
    if request.parallel is not None:
        return bool(request.parallel), "parallel=False"
    num = min(2, request.num_samples)
    posterior = {name: value[:num] for name, value in request.posterior_samples.items()}
    cuda = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            selection.sampler.draw(num, args, kwargs, selection.drawn, posterior or None)
    except (RuntimeError, ValueError, TypeError, IndexError, MemoryError) as exc:  # shape errors, or out of memory
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error = type(exc).__name__ + (f": {first}" if first else "")
        if isinstance(exc, MemoryError) or any(get_backend(kind).is_oom(exc) for kind in (HOST, "cuda", "mps")):
            return False, f"parallel=None: two vectorised samples ran out of memory ({error})"
        return False, f"parallel=None: the model does not vectorise ({error})"
    return True, ""


def run(request: Request, args: tuple, kwargs: dict, report: list[BatchRecord]) -> tuple[dict[str, Tensor], Plan]:
    """(the results by name, the plan run): ``request.num_samples`` samples drawn on one
    device (the planned one, then the host if it cannot hold one sample), vectorised or one
    at a time (:func:`_vectorises`). One :class:`BatchRecord` per finished batch is appended to
    ``report`` as it finishes."""
    selection = choose_sites(request, args, kwargs)
    sampler, sites = selection.sampler, selection.drawn
    result_bytes = host_result_bytes(sites, request.reduce, request.num_samples, request.out)
    check_host(sites, request.reduce, request.num_samples, request.out, request.max_memory)
    manifest = _resumed(request, sites) if request.resume else None
    vectorised, why = _vectorises(request, selection, args, kwargs)
    if manifest is not None:
        plan = Plan(**manifest.fields["plan"])
    elif request.plan is not None:
        plan = request.plan
        logger.info(
            "[MEMORY] Using the given plan: %d %s batch(es) of %d on %s%s",
            plan.n_batches, "vectorised" if plan.vectorized and vectorised else "sequential", plan.batch_size,
            plan.device, "" if vectorised else f" ({why})",
        )
    elif vectorised:
        plan = _plan(request, request.device, request.num_samples, args, kwargs, result_bytes, sampler)
    else:
        plan = planner.plan_sequential(
            request.num_samples, *args, device=request.device, safety_factor=request.safety_factor,
            output_bytes=result_bytes, why=why, **kwargs,
        )
    on_host = get_backend(plan.device).kind == HOST
    stage = get_backend(plan.device).torch_device(plan.device).type == "cuda"
    if request.plan is not None or manifest is not None or not on_host:  # a host plan made here counted both
        check_host(sites, request.reduce, request.num_samples, request.out, request.max_memory,
                   (plan.predicted_peak_bytes or 0) if on_host else STAGING_BYTES if stage else 0)
    sink = Sink(sites, request.reduce, request.num_samples, request.out, stage, selection.constants,
                resume=manifest is not None)
    if manifest is None and request.out is not None:
        manifest = Manifest.begin(request.out, request.num_samples, request.seed, dataclasses.asdict(plan),
                                  describe_sites(sites, request.reduce))
    _Run(request, plan, sink, sampler, args, kwargs, result_bytes, report, vectorised, manifest).execute()
    working = [row.working_bytes for row in report if row.working_bytes is not None]
    logger.info(
        "[MEMORY] Drew %d samples in %d batch(es) on %s; largest batch needed %s (predicted %s)",
        request.num_samples, len(report), ", ".join(dict.fromkeys(row.device for row in report)),
        format_bytes(max(working) if working else None), format_bytes(plan.predicted_peak_bytes),
    )
    return sink.result(selection.order), plan


def vectorized_trace(request: Request, args: tuple, kwargs: dict) -> Any:
    """Pyro's ``get_vectorized_trace``: one trace of the model under a plate of all
    ``request.num_samples`` samples, conditioned on the posterior or the guide's draws."""
    sampler = Sampler(request.model, request.guide, args, kwargs, validate=request.validate)
    return sampler.trace(request.num_samples, args, kwargs, dict(request.posterior_samples) or None)


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
        result_bytes: int, report: list[BatchRecord], vectorised: bool, manifest: Manifest | None = None,
    ) -> None:
        self.request = request
        self.sequential = not vectorised
        self.manifest = manifest
        self.sampler = sampler
        self.result_bytes = result_bytes
        self.sink = sink
        self.args = args
        self.kwargs = kwargs
        self.report = report
        self.device = plan.device
        self.target = plan.batch_size
        self.batch_size = min(plan.ramp_from or plan.batch_size, plan.batch_size)
        self.budget = plan.budget_bytes
        self.vectorized = plan.vectorized and vectorised
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
                where = backend.torch_device(self.device)
                if self.request.on_device is not None:
                    self.request.on_device(where)
                try:
                    with parameters_on(where, self.request.guide):
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
        if self.sequential:
            plan = planner.plan_sequential(remaining, device=HOST, output_bytes=self.result_bytes,
                                           why=f"{self.device} ran out of memory")
        else:
            plan = _plan(self.request, HOST, remaining, self.args, self.kwargs, self.result_bytes, self.sampler)
        logger.warning(
            "[MEMORY] %s cannot hold one sample; moving the remaining %d samples (from %d) to %s "
            "in batches of %d", self.device, remaining, self.start, HOST, plan.batch_size,
        )
        self.device, self.target, self.budget = HOST, plan.batch_size, plan.budget_bytes
        self.batch_size = min(plan.ramp_from or plan.batch_size, plan.batch_size)
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
            except Exception as exc:  # a sequential sample is as small as a draw gets: no smaller batch helps
                if not backend.is_oom(exc):
                    raise
                if (size == 1 or self.sequential) and backend.kind == HOST:
                    raise MemoryError(self._one_sample_advice()) from exc
                if size == 1 or self.sequential:
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
            self._grow(record)
            if self.manifest is not None:
                self.manifest.record(self.start, self.device, self.batch_size, self.vectorized)
            bar.update(size)
            bar.set_postfix(
                mem=format_bytes(backend.current_bytes(self.device)),
                peak=f"{format_bytes(record.working_bytes)}/{format_bytes(self.budget)}",
            )

    def _draw(self, size: int, where: torch.device, args: tuple, kwargs: dict) -> None:
        """Samples ``start:start + size`` into the sink: one vectorised draw, or (sequential
        plans) one sample at a time, each written before the next is drawn: Pyro's sequential
        mode (no sample plate) or, for a vectorisable model, plates of one. On the host the
        guide's closed-form draws go straight into the sink's tensors."""
        posterior = self.request.posterior_samples
        chunks = [(self.start, size)] if self.vectorized else [(i, 1) for i in range(self.start, self.start + size)]
        for first, count in chunks:
            batch = to_device({n: v[first : first + count] for n, v in posterior.items()}, where) or None
            seeds = None if self.request.seed is None else sample_seeds(
                self.request.seed, self.request.first_sample + first, count
            )
            if self.sequential:
                one = None if batch is None else {n: v[0] for n, v in batch.items()}
                samples = self.sampler.draw_one(args, kwargs, self.sink.sites, one, None if seeds is None else seeds[0])
            else:
                out = self.sink.slices(first, count) if where.type == HOST else None
                samples = self.sampler.draw(count, args, kwargs, self.sink.sites, batch, out, seeds)
            if not self.request.allow_nonfinite:
                check_finite(samples, first)
            self.sink.write(first, samples)
            del samples, batch

    def _one_sample_advice(self) -> str:
        request = self.request
        return (
            f"[MEMORY] out of host memory drawing one sample (sample {self.start} of {request.num_samples}), "
            f"after {len(self.report)} batch(es) had finished; the budget was {format_bytes(self.budget)}. Other "
            "processes may have taken the memory the plan counted on: free some, or "
            + remedies(request.out, request.reduce, ("a model with smaller intermediate tensors",))
        )

    def _grow(self, record: BatchRecord) -> None:
        """Ramp-up (plans with ``ramp_from``): the next batch doubles towards the plan's size as
        long as this batch's measured working memory, grown with the square of the batch (the
        fastest growth the probe allows for), stays within the budget."""
        if self.batch_size >= self.target or record.size < self.batch_size:
            return
        working = record.working_bytes
        if not working or not self.budget:
            self.batch_size = self.target
            return
        room = int(record.size * math.sqrt(self.budget / working))
        self.batch_size = max(self.batch_size, min(self.target, 2 * record.size, room))

    def _retry_smaller(self, backend: Backend, size: int) -> None:
        """After an OOM (outside the ``except`` block, so its frames are gone): free, halve."""
        gc.collect()
        backend.empty_cache(self.device)
        self.retries += 1
        self.batch_size = size // 2
        self.target = min(self.target, self.batch_size)
        logger.warning(
            "[MEMORY] out of memory on %s with a batch of %d samples (from sample %d); retrying with %d",
            self.device, size, self.start, self.batch_size,
        )
