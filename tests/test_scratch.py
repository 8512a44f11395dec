"""scripts/bench_scratch.py: the exact matcher, and a few training steps of each task's smallest variant."""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_scratch as bench


def brute_force(cost: list[list[float]]) -> float:
    n, m = len(cost), len(cost[0])
    if n <= m:
        return min(sum(cost[i][j] for i, j in enumerate(cols)) for cols in itertools.permutations(range(m), n))
    return min(sum(cost[i][j] for j, i in enumerate(rows)) for rows in itertools.permutations(range(n), m))


@pytest.mark.parametrize("seed", range(40))
def test_hungarian_matches_brute_force(seed):
    rng = random.Random(seed)
    n, m = rng.randint(1, 6), rng.randint(1, 8)
    ties = seed % 4 == 0  # small integer costs: many optimal assignments
    cost = [[float(rng.randint(0, 3)) if ties else rng.uniform(-5, 5) for _ in range(m)] for _ in range(n)]
    rows, cols = bench.hungarian(cost)
    assert len(rows) == min(n, m) and len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
    assert rows == sorted(rows)
    assert sum(cost[i][j] for i, j in zip(rows, cols)) == pytest.approx(brute_force(cost))


def test_hungarian_empty():
    assert bench.hungarian([]) == ([], [])


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops run steadier on one thread when the machine is shared (as the script does on CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smallest(variants, build):
    return min((build(settings, fewer) for _, settings, fewer in variants), key=bench.count)


def losses(model, batch, loss_fn, steps: int, lr: float) -> tuple[float, float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    first = None
    for _ in range(steps):
        loss = loss_fn(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    with torch.no_grad():
        return first, loss_fn(model, batch).item()


def test_det_smallest_variant_learns():
    torch.manual_seed(0)
    cfg = dict(dim=16, channels=8, points=4, out_points=4, queries=4, heads=2, stages=6, batch=8, steps=1, lr=3e-3)
    model = smallest(bench.det_variants(cfg, 4), lambda s, f: bench.build_det(s, f, 4))
    images, targets = bench.make_images(8, seed=1)
    before, after = losses(model, (images, targets), lambda m, b: bench.set_loss(m(b[0]), b[1], 4), 12, 3e-3)
    assert after < 0.9 * before
    metrics = bench.det_evaluate(model.eval(), images, targets, 4, torch.device("cpu"))
    assert 0 <= metrics["ap50"] <= 1 and 0 <= metrics["matched_iou"] <= 1


def test_lm_smallest_variant_learns():
    cfg = dict(dim=32, layers=2, heads=2, ctx=32, batch=8, steps=1, lr=3e-3)
    model = smallest(bench.lm_variants(cfg), bench.build_lm)
    chunks = bench.byte_chunks(Path(__file__), cfg["ctx"] + 1)  # any text will do
    batch = torch.stack(list(itertools.islice(chunks, 8)))
    before, after = losses(model, batch, bench.lm_loss, 12, 3e-3)
    assert after < 0.9 * before


def test_average_precision_perfect_and_empty():
    labels, boxes = torch.tensor([0, 1]), torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    targets = [(labels, boxes)]
    assert bench.average_precision([torch.ones(2)], [labels], [boxes], targets, 2) == pytest.approx(1.0)
    far = torch.tensor([[0.9, 0.1, 0.05, 0.05]] * 2)
    assert bench.average_precision([torch.ones(2)], [labels], [far], targets, 2) == 0.0
