"""Fakes for devicemem.backends tests: /proc and /sys trees, psutil, NVML and torch.cuda."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

from devicemem.backends.probe import SystemProbe

GiB = 1 << 30
MiB = 1 << 20


def write_tree(root: Path, files: Mapping[str, str | int]) -> Path:
    """Create ``root/<path>`` with each content; returns ``root``."""
    for path, content in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"{content}\n")
    return root


def meminfo(total: int, available: int) -> str:
    return f"MemTotal:       {total // 1024} kB\nMemFree:        {available // 2048} kB\nMemAvailable:   {available // 1024} kB\n"


def status(**fields: int) -> str:
    """/proc/self/status with the given fields in bytes, e.g. status(VmRSS=100 * MiB)."""
    return "Name:\tpython\n" + "".join(f"{key}:\t{value // 1024} kB\n" for key, value in fields.items())


def fake_psutil(total: int, available: int, rss: int = 0, vms: int = 0) -> Any:
    process = SimpleNamespace(memory_info=lambda: SimpleNamespace(rss=rss, vms=vms))
    return SimpleNamespace(
        virtual_memory=lambda: SimpleNamespace(total=total, available=available),
        Process=lambda pid=None: process,
    )


def probe(root: Path, *, environ: Mapping[str, str] | None = None, rlimits: Mapping[int, int] | None = None,
          psutil: Any = None, nvml: Any = None, torch: Any = None, affinity: set[int] | None = None,
          cpu_count: int | None = None) -> SystemProbe:
    """A probe over the tree at ``root``; ``rlimits`` maps resource -> soft limit (else none);
    ``affinity`` the CPUs the process may run on (None: the platform cannot say)."""
    limits = dict(rlimits or {})
    return SystemProbe(
        root=root,
        environ=dict(environ or {}),
        psutil=psutil,
        nvml=nvml,
        torch_loader=lambda: torch,
        getrlimit=lambda which: (limits.get(which, -1), -1),
        affinity=None if affinity is None else (lambda: set(affinity)),
        cpu_count=lambda: cpu_count,
    )


# --- NVML --------------------------------------------------------------------------------


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_GpuIsLost(NVMLError):
    pass


@dataclass
class FakeGpu:
    uuid: str
    name: str
    total: int
    free: int
    migs: list[FakeGpu] = field(default_factory=list)
    lost: bool = False


class FakeNvml:
    """The pynvml calls devicemem makes, over a list of GPUs in NVML (PCI) order.

    ``uuid_lookup_finds_mig=False`` mimics drivers whose nvmlDeviceGetHandleByUUID does not
    know MIG UUIDs, forcing the MIG scan.
    """

    NVMLError = NVMLError

    def __init__(self, gpus: list[FakeGpu], *, init_error: Exception | None = None,
                 uuid_lookup_finds_mig: bool = True) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.uuid_lookup_finds_mig = uuid_lookup_finds_mig
        self.initialized = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self.initialized -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        if not 0 <= index < len(self.gpus):
            raise NVMLError("Invalid Argument")
        return self.gpus[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeGpu:
        candidates = list(self.gpus)
        if self.uuid_lookup_finds_mig:
            candidates += [mig for gpu in self.gpus for mig in gpu.migs]
        for gpu in candidates:
            if gpu.uuid == uuid:
                return gpu
        raise NVMLError("Not Found")

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeGpu) -> bytes:
        return handle.name.encode()  # old nvidia-ml-py releases return bytes

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> Any:
        if handle.lost:
            raise NVMLError_GpuIsLost("GPU is lost")
        return SimpleNamespace(total=handle.total, free=handle.free, used=handle.total - handle.free)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeGpu) -> int:
        if not handle.migs:
            raise NVMLError("Not Supported")
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeGpu, index: int) -> FakeGpu:
        if index >= len(handle.migs):
            raise NVMLError("Not Found")
        return handle.migs[index]


# --- torch -------------------------------------------------------------------------------


class FakeOutOfMemoryError(RuntimeError):
    pass


class FakeCuda:
    """torch.cuda as torch numbers the visible devices; records context-creating calls and
    allocator reads. ``uuids``: each device's UUID as torch prints it (no ``GPU-`` prefix);
    ``contexts``: the devices this process has a CUDA context on; ``fraction``: what
    ``get_per_process_memory_fraction`` answers."""

    def __init__(self, devices: list[tuple[str, int, int]], *, initialized: bool = False,
                 reserved: int = 0, allocated: int = 0, current: int = 0, uuids: list[str] | None = None,
                 contexts: set[int] | None = None, fraction: float = 1.0) -> None:
        self.devices = devices  # (name, total, free) per torch index
        self.initialized = initialized
        self.reserved = reserved
        self.allocated = allocated
        self.current = current
        self.uuids = uuids
        self.contexts = set(range(len(devices)) if initialized and contexts is None else contexts or ())
        self.fraction = fraction
        self.calls: list[tuple[str, Any]] = []

    def is_available(self) -> bool:
        return bool(self.devices)

    def device_count(self) -> int:
        return len(self.devices)

    def is_initialized(self) -> bool:
        return self.initialized

    def current_device(self) -> int:
        return self.current

    def mem_get_info(self, index: int) -> tuple[int, int]:
        self.calls.append(("mem_get_info", index))
        self.initialized = True
        self.contexts.add(index)
        _, total, free = self.devices[index]
        return free, total

    def get_device_properties(self, index: int) -> Any:
        self.initialized = True  # torch's lazy init: no context
        uuid = self.uuids[index] if self.uuids is not None else f"00000000-0000-0000-0000-{index:012d}"
        return SimpleNamespace(name=self.devices[index][0], total_memory=self.devices[index][1], uuid=uuid)

    def get_per_process_memory_fraction(self, index: int) -> float:
        return self.fraction

    def memory_reserved(self, index: int) -> int:
        self.calls.append(("memory_reserved", index))
        return self.reserved

    def memory_allocated(self, index: int) -> int:
        self.calls.append(("memory_allocated", index))
        return self.allocated

    def max_memory_reserved(self, index: int) -> int:
        self.calls.append(("max_memory_reserved", index))
        return self.reserved * 2

    def reset_peak_memory_stats(self, index: int) -> None:
        if not self.initialized:
            raise RuntimeError("Invalid device argument : did you call init?")  # as torch does
        self.calls.append(("reset_peak_memory_stats", index))

    def synchronize(self, index: int) -> None:
        self.calls.append(("synchronize", index))

    def device(self, index: int) -> Any:
        calls = self.calls

        class _Guard:
            def __enter__(self) -> None:
                calls.append(("device", index))

            def __exit__(self, *exc: Any) -> None:
                calls.append(("device-exit", index))

        return _Guard()

    def empty_cache(self) -> None:
        self.calls.append(("empty_cache", None))


def fake_torch(cuda: FakeCuda | None = None, mps: Any = None) -> Any:
    cuda = cuda if cuda is not None else FakeCuda([])
    return SimpleNamespace(
        cuda=cuda,
        _C=SimpleNamespace(_cuda_hasPrimaryContext=lambda index: index in cuda.contexts),
        backends=SimpleNamespace(mps=SimpleNamespace(is_available=lambda: mps is not None)),
        mps=mps,
        OutOfMemoryError=FakeOutOfMemoryError,
    )
