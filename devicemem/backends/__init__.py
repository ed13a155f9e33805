"""The device memory registry: which devices this process sees and how much it may allocate.

Each kind of device (``cpu``, ``cuda``, ``mps``, or one added with :func:`register_backend`)
has a :class:`Backend`; :func:`devices` and :func:`device_memory` ask them and then apply the
user's override (``max_memory`` argument, ``DEVICEMEM_MAX_MEMORY`` environment variable) as
one more limit.

``DeviceMemory.sources`` lists the free-memory reading first (when there is one), then every
limit that applies, the one ``limit_bytes`` reports first; :func:`limit_source` reads it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

from devicemem.backends.base import Backend, DeviceMemory
from devicemem.backends.cuda import CudaBackend
from devicemem.backends.host import CpuBackend
from devicemem.backends.mps import MpsBackend
from devicemem.backends.names import HOST, is_kind, kind_of, split_name
from devicemem.backends.probe import SystemProbe
from devicemem.units import parse_bytes

__all__ = [
    "Backend",
    "DeviceMemory",
    "HOST",
    "MAX_MEMORY_ENV",
    "SystemProbe",
    "device_memory",
    "devices",
    "get_backend",
    "limit_source",
    "parse_max_memory",
    "register_backend",
]

logger = logging.getLogger("devicemem.backends")

MAX_MEMORY_ENV = "DEVICEMEM_MAX_MEMORY"
_PAIRS_FORM = "comma-separated device=size pairs, e.g. cpu=8GiB,cuda:0=20GiB"
_DICT_FORM = 'a dict like {"cpu": "8GiB", "cuda:0": "20GiB"}'

_BACKENDS: dict[str, Backend] = {HOST: CpuBackend(), "cuda": CudaBackend(), "mps": MpsBackend()}

Overrides = dict[str, tuple[int, str]]
MaxMemory = Mapping[Any, Any] | str | None


def register_backend(name: str, backend: Backend) -> None:
    """Add (or replace) the backend for devices named ``name`` or ``name:<index>``."""
    if not isinstance(backend, Backend):
        raise TypeError(
            f"register_backend: backend must be a devicemem.backends.Backend; got {type(backend).__name__}"
        )
    if not is_kind(name):
        raise ValueError(f"register_backend: name must be a lower-case kind like 'xpu'; got {name!r}")
    if getattr(backend, "kind", name) != name:
        raise ValueError(f"register_backend: name {name!r} differs from the backend's kind {backend.kind!r}")
    _BACKENDS[name] = backend


def split_device(device: str, what: str) -> tuple[str, int | None]:
    """("cuda", 1) for "cuda:1", ("cpu", None) for "cpu"; ValueError naming ``what`` and the
    registered kinds."""
    return split_name(device, what, _BACKENDS)


def get_backend(device: Any) -> Backend:
    """The backend for ``device`` ("cuda:1", "cpu", a ``torch.device``...), by its kind."""
    name = str(device)
    kind, _ = split_device(name, "device")
    backend = _BACKENDS.get(kind)
    if backend is None:
        raise ValueError(
            f"unknown device kind {kind!r} in {name!r}; known kinds: {', '.join(_BACKENDS)} "
            "(register_backend adds more)"
        )
    return backend


def _parse_pairs(text: str, what: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{what}: could not read {item.strip()!r}; expected {_PAIRS_FORM}")
        pairs.append((key.strip(), value.strip()))
    return pairs


def parse_max_memory(max_memory: MaxMemory, environ: Mapping[str, str]) -> Overrides:
    """The user's caps by device or kind -> (bytes, source); ``max_memory`` entries win over
    ``DEVICEMEM_MAX_MEMORY`` ones for the same key. ValueError for bad keys or sizes.

    ``max_memory`` is a dict like ``{"cpu": "8GiB", "cuda:0": 20e9}`` or the same as a string,
    ``"cpu=8GiB,cuda:0=20GB"``; a bare kind ("cuda") caps every device of that kind.
    """
    env_pairs = _parse_pairs(environ.get(MAX_MEMORY_ENV, ""), MAX_MEMORY_ENV)
    named: list[tuple[str, Any, str]] = [(key, value, MAX_MEMORY_ENV) for key, value in env_pairs]
    if isinstance(max_memory, str):
        max_memory = dict(_parse_pairs(max_memory, "max_memory"))
    if max_memory is not None:
        if not isinstance(max_memory, Mapping):
            raise ValueError(
                f"max_memory: expected {_DICT_FORM} or {_PAIRS_FORM}; got {type(max_memory).__name__}"
            )
        named += [(str(key), value, "max_memory") for key, value in max_memory.items()]
    overrides: Overrides = {}
    for key, value, origin in named:
        kind, index = split_device(key, origin)
        if kind not in _BACKENDS:
            raise ValueError(
                f"{origin}: unknown device {key!r}; expected a kind ({', '.join(_BACKENDS)}) or kind:index, e.g. cuda:0"
            )
        size = parse_bytes(value, f"{origin}[{key!r}]")
        overrides[kind if index is None else f"{kind}:{index}"] = (size, f"override:{origin}")
    return overrides


def limit_source(memory: DeviceMemory) -> str | None:
    """Where ``memory.limit_bytes`` came from (None when no limit applies)."""
    if memory.limit_bytes is None:
        return None
    limits = memory.sources[1:] if memory.free_bytes is not None else memory.sources
    return limits[0] if limits else None


def _with_override(memory: DeviceMemory, cap: int, source: str) -> DeviceMemory:
    """``memory`` with one more limit of ``cap`` bytes (a budget: no usage is subtracted).

    The record keeps no room per limit, so an override binds, and is reported as the limit,
    when it is at most the usable figure; otherwise it is listed last.
    """
    binds = memory.usable_bytes is None or memory.limit_bytes is None or cap <= memory.usable_bytes
    free_sources = memory.sources[:1] if memory.free_bytes is not None else ()
    limit_sources = memory.sources[len(free_sources):]
    return dataclasses.replace(
        memory,
        limit_bytes=cap if binds else memory.limit_bytes,
        usable_bytes=cap if memory.usable_bytes is None else min(cap, memory.usable_bytes),
        sources=free_sources + ((source,) + limit_sources if binds else limit_sources + (source,)),
    )


def _discover(backend: Backend, probe: SystemProbe) -> list[DeviceMemory]:
    try:
        return backend.discover(probe)
    except Exception as exc:  # one broken backend must not hide the other devices
        logger.warning(
            "[MEMORY] cannot list %s devices (%s: %s); leaving them out", backend.kind, type(exc).__name__, exc
        )
        return []


def _find(kinds: list[str], overrides: Overrides, probe: SystemProbe) -> list[DeviceMemory]:
    found: list[DeviceMemory] = []
    for kind in kinds:
        for memory in _discover(_BACKENDS[kind], probe):
            cap = overrides.get(memory.device) or overrides.get(kind)
            found.append(memory if cap is None else _with_override(memory, *cap))
    names = {memory.device for memory in found}
    for key, (_, origin) in overrides.items():
        if key not in names and key not in _BACKENDS and kind_of(key) in kinds:
            logger.warning(
                "[MEMORY] %s names %s, which this process does not see (it sees %s); ignoring it",
                origin.removeprefix("override:"), key, ", ".join(sorted(names)) or "none",
            )
    return found


def devices(
    max_memory: MaxMemory = None, probe: SystemProbe | None = None
) -> list[DeviceMemory]:
    """Every device this process sees, cpu first, then cuda:0, cuda:1..., then mps."""
    probe = probe if probe is not None else SystemProbe.default()
    overrides = parse_max_memory(max_memory, probe.environ)
    return _find(list(_BACKENDS), overrides, probe)


def device_memory(
    device: Any, max_memory: MaxMemory = None, probe: SystemProbe | None = None
) -> DeviceMemory:
    """Memory of one device: "cpu", "cuda" (the current CUDA device), "cuda:1", "mps" or a
    ``torch.device``. ValueError, listing the devices this process sees, for any other.

    A bare kind means the backend's ``current_device(probe)`` where it defines one, else its
    first device.
    """
    probe = probe if probe is not None else SystemProbe.default()
    overrides = parse_max_memory(max_memory, probe.environ)
    name = str(device)
    kind, index = split_device(name, "device")
    backend = _BACKENDS.get(kind)
    current = backend.current_device(probe) if index is None and hasattr(backend, "current_device") else None
    found = _find([kind], overrides, probe) if backend is not None else []  # may initialise torch's CUDA
    if current is not None:
        wanted = current
    elif index is None and found:
        wanted = found[0].device
    else:
        wanted = f"{kind}:{index}"
    for memory in found:
        if memory.device == wanted or (index == 0 and memory.device == kind):
            return memory
    seen = ", ".join(memory.device for memory in devices(probe=probe)) or "none"
    problem = "is not a known kind" if backend is None else "is not visible to this process"
    kinds = ", ".join(_BACKENDS)
    raise ValueError(f"device {name!r} {problem}; this process sees: {seen} (known kinds: {kinds})")
