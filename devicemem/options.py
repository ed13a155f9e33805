"""What a :class:`devicemem.Predictive` call is asked to do, as typed option records, each read
and checked once, when the Predictive is made.

``Predictive`` keeps Pyro's signature and takes devicemem's options keyword-only; inside, they
are three frozen records, passed as they are to the executors (and, for Ray, to each shard's
worker, with only what differs there replaced):

- :class:`MemoryOptions`: where it runs and against what memory (``device``, ``backend``
  sharding, ``minibatch_size``, ``safety_factor``, ``max_memory`` parsed into caps, a given
  ``plan``, the ``probe`` memory is read through);
- :class:`DrawOptions`: how samples are drawn (``parallel``, ``seed``, ``validate``,
  ``allow_nonfinite``, ``threads``, ``on_device``, ``progress``);
- :class:`OutputOptions`: where the results go (``out``, ``reduce``, ``resume``).

:class:`RayOptions` (``backend=``) says how a sharded run uses Ray.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from devicemem.backends import Caps, MemoryView, SystemProbe, split_device
from devicemem.backends.names import HOST, device_name, kind_of
from devicemem.checks import check_int, check_path
from devicemem.output.moments import STATISTICS

if TYPE_CHECKING:
    from devicemem.planner import Plan

INSTALL_HINT = "pip install 'devicemem[ray]'"


@dataclass(frozen=True)
class RayOptions:
    """How a sharded run uses Ray; ``backend="ray"`` means ``RayOptions()``.

    - ``num_shards``: shards to split the samples into; None: one per device slot.
    - ``max_retries``: Ray's retries of a task whose worker or node died (Ray's default, 3).
    - ``cpus_per_shard``: Ray CPUs a CPU shard takes; its torch threads and its share of the
      node's host memory (``cpus_per_shard / node CPUs``) follow from it.
    - ``worker_setup``: called with the shard (:class:`devicemem.execute.ray.Shard`) in the
      worker before it runs (register a backend there, set logging, inject faults in tests);
      must pickle.
    """

    num_shards: int | None = None
    max_retries: int = 3
    cpus_per_shard: float = 1.0
    worker_setup: Callable[[Any], None] | None = None

    def __post_init__(self) -> None:
        if self.num_shards is not None and (
            isinstance(self.num_shards, bool) or not isinstance(self.num_shards, int) or self.num_shards < 1
        ):
            raise ValueError(f"num_shards: expected None or a positive integer; got {self.num_shards!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < -1:
            raise ValueError(f"max_retries: expected a non-negative integer (-1: retry forever); got {self.max_retries!r}")
        if isinstance(self.cpus_per_shard, bool) or not isinstance(self.cpus_per_shard, (int, float)) or not (
            self.cpus_per_shard > 0
        ):
            raise ValueError(f"cpus_per_shard: expected a positive number of Ray CPUs; got {self.cpus_per_shard!r}")
        if self.worker_setup is not None and not callable(self.worker_setup):
            raise ValueError(f"worker_setup: expected None or a callable taking the Shard; got {self.worker_setup!r}")


def import_ray() -> ModuleType:
    """The ``ray`` module; ImportError saying how to install it when it is missing."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"backend='ray' and multi-device runs need Ray: {INSTALL_HINT} (Ray >= 2.9)") from exc
    return ray


def requested_devices(device: Any) -> list[str]:
    """``device`` (a name or a list of names) as a list of names; ValueError for anything else."""
    names = [device] if isinstance(device, str) else device
    form = "'auto', 'all', 'cpu', 'cuda', a device like 'cuda:1', or a list of devices"
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"device: expected {form}; got {device!r}")
    cleaned = [device_name(n) for n in names]
    if len(set(cleaned)) != len(cleaned):
        raise ValueError(f"device: {device!r} names a device twice")
    for name in cleaned:
        if name not in ("auto", "all"):
            split_device(name, "device")
    if len(cleaned) > 1 and {"auto", "all"} & set(cleaned):
        raise ValueError(f"device: 'auto' and 'all' stand alone, not in a list; got {device!r}")
    return cleaned


def local_device(device: Any, backend: Any) -> Any:
    """``device`` as the executors take it: a ``torch.device`` as its name and, when no backend
    is asked for, a list of one device as that device, which then runs in this process (a
    one-shard Ray cluster would only add its start-up). Lists of several devices, ``"all"`` and
    ``backend="ray"`` shard over Ray. ValueError for a name it cannot read."""
    if isinstance(device, torch.device):
        device = str(device)
    elif isinstance(device, (list, tuple)):
        device = [str(d) if isinstance(d, torch.device) else d for d in device]
    names = requested_devices(device)
    if backend is None and isinstance(device, list) and len(names) == 1 and names[0] != "all":
        return names[0]
    return device


def check_backend(backend: Any, device: Any, plan: Plan | None = None) -> RayOptions | None:
    """The Ray options ``Predictive(device=..., backend=..., plan=...)`` runs with, or None for
    the single-device path. ValueError for a backend or device it cannot read, or a ``plan``
    (one device's) with shards; ImportError with the install command when Ray is missing."""
    if backend is None and isinstance(device, str) and device != "all":
        return None
    if backend is None or backend == "ray":
        options = RayOptions()
    elif isinstance(backend, RayOptions):
        options = backend
    else:
        raise ValueError(f"backend: expected None, 'ray' or a devicemem.RayOptions; got {backend!r}")
    requested_devices(device)
    if plan is not None:
        raise ValueError("plan: a sharded run (Ray, device='all' or a device list) plans each shard on its own device")
    import_ray()
    return options


@dataclass(frozen=True)
class MemoryOptions:
    """Where a call runs and against what memory.

    ``device``: a name, or a list of names for a sharded run; ``sharding``: the Ray options of a
    sharded run, None on one device; ``max_memory``: the user's caps, parsed; ``plan``: a plan
    to follow instead of planning; ``probe``: where memory is read (a ``SystemProbe``, or a
    ``MemoryView`` already read).
    """

    device: Any = "auto"
    minibatch_size: int | None = None
    safety_factor: float | None = None
    max_memory: Caps = field(default_factory=Caps)
    plan: Plan | None = None
    probe: SystemProbe | MemoryView | None = None
    sharding: RayOptions | None = None

    @classmethod
    def parse(
        cls, num_samples: int, *, device: Any = "auto", backend: Any = None, minibatch_size: Any = None,
        safety_factor: Any = None, max_memory: Any = None, plan: Plan | None = None, probe: Any = None,
    ) -> MemoryOptions:
        """The checked options of a call of ``num_samples`` samples; ValueError naming the first
        bad one (ImportError when sharding needs Ray and it is missing)."""
        from devicemem.planner import resolve_safety_factor

        device = local_device(device, backend)
        check_int(minibatch_size, "minibatch_size", allow_none=True)
        if safety_factor is not None:
            resolve_safety_factor(safety_factor)
        if probe is not None and not isinstance(probe, (SystemProbe, MemoryView)):
            raise ValueError(f"probe: expected None, a devicemem.backends.SystemProbe or a MemoryView; got {probe!r:.60}")
        if plan is not None:
            if device != "auto" or minibatch_size is not None or safety_factor is not None:
                raise ValueError("plan replaces the planner: pass either plan or device/minibatch_size/safety_factor")
            if plan.num_samples != num_samples:
                raise ValueError(f"plan is for {plan.num_samples} samples but num_samples is {num_samples}")
        return cls(device, minibatch_size, safety_factor, Caps.parse(max_memory), plan, probe,
                   check_backend(backend, device, plan))

    def view(self) -> MemoryView:
        """The call's one memory reading: ``probe`` when it is one already, else the devices the
        call may use (every kind for "auto" and sharded runs; else the named device's kind and
        the host's), read once through ``probe`` with the caps applied."""
        if isinstance(self.probe, MemoryView):
            return self.probe
        named = self.plan.device if self.plan is not None else self.device
        single = isinstance(named, str) and device_name(named) not in ("auto", "all")
        return MemoryView.read(self.max_memory, self.probe, {HOST, kind_of(named)} if single else None)


@dataclass(frozen=True)
class DrawOptions:
    """How samples are drawn: ``parallel`` (True, False or None: vectorise when the model does),
    ``seed``, Pyro's argument checks in every draw (``validate``), NaN or infinite draws
    returned (``allow_nonfinite``), the host's draw ``threads``, the ``on_device`` hook and the
    ``progress`` bar."""

    parallel: bool | None = None
    seed: int | None = None
    validate: bool = False
    allow_nonfinite: bool = False
    threads: int | None = None
    on_device: Callable[[torch.device], None] | None = None
    progress: bool = True

    @classmethod
    def parse(
        cls, *, parallel: Any = None, seed: Any = None, validate: Any = False, allow_nonfinite: Any = False,
        threads: Any = None, on_device: Any = None, progress: Any = True,
    ) -> DrawOptions:
        """The checked options; ValueError naming the first bad one."""
        if parallel not in (None, True, False):
            raise ValueError(f"parallel: expected None (auto), True or False; got {parallel!r}")
        check_int(seed, "seed", minimum=0, allow_none=True)
        check_int(threads, "threads", allow_none=True)
        if on_device is not None and not callable(on_device):
            raise ValueError(f"on_device: expected None or a callable taking a torch.device; got {on_device!r}")
        return cls(parallel, None if seed is None else int(seed), bool(validate), bool(allow_nonfinite),
                   None if threads is None else int(threads), on_device, bool(progress))


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


@dataclass(frozen=True)
class OutputOptions:
    """Where the results go: numpy memmaps in ``out`` (else host tensors), the sites reduced to
    streamed statistics (``reduce``: site -> ("mean", "var")), and whether to ``resume`` the
    interrupted run in ``out``."""

    out: Path | None = None
    reduce: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    resume: bool = False

    @classmethod
    def parse(
        cls, memory: MemoryOptions, *, out: Any = None, reduce: Any = None, resume: Any = False,
    ) -> OutputOptions:
        """The checked options (``out`` created and tried for writing); ValueError naming the
        first bad one, or resume asked of a run it cannot continue (given ``memory``)."""
        if resume and (out is None or reduce or memory.plan is not None or memory.sharding is not None):
            raise ValueError(
                "resume: continues a single-device run written to out=DIR, with its own plan; it cannot be "
                "combined with reduce=, plan= or sharding, and needs out="
            )
        return cls(_check_out(out), _check_reduce(reduce), bool(resume))

    def reducing_all(self, names: Sequence[str]) -> OutputOptions:
        """These options with every site in ``names`` reduced to all statistics (a Ray shard's)."""
        return dataclasses.replace(self, out=None, reduce={name: STATISTICS for name in names}, resume=False)
