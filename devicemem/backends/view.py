"""One reading of this process's devices, taken once per call: what a call plans, admits and
falls back against.

:class:`MemoryView` holds every device's :class:`DeviceMemory` with the user's caps applied
as one more limit (``max_memory``, parsed once into :class:`Caps`, and
``DEVICEMEM_MAX_MEMORY``, read with the machine), the environment it was read with, and the
rules every planner shares: the budget (:meth:`MemoryView.budget`: safety factor x usable)
and the device pick (:meth:`MemoryView.candidates`: ``"auto"`` is the GPU with the most
usable memory, then the host). Taking one view per call means one call is never judged
against two readings (the plan against one, the admission of its results against another).

The machine is read through a :class:`SystemProbe`, the one way tests fake it: a probe over a
``tmp_path`` tree with fake modules, or one whose ``listing`` gives the devices as they are.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, TypeVar

from devicemem.backends.base import DeviceMemory
from devicemem.backends.names import HOST, device_name, kind_of
from devicemem.backends.probe import SystemProbe
from devicemem.backends.registry import discover, get_backend, kinds, split_device
from devicemem.recovery import freeing, retries
from devicemem.units import parse_bytes

logger = logging.getLogger("devicemem.backends")

MAX_MEMORY_ENV = "DEVICEMEM_MAX_MEMORY"
_PAIRS_FORM = "comma-separated device=size pairs, e.g. cpu=8GiB,cuda:0=20GiB"
_DICT_FORM = 'a dict like {"cpu": "8GiB", "cuda:0": "20GiB"}'

Overrides = dict[str, tuple[int, str]]
MaxMemory = Mapping[Any, Any] | str | None
T = TypeVar("T")
_NEXT = object()  # the state that hands a candidate's work on to the next candidate


@dataclass(frozen=True)
class Caps:
    """Caps by device or kind, parsed once: ``{"cpu": (bytes, "override:max_memory"), ...}``."""

    by_device: Mapping[str, tuple[int, str]] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, max_memory: MaxMemory | Caps, origin: str = "max_memory") -> Caps:
        """``max_memory`` (a dict like ``{"cpu": "8GiB", "cuda:0": 20e9}``, the same as a
        string ``"cpu=8GiB,cuda:0=20GB"``, None, or Caps already parsed); ValueError naming
        ``origin`` for bad keys or sizes. A bare kind ("cuda") caps every device of that kind."""
        if isinstance(max_memory, Caps):
            return max_memory
        if isinstance(max_memory, str):
            max_memory = dict(_parse_pairs(max_memory, origin))
        if max_memory is None:
            return cls()
        if not isinstance(max_memory, Mapping):
            raise ValueError(f"{origin}: expected {_DICT_FORM} or {_PAIRS_FORM}; got {type(max_memory).__name__}")
        caps: Overrides = {}
        for key, value in max_memory.items():
            kind, index = split_device(str(key), origin)
            if kind not in kinds():
                raise ValueError(
                    f"{origin}: unknown device {str(key)!r}; expected a kind ({', '.join(kinds())}) or kind:index, "
                    "e.g. cuda:0"
                )
            caps[kind if index is None else f"{kind}:{index}"] = (parse_bytes(value, f"{origin}[{str(key)!r}]"),
                                                                  f"override:{origin}")
        return cls(caps)

    @classmethod
    def of_environment(cls, environ: Mapping[str, str]) -> Caps:
        """The caps ``DEVICEMEM_MAX_MEMORY`` sets in ``environ``."""
        return cls.parse(environ.get(MAX_MEMORY_ENV) or None, MAX_MEMORY_ENV)

    def under(self, other: Caps) -> Caps:
        """These caps with ``other``'s added, ``other`` winning for the same key."""
        return Caps({**self.by_device, **other.by_device})

    def with_cap(self, device: str, size: int, source: str) -> Caps:
        """These caps with ``device`` capped at ``size`` bytes."""
        return Caps({**self.by_device, device: (size, source)})


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
    """The caps by device or kind -> (bytes, source): ``DEVICEMEM_MAX_MEMORY``'s in ``environ``,
    then ``max_memory``'s, which win for the same key. ValueError for bad keys or sizes."""
    return dict(Caps.of_environment(environ).under(Caps.parse(max_memory)).by_device)


def with_cap(memory: DeviceMemory, cap: int, source: str) -> DeviceMemory:
    """``memory`` with one more limit of ``cap`` bytes (a budget: no usage is subtracted).

    The record keeps no room per limit, so a cap binds, and is reported as the limit, when it
    is at most the usable figure; otherwise it is listed last.
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


def budget(memory: DeviceMemory, safety_factor: float) -> int | None:
    """The budget rule, for every planner: ``safety_factor`` x the usable memory (None when
    unknown)."""
    return None if memory.usable_bytes is None else int(safety_factor * memory.usable_bytes)


@dataclass(frozen=True)
class MemoryView:
    """Every device of the kinds read, with the caps applied; ``environ`` is the environment
    the reading saw (planners read their settings from it); ``current`` what each bare kind
    means (``{"cuda": "cuda:0"}``)."""

    devices: tuple[DeviceMemory, ...]
    environ: Mapping[str, str]
    current: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def read(
        cls, max_memory: MaxMemory | Caps = None, probe: SystemProbe | None = None,
        kinds_to_read: Collection[str] | None = None,
    ) -> MemoryView:
        """Read the devices of ``kinds_to_read`` (None: every registered kind) once through
        ``probe`` (default: this process's), with ``max_memory`` and ``DEVICEMEM_MAX_MEMORY``
        applied; a cap on a device this process does not see is logged and ignored."""
        probe = probe if probe is not None else SystemProbe.default()
        caps = Caps.of_environment(probe.environ).under(Caps.parse(max_memory)).by_device
        wanted = kinds() if kinds_to_read is None else [kind for kind in kinds() if kind in set(kinds_to_read)]
        found, current = discover(wanted, probe)
        capped = []
        for memory in found:
            cap = caps.get(memory.device) or caps.get(kind_of(memory.device))
            capped.append(memory if cap is None else with_cap(memory, *cap))
        names = {memory.device for memory in capped}
        for key, (_, origin) in caps.items():
            if key not in names and key not in kinds() and kind_of(key) in wanted:
                logger.warning(
                    "[MEMORY] %s names %s, which this process does not see (it sees %s); ignoring it",
                    origin.removeprefix("override:"), key, ", ".join(sorted(names)) or "none",
                )
        return cls(tuple(capped), probe.environ, current)

    def find(self, device: Any) -> DeviceMemory:
        """The device named ``device`` ("cpu", "cuda:1", a bare kind = its current device, else
        its first); ValueError naming what this view sees."""
        name = device_name(device)
        kind, index = split_device(name, "device")
        wanted = f"{kind}:{index}" if index is not None else self.current.get(kind)
        of_kind = [memory for memory in self.devices if kind_of(memory.device) == kind]
        for memory in of_kind:
            if memory.device == wanted or (index in (0, None) and memory.device == kind):
                return memory
        if index is None and wanted is None and of_kind:
            return of_kind[0]
        seen = ", ".join(memory.device for memory in self.devices) or "none"
        problem = "is not a known kind" if kind not in kinds() else "is not visible to this process"
        raise ValueError(f"device: {name!r} {problem}; this process sees: {seen} (known kinds: {', '.join(kinds())})")

    @property
    def host(self) -> DeviceMemory:
        """The host's memory (unknown throughout when it was not read)."""
        found = [memory for memory in self.devices if memory.device == HOST]
        return found[0] if found else DeviceMemory(HOST, "host RAM", None, None, None, None, ())

    def candidates(self, device: Any) -> list[DeviceMemory]:
        """The device pick, for every planner: for ``"auto"`` the GPU (any accelerator) with the
        most usable memory, then the host, to be tried in that order; else the named device."""
        if device_name(device) != "auto":
            return [self.find(device)]
        accelerators = [memory for memory in self.devices if memory.device != HOST and memory.usable_bytes]
        best = max(accelerators, key=lambda memory: memory.usable_bytes or 0, default=None)
        return ([best] if best is not None else []) + [self.host]

    def pick(
        self, device: Any, fits: Callable[[DeviceMemory, bool], T | None],
        gave_way: Callable[[DeviceMemory, str], None] | None = None,
        exhausted: Callable[[DeviceMemory, str], T] | None = None,
    ) -> T:
        """The first result of ``fits(memory, last)`` over :meth:`candidates`, in order: None,
        or an out-of-memory error on any candidate but the last (:func:`devicemem.recovery.retries`:
        the device's cache is released, then ``gave_way(memory, error type)`` is told), moves on
        to the next. The last candidate gives a result, or after an out-of-memory error
        ``exhausted(memory, error type)`` (the smallest plan left), or raises. A MemoryError (an
        allocation on the host failed, whatever device was tried) counts as out of memory on
        every candidate."""
        candidates = self.candidates(device)
        for index, memory in enumerate(candidates):
            last = index == len(candidates) - 1
            backend = get_backend(memory.device)
            failed: list[str] = []

            def hand_on(state: Any, exc: BaseException) -> Any:
                failed.append(type(exc).__name__)
                return None if last and exhausted is None else _NEXT

            def is_oom(exc: BaseException) -> bool:
                return isinstance(exc, MemoryError) or backend.is_oom(exc)

            result = None
            for attempt in retries(memory, hand_on, is_oom=is_oom, release=freeing(backend, memory.device)):
                with attempt:
                    if attempt.state is memory:
                        result = fits(memory, last)
            if result is not None:
                return result
            if failed and last and exhausted is not None:
                return exhausted(memory, failed[-1])
            if failed and gave_way is not None:
                gave_way(memory, failed[-1])
        raise AssertionError("the last candidate gives a result or raises")

    def capped(self, device: str, cap: int, source: str) -> MemoryView:
        """This view with ``device`` capped at ``cap`` bytes more (a share of a node, say)."""
        devices = tuple(with_cap(memory, cap, source) if memory.device == device else memory for memory in self.devices)
        return dataclasses.replace(self, devices=devices)
