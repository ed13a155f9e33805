"""Byte sizes users write, and how logs print them."""

from __future__ import annotations

import pytest

from devicemem.units import format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("8GiB", 8 << 30), ("8G", 8 * 10**9), ("8GB", 8 * 10**9), ("8000MB", 8 * 10**9), ("512MiB", 512 << 20),
        ("1.5 kib", 1536), (" 42 ", 42), ("1e3", 1000), (4096, 4096), (2.5e9, 2_500_000_000), ("0", 0),
    ],
)
def test_parse_bytes_reads_the_documented_forms(value, expected: int) -> None:
    assert parse_bytes(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("lots", r"max_memory\['cpu'\]: could not read 'lots'; expected .*8GiB, 8G, 8GB, 8000MB"),
        ("8 parsecs", r"could not read '8 parsecs'"),
        ("", r"could not read ''"),
        (-1, r"must be a finite, non-negative size"),
        (float("nan"), r"must be a finite, non-negative size"),
        (float("inf"), r"must be a finite, non-negative size"),
        (True, r"expected an integer number of bytes"),
        (None, r"expected .* got NoneType"),
    ],
)
def test_parse_bytes_errors_name_the_argument_and_the_forms(value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_bytes(value, "max_memory['cpu']")


@pytest.mark.parametrize(
    ("n", "text"),
    [(None, "unknown"), (512, "512 B"), (1500, "1.50 KB"), (20.1e9, "20.10 GB"), (3 * 10**12, "3.00 TB")],
)
def test_format_bytes(n, text: str) -> None:
    assert format_bytes(n) == text
