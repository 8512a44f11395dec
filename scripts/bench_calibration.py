"""Zero-shot fidelity of all-MiniLM-L6-v2 converted by each method at 30/50/70% fewer stacked parameters,
and what the same fine-tuning budget reaches from each 50% starting point.

    python scripts/bench_calibration.py [--model DIR] [--data FILE] [--finetune-minutes 1] [--out FILE.json]

    python scripts/bench_calibration.py --reductions 0.5 --methods "auto, calibrated (recommended)" --damping 0.1
    python scripts/bench_calibration.py --reductions 0.5 --methods "auto, calibrated, fisher" --fisher-damping 1

Calibration uses the first --calib-lines lines of --data (pydocs_en.txt); fidelity (eval's cos and top10)
is measured on the last --eval-lines lines (never seen by calibration or fine-tuning) and on text of another
kind (fortune passages, as in bench_finetune.py). Fine-tuning trains on the lines in between. --damping is
convert's option; --fisher-damping sets calibrate.FISHER_DAMPING, the damping of --fisher's G, for the run.
Prints a markdown table under a line naming the machine and the version; CUDA is used for calibration,
evaluation and fine-tuning when present.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_finetune import fortune_passages, minilm_dir
from machine import describe

from lors_convert import calibrate
from lors_convert.checkpoint import open_checkpoint
from lors_convert.config import ConvertConfig, FinetuneConfig
from lors_convert.conversion import convert
from lors_convert.data import Examples
from lors_convert.evaluate import fidelity, load_student_teacher
from lors_convert.finetuning import finetune
from lors_convert.runtime import setup_device

METHODS = {  # name -> (shared, calibrated, sequential, fisher)
    "mean + SVD (plain)": ("mean", False, False, False),
    "per-layer SVD, no sharing": ("none", False, False, False),
    "auto, weight space": ("auto", False, False, False),
    "refit, weight space": ("refit", False, False, False),
    "mean, calibrated": ("mean", True, False, False),
    "refit, calibrated": ("refit", True, False, False),
    "auto, calibrated (recommended)": ("auto", True, False, False),
    "auto, calibrated, sequential": ("auto", True, True, False),
    "auto, calibrated, fisher": ("auto", True, False, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "pydocs_en.txt")
    parser.add_argument("--reductions", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--calib-lines", type=int, default=3000)
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--eval-lines", type=int, default=512)
    parser.add_argument("--finetune-minutes", type=float, default=0.0, help="per 50%% starting point; 0: skip")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--damping", type=float, default=ConvertConfig.damping, help="convert's --damping")
    parser.add_argument("--fisher-damping", type=float, default=calibrate.FISHER_DAMPING, help="G's damping")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    calibrate.FISHER_DAMPING = args.fisher_damping
    model = args.model or minilm_dir()
    device = setup_device(1)
    work = Path(tempfile.mkdtemp(prefix="bench_calibration_"))
    lines = [line for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    calib, train = work / "calib.txt", work / "train.txt"
    calib.write_text("\n".join(lines[: args.calib_lines]))
    train.write_text("\n".join(lines[args.calib_lines : -args.eval_lines]))
    held_out, other = Examples(texts=lines[-args.eval_lines :]), Examples(texts=fortune_passages())
    print(
        f"machine: {describe(device)}; calibration {args.calib_lines} lines ({args.calib_samples} sampled, damping "
        f"{args.damping}, --fisher's {args.fisher_damping}), held-out {len(held_out)} lines, other text {len(other)}"
    )

    def measure(lors: Path) -> dict:
        pair = load_student_teacher(lors, model)
        student, teacher = pair.student.to(device), pair.teacher.to(device)
        scores = {}
        for label, examples in (("pydocs", held_out), ("other", other)):
            result = fidelity(student, teacher, examples, pair.tokenizer, device=device)
            scores[label] = {"cos": result["cos"], "top10": result["top10"]}
        return scores

    rows = []
    for reduction in args.reductions:
        for method in args.methods:
            shared, calibrated, sequential, fisher = METHODS[method]
            out = work / f"{shared}-{calibrated}-{sequential}-{fisher}-{reduction}.safetensors"
            settings = ConvertConfig(
                reduction=reduction,
                shared=shared,
                calibrate=[calib] if calibrated else [],
                calib_samples=args.calib_samples,
                damping=args.damping,
                sequential=sequential,
                fisher=fisher,
                device=device.type,
            )
            start = time.perf_counter()
            convert(open_checkpoint(model), out, settings)
            seconds = time.perf_counter() - start
            row = {"method": method, "reduction": reduction, "convert_s": seconds, **measure(out), "lors": str(out)}
            rows.append(row)
            print(
                f"{reduction:.0%} {method:32} cos {row['pydocs']['cos']:.4f} top10 {row['pydocs']['top10']:.4f} "
                f"| other cos {row['other']['cos']:.4f} top10 {row['other']['top10']:.4f} | {seconds:.1f} s",
                flush=True,
            )
    if args.finetune_minutes > 0:
        for row in [r for r in rows if r["reduction"] == 0.5]:
            probe = FinetuneConfig(steps=1, batch_size=32, eval_examples=32)
            start = time.perf_counter()
            finetune(
                Path(row["lors"]),
                [train],
                work / "probe.safetensors",
                probe,
                teacher=model,
                quiet=True,
                force=True,
                log=lambda *a: None,
            )
            step_s = max((time.perf_counter() - start) / 4, 1e-3)  # a step plus loading and two evaluations
            steps = max(10, int(args.finetune_minutes * 60 / step_s))
            settings = FinetuneConfig(steps=steps, batch_size=32, warmup=max(1, steps // 10), eval_examples=32)
            tuned = work / f"tuned-{Path(row['lors']).name}"
            start = time.perf_counter()
            finetune(
                Path(row["lors"]), [train], tuned, settings, teacher=model, quiet=True, force=True, log=lambda *a: None
            )
            row["finetune"] = {"steps": steps, "seconds": time.perf_counter() - start, **measure(tuned)}
            print(
                f"fine-tuned {row['method']:32} {steps} steps: cos {row['finetune']['pydocs']['cos']:.4f}", flush=True
            )

    print(
        "\n| reduction | method | cos | top10 | cos (other text) | top10 (other text) | convert s |"
        + (" cos after fine-tune |" if args.finetune_minutes > 0 else "")
    )
    print("|---|---|---|---|---|---|---|" + ("---|" if args.finetune_minutes > 0 else ""))
    for r in rows:
        tuned = (
            f" {r['finetune']['pydocs']['cos']:.3f} ({r['finetune']['steps']} steps) |"
            if "finetune" in r
            else (" |" if args.finetune_minutes > 0 else "")
        )
        print(
            f"| {r['reduction']:.0%} | {r['method']} | {r['pydocs']['cos']:.3f} | {r['pydocs']['top10']:.3f} | "
            f"{r['other']['cos']:.3f} | {r['other']['top10']:.3f} | {r['convert_s']:.1f} |{tuned}"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
