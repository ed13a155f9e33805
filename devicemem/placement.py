"""Placement: put model arguments and guide parameters on a device, and put them back.

``to_device`` copies a nested structure of arguments with every tensor moved. ``parameters_on``
moves a guide's parameters (an ``nn.Module``/``PyroModule`` guide such as ``AutoNormal``) and
every parameter in Pyro's global param store (what function guides and ``pyro.param`` read) for
the length of a ``with`` block, and on exit, also when an exception escapes, gives every tensor
back its original storage, so each one is on its original device with its original values.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import pyro
import torch
from torch import Tensor

T = TypeVar("T")
Mover = Callable[[Tensor, torch.device], Tensor]


def _move(tensor: Tensor, device: torch.device) -> Tensor:
    return tensor.to(device)


def to_device(obj: T, device: torch.device | str) -> T:
    """A copy of ``obj`` (tensors nested in tuples, named tuples, lists and dicts) with every
    tensor on ``device``; anything else is returned as is. Tensors already there are shared."""
    device = torch.device(device)
    if isinstance(obj, Tensor):
        return obj.to(device)  # type: ignore[return-value]
    if isinstance(obj, dict):
        return type(obj)((key, to_device(value, device)) for key, value in obj.items())
    if isinstance(obj, list):
        return [to_device(value, device) for value in obj]  # type: ignore[return-value]
    if isinstance(obj, tuple):
        items = [to_device(value, device) for value in obj]
        if hasattr(obj, "_fields"):
            return type(obj)(*items)
        return type(obj)(items)
    return obj


def guide_tensors(guide: Any) -> list[Tensor]:
    """The guide's parameters and buffers and the param store's parameters, each once."""
    found: dict[int, Tensor] = {}
    if isinstance(guide, torch.nn.Module):
        for tensor in (*guide.parameters(), *guide.buffers()):
            found.setdefault(id(tensor), tensor)
    for _, tensor in pyro.get_param_store().named_parameters():
        found.setdefault(id(tensor), tensor)
    return list(found.values())


@contextmanager
def parameters_on(
    device: torch.device | str, guide: Any = None, *, mover: Mover = _move
) -> Iterator[None]:
    """Within the block, ``guide``'s parameters and buffers (when it is an ``nn.Module``) and
    every parameter of Pyro's param store live on ``device``.

    Each tensor keeps its identity (its ``.data`` is swapped), so optimisers, the param store
    and ``PyroModule`` attributes still refer to the same objects. On exit each tensor gets its
    original storage back: original device, original values, whatever happened in the block.
    ``mover(tensor, device)`` makes the device copy (``Tensor.to`` by default; tests inject
    their own). Parameters first created inside the block (a guide never run before) stay
    where they were created.
    """
    device = torch.device(device)
    originals: list[tuple[Tensor, Tensor]] = []
    try:
        for tensor in guide_tensors(guide):
            original = tensor.data
            moved = mover(original, device)
            if moved is not original:
                originals.append((tensor, original))
                tensor.data = moved
        yield
    finally:
        for tensor, original in reversed(originals):
            tensor.data = original
