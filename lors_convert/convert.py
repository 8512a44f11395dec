"""The conversion pipeline: source checkpoint -> stacks -> shared matrix + truncated residuals -> LORS file.

Streaming: each group's mean is accumulated layer by layer, each residual is factored as it is read,
and factors go straight to the writer, so memory holds a few matrices plus the shared ones.

Every matrix is handled in out x in orientation (a GPT-2 Conv1D weight is transposed on the way in and
its factors on the way out), so that calibration can weight the input side: the objective of layer i is
‖(W_i − Ŵ_i) K_i^{1/2}‖_F with K_i = C_i + λI when calibrated and K_i = I otherwise.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lors_convert import LorsError, __version__
from lors_convert.checkpoint import (SafetensorsWriter, TensorSource, check_output_path, dtype_name,
                                     hashing_in_background)
from lors_convert.factorize import (allocate_ranks, as_matrix, energy_rank, lors_params, metric_energy,
                                    metric_low_rank, metric_spectrum, rel_error, seed_for, tail)
from lors_convert.lors_format import FORMAT_VERSION, METADATA_KEY, factor_keys, shared_key
from lors_convert.stacks import Stack, find_stacks

Progress = Callable[[str, int], Callable[[], None]]  # (description, total) -> advance()
SHARED_CHOICES = ("auto", "mean", "refit", "none")
REFIT_MAX_ITERS, REFIT_TOL = 50, 1e-6
# --sequential's correction is a regression from the drifted inputs to the original ones; with the metric's small
# damping it fits noise in low-energy directions (MiniLM at 50%: cos 0.734 vs 0.761 with this ridge, README).
SEQUENTIAL_RIDGE = 1.0


@dataclass
class Settings:
    rank: int | None = None
    reduction: float | None = None
    energy: float | None = None
    shared: str = "auto"
    dtype: torch.dtype | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    calibrate: list[Path] = field(default_factory=list)
    calib_samples: int = 256
    calib_max_length: int = 128
    damping: float = 0.01
    sequential: bool = False
    model_factory: str | None = None
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
        if self.shared not in SHARED_CHOICES:
            raise LorsError(f"--shared must be one of {', '.join(SHARED_CHOICES)}, got {self.shared!r}")
        if self.calib_samples < 1 or self.calib_max_length < 1:
            raise LorsError("--calib-samples and --calib-max-length must be at least 1")
        if self.sequential and not self.calibrate:
            raise LorsError("--sequential needs --calibrate (it recalibrates layer after layer)")
        if not 0 <= self.damping:
            raise LorsError(f"--damping must be 0 or more, got {self.damping}")
        if not 0 <= self.seed < 2**32:
            raise LorsError(f"--seed must be in [0, 2**32), got {self.seed}")

    def as_json(self) -> dict:
        calibration = ({"calibrate": [str(p) for p in self.calibrate], "calib_samples": self.calib_samples,
                        "calib_max_length": self.calib_max_length, "damping": self.damping,
                        "sequential": self.sequential}
                       if self.calibrate else {})
        return {"rank": self.rank, "reduction": self.reduction, "energy": self.energy, "shared": self.shared,
                "dtype": dtype_name(self.dtype) if self.dtype else None, "include": self.include,
                "exclude": self.exclude, "seed": self.seed, **calibration}


@dataclass
class Group:
    """One stack on its way through the pipeline."""

    stack: Stack
    device: str = "cpu"
    transposed: bool = False  # stored as in x out (Conv1D)
    metrics: list[torch.Tensor] | None = None  # K_i = C_i + λI per layer (float64), when calibrated
    covariances: list[torch.Tensor] | None = None  # C_i, for reporting the output error
    shared: bool = True
    shared_matrix: torch.Tensor | None = None  # float32, out x in, already rounded to the storage dtype
    ranks: list[int] = field(default_factory=list)
    spectra: list[torch.Tensor] = field(default_factory=list)
    spectra_unshared: list[torch.Tensor] = field(default_factory=list)
    norm_sq: float = 0.0
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # from --sequential

    def residual(self, matrix: torch.Tensor) -> torch.Tensor:
        """W − S as a new tensor (a copy of W when unshared), so callers may change it in place."""
        return matrix - self.shared_matrix if self.shared else matrix.clone()

    @property
    def kept_dense(self) -> bool:
        return lors_params(*self.out_in, self.ranks, self.shared) >= self.stack.dense_params

    @property
    def out_in(self) -> tuple[int, int]:
        rows, cols = self.stack.rows, self.stack.cols
        return (cols, rows) if self.transposed else (rows, cols)


def no_progress(description: str, total: int) -> Callable[[], None]:
    return lambda: None


LARGEST = 1e15  # beyond this, sums of squares in float32 arithmetic can overflow


def squared_norm(matrix: torch.Tensor) -> float:
    return torch.linalg.vector_norm(matrix).item() ** 2


def check_finite(matrix: torch.Tensor, name: str) -> None:
    low, high = torch.aminmax(matrix)  # one pass; NaN propagates and fails both comparisons
    if not (-LARGEST <= low.item() and high.item() <= LARGEST):
        raise LorsError(f"{name}: weights contain NaN or Inf (or magnitudes above {LARGEST:g}); "
                        "refusing to factor them")


def read_matrix(source: TensorSource, group: Group, i: int) -> torch.Tensor:
    name = group.stack.names[i]
    matrix = as_matrix(source.get(name), group.device)
    check_finite(matrix, name)
    return matrix.T if group.transposed else matrix


def metric(group: Group, i: int) -> torch.Tensor | None:
    return group.metrics[i] if group.metrics is not None else None


# ---------------------------------------------------------------- planning


def mean_matrix(source: TensorSource, group: Group, out_dtype: torch.dtype) -> torch.Tensor:
    """The shared matrix, rounded to the storage dtype (residuals are taken against what is stored)."""
    total = None
    for i in range(len(group.stack.names)):
        matrix = read_matrix(source, group, i)
        total = matrix.clone() if total is None else total.add_(matrix)  # a copy: the first may be the source's
    return (total / len(group.stack.names)).to(out_dtype).float()


def measure(source: TensorSource, groups: list[Group], unshared: bool, advance: Callable[[], None]) -> None:
    """Spectra of each layer's (weighted) residual, and of the layer itself when the unshared form is considered."""
    for group in groups:
        for i in range(len(group.stack.names)):
            matrix, k = read_matrix(source, group, i), metric(group, i)
            group.norm_sq += metric_energy(matrix, k)
            if group.shared:
                group.spectra.append(metric_spectrum(matrix - group.shared_matrix, k).cpu())
            if unshared:
                group.spectra_unshared.append(metric_spectrum(matrix, k).cpu())
            advance()


def plan_ranks(source: TensorSource, groups: list[Group], settings: Settings, progress: Progress) -> None:
    """Choose, per group, shared or not and the rank of every layer."""
    rows_cols = [g.out_in for g in groups]
    auto = settings.shared == "auto"
    if settings.rank is not None and not auto:
        for group, (rows, cols) in zip(groups, rows_cols):
            group.ranks = [min(settings.rank, rows, cols)] * len(group.stack.names)
        return
    measure(source, groups, auto or settings.shared == "none",
            progress("spectra", sum(len(g.stack.names) for g in groups)))
    costs = [rows + cols for rows, cols in rows_cols]
    if settings.rank is not None:
        ranks = [[min(settings.rank, rows, cols)] * len(g.stack.names) for g, (rows, cols) in zip(groups, rows_cols)]
    elif settings.energy is not None:
        ranks = [[energy_rank(sq, settings.energy) for sq in (g.spectra or g.spectra_unshared)] for g in groups]
    else:
        dense = sum(g.stack.dense_params for g in groups)
        shared_cost = sum(rows * cols for g, (rows, cols) in zip(groups, rows_cols) if g.shared)
        budget = int((1 - settings.reduction) * dense) - shared_cost
        if budget < 0 and auto:  # sharing alone is over budget: store every group unshared
            for group in groups:
                group.shared = False
            budget = int((1 - settings.reduction) * dense)
        if budget < 0:
            raise LorsError(f"--reduction {settings.reduction:g} is out of reach: the shared matrices alone keep "
                            f"{shared_cost / dense:.1%} of the stacked parameters, so at most "
                            f"{1 - shared_cost / dense:.3f} can be removed (or use --shared none)")
        ranks = allocate_ranks([g.spectra if g.shared else g.spectra_unshared for g in groups],
                               [g.norm_sq for g in groups], costs, budget)
    for group, group_ranks, cost, (rows, cols) in zip(groups, ranks, costs, rows_cols):
        group.ranks = group_ranks
        if auto and group.shared:
            # The same parameter budget without a shared matrix buys rows*cols/(rows+cols) more rank units.
            budget = lors_params(rows, cols, group_ranks)
            unshared = allocate_ranks([group.spectra_unshared], [group.norm_sq], [cost], budget)[0]
            if tail(group.spectra_unshared, unshared) < tail(group.spectra, group_ranks):
                group.shared, group.ranks, group.shared_matrix = False, unshared, None


def refit_shared(source: TensorSource, group: Group, out_dtype: torch.dtype, seed: int) -> list[float]:
    """Alternate (a) factoring residuals with S fixed and (b) the closed-form S, while the objective falls.

    J(S) = Σ_i tr((D_i − S) K_i (D_i − S)ᵀ) with D_i = W_i − B_i A_i is quadratic in S: with P = Σ D_i K_i,
    Q = Σ K_i (K_i = I in weight space), J(S) = Σ tr(D_i K_i D_iᵀ) − 2⟨P, S⟩ + ⟨S Q, S⟩ and S* = P Q⁻¹.
    Returns the objective after every half-step; the S kept is the one with the lowest objective.
    """
    layers = len(group.stack.names)
    history, best = [], (float("inf"), group.shared_matrix)
    current = group.shared_matrix
    for _ in range(REFIT_MAX_ITERS):
        constant, p_acc, q_acc = 0.0, 0.0, 0.0
        for i in range(layers):
            matrix, k = read_matrix(source, group, i), metric(group, i)
            b, a = metric_low_rank(matrix - current, k, group.ranks[i], seed_for(group.stack.names[i], seed))
            rest = (matrix - b.to(out_dtype).float() @ a.to(out_dtype).float()).double()
            weighted_rest = rest if k is None else rest @ k
            constant += (weighted_rest * rest).sum().item()
            p_acc = p_acc + weighted_rest
            q_acc = q_acc + (0 if k is None else k)

        def objective(s: torch.Tensor) -> float:
            s = s.double()
            quad = (s.square().sum() * layers) if group.metrics is None else ((s @ q_acc) * s).sum()
            return constant - 2 * (p_acc * s).sum().item() + quad.item()

        after_factoring = objective(current)
        history.append(after_factoring)
        if after_factoring < best[0]:
            best = (after_factoring, current)
        if len(history) > 1 and after_factoring > history[-2] * (1 + 1e-9):
            break  # an inexact factor step raised the objective: keep the best S seen
        solved = p_acc / layers if group.metrics is None else torch.linalg.solve(q_acc, p_acc.T).T
        candidate = solved.to(out_dtype).float()
        after_solve = objective(candidate)
        if after_solve > after_factoring:  # storage rounding can undo a tiny gain
            break
        history.append(after_solve)
        converged = after_factoring - after_solve <= REFIT_TOL * max(after_factoring, 1e-30)
        current = candidate
        if converged:
            break
    group.shared_matrix = best[1]
    return history


# ---------------------------------------------------------------- writing


def source_description(source: TensorSource) -> dict:
    return {"path": str(source.path.resolve()), "files": [f.name for f in source.files], "bytes": source.nbytes,
            "sha256": None}  # filled in at the end: the hash is computed in the background


def calibration_inputs(source: TensorSource, settings: Settings) -> tuple[torch.nn.Module, list[dict]]:
    """The dense model with the source's weights and the calibration batches."""
    from lors_convert.calibrate import tensor_batches, text_batches
    from lors_convert.hf import architecture_dir, dense_model, load_tokenizer

    model = dense_model(source.path, settings.model_factory)
    if settings.model_factory:
        return model, tensor_batches(settings.calibrate, settings.calib_samples)
    tokenizer = load_tokenizer(architecture_dir(source.path))
    return model, text_batches(tokenizer, settings.calibrate, settings.calib_samples, settings.calib_max_length,
                               settings.seed)


def compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def damped(covariance: torch.Tensor, damping: float) -> torch.Tensor:
    """K = C + λI with λ relative to the mean input energy, so rank-deficient covariances still work."""
    return covariance + damping * covariance.diagonal().mean() * torch.eye(len(covariance), dtype=covariance.dtype)


def calibrate_groups(model: torch.nn.Module, batches: list[dict], groups: list[Group], settings: Settings) -> dict:
    from lors_convert.calibrate import collect

    calibration = collect(model, [g.stack for g in groups], batches, compute_device())
    for group in groups:
        if all(name in calibration.covariances for name in group.stack.names):
            group.transposed = group.stack.names[0] in calibration.transposed
            group.covariances = [calibration.covariances.pop(name) for name in group.stack.names]
            group.metrics = [damped(c, settings.damping).to(group.device) for c in group.covariances]
    return {"samples": len(batches), "tokens": calibration.tokens,
            "groups": sum(g.metrics is not None for g in groups)}


def sequential_factors(source: TensorSource, original: torch.nn.Module, batches: list[dict], groups: list[Group],
                       settings: Settings, out_dtype: Callable[[Group], torch.dtype], progress: Progress) -> None:
    """--sequential: factor the calibrated layers in layer-index order, each against the inputs it receives once
    the layers before it are converted, so their errors are corrected instead of compounded.

    With X the layer's inputs in the original model and X̂ those in the converted one, the target
    T = W (XᵀX̂ + μI)(X̂ᵀX̂ + μI)⁻¹ is the ridge regression of the original outputs X Wᵀ on X̂ (T = W when nothing
    before the layer changed), and B A minimises ‖(T − S − B A) K^{1/2}‖² with K = X̂ᵀX̂ + λI.
    """
    from lors_convert.calibrate import collect_pair
    from lors_convert.nn import state_prefix

    device = compute_device()
    converted = copy.deepcopy(original)  # collect() already moved the original to the device
    prefix = state_prefix(converted, [n for g in groups for n in g.stack.names])
    todo = [g for g in groups if g.metrics is not None and not g.kept_dense]
    advance = progress("sequential", sum(len(g.stack.names) for g in todo))
    for layer in sorted({index for g in todo for index in g.stack.layers}):
        here = [(g, i) for g in todo for i, index in enumerate(g.stack.layers) if index == layer]
        covariances, cross = collect_pair(original, converted, [g.stack.names[i] for g, i in here], batches,
                                          device)
        for group, i in here:
            name = group.stack.names[i]
            if name not in covariances:  # never reached by the samples: factored like the others at write time
                advance()
                continue
            covariance = covariances[name]
            k = damped(covariance, settings.damping)
            weights = read_matrix(source, group, i).cpu().double()
            ridge = damped(covariance, SEQUENTIAL_RIDGE)
            target = torch.linalg.solve(ridge, weights @ (cross[name].T + ridge - covariance), left=False)
            b, a = factor_layer(group, i, group.residual(target.float().to(group.device)), k.to(group.device),
                                out_dtype(group), settings.seed)
            group.factors[i] = (b, a)
            approx = b.float() @ a.float()
            if group.shared:
                approx += group.shared_matrix
            module = converted.get_submodule(prefix + name.removesuffix(".weight"))
            with torch.no_grad():
                module.weight.copy_(approx.T if group.transposed else approx)
            advance()


def convert(source: TensorSource, output: Path, settings: Settings, *, shard_size: int = 5 * 10**9,
            force: bool = False, progress: Progress = no_progress) -> tuple[list[Path], dict]:
    """Write the LORS checkpoint; returns the files written and the LORS metadata."""
    settings.validate()
    check_output_path(output, [source.path, *source.files], force)
    stacks, warnings = find_stacks(source.info, settings.include, settings.exclude)
    if not stacks:
        raise LorsError(f"{source.path}: no stacked layers found (no group of >= 2 same-shaped matrices "
                        "whose names differ only in a layer index)")
    with hashing_in_background(source.files) as source_sha256:  # overlaps the work below
        groups = [Group(stack, settings.device, shared=settings.shared != "none") for stack in stacks]
        meta = {"format_version": FORMAT_VERSION, "tool": f"lors-convert {__version__}",
                "source": source_description(source), "settings": settings.as_json(),
                "groups": [], "kept_dense": [], "dtypes": {}, "warnings": warnings}
        if settings.calibrate:
            model, batches = calibration_inputs(source, settings)
            meta["calibration"] = calibrate_groups(model, batches, groups, settings)
            if not settings.sequential:
                del model  # not needed again: free it before factoring
        out_dtype = lambda g: settings.dtype or g.stack.dtype  # noqa: E731
        advance = progress("shared matrices", sum(len(g.stack.names) for g in groups if g.shared))
        for group in groups:
            if group.shared:
                group.shared_matrix = mean_matrix(source, group, out_dtype(group))
                for _ in group.stack.names:
                    advance()
        plan_ranks(source, groups, settings, progress)
        if settings.shared == "refit":
            advance = progress("refitting S", len(groups))
            for group in groups:
                refit_shared(source, group, out_dtype(group), settings.seed)
                advance()
        if settings.sequential:
            sequential_factors(source, model, batches, groups, settings, out_dtype, progress)
            del model
        stacked_names = set()
        with SafetensorsWriter(output, shard_size) as writer:
            advance = progress("factoring", sum(len(g.stack.names) for g in groups))
            for group in groups:
                stack = group.stack
                if group.kept_dense:
                    stored = lors_params(*group.out_in, group.ranks, group.shared)
                    meta["kept_dense"].append({"template": stack.template, "layers": stack.layers,
                                               "reason": f"LORS would store {stored:,} numbers, dense {stack.dense_params:,}"})
                    for _ in stack.names:
                        advance()
                    continue
                stacked_names.update(stack.names)
                meta["groups"].append(write_group(source, group, writer, out_dtype(group), settings.seed, advance))
            for name in source.info:
                if name in stacked_names:
                    continue
                tensor = source.get(name)
                if settings.dtype is not None and tensor.dtype.is_floating_point and tensor.dtype != settings.dtype:
                    meta["dtypes"][name] = dtype_name(tensor.dtype)
                    tensor = tensor.to(settings.dtype)
                writer.add(name, tensor)
            meta["source"]["sha256"] = source_sha256()
            files = writer.commit({"format": "pt", METADATA_KEY: json.dumps(meta, separators=(",", ":"))})
    return files, meta


def factor_layer(group: Group, i: int, residual: torch.Tensor, k: torch.Tensor | None, out_dtype: torch.dtype,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's factors (B, A) of its residual, rounded to the storage dtype."""
    name = group.stack.names[i]
    b, a = metric_low_rank(residual, k, group.ranks[i], seed_for(name, seed))
    b, a = b.to(out_dtype), a.to(out_dtype)
    if not (torch.isfinite(b).all() and torch.isfinite(a).all()):
        raise LorsError(f"{name}: its low-rank factors overflow {dtype_name(out_dtype)}; choose a wider --dtype")
    return b, a


def write_group(source: TensorSource, group: Group, writer: SafetensorsWriter, out_dtype: torch.dtype, seed: int,
                advance: Callable[[], None]) -> dict:
    stack, shared = group.stack, group.shared_matrix
    if group.shared:
        writer.add(shared_key(stack.template), (shared.T if group.transposed else shared).to(out_dtype)
                   .reshape(stack.shape))
    err_sq, norm_sq, out_err_sq, out_norm_sq, layer_errors = 0.0, 0.0, 0.0, 0.0, []
    for i, name in enumerate(stack.names):
        matrix = read_matrix(source, group, i)
        layer_norm_sq = squared_norm(matrix)
        covariance = group.covariances[i].to(group.device) if group.covariances is not None else None
        if covariance is not None:
            out_norm_sq += metric_energy(matrix, covariance)
        residual = group.residual(matrix)
        del matrix
        b, a = group.factors.pop(i, None) or factor_layer(group, i, residual, metric(group, i), out_dtype, seed)
        error = residual.addmm_(b.float(), a.float(), alpha=-1)  # in place: one full-size buffer per layer
        layer_err_sq = squared_norm(error)
        err_sq, norm_sq = err_sq + layer_err_sq, norm_sq + layer_norm_sq
        layer_errors.append(round(rel_error(layer_err_sq, layer_norm_sq), 6))
        if covariance is not None:
            out_err_sq += metric_energy(error, covariance)
        a_key, b_key = factor_keys(name)
        if group.transposed:  # stored W is Wᵀ: (B A)ᵀ = Aᵀ Bᵀ
            a, b = b.T, a.T
        writer.add(a_key, a.contiguous())
        writer.add(b_key, b.contiguous())
        advance()
    entry = {"template": stack.template, "layers": stack.layers, "names": stack.names,
             "shape": list(stack.shape), "dtype": dtype_name(stack.dtype), "shared": group.shared,
             "ranks": group.ranks, "dense_params": stack.dense_params,
             "lors_params": lors_params(*group.out_in, group.ranks, group.shared),
             "rel_error": rel_error(err_sq, norm_sq), "layer_errors": layer_errors}
    if group.covariances is not None:
        entry["output_error"] = rel_error(out_err_sq, out_norm_sq)
    return entry
