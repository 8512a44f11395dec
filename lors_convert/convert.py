"""The conversion pipeline: source checkpoint -> stacks -> shared matrix + truncated residuals -> LORS file.

Streaming: each group's mean is accumulated layer by layer, each residual is factored as it is read,
and factors go straight to the writer, so memory holds a few matrices plus the shared ones.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lors_convert import LorsError, __version__
from lors_convert.checkpoint import (SafetensorsWriter, TensorSource, check_output_path, dtype_name,
                                     sha256_files)
from lors_convert.factorize import (allocate_ranks, as_matrix, energy_rank, lors_params, low_rank, rel_error,
                                    seed_for, spectrum)
from lors_convert.lors_format import FORMAT_VERSION, METADATA_KEY, factor_keys, shared_key
from lors_convert.stacks import Stack, find_stacks

Progress = Callable[[str, int], Callable[[], None]]  # (description, total) -> advance()


@dataclass
class Settings:
    rank: int | None = None
    reduction: float | None = None
    energy: float | None = None
    dtype: torch.dtype | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    device: str = "cpu"  # where matrices are factored; not part of the output's description

    def validate(self) -> None:
        chosen = [n for n, v in (("--rank", self.rank), ("--reduction", self.reduction),
                                 ("--energy", self.energy)) if v is not None]
        if len(chosen) > 1:
            raise LorsError(f"choose one of --rank, --reduction, --energy (got {' and '.join(chosen)})")
        if not chosen:
            self.reduction = 0.5
        if self.rank is not None and self.rank < 0:
            raise LorsError(f"--rank must be 0 or more, got {self.rank}")
        if self.reduction is not None and not 0 <= self.reduction < 1:
            raise LorsError(f"--reduction must be in [0, 1), got {self.reduction}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise LorsError(f"--energy must be in (0, 1], got {self.energy}")

    def as_json(self) -> dict:
        return {"rank": self.rank, "reduction": self.reduction, "energy": self.energy, "shared": "mean",
                "dtype": dtype_name(self.dtype) if self.dtype else None, "include": self.include,
                "exclude": self.exclude, "seed": self.seed}


def no_progress(description: str, total: int) -> Callable[[], None]:
    return lambda: None


def mean_matrix(source: TensorSource, stack: Stack, out_dtype: torch.dtype, device: str) -> torch.Tensor:
    """The shared matrix, rounded to the storage dtype (residuals are taken against what is stored); on the CPU."""
    total = torch.zeros(stack.rows, stack.cols, device=device)
    for name in stack.names:
        total += as_matrix(source.get(name), device)
    return (total / len(stack.names)).to("cpu", out_dtype)


def check_finite(matrix: torch.Tensor, name: str) -> None:
    if not torch.isfinite(matrix).all():
        raise LorsError(f"{name}: weights contain NaN or Inf; refusing to factor them")


def plan_ranks(source: TensorSource, stacks: list[Stack], shared: list[torch.Tensor], settings: Settings,
               progress: Progress) -> list[list[int]]:
    """Ranks per group and layer for --rank, --energy or --reduction (the last two need spectra)."""
    if settings.rank is not None:
        return [[min(settings.rank, s.rows, s.cols)] * len(s.layers) for s in stacks]
    advance = progress("spectra", sum(len(s.layers) for s in stacks))
    spectra, norms_sq = [], []
    for stack, s_matrix in zip(stacks, shared):
        layer_spectra, norm_sq, shared_f32 = [], 0.0, as_matrix(s_matrix, settings.device)
        for name in stack.names:
            weight = as_matrix(source.get(name), settings.device)
            check_finite(weight, name)
            norm_sq += weight.square().sum().item()
            layer_spectra.append(spectrum(weight - shared_f32).cpu())
            advance()
        spectra.append(layer_spectra)
        norms_sq.append(norm_sq)
    if settings.energy is not None:
        return [[energy_rank(sq, settings.energy) for sq in layers] for layers in spectra]
    dense = sum(s.dense_params for s in stacks)
    shared_cost = sum(s.rows * s.cols for s in stacks)
    budget = int((1 - settings.reduction) * dense) - shared_cost
    if budget < 0:
        raise LorsError(f"--reduction {settings.reduction:g} is out of reach: the shared matrices alone keep "
                        f"{shared_cost / dense:.1%} of the stacked parameters, so at most "
                        f"{1 - shared_cost / dense:.3f} can be removed")
    return allocate_ranks(spectra, norms_sq, [s.rows + s.cols for s in stacks], budget)


def source_description(source: TensorSource) -> dict:
    return {"path": str(source.path.resolve()), "files": [f.name for f in source.files], "bytes": source.nbytes,
            "sha256": sha256_files(source.files)}


def convert(source: TensorSource, output: Path, settings: Settings, *, shard_size: int = 5 * 10**9,
            force: bool = False, progress: Progress = no_progress) -> tuple[list[Path], dict]:
    """Write the LORS checkpoint; returns the files written and the LORS metadata."""
    settings.validate()
    check_output_path(output, source.files, force)
    stacks, warnings = find_stacks(source.info, settings.include, settings.exclude)
    if not stacks:
        raise LorsError(f"{source.path}: no stacked layers found (no group of >= 2 same-shaped matrices "
                        "whose names differ only in a layer index)")
    out_dtype = lambda dtype: settings.dtype or dtype  # noqa: E731
    advance = progress("shared matrices", sum(len(s.layers) for s in stacks))
    shared = []
    for stack in stacks:
        shared.append(mean_matrix(source, stack, out_dtype(stack.dtype), settings.device))
        for _ in stack.names:
            advance()
        check_finite(shared[-1].float(), stack.template)
    ranks = plan_ranks(source, stacks, shared, settings, progress)
    meta = {"format_version": FORMAT_VERSION, "tool": f"lors-convert {__version__}",
            "source": source_description(source), "settings": settings.as_json(),
            "groups": [], "kept_dense": [], "dtypes": {}, "warnings": warnings}
    stacked_names = set()
    with SafetensorsWriter(output, shard_size) as writer:
        advance = progress("factoring", sum(len(s.layers) for s in stacks))
        for stack, s_matrix, group_ranks in zip(stacks, shared, ranks):
            stored = lors_params(stack.rows, stack.cols, group_ranks)
            if stored >= stack.dense_params:
                meta["kept_dense"].append({"template": stack.template, "layers": stack.layers,
                                           "reason": f"LORS would store {stored:,} numbers, dense {stack.dense_params:,}"})
                for _ in stack.names:
                    advance()
                continue
            stacked_names.update(stack.names)
            meta["groups"].append(factor_group(source, stack, s_matrix, group_ranks, writer, settings, advance))
        for name, info in source.info.items():
            if name in stacked_names:
                continue
            tensor = source.get(name)
            if settings.dtype is not None and tensor.dtype.is_floating_point and tensor.dtype != settings.dtype:
                meta["dtypes"][name] = dtype_name(tensor.dtype)
                tensor = tensor.to(settings.dtype)
            writer.add(name, tensor)
        files = writer.commit({"format": "pt", METADATA_KEY: json.dumps(meta, separators=(",", ":"))})
    return files, meta


def factor_group(source: TensorSource, stack: Stack, s_matrix: torch.Tensor, ranks: list[int],
                 writer: SafetensorsWriter, settings: Settings, advance: Callable[[], None]) -> dict:
    writer.add(shared_key(stack.template), s_matrix.reshape(stack.shape))
    shared_f32 = as_matrix(s_matrix, settings.device)
    err_sq_total, norm_sq_total, layer_errors = 0.0, 0.0, []
    for name, rank in zip(stack.names, ranks):
        weight = as_matrix(source.get(name), settings.device)
        check_finite(weight, name)
        norm_sq = torch.linalg.vector_norm(weight).item() ** 2
        residual = weight - shared_f32  # not in place: `weight` may be the source's own tensor
        del weight
        b, a = low_rank(residual, rank, seed_for(name, settings.seed))
        b, a = b.to(s_matrix.dtype), a.to(s_matrix.dtype)
        err_sq = torch.linalg.vector_norm(residual.addmm_(b.float(), a.float(), alpha=-1)).item() ** 2
        err_sq_total, norm_sq_total = err_sq_total + err_sq, norm_sq_total + norm_sq
        layer_errors.append(round(rel_error(err_sq, norm_sq), 6))
        a_key, b_key = factor_keys(name)
        writer.add(a_key, a)
        writer.add(b_key, b)
        advance()
    return {"template": stack.template, "layers": stack.layers, "names": stack.names,
            "shape": list(stack.shape), "dtype": dtype_name(stack.dtype), "ranks": ranks,
            "dense_params": stack.dense_params, "lors_params": lors_params(stack.rows, stack.cols, ranks),
            "rel_error": rel_error(err_sq_total, norm_sq_total), "layer_errors": layer_errors}
