"""Integrations with packages that build ``pyro.infer.Predictive`` themselves, and the names
that moved out of devicemem.

- :mod:`devicemem.integrations.moved`: the one table of names that moved to bayesDREAM_ext,
  still reachable at their old place for one release (with a DeprecationWarning).
- :mod:`devicemem.integrations.bayesdream`: moved to :mod:`bayesDREAM_ext.routing`
  (``bayesdream_routing``); the old module forwards to it for one release.
"""
