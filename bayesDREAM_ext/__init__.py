"""bayesDREAM_ext: bayesDREAM's ``fit_technical`` on top of devicemem, device-aware end to end.

Public names (imported lazily, so the CLI starts fast): ``fit_technical``,
``PredictiveFailedError``, ``PredictiveInterrupted`` (bayesDREAM_ext.fit); ``TechnicalFit``,
``GuideState`` (bayesDREAM_ext.records); ``read_counts`` (bayesDREAM_ext.readers); ``select_ntc``
(bayesDREAM_ext.ntc); ``TrainingPlan``,
``plan_training``, ``training_footprint`` (bayesDREAM_ext.memory); ``synthetic_technical``,
``synthetic_data`` (bayesDREAM_ext.synthetic).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "fit_technical": "bayesDREAM_ext.fit",
    "TechnicalFit": "bayesDREAM_ext.records",
    "GuideState": "bayesDREAM_ext.records",
    "read_counts": "bayesDREAM_ext.readers",
    "select_ntc": "bayesDREAM_ext.ntc",
    "PredictiveFailedError": "bayesDREAM_ext.fit",
    "PredictiveInterrupted": "bayesDREAM_ext.fit",
    "TrainingPlan": "bayesDREAM_ext.memory",
    "plan_training": "bayesDREAM_ext.memory",
    "training_footprint": "bayesDREAM_ext.memory",
    "synthetic_technical": "bayesDREAM_ext.synthetic",
    "synthetic_data": "bayesDREAM_ext.synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bayesDREAM_ext' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
