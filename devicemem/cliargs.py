"""One command-line vocabulary for ``devicemem`` and ``bayesdream-ext``.

Both command lines build their options from these helpers, so that one concept has one
spelling, one help text and a shown default in both:

=================  ==========================================================================
sample count       ``--num-samples S`` (Pyro's ``num_samples``; default 1000)
verbosity          ``-q/--quiet`` (warnings only), ``-v/--verbose`` (debug); default: the
                   ``[MEMORY]`` lines. Logs go to stderr, results to stdout
progress bars      ``--progress/--no-progress`` (default: when stderr is a terminal)
memory             ``--device``, ``--max-memory DEVICE=SIZE,...``, ``--safety-factor F``
threads            ``--threads K``
another machine    ``--assume DEVICE=SIZE,...`` (plans only)
JSON               ``--json`` (commands that print a result)
=================  ==========================================================================

Old spellings (``--nsamples``, ``--samples``) stay for one release as hidden aliases that
print a deprecation line on stderr (:class:`DeprecatedAlias`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

from devicemem.backends import HOST, MAX_MEMORY_ENV, DeviceMemory, MemoryView, SystemProbe, device_memory
from devicemem.units import parse_bytes

DEFAULT_NUM_SAMPLES = 1000
MAX_MEMORY_HELP = f"cap what devices may use, e.g. cpu=8GiB,cuda:0=20GiB (default: no cap beyond {MAX_MEMORY_ENV})"
SAFETY_FACTOR_HELP = "fraction of the usable memory to plan for, in (0, 1] (default: 0.8, or DEVICEMEM_SAFETY_FACTOR)"
DEVICE_HELP = "auto (the GPU with most usable memory when the work fits it, else the CPU), cpu, cuda, cuda:N or mps"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after each option's help, unless the help states its default itself,
    the default is None (then the help must say what happens) or the option is a flag."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.nargs == 0 or not action.option_strings:
            return text
        return super()._get_help_string(action)


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: it stores into the new option's ``dest`` and prints, on
    stderr, which spelling to use instead."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated, use {self.new} "
              "(the old spelling goes away in the next release)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {value}")
    return value


def add_option(parser: argparse.ArgumentParser, name: str, *, aliases: Sequence[str] = (), **kwargs: Any) -> None:
    """``parser.add_argument(name, **kwargs)``, and each of ``aliases`` as a hidden deprecated
    spelling of it."""
    action = parser.add_argument(name, **kwargs)
    for old in aliases:
        parser.add_argument(old, dest=action.dest, type=kwargs.get("type"), action=DeprecatedAlias, new=name,
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_verbosity(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """``-q/--quiet`` and ``-v/--verbose``, on the program (``top``) and on each subcommand, so
    that both ``prog -q cmd`` and ``prog cmd -q`` work (a subcommand's copy only overrides
    when given)."""
    unset = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only: no [MEMORY] lines, no progress bars",
                        **({"default": False} if top else unset))
    parser.add_argument("-v", "--verbose", action="count", help="also the debug lines (default: the [MEMORY] lines and warnings)",
                        **({"default": 0} if top else unset))


def add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars on stderr (default: when stderr is a terminal and not --quiet)")


def log_level(args: argparse.Namespace) -> int:
    """The log level ``-q`` / ``-v`` ask for: WARNING, DEBUG, else INFO (the ``[MEMORY]`` lines)."""
    if getattr(args, "quiet", False):
        return logging.WARNING
    return logging.DEBUG if getattr(args, "verbose", 0) else logging.INFO


def show_progress(args: argparse.Namespace) -> bool:
    """Whether to draw progress bars: as ``--progress`` says, else when stderr is a terminal and
    the run is not ``--quiet``."""
    if getattr(args, "progress", None) is not None:
        return bool(args.progress)
    return sys.stderr.isatty() and not getattr(args, "quiet", False)


def add_num_samples(parser: argparse.ArgumentParser, help: str, aliases: Sequence[str] = ("--nsamples",)) -> None:
    add_option(parser, "--num-samples", aliases=aliases, type=positive_int, default=DEFAULT_NUM_SAMPLES, metavar="S", help=help)


def add_memory(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--max-memory`` and ``--safety-factor``."""
    parser.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)
    parser.add_argument("--max-memory", default=None, metavar="DEVICE=SIZE,...", help=MAX_MEMORY_HELP)
    parser.add_argument("--safety-factor", type=float, default=None, metavar="F", help=SAFETY_FACTOR_HELP)


THREADS_DEFAULT = "DEVICEMEM_THREADS, else the cores this process may use"


def add_threads(parser: argparse.ArgumentParser, what: str, default: str = THREADS_DEFAULT) -> None:
    parser.add_argument("--threads", type=positive_int, default=None, metavar="K", help=f"CPU threads for {what} (default: {default})")


def add_json(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout (log lines stay on stderr)")


def add_assume(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--assume", default=None, metavar="DEVICE=SIZE,...",
                        help="plan for another machine: these devices with this much usable memory (default: this machine)")


def assumed_devices(text: str) -> dict[str, DeviceMemory]:
    """Hypothetical devices from "cpu=16GiB,cuda:0=80GB": usable memory as given."""
    found = {}
    for item in text.split(","):
        name, _, size = item.partition("=")
        name = name.strip()
        if not name or not size:
            raise ValueError(f"assume: expected DEVICE=SIZE,...; got {item!r}")
        usable = parse_bytes(size.strip(), "assume")
        found[name] = DeviceMemory(name, f"assumed {name}", usable, usable, None, usable, ("--assume",))
    return found


def plan_view(assume: str | None, max_memory: str | None) -> MemoryView:
    """The memory a plan is made against: this machine's (with ``max_memory``), or with
    ``assume`` the assumed devices as given (read through a probe that lists them) and, unless
    assumed too, this machine's host with ``max_memory``."""
    if not assume:
        return MemoryView.read(max_memory)
    devices = assumed_devices(assume)
    devices.setdefault(HOST, device_memory(HOST, max_memory=max_memory))
    settings = {key: value for key, value in os.environ.items() if key != MAX_MEMORY_ENV}  # applied to the host already
    return MemoryView.read(None, SystemProbe(environ=settings, listing=tuple(devices.values())))
