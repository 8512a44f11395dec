"""The `lors-convert` command line: typer commands over the library (and, for now, the `compress` recipe)."""

from __future__ import annotations

import difflib
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lors_convert import LorsError, __version__
from lors_convert.config import (
    DEFAULT_REDUCTION,
    LM_LR,
    LR,
    SHARD_SIZE,
    CompressConfig,
    ConvertConfig,
    ExportConfig,
    FinetuneConfig,
    InitConfig,
)
from lors_convert.console import stderr
from lors_convert.threads import choose_threads, revise_threads, threads_are_ours

app = typer.Typer(
    name="lors-convert",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Shrink models with stacked layers: each group of stacked weights becomes one shared matrix plus a "
    "low-rank residual per layer (LORS). `lors-convert MODEL` is `lors-convert convert MODEL`. "
    "Add --debug anywhere to see tracebacks.",
)
COMMANDS = {"convert", "compress", "init", "report", "inspect", "expand", "export", "verify", "finetune", "eval"}

FLAG = ""  # metavar of on/off options: newer typer versions would otherwise show them as taking a <bool>
Quiet = typer.Option(False, "--quiet", "-q", metavar=FLAG, help="No progress bars or third-party progress output.")
MaxPplIncrease = typer.Option(
    None,
    "--max-ppl-increase",
    metavar="R",
    help="Instead of --reduction, for a language model with --calibrate and --fisher: remove as much as keeps "
    "perplexity within R times the original's (1.2: 20% higher), measured on lines of the calibration text that "
    "are neither calibration samples nor held out.",
)
# compress warns a language model has lost much of its function above this factor of the original's perplexity,
# or below this fraction of positions where both predict the same next token
PPL_WARNING, TOP1_WARNING = 2.0, 0.5
ShardSize = typer.Option(SHARD_SIZE, "--shard-size", metavar="SIZE", help="Shard the output above this size.")
Force = typer.Option(
    False,
    "--force",
    "-f",
    metavar=FLAG,
    help="Overwrite an existing output (the old "
    "checkpoint of that name, single file or shards, is replaced once the new one is complete).",
)
AsJson = typer.Option(False, "--json", metavar=FLAG, help="Print JSON to stdout instead of a table.")
Data = typer.Option(
    ...,
    "--data",
    "-d",
    metavar="FILE",
    show_default=False,
    help="Text files, one example per line (or, with --model-factory, .safetensors/.pt files of "
    "input tensors, one row per example). Repeatable.",
)
Teacher = typer.Option(
    None,
    "--teacher",
    metavar="PATH",
    show_default="the source recorded in the LORS metadata",
    help="The dense original.",
)
Factory = typer.Option(
    None,
    "--model-factory",
    metavar="MODULE:FUNCTION",
    help="package.module:function returning "
    "the architecture as an nn.Module (for checkpoints that are not Hugging Face directories).",
)
Plot = typer.Option(
    None,
    "--plot",
    metavar="FILE.png",
    help='Also draw it as a PNG (replaced if it exists; needs matplotlib: pip install "lors-convert\\[plot]").',
)
CalibGenerated = typer.Option(
    ConvertConfig.calib_generated,
    "--calib-generated",
    metavar="F",
    help="A causal LM's share of the calibration samples written by the model itself (sampled: half from its "
    "start token, half its answers to calibration lines in its chat template), so calibration covers more than "
    "the file's kind of text. 0: the file's lines only.",
)
LearningRate = typer.Option(
    None,
    "--lr",
    help=f"Peak AdamW learning rate (linear warmup, then cosine decay); default {LM_LR:g} to distil a causal "
    f"language model, {LR:g} otherwise.",
)
AllowMismatch = typer.Option(
    False, "--allow-teacher-mismatch", metavar=FLAG, help="Use a teacher whose sha256 differs from the recorded source."
)


_killed_by: list[int] = []  # the signal of a kill, kept for when its exit was raised where Python ignores it


def exit_on_kill(signum: int, frame: object) -> None:
    _killed_by.append(signum)
    sys.exit(128 + signum)


def step() -> None:
    """Called at each step of long work: exits again after a kill whose exit was swallowed (a signal handler's
    exception raised inside a finalizer or a weakref callback is printed and ignored), and lets the thread count
    follow the machine's load (threads.revise_threads)."""
    if _killed_by:
        sys.exit(128 + _killed_by[0])
    revise_threads()


@contextmanager
def progress_bars(quiet: bool) -> Iterator:
    """Yields a `(description, total) -> advance()` factory drawing rich bars on stderr; each advance also lets
    the thread count follow the machine's load and carries out a kill (`step`)."""
    if quiet:
        yield lambda description, total: step
        return
    bars = Progress(
        TextColumn("{task.description:>16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
    )
    with bars:

        def start(description: str, total: int):
            task = bars.add_task(description, total=total)

            def advance() -> None:
                bars.advance(task)
                step()

            return advance

        yield start


def _version(value: bool) -> None:
    if value:
        print(f"lors-convert {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    pass


@app.command()
def convert(
    model: Path = typer.Argument(
        ...,
        help="Checkpoint: .safetensors, *.safetensors.index.json, HF directory, .pt/.pth/.bin, .gguf.",
        show_default=False,
    ),
    output: Optional[Path] = typer.Option(
        None,
        "--output",
        "-o",
        metavar="FILE",
        show_default="<input stem>.lors.safetensors beside the input",
        help="Output .safetensors.",
    ),
    rank: Optional[int] = typer.Option(
        None,
        "--rank",
        "-r",
        metavar="N",
        help="Rank N for every converted layer, "
        "whatever --shared is (a layer whose rank-N factors would cost as much as "
        "its dense matrix is stored dense).",
    ),
    reduction: Optional[float] = typer.Option(
        None,
        "--reduction",
        metavar="F",
        show_default=str(DEFAULT_REDUCTION),
        help="Remove this fraction of the stacked parameters, ranks allocated to minimise error.",
    ),
    energy: Optional[float] = typer.Option(
        None, "--energy", metavar="E", help="Smallest rank keeping this fraction of each residual's energy."
    ),
    max_ppl_increase: Optional[float] = MaxPplIncrease,
    include: List[str] = typer.Option(
        [],
        "--include",
        metavar="GLOB",
        show_default=False,
        help="Only groups whose template matches this glob (repeatable), e.g. '*.mlp.*'.",
    ),
    exclude: List[str] = typer.Option(
        [],
        "--exclude",
        metavar="GLOB",
        show_default=False,
        help="Skip groups whose template matches this glob (repeatable).",
    ),
    dtype: Optional[str] = typer.Option(
        None,
        "--dtype",
        metavar="DTYPE",
        show_default="the source's",
        help="Storage dtype of the output (float32, float16, bfloat16).",
    ),
    shard_size: str = ShardSize,
    shared: str = typer.Option(
        ConvertConfig.shared,
        "--shared",
        metavar="auto|mean|refit|none",
        help="Shared matrix per group: "
        "mean, refit (alternating least squares), none (per-layer low rank only), or auto "
        "(per group, S only where it leaves less error than the same numbers spent on rank; "
        "with --rank, only where it lowers the error at that rank and the group stays smaller than dense).",
    ),
    calibrate: List[Path] = typer.Option(
        [],
        "--calibrate",
        metavar="FILE",
        show_default=False,
        help="Text file(s), one example per line (tensor file(s) for "
        "--model-factory): factor to keep each layer's outputs on these inputs, "
        "not its weights; a layer's bias takes its mean output shift.",
    ),
    calib_samples: int = typer.Option(
        ConvertConfig.calib_samples,
        "--calib-samples",
        help="Calibration lines (or tensor rows); a causal LM's are packed into 512-token rows.",
    ),
    calib_max_length: int = typer.Option(
        ConvertConfig.calib_max_length, "--calib-max-length", help="Tokens per calibration line, at most."
    ),
    calib_generated: float = CalibGenerated,
    damping: float = typer.Option(
        ConvertConfig.damping,
        "--damping",
        help="Calibration damping λ, relative to the mean input energy: the objective is ‖(W − Ŵ)X‖² + λ‖W − Ŵ‖².",
    ),
    sequential: bool = typer.Option(
        ConvertConfig.sequential,
        "--sequential",
        metavar=FLAG,
        help="With --calibrate: factor layer after layer, "
        "each on the inputs produced by the already converted layers before it, "
        "correcting their error (one more pass over the samples per layer).",
    ),
    fisher: bool = typer.Option(
        ConvertConfig.fisher,
        "--fisher",
        metavar=FLAG,
        help="With --calibrate: weight each layer's output error by how much it moves the model's output "
        "(its gradients on the samples, one backward pass each), which also steers the rank budget "
        "to where the output needs it. Holds one out x out matrix per layer while planning.",
    ),
    model_factory: Optional[str] = typer.Option(
        None,
        "--model-factory",
        metavar="MODULE:FUNCTION",
        help="package.module:function building the model, for checkpoints without a config.json.",
    ),
    seed: int = typer.Option(
        ConvertConfig.seed, "--seed", help="Seed of the randomized SVD and of calibration sampling."
    ),
    device: Optional[str] = typer.Option(
        None,
        "--device",
        metavar="DEVICE",
        show_default="cuda when available, else cpu",
        help="Factor on this device, one group resident.",
    ),
    force: bool = Force,
    quiet: bool = Quiet,
    as_json: bool = AsJson,
) -> None:
    """Convert a checkpoint to LORS and print what was saved and what it cost."""
    from lors_convert.checkpoint import check_output_path, parse_size, return_freed_memory
    from lors_convert.conversion import convert as run_convert
    from lors_convert.factorize import check_device
    from lors_convert.hf import open_source
    from lors_convert.lors_format import read_lors
    from lors_convert.report import build_report, print_report

    settings = ConvertConfig(
        rank=rank,
        reduction=reduction,
        energy=energy,
        max_ppl_increase=max_ppl_increase,
        shared=shared,
        include=include,
        exclude=exclude,
        dtype=dtype,
        seed=seed,
        calibrate=calibrate,
        calib_samples=calib_samples,
        calib_max_length=calib_max_length,
        calib_generated=calib_generated,
        damping=damping,
        sequential=sequential,
        fisher=fisher,
        model_factory=model_factory,
        device=check_device(device),
    )
    settings.validate()
    size = parse_size(shard_size)
    if output is None:
        output = default_output(model)
    check_output_path(output, [model], force)  # at once: opening a GGUF takes seconds
    source = open_source(model)
    return_freed_memory()
    with progress_bars(quiet) as progress:
        files, _ = run_convert(source, output, settings, shard_size=size, force=force, progress=progress)
    result = build_report(*read_lors(files[-1]))
    print_report(result, as_json)
    if not as_json:
        stderr.print(f"wrote {', '.join(str(f) for f in files)}")
        hint = recovery_hint(result, output)
        if hint:
            stderr.print(f"[yellow]hint:[/yellow] {escape(hint)}", soft_wrap=True)


HIGH_ERROR = 0.3  # stacked rel. error above which conversion alone loses much of a model's function


def recovery_hint(result: dict, output: Path) -> str | None:
    """One line on what recovers the function after a lossy conversion."""
    error = result["stacked"]["rel_error"]
    if error <= HIGH_ERROR or result["from_scratch"]:
        return None
    # calibration alone is not enough for a language model (SmolLM2 at 20%: ppl 20,113 without --fisher, 105 with it;
    # scripts/bench_llm.py), so the remedy names both
    steps = (
        []
        if result["settings"].get("fisher")
        else ["convert again with --calibrate TEXT --fisher (factors for the model's real inputs and its output)"]
    )
    steps.append(f"then `lors-convert finetune {output} --data TEXT -o OUT` (distillation from the original)")
    return f"relative error {error:.2f} loses much of the model's function; " + ", ".join(steps)


@app.command()
def compress(
    model: Path = typer.Argument(
        ..., help="A Hugging Face model folder (or a checkpoint inside one), or a GGUF file.", show_default=False
    ),
    calibrate: List[Path] = typer.Option(
        ...,
        "--calibrate",
        metavar="FILE",
        show_default=False,
        help="Text, one example per line: calibration, fine-tuning and held-out "
        "evaluation (a fixed slice never calibrated or trained on).",
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", metavar="FILE", help="The final LORS .safetensors.", show_default=False
    ),
    reduction: Optional[float] = typer.Option(
        None,
        "--reduction",
        metavar="F",
        show_default=str(DEFAULT_REDUCTION),
        help="Fraction of stacked parameters removed.",
    ),
    max_ppl_increase: Optional[float] = MaxPplIncrease,
    finetune_minutes: float = typer.Option(
        CompressConfig.finetune_minutes,
        "--finetune-minutes",
        metavar="N",
        help="Distil for N minutes after converting (0: convert and evaluate only).",
    ),
    batch_size: int = typer.Option(CompressConfig.batch_size, "--batch-size", help="Examples per fine-tuning step."),
    lr: Optional[float] = LearningRate,
    calib_samples: Optional[int] = typer.Option(
        CompressConfig.calib_samples,
        "--calib-samples",
        show_default=False,
        help="Calibration samples (default 1024; 512 for a causal LM, which writes three quarters of them, each "
        "up to 256 tokens longer than a line). Fewer convert faster and cost quality, most on text unlike the "
        "calibration text (docs/benchmarks.md, calibration settings).",
    ),
    calib_generated: float = CalibGenerated,
    fisher: bool = typer.Option(
        CompressConfig.fisher,
        "--fisher/--no-fisher",
        help="Weight each layer's error by its effect on the model's output (see convert --fisher); "
        "--no-fisher for models whose out x out matrices per layer do not fit in memory.",
    ),
    seed: int = typer.Option(
        CompressConfig.seed, "--seed", help="Seed of calibration sampling and training (not of the held-out lines)."
    ),
    shard_size: str = ShardSize,
    force: bool = Force,
    quiet: bool = Quiet,
    as_json: bool = AsJson,
) -> None:
    """The whole recipe: calibrated conversion, fine-tuning, fidelity before and after.

    Fidelity is measured on held-out lines of the data. Run it again after an interruption: a finished
    conversion is reused and training resumes."""
    from lors_convert.checkpoint import return_freed_memory
    from lors_convert.compression import compress as run_compress
    from lors_convert.evaluate import print_fidelity
    from lors_convert.lors_format import read_lors
    from lors_convert.report import build_report, print_report

    config = CompressConfig(
        calibrate=calibrate,
        reduction=reduction,
        max_ppl_increase=max_ppl_increase,
        finetune_minutes=finetune_minutes,
        batch_size=batch_size,
        lr=lr,
        calib_samples=calib_samples,
        calib_generated=calib_generated,
        fisher=fisher,
        seed=seed,
        shard_size=shard_size,
    )
    return_freed_memory()
    show_report = None if quiet or as_json else lambda path: print_report(build_report(*read_lors(path)))
    results = run_compress(
        model,
        output,
        config,
        force=force,
        quiet=quiet,
        bars=lambda: progress_bars(quiet),
        converted=show_report,
        log=lambda message: stderr.print(escape(message)),
    )
    rows, words = results["rows"], results["held_out"]
    print_fidelity(rows, as_json, f"fidelity against the original on {words}")
    last = list(rows.values())[-1]
    if "ppl_student" in last and (
        last["ppl_student"] > PPL_WARNING * last["ppl_teacher"] or last["top1"] < TOP1_WARNING
    ):
        stderr.print(
            f"warning: perplexity {last['ppl_student']:,.1f} against the original's {last['ppl_teacher']:,.1f}, and "
            f"the same next token at only {last['top1']:.0%} of positions: this model has lost much of its "
            "function; compress again with --max-ppl-increase 1.3 (the largest reduction that keeps it) or a "
            "smaller --reduction, and fine-tune with --finetune-minutes"
        )
    if not as_json:
        stderr.print(f"wrote {output}")


@app.command()
def init(
    config: Path = typer.Argument(..., help="A Hugging Face folder with config.json.", show_default=False),
    output: Path = typer.Option(
        ..., "--output", "-o", metavar="FILE", help="The LORS .safetensors to write.", show_default=False
    ),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", metavar="N", help="Rank of every layer's factors."),
    reduction: Optional[float] = typer.Option(
        None,
        "--reduction",
        metavar="F",
        help="Instead of --rank: the rank per group that stores this fraction fewer stacked numbers.",
    ),
    shared: bool = typer.Option(
        InitConfig.shared, "--shared/--no-shared", help="A shared matrix per group (the paper's form)."
    ),
    seed: int = typer.Option(InitConfig.seed, "--seed", help="Seed of the initialisation."),
    force: bool = Force,
    quiet: bool = Quiet,
    as_json: bool = AsJson,
) -> None:
    """A fresh LORS checkpoint for a config, to train from scratch (finetune --objective lm).

    Initialised as the paper trains LORS: S the layer's own default initialisation, A kaiming-uniform, B zeros
    (with --no-shared, B random: B A has the variance of the layer's own initialisation)."""
    from lors_convert.lors_format import read_lors
    from lors_convert.report import build_report, print_report
    from lors_convert.scratch import init_checkpoint

    files, _ = init_checkpoint(config, output, InitConfig(rank, reduction, shared, seed), force=force)
    print_report(build_report(*read_lors(files[-1])), as_json)
    if not as_json:
        stderr.print(f"wrote {', '.join(str(f) for f in files)}")


@app.command()
def report(
    lors: Path = typer.Argument(..., help="A LORS checkpoint.", show_default=False),
    plot: Optional[Path] = Plot,
    as_json: bool = AsJson,
    quiet: bool = Quiet,
) -> None:
    """Per-group ranks, parameters saved and reconstruction error of a LORS checkpoint.

    With --plot, a picture of each layer's rank and error, a line per group."""
    from lors_convert.lors_format import read_lors
    from lors_convert.report import build_report, print_report

    if plot:
        from lors_convert.plot import check_plot_path, plot_report

        check_plot_path(plot)
    result = build_report(*read_lors(lors))
    print_report(result, as_json)
    if plot:
        plot_report(result, plot)
        if not as_json:
            stderr.print(f"wrote {plot}")


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="A checkpoint to look at.", show_default=False),
    rank: List[int] = typer.Option(
        [8, 16, 32, 64, 128], "--rank", "-r", metavar="N", help="Ranks to show (repeatable)."
    ),
    include: List[str] = typer.Option(
        [], "--include", metavar="GLOB", show_default=False, help="Only groups matching this glob."
    ),
    exclude: List[str] = typer.Option(
        [], "--exclude", metavar="GLOB", show_default=False, help="Skip groups matching this glob."
    ),
    plot: Optional[Path] = Plot,
    as_json: bool = AsJson,
    quiet: bool = Quiet,
) -> None:
    """The stacked groups that would be factored and what each rank would save. Writes nothing but --plot.

    With --plot, reads the weights and draws, per group, the fraction of the residual energy each rank keeps."""
    from lors_convert.hf import open_source
    from lors_convert.lors_format import refuse_lors_input
    from lors_convert.report import inspect_data, print_inspect
    from lors_convert.stacks import find_stacks

    if any(r < 0 for r in rank):
        raise LorsError("--rank must be 0 or more")
    if plot:
        from lors_convert.plot import check_plot_path, plot_spectra

        check_plot_path(plot)
    source = open_source(model)
    refuse_lors_input(source, model)
    stacks, warnings = find_stacks(source.info, include, exclude)
    if not stacks:
        raise LorsError(f"{model}: no stacked layers found")
    data = inspect_data(source, stacks, warnings, sorted(set(rank)))
    if plot:
        from lors_convert.conversion import residual_spectra

        with progress_bars(quiet) as progress:
            spectra = residual_spectra(source, stacks, progress)
    print_inspect(data, as_json)
    if plot:
        plot_spectra(data, spectra, plot)
        if not as_json:
            stderr.print(f"wrote {plot}")


@app.command()
def expand(
    lors: Path = typer.Argument(..., help="A LORS checkpoint.", show_default=False),
    output: Path = typer.Option(
        ..., "--output", "-o", metavar="FILE", help="Dense output .safetensors.", show_default=False
    ),
    shard_size: str = ShardSize,
    force: bool = Force,
    quiet: bool = Quiet,
) -> None:
    """Write the dense state dict back (original names, shapes and dtypes)."""
    from lors_convert.checkpoint import check_output_path, parse_size, write_safetensors
    from lors_convert.lors_format import dense_layout, read_lors
    from lors_convert.lors_format import expand as expand_tensors

    size = parse_size(shard_size)
    source, meta = read_lors(lors)
    check_output_path(output, [source.path, *source.files], force)
    layout = dense_layout(source, meta)
    with progress_bars(quiet) as progress:
        advance = progress("expanding", len(layout))
        files = write_safetensors(
            output, expand_tensors(source, meta), {"format": "pt"}, layout=layout, shard_size=size, advance=advance
        )
    stderr.print(f"wrote {', '.join(str(f) for f in files)}")


@app.command()
def export(
    lors: Path = typer.Argument(..., help="A LORS checkpoint.", show_default=False),
    output: Path = typer.Option(
        ..., "--output", "-o", metavar="DIR", help="The model folder to write.", show_default=False
    ),
    dense: bool = typer.Option(
        False,
        "--dense",
        metavar=FLAG,
        help="Write the plain dense model (config, "
        "tokenizer, dense weights: loads with no remote code) instead of the LORS one.",
    ),
    architecture: Optional[Path] = typer.Option(
        None,
        "--architecture",
        metavar="DIR",
        show_default="the source folder recorded in the LORS metadata",
        help="The Hugging Face folder the checkpoint was converted from.",
    ),
    force: bool = Force,
    quiet: bool = Quiet,
) -> None:
    """Write a Hugging Face model folder (LORS form with its modeling file, or --dense).

    from_pretrained(DIR, trust_remote_code=True) loads the LORS model with only torch and transformers
    installed; with --dense, the plain dense model loads with no remote code."""
    from lors_convert.exporting import export as run_export

    folder = run_export(lors, output, ExportConfig(dense, architecture), force=force)
    how = "from_pretrained(DIR)" if dense else "from_pretrained(DIR, trust_remote_code=True)"
    stderr.print(f"wrote {folder} (load with {how})")


@app.command()
def verify(
    lors: Path = typer.Argument(..., help="A LORS checkpoint.", show_default=False),
    source: Optional[Path] = typer.Option(
        None,
        "--source",
        metavar="PATH",
        help="The checkpoint it was converted from: check its sha256 and recompute each group's error.",
    ),
    as_json: bool = AsJson,
    quiet: bool = Quiet,
) -> None:
    """Check a LORS checkpoint: factors, shapes, finite values, counts; with --source, hash and errors."""
    import json

    from lors_convert.verify import verify as run_verify

    result = run_verify(lors, source)
    if as_json:
        print(json.dumps(result, indent=2))
    for problem in result["problems"]:
        stderr.print(f"[red]problem:[/red] {escape(problem)}", soft_wrap=True)
    if not result["ok"]:
        raise typer.Exit(1)
    if not as_json:
        stderr.print(f"ok: {result['groups']} groups consistent" + (", source and errors match" if source else ""))


@app.command()
def finetune(
    lors: Path = typer.Argument(..., help="A LORS checkpoint.", show_default=False),
    data: List[Path] = Data,
    output: Path = typer.Option(
        ..., "--output", "-o", metavar="FILE", help="Fine-tuned LORS .safetensors.", show_default=False
    ),
    teacher: Optional[Path] = Teacher,
    model_factory: Optional[str] = Factory,
    allow_teacher_mismatch: bool = AllowMismatch,
    steps: int = typer.Option(FinetuneConfig.steps, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(
        FinetuneConfig.batch_size, "--batch-size", help="Examples per step in each process."
    ),
    lr: Optional[float] = LearningRate,
    warmup: int = typer.Option(FinetuneConfig.warmup, "--warmup", help="Warmup steps."),
    max_length: int = typer.Option(
        FinetuneConfig.max_length, "--max-length", help="Truncate text examples to this many tokens."
    ),
    seed: int = typer.Option(FinetuneConfig.seed, "--seed", help="Seed of the data order (not of the held-out lines)."),
    objective: str = typer.Option(
        FinetuneConfig.objective,
        "--objective",
        help="distill (match the teacher) or lm (next-token loss on the text, causal LMs).",
    ),
    eval_examples: int = typer.Option(
        FinetuneConfig.eval_examples, "--eval-examples", help="Held-out examples (at most a fifth)."
    ),
    save_every: int = typer.Option(
        FinetuneConfig.save_every, "--save-every", help="Save the training state every N steps (0: never)."
    ),
    minutes: float = typer.Option(
        FinetuneConfig.minutes,
        "--minutes",
        metavar="N",
        help="Stop training after N minutes, then evaluate and save; the learning rate decays to zero over "
        "the N minutes or the --steps, whichever ends first (0: no time limit).",
    ),
    resume: bool = typer.Option(False, "--resume", metavar=FLAG, help="Continue from OUTPUT.train-state.pt."),
    pack: bool = typer.Option(
        FinetuneConfig.pack,
        "--pack/--no-pack",
        help="A causal LM trains on its lines joined end to end (end-of-text between them) and cut into rows of "
        "--max-length, not on padded lines.",
    ),
    nproc_per_node: int = typer.Option(
        0,
        "--nproc-per-node",
        help="Launch this many processes with torchrun (DistributedDataParallel, or FSDP with --fsdp; one per GPU).",
    ),
    fsdp: bool = typer.Option(
        False,
        "--fsdp",
        metavar=FLAG,
        help="Under torchrun, shard the student across the processes with FSDP2 instead of replicating it (DDP): "
        "for a model whose weights, gradients and optimizer state do not fit one GPU.",
    ),
    shard_size: str = ShardSize,
    force: bool = Force,
    quiet: bool = Quiet,
    as_json: bool = AsJson,
) -> None:
    """Distil the dense teacher into a LORS model and write the fine-tuned LORS checkpoint."""
    if nproc_per_node:
        launch_torchrun(nproc_per_node)
    from lors_convert.checkpoint import parse_size, return_freed_memory
    from lors_convert.evaluate import print_fidelity
    from lors_convert.finetuning import finetune as run_finetune

    return_freed_memory()

    settings = FinetuneConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        max_length=max_length,
        seed=seed,
        objective=objective,
        eval_examples=eval_examples,
        save_every=save_every,
        minutes=minutes,
        pack=pack,
    )
    results = run_finetune(
        lors,
        data,
        output,
        settings,
        teacher=teacher,
        factory=model_factory,
        allow_teacher_mismatch=allow_teacher_mismatch,
        resume=resume,
        fsdp=fsdp,
        shard_size=parse_size(shard_size),
        force=force,
        quiet=quiet,
        log=lambda message: stderr.print(escape(message), soft_wrap=True),
    )
    if "files" not in results:  # not rank 0
        return
    what = "next-token loss" if "loss" in results["eval_before"] else "fidelity against the teacher"
    print_fidelity(
        {"before": results["eval_before"], "after": results["eval_after"]}, as_json, f"{what} on {results['held_out']}"
    )
    if not as_json:
        stderr.print(
            f"{results['steps'] - results['resumed_at']} steps in {results['seconds']:.1f} s, "
            f"{results['tokens_per_s']:,.0f} tokens/s, loss {results['loss_first']:.4f} → "
            f"{results['loss_last']:.4f}; wrote {', '.join(results['files'])}"
        )


def launch_torchrun(nproc: int) -> None:
    """Re-run this command under torchrun without --nproc-per-node, and exit with its status."""
    import subprocess

    if nproc < 1:
        raise LorsError("--nproc-per-node must be at least 1")
    args, skip = [], False
    for arg in _argv or []:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            args.append(arg)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "lors_convert",
        *args,
    ]
    env = dict(os.environ)
    if threads_are_ours():  # the free cores are shared by the processes
        env["OMP_NUM_THREADS"] = str(max(1, int(env["OMP_NUM_THREADS"]) // nproc))
    raise typer.Exit(subprocess.run(command, env=env).returncode)


@app.command("eval")
def evaluate(
    lors: Path = typer.Argument(..., help="A LORS checkpoint.", show_default=False),
    data: List[Path] = Data,
    teacher: Optional[Path] = Teacher,
    model_factory: Optional[str] = Factory,
    allow_teacher_mismatch: bool = AllowMismatch,
    batch_size: int = typer.Option(32, "--batch-size", help="Examples per forward pass."),
    max_length: int = typer.Option(
        FinetuneConfig.max_length, "--max-length", help="Truncate text examples to this many tokens."
    ),
    held_out: bool = typer.Option(
        False,
        "--held-out",
        metavar=FLAG,
        help="Only the data's held-out examples: those finetune and compress held out (the --eval-examples "
        "the checkpoint's fine-tune recorded) and calibration never draws.",
    ),
    eval_examples: Optional[int] = typer.Option(
        None,
        "--eval-examples",
        min=2,
        show_default=f"the fine-tune's, else {FinetuneConfig.eval_examples}",
        help="With --held-out: how many examples were held out (at most a fifth).",
    ),
    as_json: bool = AsJson,
    quiet: bool = Quiet,
) -> None:
    """Fidelity against the dense teacher: cos, top10 and, for LM heads, ppl_teacher, ppl_student, kl."""
    from lors_convert.checkpoint import return_freed_memory
    from lors_convert.data import HELD_OUT, held_out_words, load_examples, split_examples
    from lors_convert.evaluate import fidelity, load_student_teacher, print_fidelity
    from lors_convert.runtime import setup_device

    return_freed_memory()

    pair = load_student_teacher(
        lors,
        teacher,
        model_factory,
        allow_teacher_mismatch,
        warn=lambda message: stderr.print(escape(message), soft_wrap=True),
        offload_student=True,
        offload_teacher=True,
    )
    examples = load_examples(data, pair.tokenizer)
    words = f"{', '.join(f.name for f in data)} ({len(examples)} examples)"
    if held_out:
        recorded = (pair.meta.finetune or {}).get("settings", {}).get("eval_examples", HELD_OUT)
        examples = split_examples(examples, eval_examples or recorded)[1]
        words = held_out_words(examples, data)
    device = setup_device(1)
    options = {"batch_size": batch_size, "max_length": max_length, "device": device}
    teacher_model = None if pair.teacher is None else pair.teacher.to(device)  # none: a model from `init`
    result = fidelity(pair.student.to(device), teacher_model, examples, pair.tokenizer, **options)
    what = "next-token loss" if teacher_model is None else "fidelity against the teacher"
    print_fidelity({"student": result}, as_json, f"{what} on {words}")


def default_output(model: Path) -> Path:
    """<input stem>.lors.safetensors beside the input (beside the folder for a model directory)."""
    name = model.resolve().name
    for suffix in (".index.json", ".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".gguf"):
        name = name.removesuffix(suffix)
    return model.resolve().parent / f"{name}.lors.safetensors"


_argv: list[str] | None = None  # the arguments main() was given, for launch_torchrun


def main(argv: list[str] | None = None) -> None:
    """Console entry point: `lors-convert MODEL` means convert; user errors print one line."""
    # a kill (a job scheduler's, a container's stop) ends a command as Ctrl-C does: temporary files and
    # unfinished outputs are removed on the way out
    if threading.current_thread() is threading.main_thread():  # the only thread that may set a handler
        signal.signal(signal.SIGTERM, exit_on_kill)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return run(argv)
    try:
        run(argv)
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    from lors_convert.runtime import exit_worker  # here: run() has set torch's environment before its import

    exit_worker(code)


def run(argv: list[str] | None) -> None:
    global _argv
    choose_threads()
    # torch puts its buffers of 2 MB and more on transparent huge pages (read at its first allocation): a fresh
    # layer-sized buffer then costs one page fault per 2 MB, not one per 4 KB (docs/method.md, memory pages)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if args and args[0] not in COMMANDS and args[0] not in ("--help", "-h", "--version"):
        close = difflib.get_close_matches(args[0], sorted(COMMANDS), n=1)
        if close and not os.path.exists(args[0]):  # a mistyped command, not a model to convert
            stderr.print(f"[red]error:[/red] no command or file {escape(repr(args[0]))}; did you mean {close[0]!r}?")
            sys.exit(2)
        args.insert(0, "convert")
    _argv = args
    try:
        code = app(args=args, prog_name="lors-convert", standalone_mode=False)
    except typer.TyperException as e:  # usage errors from typer's click
        stderr.print(f"[red]error:[/red] {escape(e.format_message())}  (see lors-convert --help)", soft_wrap=True)
        sys.exit(e.exit_code)
    except LorsError as e:
        if debug:
            raise
        stderr.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        sys.exit(1)
    except Exception as e:  # an unexpected failure is still one line unless --debug
        if debug:
            raise
        stderr.print(
            f"[red]error:[/red] {e.__class__.__name__}: {escape(str(e))} (run with --debug for the traceback)",
            soft_wrap=True,
        )
        sys.exit(1)
    if code == 130:  # typer turns Ctrl-C into exit code 130 once `with` blocks have removed temporary files
        stderr.print("interrupted: nothing was written")
    if isinstance(code, int) and code:
        sys.exit(code)
