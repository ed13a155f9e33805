"""The device record and the backend interface every kind of device implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from devicemem.backends.probe import SystemProbe


@dataclass(frozen=True)
class DeviceMemory:
    """What one device has and what this process may still allocate on it.

    ``usable_bytes`` is the tightest of every limit that applies (free memory, cgroup, SLURM,
    rlimit, user override); None means nothing could be read. ``limit_bytes`` is the size of
    the limit that leaves the least room (None when no limit applies). ``sources`` says where
    each number came from: the free-memory reading first (when ``free_bytes`` is known), then
    every limit, the one ``limit_bytes`` reports first, e.g. ``("psutil.virtual_memory",
    "cgroup-v1:/slurm/uid_1/job_2 (memory.limit_in_bytes)", "rlimit:RLIMIT_AS")``;
    ``devicemem.backends.limit_source`` picks out the limit's.

    ``cores`` is how many CPU cores this process may keep busy (host only; None elsewhere or
    when nothing could be read): the tightest of its CPU affinity, every cgroup CPU quota from
    its own cgroup to the root and SLURM's CPU allocation; ``cores_source`` says which, e.g.
    ``"affinity"``, ``"cgroup-v2:/slurm/job_2 (cpu.max)"``, ``"slurm:SLURM_CPUS_PER_TASK"``.
    """

    device: str
    name: str
    total_bytes: int | None
    free_bytes: int | None
    limit_bytes: int | None
    usable_bytes: int | None
    sources: tuple[str, ...]
    cores: int | None = None
    cores_source: str | None = None


class Backend(ABC):
    """One kind of device (``"cpu"``, ``"cuda"``, ``"mps"``...): how to find its memory and how
    to measure and recover memory while running on it. Devices of a kind are named
    ``kind`` or ``kind:index``."""

    kind: str

    def __init__(self, probe: SystemProbe | None = None) -> None:
        self._probe = probe

    @property
    def probe(self) -> SystemProbe:
        """The probe given at construction, else this process's real one."""
        if self._probe is not None:
            return self._probe
        from devicemem.backends.probe import SystemProbe

        return SystemProbe.default()

    @abstractmethod
    def discover(self, probe: SystemProbe) -> list[DeviceMemory]:
        """Every device of this kind visible to this process, with its memory readings."""

    @abstractmethod
    def torch_device(self, device: str) -> torch.device:
        """The torch device that tensors for ``device`` go to."""

    @abstractmethod
    def reset_peak(self, device: str) -> None:
        """Start a new peak-memory window on ``device``."""

    @abstractmethod
    def current_bytes(self, device: str) -> int | None:
        """Memory this process holds on ``device`` now (RSS for the host, reserved by the caching allocator for CUDA)."""

    @abstractmethod
    def peak_bytes(self, device: str) -> int | None:
        """High-water mark of ``current_bytes`` since the last ``reset_peak``."""

    @abstractmethod
    def empty_cache(self, device: str) -> None:
        """Hand cached, unused blocks back (after an OOM, outside the ``except`` block)."""

    @abstractmethod
    def is_oom(self, exc: BaseException) -> bool:
        """Whether ``exc`` is this kind's out-of-memory error."""


def limit_source(memory: DeviceMemory) -> str | None:
    """Where ``memory.limit_bytes`` came from (None when no limit applies)."""
    if memory.limit_bytes is None:
        return None
    limits = memory.sources[1:] if memory.free_bytes is not None else memory.sources
    return limits[0] if limits else None
