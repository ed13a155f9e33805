"""Route ``pyro.infer.Predictive`` to :class:`devicemem.Predictive` for code that builds its own.

Code such as bayesDREAM constructs ``pyro.infer.Predictive(model, guide=..., ...)`` itself.
``with devicemem.routing(device="auto", max_memory=...):`` makes the constructions that the
calling thread makes inside the block :class:`devicemem.Predictive` ones, with the given options
added, and restores Pyro's class on exit, error included. ``route(**options)`` / ``unroute()``
do the same without a ``with`` block. Routes nest: an inner one adds its options to the outer
one's (the inner wins on a clash) and its exit brings the outer one back. Options override the
routed call's own arguments of the same name (so ``routing(parallel=False)`` forces Pyro's
sequential mode on code that passes ``parallel=True``).

Routes belong to the thread that opens them. ``pyro.infer.Predictive`` is one module attribute
for every thread, so while any thread has a route open it (and ``pyro.infer.predictive.Predictive``)
is :class:`ThreadRoutedPredictive`, which builds devicemem's class in a thread with an open
route and Pyro's in any other; the last route to close anywhere puts Pyro's class back. One
thread leaving its block never unroutes another's; threads started inside a block are not
routed unless they open a block of their own.

Only lookups of ``pyro.infer.Predictive`` made while routed see the change: a module that ran
``from pyro.infer import Predictive`` before routing (Pyro's own examples do) holds Pyro's
class. ``rebind=True`` reaches those too: every module attribute that is Pyro's class becomes
:class:`ThreadRoutedPredictive` while the route is open, and Pyro's class again afterwards.
A route that ends having built no devicemem Predictive says so in a warning (logger
``devicemem.routes``), naming the usual cause. Routed calls show no progress bar (Pyro prints
nothing) unless a route passes ``progress=True``; a routed call that leaves ``parallel`` out
gets devicemem's default, None (vectorise when the model does, else Pyro's sequential mode),
not Pyro's False.
"""

from __future__ import annotations

import inspect
import logging
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import pyro.infer
import pyro.infer.predictive

from devicemem.execute.transformed import PYRO_PREDICTIVE as _PYRO_PREDICTIVE
from devicemem.predictive import Predictive

logger = logging.getLogger("devicemem.routes")

_OPTIONS = frozenset(inspect.signature(Predictive.__init__).parameters) - {"self", "model"}


@dataclass
class _Route:
    """One open route of one thread: its class (devicemem's, with the merged options), whether
    it rebinds imported names, and how many Predictives were built while it was open."""

    routed: type[Predictive]
    rebind: bool
    built: int = 0


class _Routes(threading.local):
    stack: list[_Route]

    def __init__(self) -> None:
        self.stack = []


_here = _Routes()  # this thread's open routes, innermost last
_lock = threading.Lock()  # guards the module attributes and the counts below
_open = 0  # open routes, all threads
_rebinding = 0  # open routes with rebind=True, all threads
_rebound: list[tuple[Any, str]] = []  # (module, attribute) set to ThreadRoutedPredictive by rebind


def _routed(options: dict[str, Any]) -> type[Predictive]:
    class RoutedPredictive(Predictive):
        __doc__ = Predictive.__doc__
        routed_options = options

        def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:
            bound = inspect.signature(Predictive.__init__).bind(self, model, *args, **kwargs).arguments
            bound.pop("self")
            super().__init__(**{"progress": False, **bound, **options})

    return RoutedPredictive


class _Dispatch(type):
    """Builds devicemem's routed class in a thread with an open route, Pyro's in any other."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        stack = _here.stack
        if not stack:
            return _PYRO_PREDICTIVE(*args, **kwargs)
        for route in stack:
            route.built += 1
        return stack[-1].routed(*args, **kwargs)

    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, (_PYRO_PREDICTIVE, Predictive))


class ThreadRoutedPredictive(metaclass=_Dispatch):
    """What ``pyro.infer.Predictive`` is while a route is open in any thread: calling it builds
    a :class:`devicemem.Predictive` (with the route's options) in a thread with an open route,
    a ``pyro.infer.Predictive`` in any other; instances of either pass ``isinstance``."""


def _set_module_attributes(value: type) -> None:
    pyro.infer.Predictive = value
    pyro.infer.predictive.Predictive = value


def _rebind() -> None:
    """Every module attribute holding Pyro's class (devicemem's own modules excepted: they keep
    Pyro's class to fall back on) becomes :class:`ThreadRoutedPredictive`."""
    for name, module in list(sys.modules.items()):
        if module is None or name == "devicemem" or name.startswith("devicemem."):
            continue
        for attribute, value in list(getattr(module, "__dict__", {}).items()):
            if value is _PYRO_PREDICTIVE:
                setattr(module, attribute, ThreadRoutedPredictive)
                _rebound.append((module, attribute))


def route(*, rebind: bool = False, **options: Any) -> None:
    """Make ``pyro.infer.Predictive`` devicemem's in this thread, with ``options`` (any keyword
    argument of :class:`devicemem.Predictive` but ``model``) added to every construction, until
    :func:`unroute`; ``rebind``: also in modules that imported Pyro's class before (see the
    module's docstring). ValueError naming an unknown option, before anything changes."""
    global _open, _rebinding
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ValueError(f"route: unknown option(s) {unknown}; accepted: {sorted(_OPTIONS)}")
    stack = _here.stack
    current = stack[-1].routed.routed_options if stack else {}
    with _lock:
        stack.append(_Route(_routed({**current, **options}), bool(rebind)))
        _open += 1
        if _open == 1:
            _set_module_attributes(ThreadRoutedPredictive)
        if rebind:
            _rebinding += 1
            if _rebinding == 1:
                _rebind()


def unroute() -> bool:
    """Undo this thread's latest :func:`route`; False (and nothing changes) when it has none.
    Warns when the route built no devicemem Predictive."""
    global _open, _rebinding
    stack = _here.stack
    if not stack:
        return False
    with _lock:
        closed = stack.pop()
        _open -= 1
        if closed.rebind:
            _rebinding -= 1
            if _rebinding == 0:
                for module, attribute in _rebound:
                    if getattr(module, attribute, None) is ThreadRoutedPredictive:
                        setattr(module, attribute, _PYRO_PREDICTIVE)
                _rebound.clear()
        if _open == 0:
            _set_module_attributes(_PYRO_PREDICTIVE)
    if closed.built == 0:
        logger.warning(
            "devicemem routing ended having routed no pyro.infer.Predictive: nothing in this thread built one "
            "through pyro.infer.Predictive while it was open. Code that ran `from pyro.infer import Predictive` "
            "before routing holds Pyro's class: route with rebind=True to reach it"
        )
    return True


@contextmanager
def routing(*, rebind: bool = False, **options: Any) -> Iterator[None]:
    """:func:`route` for the duration of the ``with`` block; Pyro's class (or this thread's
    enclosing route) is back afterwards, also when the block raises or left routes of its own."""
    route(rebind=rebind, **options)
    depth = len(_here.stack)
    try:
        yield
    finally:
        while len(_here.stack) >= depth:
            unroute()
