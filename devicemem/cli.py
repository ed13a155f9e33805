"""The ``devicemem`` command line.

Each subcommand is one ``_add_<name>_parser(subparsers)`` function that registers its parser
and sets ``func`` (called with the parsed arguments, returns the exit status); list it in
``_SUBCOMMANDS`` to add it. Options use the vocabulary shared with ``bayesdream-ext``
(:mod:`devicemem.cliargs`); log lines go to stderr (``-q`` / ``-v``), results to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Callable, Sequence

from devicemem import logs
from devicemem.backends import DeviceMemory, devices, limit_source
from devicemem.cliargs import MAX_MEMORY_HELP, HelpFormatter, add_json, add_verbosity, log_level
from devicemem.units import format_bytes


def _limit_cell(memory: DeviceMemory) -> str:
    if memory.limit_bytes is None:
        return "none"
    return f"{format_bytes(memory.limit_bytes)} ({limit_source(memory)})"


def _cores_cell(memory: DeviceMemory) -> str:
    return "-" if memory.cores is None else f"{memory.cores} ({memory.cores_source})"


def _table(rows: list[DeviceMemory]) -> str:
    lines = [("device", "name", "total", "free", "limit (from)", "usable", "cores (from)")]
    lines += [
        (
            memory.device, memory.name, format_bytes(memory.total_bytes), format_bytes(memory.free_bytes),
            _limit_cell(memory), format_bytes(memory.usable_bytes), _cores_cell(memory),
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
        "info", help="list devices and how much memory (and, on the host, how many cores) this process may use",
        description="One row per device: total, free, the tightest limit and its source, usable; for the "
        "host also the usable CPU cores (affinity, cgroup CPU quota, SLURM) and their source.",
        formatter_class=HelpFormatter,
    )
    add_json(parser, "a list whose keys mirror DeviceMemory")
    parser.add_argument("--max-memory", default=None, metavar="DEVICE=SIZE,...", help=MAX_MEMORY_HELP)
    add_verbosity(parser)
    parser.set_defaults(func=_run_info)


def _add_moved_parser(subparsers: Any, name: str) -> None:
    """A subcommand that moved to another package: its arguments, unread here, go to the
    function :mod:`devicemem.integrations.moved` names for it."""
    from devicemem.integrations.moved import new_home

    parser = subparsers.add_parser(name, add_help=False, help=f"deprecated: moved to {new_home(__name__, name)}")
    parser.set_defaults(func=None, moved=name)


def _run_moved(name: str, rest: list[str]) -> int:
    """Run the moved subcommand ``name`` on ``rest``, after saying where it went."""
    from devicemem.integrations.moved import new_home, resolve

    print(f"devicemem {name} is deprecated: it moved to {new_home(__name__, name)}", file=sys.stderr)
    return resolve(__name__, name)(rest)


_SUBCOMMANDS: list[Callable[[Any], None]] = [_add_info_parser]
# Subcommands that moved out of devicemem, kept for one release (devicemem.integrations.moved).
_MOVED_SUBCOMMANDS = ("plan",)


def build_parser() -> argparse.ArgumentParser:
    """The ``devicemem`` parser with every subcommand in ``_SUBCOMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="devicemem", description="Device-aware, memory-safe batched sampling for Pyro.", formatter_class=HelpFormatter,
    )
    add_verbosity(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(subparsers)
    for name in _MOVED_SUBCOMMANDS:
        _add_moved_parser(subparsers, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``devicemem`` with ``argv`` (default: the command line); returns the exit status."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "moved", None) is not None:  # the program's -q / -v go along
        return _run_moved(args.moved, (["--quiet"] if args.quiet else []) + ["--verbose"] * args.verbose + rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        with logs.shown(log_level(args)):
            return args.func(args)
    except ValueError as exc:
        print(f"devicemem: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
