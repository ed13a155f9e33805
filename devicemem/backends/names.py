"""Device names, read in one place: ``"cpu"``, ``"cuda"`` (a kind), ``"cuda:1"`` (kind:index).

Everything that needs a device's kind or index asks here, so that ``"CUDA:1 "``, a
``torch.device`` and ``"cuda:1"`` mean the same device everywhere.
"""

from __future__ import annotations

import re
from typing import Any, Collection

HOST = "cpu"  # the host's device name (and kind)
_DEVICE = re.compile(r"([a-z][a-z0-9_]*)(?::(\d+))?")


def device_name(device: Any, what: str = "device") -> str:
    """``device`` (a name or a ``torch.device``) as a name, stripped and lower-case;
    ValueError naming ``what`` for anything else."""
    if isinstance(device, str) or type(device).__name__ == "device":
        return str(device).strip().lower()
    raise ValueError(f"{what}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' (or a torch.device); got {device!r}")


def split_name(device: Any, what: str, kinds: Collection[str]) -> tuple[str, int | None]:
    """("cuda", 1) for "cuda:1", ("cpu", None) for "cpu"; ValueError naming ``what`` and the
    known ``kinds`` for a name that is not kind or kind:index."""
    match = _DEVICE.fullmatch(str(device).strip().lower())
    if match is None:
        raise ValueError(
            f"{what}: could not read device {device!r}; expected a kind ({', '.join(kinds)}) or kind:index, e.g. cuda:0"
        )
    return match.group(1), None if match.group(2) is None else int(match.group(2))


def is_kind(name: str) -> bool:
    """Whether ``name`` is a bare kind like "xpu" (what :func:`register_backend` takes)."""
    return isinstance(name, str) and ":" not in name and _DEVICE.fullmatch(name) is not None


def kind_of(device: Any) -> str:
    """The kind of a device name: "cuda" for "cuda:1" and for "cuda"."""
    return str(device).strip().lower().partition(":")[0]


def index_of(device: Any) -> int:
    """The index of a device name: 1 for "cuda:1", 0 for a bare kind."""
    return int(str(device).partition(":")[2] or 0)


def is_host(device: Any) -> bool:
    """Whether ``device`` names the host."""
    return kind_of(device) == HOST
