"""A technical fit as pictures: the loss and learning rate, convergence, the effects per group,
and the memory plans used, in one PNG or in an HTML page with the PNG embedded and the tables.

matplotlib draws with its Agg backend (no display needed); the figure reads the same
:class:`~bayesDREAM_ext.summary.FitRecord` fields as :mod:`bayesDREAM_ext.summary`.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bayesDREAM_ext.extras import require
from bayesDREAM_ext.summary import DEFAULT_ALPHA_EWMA, FitRecord, convergence, describe, ewma, plan_lines, summary
from devicemem.units import format_bytes

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TOP_FEATURES = 25
FORMATS = (".html", ".png")


def _figure_class() -> Any:
    """matplotlib's Figure, drawn by Agg without touching pyplot's global state."""
    return require("matplotlib.figure", "the report").Figure


STATUS_COLOURS = {"converged": "C2", "NOT converged": "C3", "stopped early, loss still falling": "C1"}
# Posterior means further than this many interquartile ranges beyond the quartiles are drawn
# at the axis' edge (Tukey's "far out" fence), so that one wild feature does not hide the rest.
FENCE_IQR = 3.0
BASELINE_LABELS = {"negbinom": "baseline mean count mu_ntc", "binomial": "baseline probability mu_ntc",
                   "multinomial": "baseline category probability"}


def _loss_panel(ax: Axes, fit: FitRecord) -> None:
    losses = np.asarray(fit.losses, dtype=np.float64)
    steps = np.arange(1, losses.size + 1)
    state = convergence(fit)
    ax.plot(steps, losses, color="0.7", lw=0.8, label="loss (-ELBO)")
    ax.plot(steps, ewma(losses), color="C0", lw=1.6, label=f"EWMA (alpha {DEFAULT_ALPHA_EWMA:g})")
    if (losses > 0).all() and losses.max() > 10 * losses.min():
        ax.set_yscale("log")
    ax.set(xlabel="SVI step", ylabel="loss", title=f"Training loss: {state.status()}")
    ax.title.set_color(STATUS_COLOURS[state.status()])
    ax.legend(loc="upper right", fontsize=8)
    ax.text(0.02, 0.03, f"{state.steps} steps, final {state.final_loss:.5g}\n"
            f"last {state.window} steps: {state.recent_fall:.0%} of the total fall (t = {state.t:.1f})",
            transform=ax.transAxes, fontsize=8, va="bottom")


def _shown_range(values: np.ndarray) -> tuple[float, float, float]:
    """(low, high, pad): limits that hold 0 and the values within FENCE_IQR interquartile
    ranges of the quartiles; the axis adds ``pad`` on each side, values beyond are clipped to
    the limits, so that they show inside the frame."""
    if values.size == 0:
        return -1.0, 1.0, 0.1
    q1, q3 = np.percentile(values, (25, 75))
    fence = FENCE_IQR * (q3 - q1)
    lo, hi = min(max(values.min(), q1 - fence), 0.0), max(min(values.max(), q3 + fence), 0.0)
    return float(lo), float(hi), 0.05 * (hi - lo) or 1.0


def _outside(rows: pd.DataFrame) -> np.ndarray:
    """Rows whose central interval excludes 0."""
    lo, hi = (rows[name].to_numpy() for name in rows.columns[rows.columns.str.startswith("effect_q")])
    return (lo > 0) | (hi < 0)


def _rate_panel(ax: Axes, fit: FitRecord) -> None:
    rates = np.asarray(fit.learning_rates, dtype=np.float64)
    ax.plot(np.arange(1, rates.size + 1), rates, color="C1")
    ax.set(xlabel="SVI step", ylabel="learning rate", title="Learning rate (OneCycle)")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))


def _effects_panel(ax: Axes, table: pd.DataFrame) -> None:
    fitted = table[table["fitted"]]
    low, high, pad = _shown_range(fitted["effect_mean"].to_numpy())
    bins = np.linspace(low, high, int(np.clip(2 * np.sqrt(max(len(fitted), 1)), 10, 60)) + 1)
    unit = "feature-categories" if "category" in table.columns else "features"
    beyond = 0
    for i, (group, rows) in enumerate(fitted.groupby("group", sort=False)):
        values = rows["effect_mean"].to_numpy()
        beyond += int(((values < low) | (values > high)).sum())
        ax.hist(np.clip(values, low, high), bins=bins, histtype="step", lw=1.6, color=f"C{i}",
                label=f"{group} vs {rows['baseline'].iloc[0]}: {int(_outside(rows).sum())} of {len(rows)} {unit} with interval excluding 0")
    ax.axvline(0.0, color="0.3", lw=0.8, ls="--")
    scale = str(table["effect_scale"].iloc[0]) if len(table) else ""
    note = f" ({beyond} beyond the axis, counted at its edges)" if beyond else ""
    ax.set(xlim=(low - pad, high + pad), xlabel=f"posterior mean effect ({scale}){note}", ylabel=unit, title="Effects per group")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.25)  # room for the legend above the bars
    if len(fitted):
        ax.legend(loc="upper left", fontsize=8, title=f"{table.attrs.get('interval', 0.9):.0%} interval", title_fontsize=8)


def _effect_vs_baseline_panel(ax: Axes, table: pd.DataFrame, distribution: str) -> None:
    fitted = table[table["fitted"]]
    low, high, pad = _shown_range(fitted["effect_mean"].to_numpy())
    for i, (group, rows) in enumerate(fitted.groupby("group", sort=False)):
        outside = _outside(rows)
        x, y = rows["mu_ntc_mean"].to_numpy(), rows["effect_mean"].to_numpy()
        clipped = (y < low) | (y > high)
        y = np.clip(y, low, high)
        ax.scatter(x[~outside], y[~outside], s=8, facecolors="none", edgecolors=f"C{i}", lw=0.6, alpha=0.6)
        ax.scatter(x[outside], y[outside], s=10, color=f"C{i}", label=f"{group} (filled: interval excludes 0)")
        ax.scatter(x[clipped], y[clipped], s=40, marker="x", color=f"C{i}")
    ax.axhline(0.0, color="0.3", lw=0.8, ls="--")
    if distribution == "negbinom":
        ax.set_xscale("log")
    baseline = BASELINE_LABELS.get(distribution, "baseline mean mu_ntc")
    ax.set(ylim=(low - pad, high + pad), xlabel=f"{baseline} (posterior mean)", ylabel="effect (posterior mean; x: beyond the axis)",
           title="Effect against the baseline")
    if len(fitted):
        ax.legend(loc="best", fontsize=8)


def _memory_panel(ax: Axes, fit: FitRecord) -> None:
    svi, pred = fit.svi_plan, fit.predictive_plan
    bars = [("SVI predicted", svi.predicted_peak_bytes, "C0"), ("SVI measured", getattr(svi, "measured_peak_bytes", None), "C2"),
            ("SVI budget", svi.budget_bytes, "0.6")]
    if pred is not None:
        bars += [("Predictive predicted", pred.predicted_peak_bytes, "C1"), ("Predictive budget", pred.budget_bytes, "0.6"),
                 ("results (host)", getattr(pred, "output_bytes", None), "C4")]
    shown = [(label, value, color) for label, value, color in bars if value]
    y = np.arange(len(shown))[::-1]
    ax.barh(y, [value for _, value, _ in shown], color=[color for _, _, color in shown])
    ax.set_xscale("log")
    ax.set_yticks(y, [label for label, _, _ in shown], fontsize=8)
    for row, (_, value, _) in zip(y, shown):
        ax.text(value, row, f" {format_bytes(value)}", va="center", fontsize=8)
    ax.set_xlim(right=max(value for _, value, _ in shown) * 30 if shown else 1)
    where = f"SVI on {svi.device}" + (f", Predictive on {pred.device}" if pred is not None else "")
    ax.set(xlabel="bytes (log scale)", title=f"Memory plans: {where}")


def figure(fit: FitRecord, table: pd.DataFrame | None = None) -> Figure:
    """The report's figure: loss, learning rate, effects per group, effect against baseline,
    the memory plans, and the fit's description."""
    table = summary(fit) if table is None else table
    fig = _figure_class()(figsize=(16, 9.5), layout="constrained")
    axes = fig.subplots(2, 3)
    _loss_panel(axes[0, 0], fit)
    _rate_panel(axes[0, 1], fit)
    _memory_panel(axes[0, 2], fit)
    _effects_panel(axes[1, 0], table)
    _effect_vs_baseline_panel(axes[1, 1], table, fit.distribution)
    text = axes[1, 2]
    text.axis("off")
    text.text(0.0, 1.0, _wrapped(describe(fit), 62), va="top", ha="left", family="monospace", fontsize=7.5, transform=text.transAxes)
    fitted = int(np.asarray(fit.feature_mask).sum())
    fig.suptitle(f"Technical fit ({fit.distribution}): {len(fit.group_levels)} groups, {fitted} features fitted")
    return fig


def _wrapped(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.fill(line, width, subsequent_indent="    ") for line in text.splitlines())


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _html(fit: FitRecord, table: pd.DataFrame, png: bytes) -> str:
    top = table[table["fitted"]].reindex(table["effect_mean"].abs().sort_values(ascending=False).index).dropna(subset=["effect_mean"])
    reasons = [("Training plan", getattr(fit.svi_plan, "reasons", ())), ("Predictive plan", getattr(fit.predictive_plan, "reasons", ()))]
    items = "".join(
        f"<h3>{title}</h3><ul>{''.join(f'<li>{html.escape(line)}</li>' for line in lines)}</ul>" for title, lines in reasons
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Technical fit report</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:1em auto}pre{background:#f4f4f4;padding:.6em}"
        "table{border-collapse:collapse;font-size:12px}td,th{padding:2px 6px;border-bottom:1px solid #ddd}</style></head><body>"
        f"<h1>Technical fit ({html.escape(fit.distribution)})</h1><pre>{html.escape(describe(fit))}</pre>"
        "<img alt='loss, learning rate, memory plans and effects' style='width:100%' "
        f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        f"<h2>Convergence</h2><p>{html.escape(convergence(fit).text())}</p>"
        f"<h2>Memory plans used</h2><ul>{''.join(f'<li>{html.escape(line)}</li>' for line in plan_lines(fit))}</ul>{items}"
        f"<h2>The {min(TOP_FEATURES, len(top))} largest effects</h2>{top.head(TOP_FEATURES).to_html(index=False, float_format='%.4g')}"
        f"<p>{html.escape(str(table.attrs.get('dispersion') or 'no dispersion parameter'))}</p></body></html>"
    )


def write_report(fit: FitRecord, path: str | Path) -> Path:
    """Write the report to ``path``: ``.png`` the figure alone, ``.html`` the figure embedded
    with the description, the plans' reasons and the largest effects. Returns the path."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"out: expected a path ending in {' or '.join(FORMATS)}; got {path.name!r}")
    table = summary(fit)
    png = _png(figure(fit, table))
    if path.suffix.lower() == ".png":
        path.write_bytes(png)
    else:
        path.write_text(_html(fit, table, png), encoding="utf-8")
    return path
