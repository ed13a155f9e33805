"""The ``devicemem`` command line.

Each subcommand is one ``_add_<name>_parser(subparsers)`` function that registers its parser
and sets ``func`` (called with the parsed arguments, returns the exit status); list it in
``_SUBCOMMANDS`` to add it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any, Callable, Sequence

from devicemem.devices import DeviceMemory, devices, limit_source
from devicemem.units import format_bytes


def _limit_cell(memory: DeviceMemory) -> str:
    if memory.limit_bytes is None:
        return "none"
    return f"{format_bytes(memory.limit_bytes)} ({limit_source(memory)})"


def _table(rows: list[DeviceMemory]) -> str:
    lines = [("device", "name", "total", "free", "limit (from)", "usable")]
    lines += [
        (
            memory.device, memory.name, format_bytes(memory.total_bytes), format_bytes(memory.free_bytes),
            _limit_cell(memory), format_bytes(memory.usable_bytes),
        )
        for memory in rows
    ]
    widths = [max(len(cell) for cell in column) for column in zip(*lines)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _run_info(args: argparse.Namespace) -> int:
    rows = devices(max_memory=args.max_memory)
    if args.json:
        print(json.dumps([dataclasses.asdict(memory) for memory in rows], indent=2))
    else:
        print(_table(rows))
    return 0


def _add_info_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "info", help="list devices and how much memory this process may use on each",
        description="One row per device: total, free, the tightest limit and its source, usable.",
    )
    parser.add_argument("--json", action="store_true", help="a JSON list whose keys mirror DeviceMemory")
    parser.add_argument(
        "--max-memory", default=None, metavar="DEVICE=SIZE,...",
        help="cap devices like DEVICEMEM_MAX_MEMORY does, e.g. cpu=8GiB,cuda:0=20GiB",
    )
    parser.set_defaults(func=_run_info)


_SUBCOMMANDS: list[Callable[[Any], None]] = [_add_info_parser]


def build_parser() -> argparse.ArgumentParser:
    """The ``devicemem`` parser with every subcommand in ``_SUBCOMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="devicemem", description="Device-aware, memory-safe batched sampling for Pyro."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="show [MEMORY] lines (-vv: debug)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``devicemem`` with ``argv`` (default: the command line); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"devicemem: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
