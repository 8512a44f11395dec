"""The `lors-convert` command line: thin typer commands over the library."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lors_convert import LorsError, __version__
from lors_convert.report import stderr

app = typer.Typer(
    name="lors-convert", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Shrink models with stacked layers: each group of stacked weights becomes one shared matrix plus a "
         "low-rank residual per layer (LORS). `lors-convert MODEL` is `lors-convert convert MODEL`. "
         "Add --debug anywhere to see tracebacks.",
)
COMMANDS = {"convert", "report", "inspect", "expand"}

Quiet = typer.Option(False, "--quiet", "-q", help="No progress bars.")
Force = typer.Option(False, "--force", "-f", help="Overwrite an existing output.")
AsJson = typer.Option(False, "--json", help="Print JSON to stdout instead of a table.")


@contextmanager
def progress_bars(quiet: bool) -> Iterator:
    """Yields a `(description, total) -> advance()` factory drawing rich bars on stderr."""
    if quiet:
        yield lambda description, total: (lambda: None)
        return
    bars = Progress(TextColumn("{task.description:>16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=stderr, transient=True)
    with bars:
        def start(description: str, total: int):
            task = bars.add_task(description, total=total)
            return lambda: bars.advance(task)
        yield start


def _version(value: bool) -> None:
    if value:
        print(f"lors-convert {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    pass


@app.command()
def convert(
    model: Path = typer.Argument(..., help="Checkpoint: .safetensors, *.safetensors.index.json, HF directory, "
                                          ".pt/.pth/.bin.", show_default=False),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output .safetensors "
                                          "[default: <input stem>.lors.safetensors beside the input]."),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="The same rank for every layer's residual."),
    reduction: Optional[float] = typer.Option(None, "--reduction", help="Remove this fraction of the stacked "
                                              "parameters, ranks allocated to minimise error [default: 0.5]."),
    energy: Optional[float] = typer.Option(None, "--energy", help="Smallest rank keeping this fraction of each "
                                           "residual's energy."),
    include: List[str] = typer.Option([], "--include", help="Only groups whose template matches this glob "
                                      "(repeatable), e.g. '*.mlp.*'."),
    exclude: List[str] = typer.Option([], "--exclude", help="Skip groups whose template matches this glob."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Storage dtype of the output [default: the "
                                        "source's]."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Shard the output above this size."),
    seed: int = typer.Option(0, "--seed", help="Seed of the randomized SVD."),
    device: Optional[str] = typer.Option(None, "--device", help="Factor on this device, one group resident "
                                         "[default: cuda when available, else cpu]."),
    force: bool = Force, quiet: bool = Quiet, as_json: bool = AsJson,
) -> None:
    """Convert a checkpoint to LORS and print what was saved and what it cost."""
    from lors_convert.checkpoint import open_checkpoint, parse_dtype, parse_size, return_freed_memory
    from lors_convert.convert import Settings, convert as run_convert
    from lors_convert.factorize import check_device
    from lors_convert.lors_format import read_lors
    from lors_convert.report import build_report, print_report

    settings = Settings(rank=rank, reduction=reduction, energy=energy, include=include, exclude=exclude,
                        dtype=parse_dtype(dtype) if dtype else None, seed=seed,
                        device=check_device(device))
    settings.validate()
    size = parse_size(shard_size)
    source = open_checkpoint(model)
    if output is None:
        output = default_output(model)
    return_freed_memory()
    with progress_bars(quiet) as progress:
        files, _ = run_convert(source, output, settings, shard_size=size, force=force, progress=progress)
    print_report(build_report(*read_lors(files[-1])), as_json)
    if not as_json:
        stderr.print(f"wrote {', '.join(str(f) for f in files)}")


@app.command()
def report(lors: Path = typer.Argument(..., help="A LORS checkpoint.", show_default=False),
           as_json: bool = AsJson, quiet: bool = Quiet) -> None:
    """Per-group ranks, parameters saved and reconstruction error of a LORS checkpoint."""
    from lors_convert.lors_format import read_lors
    from lors_convert.report import build_report, print_report

    print_report(build_report(*read_lors(lors)), as_json)


@app.command()
def inspect(model: Path = typer.Argument(..., help="A checkpoint to look at.", show_default=False),
            rank: List[int] = typer.Option([8, 16, 32, 64, 128], "--rank", "-r", help="Ranks to show."),
            include: List[str] = typer.Option([], "--include", help="Only groups matching this glob."),
            exclude: List[str] = typer.Option([], "--exclude", help="Skip groups matching this glob."),
            as_json: bool = AsJson, quiet: bool = Quiet) -> None:
    """The stacked groups that would be factored and what each rank would save. Writes nothing."""
    from lors_convert.checkpoint import open_checkpoint
    from lors_convert.report import inspect_data, print_inspect
    from lors_convert.stacks import find_stacks

    if any(r < 0 for r in rank):
        raise LorsError("--rank must be 0 or more")
    source = open_checkpoint(model)
    stacks, warnings = find_stacks(source.info, include, exclude)
    if not stacks:
        raise LorsError(f"{model}: no stacked layers found")
    print_inspect(inspect_data(source, stacks, warnings, sorted(set(rank))), as_json)


@app.command()
def expand(lors: Path = typer.Argument(..., help="A LORS checkpoint.", show_default=False),
           output: Path = typer.Option(..., "--output", "-o", help="Dense output .safetensors.",
                                       show_default=False),
           shard_size: str = typer.Option("5GB", "--shard-size", help="Shard the output above this size."),
           force: bool = Force, quiet: bool = Quiet) -> None:
    """Write the dense state dict back (original names, shapes and dtypes)."""
    from lors_convert.checkpoint import SafetensorsWriter, check_output_path, parse_size
    from lors_convert.lors_format import expand as expand_tensors, read_lors

    size = parse_size(shard_size)
    source, meta = read_lors(lors)
    check_output_path(output, source.files, force)
    with progress_bars(quiet) as progress, SafetensorsWriter(output, size) as writer:
        advance = progress("expanding", len(source.info))
        for name, tensor in expand_tensors(source, meta):
            writer.add(name, tensor)
            advance()
        files = writer.commit({"format": "pt"})
    stderr.print(f"wrote {', '.join(str(f) for f in files)}")


def default_output(model: Path) -> Path:
    """<input stem>.lors.safetensors beside the input (beside the folder for a model directory)."""
    name = model.resolve().name
    for suffix in (".index.json", ".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        name = name.removesuffix(suffix)
    return model.resolve().parent / f"{name}.lors.safetensors"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: `lors-convert MODEL` means convert; user errors print one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if args and args[0] not in COMMANDS and args[0] not in ("--help", "-h", "--version"):
        args.insert(0, "convert")
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
        stderr.print(f"[red]error:[/red] {e.__class__.__name__}: {escape(str(e))} (run with --debug for the "
                     "traceback)", soft_wrap=True)
        sys.exit(1)
    if code == 130:  # typer turns Ctrl-C into exit code 130 once `with` blocks have removed temporary files
        stderr.print("interrupted: nothing was written")
    if isinstance(code, int) and code:
        sys.exit(code)
