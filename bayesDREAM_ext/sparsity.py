"""Sparse input without importing scipy where none is given.

scipy is a dependency of the package, but the GPU node the CUDA suite runs on has none, and a
matrix can only be a ``scipy.sparse`` one when the caller has loaded scipy. So the model and
training code ask :func:`issparse`, which looks scipy up only when it is already imported;
reading and converting sparse input (``bayesDREAM_ext.data``) imports it where it is needed.
"""

from __future__ import annotations

import sys
from typing import Any


def issparse(value: Any) -> bool:
    """``scipy.sparse.issparse(value)``, False without importing scipy when it is not loaded."""
    module = sys.modules.get("scipy.sparse")
    return module is not None and module.issparse(value)
