"""Route ``pyro.infer.Predictive`` to :class:`devicemem.Predictive` for code that builds its own.

Code such as bayesDREAM constructs ``pyro.infer.Predictive(model, guide=..., ...)`` itself.
``with devicemem.routing(device="auto", max_memory=...):`` makes that name (and
``pyro.infer.predictive.Predictive``) a subclass of :class:`devicemem.Predictive` that adds
the given options to every construction, and restores Pyro's class on exit, error included.
``route(**options)`` / ``unroute()`` do the same without a ``with`` block. Routes nest: an
inner one adds its options to the outer one's (the inner wins on a clash) and its exit brings
the outer one back. Options override the routed call's own arguments of the same name (so
``routing(parallel=False)`` forces Pyro's sequential mode on code that passes
``parallel=True``).

Only lookups made while routed see the change: a ``from pyro.infer import Predictive`` that
ran before routing keeps Pyro's class. A routed call that leaves ``parallel`` out gets
devicemem's default, None (vectorise when the model does, else Pyro's sequential mode), not
Pyro's False.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator

import pyro.infer
import pyro.infer.predictive

from devicemem.predictive import Predictive

_OPTIONS = frozenset(inspect.signature(Predictive.__init__).parameters) - {"self", "model"}
# What each route() replaced, innermost last: (pyro.infer.Predictive, pyro.infer.predictive.Predictive).
_saved: list[tuple[Any, Any]] = []


def _routed(options: dict[str, Any]) -> type[Predictive]:
    class RoutedPredictive(Predictive):
        __doc__ = Predictive.__doc__
        routed_options = options

        def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:
            bound = inspect.signature(Predictive.__init__).bind(self, model, *args, **kwargs).arguments
            bound.pop("self")
            super().__init__(**{**bound, **options})

    return RoutedPredictive


def route(**options: Any) -> None:
    """Make ``pyro.infer.Predictive`` devicemem's, with ``options`` (any keyword argument of
    :class:`devicemem.Predictive` but ``model``) added to every construction, until
    :func:`unroute`. ValueError naming an unknown option, before anything changes."""
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ValueError(f"route: unknown option(s) {unknown}; accepted: {sorted(_OPTIONS)}")
    current = getattr(pyro.infer.Predictive, "routed_options", {}) if _saved else {}
    _saved.append((pyro.infer.Predictive, pyro.infer.predictive.Predictive))
    routed = _routed({**current, **options})
    pyro.infer.Predictive = routed
    pyro.infer.predictive.Predictive = routed


def unroute() -> bool:
    """Undo the latest :func:`route`; False (and nothing changes) when none is active."""
    if not _saved:
        return False
    pyro.infer.Predictive, pyro.infer.predictive.Predictive = _saved.pop()
    return True


@contextmanager
def routing(**options: Any) -> Iterator[None]:
    """:func:`route` for the duration of the ``with`` block; Pyro's class (or the enclosing
    route) is back afterwards, also when the block raises or left routes of its own."""
    route(**options)
    depth = len(_saved)
    try:
        yield
    finally:
        while len(_saved) >= depth:
            unroute()
