"""Where a converted SmolLM2 loses: the mean next-token loss by token position in the line, of the original (the
GGUF dequantized) and of each LORS model given, on held-out lines of the calibration file and on fortune passages.

    python scripts/llm_positions.py MODEL.lors.safetensors [...] [--eval-lines 400] [--fortunes 300]

Held-out lines are the last --eval-lines of --data (as in scripts/bench_llm.py, which no conversion or fine-tuning
reads); fortunes are text of another kind (scripts/bench_finetune.py). Prints one table per text: mean loss in nats
of the positions in each bin (predicting token p+1 from tokens 0..p), and perplexity over all of them.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_finetune import fortune_passages
from bench_llm import line_losses, smollm2_gguf, smollm2_tokenizer

import lors_convert
from lors_convert.hf import dense_model

BINS = [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 128)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "mixed_en.txt")
    parser.add_argument("--eval-lines", type=int, default=400)
    parser.add_argument("--fortunes", type=int, default=300)
    args = parser.parse_args()
    gguf = smollm2_gguf()
    tokenizer = smollm2_tokenizer(gguf)
    lines = [line.strip() for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = {f"held-out (last {args.eval_lines} lines)": lines[-args.eval_lines :]}
    texts[f"fortunes ({args.fortunes} passages)"] = fortune_passages(args.fortunes)
    models = {"original": dense_model(gguf).eval()}
    models.update({path.name: lors_convert.load(path).eval() for path in args.models})
    losses = {name: {kind: line_losses(m, tokenizer, t) for kind, t in texts.items()} for name, m in models.items()}
    for kind in texts:
        print(f"\n{kind}: mean loss (nats) by position\n")
        print("| model | " + " | ".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in BINS) + " | ppl |")
        print("|---" * (len(BINS) + 2) + "|")
        for name in models:
            rows = losses[name][kind]
            cells = [
                sum(r[a:b].sum().item() for r in rows) / max(sum(r[a:b].numel() for r in rows), 1) for a, b in BINS
            ]
            total = sum(r.sum().item() for r in rows) / sum(r.numel() for r in rows)
            print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {math.exp(total):.1f} |")


if __name__ == "__main__":
    main()
