"""Presentation: the report data of a LORS checkpoint, rich tables, JSON."""

from __future__ import annotations

import json
import statistics

from rich.markup import escape
from rich.table import Table

from lors_convert.checkpoint import TensorSource
from lors_convert.console import stderr, stdout
from lors_convert.factorize import capped, lors_params
from lors_convert.lors_format import GroupMeta, LorsMeta
from lors_convert.stacks import Stack


def rank_summary(ranks: list[int | None]) -> dict:
    """min/median/max over the factored layers; `dense` counts the layers stored dense (rank null)."""
    factored = [r for r in ranks if r is not None]
    return {
        "min": min(factored, default=0),
        "median": statistics.median(factored) if factored else 0,
        "max": max(factored, default=0),
        "dense": len(ranks) - len(factored),
        "per_layer": ranks,
    }


def build_report(source: TensorSource, meta: LorsMeta) -> dict:
    """Report data: per group and in total, counted from the tensors actually stored."""
    stored = sum(info.numel for info in source.info.values())
    groups = [
        {
            "template": g.template,
            "layers": g.layers,
            "shape": g.shape,
            "shared": g.shared,
            "ranks": rank_summary(g.ranks),
            "dense_params": g.dense_params,
            "lors_params": g.lors_params,
            "saved": 1 - g.lors_params / g.dense_params,
            "rel_error": g.rel_error,
            "layer_errors": g.layer_errors,
            **({"output_error": g.output_error} if g.output_error is not None else {}),
        }
        for g in meta.groups
    ]
    factored_dense = sum(g["dense_params"] for g in groups)
    factored_lors = sum(g["lors_params"] for g in groups)
    kept = [{"template": k.template, "layers": k.layers, "reason": k.reason} for k in meta.kept_dense]
    kept_params = sum(source.info[n].numel for n in _kept_stack_names(meta, source))
    stacked_dense, stacked_lors = factored_dense + kept_params, factored_lors + kept_params
    dense_total = stored - factored_lors + factored_dense
    after = sum(f.stat().st_size for f in source.files)
    return {
        "file": str(source.path),
        "source": meta.source.path,
        "settings": meta.settings,
        "calibrated": meta.calibration is not None,
        "calibration_data": (meta.calibration or {}).get("data"),
        "quality_target": (meta.calibration or {}).get("quality_target"),
        "from_scratch": meta.settings.get("init") == "scratch",
        "finetuned": meta.finetune is not None,
        "groups": groups,
        "kept_dense": kept,
        "stacked": {
            "dense_params": stacked_dense,
            "lors_params": stacked_lors,
            "reduction": 1 - stacked_lors / stacked_dense if stacked_dense else 0.0,
            "rel_error": _pooled_error(meta.groups, kept_params),
        },
        "total": {
            "dense_params": dense_total,
            "lors_params": stored,
            "reduction": 1 - stored / dense_total if dense_total else 0.0,
        },
        "bytes": {"before": meta.source.bytes, "after": after},
        "warnings": meta.warnings,
    }


def _kept_stack_names(meta: LorsMeta, source: TensorSource) -> list[str]:
    """Names of stacked tensors that stayed dense (their templates filled with each layer index)."""
    names = (k.template.replace("{i}", str(i)) for k in meta.kept_dense for i in k.layers)
    return [name for name in names if name in source.info]


def _pooled_error(groups: list[GroupMeta], kept_params: int) -> float:
    """Parameter-weighted RMS of the groups' relative errors; groups kept dense count with error 0."""
    weight = sum(g.dense_params for g in groups) + kept_params
    return (sum(g.rel_error**2 * g.dense_params for g in groups) / weight) ** 0.5 if weight else 0.0


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def print_report(report: dict, as_json: bool = False) -> None:
    for warning in report["warnings"]:
        stderr.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"LORS: {report['file']}", title_justify="left")
    for column in ("group", "layers", "shape", "S", "rank min/med/max", "dense", "LORS", "saved", "rel. error"):
        table.add_column(column, justify="left" if column == "group" else "right", no_wrap=True)
    for g in report["groups"]:
        r = g["ranks"]
        error = f"{g['rel_error']:.4f}" + (f" (out {g['output_error']:.4f})" if "output_error" in g else "")
        error = "from scratch" if report["from_scratch"] else error
        ranks = f"{r['min']}/{r['median']:g}/{r['max']}" if r["dense"] < len(g["layers"]) else ""
        ranks += f" +{r['dense']} dense" if r["dense"] else ""
        table.add_row(
            g["template"],
            str(len(g["layers"])),
            "×".join(map(str, g["shape"])),
            "yes" if g["shared"] else "no",
            ranks.strip(),
            human(g["dense_params"]),
            human(g["lors_params"]),
            f"{g['saved']:.1%}",
            error,
        )
    for k in report["kept_dense"]:
        table.add_row(
            k["template"], str(len(k["layers"])), "", "", "kept dense", "", "", "not factored", "-", style="dim"
        )
    b = report["bytes"]
    table.add_section()
    stacked_error = "" if report["from_scratch"] else f"{report['stacked']['rel_error']:.4f}"
    for label, totals, error in (
        ("stacked total", report["stacked"], stacked_error),
        ("whole checkpoint", report["total"], ""),
    ):
        dense, lors = human(totals["dense_params"]), human(totals["lors_params"])
        table.add_row(label, "", "", "", "", dense, lors, f"{totals['reduction']:.1%}", error, style="bold")
    stdout.print(table)
    stdout.print(
        f"file size: {human_bytes(b['before'])} -> {human_bytes(b['after'])}"
        "   rel. error = ‖W − Ŵ‖_F / ‖W‖_F over each group; S: stored with a shared matrix"
    )
    if report["calibration_data"]:
        stdout.print(f"calibrated on {escape(report['calibration_data'])}")
    if report["quality_target"]:
        q = report["quality_target"]
        tried = ", ".join(f"{t['reduction']:.1%} -> {t['ppl_ratio']:.2f}x" for t in q["trials"])
        stdout.print(
            f"--max-ppl-increase {q['max_ppl_increase']:g}: reduction {q['chosen_reduction']:.1%}, the largest whose "
            f"perplexity on {q['selection_lines']} lines after the calibration samples (original {q['dense_ppl']:.1f}) "
            f"stays within {q['max_ppl_increase']:g}x; measured: {tried}"
        )
    if any(g["ranks"]["dense"] for g in report["groups"]):
        stdout.print("+k dense: k layers stored whole (their factors would cost as many numbers as the matrix)")
    for k in report["kept_dense"]:
        stdout.print(f"[dim]kept dense: {escape(k['template'])}: {escape(k['reason'])}[/dim]")


def inspect_data(source: TensorSource, stacks: list[Stack], warnings: list[str], ranks: list[int]) -> dict:
    """What each fixed rank would save, group by group (shapes only: nothing is read or written)."""
    dense_total = sum(info.numel for info in source.info.values())
    stacked = sum(s.dense_params for s in stacks)
    groups = []
    for s in stacks:
        per_rank = {}
        for r in ranks:
            stored = lors_params(s.rows, s.cols, [capped(min(r, s.rows, s.cols), s.rows, s.cols)] * len(s.layers))
            per_rank[str(r)] = min(stored, s.dense_params)
        groups.append(
            {
                "template": s.template,
                "layers": s.layers,
                "shape": list(s.shape),
                "dtype": str(s.dtype).removeprefix("torch."),
                "dense_params": s.dense_params,
                "lors_params_at_rank": per_rank,
            }
        )
    at_rank = {str(r): sum(g["lors_params_at_rank"][str(r)] for g in groups) for r in ranks}
    return {
        "file": str(source.path),
        "total_params": dense_total,
        "stacked_params": stacked,
        "groups": groups,
        "stacked_lors_params_at_rank": at_rank,
        "reduction_at_rank": {r: 1 - p / stacked for r, p in at_rank.items()},
        "warnings": warnings,
    }


def print_inspect(data: dict, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
        return
    ranks = list(data["stacked_lors_params_at_rank"])
    table = Table(title=f"stacked groups in {data['file']}  (saved at each --rank)", title_justify="left")
    for column in ("group", "layers", "shape", "dense", *[f"r={r}" for r in ranks]):
        table.add_column(column, justify="left" if column == "group" else "right")
    for g in data["groups"]:
        saved = [f"{1 - g['lors_params_at_rank'][r] / g['dense_params']:.0%}" for r in ranks]
        table.add_row(
            g["template"], str(len(g["layers"])), "×".join(map(str, g["shape"])), human(g["dense_params"]), *saved
        )
    table.add_section()
    table.add_row(
        "stacked total",
        "",
        "",
        human(data["stacked_params"]),
        *[f"{data['reduction_at_rank'][r]:.0%}" for r in ranks],
        style="bold",
    )
    stdout.print(table)
    stdout.print(
        f"{human(data['stacked_params'])} of {human(data['total_params'])} parameters are in "
        f"{len(data['groups'])} stacked groups. Default conversion: --reduction 0.5."
    )
    for warning in data["warnings"]:
        stderr.print(f"[yellow]warning:[/yellow] {escape(warning)}")
