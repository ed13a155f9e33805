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

from devicemem.backends import DeviceMemory, devices, limit_source
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
    )
    parser.add_argument("--json", action="store_true", help="a JSON list whose keys mirror DeviceMemory")
    parser.add_argument(
        "--max-memory", default=None, metavar="DEVICE=SIZE,...",
        help="cap devices like DEVICEMEM_MAX_MEMORY does, e.g. cpu=8GiB,cuda:0=20GiB",
    )
    parser.set_defaults(func=_run_info)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {value}")
    return value


def _run_plan(args: argparse.Namespace) -> int:
    from devicemem.planner import plan_technical

    plan = plan_technical(
        args.cells, args.features, args.groups, args.samples, n_categories=args.categories,
        distribution=args.distribution, guide=args.guide, with_obs=args.with_obs, device=args.device,
        minibatch_size=args.minibatch_size, safety_factor=args.safety_factor, max_memory=args.max_memory,
        output_bytes=0 if args.results_on_disk else None, threads=args.threads,
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(plan), indent=2))
        return 0
    mode = "vectorised" if plan.vectorized else "sequential"
    budget = f"{format_bytes(plan.budget_bytes)} (safety factor {plan.safety_factor:.0%})"
    rows = [
        ("device", plan.device),
        ("batches", f"{plan.n_batches} {mode} of {plan.batch_size} ({plan.num_samples} samples)"),
        ("predicted peak", format_bytes(plan.predicted_peak_bytes)),
        ("budget", budget if plan.budget_bytes is not None else "unknown"),
        ("results", f"{format_bytes(plan.output_bytes)} on the host"),
    ]
    print("\n".join(f"{key:<15} {value}" for key, value in rows))
    print("why:\n" + "\n".join(f"  - {reason}" for reason in plan.reasons))
    return 0


def _add_plan_parser(subparsers: Any) -> None:
    from devicemem.footprint import DISTRIBUTIONS, GUIDES

    parser = subparsers.add_parser(
        "plan", help="plan the bayesDREAM technical model's Predictive from its shapes",
        description="Device, batch size and mode for a technical-model Predictive of N cells x T features, "
        "C groups and S samples, from the analytic footprint (no data needed).",
    )
    parser.add_argument("--cells", type=_positive_int, required=True, metavar="N", help="cells (N)")
    parser.add_argument("--features", type=_positive_int, required=True, metavar="T", help="features (T)")
    parser.add_argument("--groups", type=_positive_int, required=True, metavar="C", help="technical groups (C)")
    parser.add_argument("--samples", type=_positive_int, required=True, metavar="S", help="posterior samples (S)")
    parser.add_argument("--categories", type=_positive_int, default=1, metavar="K", help="categories (multinomial)")
    parser.add_argument("--distribution", choices=DISTRIBUTIONS, default="negbinom")
    parser.add_argument("--guide", choices=GUIDES, default="normal", help="AutoNormal, AutoIAFNormal or AutoDelta")
    parser.add_argument("--with-obs", action="store_true", help="also sample the observation site y [S, N, T]")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--minibatch-size", type=_positive_int, default=None, metavar="B")
    parser.add_argument("--safety-factor", type=float, default=None, metavar="F", help="fraction of usable memory, in (0, 1]")
    parser.add_argument("--max-memory", default=None, metavar="DEVICE=SIZE,...", help="cap devices, e.g. cpu=8GiB")
    parser.add_argument(
        "--results-on-disk", action="store_true",
        help="the results go to memmaps (Predictive(out=DIR)): do not count them against host memory",
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=None, metavar="K",
        help="threads drawing the likelihood on the host (default: DEVICEMEM_THREADS, else the usable cores)",
    )
    parser.add_argument("--json", action="store_true", help="the Plan as JSON")
    parser.set_defaults(func=_run_plan)


_SUBCOMMANDS: list[Callable[[Any], None]] = [_add_info_parser, _add_plan_parser]


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
