"""Checks of what users pass in and of what a run draws, each error naming the argument or site.

Every argument check of devicemem and bayesDREAM_ext lives here. Integers may be Python or
numpy integers (never bools); numbers may be any real (never bools or strings); site names and
output paths of the wrong type are TypeErrors; drawn samples are checked for NaN and
infinities (:func:`check_finite`), since Pyro's vectorised draws run with validation off and
would return them silently.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

SEED_MAX = 2**32 - 1  # numpy's RNG, which pyro.set_rng_seed also seeds, takes seeds up to this


def check_int(value: Any, what: str, minimum: int = 1, *, allow_none: bool = False) -> int | None:
    """``value`` (an int or numpy integer, not a bool) as an int >= ``minimum`` (None passes
    when ``allow_none``); ValueError naming ``what``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{what}: expected an integer >= {minimum}; got {type(value).__name__} {value!r}")
    return int(value)


def check_seed(value: Any, what: str = "seed") -> int | None:
    """``value`` as an int in [0, 2**32 - 1] (None passes): what ``pyro.set_rng_seed`` takes.
    ValueError naming ``what``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= SEED_MAX:
        raise ValueError(f"{what}: expected None or an integer in [0, 2**32 - 1]; got {value!r}")
    return int(value)


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_fraction(value: Any, what: str, allow_none: bool = False) -> float | None:
    """``value`` in (0, 1] (None passes when ``allow_none``); ValueError naming ``what``."""
    if value is None and allow_none:
        return None
    if not _real(value) or not 0 < value <= 1:
        raise ValueError(f"{what}: expected a number in (0, 1]; got {value!r}")
    return float(value)


def check_positive(value: Any, what: str, allow_zero: bool = False) -> float:
    """``value`` as a finite float > 0 (>= 0 with ``allow_zero``); ValueError naming ``what``."""
    if not _real(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{what}: expected a finite number {'>=' if allow_zero else '>'} 0; got {value!r}")
    return float(value)


def check_choice(value: Any, choices: Sequence[str], what: str) -> str:
    """``value`` when it is one of ``choices``, else ValueError naming ``what``."""
    if value not in choices:
        raise ValueError(f"{what}: expected one of {', '.join(choices)}; got {value!r}")
    return value


def check_site_names(value: Any, what: str = "return_sites") -> tuple[str, ...]:
    """``value`` (None, or a list, tuple or set of site names) as a tuple; TypeError naming ``what``."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)) or not all(
        isinstance(name, str) for name in value
    ):
        raise TypeError(f"{what}: expected a list, tuple or set of site names; got {type(value).__name__} {value!r:.60}")
    return tuple(value)


def check_path(value: Any, what: str) -> Path | None:
    """``value`` (None, a str or an ``os.PathLike``) as a Path; TypeError naming ``what``."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what}: expected a directory path (str or pathlib.Path); got {type(value).__name__} {value!r:.60}")
    return Path(value)


def check_finite(samples: Mapping[str, Tensor], first: int) -> None:
    """ValueError naming the first site of ``samples`` (``{site: [batch, ...]}``, whose row 0 is
    sample number ``first``) that holds a NaN or an infinity, and the first such sample.

    Cheap when all is well: one sum per floating-point site (a finite sum means every element
    is finite; ~7% of the time ``normal_`` takes to fill the same tensor), with no temporary of
    the batch's size. A sum that overflows is settled by the minimum and maximum (NaN
    propagates through both); only a site with a non-finite one is searched sample by sample.
    """
    for name, value in samples.items():
        if not value.is_floating_point() or value.numel() == 0:
            continue
        if torch.isfinite(value.sum()) or all(torch.isfinite(bound) for bound in torch.aminmax(value)):
            continue
        for row in range(value.shape[0]):
            bad = ~torch.isfinite(value[row])
            if bad.any():
                example = value[row][bad].flatten()[0].item()
                raise ValueError(
                    f"site {name!r}: sample {first + row} holds {example} (NaN or infinite values); the guide "
                    "or the posterior samples have probably diverged. Pass allow_nonfinite=True to return them anyway"
                )
