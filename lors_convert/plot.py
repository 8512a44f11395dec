"""Pictures: ranks and errors of a LORS checkpoint (`report --plot`), residual energy by rank (`inspect --plot`).

matplotlib is an optional extra (`pip install "lors-convert[plot]"`), imported here only when a picture is asked
for. Figures are drawn with matplotlib's `Figure` straight to PNG (the Agg renderer): no pyplot, no display, no
global backend state.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from lors_convert import LorsError
from lors_convert.factorize import break_even_cap

SIZE, DPI = (12, 7.5), 100  # 1200 x 750 pixels


def _matplotlib():
    try:
        import matplotlib.figure
        import matplotlib.ticker
    except ImportError as e:
        raise LorsError('--plot needs matplotlib: pip install "lors-convert[plot]"') from e
    return matplotlib


def check_plot_path(path: Path) -> None:
    """Refuse, before any work, a picture that could not be written (an existing file is replaced)."""
    if path.suffix.lower() != ".png":
        raise LorsError(f"{path}: --plot writes a PNG, the name must end in .png")
    if not path.parent.is_dir():
        raise LorsError(f"{path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise LorsError(f"{path}: is a folder")
    _matplotlib()


def _save(figure, path: Path) -> None:
    """Render under a temporary name in the same folder, then rename into place: never half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        figure.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _groups_legend(templates: list[str]) -> tuple[list[str], str]:
    """Short group names (without the prefix up to `{i}.` they all share, and without `.weight`) and a legend title."""
    prefixes = {t.partition("{i}.")[0] + "{i}." for t in templates}
    prefix = prefixes.pop() if len(prefixes) == 1 and all("{i}." in t for t in templates) else ""
    names = [t.removeprefix(prefix).removesuffix(".weight") for t in templates]
    return names, f"groups ({prefix}*)" if prefix else "groups"


def _colors(mpl, count: int) -> list:
    palette = mpl.colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(i % palette.N) for i in range(count)]


def plot_report(report: dict, path: Path) -> None:
    """Rank and relative error per layer, a line per group; layers stored dense marked X, kept-dense groups listed."""
    mpl = _matplotlib()
    groups = report["groups"]
    figure = mpl.figure.Figure(figsize=SIZE, layout="constrained")
    axes = figure.subplots(1 if report["from_scratch"] else 2, 1, sharex=True, squeeze=False)[:, 0]
    names, legend_title = _groups_legend([g["template"] for g in groups + report["kept_dense"]])
    dense_marker = {"marker": "X", "s": 110, "edgecolors": "black", "zorder": 3}
    for g, name, color in zip(groups, names, _colors(mpl, len(groups))):
        ranks, layers = g["ranks"]["per_layer"], g["layers"]
        rows, cols = g["shape"][0], math.prod(g["shape"][1:])
        shown = [break_even_cap(rows, cols) if r is None else r for r in ranks]
        errors = g["layer_errors"] or [g["rel_error"]] * len(layers)  # older files may have no per-layer errors
        what = f"{'with' if g['shared'] else 'no'} S, {g['saved']:.0%} saved"
        if not report["from_scratch"]:
            what += f", error {g['rel_error']:.2f}" + (f" (out {g['output_error']:.2f})" if "output_error" in g else "")
        for ax, values in zip(axes, (shown, errors)):
            ax.plot(layers, values, marker="o", color=color, label=f"{name}  ({what})")
            dense = [(x, y) for x, y, r in zip(layers, values, ranks) if r is None]
            if dense:
                ax.scatter(*zip(*dense), color=color, **dense_marker)
    if any(None in g["ranks"]["per_layer"] for g in groups):
        axes[0].scatter(
            [], [], color="white", label="layer stored dense (drawn at its break-even rank)", **dense_marker
        )
    for name in names[len(groups) :]:
        axes[0].plot([], [], " ", label=f"kept dense, not factored: {name}")
    axes[0].set(title="rank of each layer's residual factors B A", ylabel="rank")
    if len(axes) == 2:
        axes[1].set(title="reconstruction error of each layer", ylabel="relative error ‖W − Ŵ‖ / ‖W‖")
    for ax in axes:
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("layer index")
    axes[-1].xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, title=legend_title)
    s = report["stacked"]
    summary = f"{s['reduction']:.0%} fewer stacked parameters, " + (
        "initialised to train from scratch" if report["from_scratch"] else f"relative error {s['rel_error']:.2f}"
    )
    figure.suptitle(f"{Path(report['file']).name}: {summary}", fontweight="bold")
    _save(figure, path)


def plot_spectra(data: dict, spectra: list, path: Path) -> None:
    """Per group, the fraction of its residual energy (W_i − S, S the mean) that rank r keeps, summed over its
    layers; a dashed line at each --rank inspect was given, with what that rank saves in all."""
    mpl = _matplotlib()
    groups = data["groups"]
    figure = mpl.figure.Figure(figsize=SIZE, layout="constrained")
    ax = figure.subplots()
    names, legend_title = _groups_legend([g["template"] for g in groups])
    for g, measured, name, color in zip(groups, spectra, names, _colors(mpl, len(groups))):
        pooled = torch.stack(measured.shared).sum(0)
        residual = pooled.sum().item()
        kept = (pooled.cumsum(0) / max(residual, 1e-30)).tolist()
        share = residual / max(measured.norm_sq, 1e-30)
        ax.plot(range(1, len(kept) + 1), kept, color=color, label=f"{name}  (‖W − S‖² = {share:.0%} of ‖W‖²)")
        cap = break_even_cap(g["shape"][0], math.prod(g["shape"][1:]))
        if 1 <= cap <= len(kept):
            ax.plot(cap, kept[cap - 1], "o", color=color, markeredgecolor="black")
    ax.plot([], [], "o", color="white", markeredgecolor="black", label="break-even rank (beyond it: store dense)")
    for rank, reduction in data["reduction_at_rank"].items():
        if int(rank) >= 1:
            ax.axvline(int(rank), color="grey", linestyle="--", linewidth=1)
            ax.annotate(
                f"r={rank}\n{reduction:.0%} saved",
                (int(rank), 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -3),
                textcoords="offset points",
                va="top",
                fontsize=8,
                color="dimgrey",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlim(right=ax.get_xlim()[1] * 1.6)  # room for the last marker's note
    ax.xaxis.set_major_locator(mpl.ticker.LogLocator(base=2, numticks=30))  # every power of 2
    ax.xaxis.set_major_formatter(mpl.ticker.StrMethodFormatter("{x:g}"))
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.set(
        xlabel="rank r of every layer's factors (log scale)",
        ylabel="fraction of residual energy kept, Σᵢ top-r σ² / Σᵢ ‖Wᵢ − S‖²",
        title="residual energy kept by rank r, per group (S: the mean of its layers; dashed: the --rank settings)",
    )
    ax.legend(loc="lower right", title=legend_title, fontsize=9)
    figure.suptitle(f"{Path(data['file']).name}: residual spectra of {len(groups)} stacked groups", fontweight="bold")
    _save(figure, path)
