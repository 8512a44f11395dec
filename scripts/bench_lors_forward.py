"""Which LORS forward is faster for training: S + B A materialised, or x·Sᵀ + (x·Aᵀ)·Bᵀ?

Times forward + backward of one layer (all of S, A, B, bias and the input trainable) against the dense
nn.Linear of the same shape. CPU by default, CUDA with --device cuda (bf16 autocast there).

    python scripts/bench_lors_forward.py [--device cuda] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def materialised(x, shared, a, b, bias):
    return F.linear(x, torch.addmm(shared, b, a), bias)


def factored(x, shared, a, b, bias):
    return F.linear(x, shared, bias) + F.linear(F.linear(x, a), b)


def dense(x, weight, bias):
    return F.linear(x, weight, bias)


def mean_seconds(step, device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Mean wall time of `step()` after warm-up, synchronising CUDA around the timed region."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def seconds(fn, args, device, repeats, autocast):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = fn(*args)
        out.float().square().mean().backward()

    return mean_seconds(step, device, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = device.type == "cuda"
    torch.manual_seed(0)
    print(f"device {device}, {'bf16 autocast' if autocast else 'float32'}, forward+backward, ms per call")
    print(
        f"{'out x in':>10} {'rank':>5} {'tokens':>7} {'dense':>8} {'material':>9} {'factored':>9} "
        f"{'mat/dense':>9} {'fac/dense':>9}"
    )
    for rows, cols, rank in ((384, 384, 96), (1536, 384, 160), (384, 1536, 160)):
        for tokens in (16, 256, 2048, 8192):
            new = lambda *s: torch.randn(*s, device=device, requires_grad=True)
            x, weight, bias = new(tokens, cols), new(rows, cols), new(rows)
            a, b = new(rank, cols), new(rows, rank)
            t_dense = seconds(dense, (x, weight, bias), device, args.repeats, autocast)
            t_mat = seconds(materialised, (x, weight, a, b, bias), device, args.repeats, autocast)
            t_fac = seconds(factored, (x, weight, a, b, bias), device, args.repeats, autocast)
            print(
                f"{rows:>4} x {cols:<4} {rank:>5} {tokens:>7} {t_dense * 1e3:>8.3f} {t_mat * 1e3:>9.3f} "
                f"{t_fac * 1e3:>9.3f} {t_mat / t_dense:>9.2f} {t_fac / t_dense:>9.2f}"
            )


if __name__ == "__main__":
    main()
