"""The planner: which device, how many samples per batch, vectorised or sequential, and why.

It reads device memory from the registry (:mod:`devicemem.backends`) and a footprint from
:mod:`devicemem.footprint` (probed for any model, or built analytically by the caller), and
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
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from devicemem.backends.base import DeviceMemory, limit_source
from devicemem.backends.names import HOST, device_name
from devicemem.backends.view import MemoryView, budget
from devicemem.checks import check_fraction, check_int
from devicemem.footprint import Footprint, probe_footprint
from devicemem.units import format_bytes

if TYPE_CHECKING:
    from devicemem.sampling import Sampler

logger = logging.getLogger("devicemem.planner")

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


class DrawMode(str, Enum):
    """How a run draws its samples, decided once per call (:meth:`of`) from the plan and from
    whether the model vectorises (``parallel``, or the check ``parallel=None`` makes).

    - ``BATCHED``: each batch is one vectorised draw under Pyro's sample plate;
    - ``PER_SAMPLE``: a vectorising model drawn one sample (a plate of one) at a time: a plan
      whose one vectorised sample does not fit its budget, or made with no memory reading;
    - ``UNVECTORISED``: Pyro's sequential mode, the model without a sample plate, one sample at
      a time (``parallel=False``, or a model that does not vectorise).
    """

    BATCHED = "batched"
    PER_SAMPLE = "per-sample"
    UNVECTORISED = "unvectorised"

    @classmethod
    def of(cls, vectorized: bool, model_vectorises: bool) -> DrawMode:
        """The mode of a plan (its ``vectorized`` batches, or one sample at a time) for a model
        that vectorises or not."""
        if not model_vectorises:
            return cls.UNVECTORISED
        return cls.BATCHED if vectorized else cls.PER_SAMPLE


@dataclass(frozen=True)
class Plan:
    """A decision for one Predictive run; ``reasons`` are the sentences behind each choice.

    ``predicted_peak_bytes`` is the working memory of one batch on ``device``;
    ``output_bytes`` the host memory the full result [num_samples, ...] takes. A plan no run
    could follow (``batch_size=0``, ``n_batches`` that do not cover ``num_samples``...) is a
    ValueError naming the field; integer fields may be numpy integers and become ints. ``ramp_from``:
    when memory grows faster than linearly, the run starts at this (the largest probed) batch
    and doubles towards ``batch_size`` while measured peaks allow. ``vectorized``: batches drawn
    vectorised, else one sample at a time (the plan's record; a run's :class:`DrawMode` adds
    whether the model vectorises).
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


# --- argument checks ---------------------------------------------------------------------


def _check_minibatch(minibatch_size: Any) -> int | None:
    return None if minibatch_size is None else check_int(minibatch_size, "minibatch_size")


def _check_factor(value: Any, what: str) -> float:
    """A safety factor in (0, 1], given as a number or as text (an environment variable)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{what}: expected a number in (0, 1]; got {value!r}") from None
    return check_fraction(value, what)


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


def view_of(view: MemoryView | None, max_memory: Any) -> MemoryView:
    """``view``, else one reading of every device with ``max_memory`` applied."""
    return view if view is not None else MemoryView.read(max_memory)


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
        extra = f" (limit {format_bytes(memory.limit_bytes)} from {limit_source(memory)})"
    elif memory.total_bytes is not None:
        extra = f" (of {format_bytes(memory.total_bytes)} total)"
    return f"Available {what}: {format_bytes(memory.usable_bytes)} usable{extra}"


def _batches(num_samples: int, batch_size: int) -> tuple[int, int]:
    """(batch size, batches): the fewest batches of at most ``batch_size``, evened out."""
    n_batches = math.ceil(num_samples / batch_size)
    return math.ceil(num_samples / n_batches), n_batches


def decide(
    footprint_for: Callable[[str, int], Footprint],
    num_samples: int,
    device: str,
    view: MemoryView,
    *,
    minibatch_size: int | None = None,
    safety_factor: float | None = None,
    output_bytes: int | None = None,
    inputs_on: str = HOST,
    probe_with_minibatch: bool = True,
    reproducible: bool = False,
) -> Plan:
    """The plan for ``num_samples`` samples on ``device`` ("auto": :meth:`MemoryView.candidates`),
    from ``footprint_for(device, budget bytes)`` and the memory ``view`` holds; ``inputs_on``
    names where the model's inputs already live (they are not counted again there)."""
    factor, factor_source = resolve_safety_factor(safety_factor, view.environ)
    reasons = _Reasons()

    def plan_on(memory: DeviceMemory, last: bool) -> Plan | None:
        nonlocal output_bytes
        reasons.add(_describe(memory))
        if memory.usable_bytes is None:
            return _conservative(memory.device, num_samples, minibatch_size, factor, output_bytes, reasons) if last else None
        if minibatch_size is not None and not probe_with_minibatch:
            return _given_batches(memory, num_samples, minibatch_size, factor, output_bytes, reasons)
        footprint = footprint_for(memory.device, budget(memory, factor))
        if output_bytes is None and footprint.output_per_sample_bytes is not None:
            output_bytes = footprint.output_per_sample_bytes * num_samples
        on_host = memory.device == HOST
        resident = memory.device == inputs_on
        results = (output_bytes or 0) if on_host else 0
        usable = memory.usable_bytes - results
        room = budget(memory, factor) - results
        fit = footprint.max_batch(room, resident)
        if fit < 1 and not last:
            reasons.add(
                f"{memory.device} cannot hold one vectorised sample: it needs "
                f"{format_bytes(footprint.peak_bytes(1, resident))} of a {format_bytes(room)} budget; trying {HOST}"
            )
            return None
        reasons.add(f"Safety factor: {factor:.0%} ({factor_source}); budget {format_bytes(room)} on {memory.device}"
                    + (f" after {format_bytes(output_bytes)} for the results" if on_host and output_bytes else ""))
        reasons.add(
            f"Estimated peak for {num_samples} samples on {memory.device}: "
            f"{format_bytes(footprint.peak_bytes(num_samples, resident))} ({footprint.source})"
        )
        return _size(memory.device, footprint, num_samples, minibatch_size, fit, room, usable, resident,
                     factor, output_bytes, reasons, reproducible)

    def gave_way(memory: DeviceMemory, error: str) -> None:
        reasons.add(f"{memory.device} ran out of memory while probing the footprint; trying {HOST}")

    def one_at_a_time(memory: DeviceMemory, error: str) -> Plan:
        reasons.add(
            f"{memory.device} ran out of memory in the probe's first batch ({error}); drawing one sample at a time",
            logging.WARNING,
        )
        room = budget(memory, factor) - ((output_bytes or 0) if memory.device == HOST else 0)
        return Plan(memory.device, num_samples, 1, num_samples, False, None, room, factor, output_bytes,
                    tuple(reasons.lines))

    return view.pick(device, plan_on, gave_way, one_at_a_time)


def _given_batches(
    memory: DeviceMemory, num_samples: int, minibatch_size: int, factor: float, output_bytes: int | None,
    reasons: _Reasons,
) -> Plan:
    """The user's batch size on ``memory.device``, not probed (a probe would cost more than it tells)."""
    device = memory.device
    size, n_batches = _batches(num_samples, min(minibatch_size, num_samples))
    room = budget(memory, factor) - ((output_bytes or 0) if device == HOST else 0)
    reasons.add(f"Using user-specified minibatch_size={minibatch_size}: {n_batches} vectorised batches of {size} "
                f"on {device} (not probed; an out-of-memory batch is halved)")
    return Plan(device, num_samples, size, n_batches, True, None, room, factor, output_bytes, tuple(reasons.lines))


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
        size, n_batches = _batches(num_samples, _cap(footprint, min(fit, num_samples), reproducible, reasons))
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


def _cap(footprint: Footprint, cap: int, reproducible: bool, reasons: _Reasons) -> int:
    """The largest batch: ``cap`` (what fits, at most every sample), or less where the probe's
    timings say bigger batches stop being faster, unless the run is seeded (``reproducible``)."""
    saturation = footprint.saturation_batch
    if saturation is None or saturation >= cap:
        return cap
    if reproducible:
        reasons.add(
            f"Not capping batches at {saturation} samples, where the probe's timings say bigger "
            "batches stop being faster: the run is seeded, timings vary from run to run, and the draws follow "
            "the plan"
        )
        return cap
    reasons.add(
        f"Capping batches at {saturation} sample{'s' if saturation > 1 else ''}: beyond that a bigger batch is no "
        f"faster per sample, it only costs memory"
    )
    return saturation


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


def check_plan_arguments(num_samples: Any, device: Any, minibatch_size: Any, safety_factor: Any, output_bytes: Any) -> str:
    check_int(num_samples, "num_samples")
    _check_minibatch(minibatch_size)
    if safety_factor is not None:
        _check_factor(safety_factor, "safety_factor")
    if output_bytes is not None and (isinstance(output_bytes, bool) or not isinstance(output_bytes, int) or output_bytes < 0):
        raise ValueError(f"output_bytes: expected None or a non-negative int; got {output_bytes!r}")
    return device_name(device)


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
    view: MemoryView | None = None,
    measure: Callable[..., Footprint] | None = None,
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
    ``view``: the memory reading to plan against (default: one taken now, with ``max_memory``);
    ``measure`` replaces :func:`~devicemem.footprint.probe_footprint` (tests inject fakes).
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
    where = check_plan_arguments(num_samples, device, minibatch_size, safety_factor, output_bytes)
    if return_sites is not None and (isinstance(return_sites, str) or not all(isinstance(s, str) for s in return_sites)):
        raise ValueError(f"return_sites: expected None or a list of site names; got {return_sites!r}")
    if guide is None and posterior_samples is None:
        raise ValueError("plan_predictive: pass a guide or posterior_samples")
    view = view_of(view, max_memory)
    if sampler is None and measure is None:  # draw as Predictive will: its threads time the probe
        from devicemem.sampling import Sampler

        threads, _ = resolve_threads(None, lambda: view.host.cores, view.environ)
        sampler = Sampler(model, guide, args, kwargs, threads=threads)
    measure = measure or probe_footprint

    def footprint_for(name: str, room: int) -> Footprint:
        return measure(
            model, guide, *args, device=name, return_sites=return_sites, posterior_samples=posterior_samples,
            max_batch_size=max(num_samples, 2), max_probe_bytes=max(room, 1), sampler=sampler, reduce=reduce,
            on_device=on_device, **kwargs,
        )

    return decide(footprint_for, num_samples, where, view, minibatch_size=minibatch_size, safety_factor=safety_factor,
                  output_bytes=output_bytes, inputs_on=_inputs_device(args, kwargs), probe_with_minibatch=False,
                  reproducible=reproducible)


def plan_sequential(
    num_samples: int,
    *args: Any,
    device: str = "auto",
    safety_factor: float | None = None,
    output_bytes: int | None = None,
    why: str = "parallel=False",
    environ: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> Plan:
    """Plan Pyro's sequential mode: the model runs one sample at a time, without a sample
    plate, on ``device`` ("auto": where the tensors of ``*args, **kwargs`` live, as in Pyro).
    A sample's memory does not grow with ``num_samples``, so nothing is probed; the samples are
    grouped into at most :data:`SEQUENTIAL_CHUNKS` chunks, each one batch record of
    the run. ``why`` opens the logged reason; ``environ`` is where ``DEVICEMEM_SAFETY_FACTOR`` is
    read (a call's :class:`MemoryView` passes its own; default ``os.environ``)."""
    where = check_plan_arguments(num_samples, device, None, safety_factor, output_bytes)
    factor, _ = resolve_safety_factor(safety_factor, environ)
    reasons = _Reasons()
    place = _inputs_device(args, kwargs) if where == "auto" else where
    size, n_batches = _batches(num_samples, math.ceil(num_samples / SEQUENTIAL_CHUNKS))
    reasons.add(
        f"{why}: drawing {num_samples} samples one at a time on {place}"
        + (" (where the model's inputs are)" if where == "auto" else "")
    )
    return Plan(place, num_samples, size, n_batches, False, None, None, factor, output_bytes, tuple(reasons.lines))


def __getattr__(name: str) -> Any:
    """Names that moved to bayesDREAM_ext, for one release (:mod:`devicemem.integrations.moved`)."""
    from devicemem.integrations.moved import resolve

    return resolve(__name__, name)
