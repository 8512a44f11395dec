"""Which LORS forward is faster: S + B A materialised then one linear, or x·Sᵀ + (x·Aᵀ)·Bᵀ (factored)? And, with S,
the factored form as one product for x·[S; A]ᵀ (fused; the concatenation each call included)?

Times one layer against the dense nn.Linear of the same shape, by number of tokens, in inference
(torch.no_grad, forward only) and training (S, A, B, bias and the input trainable, forward + backward)
modes, with and without the shared S, on MiniLM and TinyLlama shapes at ranks that remove about half of
the stacked parameters. For each case it prints which path was faster and which one `LorsLinear.forward`
picks (`lors_convert.lors_modeling.use_factored`); `wrong` marks a case where the rule picked the slower path by
more than 5%. CPU by default, CUDA with --device cuda (bf16 autocast there).

    python scripts/bench_lors_forward.py [--mode infer|train|both] [--shapes minilm|tinyllama|all]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lors_convert.lors_modeling import use_factored


def materialised(x, shared, a, b, bias):
    weight = b @ a if shared is None else torch.addmm(shared, b, a)
    return F.linear(x, weight, bias)


def factored(x, shared, a, b, bias):
    low = F.linear(F.linear(x, a), b)
    if shared is None:
        return low if bias is None else low + bias
    return F.linear(x, shared, bias) + low


def fused(x, shared, a, b, bias):
    """x·[S; A]ᵀ in one product (x read once, one launch fewer), then the rank-r part added back through B."""
    both = F.linear(x, torch.cat([shared, a]))
    return torch.addmm(both[:, : b.shape[0]], both[:, b.shape[0] :], b.t()) + bias


def dense(x, weight, bias):
    return F.linear(x, weight, bias)


def tinyllama_rank(rows: int, cols: int, shared: bool, layers: int = 22) -> int:
    """The uniform rank at which a group of `layers` stores half its dense parameters (S counted once)."""
    budget = layers * rows * cols // 2 - (rows * cols if shared else 0)
    return budget // (layers * (rows + cols))


PATHS = {True: (materialised, factored, fused), False: (materialised, factored)}  # fused needs S
SHAPES = {
    # (rows, cols, rank with S, rank without S)
    "minilm": [(384, 384, 170, 170), (1536, 384, 90, 90), (384, 1536, 90, 90)],
    "tinyllama": [
        (r, c, tinyllama_rank(r, c, True), tinyllama_rank(r, c, False))
        for r, c in ((2048, 2048), (256, 2048), (5632, 2048), (2048, 5632))
    ],
}
TOKENS = {"minilm": (1, 16, 64, 128, 256, 512, 1024, 4096), "tinyllama": (1, 16, 128, 512, 1024, 2048, 4096)}


def fastest_seconds(steps: list, device: torch.device, budget: float, warmup: int = 1) -> list[float]:
    """The fastest wall time of each of `steps` after warm-up, the calls interleaved: at least 5 rounds, more
    while under `budget` seconds. The fastest, not the median: on a shared machine a call that loses its
    core for a scheduler tick (8 ms here) is measuring the neighbour, not the computation."""
    for step in steps:
        for _ in range(warmup):
            step()
    times: list[list[float]] = [[] for _ in steps]
    while len(times[0]) < 5 or (sum(map(sum, times)) < budget and len(times[0]) < 50):
        for step, spent in zip(steps, times):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            spent.append(time.perf_counter() - start)
    return [min(t) for t in times]


def call(fn, args, device, train: bool, autocast: bool):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if train:
                fn(*args).float().square().mean().backward()
            else:
                with torch.no_grad():
                    fn(*args)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", choices=("infer", "train", "both"), default="both")
    parser.add_argument("--shapes", choices=(*SHAPES, "all"), default="all")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per case before stopping at 5 rounds")
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = device.type == "cuda"
    torch.manual_seed(0)
    modes = ("infer", "train") if args.mode == "both" else (args.mode,)
    families = list(SHAPES) if args.shapes == "all" else [args.shapes]
    print(
        f"device {device}, {'bf16 autocast' if autocast else 'float32'}, {torch.get_num_threads()} threads, "
        "fastest ms per call of >= 5 (train: forward + backward)"
    )
    print("| mode | out x in | S | rank | tokens | dense | materialised | factored | fused | faster | rule picks |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|---|")
    wrong = 0
    for mode in modes:
        train = mode == "train"
        for family in families:
            for rows, cols, rank_s, rank_none in SHAPES[family]:
                for with_s, rank in ((True, rank_s), (False, rank_none)):
                    for tokens in TOKENS[family]:
                        new = lambda *s: (torch.randn(*s, device=device) * 0.02).requires_grad_(train)
                        x, weight, bias = new(tokens, cols), new(rows, cols), new(rows)
                        shared = weight if with_s else None
                        a, b = new(rank, cols), new(rows, rank)
                        paths = [(dense, (x, weight, bias)), *((f, (x, shared, a, b, bias)) for f in PATHS[with_s])]
                        t_dense, t_mat, t_fac, *t_fused = fastest_seconds(
                            [call(f, inputs, device, train, autocast) for f, inputs in paths], device, args.budget
                        )
                        pick = use_factored(tokens, rows, cols, rank, with_s)
                        faster = "factored" if t_fac < t_mat else "materialised"
                        picked, other = (t_fac, t_mat) if pick else (t_mat, t_fac)
                        bad = picked > 1.05 * other
                        wrong += bad
                        verdict = ("factored" if pick else "materialised") + (
                            f" **wrong** ({picked / other:.2f}x)" if bad else ""
                        )
                        print(
                            f"| {mode} | {rows}x{cols} | {'yes' if with_s else 'no'} | {rank} | {tokens} | "
                            f"{t_dense * 1e3:.3f} | {t_mat * 1e3:.3f} | {t_fac * 1e3:.3f} | "
                            f"{f'{t_fused[0] * 1e3:.3f}' if t_fused else ''} | {faster} | "
                            f"{verdict} |",
                            flush=True,
                        )
    print(f"\nrule picked the slower path (by > 5%) in {wrong} case(s)")


if __name__ == "__main__":
    main()
