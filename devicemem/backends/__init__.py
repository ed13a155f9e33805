"""Devices and their memory: which devices this process sees and how much it may allocate.

Each kind of device (``cpu``, ``cuda``, ``mps``, or one added with :func:`register_backend`)
has a :class:`Backend` (:mod:`devicemem.backends.registry`); a :class:`MemoryView`
(:mod:`devicemem.backends.view`) is one reading of them all with the user's caps
(``max_memory`` argument, ``DEVICEMEM_MAX_MEMORY`` environment variable) applied as one more
limit, taken once per call. :func:`devices` and :func:`device_memory` are that reading for
people: every device, or one.

``DeviceMemory.sources`` lists the free-memory reading first (when there is one), then every
limit that applies, the one ``limit_bytes`` reports first; :func:`limit_source` reads it.
"""

from __future__ import annotations

from typing import Any

from devicemem.backends.base import Backend, DeviceMemory, limit_source
from devicemem.backends.names import HOST
from devicemem.backends.probe import SystemProbe
from devicemem.backends.registry import get_backend, register_backend, split_device
from devicemem.backends.view import MAX_MEMORY_ENV, Caps, MaxMemory, MemoryView, budget, parse_max_memory

__all__ = [
    "Backend",
    "Caps",
    "DeviceMemory",
    "HOST",
    "MAX_MEMORY_ENV",
    "MemoryView",
    "SystemProbe",
    "budget",
    "device_memory",
    "devices",
    "get_backend",
    "limit_source",
    "parse_max_memory",
    "register_backend",
    "split_device",
]


def devices(max_memory: MaxMemory = None, probe: SystemProbe | None = None) -> list[DeviceMemory]:
    """Every device this process sees, cpu first, then cuda:0, cuda:1..., then mps."""
    return list(MemoryView.read(max_memory, probe).devices)


def device_memory(device: Any, max_memory: MaxMemory = None, probe: SystemProbe | None = None) -> DeviceMemory:
    """Memory of one device: "cpu", "cuda" (the current CUDA device), "cuda:1", "mps" or a
    ``torch.device``; only that kind's backend is asked. ValueError, listing the devices this
    process sees, for any other."""
    kind, _ = split_device(str(device), "device")
    try:
        return MemoryView.read(max_memory, probe, [kind]).find(device)
    except ValueError:
        return MemoryView.read(max_memory, probe).find(device)  # raises, naming every device there is
