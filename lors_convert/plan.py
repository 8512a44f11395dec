"""What conversion decides for each group before anything is written (`ConvertConfig`, the frozen `GroupPlan`), and
the per-layer steps that planning, calibration and writing share: reading a layer's matrix in out x in
orientation, its metric K_i, and its low-rank factors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lors_convert import LorsError
from lors_convert.checkpoint import TensorSource, dtype_name, parse_dtype
from lors_convert.factorize import as_matrix, lors_params, metric_energy, metric_low_rank, seed_for
from lors_convert.lors_format import factor_keys, shared_key
from lors_convert.stacks import Stack

Progress = Callable[[str, int], Callable[[], None]]  # (description, total) -> advance()
SHARED_CHOICES = ("auto", "mean", "refit", "none")


@dataclass
class ConvertConfig:
    """`convert`'s choices; each field is the CLI option of the same name (`lors-convert convert --help`). At most
    one of `rank`, `reduction`, `energy`, `max_ppl_increase` (none: `reduction` 0.5). `calibrate` takes text files
    (tensor files with `model_factory`); `dtype` a torch dtype or its name."""

    rank: int | None = None
    reduction: float | None = None
    energy: float | None = None
    shared: str = "auto"
    dtype: torch.dtype | str | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    calibrate: list[Path | str] = field(default_factory=list)
    calib_samples: int = 256
    calib_max_length: int = 128
    # Of a causal LM's calibration samples, the share written by the model (sampling.py). SmolLM2 at 20%, ppl on
    # held-out lines / fortune passages: 102.6 / 178.7 at 0.5, 103.8 / 173.3 at 0.75, 107.3 / 173.0 at 1; after
    # compress's 15 minutes of distillation 85.9 / 150.8 at 0.5, 86.0 / 148.0 at 0.75 (README, Decoder LLMs)
    calib_generated: float = 0.75
    damping: float = 0.01
    sequential: bool = False
    fisher: bool = False
    max_ppl_increase: float | None = None  # choose the reduction: the largest keeping ppl within this factor
    model_factory: str | None = None
    device: str = "cpu"  # where matrices are factored; not part of the output's description

    def validate(self) -> None:
        self.calibrate = [Path(p) for p in self.calibrate]
        if isinstance(self.dtype, str):
            self.dtype = parse_dtype(self.dtype)
        chosen = [
            n
            for n, v in (("--rank", self.rank), ("--reduction", self.reduction), ("--energy", self.energy))
            if v is not None
        ]
        if self.max_ppl_increase is not None:
            chosen.append("--max-ppl-increase")
        if len(chosen) > 1:
            raise LorsError(
                f"choose one of --rank, --reduction, --energy, --max-ppl-increase (got {' and '.join(chosen)})"
            )
        if self.max_ppl_increase is not None and not self.max_ppl_increase > 1:
            raise LorsError(
                f"--max-ppl-increase is a factor above 1 (1.2: at most 20% higher), got {self.max_ppl_increase}"
            )
        if self.max_ppl_increase is not None and not (self.calibrate and self.fisher and self.model_factory is None):
            raise LorsError("--max-ppl-increase needs --calibrate TEXT and --fisher on a language model")
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
        if not 0 <= self.calib_generated <= 1:
            raise LorsError(f"--calib-generated is a fraction in [0, 1], got {self.calib_generated}")
        if self.sequential and not self.calibrate:
            raise LorsError("--sequential needs --calibrate (it recalibrates layer after layer)")
        if self.fisher and not self.calibrate:
            raise LorsError("--fisher needs --calibrate (it measures the output's gradients on those samples)")
        if self.fisher and (self.sequential or self.shared == "refit"):
            raise LorsError("--fisher does not combine with --sequential or --shared refit")
        if not 0 <= self.damping:
            raise LorsError(f"--damping must be 0 or more, got {self.damping}")
        if not 0 <= self.seed < 2**32:
            raise LorsError(f"--seed must be in [0, 2**32), got {self.seed}")

    def as_json(self) -> dict:
        calibration = (
            {
                "calibrate": [str(p) for p in self.calibrate],
                "calib_samples": self.calib_samples,
                "calib_max_length": self.calib_max_length,
                "calib_generated": self.calib_generated,
                "damping": self.damping,
                "sequential": self.sequential,
                "fisher": self.fisher,
                "max_ppl_increase": self.max_ppl_increase,
            }
            if self.calibrate
            else {}
        )
        return {
            "rank": self.rank,
            "reduction": self.reduction,
            "energy": self.energy,
            "shared": self.shared,
            "dtype": dtype_name(self.dtype) if self.dtype else None,
            "include": self.include,
            "exclude": self.exclude,
            "seed": self.seed,
            **calibration,
        }


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
