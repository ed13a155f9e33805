"""Every read the device backends make of the OS, NVML and torch, bundled so tests can fake it.

Production code builds the real probe with :meth:`SystemProbe.default`; tests build one over a
``tmp_path`` tree (``root``), a plain dict (``environ``) and fake modules. Nothing here, or in
the backends, monkeypatches globals.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping

logger = logging.getLogger("devicemem.backends")


def _none() -> None:
    return None


def _import_or_none(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except Exception as exc:  # a broken install must degrade like a missing one
        logger.debug("[MEMORY] cannot import %s (%s); continuing without it", name, exc)
        return None


@dataclass(frozen=True)
class SystemProbe:
    """Where the backends read memory facts from.

    - ``root``: file-system root for ``/proc`` and ``/sys`` (a ``tmp_path`` tree in tests).
    - ``environ``: the environment (SLURM_*, CUDA_VISIBLE_DEVICES, DEVICEMEM_MAX_MEMORY...).
    - ``psutil``: the psutil module, or None when it cannot be imported.
    - ``nvml``: the ``pynvml`` module (from nvidia-ml-py), or None.
    - ``torch_loader``: returns the torch module (or a fake with the same ``cuda``, ``mps``,
      ``backends.mps`` and ``OutOfMemoryError`` attributes), or None; called at most once, on
      first use of :attr:`torch`, because importing torch takes seconds.
    - ``getrlimit``: ``resource.getrlimit``, or None where the platform has no rlimits.
    - ``pid``: the process to read in ``/proc`` and psutil; None means this process
      (``/proc/self``).
    - ``affinity``: the CPUs this process may run on (``os.sched_getaffinity``), or None where
      the platform cannot say.
    - ``cpu_count``: the machine's logical CPUs (``os.cpu_count``), or None.
    - ``listing``: devices (``DeviceMemory`` records) to report as they are instead of asking
      the backends: tests, and planning for another machine (``bayesdream-ext plan --assume``).
    """

    root: Path = Path("/")
    environ: Mapping[str, str] = field(default_factory=dict)
    psutil: Any = None
    nvml: Any = None
    torch_loader: Callable[[], Any] = _none
    getrlimit: Callable[[int], tuple[int, int]] | None = None
    pid: int | None = None
    affinity: Callable[[], set[int]] | None = None
    cpu_count: Callable[[], int | None] = _none
    listing: tuple[Any, ...] | None = None

    @classmethod
    def default(cls) -> SystemProbe:
        """The real probe: this machine's files, ``os.environ``, psutil, pynvml, torch (lazily).

        One shared instance, so torch is imported at most once and only when a CUDA or MPS
        reading needs it.
        """
        return _default_probe()

    @cached_property
    def torch(self) -> Any:
        """The torch module (or its fake), loaded on first use; None without torch."""
        return self.torch_loader()

    def proc(self, name: str) -> Path:
        """Path of ``/proc/<pid or self>/<name>`` under ``root``."""
        return self.root / "proc" / ("self" if self.pid is None else str(self.pid)) / name

    def read_text(self, path: Path) -> str | None:
        """Contents of ``path``, or None when it cannot be read."""
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError):
            return None

    def read_kv(self, path: Path) -> dict[str, str]:
        """A ``key: value`` or ``key value`` file (/proc/meminfo, /proc/self/status,
        memory.stat) as a dict; empty when it cannot be read."""
        text = self.read_text(path)
        result: dict[str, str] = {}
        for line in (text or "").splitlines():
            parts = line.replace(":", " ", 1).split(None, 1)
            if parts:
                result[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
        return result

    def status_bytes(self, key: str) -> int | None:
        """A ``kB`` field of ``/proc/<pid>/status`` (VmRSS, VmHWM, VmSize, VmData) in bytes."""
        return kib_field(self.read_kv(self.proc("status")), key)

    def rss_bytes(self) -> int | None:
        """This process's resident set size: /proc status VmRSS, else psutil, else None."""
        rss = self.status_bytes("VmRSS")
        if rss is None and self.psutil is not None:
            try:
                rss = int(self.psutil.Process(self.pid).memory_info().rss)
            except Exception as exc:
                logger.debug("[MEMORY] psutil cannot read RSS: %s", exc)
        return rss


def kib_field(fields: Mapping[str, str], key: str) -> int | None:
    """``"123 kB"`` in a /proc key-value dict as bytes; None when absent or malformed."""
    value = fields.get(key, "").split()
    if not value or not value[0].isdigit():
        return None
    return int(value[0]) * 1024


def _load_torch() -> Any:
    return _import_or_none("torch")


@functools.lru_cache(maxsize=None)
def _default_probe() -> SystemProbe:
    try:
        import resource

        getrlimit: Callable[[int], tuple[int, int]] | None = resource.getrlimit
    except ImportError:
        getrlimit = None
    return SystemProbe(
        root=Path("/"),
        environ=os.environ,
        psutil=_import_or_none("psutil"),
        nvml=_import_or_none("pynvml"),
        torch_loader=_load_torch,
        getrlimit=getrlimit,
        affinity=(lambda: os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        cpu_count=os.cpu_count,
    )
