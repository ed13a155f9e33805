"""devicemem: device-aware, memory-safe batched sampling for Pyro.

Public names are imported lazily so that ``import devicemem`` (and ``devicemem info``) stays
cheap; each lives in the module that owns its idea:

=============================================  ======================
name                                           module
=============================================  ======================
DeviceMemory, devices, device_memory,          devicemem.backends
register_backend, get_backend
Footprint, technical_footprint,                devicemem.footprint
probe_footprint
Plan, plan_predictive, plan_technical,         devicemem.planner
estimate_predictive_memory_and_set_minibatch
Predictive                                     devicemem.predictive
routing, route, unroute                        devicemem.routing
RayOptions, ShardError                         devicemem.distributed
parse_bytes, format_bytes                      devicemem.units
=============================================  ======================
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
    "technical_footprint": "devicemem.footprint",
    "probe_footprint": "devicemem.footprint",
    "Plan": "devicemem.planner",
    "plan_predictive": "devicemem.planner",
    "plan_technical": "devicemem.planner",
    "estimate_predictive_memory_and_set_minibatch": "devicemem.planner",
    "Predictive": "devicemem.predictive",
    "routing": "devicemem.routing",
    "route": "devicemem.routing",
    "unroute": "devicemem.routing",
    "RayOptions": "devicemem.distributed",
    "ShardError": "devicemem.distributed",
    "parse_bytes": "devicemem.units",
    "format_bytes": "devicemem.units",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'devicemem' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
