"""Moved: ``bayesdream_routing`` is :func:`bayesDREAM_ext.routing.bayesdream_routing` now.

The old import, ``from devicemem.integrations.bayesdream import bayesdream_routing``, still
works for one release, with a DeprecationWarning (see :mod:`devicemem.integrations.moved`).
"""

from __future__ import annotations

from typing import Any

from devicemem.integrations.moved import resolve


def __getattr__(name: str) -> Any:
    return resolve(__name__, name)
