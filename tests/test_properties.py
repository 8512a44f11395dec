"""Properties of the math in factorize.py, checked by hypothesis on small random matrices and spectra."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lors_convert.factorize import allocate_ranks, capped, lors_params, low_rank, psd_factor, spectrum

FAST = settings(max_examples=40, deadline=None)


@st.composite
def matrices(draw, max_side: int = 12) -> torch.Tensor:
    rows, cols = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**31))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    matrix = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    if draw(st.booleans()):  # a low-rank matrix: repeated and zero singular values
        k = draw(st.integers(0, min(rows, cols)))
        matrix = matrix[:, :k] @ torch.randn(k, cols, generator=torch.Generator().manual_seed(seed + 1))
    return matrix


def error_sq(matrix: torch.Tensor, rank: int) -> float:
    b, a = low_rank(matrix, rank)
    assert b.shape == (matrix.shape[0], min(rank, *matrix.shape)) and a.shape == (b.shape[1], matrix.shape[1])
    return (matrix - b @ a).double().square().sum().item()


@FAST
@given(matrices())
def test_error_never_rises_with_rank_and_matches_the_spectrum_tail(matrix):
    total = matrix.double().square().sum().item()
    tail = spectrum(matrix)
    errors = [error_sq(matrix, r) for r in range(min(matrix.shape) + 1)]
    tol = 1e-5 * total + 1e-30
    for r, err in enumerate(errors):
        assert abs(err - tail[r:].sum().item()) <= tol  # Eckart–Young: the best rank-r error
        if r:
            assert err <= errors[r - 1] + tol


@FAST
@given(matrices())
def test_exact_at_full_rank(matrix):
    b, a = low_rank(matrix, min(matrix.shape))
    assert torch.allclose(b @ a, matrix, rtol=1e-4, atol=1e-5 * matrix.abs().max().item())


@FAST
@given(st.integers(1, 40), st.integers(1, 40), st.lists(st.integers(0, 50), min_size=1, max_size=6))
def test_parameter_accounting_is_exact(rows, cols, ranks):
    matrix = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * 41 + cols))
    factors = [low_rank(matrix, r) for r in ranks]
    stored = rows * cols + sum(b.numel() + a.numel() for b, a in factors)
    assert lors_params(rows, cols, [b.shape[1] for b, _ in factors]) == stored
    assert lors_params(rows, cols, ranks, shared=False) == sum(ranks) * (rows + cols)


@st.composite
def allocation_problems(draw):
    """Groups of layers (rows x cols) with descending squared spectra, and their norms."""
    spectra, norms, shapes = [], [], []
    for _ in range(draw(st.integers(1, 4))):
        rows, cols = draw(st.integers(1, 7)), draw(st.integers(1, 7))
        shapes.append((rows, cols))
        layers = [
            torch.tensor(
                sorted(
                    draw(st.lists(st.floats(0, 100), min_size=min(rows, cols), max_size=min(rows, cols))), reverse=True
                ),
                dtype=torch.float64,
            )
            for _ in range(draw(st.integers(1, 4)))
        ]
        spectra.append(layers)
        norms.append(sum(s.sum().item() for s in layers) + draw(st.floats(0.1, 100)))
    return spectra, norms, shapes


def objective(spectra, norms, ranks) -> float:
    """Σ over groups of the relative squared error that the chosen ranks leave (a dense layer leaves none)."""
    return sum(
        sum(sq[r:].sum().item() for sq, r in zip(layers, group_ranks) if r is not None) / norm
        for layers, norm, group_ranks in zip(spectra, norms, ranks)
    )


def cost(shapes, ranks) -> int:
    return sum(lors_params(rows, cols, group_ranks, shared=False) for (rows, cols), group_ranks in zip(shapes, ranks))


@settings(max_examples=150, deadline=None)
@given(allocation_problems(), st.integers(-5, 500))
def test_allocation_stays_within_budget_and_below_break_even(problem, budget):
    spectra, norms, shapes = problem
    ranks = allocate_ranks(spectra, norms, shapes, budget)
    assert cost(shapes, ranks) <= max(budget, 0)
    for (rows, cols), group_ranks in zip(shapes, ranks):
        # no layer's factors cost as many numbers as the layer itself: past that it is stored dense
        assert all(r is None or r * (rows + cols) < rows * cols for r in group_ranks)


@settings(max_examples=150, deadline=None)
@given(allocation_problems(), st.integers(0, 6))
def test_allocation_is_never_worse_than_uniform_of_the_same_cost(problem, rank):
    spectra, norms, shapes = problem
    uniform = [[capped(min(rank, len(sq)), *shape) for sq in layers] for layers, shape in zip(spectra, shapes)]
    ranks = allocate_ranks(spectra, norms, shapes, cost(shapes, uniform))
    assert objective(spectra, norms, ranks) <= objective(spectra, norms, uniform) + 1e-9


@FAST
@given(st.integers(2, 5), st.integers(2, 10), st.integers(2, 10), st.integers(0, 2**31), st.booleans(), st.data())
def test_refit_never_raises_the_objective(layers, rows, cols, seed, calibrated, data):
    from pathlib import Path

    from lors_convert.checkpoint import TensorInfo, TensorSource
    from lors_convert.conversion import mean_matrix, refit_shared
    from lors_convert.plan import GroupPlan
    from lors_convert.stacks import Stack

    generator = torch.Generator().manual_seed(seed)
    weights = {f"layers.{i}.w": torch.randn(rows, cols, generator=generator) for i in range(layers)}
    source = TensorSource(
        Path("memory"), [], {n: TensorInfo((rows, cols), torch.float32) for n in weights}, weights.__getitem__
    )
    ranks = data.draw(st.lists(st.integers(0, min(rows, cols)), min_size=layers, max_size=layers))
    group = GroupPlan(
        Stack("layers.{i}.w", list(range(layers)), list(weights), (rows, cols), torch.float32),
        torch.float32,
        ranks=tuple(ranks),
    )
    if calibrated:
        inputs = [torch.randn(3 * cols, cols, generator=generator) for _ in range(layers)]
        group = replace(
            group, metrics=tuple((x.T @ x).double() + 0.01 * torch.eye(cols, dtype=torch.float64) for x in inputs)
        )
    group = replace(group, shared_matrix=mean_matrix(source, group))
    _, history = refit_shared(source, group, seed=0)
    for before, after in zip(history, history[1:]):
        assert after <= before * (1 + 1e-6) + 1e-9


@pytest.mark.parametrize("rank", [5, 2, 0])
def test_psd_factor_reproduces_the_metric_full_rank_or_singular(rank):
    """F Fᵀ = K: a Cholesky factor where K is positive definite, the symmetric root where it is singular (a layer
    whose inputs span fewer directions than it has, or none)."""
    a = torch.randn(5, rank, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    k = a @ a.T
    factor = psd_factor(k).double()
    torch.testing.assert_close(factor @ factor.T, k, atol=1e-5, rtol=1e-5)
