"""How a calibrated LLM conversion scales past SmolLM2: time and peak memory on a TinyLlama-shaped 1.1B (22 layers,
hidden 2048, MLP 5632; random weights from scripts/make_synthetic.py, SmolLM2's vocabulary and tokenizer read from
its GGUF), one CLI process per row, on this machine. Only time and memory mean anything here: the weights are not
trained, so no perplexity is printed.

    python scripts/bench_llm_scale.py [--dir DIR] [--preset tinyllama] [--rows ROW ...] [--calib-lines 20000]

--preset takes any of scripts/make_synthetic.py's sizes (e.g. 200m, a quicker check of the memory estimate). Rows
that calibrate also show calibration's own estimate of its peak (the number its memory check compares).

A row is a `lors-convert` command after the model: `convert` options (default), e.g. "--calibrate {calib} --fisher
--reduction 0.2", or a `finetune` of the last row's output, e.g. "finetune {lors} --data {calib} --steps 2
--batch-size 8 --eval-examples 8". A refused row (the memory check) is reported with its message.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from bench_llm import run_cli, smollm2_gguf

from lors_convert.calibrate import calibration_bytes
from lors_convert.checkpoint import open_checkpoint
from lors_convert.stacks import find_stacks

ROWS = [
    "--calibrate {calib} --fisher --reduction 0.2 --calib-generated 0",
    "--calibrate {calib} --reduction 0.2 --calib-generated 0",
]


def synthetic_llama(folder: Path, preset: str) -> None:
    """The checkpoint, and SmolLM2's tokenizer beside it (its 49,152-token vocabulary is the model's)."""
    from transformers import AutoTokenizer

    if not (folder / "config.json").is_file():
        script = REPO / "scripts" / "make_synthetic.py"
        subprocess.run([sys.executable, script, preset, folder, "--vocab", "49152"], check=True)
    gguf = smollm2_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="where the model is (made there if missing)")
    parser.add_argument("--preset", default="tinyllama", help="scripts/make_synthetic.py's size")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mixed_en.txt")
    parser.add_argument("--calib-lines", type=int, default=20000)
    parser.add_argument("--rows", nargs="+", default=ROWS)
    args = parser.parse_args()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"machine: {machine}; load average at start {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp) / args.preset
        synthetic_llama(folder, args.preset)
        source = open_checkpoint(folder)
        stacks = find_stacks(source.info)[0]
        calib, lors = Path(tmp) / "calibration.txt", Path(tmp) / "model.lors.safetensors"
        lines = [line for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
        calib.write_text("\n".join(lines[: args.calib_lines]) + "\n", encoding="utf-8")
        for row in args.rows:
            words = shlex.split(row.format(calib=calib, lors=lors))
            out = Path(tmp) / "finetuned.lors.safetensors" if words[0] == "finetune" else lors
            command = words if words[0] == "finetune" else [str(folder), *words]
            wall, peak, log = run_cli([*command, "-o", str(out), "--quiet", "--force"], check=False)
            refused = next((line for line in log.splitlines() if line.startswith("error:")), "")
            calibrated = "--calibrate" in words and words[0] != "finetune"
            estimate = sum(calibration_bytes(source, stacks, "--fisher" in words).values()) / 1e9 if calibrated else 0
            results.append((row, wall, peak, estimate, refused))
            print(f"{row}: {wall / 60:.1f} min, {peak:.1f} GB (estimate {estimate:.1f}) {refused}", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}; {machine}")
    print(f"calibration: the first {args.calib_lines} lines of {args.data.name}\n")
    print(f"| `lors-convert` {args.preset} ... | wall | peak RSS | calibration's estimate | refused |")
    print("|---|---:|---:|---:|---|")
    for row, wall, peak, estimate, refused in results:
        print(f"| `{row}` | {wall / 60:.1f} min | {peak:.1f} GB | {estimate:.1f} GB | {refused} |")


if __name__ == "__main__":
    main()
