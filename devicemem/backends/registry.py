"""The backend registry: which :class:`Backend` serves each kind of device, and the one place
that asks them what devices there are (:func:`discover`).

Each kind (``cpu``, ``cuda``, ``mps``, or one added with :func:`register_backend`) has one
backend; :func:`get_backend` finds it from any device name.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from devicemem.backends.base import Backend, DeviceMemory
from devicemem.backends.cuda import CudaBackend
from devicemem.backends.host import CpuBackend
from devicemem.backends.mps import MpsBackend
from devicemem.backends.names import HOST, is_kind, kind_of, split_name
from devicemem.backends.probe import SystemProbe

logger = logging.getLogger("devicemem.backends")

_BACKENDS: dict[str, Backend] = {HOST: CpuBackend(), "cuda": CudaBackend(), "mps": MpsBackend()}


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


def kinds() -> list[str]:
    """The registered kinds, in registration order (cpu, cuda, mps, then added ones)."""
    return list(_BACKENDS)


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


def is_oom_anywhere(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error of any registered kind of device."""
    return any(backend.is_oom(exc) for backend in list(_BACKENDS.values()))


def _discover(backend: Backend, probe: SystemProbe) -> list[DeviceMemory]:
    try:
        return backend.discover(probe)
    except Exception as exc:  # one broken backend must not hide the other devices
        logger.warning(
            "[MEMORY] cannot list %s devices (%s: %s); leaving them out", backend.kind, type(exc).__name__, exc
        )
        return []


def discover(wanted: Iterable[str], probe: SystemProbe) -> tuple[list[DeviceMemory], dict[str, str]]:
    """(every device of the ``wanted`` kinds, in registry order; what each bare kind means, e.g.
    {"cuda": "cuda:0"}), as ``probe`` reads them: the backends ask the machine, or a probe
    with a ``listing`` gives its devices as they are."""
    chosen = [kind for kind in _BACKENDS if kind in set(wanted)]
    if probe.listing is not None:
        found = [memory for memory in probe.listing if kind_of(memory.device) in chosen]
        return found, {}
    current = {  # asked first: listing CUDA devices initialises torch's CUDA state
        kind: _BACKENDS[kind].current_device(probe) for kind in chosen if hasattr(_BACKENDS[kind], "current_device")
    }
    return [memory for kind in chosen for memory in _discover(_BACKENDS[kind], probe)], current
