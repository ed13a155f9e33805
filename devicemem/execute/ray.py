"""Sharded Predictive on Ray: one run across every GPU of a node, or across machines.

Posterior samples are independent, so a run splits into contiguous shards of sample indices.
Each shard is one Ray task pinned to one device; inside it the single-device runner plans its
own batches against that device's memory and returns its arrays; the driver writes each shard
into the same preallocated host tensors (or ``out=`` memmaps) a single-device run fills, in
sample order, and merges streaming reducers. A shard runs its batches as a single-device run
would, with the whole run's seed and sample indices: closed-form latents depend on (seed,
sample index) only, the rest on (seed, each batch's first sample index).

Where shards run (``device``):

- ``"all"``/``"auto"`` (with ``backend="ray"``), ``"cuda"``: every GPU of the Ray cluster
  (``num_gpus=1`` per task; Ray sets ``CUDA_VISIBLE_DEVICES``); without GPUs, CPU tasks.
- ``"cpu"``: CPU tasks of ``cpus_per_shard`` Ray CPUs each, across the cluster.
- ``["cuda:0", "cuda:1"]`` (or one indexed name): those devices, each pinned through the Ray
  custom resource ``devicemem:<device>`` of amount 1, which devicemem declares when it starts
  the local Ray instance itself; nodes you start yourself declare it with
  ``ray start --resources='{"devicemem:cuda:0": 1}'``.

Ray itself is found the Ray way: an initialised Ray, else ``RAY_ADDRESS`` or a cluster started
with ``ray start`` on this machine (``ray.init(address="auto")``), else a new local instance.
Dead tasks (worker killed, OOM-killed, node lost) are retried by Ray (``max_retries``); a
shard that still fails raises :class:`ShardError` naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import time
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Collection, Mapping

import numpy as np
import pyro
import torch
from torch import Tensor
from tqdm.auto import tqdm

from devicemem.backends import MemoryView, get_backend, split_device
from devicemem.backends.names import HOST
from devicemem.execute import local
from devicemem.execute.local import BatchRecord
from devicemem.execute.request import Request, Selection, choose_sites
from devicemem.options import DrawOptions, MemoryOptions, OutputOptions, RayOptions, import_ray, requested_devices
from devicemem.output.admission import check_host
from devicemem.output.moments import Moments
from devicemem.output.sink import Sink
from devicemem.placement import parameters_on, to_device
from devicemem.planner import Plan
from devicemem.units import format_bytes

logger = logging.getLogger("devicemem.execute.ray")

RESOURCE_PREFIX = "devicemem:"
_NOSET_CUDA = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}


class ShardError(RuntimeError):
    """A shard failed for good: its task raised, or died more often than Ray retries it."""

    def __init__(self, message: str, shard: Shard) -> None:
        super().__init__(message)
        self.shard = shard


@dataclass(frozen=True)
class Shard:
    """Samples ``start:stop`` of the run, shard ``index`` of ``count``, on ``slot``."""

    index: int
    count: int
    start: int
    stop: int
    slot: Slot

    @property
    def size(self) -> int:
        return self.stop - self.start

    def __str__(self) -> str:
        return f"shard {self.index} of {self.count} (samples {self.start}:{self.stop}, {self.slot.device})"


@dataclass(frozen=True)
class Slot:
    """One place a shard task can run: the device it names and the Ray resources that pin it.

    ``device`` is the runner's device inside the task ("cuda" for a Ray-assigned GPU, "cpu",
    or a named device such as "cuda:1"); ``resources`` go to Ray as ``num_cpus``/``num_gpus``
    and custom ``resources``.
    """

    device: str
    num_cpus: float
    num_gpus: float = 0.0
    resources: tuple[tuple[str, float], ...] = ()

    @property
    def named(self) -> bool:
        return bool(self.resources)


@dataclass(frozen=True)
class ShardRecord:
    """One finished shard, with the fields of :class:`~devicemem.execute.local.BatchRecord` first.

    ``device`` is the device as its node names it ("cuda:3" for Ray's GPU 3), ``node`` the
    node's IP address; ``peak_bytes`` and ``retries`` are the maximum and the sum over the
    shard's ``batches`` (whose ``start`` counts from the run's first sample); ``plan`` is the
    plan the shard made on its device; ``write_s`` the driver's time to receive and store it.
    """

    start: int
    size: int
    device: str
    wall_s: float
    peak_bytes: int | None
    retries: int
    shard: int
    node: str
    plan: Plan
    batches: tuple[BatchRecord, ...]
    write_s: float


@dataclass(frozen=True)
class _ShardOutput:
    """What a shard task sends back: arrays by result name, and how the shard ran."""

    arrays: dict[str, np.ndarray]
    plan: Plan
    batches: tuple[BatchRecord, ...]
    node: str
    device: str
    wall_s: float


@dataclass(frozen=True)
class _Job:
    """Everything a shard task needs besides the shared objects (model, guide, args): its shard,
    and the call's option records as the driver checked them (its worker reads its own memory)."""

    shard: Shard
    return_sites: Collection[str] | None
    memory: MemoryOptions
    draw: DrawOptions
    reduce: tuple[str, ...]

    @property
    def threads(self) -> int:
        """The shard's torch and draw threads: its Ray CPUs."""
        assert self.memory.sharding is not None
        return max(1, int(self.memory.sharding.cpus_per_shard))

    def request(self, model: Callable[..., Any], guide: Any, posterior: dict[str, Tensor]) -> Request:
        """The single-device request the worker runs: the shard's samples on its slot's device."""
        return Request(
            model, guide, posterior, self.shard.size, self.return_sites,
            memory=dataclasses.replace(self.memory, device=self.shard.slot.device, sharding=None),
            draw=dataclasses.replace(self.draw, progress=False, threads=self.threads),
            output=OutputOptions().reducing_all(self.reduce), with_observed=False, first_sample=self.shard.start,
        )


# --- choosing the backend and the slots --------------------------------------------------------


def _slots(names: list[str], cluster: Mapping[str, float], cpus_per_shard: float) -> list[Slot]:
    """The device slots of ``names`` in a cluster with ``cluster`` resources."""
    gpus, cpus = int(cluster.get("GPU", 0)), int(cluster.get("CPU", 0) // cpus_per_shard)
    if names in (["auto"], ["all"]):
        names = ["cuda"] if gpus else ["cpu"]
    slots: list[Slot] = []
    for name in names:
        if name == "cuda":
            if not gpus:
                raise ValueError("device='cuda': the Ray cluster has no GPUs (ray.cluster_resources() lists none)")
            slots += [Slot("cuda", num_cpus=1, num_gpus=1)] * gpus
        elif name == "cpu":
            if not cpus:
                raise ValueError(
                    f"device='cpu': the Ray cluster has {cluster.get('CPU', 0)} CPUs, fewer than "
                    f"cpus_per_shard={cpus_per_shard}"
                )
            slots += [Slot("cpu", num_cpus=cpus_per_shard)] * (cpus if names == ["cpu"] else 1)
        else:
            resource = RESOURCE_PREFIX + name
            if cluster.get(resource, 0) < 1:
                raise ValueError(
                    f"device {name!r}: no node of the Ray cluster offers the resource {resource!r}; devicemem "
                    f"declares it for the devices it sees when it starts Ray itself, otherwise start the node "
                    f"with ray start --resources='{{\"{resource}\": 1}}' (or use device='all')"
                )
            slots.append(Slot(name, num_cpus=1, resources=((resource, 1.0),)))
    return slots


def split(num_samples: int, num_shards: int) -> list[tuple[int, int]]:
    """``num_shards`` contiguous ``(start, stop)`` ranges covering ``range(num_samples)``, sizes
    differing by at most one (fewer ranges when there are fewer samples)."""
    count = min(num_shards, num_samples)
    bounds = [num_samples * k // count for k in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _connect(ray: ModuleType, view: MemoryView) -> None:
    """Use the initialised Ray, else RAY_ADDRESS / a local ``ray start`` cluster, else start
    a local instance offering ``devicemem:<device>`` for every accelerator ``view`` holds."""
    if ray.is_initialized():
        return
    try:
        ray.init(address="auto")
        logger.info("[MEMORY] connected to the Ray cluster at %s", ray.get_runtime_context().gcs_address)
        return
    except ConnectionError:
        pass
    named = {RESOURCE_PREFIX + memory.device: 1.0 for memory in view.devices if memory.device != HOST}
    ray.init(resources=named)
    logger.info(
        "[MEMORY] started a local Ray instance (%s); it stays up for later runs, ray.shutdown() ends it",
        ", ".join(f"{k}={v:g}" for k, v in sorted(ray.cluster_resources().items()) if not k.startswith("node")),
    )


# --- the shard task (runs in a Ray worker) ----------------------------------------------------


def _node_cpus(ray: ModuleType) -> float | None:
    node = ray.get_runtime_context().get_node_id()
    for info in ray.nodes():
        if info.get("NodeID") == node:
            return info.get("Resources", {}).get("CPU")
    return None


def _shard_view(ray: ModuleType, job: _Job) -> MemoryView:
    """The shard's one memory reading, of its worker's machine with the user's caps; a CPU
    shard's host is capped at its share of the node (its CPUs / the node's CPUs), since the
    node's CPU shards share its RAM."""
    view = MemoryView.read(job.memory.max_memory)
    node_cpus = _node_cpus(ray) if job.shard.slot.device == HOST else None
    usable = view.host.usable_bytes
    if not node_cpus or usable is None:
        return view
    cpus = job.memory.sharding.cpus_per_shard if job.memory.sharding is not None else 1.0
    share = int(usable * min(1.0, cpus / node_cpus))
    logger.info("[MEMORY] %s: %s of host memory (%g of the node's %g CPUs)", job.shard, format_bytes(share),
                cpus, node_cpus)
    return view.capped(HOST, share, "override:max_memory")


def _node_device(ray: ModuleType, slot: Slot) -> str:
    """The device as its node names it: Ray's GPU id for a Ray-assigned GPU."""
    if slot.device != "cuda":
        return slot.device
    ids = ray.get_gpu_ids()
    return f"cuda:{ids[0]}" if len(ids) == 1 else "cuda"


# This worker's guide of the latest run, by object id. The shards of one run that land on one
# worker share one guide object, so the footprint probe (cached per model and guide object)
# runs once per worker and device, not once per shard; the next run's guide replaces it.
_GUIDES: dict[str, Any] = {}


def _guide(ray: ModuleType, ref: Any) -> Any:
    key = ref.hex()
    if key not in _GUIDES:
        _GUIDES.clear()
        _GUIDES[key] = ray.cloudpickle.loads(ray.get(ref))
    return _GUIDES[key]


def _to_host(tensor: Tensor) -> Tensor:
    return tensor.detach().to(HOST)


def host_pickle(ray: ModuleType, obj: Any, mover: Callable[[Tensor], Tensor] = _to_host) -> bytes:
    """``obj`` pickled as Ray pickles it, with every tensor on the host. A guide fitted on a GPU
    holds device tensors beyond its parameters (its prototype trace, the values its init
    function closes over) that a CPU shard, or a GPU worker seeing one device, cannot unpickle;
    the shard's runner moves the parameters to its own device. ``mover`` makes a device
    tensor's host copy (tests inject their own)."""
    buffer = io.BytesIO()
    _host_pickler(ray.cloudpickle.CloudPickler)(buffer, mover).dump(obj)
    return buffer.getvalue()


@functools.lru_cache(maxsize=None)
def _host_pickler(base: type) -> type:
    """``base`` (Ray's cloudpickler) writing every tensor off the host as its host copy."""

    class HostPickler(base):  # type: ignore[misc, valid-type]
        def __init__(self, file: Any, mover: Callable[[Tensor], Tensor]) -> None:
            super().__init__(file)
            self.mover = mover

        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, Tensor) and obj.device.type != HOST:
                host = self.mover(obj).requires_grad_(obj.requires_grad)
                if isinstance(obj, torch.nn.Parameter):
                    return torch.nn.Parameter, (host, obj.requires_grad)
                return host.__reduce_ex__(self.proto)
            return super().reducer_override(obj)

    return HostPickler


def _run_shard(
    job: _Job, model: Callable[..., Any], guide_box: list, params: dict | None, args: tuple, kwargs: dict,
    posterior: dict[str, Tensor],
) -> _ShardOutput:
    """Run one shard with the single-device runner on the device this task was given.
    ``guide_box`` holds the guide's ObjectRef (boxed, so Ray leaves it unresolved)."""
    import ray

    shard = job.shard
    guide = _guide(ray, guide_box[0])
    if job.memory.sharding is not None and job.memory.sharding.worker_setup is not None:
        job.memory.sharding.worker_setup(shard)
    if shard.slot.device == HOST:
        torch.set_num_threads(job.threads)
    view = _shard_view(ray, job)
    pyro.clear_param_store()
    if params is not None:
        pyro.get_param_store().set_state(params)
    request = job.request(model, guide, posterior)
    report: list[BatchRecord] = []
    plan = None
    began = time.perf_counter()
    try:
        results, plan = local.run(request, args, kwargs, report, view)
    finally:
        pyro.clear_param_store()
        if plan is not None:
            get_backend(plan.device).empty_cache(plan.device)
    wall = time.perf_counter() - began
    batches = tuple(dataclasses.replace(row, start=row.start + shard.start) for row in report)
    return _ShardOutput(
        arrays={name: value.detach().numpy() for name, value in results.items()}, plan=plan,
        batches=batches, node=ray.util.get_node_ip_address(), device=_node_device(ray, shard.slot), wall_s=wall,
    )


@functools.lru_cache(maxsize=None)
def _remote(ray: ModuleType, gpu: bool, accelerator: bool) -> Any:
    # A worker that ran on an accelerator keeps its CUDA context and torch's pinned host cache
    # for its life: such a task gets a fresh worker (max_calls=1), which exits after it and so
    # releases both (and each task's CUDA_VISIBLE_DEVICES takes effect); CPU tasks reuse warm
    # workers (max_calls=0: no limit).
    return ray.remote(num_gpus=1 if gpu else 0, max_calls=1 if accelerator else 0)(_run_shard)


# --- the driver ---------------------------------------------------------------------------------


class _Collector:
    """Receives shard outputs in any order and stores each one exactly once, in sample order."""

    def __init__(self, request: Request, selection: Selection) -> None:
        self.request = request
        self.order = selection.order
        reduce = request.output.reduce
        stored = {name: site for name, site in selection.drawn.items() if name not in reduce}
        constants = {name: value for name, value in selection.constants.items() if name not in reduce}
        self.sink = Sink(stored, {}, request.num_samples, request.output.out, stage=False, constants=constants)
        self.moments = {name: Moments() for name in reduce}
        self.done: dict[int, ShardRecord] = {}

    def store(self, shard: Shard, output: _ShardOutput) -> ShardRecord:
        if shard.index in self.done:
            raise RuntimeError(f"{shard} arrived twice; refusing to write it again")
        began = time.perf_counter()
        with warnings.catch_warnings():
            # Ray hands arrays back read-only (zero-copy); they are only read from here.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            stored = {name: torch.from_numpy(output.arrays[name]) for name in self.sink.sites}
            self.sink.write(shard.start, stored)
        for name, moments in self.moments.items():
            moments.merge_shard(shard.size, output.arrays[f"{name}:mean"], output.arrays[f"{name}:var"])
        peaks = [row.peak_bytes for row in output.batches if row.peak_bytes is not None]
        record = ShardRecord(
            start=shard.start, size=shard.size, device=output.device, wall_s=output.wall_s,
            peak_bytes=max(peaks) if peaks else None, retries=sum(row.retries for row in output.batches),
            shard=shard.index, node=output.node, plan=output.plan, batches=output.batches,
            write_s=time.perf_counter() - began,
        )
        self.done[shard.index] = record
        return record

    def result(self, shards: list[Shard]) -> dict[str, Tensor]:
        missing = [str(shard) for shard in shards if shard.index not in self.done]
        if missing:
            raise RuntimeError(f"shards never stored: {', '.join(missing)}")
        result = self.sink.result(self.order)
        for name, statistics in self.request.output.reduce.items():
            for statistic in statistics:
                result[f"{name}:{statistic}"] = self.moments[name].result(statistic)
        return result


def _failure(ray: ModuleType, shard: Shard, exc: BaseException, max_retries: int) -> ShardError:
    """The error naming ``shard``: what its task raised, or how it died after Ray's retries."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if exc.cause is not None else exc
        lines = str(cause).strip().splitlines()
        return ShardError(f"{shard} raised {type(cause).__name__}: {lines[-1] if lines else ''}", shard)
    retries = "forever" if max_retries < 0 else f"{max_retries} time(s)"
    lines = str(exc).strip().splitlines()
    return ShardError(
        f"{shard} failed after Ray retried it {retries}: {type(exc).__name__}: {lines[0] if lines else ''}", shard
    )


def run(
    request: Request, args: tuple, kwargs: dict, report: list[ShardRecord]
) -> dict[str, Tensor]:
    """The results of ``request`` drawn in shards on Ray; ``report`` receives one
    :class:`ShardRecord` per shard in sample order (each holds the plan its shard made)."""
    ray = import_ray()
    options = request.memory.sharding
    assert options is not None  # the options made this a sharded run
    names = requested_devices(request.memory.device)
    view = request.memory.view()
    selection = choose_sites(request, args, kwargs, view)
    check_host(selection.drawn, request.output.reduce, request.num_samples, request.output.out, view.host)
    _connect(ray, view)
    slots = _slots(names, ray.cluster_resources(), options.cpus_per_shard)
    ranges = split(request.num_samples, options.num_shards or len(slots))
    shards = [Shard(k, len(ranges), a, b, slots[k % len(slots)]) for k, (a, b) in enumerate(ranges)]
    logger.info(
        "[MEMORY] %d samples in %d shards on %d device slot(s) (%s); each shard plans its own batches",
        request.num_samples, len(shards), len(slots), ", ".join(sorted({slot.device for slot in slots})),
    )
    collector = _Collector(request, selection)
    pending = _submit(ray, request, options, shards, args, kwargs)
    records: list[ShardRecord] = []
    try:
        with tqdm(total=request.num_samples, unit="sample", disable=not request.draw.progress,
                  desc=f"Predictive [ray: {len(slots)} slot(s)]") as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                shard = pending.pop(ready[0])
                try:
                    output = ray.get(ready[0])
                except ray.exceptions.RayError as exc:
                    raise _failure(ray, shard, exc, options.max_retries) from exc
                record = collector.store(shard, output)
                del output
                records.append(record)
                logger.info(
                    "[MEMORY] %s done on %s %s: %d batch(es), peak %s, %.2f s", shard, record.node, record.device,
                    len(record.batches), format_bytes(record.peak_bytes), record.wall_s,
                )
                bar.update(shard.size)
    finally:
        for ref in pending:
            ray.cancel(ref)
    report.extend(sorted(records, key=lambda record: record.start))
    return collector.result(shards)


def _submit(
    ray: ModuleType, request: Request, options: RayOptions, shards: list[Shard], args: tuple, kwargs: dict
) -> dict[Any, Shard]:
    """Put the shared objects once (on the host) and start one task per shard."""
    with parameters_on(HOST, request.guide):
        guide_ref = ray.put(host_pickle(ray, request.guide))
        params_ref = ray.put(pyro.get_param_store().get_state() if pyro.get_param_store().keys() else None)
    model_ref = ray.put(request.model)
    args_ref, kwargs_ref = ray.put(to_device(args, HOST)), ray.put(to_device(kwargs, HOST))
    memory = dataclasses.replace(request.memory, probe=None)  # each worker reads its own machine
    pending = {}
    for shard in shards:
        job = _Job(shard, request.return_sites, memory, request.draw, tuple(request.output.reduce))
        posterior = to_device({n: v[shard.start : shard.stop] for n, v in request.posterior_samples.items()}, HOST)
        slot = shard.slot
        task_options: dict[str, Any] = {"num_cpus": slot.num_cpus, "max_retries": options.max_retries}
        if slot.named:
            task_options["resources"] = dict(slot.resources)
            if split_device(slot.device, "device")[0] == "cuda":
                task_options["runtime_env"] = _NOSET_CUDA
        remote = _remote(ray, slot.num_gpus > 0, split_device(slot.device, "device")[0] != HOST).options(**task_options)
        ref = remote.remote(job, model_ref, [guide_ref], params_ref, args_ref, kwargs_ref, posterior)
        pending[ref] = shard
    return pending
