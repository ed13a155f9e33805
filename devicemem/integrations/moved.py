"""Names that moved out of devicemem, still reachable at their old place for one release.

devicemem is generic: it knows devices, footprints, plans and how to run them, and no model.
What it held of bayesDREAM's technical model moved to :mod:`bayesDREAM_ext` (the analytic
footprint and its plan to :mod:`bayesDREAM_ext.memory`, ``bayesdream_routing`` to
:mod:`bayesDREAM_ext.routing`, ``devicemem plan --cells/--features/--groups`` to
``bayesdream-ext plan-predictive``). :data:`MOVED` is the one table of those old names: each
old module's ``__getattr__`` (and the ``devicemem plan`` command) asks :func:`resolve`, which
imports the new home with :mod:`importlib` at that moment and warns with a DeprecationWarning.
So devicemem never imports bayesDREAM_ext itself: there is no arrow devicemem -> bayesDREAM_ext
in the import graph, and ``import devicemem`` works without bayesDREAM_ext's dependencies.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

# (old module, old name) -> "new.module:name". Remove after the next release.
MOVED: dict[tuple[str, str], str] = {
    ("devicemem", "plan_technical"): "bayesDREAM_ext.memory:plan_technical",
    ("devicemem", "technical_footprint"): "bayesDREAM_ext.memory:technical_footprint",
    ("devicemem", "estimate_predictive_memory_and_set_minibatch"):
        "bayesDREAM_ext.memory:estimate_predictive_memory_and_set_minibatch",
    ("devicemem.planner", "plan_technical"): "bayesDREAM_ext.memory:plan_technical",
    ("devicemem.planner", "estimate_predictive_memory_and_set_minibatch"):
        "bayesDREAM_ext.memory:estimate_predictive_memory_and_set_minibatch",
    ("devicemem.footprint", "technical_footprint"): "bayesDREAM_ext.memory:technical_footprint",
    ("devicemem.footprint", "technical_latent_size"): "bayesDREAM_ext.memory:technical_latent_size",
    ("devicemem.integrations.bayesdream", "bayesdream_routing"): "bayesDREAM_ext.routing:bayesdream_routing",
    # the `devicemem plan` subcommand: the function that runs it from its own arguments
    ("devicemem.cli", "plan"): "bayesDREAM_ext.cli:plan_predictive_main",
}


def new_home(module: str, name: str) -> str | None:
    """Where ``module.name`` lives now ("new.module:name"), or None when it did not move."""
    return MOVED.get((module, name))


def resolve(module: str, name: str) -> Any:
    """``module.name``'s new object, imported now, with a DeprecationWarning naming its new
    home; AttributeError (as for any missing attribute) when the name did not move."""
    target = new_home(module, name)
    if target is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new_module, _, new_name = target.partition(":")
    warnings.warn(
        f"{module}.{name} moved to {new_module}.{new_name}; the old name goes away in the next release",
        DeprecationWarning, stacklevel=3,
    )
    return getattr(importlib.import_module(new_module), new_name)
