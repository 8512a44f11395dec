"""Does the shared matrix pay once the model is fine-tuned, and what should a user pick at equal bytes?
all-MiniLM-L6-v2, every row calibrated on the same lines and distilled for the same wall-clock time.

Part 1, the structural question: for each --reductions and each --shared, a calibrated conversion (the first
--calib-lines of --data), fidelity zero-shot, then --minutes of distillation on the lines after them, fidelity
after. Same parameter budget, same time: whatever a row's step costs, it gets the same minutes.

Part 2, a decision table at 50%, each row with its stacked-weight bytes (what the stacked layers take on disk
in the row's storage form) and fidelity:
  - LORS (--shared mean) + fine-tune, and per-layer low rank (--shared none) + fine-tune, stored in bfloat16;
  - int8 weights of the original (weight-only, symmetric per output channel, as torchao stores them);
  - LORS + fine-tune with int8 factors and S (the same quantizer);
  - every other layer dropped (3 of 6), then distilled for --minutes (output loss), stored in bfloat16.
Fidelity is eval's mean-pooled cos and top10 against the original, on held-out lines of --data (never used for
calibration or training) and on text of another kind (literary and humorous fortune passages).

    python scripts/bench_structure.py [--minutes 1.5] [--reductions 0.3 0.5 0.7] [--shared mean none] [--fisher]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_finetune import fortune_passages, minilm_dir

from lors_convert.checkpoint import open_checkpoint
from lors_convert.config import ConvertConfig, FinetuneConfig
from lors_convert.conversion import convert
from lors_convert.data import Examples, TextLines
from lors_convert.evaluate import fidelity, load_student_teacher
from lors_convert.finetuning import budget_spent, finetune, learning_rate, step_loss
from lors_convert.hf import dense_model, load_tokenizer
from lors_convert.runtime import autocast, setup_device


def int8_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """Weight-only int8, symmetric per output channel (dim 0), as torchao's int8 weight-only stores it: round
    to the nearest of 255 levels of max|w| / 127. (torch.ao.quantization and quantize_per_channel are
    deprecated in torch 2.13; torchao is not a dependency.)"""
    scales = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return (weight / scales).round().clamp(-127, 127) * scales


def stored_as(model: nn.Module, names: set[str], form: str) -> int:
    """Round the named parameters in place to their storage form (bfloat16 or int8); returns their bytes."""
    total = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in names:
                if form == "int8":
                    p.copy_(int8_round_trip(p.reshape(len(p), -1)).reshape(p.shape))
                    total += p.numel() + 4 * len(p)  # a float32 scale per output channel
                else:
                    p.copy_(p.to(torch.bfloat16).float())
                    total += 2 * p.numel()
    return total


def stacked_parameter_names(model: nn.Module) -> set[str]:
    """The stacked layers' weights in a dense BERT, or S and the factors in a LORS one."""
    return {
        n
        for n, p in model.named_parameters()
        if p.dim() == 2 and (".layer." in n and "LayerNorm" not in n or n.startswith("lors_shared"))
    }


def drop_layers_and_distil(teacher: nn.Module, train: Examples, tokenizer, minutes: float) -> nn.Module:
    """Every other layer of the original kept (0, 2, 4), then distilled on its output for `minutes`."""
    student = copy.deepcopy(teacher)
    student.encoder.layer = nn.ModuleList(student.encoder.layer[::2])
    student.config.num_hidden_layers = len(student.encoder.layer)
    for name, p in student.named_parameters():
        p.requires_grad_(not name.startswith("pooler"))  # mean pooling never reaches the pooler
    settings = FinetuneConfig(steps=10**6, minutes=minutes)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr)
    generator = torch.Generator().manual_seed(0)
    started, spent, step = time.perf_counter(), 0.0, 0
    while spent < 1:
        indices = torch.randint(len(train), (settings.batch_size,), generator=generator).tolist()
        batch = train.batch(indices, tokenizer, settings.max_length, torch.device("cpu"))
        with autocast(torch.device("cpu")):
            loss = step_loss(student, teacher, batch, [], "distill")
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step, spent)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        spent = budget_spent(started, 0.0, minutes, 1, torch.device("cpu"))
    print(f"  layer dropping: {step} distillation steps", flush=True)
    return student.requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="dense model directory [installed MiniLM]")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "mixed_en.txt")
    parser.add_argument("--calib-lines", type=int, default=20000)
    parser.add_argument("--train-lines", type=int, default=60000)
    parser.add_argument("--eval-lines", type=int, default=512)
    parser.add_argument("--reductions", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--shared", nargs="+", default=["mean", "none"], choices=["mean", "refit", "none", "auto"])
    parser.add_argument("--minutes", type=float, default=1.5, help="distillation time of every row")
    parser.add_argument("--skip-decision", action="store_true", help="part 1 only")
    parser.add_argument("--fisher", action="store_true", help="convert with --fisher (output-weighted factors)")
    args = parser.parse_args()
    model_dir = args.model or minilm_dir()
    device = setup_device(1)
    work = Path(tempfile.mkdtemp(prefix="bench_structure_"))
    lines = TextLines([args.data])
    total = args.calib_lines + args.train_lines + args.eval_lines
    if len(lines) < total:
        sys.exit(f"{args.data} has {len(lines)} lines; need {total}")
    calib, train_file = work / "calib.txt", work / "train.txt"
    calib.write_text("\n".join(lines.read(list(range(args.calib_lines)))) + "\n")
    train_file.write_text("\n".join(lines.read(list(range(args.calib_lines, total - args.eval_lines)))) + "\n")
    held_out = Examples(texts=lines.read(list(range(total - args.eval_lines, total))))
    other = Examples(texts=fortune_passages())
    tokenizer = load_tokenizer(model_dir)
    teacher = dense_model(model_dir).eval()
    print(
        f"{model_dir.name}: calibration {args.calib_lines} lines, distillation on {args.train_lines} lines for "
        f"{args.minutes:g} min a row, held-out {len(held_out)} lines, fortunes {len(other)}; {device.type}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, torch {torch.__version__}",
        flush=True,
    )

    def score(student: nn.Module) -> dict:
        return {
            label: fidelity(student, teacher, examples, tokenizer, device=device)
            for label, examples in (("held-out", held_out), ("fortunes", other))
        }

    rows, tuned = [], {}
    for reduction in args.reductions:
        for shared in args.shared:
            lors = work / f"{shared}-{reduction}.safetensors"
            convert(
                open_checkpoint(model_dir),
                lors,
                ConvertConfig(reduction=reduction, shared=shared, calibrate=[calib], fisher=args.fisher),
            )
            before = score(load_student_teacher(lors, model_dir).student)
            out = work / f"{shared}-{reduction}.tuned.safetensors"
            settings = FinetuneConfig(steps=10**6, minutes=args.minutes, eval_examples=32)
            result = finetune(lors, [train_file], out, settings, teacher=model_dir, quiet=True, log=lambda *a: None)
            student = load_student_teacher(out, model_dir).student
            after = score(student)
            tuned[(shared, reduction)] = student
            rows.append((reduction, shared, result["steps"], before, after))
            print(
                f"  {reduction:.0%} --shared {shared}: zero-shot fortunes {before['fortunes']['cos']:.3f}, after "
                f"{result['steps']} steps {after['fortunes']['cos']:.3f}",
                flush=True,
            )

    print(f"\n### --shared at equal parameters and equal distillation time ({args.minutes:g} min)\n")
    print(
        "| fewer stacked params | --shared | steps | cos held-out: zero-shot → tuned | cos fortunes | top10 fortunes |"
    )
    print("|---|---|---:|---|---|---|")
    for reduction, shared, steps, before, after in rows:
        cells = [
            f"{before[label][metric]:.3f} → {after[label][metric]:.3f}"
            for label, metric in (("held-out", "cos"), ("fortunes", "cos"), ("fortunes", "top10"))
        ]
        print(f"| {reduction:.0%} | {shared} | {steps} | " + " | ".join(cells) + " |")
    if args.skip_decision or 0.5 not in args.reductions:
        return

    dense_bytes = 4 * sum(teacher.get_parameter(n).numel() for n in stacked_parameter_names(teacher))
    decision = [("original, float32", dense_bytes, score(teacher))]
    for shared, label in (("mean", "LORS 50% (mean) + fine-tune"), ("none", "per-layer low rank 50% + fine-tune")):
        if (shared, 0.5) in tuned:
            for form in ("bfloat16", "int8"):
                student = copy.deepcopy(tuned[(shared, 0.5)])
                size = stored_as(student, stacked_parameter_names(student), form)
                decision.append((f"{label}, {form}", size, score(student)))
    quantized = copy.deepcopy(teacher)
    decision.append(
        (
            "int8 weights of the original",
            stored_as(quantized, stacked_parameter_names(quantized), "int8"),
            score(quantized),
        )
    )
    dropped = drop_layers_and_distil(teacher, Examples(texts=TextLines([train_file])), tokenizer, args.minutes)
    decision.append(
        (
            "3 of 6 layers kept + distillation, bfloat16",
            stored_as(dropped, stacked_parameter_names(dropped), "bfloat16"),
            score(dropped),
        )
    )

    print(f"\n### What to pick: stacked-weight bytes and fidelity (tuned rows: {args.minutes:g} min of distillation)\n")
    print("| model | stacked bytes (MB) | vs float32 original | cos held-out | cos fortunes | top10 fortunes |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, size, result in decision:
        print(
            f"| {label} | {size / 1e6:.2f} | {size / dense_bytes:.3f} | {result['held-out']['cos']:.3f} | "
            f"{result['fortunes']['cos']:.3f} | {result['fortunes']['top10']:.3f} |"
        )


if __name__ == "__main__":
    main()
