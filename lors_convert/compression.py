"""`compress`, the whole recipe as one verb: a calibrated conversion (the LM Fisher on), distillation for a time
budget if asked, and fidelity against the original on held-out lines of the text, which are never calibrated or
trained on. Run again after an interruption, it reuses the finished conversion and resumes the training."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager

from lors_convert.checkpoint import (
    TensorSource,
    check_output_path,
    index_path,
    parse_size,
    remove_checkpoint,
    sha256_files,
)
from lors_convert.config import CompressConfig, ConvertConfig
from lors_convert.conversion import convert
from lors_convert.data import held_out_words, load_examples, split_examples
from lors_convert.evaluate import fidelity, load_student_teacher
from lors_convert.finetuning import finetune, fit_training, state_path
from lors_convert.hf import is_causal_lm_source, open_source
from lors_convert.lors_format import read_lors
from lors_convert.plan import Progress, no_progress
from lors_convert.runtime import setup_device
from lors_convert.stacks import find_stacks


def compress(
    source: str | Path,
    output: str | Path,
    config: CompressConfig,
    *,
    force: bool = False,
    quiet: bool = False,
    bars: Callable[[], ContextManager[Progress]] = lambda: nullcontext(no_progress),
    converted: Callable[[Path], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Compress the model at `source` (a Hugging Face folder or a GGUF file) into the LORS checkpoint `output`.
    `converted(path)` is called once the conversion is written, before any fine-tuning; `bars()` gives the
    conversion's progress bars (a context, closed before fine-tuning draws its own). Returns {"rows": fidelity
    before (and after) fine-tuning, "held_out": which lines}, and the fine-tune's results where there was one."""
    source_path, output = Path(source), Path(output)
    settings, training = config.conversion(), config.training()  # checked before minutes of conversion
    shard_size = parse_size(config.shard_size) if isinstance(config.shard_size, str) else config.shard_size
    check_output_path(output, [source_path], force)
    weights = open_source(source_path)
    check_output_path(output, weights.files, force)
    settings = config.conversion(causal_lm=is_causal_lm_source(source_path))  # its default sample count
    if config.finetune_minutes > 0:  # a fine-tune that cannot fit is refused before the conversion starts
        stacked = sum(weights.info[name].numel for stack in find_stacks(weights.info)[0] for name in stack.names)
        student = sum(info.numel for info in weights.info.values()) - round((settings.reduction or 0) * stacked)
        fit_training(student, weights, training, setup_device(1))
    # a fine-tune starts from a conversion kept beside the output until the end, which a rerun reuses
    kept = output.with_name(output.name.removesuffix(".safetensors") + ".converted.safetensors")
    first = kept if config.finetune_minutes > 0 else output
    earlier = first == kept and (kept.is_file() or index_path(kept).is_file())
    if earlier and leftover_of(read_lors(kept)[1], weights, settings):
        log(f"reusing {kept} (converted from the same source with the same settings)")
    else:
        with bars() as progress:
            convert(weights, first, settings, shard_size=shard_size, force=force or first == kept, progress=progress)
    if converted is not None:
        converted(first)
    if config.finetune_minutes > 0:
        results = finetune(
            kept,
            settings.calibrate,
            output,
            training,
            resume=state_path(output).is_file(),
            shard_size=shard_size,
            force=force,
            quiet=quiet,
            log=log,
        )
        remove_checkpoint(kept)
        return {"rows": {"converted": results["eval_before"], "fine-tuned": results["eval_after"]}, **results}
    pair = load_student_teacher(output, offload_student=True, offload_teacher=True)
    held_out = split_examples(load_examples(settings.calibrate, pair.tokenizer), training.eval_examples)[1]
    device = setup_device(1)
    row = fidelity(pair.student.to(device), pair.teacher.to(device), held_out, pair.tokenizer, device=device)
    return {"rows": {"converted": row}, "held_out": held_out_words(held_out, settings.calibrate)}


def leftover_of(meta, source: TensorSource, settings: ConvertConfig) -> bool:
    """Whether an earlier conversion is of this source (path and sha256) with these settings."""
    same = meta.settings == settings.as_json() and meta.source.path == str(source.path.resolve())
    return same and meta.source.sha256 == sha256_files(source.files)
