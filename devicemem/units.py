"""Byte quantities: parse the strings users write ("8GiB", "8000MB") and format for logs."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
ACCEPTED_FORMS = "an integer number of bytes or a number with a unit, e.g. 8GiB, 8G, 8GB, 8000MB, 512MiB"


def parse_bytes(value: int | float | str, what: str = "memory size") -> int:
    """Return ``value`` in bytes; ``what`` names the argument in the error message.

    Decimal units (K, M, G, T, KB, MB...) are powers of 1000; binary units (KiB, MiB...)
    powers of 1024. Raises ValueError naming ``what`` and the accepted forms.
    """
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected {ACCEPTED_FORMS}; got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{what}: could not read {value!r}; expected {ACCEPTED_FORMS}")
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise ValueError(f"{what}: expected {ACCEPTED_FORMS}; got {type(value).__name__}")
    result = number * _UNITS[unit]
    if not result >= 0 or result != result or result == float("inf"):
        raise ValueError(f"{what}: must be a finite, non-negative size; got {value!r}")
    return int(result)


def format_bytes(n: int | float | None) -> str:
    """Human-readable decimal size with two decimals ("20.10 GB"); None -> "unknown"."""
    if n is None:
        return "unknown"
    n = float(n)
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
