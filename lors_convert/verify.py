"""`lors-convert verify`: is a LORS checkpoint whole, and, given its source, does it say true things about it?"""

from __future__ import annotations

from pathlib import Path

import torch

from lors_convert.checkpoint import TensorSource, sha256_files
from lors_convert.hf import open_source
from lors_convert.lors_format import LorsMeta, consistency_problems, read_lors, reconstruction_errors


def tolerance(dtype: torch.dtype) -> float:
    """How far a recomputed relative error may stray from the recorded one: float32 rounding at least,
    the storage dtype's resolution when that is coarser (another machine may round differently)."""
    return max(1e-5, torch.finfo(dtype).eps)


def internal_problems(lors: TensorSource, meta: LorsMeta) -> list[str]:
    """Factors present with the implied shapes, finite values, and parameter counts that add up."""
    problems = consistency_problems(lors, meta)
    if problems:
        return problems
    for name in lors.info:
        tensor = lors.get(name)
        if (tensor.is_floating_point() or tensor.is_complex()) and not torch.isfinite(tensor).all():
            problems.append(f"{name!r} holds NaN or Inf")
    for g in meta.groups:
        rows, cols = g.rows_cols
        stored = sum(lors.info[key].numel for key in g.stored_shapes())
        for what, recorded, actual in (
            ("lors_params", g.lors_params, stored),
            ("dense_params", g.dense_params, len(g.layers) * rows * cols),
        ):
            if recorded != actual:
                problems.append(f"{g.template}: recorded {what} {recorded:,}, the tensors hold {actual:,}")
    return problems


def source_problems(lors: TensorSource, meta: LorsMeta, source_path: Path) -> list[str]:
    """The source is the one converted (sha256) and each group's error recomputed matches the recorded one."""
    source = open_source(source_path)
    recorded_sha = meta.source.sha256
    if sha256_files(source.files) != recorded_sha:
        return [f"{source_path}: sha256 differs from the one recorded ({recorded_sha}): not the converted source"]
    problems = []
    for g in meta.groups:
        missing = [n for n in g.names if n not in source.info or list(source.info[n].shape) != g.shape]
        if missing:
            problems.append(f"{g.template}: the source has no {missing[0]!r} of shape {g.shape}")
            continue
        error, _ = reconstruction_errors(lors, g, source.get)
        allowed = tolerance(lors.info[next(iter(g.stored_shapes()))].dtype)
        if not abs(error - g.rel_error) <= allowed:
            problems.append(
                f"{g.template}: relative error is {error:.6g}, recorded {g.rel_error:.6g} (tolerance {allowed:.1g})"
            )
    return problems


def verify(lors_path: Path, source_path: Path | None = None) -> dict:
    """Every problem found, one line each; an empty list means the checkpoint is sound."""
    lors, meta = read_lors(lors_path, check=False)
    problems = internal_problems(lors, meta)
    if source_path is not None and not problems:
        problems += source_problems(lors, meta, source_path)
    return {
        "file": str(lors_path),
        "source": str(source_path) if source_path else None,
        "groups": len(meta.groups),
        "ok": not problems,
        "problems": problems,
    }
