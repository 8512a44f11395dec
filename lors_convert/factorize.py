"""The math: shared matrix, residual spectra, truncated factors, rank allocation.

All matrices are the stored 2-D view of a weight (rows = dim 0, cols = the rest). Factors follow the
LoRA convention: B is rows x r, A is r x cols, and the residual is approximated by B @ A.
"""

from __future__ import annotations

import heapq
import math
import zlib

import torch

from lors_convert import LorsError

OVERSAMPLE = 20
POWER_ITERS = 3
CHOLQR_COST, EIGH_COST = 8, 30  # see use_randomized
RANDOMIZED_CALLS_COST = 2e7  # ~1 ms of the ~40 small kernel calls, which decide for tiny matrices


def as_matrix(weight: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """The float32 2-D view on `device` (moved before widening: half the bytes cross the bus)."""
    return weight.reshape(weight.shape[0], -1).to(device).float()


def check_device(device: str | None) -> str:
    """The device to factor on: `None` means cuda when available; an unusable choice is a user error."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        raise LorsError(f"--device {device}: not a device (try cpu or cuda)") from e
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise LorsError(
            f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
            "no usable GPU); use --device cpu"
        )
    if parsed.type not in ("cpu", "cuda"):
        raise LorsError(f"--device {device}: only cpu and cuda are supported")
    return device


def seed_for(name: str, seed: int = 0) -> int:
    """A per-matrix seed that depends on the tensor's name, not on processing order."""
    return zlib.crc32(name.encode()) ^ seed


def _gram(matrix: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Gram matrix of the smaller side (float32 product, float64 result) and whether it is rows x rows."""
    if matrix.shape[0] <= matrix.shape[1]:
        return (matrix @ matrix.T).double(), True
    return (matrix.T @ matrix).double(), False


def spectrum(matrix: torch.Tensor) -> torch.Tensor:
    """Squared singular values, descending, in float64 (eigenvalues of the smaller Gram matrix)."""
    gram, _ = _gram(matrix)
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def _balanced(left: torch.Tensor, right: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Given left @ right with orthonormal `left`, move the square root of each component's norm onto B."""
    return left * scale, right / scale[:, None]


def _zeros(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return matrix.new_zeros(matrix.shape[0], rank), matrix.new_zeros(rank, matrix.shape[1])


def _gram_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors through an eigendecomposition of the smaller Gram matrix (exact projection)."""
    gram, rows_side = _gram(matrix)
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :rank].float()
    if values[0] <= 0:
        return _zeros(matrix, rank)
    scale = values.clamp_min(values[0].item() * 1e-12 + 1e-30).sqrt().sqrt().float()
    if rows_side:  # matrix ~ U U^T matrix, U = vectors (rows x r)
        return _balanced(vectors, vectors.T @ matrix, scale)
    b, a = _balanced(vectors, (matrix @ vectors).T, scale)  # matrix ~ (matrix V) V^T
    return a.T, b.T


def orthonormal(block: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of a tall block's columns by Cholesky-QR in float64.

    LAPACK's Householder QR on a tall thin float32 block runs 10-15x slower than this on CPU
    (docs/svd-cost-model.md); a rank-deficient block, where Cholesky fails, falls back to it. One pass is
    enough here: every block is one product away from an orthonormal one, so its condition number is that of
    the matrix over the sketch (below 10^4 for trained weights), and float64 Cholesky-QR loses orthogonality
    only as κ²·1e-16, far below the float32 the basis is returned in.
    """
    basis = block.double()
    upper, info = torch.linalg.cholesky_ex(basis.T @ basis, upper=True)
    if info.item():
        return torch.linalg.qr(block).Q
    return torch.linalg.solve_triangular(upper, basis, upper=True, left=False).float()


def randomized_factors(matrix: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded randomized SVD (Halko et al.) with power iterations, re-orthonormalised at each step."""
    rows, cols = matrix.shape
    width = min(rank + OVERSAMPLE, rows, cols)
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(cols, width, generator=generator).to(matrix.device)
    block = matrix @ probe
    if not block.any():
        return _zeros(matrix, rank)
    basis = orthonormal(block)
    for _ in range(POWER_ITERS):
        basis = orthonormal(matrix @ orthonormal(matrix.T @ basis))
    # matrix ≈ basis (basis^T matrix); the small factor's Gram eigendecomposition is ~7x faster than its SVD
    b, a = _gram_factors(basis.T @ matrix, rank)
    return basis @ b, a


def head_spectrum(matrix: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """The `count` largest squared singular values followed by the rest of the energy as one entry, so that
    `tail(…)` at any rank up to `count` is right. Exact when that is cheaper, else a randomized estimate
    (one power iteration: it only has to rank choices, not build factors)."""
    rows, cols = matrix.shape
    if not use_randomized(rows, cols, count):
        return spectrum(matrix)
    probe = torch.randn(cols, min(count + OVERSAMPLE, rows, cols), generator=torch.Generator().manual_seed(seed))
    basis = orthonormal(matrix @ orthonormal(matrix.T @ orthonormal(matrix @ probe.to(matrix.device))))
    head = spectrum(basis.T @ matrix)[:count]
    rest = max(torch.linalg.vector_norm(matrix).item() ** 2 - head.sum().item(), 0.0)
    return torch.cat([head, head.new_tensor([rest])])


def use_randomized(rows: int, cols: int, rank: int) -> bool:
    """Cost model in float32 GEMM flop-equivalents, constants measured on a 2-core CPU (docs/svd-cost-model.md).

    Randomized: 2q+2 products with the matrix, 2q+1 Cholesky-QR on tall blocks (float64; measured as two passes), the
    small factor's Gram and eigendecomposition, and the fixed cost of its many calls. Exact: the Gram product
    plus a float64 eigendecomposition, which costs ~EIGH_COST·small³.
    """
    small, large, width = min(rows, cols), max(rows, cols), rank + OVERSAMPLE
    products = (2 * POWER_ITERS + 2) * 2 * small * large * width
    orthonormalise = (2 * POWER_ITERS + 1) * CHOLQR_COST * large * width**2
    small_factor = large * width**2 + EIGH_COST * width**3
    randomized = products + orthonormalise + small_factor + RANDOMIZED_CALLS_COST
    exact = small * small * large + EIGH_COST * small**3
    return width < small and randomized < exact


def low_rank(matrix: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors (B, A) with B @ A ≈ matrix, singular values split evenly between B and A."""
    rows, cols = matrix.shape
    rank = min(rank, rows, cols)
    if rank == 0:
        return _zeros(matrix, rank)
    if use_randomized(rows, cols, rank):
        return randomized_factors(matrix, rank, seed)
    return _gram_factors(matrix, rank)


def energy_rank(sq_values: torch.Tensor, energy: float) -> int:
    """Smallest rank that keeps fraction `energy` of the total squared singular values."""
    total = sq_values.sum().item()
    if total <= 0:
        return 0
    kept = torch.cumsum(sq_values, 0) / total
    return min(int((kept < energy - 1e-12).sum().item()) + 1, len(sq_values))


def break_even_cap(rows: int, cols: int) -> int:
    """The largest rank whose factors cost fewer numbers than the dense matrix: r (rows + cols) < rows · cols."""
    return (rows * cols - 1) // (rows + cols)


def capped(rank: int, rows: int, cols: int) -> int | None:
    """A rank, or None (store the layer dense) where its factors would cost as much as the matrix."""
    return rank if rank <= break_even_cap(rows, cols) else None


def allocate_ranks(
    spectra: list[list[torch.Tensor]],
    norms_sq: list[float],
    shapes: list[tuple[int, int]],
    budget: int,
    floor: float = 0.0,
) -> list[list[int | None]]:
    """Greedy allocation of rank units across all groups and layers under a parameter budget.

    Each rank unit of layer j in group g removes sq_value / ‖W_g‖² from the objective Σ_g relative
    squared error and costs rows + cols parameters. A layer's next step is taken by gain per parameter, each one
    that still fits; its steps are its rank units in order up to its break-even rank, then storing it dense,
    which removes the rest of its error for the few numbers between the factors' cost and the matrix's. Greedy
    knapsack can lose to a uniform rank when costs differ, so the better of the two is kept. None in the result
    means: store the layer dense. Every layer starts at `floor` times its break-even rank where the budget
    covers that, so no layer is cut to nothing because its error looks cheap.
    """
    caps = [break_even_cap(rows, cols) for rows, cols in shapes]
    ranks: list[list[int | None]] = [
        [min(math.ceil(floor * cap), len(sq)) for sq in layers] for layers, cap in zip(spectra, caps)
    ]
    floor_cost = sum(r * (rows + cols) for layers, (rows, cols) in zip(ranks, shapes) for r in layers)
    if floor_cost > budget:
        ranks, floor_cost = [[0] * len(layers) for layers in spectra], 0

    def next_step(g: int, j: int) -> tuple[float, int, int, int] | None:
        """(−gain per number, cost, g, j) of layer j's next step, None once it is dense or has nothing left."""
        rank, sq, (rows, cols) = ranks[g][j], spectra[g][j], shapes[g]
        scale = max(norms_sq[g], 1e-30)
        if rank is None or rank >= len(sq):
            return None
        if rank < caps[g]:
            gain, cost = sq[rank].item() / scale, rows + cols
        else:
            gain, cost = sq[rank:].sum().item() / scale, rows * cols - rank * (rows + cols)
        return (-gain / cost, cost, g, j) if gain > 0 else None

    steps = [step for g, layers in enumerate(spectra) for j in range(len(layers)) if (step := next_step(g, j))]
    heapq.heapify(steps)
    left = max(budget - floor_cost, 0)
    while steps:
        _, cost, g, j = heapq.heappop(steps)
        if cost > left:
            continue  # the layer's later steps cost no less than this one's share of the budget left
        left -= cost
        ranks[g][j] = ranks[g][j] + 1 if ranks[g][j] < caps[g] else None
        step = next_step(g, j)
        if step:
            heapq.heappush(steps, step)
    uniform = uniform_ranks(spectra, shapes, budget)
    return min((ranks, uniform), key=lambda r: residual_error(spectra, norms_sq, r))


def uniform_ranks(
    spectra: list[list[torch.Tensor]], shapes: list[tuple[int, int]], budget: int
) -> list[list[int | None]]:
    """The largest single rank whose total cost fits, as --rank gives it: layers past break-even stored dense."""
    best: list[list[int | None]] = [[0] * len(layers) for layers in spectra]
    for rank in range(1, max((len(sq) for layers in spectra for sq in layers), default=0) + 1):
        ranks = [
            [capped(min(rank, len(sq)), rows, cols) for sq in layers] for layers, (rows, cols) in zip(spectra, shapes)
        ]
        if sum(lors_params(rows, cols, r, shared=False) for (rows, cols), r in zip(shapes, ranks)) > budget:
            break
        best = ranks
    return best


def tail(spectra: list[torch.Tensor], ranks: list[int | None]) -> float:
    """The objective left after truncating each layer at its rank (the sum of the dropped sq. singular values;
    nothing for a layer stored dense)."""
    return sum(sq[r:].sum().item() for sq, r in zip(spectra, ranks) if r is not None)


def residual_error(spectra: list[list[torch.Tensor]], norms_sq: list[float], ranks: list[list[int | None]]) -> float:
    """The allocation objective: Σ_g (energy the ranks leave out of group g) / ‖W_g‖²."""
    return sum(
        tail(layers, group_ranks) / max(norm_sq, 1e-30)
        for layers, norm_sq, group_ranks in zip(spectra, norms_sq, ranks)
    )


def lors_params(rows: int, cols: int, ranks: list[int | None], shared: bool = True) -> int:
    """Numbers stored for a group: S (if shared), the factors, and the layers stored dense."""
    return (rows * cols if shared else 0) + sum(rows * cols if r is None else r * (rows + cols) for r in ranks)


def rel_error(err_sq: float, norm_sq: float) -> float:
    return math.sqrt(err_sq / norm_sq) if norm_sq > 0 else math.sqrt(err_sq)


# ---------------------------------------------------------------- calibrated (metric-weighted) factoring
# With K = C + λI from calibration, the objective of a layer is ‖(R − B A) K^{1/2}‖² = tr(E K Eᵀ). Its best
# rank-r solution projects R onto the top left singular vectors of R K^{1/2}, found from the smaller of
# R K Rᵀ (rows x rows, no square root needed) and K^{1/2} RᵀR K^{1/2} (cols x cols).


def metric_energy(matrix: torch.Tensor, metric: torch.Tensor | None) -> float:
    if metric is None:
        return matrix.square().sum().item()
    return ((matrix.double() @ metric) * matrix.double()).sum().item()


def psd_factor(metric: torch.Tensor) -> torch.Tensor:
    """F with F Fᵀ = K (float32): ‖R F‖ = ‖R K^{1/2}‖ and ‖Fᵀ R‖ = ‖K^{1/2} R‖ for any such F, so the objectives
    need no symmetric root. Cholesky (the eigendecompositions of the symmetric root were 15% of SmolLM2's compress);
    the symmetric root where K is singular."""
    factor, info = torch.linalg.cholesky_ex(metric)
    if info == 0:
        return factor.float()
    values, vectors = torch.linalg.eigh(metric)
    return ((vectors * values.clamp_min(0).sqrt()) @ vectors.T).float()


def _metric_gram(matrix: torch.Tensor, metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Gram matrix of R K^{1/2} on its smaller side, and R K^{1/2} when that side is the columns."""
    if matrix.shape[0] <= matrix.shape[1]:
        return (matrix @ metric.float() @ matrix.T).double(), None
    weighted = matrix @ psd_factor(metric)
    return (weighted.T @ weighted).double(), weighted


def metric_spectrum(matrix: torch.Tensor, metric: torch.Tensor | None) -> torch.Tensor:
    if metric is None:
        return spectrum(matrix)
    gram, _ = _metric_gram(matrix, metric)
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def metric_low_rank(
    matrix: torch.Tensor, metric: torch.Tensor | None, rank: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r (B, A) minimising ‖(R − B A) K^{1/2}‖ (plain `low_rank` without a metric)."""
    if metric is None:
        return low_rank(matrix, rank, seed)
    rank = min(rank, *matrix.shape)
    if rank == 0 or not matrix.any():
        return _zeros(matrix, rank)
    gram, weighted = _metric_gram(matrix, metric)
    vectors = torch.linalg.eigh(gram).eigenvectors.flip(1)[:, :rank].float()
    basis = vectors if weighted is None else torch.linalg.qr(weighted @ vectors).Q
    a = basis.T @ matrix
    scale = a.norm(dim=1).clamp_min(1e-30).sqrt()
    return basis * scale, a / scale[:, None]
