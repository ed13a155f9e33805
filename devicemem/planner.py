"""The planner: which device, how many samples per batch, vectorised or sequential, and why.

It reads device memory from the registry (:mod:`devicemem.backends`) and a footprint from
:mod:`devicemem.footprint` (probed for any model, analytic for the technical model), and
decides; the runner executes the :class:`Plan`. Every decision is logged to
``logging.getLogger("devicemem.planner")`` as a ``[MEMORY]`` line and kept in
``Plan.reasons``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from devicemem.backends.base import DeviceMemory
from devicemem.checks import check_int
from devicemem.footprint import (
    DISTRIBUTIONS,
    GUIDES,
    Footprint,
    check_choice,
    check_shapes,
    probe_footprint,
    technical_footprint,
)
from devicemem.units import format_bytes

if TYPE_CHECKING:
    from devicemem.sampling import Sampler

logger = logging.getLogger("devicemem.planner")

HOST = "cpu"
DEVICEMEM_SAFETY_FACTOR = "DEVICEMEM_SAFETY_FACTOR"
DEVICEMEM_THREADS = "DEVICEMEM_THREADS"
# Measured accuracy (bench/w3_accuracy.py, 16 points in fresh children, three runs): predicted /
# measured peak 0.94-1.17, so a real peak exceeds its prediction by at most ~7%; below 32 MiB
# tensors glibc adds noise (up to 1.42 over). With 0.8 the worst measured batch peaks at
# 0.86 of usable memory: the rest is for what the estimate cannot see, chiefly other processes
# growing after the usable figure was read (it is a snapshot). 0.9 would leave ~4% on a shared
# node; the seed's 0.7 / 0.35 paid for an estimator that was off by far more.
DEFAULT_SAFETY_FACTOR = 0.8
# The seed's batch size when no memory reading exists (it used sequential batches of 50).
CONSERVATIVE_BATCH = 50
# Pyro's sequential mode is recorded (and its progress shown) in at most this many chunks.
SEQUENTIAL_CHUNKS = 100


@dataclass(frozen=True)
class Plan:
    """A decision for one Predictive run; ``reasons`` are the sentences behind each choice.

    ``predicted_peak_bytes`` is the working memory of one batch on ``device``;
    ``output_bytes`` the host memory the full result [num_samples, ...] takes. A plan no run
    could follow (``batch_size=0``, ``n_batches`` that do not cover ``num_samples``...) is a
    ValueError naming the field; integer fields may be numpy integers and become ints. ``ramp_from``:
    when memory grows faster than linearly, the run starts at this (the largest probed) batch
    and doubles towards ``batch_size`` while measured peaks allow.
    """

    device: str
    num_samples: int
    batch_size: int
    n_batches: int
    vectorized: bool
    predicted_peak_bytes: int | None
    budget_bytes: int | None
    safety_factor: float
    output_bytes: int | None
    reasons: tuple[str, ...]
    ramp_from: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"Plan.device: expected a device name like 'cpu' or 'cuda:0'; got {self.device!r}")
        for name in ("num_samples", "batch_size", "n_batches"):
            object.__setattr__(self, name, check_int(getattr(self, name), f"Plan.{name}"))
        needed = math.ceil(self.num_samples / self.batch_size)
        if self.n_batches != needed:
            raise ValueError(
                f"Plan.n_batches: {self.num_samples} samples in batches of {self.batch_size} make {needed} "
                f"batch(es); got {self.n_batches}"
            )
        if not isinstance(self.vectorized, bool):
            raise ValueError(f"Plan.vectorized: expected True or False; got {self.vectorized!r}")
        for name, minimum in (("predicted_peak_bytes", 0), ("output_bytes", 0), ("budget_bytes", None)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or (
                minimum is not None and value < minimum
            ):
                bound = "a non-negative" if minimum is not None else "a"
                raise ValueError(f"Plan.{name}: expected None or {bound} number of bytes; got {value!r}")
            object.__setattr__(self, name, int(value))
        _check_factor(self.safety_factor, "Plan.safety_factor")
        if isinstance(self.reasons, str) or not all(isinstance(line, str) for line in self.reasons):
            raise ValueError(f"Plan.reasons: expected a sequence of sentences; got {self.reasons!r:.60}")
        object.__setattr__(self, "reasons", tuple(self.reasons))


@dataclass(frozen=True)
class Resources:
    """What the planner reads from the world; None means the real thing. Tests pass fakes.

    ``devices(max_memory)`` lists every device (default :func:`devicemem.backends.devices`);
    ``probe(model, guide, *args, device=, return_sites=, posterior_samples=, **kwargs)``
    measures a footprint (default :func:`devicemem.footprint.probe_footprint`); ``environ``
    is where ``DEVICEMEM_SAFETY_FACTOR`` is read (default ``os.environ``).
    """

    devices: Callable[[Any], list[DeviceMemory]] | None = None
    probe: Callable[..., Footprint] | None = None
    environ: Mapping[str, str] | None = None

    def list_devices(self, max_memory: Any) -> list[DeviceMemory]:
        if self.devices is not None:
            return self.devices(max_memory)
        from devicemem.backends import devices

        return devices(max_memory=max_memory)

    @property
    def env(self) -> Mapping[str, str]:
        return os.environ if self.environ is None else self.environ


# --- argument checks ---------------------------------------------------------------------


def _check_minibatch(minibatch_size: Any) -> int | None:
    return None if minibatch_size is None else check_int(minibatch_size, "minibatch_size")


def _check_factor(value: Any, what: str) -> float:
    try:
        factor = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a number in (0, 1], e.g. 0.8; got {value!r}") from None
    if isinstance(value, bool) or not 0.0 < factor <= 1.0:
        raise ValueError(f"{what}: expected a number in (0, 1], e.g. 0.8; got {value!r}")
    return factor


def _check_device(device: Any) -> str:
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    return str(device).strip().lower()


def resolve_safety_factor(safety_factor: float | None, environ: Mapping[str, str] | None = None) -> tuple[float, str]:
    """(factor, where it came from): the argument, else ``DEVICEMEM_SAFETY_FACTOR``, else the
    default. ValueError naming the argument or the variable when outside (0, 1]."""
    if safety_factor is not None:
        return _check_factor(safety_factor, "safety_factor"), "argument"
    environ = os.environ if environ is None else environ
    text = environ.get(DEVICEMEM_SAFETY_FACTOR, "").strip()
    if text:
        return _check_factor(text, DEVICEMEM_SAFETY_FACTOR), DEVICEMEM_SAFETY_FACTOR
    return DEFAULT_SAFETY_FACTOR, "default"


def _host_cores(resources: Resources, max_memory: Any) -> int | None:
    return next((m.cores for m in resources.list_devices(max_memory) if m.device == HOST), None)


def resolve_threads(
    threads: int | None, cores: Callable[[], int | None], environ: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """(threads, where it came from) for the host's block-parallel draws: the argument, else
    ``DEVICEMEM_THREADS``, else ``cores()`` (the registry's usable cores), else 1. ValueError
    naming the argument or the variable for anything but an integer >= 1."""
    if threads is not None:
        return check_int(threads, "threads"), "argument"
    environ = os.environ if environ is None else environ
    text = environ.get(DEVICEMEM_THREADS, "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{DEVICEMEM_THREADS}: expected an integer >= 1; got {text!r}")
        return int(text), DEVICEMEM_THREADS
    usable = cores()
    return (usable, "usable cores") if usable else (1, "default")


# --- the decision ------------------------------------------------------------------------


class _Reasons:
    """Collects the plan's sentences and logs each one as a ``[MEMORY]`` line."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, text: str, level: int = logging.INFO) -> None:
        self.lines.append(text)
        logger.log(level, "[MEMORY] %s", text)


def _describe(memory: DeviceMemory) -> str:
    what = "CPU RAM" if memory.device == HOST else f"{memory.device} memory"
    if memory.usable_bytes is None:
        return f"Available {what}: unknown (nothing readable)"
    extra = ""
    if memory.limit_bytes is not None:
        from devicemem.backends import limit_source

        extra = f" (limit {format_bytes(memory.limit_bytes)} from {limit_source(memory)})"
    elif memory.total_bytes is not None:
        extra = f" (of {format_bytes(memory.total_bytes)} total)"
    return f"Available {what}: {format_bytes(memory.usable_bytes)} usable{extra}"


def _find(listing: list[DeviceMemory], device: str) -> DeviceMemory:
    """The listed device named ``device`` ("cuda" = the first CUDA device); ValueError else."""
    for memory in listing:
        if memory.device == device or (":" not in device and memory.device.split(":")[0] == device):
            return memory
    seen = ", ".join(memory.device for memory in listing) or "none"
    raise ValueError(f"device: {device!r} is not visible to this process; it sees: {seen} (or pass 'auto')")


def _is_oom(device: str, exc: BaseException) -> bool:
    """``device``'s out-of-memory error, or a MemoryError (Python's or numpy's allocation failed
    on the host, whatever device was probed)."""
    from devicemem.backends import get_backend

    return isinstance(exc, MemoryError) or get_backend(device).is_oom(exc)


def _batches(num_samples: int, batch_size: int) -> tuple[int, int]:
    """(batch size, batches): the fewest batches of at most ``batch_size``, evened out."""
    n_batches = math.ceil(num_samples / batch_size)
    return math.ceil(num_samples / n_batches), n_batches


def _decide(
    footprint_for: Callable[[str, int], Footprint],
    num_samples: int,
    device: str,
    minibatch_size: int | None,
    safety_factor: float | None,
    max_memory: Any,
    output_bytes: int | None,
    inputs_on: str,
    resources: Resources,
    probe_with_minibatch: bool = True,
    reproducible: bool = False,
) -> Plan:
    factor, factor_source = resolve_safety_factor(safety_factor, resources.environ)
    reasons = _Reasons()
    listing = resources.list_devices(max_memory)
    if device == "auto":
        gpus = sorted(
            (m for m in listing if m.device != HOST and m.usable_bytes),
            key=lambda m: -(m.usable_bytes or 0),
        )
        host = [m for m in listing if m.device == HOST]
        candidates = gpus[:1] + (host or [DeviceMemory(HOST, "host RAM", None, None, None, None, ())])
    else:
        candidates = [_find(listing, device)]

    for index, memory in enumerate(candidates):
        last = index == len(candidates) - 1
        reasons.add(_describe(memory))
        if memory.usable_bytes is None:
            if not last:
                continue
            return _conservative(memory.device, num_samples, minibatch_size, factor, output_bytes, reasons)
        if minibatch_size is not None and not probe_with_minibatch:
            return _given_batches(memory.device, num_samples, minibatch_size, factor, memory.usable_bytes,
                                  output_bytes, reasons)
        try:
            footprint = footprint_for(memory.device, int(factor * memory.usable_bytes))
        except Exception as exc:
            if not _is_oom(memory.device, exc):
                raise
            if last:  # not even the probe's first, smallest batch ran: one sample at a time is all that is left
                reasons.add(
                    f"{memory.device} ran out of memory in the probe's first batch ({type(exc).__name__}); drawing "
                    "one sample at a time", logging.WARNING,
                )
                budget = int(factor * memory.usable_bytes) - ((output_bytes or 0) if memory.device == HOST else 0)
                return Plan(memory.device, num_samples, 1, num_samples, False, None, budget, factor, output_bytes,
                            tuple(reasons.lines))
            reasons.add(f"{memory.device} ran out of memory while probing the footprint; trying {HOST}")
            continue
        if output_bytes is None and footprint.output_per_sample_bytes is not None:
            output_bytes = footprint.output_per_sample_bytes * num_samples
        on_host = memory.device == HOST
        resident = memory.device == inputs_on
        results = (output_bytes or 0) if on_host else 0
        usable = memory.usable_bytes - results
        budget = int(factor * memory.usable_bytes) - results
        fit = footprint.max_batch(budget, resident)
        if fit < 1 and not last:
            reasons.add(
                f"{memory.device} cannot hold one vectorised sample: it needs "
                f"{format_bytes(footprint.peak_bytes(1, resident))} of a {format_bytes(budget)} budget; trying {HOST}"
            )
            continue
        reasons.add(f"Safety factor: {factor:.0%} ({factor_source}); budget {format_bytes(budget)} on {memory.device}"
                    + (f" after {format_bytes(output_bytes)} for the results" if on_host and output_bytes else ""))
        reasons.add(
            f"Estimated peak for {num_samples} samples on {memory.device}: "
            f"{format_bytes(footprint.peak_bytes(num_samples, resident))} ({footprint.source})"
        )
        return _size(memory.device, footprint, num_samples, minibatch_size, fit, budget, usable, resident,
                     factor, output_bytes, reasons, reproducible)
    raise AssertionError("the host is always the last candidate")


def _given_batches(
    device: str, num_samples: int, minibatch_size: int, factor: float, usable: int, output_bytes: int | None,
    reasons: _Reasons,
) -> Plan:
    """The user's batch size on ``device``, not probed (a probe would cost more than it tells)."""
    size, n_batches = _batches(num_samples, min(minibatch_size, num_samples))
    budget = int(factor * usable) - ((output_bytes or 0) if device == HOST else 0)
    reasons.add(f"Using user-specified minibatch_size={minibatch_size}: {n_batches} vectorised batches of {size} "
                f"on {device} (not probed; an out-of-memory batch is halved)")
    return Plan(device, num_samples, size, n_batches, True, None, budget, factor, output_bytes, tuple(reasons.lines))


def _conservative(
    device: str, num_samples: int, minibatch_size: int | None, factor: float, output_bytes: int | None,
    reasons: _Reasons,
) -> Plan:
    """No memory reading: the user's batch size, else the seed's sequential batches of 50."""
    if minibatch_size is not None:
        size, n_batches = _batches(num_samples, min(minibatch_size, num_samples))
        reasons.add(f"Using user-specified minibatch_size={minibatch_size}: {n_batches} vectorised batches of {size}")
        return Plan(device, num_samples, size, n_batches, True, None, None, factor, output_bytes, tuple(reasons.lines))
    size, n_batches = _batches(num_samples, min(CONSERVATIVE_BATCH, num_samples))
    reasons.add(
        f"Memory on {device} is unknown (install psutil for automatic memory detection): using the "
        f"conservative default of {n_batches} sequential batches of {size}",
        logging.WARNING,
    )
    return Plan(device, num_samples, size, n_batches, False, None, None, factor, output_bytes, tuple(reasons.lines))


def _size(
    device: str, footprint: Footprint, num_samples: int, minibatch_size: int | None, fit: int, budget: int,
    usable: int, resident: bool, factor: float, output_bytes: int | None, reasons: _Reasons,
    reproducible: bool = False,
) -> Plan:
    """Batch size and mode on the chosen device."""

    def plan(size: int, n_batches: int, vectorized: bool) -> Plan:
        return Plan(
            device, num_samples, size, n_batches, vectorized, footprint.peak_bytes(size, resident), budget,
            factor, output_bytes, tuple(reasons.lines),
        )

    if minibatch_size is not None:
        size, n_batches = _batches(num_samples, min(minibatch_size, num_samples))
        peak = footprint.peak_bytes(size, resident)
        reasons.add(f"Using user-specified minibatch_size={minibatch_size}: {n_batches} vectorised batches of {size} on {device}")
        if peak > usable and device == HOST:  # over the host's limit an allocation can kill the process
            raise ValueError(
                f"[MEMORY] minibatch_size={minibatch_size} is predicted to need {format_bytes(peak)} on {device} "
                f"({footprint.source}) but only {format_bytes(max(usable, 0))} is usable{_after(device, output_bytes)}; "
                f"nothing was run. Pass a smaller minibatch_size (the largest within the budget is {fit}), or none "
                "to let the planner choose"
            )
        if peak > budget:
            reasons.add(
                f"minibatch_size={minibatch_size} is predicted to peak at {format_bytes(peak)}, over the "
                f"{format_bytes(budget)} budget on {device}; the largest batch that fits is {fit}",
                logging.WARNING,
            )
        return plan(size, n_batches, True)

    if fit >= 1:
        cap = min(fit, num_samples)
        if reproducible and footprint.saturation_batch is not None and footprint.saturation_batch < cap:
            reasons.add(
                f"Not capping batches at {footprint.saturation_batch} samples, where the probe's timings say bigger "
                "batches stop being faster: the run is seeded, timings vary from run to run, and the draws follow "
                "the plan"
            )
        elif footprint.saturation_batch is not None and footprint.saturation_batch < cap:
            cap = footprint.saturation_batch
            reasons.add(
                f"Capping batches at {cap} sample{'s' if cap > 1 else ''}: beyond that a bigger batch is no faster per "
                f"sample, it only costs memory"
            )
        size, n_batches = _batches(num_samples, cap)
        peak = footprint.peak_bytes(size, resident)
        if n_batches == 1:
            reasons.add(f"Will use one vectorised batch of {size} on {device} (peak {format_bytes(peak)})")
        else:
            reasons.add(
                f"Will use {n_batches} vectorised batches of {size} on {device} "
                f"(peak {format_bytes(peak)} each; at most {min(fit, num_samples)} fit)"
            )
        measured = footprint.measured_batch
        if footprint.quadratic_bytes > 0 and measured is not None and measured < size:
            reasons.add(
                f"Memory grows faster than linearly with the batch ({footprint.source}): starting at the largest "
                f"probed batch, {measured}, and doubling towards {size} while measured peaks stay in the budget"
            )
            return dataclasses.replace(plan(size, n_batches, True), ramp_from=measured)
        return plan(size, n_batches, True)

    one = footprint.peak_bytes(1, resident)
    if one <= usable:
        reasons.add(
            f"Even one vectorised sample ({format_bytes(one)}) exceeds the {format_bytes(budget)} budget "
            f"on {device}; streaming sample by sample, sequentially, with no safety margin left "
            f"({format_bytes(usable)} usable)",
            logging.WARNING,
        )
        return plan(1, num_samples, False)
    if usable < 0:
        raise ValueError(
            f"[MEMORY] the results alone need {format_bytes(output_bytes)} of host memory but only "
            f"{format_bytes(usable + (output_bytes or 0))} is usable; nothing was run. Raise max_memory, draw "
            "fewer samples or return_sites, or write the results to disk (out=DIR, reduce=)"
        )
    counted = device == HOST and output_bytes
    raise ValueError(
        f"[MEMORY] one sample needs {format_bytes(one)} on {device} ({footprint.source}) but only "
        f"{format_bytes(usable)} is usable{_after(device, output_bytes)}; nothing was run. Use a device with more "
        "memory, fewer cells or features, fewer return_sites" + (", or write the results to disk" if counted else "")
    )


def _after(device: str, output_bytes: int | None) -> str:
    """What an error adds when the results were counted against ``device``'s memory."""
    return f" after {format_bytes(output_bytes)} for the results" if device == HOST and output_bytes else ""


# --- public entry points -----------------------------------------------------------------


def _inputs_device(*objects: Any) -> str:
    """Where the model's tensors live ("cpu" when there are none)."""
    stack = list(objects)
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            return HOST if obj.device.type == "cpu" else str(obj.device)
        if isinstance(obj, Mapping):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return HOST


def _check_common(num_samples: Any, device: Any, minibatch_size: Any, safety_factor: Any, output_bytes: Any) -> str:
    check_int(num_samples, "num_samples")
    _check_minibatch(minibatch_size)
    if safety_factor is not None:
        _check_factor(safety_factor, "safety_factor")
    if output_bytes is not None and (isinstance(output_bytes, bool) or not isinstance(output_bytes, int) or output_bytes < 0):
        raise ValueError(f"output_bytes: expected None or a non-negative int; got {output_bytes!r}")
    return _check_device(device)


def plan_predictive(
    model: Callable[..., Any],
    guide: Callable[..., Any] | None,
    num_samples: int,
    *args: Any,
    device: str = "auto",
    minibatch_size: int | None = None,
    safety_factor: float | None = None,
    max_memory: Any = None,
    return_sites: Sequence[str] | None = None,
    posterior_samples: Mapping[str, torch.Tensor] | None = None,
    output_bytes: int | None = None,
    resources: Resources | None = None,
    sampler: Sampler | None = None,
    reduce: Sequence[str] = (),
    reproducible: bool = False,
    on_device: Callable[[torch.device], None] | None = None,
    **kwargs: Any,
) -> Plan:
    """Plan a ``Predictive(model, guide, num_samples)`` call on ``*args, **kwargs``.

    The footprint is probed on each candidate device (:func:`devicemem.probe_footprint`,
    cached, never with a batch above ``num_samples`` or a peak above the budget). ``device="auto"``: the GPU with the most usable memory when it holds the fixed cost
    plus one vectorised sample, else the CPU. The batch is the largest whose predicted peak fits
    ``safety_factor * usable`` (less ``output_bytes``, the host result, on the CPU; None: every
    returned site times ``num_samples``), capped at ``num_samples`` and where bigger batches
    stop being faster; a user ``minibatch_size`` is kept and nothing is probed (the device is
    the first candidate with a memory reading).
    ``sampler``: the run's :class:`~devicemem.sampling.Sampler`, for the probe to draw with;
    without one the probe draws with a Sampler on :func:`resolve_threads`'s threads, as
    :class:`devicemem.Predictive` does by default, so its timings (and the cap) see the cores.
    ``reduce``: the sites reduced to mean and variance on the device, which the probe counts.
    ``on_device``: called with each device before the model is probed there (as the runner calls
    it before batches run there).
    ``reproducible`` (a seeded run): the batch is not capped where the probe's timings say
    bigger batches stop paying, as timings vary from run to run and the draws follow the plan.
    Raises ValueError, before any sampling, for bad arguments or when one sample cannot fit.
    """
    where = _check_common(num_samples, device, minibatch_size, safety_factor, output_bytes)
    if return_sites is not None and (isinstance(return_sites, str) or not all(isinstance(s, str) for s in return_sites)):
        raise ValueError(f"return_sites: expected None or a list of site names; got {return_sites!r}")
    if guide is None and posterior_samples is None:
        raise ValueError("plan_predictive: pass a guide or posterior_samples")
    resources = resources or Resources()
    probe = resources.probe or probe_footprint
    if sampler is None and resources.probe is None:  # draw as Predictive will: its threads time the probe
        from devicemem.sampling import Sampler

        threads, _ = resolve_threads(None, lambda: _host_cores(resources, max_memory), resources.environ)
        sampler = Sampler(model, guide, args, kwargs, threads=threads)

    def footprint_for(name: str, budget: int) -> Footprint:
        return probe(
            model, guide, *args, device=name, return_sites=return_sites, posterior_samples=posterior_samples,
            max_batch_size=max(num_samples, 2), max_probe_bytes=max(budget, 1), sampler=sampler, reduce=reduce,
            on_device=on_device, **kwargs,
        )

    return _decide(footprint_for, num_samples, where, minibatch_size, safety_factor, max_memory, output_bytes,
                   _inputs_device(args, kwargs), resources, probe_with_minibatch=False,
                   reproducible=reproducible)


def plan_sequential(
    num_samples: int,
    *args: Any,
    device: str = "auto",
    safety_factor: float | None = None,
    output_bytes: int | None = None,
    why: str = "parallel=False",
    **kwargs: Any,
) -> Plan:
    """Plan Pyro's sequential mode: the model runs one sample at a time, without a sample
    plate, on ``device`` ("auto": where the tensors of ``*args, **kwargs`` live, as in Pyro).
    A sample's memory does not grow with ``num_samples``, so nothing is probed; the samples are
    grouped into at most :data:`SEQUENTIAL_CHUNKS` chunks, each one batch record of
    the run. ``why`` opens the logged reason."""
    where = _check_common(num_samples, device, None, safety_factor, output_bytes)
    factor, _ = resolve_safety_factor(safety_factor)
    reasons = _Reasons()
    place = _inputs_device(args, kwargs) if where == "auto" else where
    size, n_batches = _batches(num_samples, math.ceil(num_samples / SEQUENTIAL_CHUNKS))
    reasons.add(
        f"{why}: drawing {num_samples} samples one at a time on {place}"
        + (" (where the model's inputs are)" if where == "auto" else "")
    )
    return Plan(place, num_samples, size, n_batches, False, None, None, factor, output_bytes, tuple(reasons.lines))


def plan_technical(
    n_cells: int,
    n_features: int,
    n_groups: int,
    num_samples: int,
    *,
    n_categories: int = 1,
    distribution: str = "negbinom",
    guide: str = "normal",
    with_obs: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "auto",
    minibatch_size: int | None = None,
    safety_factor: float | None = None,
    max_memory: Any = None,
    output_bytes: int | None = None,
    resources: Resources | None = None,
    threads: int | None = None,
) -> Plan:
    """Plan the technical model's Predictive from shapes alone (:func:`technical_footprint`).

    The inputs (counts, guide parameters) are taken to live on the host, so they count against
    a GPU's memory but not again against the host's. Same decisions as :func:`plan_predictive`.
    ``threads``: how many threads draw the likelihood on the host (:func:`resolve_threads`;
    default ``DEVICEMEM_THREADS``, else the host's usable cores): with more, a bigger vectorised
    batch still pays.
    """
    check_shapes(n_cells, n_features, n_groups, n_categories)
    check_choice(distribution, DISTRIBUTIONS, "distribution")
    if n_categories != 1 and distribution != "multinomial":
        raise ValueError(
            f"n_categories: only the multinomial distribution has categories; got {n_categories} with {distribution!r}"
        )
    check_choice(guide, GUIDES, "guide")
    where = _check_common(num_samples, device, minibatch_size, safety_factor, output_bytes)
    resources = resources or Resources()
    draw_threads, _ = resolve_threads(threads, lambda: _host_cores(resources, max_memory), resources.environ)

    def footprint_for(name: str, budget: int) -> Footprint:
        on_host = name.split(":")[0] == HOST
        return technical_footprint(n_cells, n_features, n_groups, n_categories, distribution, guide, with_obs, dtype,
                                   on_host=on_host, threads=draw_threads)

    return _decide(footprint_for, num_samples, where, minibatch_size, safety_factor, max_memory, output_bytes,
                   HOST, resources)


def estimate_predictive_memory_and_set_minibatch(
    N: int,
    T: int,
    C: int,
    nsamples: int,
    minibatch_size: int | None = None,
    distribution: str = "negbinom",
    safety_factor: float | None = None,
    device: str = "cpu",
    resources: Resources | None = None,
) -> tuple[int | None, bool]:
    """bayesDREAM's ``_estimate_predictive_memory_and_set_minibatch``, planned properly.

    Returns ``(minibatch_size, use_parallel)``: ``None`` when all ``nsamples`` fit in one
    batch; a user ``minibatch_size`` is returned as is with ``use_parallel=True``; with no
    memory reading, the seed's ``(50, False)``. Params-only technical Predictive (the seed's
    case), with an AutoNormal guide.
    """
    plan = plan_technical(
        N, T, C, nsamples, distribution=distribution, device=device, minibatch_size=minibatch_size,
        safety_factor=safety_factor, resources=resources,
    )
    if minibatch_size is not None:
        return minibatch_size, True
    if plan.budget_bytes is None:
        return plan.batch_size, plan.vectorized
    return (None if plan.n_batches == 1 else plan.batch_size), plan.vectorized
