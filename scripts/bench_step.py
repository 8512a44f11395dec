"""One fine-tuning step of a LORS student against the dense student's, as `finetune` takes it: student forward,
the teacher's forward for the distillation loss (every stacked layer's output plus the final output), backward,
AdamW. Same batch, same process, steps interleaved, fastest of each; bf16 autocast on a GPU, float32 on a CPU.

For each (dense folder, LORS file) pair, two ways:
  eager     the models as `finetune` runs them;
  compiled  each stacked block's forward under torch.compile (regional compilation), teacher and students alike.
            The forward hooks that collect the layers' outputs for the loss run outside the compiled code, so a
            fresh hook each step recompiles nothing.

    python scripts/bench_step.py --pair DENSE_DIR LORS_FILE [--pair ...] [--batch-size 32] [--length 128]

Token ids are random (a step's cost does not depend on the text). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_lors_forward import fastest_seconds

from lors_convert.evaluate import load_student_teacher
from lors_convert.finetuning import stacked_layer_paths, step_loss
from lors_convert.runtime import autocast, compute_device


def compile_blocks(model: torch.nn.Module, paths: list[str]) -> torch.nn.Module:
    """The model with each block's forward compiled; the block's own call (and the hooks on it) stays eager.
    Blocks share compiled code, one version per kind of block (teacher or student, with or without grad): a LORS
    rank that differs by layer is a dynamic size rather than one more version, and the KV cache a training step
    has no use for (a guard per layer) is off."""
    torch._dynamo.config.force_parameter_static_shapes = False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False
    for path in paths:
        block = model.get_submodule(path)
        block.forward = torch.compile(block.forward)
    return model


def training_step(student, teacher, batch, paths, device, compiled: bool = False):
    """A full training step (forward, loss, backward, AdamW) on a copy of the student."""
    model = copy.deepcopy(student).requires_grad_(True)
    if compiled:
        compile_blocks(model, paths)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step():
        with autocast(device):
            loss = step_loss(model, teacher, batch, paths, "distill")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", nargs=2, type=Path, action="append", required=True, metavar=("DENSE", "LORS"))
    parser.add_argument("--batch-size", type=int, default=32, help="[32, finetune's default]")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence [128, finetune's default]")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timing per pair and mode")
    args = parser.parse_args()
    device = compute_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}, torch {torch.__version__}, batch {args.batch_size} x {args.length}", flush=True)
    rows = []
    for dense, lors in args.pair:
        pair = load_student_teacher(lors, dense)
        student, teacher = pair.student.to(device), pair.teacher.to(device).eval()
        paths = stacked_layer_paths(teacher, pair.meta)
        shape, seeded = (args.batch_size, args.length), torch.Generator().manual_seed(0)
        ids = torch.randint(0, teacher.config.vocab_size, shape, generator=seeded)
        batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        for mode in args.modes.split(","):
            compiled = mode == "compiled"
            torch._dynamo.reset()
            judge = compile_blocks(copy.deepcopy(teacher), paths) if compiled else teacher
            steps = [training_step(model, judge, batch, paths, device, compiled) for model in (student, teacher)]
            t_lors, t_dense = fastest_seconds(steps, device, args.budget, warmup=2)
            rows.append((lors.name.split(".")[0], mode, t_lors, t_dense))
            print(f"  {rows[-1][0]} {mode}: LORS {t_lors * 1e3:.1f} ms, dense {t_dense * 1e3:.1f} ms", flush=True)
            del judge, steps
        del pair, student, teacher
    print("\n| model | mode | LORS step ms | dense student step ms | ratio |")
    print("|---|---|---:|---:|---:|")
    for model, mode, t_lors, t_dense in rows:
        print(f"| {model} | {mode} | {t_lors * 1e3:.1f} | {t_dense * 1e3:.1f} | {t_lors / t_dense:.3f} |")


if __name__ == "__main__":
    main()
