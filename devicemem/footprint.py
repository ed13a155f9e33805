"""Footprints: how many bytes a Predictive batch of B samples needs on a device.

:class:`Footprint` is the record the planner decides on; a package that knows its model can
build one analytically from shapes alone (bayesDREAM_ext.memory does for its models).
:func:`probe_footprint` measures one for any Pyro model and guide: it runs at least three
vectorised draws on the target device (each foreseen to fit the budget, allowing for quadratic
growth), measures each one's peak through the device's backend, fits a line through the two
largest, or a parabola through the last three when they grow faster than linearly, and adds
:data:`PROBE_MARGIN`. Results are cached per (model, guide, argument shapes, device).
"""

from __future__ import annotations

import gc
import inspect
import math
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from devicemem.backends.host import trim_heap
from devicemem.checks import check_int
from devicemem.recovery import retries

MiB = 1 << 20

# A probed batch whose time per sample is within this factor of the best probed one is as fast.
TIME_TOLERANCE = 1.05

PROBE_MARGIN = 0.10
# A third probed batch this far above the line through the two before it means super-linear growth.
SUPERLINEAR_TOLERANCE = 0.10
PROBE_TARGET_BYTES = 256 * MiB
PROBE_LADDER = (1, 4, 16, 64, 256, 1024, 4096)


@dataclass(frozen=True)
class Footprint:
    """Peak memory of one vectorised batch as ``fixed_bytes + per_sample_bytes * batch_size``.

    ``fixed_bytes`` covers what exists whatever the batch (data and guide parameters on the
    device, a likelihood's fixed working memory); ``per_sample_bytes`` what one more
    vectorised sample adds. ``source`` says how it was obtained ("analytic", "probe", ...).

    ``input_bytes`` is the part of ``fixed_bytes`` that is the inputs themselves (model
    arguments and guide parameters): not needed again on a device where they already live.
    Below ``small_batch_limit`` samples each costs ``small_batch_bytes`` more (see
    :meth:`per_sample_at`). ``output_per_sample_bytes`` is what one returned sample takes on
    the host;
    ``saturation_batch`` the batch size beyond which vectorising buys no more speed (None:
    bigger is always faster). A probe that saw memory grow faster than linearly with the batch
    adds ``quadratic_bytes * batch_size**2`` (a [B, B, ...] intermediate under the sample
    plate); ``measured_batch`` is the largest batch a probe actually ran.
    """

    fixed_bytes: int
    per_sample_bytes: int
    source: str
    input_bytes: int = 0
    small_batch_bytes: int = 0
    small_batch_limit: int = 0
    output_per_sample_bytes: int | None = None
    saturation_batch: int | None = None
    quadratic_bytes: float = 0.0
    measured_batch: int | None = None

    def per_sample_at(self, batch_size: int) -> int:
        """Bytes per sample in a batch of ``batch_size``: ``small_batch_bytes`` more below
        ``small_batch_limit``, where the batch's temporaries are small enough for glibc's heap,
        which keeps them resident after they die."""
        return self.per_sample_bytes + (self.small_batch_bytes if batch_size < self.small_batch_limit else 0)

    def peak_bytes(self, batch_size: int, inputs_resident: bool = False) -> int:
        """Predicted peak for a vectorised batch of ``batch_size`` samples; with
        ``inputs_resident`` the inputs already live on the device and are not counted."""
        inputs = 0 if inputs_resident else self.input_bytes
        working = self.fixed_bytes - self.input_bytes + self.per_sample_at(batch_size) * batch_size
        return inputs + working + int(math.ceil(self.quadratic_bytes * batch_size * batch_size))

    def max_batch(self, budget_bytes: int, inputs_resident: bool = False) -> int:
        """The largest vectorised batch whose predicted peak fits ``budget_bytes`` (0: not even
        one sample; ``sys.maxsize`` when samples cost nothing)."""
        inputs = 0 if inputs_resident else self.input_bytes
        room = budget_bytes - inputs - (self.fixed_bytes - self.input_bytes)
        if room < 0:
            return 0
        if self.quadratic_bytes > 0:  # the positive root of q B^2 + s B = room, then checked whole
            q, slope = self.quadratic_bytes, self.per_sample_bytes + self.small_batch_bytes
            batch = int((-slope + math.sqrt(slope * slope + 4 * q * room)) / (2 * q))
            while batch > 0 and self.peak_bytes(batch, inputs_resident) > budget_bytes:
                batch -= 1
            return batch
        if self.per_sample_bytes <= 0:
            return sys.maxsize if self.peak_bytes(1, inputs_resident) <= budget_bytes else 0
        large = room // self.per_sample_bytes
        if large >= self.small_batch_limit:
            return int(large)
        return int(min(room // (self.per_sample_bytes + self.small_batch_bytes), self.small_batch_limit - 1))


# --- probe-calibrated: any model and guide ----------------------------------------------

_PROBE_CACHE: dict[tuple, tuple[Any, Any, Any, Footprint]] = {}


def _identity(obj: Any) -> tuple[Any, Callable[[], Any] | None]:
    """(cache key, weak reference) for a model or guide; the reference is None when ``obj``
    cannot be weakly referenced (then nothing is cached). Bound methods are new objects on
    every attribute access, so they are keyed and referenced through their instance."""
    if obj is None:
        return None, lambda: None
    if inspect.ismethod(obj):
        return (id(obj.__self__), id(obj.__func__)), weakref.WeakMethod(obj)
    try:
        return id(obj), weakref.ref(obj)
    except TypeError:
        return id(obj), None


def _shape_key(obj: Any) -> Any:
    """A hashable summary of arguments: tensors by shape, dtype and device, else by value."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), str(obj.dtype), str(obj.device))
    if isinstance(obj, Mapping):
        return tuple(sorted((str(key), _shape_key(value)) for key, value in obj.items()))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__,) + tuple(_shape_key(value) for value in obj)
    try:
        hash(obj)
    except TypeError:
        return ("object", id(obj))
    return obj


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for value in obj.values() for t in _tensors(value)]
    if isinstance(obj, (list, tuple)):
        return [t for value in obj for t in _tensors(value)]
    return []


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _check_batch_sizes(batch_sizes: Sequence[int] | None) -> tuple[int, ...] | None:
    if batch_sizes is None:
        return None
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Sequence):
        raise ValueError(f"batch_sizes: expected None or at least two distinct positive integers; got {batch_sizes!r}")
    sizes = tuple(sorted({check_int(b, "batch_sizes") for b in batch_sizes}))
    if len(sizes) < 2:
        raise ValueError(f"batch_sizes: expected at least two distinct positive integers; got {batch_sizes!r}")
    return sizes


@dataclass(frozen=True)
class _Measure:
    batch_size: int
    delta_bytes: int
    seconds: float
    output_bytes: int


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(intercept, slope) through the first and last points."""
    slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
    return ys[0] - slope * xs[0], slope


def _superlinear(measures: list[_Measure]) -> bool:
    """Whether the largest of the last three batches peaked above the line through the two
    before it by more than :data:`SUPERLINEAR_TOLERANCE` (and a MiB of allocator noise)."""
    if len(measures) < 3:
        return False
    first, second, last = measures[-3:]
    intercept, slope = _line([first.batch_size, second.batch_size], [first.delta_bytes, second.delta_bytes])
    return last.delta_bytes > (1 + SUPERLINEAR_TOLERANCE) * (intercept + slope * last.batch_size) + MiB


def _quadratic(measures: list[_Measure]) -> tuple[float, float, float]:
    """(intercept, slope, curvature) of the parabola through the last three batches."""
    (x1, y1), (x2, y2), (x3, y3) = [(float(m.batch_size), float(m.delta_bytes)) for m in measures[-3:]]
    curvature = ((y3 - y1) / (x3 - x1) - (y2 - y1) / (x2 - x1)) / (x3 - x2)
    slope = (y2 - y1) / (x2 - x1) - curvature * (x1 + x2)
    return y1 - slope * x1 - curvature * x1 * x1, slope, curvature


def _predicted(measures: list[_Measure], batch: int) -> float:
    """A larger batch's peak as the probe can foresee it: the parabola through the last three
    batches once they show super-linear growth, the line through the last two once three show
    none; after two, ``a + c B^2`` through both (above any growth up to quadratic from there
    on); after one, its peak per sample (the one step quadratic growth can outrun)."""
    last = measures[-1]
    if len(measures) == 1:
        return last.delta_bytes * batch / last.batch_size
    if len(measures) == 2:
        first = measures[0]
        curvature = (last.delta_bytes - first.delta_bytes) / (last.batch_size**2 - first.batch_size**2)
        return last.delta_bytes + max(curvature, 0.0) * (batch**2 - last.batch_size**2)
    if _superlinear(measures):
        intercept, slope, curvature = _quadratic(measures)
        return intercept + slope * batch + curvature * batch * batch
    intercept, slope = _line([measures[-2].batch_size, last.batch_size], [measures[-2].delta_bytes, last.delta_bytes])
    return intercept + slope * batch


def _bound(measures: list[_Measure], cap: int) -> int | None:
    """After three batches that grow no faster than linearly, ``cap`` samples at the last
    batch's peak per sample: through the origin, an upper bound for any batch from the last
    one up to ``cap``."""
    if cap == sys.maxsize or len(measures) < 3 or _superlinear(measures):
        return None
    return math.ceil(measures[-1].delta_bytes * cap / measures[-1].batch_size)


@dataclass
class _Climb:
    """The probe's batches, and the range of ``max_probe_bytes`` for which the same batches
    would have been run (where a cached footprint from them stands)."""

    measures: list[_Measure]
    min_limit: int = 0
    max_limit: int | None = None

    def valid_for(self, limit: int | None) -> bool:
        above = limit is None or limit >= self.min_limit
        return above and (self.max_limit is None or (limit is not None and limit <= self.max_limit))


def _climb(
    run: Callable[[int], _Measure],
    ladder: list[int],
    explicit: bool,
    cap: int,
    limit: int | None,
    is_oom: Callable[[BaseException], bool],
) -> _Climb:
    """The probe's batches, in order: every explicit size, else up the ladder until a peak
    passes the target (and at least three batches ran), then its double. A batch whose peak,
    foreseen from those before it (:func:`_predicted`), would pass ``limit`` is not run, and an
    out-of-memory error ends the climb (not the first). When three batches grow linearly and
    even the through-origin bound fits ``cap`` samples in a quarter of ``limit`` the climb
    stops with the last batch: an exact line would not change the plan."""
    climb = _Climb([])
    measures = climb.measures

    def attempt(batch: int) -> bool:
        if limit is not None and measures and _predicted(measures, batch) > limit:
            climb.max_limit = limit
            return False
        # out of memory, the batch shrinks to none: the climb ends with what it measured (the
        # first batch's error stands)
        for trial in retries(batch, lambda size, exc: 0 if measures else None, is_oom=is_oom):
            with trial:
                if trial.state:
                    measures.append(run(trial.state))
        return trial.state != 0

    if explicit:
        for batch in ladder:
            if not attempt(batch):
                break
        return climb
    def clearly_fits() -> _Climb | None:
        bound = _bound(measures, cap)
        if limit is not None and bound is not None and 4 * bound <= limit:
            return _Climb(measures[-1:], min_limit=4 * bound)
        return None

    for batch in ladder:
        # the first batch also warms up (and is the noisiest): it ends the climb only when big
        big = measures and measures[-1].delta_bytes >= PROBE_TARGET_BYTES * (4 if len(measures) == 1 else 1)
        if big and (len(measures) >= 3 or measures[-1].delta_bytes >= 4 * PROBE_TARGET_BYTES):
            break
        early = clearly_fits()
        if early is not None:
            return early
        if not attempt(batch):
            return climb
    early = clearly_fits()
    if early is not None:
        return early
    if 2 * measures[-1].batch_size < cap:
        attempt(2 * measures[-1].batch_size)
    return climb


def _saturation(measures: list[_Measure]) -> int | None:
    """The batch size beyond which vectorising buys no speed, from the probe's timings: the
    smallest probed batch as fast per sample as the best (see :data:`TIME_TOLERANCE`), unless
    that is the largest, then where the per-draw overhead (the time line's intercept) falls
    under 5% of a batch's time."""
    per_sample = [m.seconds / m.batch_size for m in measures]
    best = min(per_sample)
    fastest = next(m.batch_size for m, t in zip(measures, per_sample) if t <= TIME_TOLERANCE * best)
    if fastest < measures[-1].batch_size:
        return fastest
    overhead, slope = _line([m.batch_size for m in measures[-2:]], [m.seconds for m in measures[-2:]])
    if slope <= 0:
        return None
    return max(fastest, int(math.ceil(20 * max(overhead, 0.0) / slope)))


def probe_footprint(
    model: Callable[..., Any],
    guide: Callable[..., Any] | None,
    *args: Any,
    device: str = "cpu",
    return_sites: Sequence[str] | None = None,
    batch_sizes: Sequence[int] | None = None,
    posterior_samples: Mapping[str, torch.Tensor] | None = None,
    max_batch_size: int | None = None,
    max_probe_bytes: int | None = None,
    backend: Any = None,
    sampler: Any = None,
    reduce: Sequence[str] = (),
    on_device: Callable[[torch.device], None] | None = None,
    **kwargs: Any,
) -> Footprint:
    """Measure a Predictive's footprint on ``device`` by running small vectorised batches.

    Each batch runs after a garbage collection (a likelihood's trace can hold its batch's
    tensors in reference cycles, and garbage freed during the next batch would hide part of its
    peak), the backend's ``empty_cache`` and, on the host, glibc's ``malloc_trim``, between its
    ``reset_peak`` and ``peak_bytes`` (CPU: VmHWM after resetting it through
    /proc/self/clear_refs; CUDA: max_memory_reserved). ``batch_sizes=None`` climbs
    :data:`PROBE_LADDER` until a batch's peak exceeds :data:`PROBE_TARGET_BYTES` (four times
    that for the first batch, which also warms up and is the noisiest), then runs
    twice that batch: both batches' tensors are then big enough for the allocator to behave as
    at full size. The line goes through the two largest batches, plus :data:`PROBE_MARGIN`;
    when the third largest shows super-linear growth a parabola goes through the last three
    (``quadratic_bytes``), and ``measured_batch`` says how far the measurements reach.
    No batch reaches ``max_batch_size`` (the planner passes ``num_samples``: the run itself is
    not repeated) or the number of posterior samples, except when two batches need it, nor
    (by extrapolation) peaks above ``max_probe_bytes`` (the planner passes its budget); when
    that allows one batch only, or when ``max_batch_size`` samples clearly fit (see
    :func:`_climb`), the footprint is one batch's peak per sample, through the origin. On the host
    the batches' times give ``saturation_batch``; elsewhere there is none (see the code).
    Arguments and guide parameters are moved to ``device`` for the probe and put back.
    ``backend`` replaces ``devicemem.backends.get_backend(device)`` (tests inject fakes);
    ``sampler`` is a :class:`~devicemem.sampling.Sampler` of this model and guide to draw with
    (the runner's: it has already learnt the shapes), else one is made. Each site in ``reduce``
    is reduced to its mean and variance on the device inside each batch, as the runner does.
    ``on_device`` is called with the device before the model first runs there (an integration
    whose model builds tensors on a device of its own follows it, as it follows the runner).
    """
    from devicemem.backends import get_backend
    from devicemem.sampling import PYRO_LOCK
    from devicemem.seeds import rng_restored

    backend = get_backend(device) if backend is None else backend
    with PYRO_LOCK, rng_restored(backend.torch_device(device)):
        return _probe(model, guide, args, device, return_sites, batch_sizes, posterior_samples, max_batch_size,
                      max_probe_bytes, backend, sampler, tuple(reduce), on_device, kwargs)


def _probe(
    model: Callable[..., Any], guide: Callable[..., Any] | None, args: tuple, device: str,
    return_sites: Sequence[str] | None, batch_sizes: Sequence[int] | None,
    posterior_samples: Mapping[str, torch.Tensor] | None, max_batch_size: int | None, max_probe_bytes: int | None,
    backend: Any, sampler: Any, reduce: tuple[str, ...], on_device: Callable[[torch.device], None] | None,
    kwargs: dict[str, Any],
) -> Footprint:
    """:func:`probe_footprint`'s work, under the lock that serialises Pyro's traces and with its
    own copy of the global RNGs, so that a probe never changes what later draws see."""
    from devicemem.placement import guide_tensors, parameters_on, to_device
    from devicemem.output.moments import batch_moments
    from devicemem.sampling import Sampler, select_sites

    sizes = _check_batch_sizes(batch_sizes)
    if max_batch_size is not None:
        check_int(max_batch_size, "max_batch_size", minimum=2)
    if max_probe_bytes is not None:
        check_int(max_probe_bytes, "max_probe_bytes")
    if guide is None and posterior_samples is None:
        raise ValueError("probe_footprint: pass a guide or posterior_samples")
    model_key, model_ref = _identity(model)
    guide_key, guide_ref = _identity(guide)
    key = (
        model_key, guide_key, str(device), tuple(return_sites or ()), tuple(reduce), sizes, max_batch_size,
        _shape_key((args, kwargs)), _shape_key(posterior_samples or {}),
        getattr(sampler, "threads", None),  # the batches' times depend on the draw threads
    )
    cached = _PROBE_CACHE.get(key)
    if cached is not None and cached[0]() == model and cached[1]() == guide and cached[2].valid_for(max_probe_bytes):
        return cached[3]

    where = backend.torch_device(device)
    if on_device is not None:
        on_device(where)
    moved_args, moved_kwargs = to_device((args, kwargs), where)
    posterior = to_device(dict(posterior_samples), where) if posterior_samples is not None else None
    cap = min(
        max_batch_size or sys.maxsize,
        min((int(v.shape[0]) for v in posterior.values()), default=sys.maxsize) if posterior else sys.maxsize,
    )
    ladder = _ladder(sizes, cap)

    def run(batch: int) -> _Measure:
        gc.collect()
        backend.empty_cache(device)
        if where.type == "cpu":
            trim_heap()
        backend.reset_peak(device)
        start = backend.current_bytes(device) or 0
        began = time.perf_counter()
        out = sampler.draw(
            batch, moved_args, moved_kwargs, returned,
            None if posterior is None else {k: v[:batch] for k, v in posterior.items()},
        )
        seconds = time.perf_counter() - began
        moments = [batch_moments(out[name]) for name in reduce]
        peak = backend.peak_bytes(device) or start
        output = sum(v.numel() * v.element_size() for v in out.values() if isinstance(v, torch.Tensor))
        del out, moments
        return _Measure(batch, max(peak - start, 0), seconds, output)

    # From here each collection only scans what the probe creates (ms, not the 0.1-0.3 s of a
    # full one); older garbage is frozen too, so none of it is freed inside a measured batch.
    gc.freeze()
    try:
        with parameters_on(where, guide):  # before the sampler's shape-learning run: an amortised guide runs there
            sampler = sampler or Sampler(model, guide, moved_args, moved_kwargs)
            returned = select_sites(sampler.sites, tuple(return_sites or ()), guide is not None, posterior)
            unknown = [name for name in reduce if name not in returned]
            if unknown:
                raise ValueError(f"reduce: site(s) {unknown} are not among the returned sites {list(returned)}")
            climb = _climb(run, ladder, sizes is not None, cap, max_probe_bytes, backend.is_oom)
            inputs = _storage_bytes(_tensors((moved_args, moved_kwargs, posterior)) + guide_tensors(guide))
    finally:
        gc.unfreeze()
    footprint = _fitted(climb.measures, inputs, device, on_host=where.type == "cpu")
    if model_ref is not None and guide_ref is not None:
        _PROBE_CACHE[key] = (model_ref, guide_ref, climb, footprint)
    return footprint


def _ladder(sizes: tuple[int, ...] | None, cap: int) -> list[int]:
    """The batch sizes a probe may climb: the explicit ones up to ``cap``, else
    :data:`PROBE_LADDER` below it (with ``cap`` itself when fewer than two are)."""
    if sizes is not None:
        ladder = [b for b in sizes if b <= cap]
    else:
        ladder = [b for b in PROBE_LADDER if b < cap]
        ladder += [cap] if len(ladder) < 2 and cap < sys.maxsize else []
    if len(ladder) < 2 and ladder != [cap]:  # one posterior sample: its batch is the only one there is
        raise ValueError(
            f"probe_footprint: needs two batch sizes of at most {cap} (max_batch_size or the number of "
            f"posterior samples); got {ladder}"
        )
    return ladder


def _fitted(measures: list[_Measure], inputs: int, device: str, on_host: bool) -> Footprint:
    """The footprint the measured batches give, plus :data:`PROBE_MARGIN`: one batch through the
    origin, a parabola through the last three when they grow faster than linearly, else the line
    through the last two (and, on the host, where bigger batches stop being faster)."""
    high = measures[-1]
    curvature = 0.0
    if len(measures) == 1:  # one batch (budget, or room to spare): through the origin, an upper bound
        slope, working, saturation = high.delta_bytes / high.batch_size, 0.0, None
        at = f"B={high.batch_size}, through the origin"
    elif _superlinear(measures):  # a parabola through the last three; never below what it saw
        intercept, slope, curvature = _quadratic(measures)
        slope, working, saturation = max(slope, 0.0), max(intercept, 0.0), None
        at = "B=" + ",".join(str(m.batch_size) for m in measures[-3:]) + ", quadratic"
    else:
        low = measures[-2]
        intercept, slope = _line([low.batch_size, high.batch_size], [low.delta_bytes, high.delta_bytes])
        slope, working = max(slope, 0.0), max(intercept, 0.0)
        # Off the host a draw's time is mostly kernel launches (its work runs asynchronously) and a
        # sample costs far less than a draw's overhead: bigger batches pay until memory binds.
        saturation = _saturation(measures) if on_host else None
        at = f"B={low.batch_size},{high.batch_size}"
    return Footprint(
        fixed_bytes=int(inputs + working * (1 + PROBE_MARGIN)),
        per_sample_bytes=int(math.ceil(slope * (1 + PROBE_MARGIN))),
        source=f"probe on {device} at {at}",
        input_bytes=int(inputs),
        output_per_sample_bytes=high.output_bytes // high.batch_size,
        saturation_batch=saturation,
        quadratic_bytes=curvature * (1 + PROBE_MARGIN),
        measured_batch=max(m.batch_size for m in measures),
    )


def __getattr__(name: str) -> Any:
    """Names that moved to bayesDREAM_ext, for one release (:mod:`devicemem.integrations.moved`)."""
    from devicemem.integrations.moved import resolve

    return resolve(__name__, name)
