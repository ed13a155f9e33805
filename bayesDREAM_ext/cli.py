"""``bayesdream-ext``: fit counts files, read the results, plan, and a demo on synthetic data.

    bayesdream-ext fit-technical --counts PATH [--meta FILE] --group-col COL
        [--ntc-col COL --ntc-value V [V ...]] [--num-samples S] [--niters N] --out fit.pt
    bayesdream-ext summary fit.pt [--csv effects.csv] [--json]
    bayesdream-ext report fit.pt --out report.html|report.png
    bayesdream-ext plan --cells N --features T --groups C [--assume cpu=16GiB,cuda:0=80GB] [--json]
    bayesdream-ext plan-predictive --cells N --features T --groups C [--num-samples S] [--with-obs] [--json]
    bayesdream-ext demo [--cells 2000 --features 1000 --groups 2 --niters 300]

Options follow the vocabulary shared with ``devicemem`` (:mod:`devicemem.cliargs`); every
option's help shows its default. Log lines (the ``[MEMORY]`` plans, warnings) and progress bars
go to stderr, results to stdout. Every option (and that --out can be written) is checked before
any file is read or any training starts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from bayesDREAM_ext.data import DISTRIBUTIONS
from bayesDREAM_ext.memory import DTYPE_BYTES, FOOTPRINT_GUIDES, GUIDE_CHOICES, plan_technical, plan_training
from bayesDREAM_ext.training import DEFAULT_SCHEDULE, SCHEDULES
from devicemem import logs
from devicemem.backends import device_memory, parse_max_memory
from devicemem.checks import check_fraction, check_int, check_positive, check_seed
from devicemem.cliargs import (
    THREADS_DEFAULT, HelpFormatter, add_assume, add_json, add_memory, add_num_samples, add_progress, add_threads,
    add_verbosity, log_level, plan_view, positive_int, show_progress,
)
from devicemem.planner import resolve_safety_factor
from devicemem.units import format_bytes

logger = logging.getLogger("devicemem.bayesdream")

NITERS_HELP = ("maximum SVI steps; training stops earlier once the loss settles "
               "(default: bayesDREAM's 50,000; 100,000 for multinomial)")
SUMMARY_TOP = 20


def _subcommand(commands: Any, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)
    add_verbosity(parser)
    return parser


def _add_training(parser: argparse.ArgumentParser, niters: int | None, seed: int | None) -> None:
    """The sampling, training, memory and thread options of the commands that fit."""
    group = parser.add_argument_group("training and sampling")
    add_num_samples(group, "posterior samples to draw (Pyro's num_samples)")
    group.add_argument("--niters", type=positive_int, default=niters, metavar="N",
                       help=NITERS_HELP if niters is None else "maximum SVI steps")
    group.add_argument("--lr", type=float, default=1e-3, help="base learning rate (OneCycle's peak is 10x)")
    group.add_argument("--schedule", default=DEFAULT_SCHEDULE, choices=SCHEDULES,
                       help="learning-rate schedule: onecycle (stepped) or bayesdream (as bayesDREAM runs it: 0.4 x lr throughout)")
    group.add_argument("--seed", type=int, default=seed, help="random seed" + (" (default: random)" if seed is None else ""))
    memory = parser.add_argument_group("memory and devices")
    add_memory(memory)
    add_threads(memory, "torch and the block-parallel draws",
                f"torch's own number for torch; {THREADS_DEFAULT}, for the draws")
    add_progress(parser)


def _add_fit(commands: Any) -> None:
    parser = _subcommand(commands, "fit-technical", "fit the technical model to a counts file and save the fit",
                         "Fit bayesDREAM's technical model to the NTC cells of a counts file (or 10x folder) and save "
                         "the fit (TechnicalFit.load reads it; bayesdream-ext summary / report show it).")
    data = parser.add_argument_group("input")
    data.add_argument("--counts", required=True, metavar="PATH",
                      help="a 10x folder (or its run/outs folder), 10x .h5, .h5ad, .mtx[.gz], .npz, .csv or .tsv[.gz]")
    data.add_argument("--meta", default=None, metavar="FILE",
                      help="cell metadata .csv/.tsv, one row per cell, first column the cell names (default: an .h5ad's obs)")
    data.add_argument("--group-col", required=True, metavar="COL", help="metadata column with each cell's technical group")
    data.add_argument("--sum-factor-col", default=None, metavar="COL",
                      help="metadata column with sum factors (default: library size / mean)")
    data.add_argument("--distribution", default="negbinom", choices=DISTRIBUTIONS, help="the observation model")
    data.add_argument("--denominator", default=None, metavar="PATH",
                      help="binomial's denominator, same format and shape as the counts (default: none)")
    data.add_argument("--cells-axis", type=int, default=None, choices=(0, 1),
                      help="override the detected orientation: 0 cells x features, 1 features x cells (default: detect)")
    data.add_argument("--layer", default=None, metavar="NAME", help=".h5ad: a layer, or raw (default: X)")
    data.add_argument("--feature-type", default="Gene Expression", metavar="TYPE", help="10x feature type to keep; all keeps every type")
    ntc = parser.add_argument_group("NTC cells", "the cells the technical model is fitted to")
    ntc.add_argument("--ntc-col", default=None, metavar="COL",
                     help="metadata column that marks the NTC cells (default: every cell is an NTC cell)")
    ntc.add_argument("--ntc-value", nargs="+", action="extend", default=None, metavar="V",
                     help="the value(s) of --ntc-col that mark NTC cells, e.g. ntc or NTC non-targeting (default: none)")
    out = parser.add_argument_group("output and recovery")
    out.add_argument("--out", required=True, metavar="FILE", help="where to save the fit (.pt)")
    out.add_argument("--guide", default="normal", choices=GUIDE_CHOICES, help="AutoNormal, AutoIAFNormal, or auto (IAF when it fits)")
    out.add_argument("--guide-state", default=None, metavar="FILE",
                     help="a trained guide's recovery file: draw the samples without training (default: train)")
    out.add_argument("--checkpoint", default=None, metavar="FILE",
                     help="save the SVI state to FILE every --checkpoint-every steps (default: no checkpoint)")
    out.add_argument("--checkpoint-every", type=positive_int, default=100, metavar="N", help="steps between checkpoints")
    out.add_argument("--resume", default=None, metavar="FILE", help="continue SVI from a checkpoint file (default: start afresh)")
    _add_training(parser, niters=None, seed=None)


def _add_results(commands: Any) -> None:
    summary = _subcommand(commands, "summary", "print a saved fit's description and largest effects; export the table",
                          "The fit's description and its largest effects; --csv writes the whole table: one row per "
                          "feature and non-baseline group (effect mean, sd, interval, mu_ntc, dispersion).")
    summary.add_argument("fit", metavar="FIT", help="a fit saved by fit-technical (or TechnicalFit.save)")
    summary.add_argument("--csv", default=None, metavar="FILE", help="write the whole table to FILE (default: print only)")
    summary.add_argument("--interval", type=float, default=0.9, metavar="P", help="probability of the central interval")
    summary.add_argument("--top", type=int, default=SUMMARY_TOP, metavar="N", help="rows printed, largest |effect_mean| first")
    add_json(summary, "the whole table (one object per row), instead of the text,")
    report = _subcommand(commands, "report", "draw a saved fit's report (.png, or .html with the tables)",
                         "Loss and learning rate, convergence, effects per group and the memory plans, as a PNG or an "
                         "HTML page with the picture, the plans' reasons and the largest effects.")
    report.add_argument("fit", metavar="FIT", help="a fit saved by fit-technical (or TechnicalFit.save)")
    report.add_argument("--out", required=True, metavar="FILE", help="report.png or report.html")


def _add_shapes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cells", type=positive_int, required=True, metavar="N", help="cells (N)")
    parser.add_argument("--features", type=positive_int, required=True, metavar="T", help="features (T)")
    parser.add_argument("--groups", type=positive_int, required=True, metavar="C", help="technical groups (C)")
    parser.add_argument("--categories", type=positive_int, default=1, metavar="K", help="categories per feature (multinomial)")
    parser.add_argument("--distribution", choices=DISTRIBUTIONS, default="negbinom", help="the observation model")


def _add_plans(commands: Any) -> None:
    plan = _subcommand(commands, "plan", "print where and how training and Predictive would run for a data size",
                       "The training plan (device, full-data or chunked steps) and the Predictive plan for N cells x "
                       "T features, from shapes alone: no data, no training.")
    _add_shapes(plan)
    add_num_samples(plan, "posterior samples Predictive draws")
    plan.add_argument("--count-dtype", default="float32", choices=tuple(DTYPE_BYTES), help="smallest exact dtype of the counts")
    add_memory(plan)
    add_threads(plan, "the block-parallel draws")
    add_assume(plan)
    add_json(plan, "the training and Predictive plans")
    predictive = _subcommand(commands, "plan-predictive", "plan the technical model's Predictive from its shapes, and say why",
                             "Device, batch size and mode for a technical-model Predictive of N cells x T features, C "
                             "groups and S samples, from the analytic footprint (no data needed).")
    _add_shapes(predictive)
    add_num_samples(predictive, "posterior samples (S)", aliases=("--samples", "--nsamples"))
    predictive.add_argument("--guide", choices=FOOTPRINT_GUIDES, default="normal", help="AutoNormal, AutoIAFNormal or AutoDelta")
    predictive.add_argument("--with-obs", action="store_true", help="also sample the observation site y [S, N, T]")
    predictive.add_argument("--minibatch-size", type=positive_int, default=None, metavar="B", help="samples per batch (default: planned)")
    add_memory(predictive)
    predictive.add_argument("--results-on-disk", action="store_true",
                            help="the results go to memmaps (Predictive(out=DIR)): do not count them against host memory")
    add_threads(predictive, "the block-parallel draws")
    add_assume(predictive)
    add_json(predictive, "the Plan")


def _add_demo(commands: Any) -> None:
    demo = _subcommand(commands, "demo", "fit synthetic data with known technical effects and report the recovery")
    demo.add_argument("--cells", type=positive_int, default=2000, metavar="N", help="cells")
    demo.add_argument("--features", type=positive_int, default=1000, metavar="T", help="features")
    demo.add_argument("--groups", type=positive_int, default=2, metavar="C", help="technical groups")
    _add_training(demo, niters=300, seed=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bayesdream-ext", formatter_class=HelpFormatter,
                                     description="bayesDREAM's fit_technical, device-aware and memory-safe, on single-cell files")
    add_verbosity(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_fit, _add_results, _add_plans, _add_demo):
        add(commands)
    return parser


def plan_predictive_main(argv: Sequence[str]) -> int:
    """``bayesdream-ext plan-predictive`` on ``argv``: what ``devicemem plan`` forwards to."""
    return main(["plan-predictive", *argv])


def _check_out(path: str, option: str = "--out") -> None:
    """ValueError unless ``path`` can be written, found by opening it for appending (and
    removing it again when it did not exist), so that a bad --out fails before training."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{option}: {path!r} is a directory; expected a file path")
    existed = target.exists()
    try:
        with open(target, "ab"):
            pass
    except OSError as exc:
        raise ValueError(f"{option}: cannot write {path!r} ({exc.strerror})") from exc
    if not existed:
        target.unlink()


def _check_results(args: argparse.Namespace) -> None:
    """summary / report: the fit file exists and the outputs can be written."""
    if not Path(args.fit).is_file():
        raise ValueError(f"FIT: no such file {args.fit!r}")
    if args.command == "report":
        from bayesDREAM_ext.report import FORMATS

        if Path(args.out).suffix.lower() not in FORMATS:
            raise ValueError(f"--out: expected a path ending in {' or '.join(FORMATS)}; got {args.out!r}")
        _check_out(args.out)
    else:
        if not 0 < args.interval < 1:
            raise ValueError(f"--interval: expected a probability in (0, 1); got {args.interval}")
        if args.csv is not None:
            _check_out(args.csv, "--csv")


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the option for any bad value, before any file is read or training."""
    if args.command in ("summary", "report"):
        _check_results(args)
        return
    check_fraction(args.safety_factor, "--safety-factor", allow_none=True)
    if args.command in ("plan", "plan-predictive"):  # plans may name another machine's devices (--assume)
        parse_max_memory(args.max_memory, {})
        return
    check_int(args.niters, "--niters", allow_none=True)
    check_positive(args.lr, "--lr")
    check_seed(args.seed, "--seed")
    if args.device == "auto":
        parse_max_memory(args.max_memory, {})
    else:
        device_memory(args.device, max_memory=args.max_memory)
    if args.command == "fit-technical":
        if args.ntc_value is not None and args.ntc_col is None:
            raise ValueError("--ntc-value: needs --ntc-col, the metadata column to compare it with")
        if args.ntc_col is not None and args.ntc_value is None:
            raise ValueError("--ntc-col: needs --ntc-value, the value(s) that mark NTC cells")
        _check_out(args.out)


def _fit_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        device=args.device, nsamples=args.num_samples, niters=args.niters, lr=args.lr, schedule=args.schedule, max_memory=args.max_memory,
        safety_factor=args.safety_factor, seed=args.seed, progress=show_progress(args), threads=args.threads,
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
        f"Predictive: {args.num_samples} samples on {fit.predictive_plan.device if fit.predictive_plan else '?'} "
        f"in {t['predictive_s']:.2f} s; "
        f"total {time.perf_counter() - start:.1f} s"
    )
    return 0


def run_fit(args: argparse.Namespace) -> int:
    from bayesDREAM_ext.fit import fit_technical
    from bayesDREAM_ext.ntc import ALL_CELLS_NTC
    from bayesDREAM_ext.readers import read_counts
    from bayesDREAM_ext.records import GuideState

    guide_state = None if args.guide_state is None else GuideState.load(args.guide_state)
    feature_type = None if args.feature_type == "all" else args.feature_type
    counts = read_counts(args.counts, meta=args.meta, cells_axis=args.cells_axis, layer=args.layer, feature_type=feature_type)
    logger.info("counts: %d cells x %d features from %s (%s)", *counts.shape, counts.source, counts.orientation)
    denominator = None if args.denominator is None else read_counts(
        args.denominator, cells_axis=counts.cells_axis, layer=args.layer, feature_type=feature_type, meta=args.meta)
    if args.ntc_col is None:
        logger.warning(ALL_CELLS_NTC)
    fit = fit_technical(
        counts, args.group_col, args.sum_factor_col, distribution=args.distribution, denominator=denominator,
        ntc_col=args.ntc_col, ntc_value=args.ntc_value, guide=args.guide, guide_state=guide_state,
        checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every, resume=args.resume, **_fit_kwargs(args),
    )
    fit.save(args.out)
    print(f"Saved {args.out}")
    print(fit)
    print(f"Next: bayesdream-ext summary {args.out} --csv effects.csv; bayesdream-ext report {args.out} --out report.html")
    return 0


def run_summary(args: argparse.Namespace) -> int:
    from bayesDREAM_ext.records import TechnicalFit

    fit = TechnicalFit.load(args.fit)
    table = fit.summary(args.interval)
    if args.csv is not None:
        table.to_csv(args.csv, index=False)
        logger.info("wrote %d rows to %s", len(table), args.csv)
    if args.json:
        print(table.to_json(orient="records", indent=1))
        return 0
    print(fit)
    top = table.reindex(table["effect_mean"].abs().sort_values(ascending=False, na_position="last").index).head(args.top)
    print(f"\nLargest {len(top)} of {len(table)} effects ({table.attrs['interval']:.0%} intervals):")
    print(top.drop(columns=["baseline", "effect_scale"]).to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    return 0


def run_report(args: argparse.Namespace) -> int:
    from bayesDREAM_ext.records import TechnicalFit

    path = TechnicalFit.load(args.fit).report(args.out)
    print(f"Wrote {path}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    """Print where and how SVI and Predictive would run for this size (no data, no training)."""
    view = plan_view(args.assume, args.max_memory)
    safety, _ = resolve_safety_factor(args.safety_factor, view.environ)
    shape = (args.cells, args.features, args.groups)
    training = plan_training(
        *shape, args.categories, distribution=args.distribution, device=args.device, safety_factor=safety,
        count_dtype=args.count_dtype, view=view,
    )
    predictive = plan_technical(
        *shape, args.num_samples, n_categories=args.categories, distribution=args.distribution, device=args.device,
        safety_factor=args.safety_factor, view=view, threads=args.threads,
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


def run_plan_predictive(args: argparse.Namespace) -> int:
    """Print the technical model's Predictive plan, as a table with its reasons or as JSON."""
    plan = plan_technical(
        args.cells, args.features, args.groups, args.num_samples, n_categories=args.categories,
        distribution=args.distribution, guide=args.guide, with_obs=args.with_obs, device=args.device,
        minibatch_size=args.minibatch_size, safety_factor=args.safety_factor, view=plan_view(args.assume, args.max_memory),
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


COMMANDS = {"demo": run_demo, "fit-technical": run_fit, "summary": run_summary, "report": run_report,
            "plan": run_plan, "plan-predictive": run_plan_predictive}


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the command (and put back after)."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        threads = args.threads if args.command in ("demo", "fit-technical") else None  # the plans pass theirs on
        with logs.shown(log_level(args)), _torch_threads(threads):
            return COMMANDS[args.command](args)
    except (ValueError, ImportError) as exc:
        parser.exit(2, f"bayesdream-ext: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
