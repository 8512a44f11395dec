"""How LLM compression scales past SmolLM2: memory and time by model size, measured where this machine can run it
and estimated by shapes (the same estimates the memory checks compare) for every size.

    python scripts/bench_llm_scale.py [--dir DIR] [--preset tinyllama] [--rows ROW ...] [--calib-lines 20000]
    python scripts/bench_llm_scale.py --estimates-only

Measured: a TinyLlama-shaped 1.1B (22 layers, hidden 2048, MLP 5632; random bf16 weights from
scripts/make_synthetic.py, SmolLM2's vocabulary and tokenizer from its GGUF), one CLI process per row. A row is a
`lors-convert compress` of that model, e.g. "--reduction 0.2 --finetune-minutes 0"; a refused row (a memory check)
is shown with its message. The weights are not trained, so no perplexity is printed: only time and memory mean
anything here.

Estimated: SmolLM2-135M (its GGUF is dequantized whole), the 1.1B and a Llama-2-7B-shaped model (32 layers, hidden
4096, MLP 11008, vocabulary 32,000) by their shapes: calibration's peak with --fisher and convert's default samples
(on a GPU the same terms are on the device: the resident parts of the model, one block, one block's statistics;
the CPU holds the block being read), and fine-tuning's at --batch-size 32 and 8 (student at 20% fewer stacked
parameters with gradients and AdamW state, the teacher offloaded, activations and logits). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from bench_llm import run_cli, smollm2_gguf
from machine import describe
from make_synthetic import PRESETS, checkpoint_shapes

from lors_convert.calibrate import GB, block_bytes, calibration_bytes, calibration_tokens
from lors_convert.checkpoint import TensorInfo, TensorSource
from lors_convert.config import ConvertConfig
from lors_convert.finetuning import training_bytes
from lors_convert.hf import open_source
from lors_convert.stacks import find_stacks

ROWS = ["--reduction 0.2 --finetune-minutes 0", "--reduction 0.2 --finetune-minutes 10"]
LLAMA2_7B = PRESETS["7b"]


def synthetic_llama(folder: Path, preset: str) -> None:
    """The checkpoint, and SmolLM2's tokenizer beside it (its 49,152-token vocabulary is the model's)."""
    import subprocess

    from transformers import AutoTokenizer

    if not (folder / "config.json").is_file():
        script = REPO / "scripts" / "make_synthetic.py"
        subprocess.run([sys.executable, script, preset, folder, "--vocab", "49152"], check=True)
    gguf = smollm2_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)


def by_shapes(layers: int, hidden: int, mlp: int, heads: int, kv_heads: int, vocab: int) -> TensorSource:
    """A bf16 checkpoint known by its shapes alone (nothing to read)."""
    shapes = checkpoint_shapes(layers, hidden, mlp, heads, kv_heads, vocab)
    info = {name: TensorInfo(shape, torch.bfloat16) for name, shape in shapes.items()}
    return TensorSource(Path("shapes"), [], info, lambda name: None)


class Shape:
    """What training_bytes reads of a config."""

    def __init__(self, layers: int, hidden: int, mlp: int, heads: int, kv_heads: int, vocab: int) -> None:
        self.num_hidden_layers, self.hidden_size, self.num_attention_heads, self.vocab_size = (
            layers,
            hidden,
            heads,
            vocab,
        )


def estimates(name: str, source: TensorSource, shape: Shape, offloaded: bool) -> list[str]:
    stacks = find_stacks(source.info)[0]
    calibration = calibration_bytes(source, stacks, True, calibration_tokens(ConvertConfig()), offloaded)
    stacked = sum(source.info[n].numel for s in stacks for n in s.names)
    student = sum(info.numel for info in source.info.values()) - round(0.2 * stacked)
    outside, largest, _ = block_bytes(source, stacks)
    teacher = (outside + largest) // 4 if offloaded else sum(info.numel for info in source.info.values())
    train = {b: sum(training_bytes(student, teacher, shape, True, b, 128).values()) / GB for b in (32, 8)}
    return [
        name,
        f"{sum(source.info[n].numel for n in source.info) / 1e9:.2f}B",
        "one block at a time" if offloaded else "whole, float32",
        f"{calibration['model'] / GB:.1f}",
        f"{(calibration['inputs'] + calibration['fisher'] + calibration['factor']) / GB:.1f}",
        f"{sum(calibration.values()) / GB:.1f}",
        f"{train[32]:.1f} / {train[8]:.1f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="where the model is (made there if missing)")
    parser.add_argument("--preset", default="tinyllama", help="scripts/make_synthetic.py's size")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "mixed_en.txt")
    parser.add_argument("--calib-lines", type=int, default=20000)
    parser.add_argument("--rows", nargs="+", default=ROWS)
    parser.add_argument("--estimates-only", action="store_true")
    args = parser.parse_args()
    machine = describe()
    print(f"machine: {machine}; load average at start {os.getloadavg()[0]:.1f}", flush=True)
    measured = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp) / args.preset
        calib = Path(tmp) / "calibration.txt"
        if not args.estimates_only:
            synthetic_llama(folder, args.preset)
            lines = [line for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
            calib.write_text("\n".join(lines[: args.calib_lines]) + "\n", encoding="utf-8")
        for row in [] if args.estimates_only else args.rows:
            out = Path(tmp) / "model.lors.safetensors"
            command = ["compress", str(folder), "--calibrate", str(calib), *shlex.split(row)]
            wall, peak, log = run_cli([*command, "-o", str(out), "--quiet", "--force"], check=False)
            refused = next((line for line in log.splitlines() if line.startswith("error:")), "")
            measured.append((row, wall, peak, refused))
            print(f"{row}: {wall / 60:.1f} min, {peak:.1f} GB {refused}", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}; {machine}")
    if measured:
        print(f"\ncalibration: the first {args.calib_lines} lines of {args.data.name}\n")
        print(f"| `lors-convert compress` {args.preset} ... | wall | peak RSS | refused |")
        print("|---|---:|---:|---|")
        for row, wall, peak, refused in measured:
            print(f"| `{row}` | {wall / 60:.1f} min | {peak:.1f} GB | {refused} |")
    smollm2 = (30, 576, 1536, 9, 3, 49152)
    tinyllama = (*PRESETS["tinyllama"][:5], 49152)
    models = [
        ("SmolLM2-135M (GGUF)", open_source(smollm2_gguf()), Shape(*smollm2), False),
        ("TinyLlama-shaped 1.1B", by_shapes(*tinyllama), Shape(*tinyllama), True),
        ("Llama-2-7B-shaped", by_shapes(*LLAMA2_7B), Shape(*LLAMA2_7B), True),
    ]
    print(
        "\nestimates by shapes, GB (calibration with --fisher and convert's defaults: 256 samples, lines of up to "
        "128 tokens, 3/4 of them model-written, up to 256 tokens more; fine-tuning at 20%)\n"
    )
    print(
        "| model | parameters | calibration holds the model | its weights | one block's K, G and a factor "
        "| calibration's peak (CPU, or GPU) | fine-tuning, --batch-size 32 / 8 |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    for name, source, shape, offloaded in models:
        print("| " + " | ".join(estimates(name, source, shape, offloaded)) + " |")


if __name__ == "__main__":
    main()
