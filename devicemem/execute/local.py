"""The local executor: runs one checked Predictive request on this process's devices.

It asks the planner for a device and batch size, moves the guide's parameters and the tensor
arguments there (restoring them afterwards), and samples batch by batch into a
:class:`~devicemem.output.sink.Sink`, each batch one :meth:`devicemem.sampling.Sampler.draw`
(or, in :class:`~devicemem.planner.DrawMode` ``PER_SAMPLE`` and ``UNVECTORISED``, one sample at
a time). Out of memory (:func:`devicemem.recovery.retries`), a batch halves; a device that
cannot hold one sample hands the rest of the run to the host. Draws are reproducible:
closed-form latents (AutoNormal, AutoDelta) depend only on (seed, sample index), whatever the
batches; the model's own draws (the likelihood) and other guides' draws come from a stream
seeded from (seed, the batch's first sample index) (:mod:`devicemem.seeds`), so they are the
same for the same plan, and a seeded plan does not depend on the probe's timings.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from devicemem import planner
from devicemem.backends import Backend, MemoryView, get_backend
from devicemem.backends.names import HOST, is_host
from devicemem.backends.registry import is_oom_anywhere
from devicemem.checks import check_finite
from devicemem.execute.request import Request, Selection, choose_sites
from devicemem.output.admission import check_host, host_result_bytes, remedies
from devicemem.output.manifest import Manifest, describe_sites
from devicemem.output.sink import STAGING_BYTES, Sink
from devicemem.placement import parameters_on, to_device
from devicemem.planner import DrawMode, Plan
from devicemem.recovery import freeing, retries
from devicemem.sampling import Sampler, Site
from devicemem.seeds import sample_seeds, seeded
from devicemem.units import format_bytes

logger = logging.getLogger("devicemem.execute.local")


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


def _plan(request: Request, device: str, num_samples: int, args: tuple, kwargs: dict, output_bytes: int,
          sampler: Sampler, view: MemoryView) -> Plan:
    return planner.plan_predictive(
        request.model, request.guide, num_samples, *args, device=device, minibatch_size=request.memory.minibatch_size,
        safety_factor=request.memory.safety_factor, view=view,
        return_sites=list(request.return_sites or ()) or None, posterior_samples=request.posterior_samples,
        output_bytes=output_bytes, sampler=sampler, reduce=tuple(request.output.reduce),
        reproducible=request.draw.seed is not None, on_device=request.draw.on_device, **kwargs,
    )


def _vectorises(request: Request, selection: Selection, args: tuple, kwargs: dict) -> tuple[bool, str]:
    """(whether the model is drawn vectorised, why not): ``parallel`` when given; for None,
    whether a vectorised draw of two samples (where the inputs are, the RNG left as it was)
    gives every sampled site one value per sample of the unvectorised trace's shape. Two samples
    that run out of memory leave the smallest plan: one sample at a time."""
    if request.draw.parallel is not None:
        return bool(request.draw.parallel), "parallel=False"
    num = min(2, request.num_samples)
    posterior = {name: value[:num] for name, value in request.posterior_samples.items()}
    cuda = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            selection.sampler.draw(num, args, kwargs, selection.drawn, posterior or None)
    except (RuntimeError, ValueError, TypeError, IndexError, MemoryError) as exc:  # shape errors, or out of memory
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error = type(exc).__name__ + (f": {first}" if first else "")
        if is_oom_anywhere(exc):
            return False, f"parallel=None: two vectorised samples ran out of memory ({error})"
        return False, f"parallel=None: the model does not vectorise ({error})"
    return True, ""


def _the_plan(request: Request, selection: Selection, args: tuple, kwargs: dict, view: MemoryView,
              manifest: Manifest | None) -> tuple[Plan, DrawMode]:
    """The run's plan (a resumed run's, the given one, or the planner's) and its draw mode,
    decided here once."""
    vectorises, why = _vectorises(request, selection, args, kwargs)
    result_bytes = host_result_bytes(selection.drawn, request.output.reduce, request.num_samples, request.output.out)
    if manifest is not None:
        plan = Plan(**manifest.fields["plan"])
    elif request.memory.plan is not None:
        plan = request.memory.plan
        mode = DrawMode.of(plan.vectorized, vectorises)
        logger.info(
            "[MEMORY] Using the given plan: %d %s batch(es) of %d on %s%s",
            plan.n_batches, "vectorised" if mode is DrawMode.BATCHED else "sequential", plan.batch_size,
            plan.device, "" if vectorises else f" ({why})",
        )
    elif vectorises:
        plan = _plan(request, request.memory.device, request.num_samples, args, kwargs, result_bytes,
                     selection.sampler, view)
    else:
        plan = planner.plan_sequential(
            request.num_samples, *args, device=request.memory.device, safety_factor=request.memory.safety_factor,
            output_bytes=result_bytes, why=why, environ=view.environ, **kwargs,
        )
    vectorized = manifest.fields["next_batch"]["vectorized"] if manifest is not None else plan.vectorized
    return plan, DrawMode.of(vectorized, vectorises)


def run(
    request: Request, args: tuple, kwargs: dict, report: list[BatchRecord], view: MemoryView | None = None
) -> tuple[dict[str, Tensor], Plan]:
    """(the results by name, the plan run): ``request.num_samples`` samples drawn on one
    device (the planned one, then the host if it cannot hold one sample), in the call's
    :class:`DrawMode`. One :class:`BatchRecord` per finished batch is appended to ``report`` as
    it finishes. Planned, admitted and fallen back against one memory reading, ``view``
    (default: :meth:`MemoryOptions.view`)."""
    view = view if view is not None else request.memory.view()
    output = request.output
    selection = choose_sites(request, args, kwargs, view)
    sites = selection.drawn
    check_host(sites, output.reduce, request.num_samples, output.out, view.host)
    manifest = _resumed(request, sites) if output.resume else None
    plan, mode = _the_plan(request, selection, args, kwargs, view, manifest)
    on_host = is_host(plan.device)
    stage = get_backend(plan.device).torch_device(plan.device).type == "cuda"
    if request.memory.plan is not None or manifest is not None or not on_host:  # a host plan made here counted both
        check_host(sites, output.reduce, request.num_samples, output.out, view.host,
                   (plan.predicted_peak_bytes or 0) if on_host else STAGING_BYTES if stage else 0)
    sink = Sink(sites, output.reduce, request.num_samples, output.out, stage, selection.constants,
                resume=manifest is not None)
    if manifest is None and output.out is not None:
        manifest = Manifest.begin(output.out, request.num_samples, request.draw.seed, dataclasses.asdict(plan),
                                  describe_sites(sites, output.reduce))
    _Run(request, plan, mode, sink, selection.sampler, (args, kwargs), report, view, manifest).execute()
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
    sampler = Sampler(request.model, request.guide, args, kwargs, validate=request.draw.validate)
    return sampler.trace(request.num_samples, args, kwargs, dict(request.posterior_samples) or None)


def _resumed(request: Request, sites: dict[str, Site]) -> Manifest:
    """The manifest of the run in ``out`` that this call continues; ValueError when it
    is another run's (samples, seed or sites differ)."""
    out = request.output.out
    assert out is not None  # the options check that resume comes with out
    manifest = Manifest.load(out)
    mine = {"num_samples": request.num_samples, "seed": request.draw.seed,
            "sites": describe_sites(sites, request.output.reduce)}
    for key, value in mine.items():
        if manifest.fields.get(key) != value:
            raise ValueError(
                f"resume: {manifest.path} records a run with {key}={manifest.fields.get(key)!r:.200}; this call has "
                f"{value!r:.200}"
            )
    done, step = manifest.fields["complete_samples"], manifest.fields["next_batch"]
    logger.info(
        "[MEMORY] Resuming the run in %s: samples 0-%d are on disk; continuing from %d in batches of %d on %s",
        out, done - 1, done, step["batch_size"], step["device"],
    )
    return manifest


class _Run:
    """The state of one call: where the next batch starts, its size, its device, its mode."""

    def __init__(
        self, request: Request, plan: Plan, mode: DrawMode, sink: Sink, sampler: Sampler, inputs: tuple[tuple, dict],
        report: list[BatchRecord], view: MemoryView, manifest: Manifest | None = None,
    ) -> None:
        self.request, self.mode, self.sink, self.sampler, self.inputs = request, mode, sink, sampler, inputs
        self.report, self.view, self.manifest = report, view, manifest
        self.device, self.target, self.budget = plan.device, plan.batch_size, plan.budget_bytes
        self.batch_size = min(plan.ramp_from or plan.batch_size, plan.batch_size)
        self.result_bytes = host_result_bytes(sink.sites, request.output.reduce, request.num_samples, request.output.out)
        self.start = 0
        self.retries = 0
        if manifest is not None:  # where the run (perhaps an interrupted one) stands
            step = manifest.fields["next_batch"]
            self.start = manifest.fields["complete_samples"]
            self.device, self.batch_size = step["device"], step["batch_size"]

    def execute(self) -> None:
        """Every remaining batch, on the planned device, then (out of memory there at one sample)
        on the host."""
        with tqdm(total=self.request.num_samples, initial=self.start, unit="sample",
                  disable=not self.request.draw.progress, desc="Predictive") as bar:
            for attempt in retries(self.device, self._to_host, is_oom=lambda exc: get_backend(self.device).is_oom(exc),
                                   release=lambda: freeing(get_backend(self.device), self.device)()):
                with attempt:
                    if attempt.state != self.device:
                        self._move_to_host()
                    self._on_device(bar)

    def _to_host(self, device: str, exc: BaseException) -> str | None:
        """After a device ran out of memory at one sample (or while taking the data): the host,
        unless that was the host."""
        return None if is_host(device) else HOST

    def _move_to_host(self) -> None:
        """Plan the remaining samples on the host (against the call's reading) and go on there."""
        self.retries += 1
        remaining = self.request.num_samples - self.start
        args, kwargs = self.inputs
        if self.mode is DrawMode.UNVECTORISED:
            plan = planner.plan_sequential(remaining, device=HOST, output_bytes=self.result_bytes,
                                           why=f"{self.device} ran out of memory", environ=self.view.environ)
        else:
            plan = _plan(self.request, HOST, remaining, args, kwargs, self.result_bytes, self.sampler, self.view)
        logger.warning(
            "[MEMORY] %s cannot hold one sample; moving the remaining %d samples (from %d) to %s "
            "in batches of %d", self.device, remaining, self.start, HOST, plan.batch_size,
        )
        self.device, self.target, self.budget = HOST, plan.batch_size, plan.budget_bytes
        self.batch_size = min(plan.ramp_from or plan.batch_size, plan.batch_size)
        self.mode = DrawMode.of(plan.vectorized, self.mode is not DrawMode.UNVECTORISED)

    def _on_device(self, bar: tqdm) -> None:
        """The remaining batches on ``self.device``, with the guide's parameters and the
        arguments there."""
        backend = get_backend(self.device)
        where = backend.torch_device(self.device)
        if self.request.draw.on_device is not None:
            self.request.draw.on_device(where)
        with parameters_on(where, self.request.guide):
            args, kwargs = to_device(self.inputs, where)
            bar.set_description(f"Predictive [{self.device}]")
            while self.start < self.request.num_samples:
                size = min(self.batch_size, self.request.num_samples - self.start)
                for attempt in retries(size, self._halve, is_oom=backend.is_oom, release=freeing(backend, self.device)):
                    with attempt:
                        record = self._batch(attempt.state, backend, where, args, kwargs)
                self._finished(record, backend, bar)

    def _batch(self, size: int, backend: Backend, where: torch.device, args: tuple, kwargs: dict) -> BatchRecord:
        """Draw samples ``start:start + size``; the batch's record."""
        base = backend.current_bytes(self.device)
        backend.reset_peak(self.device)
        began = time.perf_counter()
        with seeded(self.request.draw.seed, self.request.first_sample + self.start, where):
            self._draw(size, where, args, kwargs)
        if where.type == "cuda":
            torch.cuda.synchronize(where)
        return BatchRecord(self.start, size, self.device, time.perf_counter() - began,
                           backend.peak_bytes(self.device), self.retries, base)

    def _halve(self, size: int, exc: BaseException) -> int | None:
        """After a batch ran out of memory: half of it. One sample (or one unvectorised draw) is
        as small as a draw gets: on the host that is the end (with advice), elsewhere
        :meth:`execute` moves on to the host."""
        if size == 1 or self.mode is DrawMode.UNVECTORISED:
            if is_host(self.device):
                raise MemoryError(self._one_sample_advice()) from exc
            return None
        self.retries += 1
        self.batch_size = size // 2
        self.target = min(self.target, self.batch_size)
        logger.warning(
            "[MEMORY] out of memory on %s with a batch of %d samples (from sample %d); retrying with %d",
            self.device, size, self.start, self.batch_size,
        )
        return self.batch_size

    def _finished(self, record: BatchRecord, backend: Backend, bar: tqdm) -> None:
        """Book a finished batch: report, progress, ramp-up, manifest."""
        self.report.append(record)
        self.start += record.size
        self.retries = 0
        self._grow(record)
        if self.manifest is not None:
            self.manifest.record(self.start, self.device, self.batch_size, self.mode is DrawMode.BATCHED)
        bar.update(record.size)
        bar.set_postfix(
            mem=format_bytes(backend.current_bytes(self.device)),
            peak=f"{format_bytes(record.working_bytes)}/{format_bytes(self.budget)}",
        )

    def _draw(self, size: int, where: torch.device, args: tuple, kwargs: dict) -> None:
        """Samples ``start:start + size`` into the sink: one vectorised draw (``BATCHED``), or one
        sample at a time, each written before the next is drawn: a plate of one
        (``PER_SAMPLE``) or Pyro's sequential mode (``UNVECTORISED``). On the host the guide's
        closed-form draws go straight into the sink's tensors."""
        posterior, seed = self.request.posterior_samples, self.request.draw.seed
        one_by_one = self.mode is not DrawMode.BATCHED
        chunks = [(i, 1) for i in range(self.start, self.start + size)] if one_by_one else [(self.start, size)]
        for first, count in chunks:
            batch = to_device({n: v[first : first + count] for n, v in posterior.items()}, where) or None
            seeds = None if seed is None else sample_seeds(seed, self.request.first_sample + first, count)
            if self.mode is DrawMode.UNVECTORISED:
                one = None if batch is None else {n: v[0] for n, v in batch.items()}
                samples = self.sampler.draw_one(args, kwargs, self.sink.sites, one, None if seeds is None else seeds[0])
            else:
                out = self.sink.slices(first, count) if where.type == HOST else None
                samples = self.sampler.draw(count, args, kwargs, self.sink.sites, batch, out, seeds)
            if not self.request.draw.allow_nonfinite:
                check_finite(samples, first)
            self.sink.write(first, samples)
            del samples, batch

    def _one_sample_advice(self) -> str:
        output = self.request.output
        return (
            f"[MEMORY] out of host memory drawing one sample (sample {self.start} of {self.request.num_samples}), "
            f"after {len(self.report)} batch(es) had finished; the budget was {format_bytes(self.budget)}. Other "
            "processes may have taken the memory the plan counted on: free some, or "
            + remedies(output.out, output.reduce, ("a model with smaller intermediate tensors",))
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
