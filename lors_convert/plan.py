"""What conversion decides for each group before anything is written (`ConvertConfig`, the frozen `GroupPlan`), and
the per-layer steps that planning, calibration and writing share: reading a layer's matrix in out x in
orientation, its metric K_i, and its low-rank factors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lors_convert import LorsError
from lors_convert.checkpoint import TensorSource
from lors_convert.config import dtype_name
from lors_convert.factorize import as_matrix, lors_params, metric_energy, metric_low_rank, seed_for
from lors_convert.lors_format import factor_keys, shared_key
from lors_convert.stacks import Stack

Progress = Callable[[str, int], Callable[[], None]]  # (description, total) -> advance()


@dataclass(frozen=True)
class GroupPlan:
    """What conversion does with one stack, decided before anything is written. Planning returns new plans
    (dataclasses.replace) phase by phase; the writer only reads them."""

    stack: Stack
    dtype: torch.dtype  # storage dtype of S and the factors
    device: str = "cpu"
    transposed: bool = False  # stored as in x out (Conv1D)
    metrics: tuple[torch.Tensor, ...] | None = None  # K_i = C_i + λ_i I per layer (float64), when calibrated
    # λ_i (None: layer i saw no tokens, C_i = 0): with K_i, μ_i and n_i it gives C_i back for the output error,
    # so calibration holds one in x in matrix per layer, not two
    dampings: tuple[float | None, ...] | None = None
    # μ_i, the mean input of layer i, where its bias absorbs the mean output shift (W − Ŵ)μ: then K_i is built on
    # the centred C_i − n μ_i μ_iᵀ, since no rank needs to be spent on the mean
    means: tuple[torch.Tensor | None, ...] | None = None
    rows: tuple[int, ...] = ()  # n_i: the input rows (tokens) layer i saw in calibration (an MoE's experts differ)
    # Fᵢᵀ per layer with --fisher, Fᵢ Fᵢᵀ = G_i (the model output's sensitivity to layer i's outputs, damped): the
    # objective ‖G^{1/2}(R − B A)K^{1/2}‖² = ‖Fᵀ(R − B A)K^{1/2}‖², solved as the one-sided problem on FᵀR, B = F⁻ᵀB'
    output_roots: tuple[torch.Tensor, ...] | None = None
    shared: bool = True
    shared_matrix: torch.Tensor | None = None  # out x in, in the storage dtype
    ranks: tuple[int | None, ...] = ()  # None: the layer is stored dense

    @property
    def out_in(self) -> tuple[int, int]:
        rows, cols = self.stack.rows, self.stack.cols
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def lors_params(self) -> int:
        return lors_params(*self.out_in, list(self.ranks), self.shared)

    @property
    def kept_dense(self) -> bool:
        return self.lors_params >= self.stack.dense_params

    def residual(self, matrix: torch.Tensor) -> torch.Tensor:
        """W − S as a new tensor (a copy of W when unshared), so callers may change it in place."""
        return matrix - self.shared_matrix if self.shared else matrix.clone()

    def layout(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """The tensors this group writes, in the order it writes them."""
        stack = self.stack
        rows, cols = stack.rows, stack.cols
        out = [(shared_key(stack.template), self.dtype, stack.shape)] if self.shared else []
        for name, rank in zip(stack.names, self.ranks):
            if rank is None:
                out.append((name, self.dtype, stack.shape))
            else:
                a_key, b_key = factor_keys(name)
                out += [(a_key, self.dtype, (rank, cols)), (b_key, self.dtype, (rows, rank))]
        return out


def no_progress(description: str, total: int) -> Callable[[], None]:
    return lambda: None


LARGEST = 1e15  # beyond this, sums of squares in float32 arithmetic can overflow


def check_finite(matrix: torch.Tensor, name: str) -> None:
    low, high = torch.aminmax(matrix)  # one pass; NaN propagates and fails both comparisons
    if not (-LARGEST <= low.item() and high.item() <= LARGEST):
        raise LorsError(
            f"{name}: weights contain NaN or Inf (or magnitudes above {LARGEST:g}); refusing to factor them"
        )


def read_matrix(source: TensorSource, plan: GroupPlan, i: int) -> torch.Tensor:
    name = plan.stack.names[i]
    matrix = as_matrix(source.get(name), plan.device)
    check_finite(matrix, name)
    return matrix.T if plan.transposed else matrix


def input_metric(plan: GroupPlan, i: int) -> torch.Tensor | None:
    return plan.metrics[i] if plan.metrics is not None else None


def input_energy(plan: GroupPlan, i: int, matrix: torch.Tensor) -> float:
    """‖M X_i‖² over layer i's calibration inputs, tr(M C_i Mᵀ), from K_i = C_i − n_i μ_i μ_iᵀ + λ_i I (the
    centring only where μ_i is kept)."""
    if plan.dampings[i] is None:
        return 0.0
    energy = metric_energy(matrix, plan.metrics[i]) - plan.dampings[i] * matrix.double().square().sum().item()
    mean = plan.means[i]
    if mean is not None:
        energy += plan.rows[i] * (matrix.double() @ mean.to(matrix.device)).square().sum().item()
    return energy


def output_weighted(plan: GroupPlan, i: int, matrix: torch.Tensor) -> torch.Tensor:
    """Fᵢᵀ R under --fisher (R itself otherwise): what layer i's spectra and factors are taken of."""
    return matrix if plan.output_roots is None else plan.output_roots[i] @ matrix


def bias_name(source: TensorSource, name: str, rows: int) -> str | None:
    """The bias tensor beside weight `name`, if the checkpoint has one of `rows` elements."""
    bias = name.removesuffix("weight") + "bias"
    info = source.info.get(bias) if name.endswith("weight") else None
    return bias if info is not None and tuple(info.shape) == (rows,) else None


def mean_shift(plan: GroupPlan, i: int, error: torch.Tensor) -> torch.Tensor | None:
    """(W − Ŵ)μ_i, layer i's mean output error, which its bias takes where calibration kept its mean input μ_i
    (the factors were fitted to the centred inputs); None elsewhere."""
    mean = plan.means[i] if plan.means is not None and plan.ranks[i] is not None else None
    return None if mean is None else error.double() @ mean.to(error.device)


def factor_layer(
    plan: GroupPlan, i: int, residual: torch.Tensor, k: torch.Tensor | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's factors (B, A) of its residual, rounded to the storage dtype."""
    name = plan.stack.names[i]
    b, a = metric_low_rank(output_weighted(plan, i, residual), k, plan.ranks[i], seed_for(name, seed))
    if plan.output_roots is not None:
        b = torch.linalg.solve(plan.output_roots[i], b)
    b, a = b.to(plan.dtype), a.to(plan.dtype)
    if not (torch.isfinite(b).all() and torch.isfinite(a).all()):
        raise LorsError(f"{name}: its low-rank factors overflow {dtype_name(plan.dtype)}; choose a wider --dtype")
    return b, a
