"""``bayesdream-ext``: the demo on synthetic data, ``fit-technical`` on files, and the plans.

    bayesdream-ext demo [--cells 2000 --features 1000 --groups 2 --niters 300 ...]
    bayesdream-ext fit-technical --counts FILE --meta FILE --group-col COL
        [--sum-factor-col COL] [--distribution D] [--device auto] [--nsamples S] --out FILE
        [--guide-state FILE]
    bayesdream-ext plan --cells N --features T --groups C [--distribution D] [--device D]
        [--max-memory ...] [--assume cpu=16GiB,cuda:0=80GB] [--json]
    bayesdream-ext plan-predictive --cells N --features T --groups C --samples S [--with-obs]
        [--guide G] [--device D] [--max-memory ...] [--results-on-disk] [--json]

Plan and memory lines go to stdout through the ``devicemem`` logger; progress bars to stderr.
Every option (and that --out can be written) is checked before any file is read or any
training starts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from bayesDREAM_ext.counts import scipy_sparse
from bayesDREAM_ext.data import DISTRIBUTIONS
from bayesDREAM_ext.memory import DTYPE_BYTES, FOOTPRINT_GUIDES, plan_technical, plan_training
from bayesDREAM_ext.training import DEFAULT_SCHEDULE, SCHEDULES
from devicemem.backends import HOST, MAX_MEMORY_ENV, DeviceMemory, MemoryView, SystemProbe, device_memory, parse_max_memory
from devicemem.checks import check_fraction, check_int, check_positive, check_seed
from devicemem.planner import resolve_safety_factor
from devicemem.units import format_bytes, parse_bytes

COUNT_SUFFIXES = (".csv", ".npz", ".mtx", ".h5ad")


@contextlib.contextmanager
def _log_to_stdout(quiet: bool, stream: Any = None) -> Iterator[None]:
    """Show devicemem's log lines on stdout (or ``stream``) for the length of one ``main`` call."""
    logger = logging.getLogger("devicemem")
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--nsamples", type=int, default=1000, help="posterior samples to draw (default 1000)")
    parser.add_argument("--niters", type=int, default=None, help="maximum SVI steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="base learning rate (OneCycle peak is 10x)")
    parser.add_argument("--schedule", default=DEFAULT_SCHEDULE, choices=SCHEDULES,
                        help=f"learning-rate schedule: onecycle (stepped) or bayesdream (as bayesDREAM runs it: 0.4 x lr throughout); default {DEFAULT_SCHEDULE}")
    parser.add_argument("--max-memory", default=None, help="caps, e.g. cpu=8GiB,cuda:0=20GiB")
    parser.add_argument("--safety-factor", type=float, default=None, help="fraction of usable memory to plan for")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no plan lines or progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bayesdream-ext", description="bayesDREAM's fit_technical, device-aware and memory-safe")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="fit synthetic data with known technical effects and report the recovery")
    demo.add_argument("--cells", type=int, default=2000)
    demo.add_argument("--features", type=int, default=1000)
    demo.add_argument("--groups", type=int, default=2)
    _common(demo)
    demo.set_defaults(niters=300, seed=0)
    fit = commands.add_parser("fit-technical", help="fit counts from a file and save the TechnicalFit")
    fit.add_argument("--counts", required=True, help=f"counts file ({', '.join(COUNT_SUFFIXES)})")
    fit.add_argument("--meta", required=True, help="CSV with one row per cell (index = cell names when the counts have them)")
    fit.add_argument("--group-col", required=True, help="meta column with each cell's technical group")
    fit.add_argument("--sum-factor-col", default=None, help="meta column with sum factors (default: library size)")
    fit.add_argument("--distribution", default="negbinom", choices=DISTRIBUTIONS)
    fit.add_argument("--denominator", default=None, help="denominator file for binomial (same format and shape as counts)")
    fit.add_argument("--cells-axis", type=int, default=0, choices=(0, 1), help="axis of the counts that holds cells (1 for genes x cells)")
    fit.add_argument("--out", required=True, help="where to save the fit (TechnicalFit.load reads it)")
    fit.add_argument("--guide-state", default=None, help="a trained guide's recovery file: draw the samples without training")
    fit.add_argument("--checkpoint", default=None, help="save the SVI state to this file every --checkpoint-every steps")
    fit.add_argument("--checkpoint-every", type=int, default=100)
    fit.add_argument("--resume", default=None, help="continue SVI from a checkpoint file")
    _common(fit)
    plan = commands.add_parser("plan", help="print the training and Predictive plans for a data size, without data")
    plan.add_argument("--cells", type=int, required=True)
    plan.add_argument("--features", type=int, required=True)
    plan.add_argument("--groups", type=int, required=True)
    plan.add_argument("--categories", type=int, default=1, help="categories per feature (multinomial)")
    plan.add_argument("--distribution", default="negbinom", choices=DISTRIBUTIONS)
    plan.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    plan.add_argument("--nsamples", type=int, default=1000, help="posterior samples Predictive draws (default 1000)")
    plan.add_argument("--max-memory", default=None, help="caps, e.g. cpu=8GiB,cuda:0=20GiB")
    plan.add_argument("--safety-factor", type=float, default=None, help="fraction of usable memory to plan for")
    plan.add_argument("--count-dtype", default="float32", choices=tuple(DTYPE_BYTES), help="smallest exact dtype of the counts (default float32)")
    plan.add_argument("--assume", default=None, metavar="DEVICE=SIZE,...",
                      help="plan for another machine: these devices with this much usable memory instead of this one's")
    plan.add_argument("--json", action="store_true", help="one JSON object: training and predictive plans (no log lines)")
    plan.add_argument("--quiet", action="store_true", help="no [MEMORY] lines, only the summary")
    plan.set_defaults(threads=None)
    _add_plan_predictive(commands)
    return parser


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {value}")
    return value


def _add_plan_predictive(commands: Any) -> None:
    """``plan-predictive``: the technical model's Predictive plan in detail (was ``devicemem plan``)."""
    parser = commands.add_parser(
        "plan-predictive", help="plan the technical model's Predictive from its shapes, and say why",
        description="Device, batch size and mode for a technical-model Predictive of N cells x T features, "
        "C groups and S samples, from the analytic footprint (no data needed).",
    )
    parser.add_argument("--cells", type=_positive_int, required=True, metavar="N", help="cells (N)")
    parser.add_argument("--features", type=_positive_int, required=True, metavar="T", help="features (T)")
    parser.add_argument("--groups", type=_positive_int, required=True, metavar="C", help="technical groups (C)")
    parser.add_argument("--samples", type=_positive_int, required=True, metavar="S", help="posterior samples (S)")
    parser.add_argument("--categories", type=_positive_int, default=1, metavar="K", help="categories (multinomial)")
    parser.add_argument("--distribution", choices=DISTRIBUTIONS, default="negbinom")
    parser.add_argument("--guide", choices=FOOTPRINT_GUIDES, default="normal", help="AutoNormal, AutoIAFNormal or AutoDelta")
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
        "--threads", dest="draw_threads", type=_positive_int, default=None, metavar="K",
        help="threads drawing the likelihood on the host (default: DEVICEMEM_THREADS, else the usable cores)",
    )
    parser.add_argument("--json", action="store_true", help="the Plan as JSON")
    parser.add_argument("--verbose", dest="quiet", action="store_false", help="also show the [MEMORY] lines as they are logged")
    parser.set_defaults(threads=None, quiet=True)


def run_plan_predictive(args: argparse.Namespace) -> int:
    """Print the technical model's Predictive plan, as a table with its reasons or as JSON."""
    plan = plan_technical(
        args.cells, args.features, args.groups, args.samples, n_categories=args.categories,
        distribution=args.distribution, guide=args.guide, with_obs=args.with_obs, device=args.device,
        minibatch_size=args.minibatch_size, safety_factor=args.safety_factor, max_memory=args.max_memory,
        output_bytes=0 if args.results_on_disk else None, threads=args.draw_threads,
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


def plan_predictive_main(argv: Sequence[str]) -> int:
    """``bayesdream-ext plan-predictive`` on ``argv``: what ``devicemem plan`` forwards to."""
    return main(["plan-predictive", *argv])


def _check_out(path: str) -> None:
    """ValueError unless ``path`` can be written, found by opening it for appending (and
    removing it again when it did not exist), so that a bad --out fails before training."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"--out: {path!r} is a directory; expected a file path")
    existed = target.exists()
    try:
        with open(target, "ab"):
            pass
    except OSError as exc:
        raise ValueError(f"--out: cannot write {path!r} ({exc.strerror})") from exc
    if not existed:
        target.unlink()


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the option for any bad value, before any file is read or training."""
    if args.command == "plan-predictive":  # argparse read the integers; the planner checks the rest
        return
    check_int(args.nsamples, "--nsamples")
    check_fraction(args.safety_factor, "--safety-factor", allow_none=True)
    if args.command == "plan":  # plans may name another machine's devices (--assume)
        parse_max_memory(args.max_memory, {})
        return
    check_int(args.niters, "--niters", allow_none=True)
    check_int(args.threads, "--threads", allow_none=True)
    check_positive(args.lr, "--lr")
    check_seed(args.seed, "--seed")
    if args.device == "auto":
        parse_max_memory(args.max_memory, {})
    else:
        device_memory(args.device, max_memory=args.max_memory)
    if args.command == "fit-technical":
        _check_out(args.out)


def read_matrix(path: str | Path) -> Any:
    """A counts matrix from .csv (first column = row names), .npz (scipy.sparse or one numpy
    array), .mtx (Matrix Market) or .h5ad (needs anndata)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in COUNT_SUFFIXES:
        raise ValueError(f"counts: unsupported file type {suffix!r}; expected one of {', '.join(COUNT_SUFFIXES)}")
    if not path.is_file():
        raise ValueError(f"counts: no such file {str(path)!r}")
    if suffix == ".csv":
        import pandas as pd

        return pd.read_csv(path, index_col=0)
    if suffix == ".mtx":
        scipy_sparse("counts")  # an install hint where scipy is missing
        from scipy.io import mmread

        return mmread(path)
    if suffix == ".h5ad":
        try:
            import anndata
        except ImportError as exc:
            raise ValueError("counts: reading .h5ad needs anndata (pip install 'devicemem[io]')") from exc
        return anndata.read_h5ad(path)
    with np.load(path) as stored:
        if {"format", "indptr", "indices", "data", "shape"} <= set(stored.files):  # scipy.sparse.save_npz's layout
            return scipy_sparse("counts").load_npz(path)
        if len(stored.files) != 1:
            raise ValueError(f"counts: {path} holds {len(stored.files)} arrays ({', '.join(stored.files)}); expected one")
        return stored[stored.files[0]]


def _cell_names(counts: Any, cells_axis: int) -> list[str] | None:
    if hasattr(counts, "obs_names"):
        return list(map(str, counts.obs_names))
    if hasattr(counts, "index") and hasattr(counts, "columns"):
        return list(map(str, counts.index if cells_axis == 0 else counts.columns))
    return None


def read_meta(path: str | Path, counts: Any, cells_axis: int, group_col: str, sum_factor_col: str | None) -> tuple[Any, Any]:
    """Groups and sum factors from the meta CSV, aligned to the counts' cell names when it has them."""
    import pandas as pd

    if not Path(path).is_file():
        raise ValueError(f"meta: no such file {str(path)!r}")
    meta = pd.read_csv(path, index_col=0)
    for column, what in ((group_col, "group-col"), (sum_factor_col, "sum-factor-col")):
        if column is not None and column not in meta.columns:
            raise ValueError(f"{what}: no column {column!r} in {path}; it has {', '.join(map(str, meta.columns))}")
    names = _cell_names(counts, cells_axis)
    if names is not None:
        meta.index = meta.index.map(str)
        missing = [name for name in names if name not in meta.index]
        if missing:
            raise ValueError(f"meta: {len(missing)} cell(s) of the counts are not in {path}, e.g. {missing[0]!r}")
        meta = meta.loc[names]
    groups = meta[group_col]
    return groups, None if sum_factor_col is None else meta[sum_factor_col].to_numpy()


def _fit_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        device=args.device, nsamples=args.nsamples, niters=args.niters, lr=args.lr, schedule=args.schedule, max_memory=args.max_memory,
        safety_factor=args.safety_factor, seed=args.seed, progress=not args.quiet,
    )


def run_demo(args: argparse.Namespace) -> int:
    from bayesDREAM_ext.fit import fit_technical
    from bayesDREAM_ext.synthetic import synthetic_technical

    start = time.perf_counter()
    data = synthetic_technical(args.cells, args.features, args.groups, seed=args.seed)
    print(f"Synthetic data: {args.cells} cells x {args.features} features, {args.groups} technical groups, known log2 effects")
    fit = fit_technical(data.counts, data.groups, data.sum_factors, **_fit_kwargs(args))
    recovered = fit.posterior_samples["log2_alpha_y"].mean(dim=0).numpy()
    enough = data.mu_true * data.sum_factors.mean() >= 1.0
    for c in range(args.groups - 1):
        r = np.corrcoef(recovered[c, enough], data.log2_alpha_true[c, enough])[0, 1]
        print(f"Recovered vs true log2 effect of group {c + 1}: Pearson r = {r:.3f} over {int(enough.sum())} features with mean count >= 1")
    t = fit.timings
    print(
        f"SVI: {len(fit.losses)} steps on {fit.svi_plan.device}, {t['svi_ms_per_step']:.0f} ms/step; "
        f"Predictive: {args.nsamples} samples on {fit.predictive_plan.device if fit.predictive_plan else '?'} in {t['predictive_s']:.2f} s; "
        f"total {time.perf_counter() - start:.1f} s"
    )
    return 0


def run_fit(args: argparse.Namespace) -> int:
    from bayesDREAM_ext.fit import fit_technical
    from bayesDREAM_ext.records import GuideState

    guide_state = None if args.guide_state is None else GuideState.load(args.guide_state)
    counts = read_matrix(args.counts)
    groups, sum_factors = read_meta(args.meta, counts, args.cells_axis, args.group_col, args.sum_factor_col)
    denominator = None if args.denominator is None else read_matrix(args.denominator)
    fit = fit_technical(
        counts, groups, sum_factors, distribution=args.distribution, denominator=denominator, cells_axis=args.cells_axis,
        guide_state=guide_state, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every, resume=args.resume,
        **_fit_kwargs(args),
    )
    fit.save(args.out)
    kept = int(fit.feature_mask.sum())
    print(f"Saved {args.out}: {args.nsamples} samples, {kept} of {fit.feature_mask.numel()} features fitted, groups {list(fit.group_levels)}")
    return 0


def _assumed(text: str) -> dict[str, DeviceMemory]:
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


def _plan_view(args: argparse.Namespace) -> MemoryView:
    """The memory both plans are made against: this machine's, or with ``--assume`` the assumed
    devices as given (read through a probe that lists them) and, unless assumed too, this
    machine's host with ``--max-memory``."""
    if not args.assume:
        return MemoryView.read(args.max_memory)
    assumed = _assumed(args.assume)
    assumed.setdefault(HOST, device_memory(HOST, max_memory=args.max_memory))
    settings = {key: value for key, value in os.environ.items() if key != MAX_MEMORY_ENV}  # applied to the host already
    return MemoryView.read(None, SystemProbe(environ=settings, listing=tuple(assumed.values())))


def run_plan(args: argparse.Namespace) -> int:
    """Print where and how SVI and Predictive would run for this size (no data, no training)."""
    view = _plan_view(args)
    safety, _ = resolve_safety_factor(args.safety_factor, view.environ)
    shape = (args.cells, args.features, args.groups)
    training = plan_training(
        *shape, args.categories, distribution=args.distribution, device=args.device, safety_factor=safety,
        count_dtype=args.count_dtype, view=view,
    )
    predictive = plan_technical(
        *shape, args.nsamples, n_categories=args.categories, distribution=args.distribution, device=args.device,
        safety_factor=args.safety_factor, view=view,
    )
    if args.json:
        extra = {"chunks_per_step": training.chunks_per_step, "host_bytes": training.host_bytes, "device_bytes": training.device_bytes}
        print(json.dumps({"training": {**dataclasses.asdict(training), **extra}, "predictive": dataclasses.asdict(predictive)}, indent=2))
        return 0
    layout = ("full-data steps" if training.chunk_cells is None else
              f"exact chunked gradient, {training.chunk_cells} cells per chunk, {training.chunks_per_step} chunks per step")
    where = f"on {training.device}" if training.data_on_device else "kept on the host, copied per chunk"
    print(f"Training: SVI on {training.device} ({'AutoNormal' if training.guide == 'normal' else 'AutoIAFNormal'}), {layout}")
    print(f"  counts {format_bytes(training.data_bytes)} ({training.data_dtype}) {where}; host {format_bytes(training.host_bytes)}, "
          f"device peak {format_bytes(training.device_bytes)} (budget {format_bytes(training.budget_bytes)})")
    print(f"Predictive: {predictive.num_samples} samples on {predictive.device} in {predictive.n_batches} "
          f"{'vectorised' if predictive.vectorized else 'sequential'} batch(es) of {predictive.batch_size}, "
          f"peak {format_bytes(predictive.predicted_peak_bytes)} (budget {format_bytes(predictive.budget_bytes)})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        as_json = getattr(args, "json", False)  # then log lines, warnings too, go to stderr
        with _log_to_stdout(args.quiet or as_json, sys.stderr if as_json else None):
            commands = {"demo": run_demo, "fit-technical": run_fit, "plan": run_plan, "plan-predictive": run_plan_predictive}
            return commands[args.command](args)
    except (ValueError, ImportError) as exc:
        parser.exit(2, f"bayesdream-ext: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
