"""CUDA GPUs: free memory per visible device (NVML, else torch) and torch's allocator stats.

NVML numbers GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES, so torch's index ``i`` is
mapped through the i-th CUDA_VISIBLE_DEVICES entry (an index, a GPU-UUID or a MIG-UUID) to
the NVML handle. NVML answers without creating a CUDA context; when it is missing or fails
(library not found, GPU lost, no permission) the reading degrades, with a log line, to
``torch.cuda.mem_get_info``, which creates one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping

from devicemem.backends.base import Backend, DeviceMemory
from devicemem.backends.probe import SystemProbe

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("devicemem.backends")

_Reading = tuple[str, int, int]  # name, total bytes, free bytes


def _text(value: str | bytes) -> str:
    """NVML strings: str from current nvidia-ml-py, bytes from old releases."""
    return value.decode() if isinstance(value, bytes) else value


def visible_entries(environ: Mapping[str, str]) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list of entries; None when unset (every GPU, NVML order)."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [entry.strip() for entry in value.split(",") if entry.strip()]


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


def nvml_handle(nvml: Any, entry: str) -> Any:
    """The NVML handle for one CUDA_VISIBLE_DEVICES entry.

    Integers are NVML indices; "GPU-..." and "MIG-..." are UUIDs, looked up directly and else
    matched (as CUDA does, a unique prefix is enough) against every GPU and MIG instance.
    Raises LookupError when nothing matches, NVMLError when NVML fails.
    """
    if entry.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(entry))
    if not entry.startswith(("GPU-", "MIG-")):
        raise LookupError(f"CUDA_VISIBLE_DEVICES entry {entry!r} is not an index, GPU-UUID or MIG-UUID")
    try:
        return nvml.nvmlDeviceGetHandleByUUID(entry)
    except nvml.NVMLError:
        pass
    matches = [handle for handle, uuid in _handles_with_uuids(nvml) if uuid.startswith(entry)]
    if len(matches) != 1:
        raise LookupError(f"CUDA_VISIBLE_DEVICES entry {entry!r} matches {len(matches)} NVML devices")
    return matches[0]


def _nvml_readings(probe: SystemProbe, count: int) -> list[_Reading | None]:
    """(name, total, free) from NVML for torch's devices 0..count-1; None where NVML can't."""
    nvml = probe.nvml
    if nvml is None:
        logger.info("[MEMORY] nvidia-ml-py is not installed; reading GPU memory from torch.cuda.mem_get_info")
        return [None] * count
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        logger.info("[MEMORY] NVML unavailable (%s); reading GPU memory from torch.cuda.mem_get_info", exc)
        return [None] * count
    try:
        entries = visible_entries(probe.environ)
        readings: list[_Reading | None] = []
        for index in range(count):
            try:
                if entries is not None and index >= len(entries):
                    raise LookupError(f"CUDA_VISIBLE_DEVICES has no entry {index}")
                handle = nvml_handle(nvml, str(index) if entries is None else entries[index])
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = _text(nvml.nvmlDeviceGetName(handle))
                readings.append((name, int(memory.total), int(memory.free)))
            except (nvml.NVMLError, LookupError) as exc:
                logger.warning(
                    "[MEMORY] NVML cannot read cuda:%d (%s); reading it from torch.cuda.mem_get_info",
                    index, exc,
                )
                readings.append(None)
        return readings
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as exc:
            logger.debug("[MEMORY] nvmlShutdown failed: %s", exc)


def _index(device: str) -> int:
    return int(device.partition(":")[2] or 0)


class CudaBackend(Backend):
    """CUDA devices ``"cuda:0"``, ``"cuda:1"``... as torch numbers them.

    ``usable_bytes`` is the device's free memory plus this process's reusable cached blocks
    (``memory_reserved - memory_allocated``, counted only once torch has initialised CUDA);
    listing devices does not initialise CUDA when NVML answers.
    """

    kind = "cuda"

    def discover(self, probe: SystemProbe) -> list[DeviceMemory]:
        cuda = getattr(probe.torch, "cuda", None)
        if cuda is None or not cuda.is_available():
            return []
        count = cuda.device_count()
        initialized = cuda.is_initialized()
        found = []
        for index, reading in enumerate(_nvml_readings(probe, count)):
            if reading is not None:
                name, total, free = reading
                source = "nvml"
            else:
                free, total = cuda.mem_get_info(index)
                name = cuda.get_device_properties(index).name
                source = "torch.cuda.mem_get_info"
            cached = cuda.memory_reserved(index) - cuda.memory_allocated(index) if initialized else 0
            found.append(
                DeviceMemory(
                    device=f"cuda:{index}",
                    name=name,
                    total_bytes=int(total),
                    free_bytes=int(free),
                    limit_bytes=None,
                    usable_bytes=int(free) + int(cached),
                    sources=(f"{source}+torch.cuda cache" if cached else source,),
                )
            )
        return found

    def current_device(self, probe: SystemProbe) -> str:
        """What plain ``"cuda"`` means: torch's current device once CUDA is initialised,
        else ``"cuda:0"`` (asking would initialise CUDA)."""
        cuda = getattr(probe.torch, "cuda", None)
        if cuda is not None and cuda.is_available() and cuda.is_initialized():
            return f"cuda:{cuda.current_device()}"
        return "cuda:0"

    def torch_device(self, device: str) -> torch.device:
        import torch

        return torch.device("cuda", _index(device))

    def reset_peak(self, device: str) -> None:
        self.probe.torch.cuda.reset_peak_memory_stats(_index(device))

    def current_bytes(self, device: str) -> int | None:
        return int(self.probe.torch.cuda.memory_allocated(_index(device)))

    def peak_bytes(self, device: str) -> int | None:
        return int(self.probe.torch.cuda.max_memory_allocated(_index(device)))

    def empty_cache(self, device: str) -> None:
        cuda = self.probe.torch.cuda
        with cuda.device(_index(device)):
            cuda.empty_cache()

    def is_oom(self, exc: BaseException) -> bool:
        oom_type = getattr(self.probe.torch, "OutOfMemoryError", None)
        if oom_type is not None and isinstance(exc, oom_type):
            return True
        return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)
