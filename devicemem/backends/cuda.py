"""CUDA GPUs: free memory per visible device (NVML, else torch) and torch's allocator stats.

torch's device ``i`` is found in NVML by its UUID (``torch.cuda.get_device_properties(i).uuid``,
which creates no CUDA context): CUDA may order GPUs fastest-first, skip GPUs NVML lists, or be a
MIG instance of a GPU, so NVML's index ``i`` can be another device. NVML answers without a
context; when it is missing or fails (library not found, GPU lost, no permission) the reading
degrades, with a log line, to ``torch.cuda.mem_get_info``, but only on devices that already
have a context and on the current device (where a run creates one anyway): elsewhere it would
create one (~0.5 GB each), so their free memory is left unknown.

What this process may allocate is the device's free memory, less the CUDA context it has yet to
create there, plus its own reusable cached blocks, within torch's per-process memory fraction
(``torch.cuda.set_per_process_memory_fraction`` or ``PYTORCH_CUDA_ALLOC_CONF``'s
``per_process_memory_fraction``). Peaks are read from reserved bytes: what the caching
allocator takes from the device, not the smaller allocated figure.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from devicemem.backends.base import Backend, DeviceMemory
from devicemem.backends.names import index_of
from devicemem.backends.probe import SystemProbe

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("devicemem.backends")

# Device memory a CUDA context takes (H100/H200 with CUDA 12's lazy module loading: ~0.5 GB).
CUDA_CONTEXT_BYTES = 512 << 20
ALLOC_CONF_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
# Out-of-memory errors that are not torch.OutOfMemoryError: the caching allocator's message, the
# CUDA runtime's (context creation, lazy kernel loading on a full GPU) and the libraries' own
# allocation failures (cuBLAS workspaces, cuDNN, cuFFT, cuSOLVER, cuSPARSE).
OOM_MESSAGES = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUFFT_ALLOC_FAILED",
    "CUSOLVER_STATUS_ALLOC_FAILED",
    "CUSPARSE_STATUS_ALLOC_FAILED",
)


def _text(value: str | bytes) -> str:
    """NVML strings: str from current nvidia-ml-py, bytes from old releases."""
    return value.decode() if isinstance(value, bytes) else value


def bare_uuid(uuid: object) -> str:
    """A GPU or MIG UUID without its ``GPU-``/``MIG-`` prefix, lower case (how torch prints it)."""
    text = _text(uuid) if isinstance(uuid, (str, bytes)) else str(uuid)
    for prefix in ("GPU-", "MIG-"):
        text = text.removeprefix(prefix)
    return text.lower()


def _handles_with_uuids(nvml: Any) -> list[tuple[Any, str]]:
    """Every GPU and MIG instance NVML knows, with its UUID."""
    found = []
    for index in range(nvml.nvmlDeviceGetCount()):
        gpu = nvml.nvmlDeviceGetHandleByIndex(index)
        found.append((gpu, _text(nvml.nvmlDeviceGetUUID(gpu))))
        try:
            slots = nvml.nvmlDeviceGetMaxMigDeviceCount(gpu)
        except nvml.NVMLError:  # not MIG-capable
            continue
        for slot in range(slots):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, slot)
            except nvml.NVMLError:  # empty slot
                continue
            found.append((mig, _text(nvml.nvmlDeviceGetUUID(mig))))
    return found


def nvml_handle(nvml: Any, uuid: str) -> Any:
    """The NVML handle of the GPU or MIG instance with this UUID (with or without its prefix):
    looked up directly, else matched against every GPU and MIG instance (drivers whose lookup
    does not know MIG UUIDs). LookupError when nothing matches, NVMLError when NVML fails."""
    bare = bare_uuid(uuid)
    for prefix in ("GPU-", "MIG-"):
        try:
            return nvml.nvmlDeviceGetHandleByUUID(prefix + bare)
        except nvml.NVMLError:
            pass
    matches = [handle for handle, known in _handles_with_uuids(nvml) if bare_uuid(known) == bare]
    if len(matches) != 1:
        raise LookupError(f"UUID {uuid} matches {len(matches)} NVML devices")
    return matches[0]


@dataclass(frozen=True)
class _Reading:
    name: str
    total: int
    free: int
    source: str


def _nvml_readings(probe: SystemProbe, uuids: list[str | None]) -> list[_Reading | None]:
    """NVML's reading of each torch device (by its UUID); None where NVML can't."""
    nvml = probe.nvml
    if nvml is None:
        logger.info("[MEMORY] nvidia-ml-py is not installed; reading GPU memory from torch.cuda.mem_get_info")
        return [None] * len(uuids)
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        logger.info("[MEMORY] NVML unavailable (%s); reading GPU memory from torch.cuda.mem_get_info", exc)
        return [None] * len(uuids)
    try:
        readings: list[_Reading | None] = []
        for index, uuid in enumerate(uuids):
            try:
                if uuid is None:
                    raise LookupError("torch reports no UUID for it")
                handle = nvml_handle(nvml, uuid)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = _text(nvml.nvmlDeviceGetName(handle))
                readings.append(_Reading(name, int(memory.total), int(memory.free), "nvml"))
            except (nvml.NVMLError, LookupError) as exc:
                logger.warning("[MEMORY] NVML cannot read cuda:%d (%s)", index, exc)
                readings.append(None)
        return readings
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as exc:
            logger.debug("[MEMORY] nvmlShutdown failed: %s", exc)


def has_context(torch: Any, index: int) -> bool:
    """Whether this process has a CUDA context on device ``index``: none before torch
    initialises CUDA; after, as the driver says (assumed when torch cannot ask)."""
    if not torch.cuda.is_initialized():
        return False
    has_primary = getattr(getattr(torch, "_C", None), "_cuda_hasPrimaryContext", None)
    return True if has_primary is None else bool(has_primary(index))


def _uuid(cuda: Any, index: int) -> str | None:
    try:
        return bare_uuid(cuda.get_device_properties(index).uuid)
    except (AttributeError, RuntimeError) as exc:
        logger.debug("[MEMORY] torch cannot tell cuda:%d's UUID: %s", index, exc)
        return None


def configured_fraction(environ: Mapping[str, str]) -> float | None:
    """``per_process_memory_fraction`` from PYTORCH_CUDA_ALLOC_CONF (or PYTORCH_ALLOC_CONF)."""
    for variable in ALLOC_CONF_VARIABLES:
        for option in environ.get(variable, "").split(","):
            key, _, value = option.partition(":")
            if key.strip() == "per_process_memory_fraction":
                try:
                    return float(value)
                except ValueError:
                    logger.warning("[MEMORY] %s: cannot read per_process_memory_fraction %r", variable, value)
    return None


def _fraction(probe: SystemProbe, index: int, initialized: bool) -> tuple[float, str] | None:
    """torch's per-process memory fraction on device ``index`` (the tighter of the environment's
    and torch's own, which asking would initialise CUDA for) and where it was set; None at 1."""
    found = []
    configured = configured_fraction(probe.environ)
    if configured is not None:
        found.append((configured, "PYTORCH_CUDA_ALLOC_CONF per_process_memory_fraction"))
    getter = getattr(probe.torch.cuda, "get_per_process_memory_fraction", None)
    if initialized and getter is not None:
        found.append((float(getter(index)), "torch.cuda per-process memory fraction"))
    value, source = min(found, default=(1.0, ""))
    return (value, f"{source} {value:g}") if value < 1.0 else None


class CudaBackend(Backend):
    """CUDA devices ``"cuda:0"``, ``"cuda:1"``... as torch numbers them.

    ``usable_bytes``: free memory, less :data:`CUDA_CONTEXT_BYTES` where this process has no
    context yet, plus its reusable cached blocks (``memory_reserved - memory_allocated``),
    within torch's per-process memory fraction. Listing devices creates no context where NVML
    answers (torch's UUID query initialises torch's CUDA state only).
    """

    kind = "cuda"

    def discover(self, probe: SystemProbe) -> list[DeviceMemory]:
        torch = probe.torch
        cuda = getattr(torch, "cuda", None)
        if cuda is None or not cuda.is_available():
            return []
        count = cuda.device_count()
        initialized = cuda.is_initialized()  # before the UUID query initialises it
        contexts = [has_context(torch, index) for index in range(count)]
        current = index_of(self.current_device(probe))
        readings = _nvml_readings(probe, [_uuid(cuda, index) for index in range(count)])
        found = []
        for index, reading in enumerate(readings):
            if reading is None and (contexts[index] or index == current):
                free, total = cuda.mem_get_info(index)  # creates the context: it is counted
                reading = _Reading(cuda.get_device_properties(index).name, int(total), int(free),
                                   "torch.cuda.mem_get_info")
                contexts[index] = True
            if reading is None:
                properties = cuda.get_device_properties(index)
                logger.warning(
                    "[MEMORY] cuda:%d's free memory is unknown: without NVML only torch.cuda.mem_get_info could read "
                    "it, and that would create a CUDA context there; install nvidia-ml-py", index,
                )
                found.append(DeviceMemory(f"cuda:{index}", properties.name, int(properties.total_memory),
                                          None, None, None, ()))
                continue
            found.append(self._memory(probe, index, reading, initialized, contexts[index]))
        return found

    def _memory(self, probe: SystemProbe, index: int, reading: _Reading, initialized: bool,
                context: bool) -> DeviceMemory:
        cuda = probe.torch.cuda
        reserved = int(cuda.memory_reserved(index)) if initialized else 0
        cached = reserved - int(cuda.memory_allocated(index)) if initialized else 0
        room = reading.free - (0 if context else CUDA_CONTEXT_BYTES)
        source = reading.source + ("+torch.cuda cache" if cached else "") + ("" if context else "-cuda context")
        limit, limit_sources = None, ()
        fraction = _fraction(probe, index, initialized)
        if fraction is not None:
            limit = int(fraction[0] * reading.total)
            room = min(room, limit - reserved)
            limit_sources = (fraction[1],)
        return DeviceMemory(
            device=f"cuda:{index}",
            name=reading.name,
            total_bytes=reading.total,
            free_bytes=reading.free,
            limit_bytes=limit,
            usable_bytes=max(room, 0) + cached,
            sources=(source,) + limit_sources,
        )

    def current_device(self, probe: SystemProbe) -> str:
        """What plain ``"cuda"`` means: torch's current device once CUDA is initialised,
        else ``"cuda:0"`` (asking would initialise CUDA)."""
        cuda = getattr(probe.torch, "cuda", None)
        if cuda is not None and cuda.is_available() and cuda.is_initialized():
            return f"cuda:{cuda.current_device()}"
        return "cuda:0"

    def torch_device(self, device: str) -> torch.device:
        import torch

        return torch.device("cuda", index_of(device))

    def reset_peak(self, device: str) -> None:
        """Start a peak window; before torch initialises CUDA there is nothing to reset."""
        cuda = self.probe.torch.cuda
        if cuda.is_initialized():
            cuda.reset_peak_memory_stats(index_of(device))

    def current_bytes(self, device: str) -> int | None:
        """Bytes torch's caching allocator holds on the device (reserved, not only allocated)."""
        return int(self.probe.torch.cuda.memory_reserved(index_of(device)))

    def peak_bytes(self, device: str) -> int | None:
        return int(self.probe.torch.cuda.max_memory_reserved(index_of(device)))

    def empty_cache(self, device: str) -> None:
        """Wait for the device's in-flight work (copies into host memory among it), collect
        garbage (tensors in reference cycles still hold their blocks), hand cached blocks back.
        A device without this process's context has nothing cached and is left alone."""
        torch = self.probe.torch
        index = index_of(device)
        if not has_context(torch, index):
            return
        with torch.cuda.device(index):
            try:
                torch.cuda.synchronize(index)
            except RuntimeError as exc:  # e.g. after "CUDA error: out of memory"
                logger.debug("[MEMORY] cannot synchronise %s before emptying its cache: %s", device, exc)
            gc.collect()
            torch.cuda.empty_cache()

    def is_oom(self, exc: BaseException) -> bool:
        """torch's OutOfMemoryError, or a RuntimeError with one of :data:`OOM_MESSAGES`."""
        oom_type = getattr(self.probe.torch, "OutOfMemoryError", None)
        if oom_type is not None and isinstance(exc, oom_type):
            return True
        return isinstance(exc, RuntimeError) and any(message in str(exc) for message in OOM_MESSAGES)
