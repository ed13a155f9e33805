"""devicemem: device-aware, memory-safe batched sampling for Pyro.

Public names are imported lazily so that ``import devicemem`` (and ``devicemem info``) stays
cheap; each lives in the module that owns its idea:

=============================================  ======================
name                                           module
=============================================  ======================
DeviceMemory, devices, device_memory,          devicemem.backends
register_backend, get_backend
Footprint, probe_footprint                     devicemem.footprint
Plan, plan_predictive                          devicemem.planner
Predictive                                     devicemem.predictive
routing, route, unroute                        devicemem.routes
RayOptions                                     devicemem.options
ShardError                                     devicemem.execute.ray
parse_bytes, format_bytes                      devicemem.units
log_to_stderr                                  devicemem.logs
=============================================  ======================

Names that moved to bayesDREAM_ext still resolve here for one release, with a
DeprecationWarning, through the one table in :mod:`devicemem.integrations.moved`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DeviceMemory": "devicemem.backends",
    "devices": "devicemem.backends",
    "device_memory": "devicemem.backends",
    "register_backend": "devicemem.backends",
    "get_backend": "devicemem.backends",
    "Footprint": "devicemem.footprint",
    "probe_footprint": "devicemem.footprint",
    "Plan": "devicemem.planner",
    "plan_predictive": "devicemem.planner",
    "Predictive": "devicemem.predictive",
    "routing": "devicemem.routes",
    "route": "devicemem.routes",
    "unroute": "devicemem.routes",
    "RayOptions": "devicemem.options",
    "ShardError": "devicemem.execute.ray",
    "parse_bytes": "devicemem.units",
    "format_bytes": "devicemem.units",
    "log_to_stderr": "devicemem.logs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        return importlib.import_module("devicemem.integrations.moved").resolve(__name__, name)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
