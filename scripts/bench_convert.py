"""Benchmark lors-convert against a naive reference on a synthetic Llama-shaped checkpoint, in one run.

The naive reference loads every tensor, stacks each group in float32 and runs a full torch.linalg.svd per
layer residual. Each run is its own subprocess, so wall time and peak RSS (measure.py: the process's own) are per run.
lors-convert runs twice: the table shows the first run, and the two outputs must be byte-identical. Every run
gets a thread per core (OMP_NUM_THREADS, unless set).

    python scripts/bench_convert.py --preset 200m --rank 64
    python scripts/bench_convert.py --preset tinyllama --rank 64 --skip-naive
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from measure import run_measured

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
# both runs get a thread per core (the naive one's default): the CLI otherwise counts the cores it finds idle at its
# start, which the run just before can make one
ENV.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))


def timed(cmd: list[str], env: dict[str, str] = ENV) -> tuple[float, float]:
    """Run a command; returns (wall seconds, peak RSS in MB) of that process alone. Every run starts with nothing
    left to write back to disk, so that none pays for the one before (the generated checkpoint, an output)."""
    os.sync()
    return run_measured(cmd, env)[:2]


def naive(checkpoint: Path, rank: int, device: str, out: Path) -> None:
    """The reference: everything in memory, exact SVD per layer, factors stored like lors-convert's."""
    import torch
    from safetensors.torch import load_file, save_file

    from lors_convert.checkpoint import TensorInfo
    from lors_convert.stacks import find_stacks

    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(checkpoint / shard))
    stacks, _ = find_stacks({k: TensorInfo(tuple(v.shape), v.dtype) for k, v in state.items()}, [], [])
    result, errors = {}, []
    for stack in stacks:
        weights = torch.stack([state[n].float().reshape(stack.rows, -1) for n in stack.names]).to(device)
        shared = weights.mean(0).to(stack.dtype)
        result[stack.template] = shared.cpu()
        for name, weight in zip(stack.names, weights):
            u, s, vh = torch.linalg.svd(weight - shared.float(), full_matrices=False)
            root = s[:rank].sqrt()
            b, a = (u[:, :rank] * root).to(stack.dtype), (vh[:rank] * root[:, None]).to(stack.dtype)
            error = weight - shared.float() - b.float() @ a.float()
            errors.append((error.norm() / weight.norm()).item())
            result[name + ".lora_A"], result[name + ".lora_B"] = a.cpu().contiguous(), b.cpu().contiguous()
    save_file(result, out / "naive.safetensors")
    (out / "naive.json").write_text(json.dumps({"layer_errors": errors}))


def lors_errors(output: Path) -> list[float]:
    from lors_convert.lors_format import read_lors

    _, meta = read_lors(output)
    return [e for group in meta.groups for e in group.layer_errors]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="200m", help="a make_synthetic.py preset (100m, 200m, tinyllama, 3b, 7b)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lors-bench"))
    parser.add_argument("--skip-naive", action="store_true", help="no naive reference (it holds the whole model)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--shared", default=None, help="lors-convert's --shared (default: the tool's default, auto)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint and outputs")
    parser.add_argument("--naive-child", nargs=2, metavar=("CHECKPOINT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.naive_child:
        naive(Path(args.naive_child[0]), args.rank, device, Path(args.naive_child[1]))
        return
    python = sys.executable
    checkpoint = args.workdir / args.preset
    if not (checkpoint / "model.safetensors.index.json").is_file():
        print(f"generating {checkpoint} ...", flush=True)
        gen_wall, _ = timed([python, str(ROOT / "scripts" / "make_synthetic.py"), args.preset, str(checkpoint)])
        print(f"generated in {gen_wall:.0f} s", flush=True)
    from lors_convert.checkpoint import sha256_files

    runs, hashes = {}, []
    for attempt in (1, 2):
        out = args.workdir / f"out{attempt}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        wall, rss = timed(
            [
                python,
                "-m",
                "lors_convert",
                "convert",
                str(checkpoint),
                "-o",
                str(out / "model.lors.safetensors"),
                "--rank",
                str(args.rank),
                *(["--shared", args.shared] if args.shared else []),
                "--device",
                device,
                "--quiet",
                "--json",
            ]
        )
        files = list(out.iterdir())
        hashes.append(sha256_files(sorted(files)))  # the same names in both runs: the bytes decide
        if attempt == 1:
            errors = lors_errors(
                out / ("model.lors.safetensors.index.json" if len(files) > 1 else "model.lors.safetensors")
            )
            runs["lors-convert"] = (wall, rss, sum(errors) / len(errors))
        print(f"lors-convert run {attempt}: {wall:.1f} s, {rss:.0f} MB", flush=True)
    if not args.skip_naive:
        out = args.workdir / "naive"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        wall, rss = timed(
            [python, __file__, "--rank", str(args.rank), "--device", device, "--naive-child", str(checkpoint), str(out)]
        )
        errors = json.loads((out / "naive.json").read_text())["layer_errors"]
        runs["naive (exact SVD)"] = (wall, rss, sum(errors) / len(errors))

    from machine import describe

    print(
        f"\n{args.preset} ({checkpoint}), --rank {args.rank} --shared {args.shared or 'auto (default)'}, "
        f"device {device}; {describe(torch.device(device))}; load average {os.getloadavg()[0]:.1f}"
    )
    print("| run | wall (s) | peak RSS (MB) | mean rel. error |")
    print("|---|---:|---:|---:|")
    for name, (wall, rss, err) in runs.items():
        print(f"| {name} | {wall:.1f} | {rss:.0f} | {err:.5f} |")
    if len(runs) == 2:
        (lw, lr, le), (nw, nr, ne) = runs.values()
        print(f"| ratio lors / naive | {lw / nw:.3f} | {lr / nr:.3f} | {le / ne:.4f} |")
    print(f"output byte-identical across two runs: {hashes[0] == hashes[1]}")
    if not args.keep:
        for name in (args.preset, "out1", "out2", "naive"):
            shutil.rmtree(args.workdir / name, ignore_errors=True)


if __name__ == "__main__":
    main()
