"""Distillation of a LORS model from its dense teacher (or next-token training with --objective lm), in one
process or under torchrun with DistributedDataParallel, or with FSDP2 (`--fsdp`: the student and the teacher
sharded across the processes). Reads top to bottom: load, split, train, write.

The student trains in eval mode (no dropout): the goal is to recover the teacher's function, and it keeps a
run reproducible from --seed. Parameters the loss cannot reach (e.g. BERT's pooler) are frozen; those whose module
does not run in a step (an MoE expert no token was routed to) have no gradient in it, which DDP and FSDP are told.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import threading
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lors_convert import LorsError, __version__
from lors_convert.checkpoint import SHARD_BYTES, TensorSource, fsync_folder
from lors_convert.config import LM_LR, LR, FinetuneConfig
from lors_convert.data import held_out_words, load_examples, split_examples
from lors_convert.evaluate import (
    StudentTeacher,
    chunk_positions,
    chunk_sums,
    fidelity,
    load_student_teacher,
    log_probs,
    next_token_loss,
    teacher_path_of,
    token_kl,
)
from lors_convert.hf import open_source
from lors_convert.lors_format import LorsMeta, read_lors
from lors_convert.runtime import (
    autocast,
    is_causal_lm,
    layer_outputs,
    lazy_logits,
    output_head,
    setup_device,
    vocab_size,
    world,
)
from lors_convert.threads import revise_threads

# ---------------------------------------------------------------- processes and devices


# ---------------------------------------------------------------- memory

# One step's activations kept for the backward, per token, layer and hidden unit: Korthikanti et al.'s 34 bytes at
# 16 bits, in float32; the attention scores per head and pair of positions; the float32 logits of one chunk of
# positions, at their most in the backward that makes them again: the student's and the teacher's, a log-softmax of
# each, the KL's terms and their gradients (7 copies measured at a 262k vocabulary).
ACTIVATION_BYTES, SCORE_BYTES, LOGIT_COPIES = 68, 10, 7


def training_bytes(
    student_numel: int, teacher_numel: int, config, causal: bool, batch_size: int, max_length: int
) -> dict[str, float]:
    """What fine-tuning holds at its peak in one process: the student's weights, gradients and AdamW state (16
    bytes a parameter, all trained: an upper bound), the teacher's weights in float32 (`teacher_numel`: what is
    resident of it), and one step's activations at `batch_size` rows of `max_length` tokens (ACTIVATION_BYTES) and
    logits, a chunk of positions at a time (LOGIT_COPIES)."""
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    hidden, layers = getattr(text, "hidden_size", 0), getattr(text, "num_hidden_layers", 0)
    heads, vocab = getattr(text, "num_attention_heads", 0), getattr(text, "vocab_size", 0)
    tokens = batch_size * max_length
    return {
        "student": student_numel * 16,
        "teacher": teacher_numel * 4,
        "activations": tokens * layers * (hidden * ACTIVATION_BYTES + heads * max_length * SCORE_BYTES),
        "logits": min(tokens, chunk_positions(vocab)) * vocab * 4 * LOGIT_COPIES if causal else 0,
    }


def fit_training(student_numel: int, teacher: TensorSource | None, settings: FinetuneConfig, device) -> bool:
    """Whether the teacher must be offloaded (its blocks read as they run) for fine-tuning to fit in the memory
    the kernel reports available; where even that does not fit, a one-line refusal with the numbers and the
    largest --batch-size that fits. No check on a GPU, or for models transformers does not describe."""
    from lors_convert.calibrate import GB, available_memory, block_bytes
    from lors_convert.hf import architecture_dir, auto_config, model_class
    from lors_convert.loading import can_offload
    from lors_convert.stacks import find_stacks

    folder = architecture_dir(teacher.path) if teacher is not None else None
    available = available_memory()
    if folder is None or available is None or torch.device(device).type != "cpu":
        return False
    config = auto_config(folder)
    cls = model_class(config)
    causal = cls.can_generate() and not getattr(config, "is_encoder_decoder", False)
    whole = sum(info.numel for info in teacher.info.values())
    outside, largest, _ = block_bytes(teacher, find_stacks(teacher.info)[0])
    offloaded = (outside + largest) // 4 if can_offload(teacher) else whole

    def needed(teacher_numel: int, batch_size: int) -> dict[str, float]:
        return training_bytes(student_numel, teacher_numel, config, causal, batch_size, settings.max_length)

    if sum(needed(whole, settings.batch_size).values()) <= available:
        return False
    least = needed(offloaded, settings.batch_size)
    if sum(least.values()) <= available:
        return offloaded < whole
    fits = [b for b in (16, 8, 4, 2, 1) if b < settings.batch_size and sum(needed(offloaded, b).values()) <= available]
    remedy = (
        f"--batch-size {fits[0]} fits ({sum(needed(offloaded, fits[0]).values()) / GB:.1f} GB)"
        if fits
        else ("no batch size fits: fine-tune on a machine with more memory, or with --fsdp over several GPUs")
    )
    raise LorsError(
        f"fine-tuning would hold about {sum(least.values()) / GB:.1f} GB (the student's weights, gradients and AdamW "
        f"state {least['student'] / GB:.1f} GB, the teacher {least['teacher'] / GB:.1f} GB, activations and logits "
        f"of --batch-size {settings.batch_size} x {settings.max_length} tokens "
        f"{(least['activations'] + least['logits']) / GB:.1f} GB) and this machine has {available / GB:.1f} GB "
        f"available: {remedy}"
    )


# ---------------------------------------------------------------- the loss


def stacked_layer_paths(model: nn.Module, meta: LorsMeta) -> list[str]:
    """Module paths (in the dense model) of the blocks holding stacked layers: `encoder.layer.3` for
    template `encoder.layer.{i}.…` (in the model's own names, which transformers may have renamed)."""
    from lors_convert.loading import block_paths

    return block_paths(model, meta)


def normalised_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """‖s − t‖² / ‖t‖² over real tokens: scale-free, so every layer weighs the same."""
    diff = (student.float() - teacher.float()).square().sum(-1)
    norm = teacher.float().square().sum(-1)
    if mask is not None and mask.shape == diff.shape:
        diff, norm = diff * mask, norm * mask
    return diff.sum() / norm.sum().clamp(min=1e-12)


def step_loss(student: nn.Module, teacher: nn.Module, batch: dict, paths: list[str], objective: str) -> torch.Tensor:
    """Distillation: hidden states of each stacked layer plus the final output (KL on logits with an LM head,
    else normalised MSE + (1 − cosine) of the last hidden state). `lm`: next-token cross-entropy. Logits are
    made a chunk of positions at a time (evaluate.chunk_sums)."""
    mask = batch.get("attention_mask")
    s_head, vocab = output_head(student), vocab_size(student)
    if objective == "lm":
        logits, _ = lazy_logits(student, batch, s_head)
        if logits is None or "input_ids" not in batch:
            raise LorsError("--objective lm needs a causal language model and text data")
        nll, count = next_token_loss(logits, batch, vocab)
        return nll / max(count, 1)
    t_head = output_head(teacher)  # before the hooks: a model's first call runs it
    with torch.no_grad(), layer_outputs(teacher, paths) as t_layers:
        t_logits, t_hidden = lazy_logits(teacher, batch, t_head)
    with layer_outputs(student, paths) as s_layers:
        s_logits, s_hidden = lazy_logits(student, batch, s_head)
    layers = sum(normalised_mse(s, t, mask) for s, t in zip(s_layers, t_layers)) / max(len(paths), 1)
    if s_logits is not None:
        positions = mask.flatten().nonzero()[:, 0] if mask is not None else torch.arange(s_hidden.shape[:2].numel())
        kl = lambda chunk, s, t: token_kl(log_probs(s), log_probs(t)).sum()
        return layers + chunk_sums(kl, positions.to(s_hidden.device), vocab, s_logits, t_logits) / len(positions)
    cosine = nn.functional.cosine_similarity(s_hidden.float(), t_hidden.float(), dim=-1)
    if mask is not None and mask.shape == cosine.shape:
        cosine = (cosine * mask).sum() / mask.sum()
    return layers + normalised_mse(s_hidden, t_hidden, mask) + 1 - cosine.mean()


def batch_indices(step: int, n: int, global_batch: int, seed: int) -> list[int]:
    """The examples of one global step: a fresh seeded permutation per epoch, so any step can be recomputed
    (which is what makes --resume continue exactly)."""
    indices, position = [], step * global_batch
    while len(indices) < global_batch:
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        take = order[offset : offset + global_batch - len(indices)]
        indices += take
        position += len(take)
    return indices


WARMUP_SHARE = 0.1  # of a --minutes budget: the warm-up ends by then, however few steps fit in it


def learning_rate(settings: FinetuneConfig, step: int, spent: float) -> float:
    """Linear warm-up, then cosine decay to zero over the steps, or over the time budget (--minutes) when that
    ends first (`spent`: the fraction of it used), so a run stopped by the clock has finished its decay."""
    if step < settings.warmup and spent < WARMUP_SHARE:
        return settings.lr * max((step + 1) / settings.warmup, spent / WARMUP_SHARE)
    progress = max((step - settings.warmup) / max(settings.steps - settings.warmup, 1), spent)
    return settings.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def freeze_unreached(
    student: nn.Module, teacher: nn.Module, batch: dict, paths: list[str], objective: str
) -> list[str]:
    """Freeze the parameters the loss does not reach although their module ran (BERT's pooler); returns their
    names. A module that did not run on this batch keeps its parameters: an MoE expert no token of it was routed
    to is reached by other batches."""
    ran = set()
    output_head(student), output_head(teacher)  # a model's first call runs it: not under the hook, which counts
    hook = nn.modules.module.register_module_forward_hook(lambda module, args, output: ran.add(module))
    try:
        step_loss(student, teacher, batch, paths, objective).backward()
    finally:
        hook.remove()
    unreached = {id(p) for module in ran for p in module.parameters(recurse=False) if p.grad is None}
    frozen = [name for name, p in student.named_parameters() if p.requires_grad and id(p) in unreached]
    for p in student.parameters():
        if id(p) in unreached:
            p.requires_grad_(False)
        p.grad = None
    return frozen


def shard(model: nn.Module, paths: list[str], teacher: bool = False) -> None:
    """FSDP2, in place: each stacked block is its own unit (gathered for its forward and its backward only), then
    the root takes everything else, the groups' shared matrices (`lors_shared`) included. A shared matrix is one
    Parameter used by every block of its group (LorsLinear only points at it), so it must be the root's: gathered
    for the whole step, its gradient summed over all its uses by autograd, then reduce-scattered once, averaged
    over the processes like DDP's all-reduce. FSDP moves each unit to the device as it shards it. The teacher
    (forward only) reshards its root after each forward too: it has no backward to keep it gathered for."""
    from torch.distributed.fsdp import fully_shard

    # GPT-2 returns views; the warning is about in-place ops on them, which neither the losses nor eval make
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for path in sorted(paths, key=lambda p: -p.count(".")):  # a nested block before the one holding it
        fully_shard(model.get_submodule(path))
    if teacher:
        fully_shard(model, reshard_after_forward=True)
        return
    fully_shard(model)
    # an MoE expert one process's tokens did not reach has no gradient there: it reduces zeros, so that every
    # process's reduce-scatter holds the same tensors (a torch without this method needs every expert reached)
    if hasattr(model, "set_reduce_scatter_unused_params"):
        model.set_reduce_scatter_unused_params(True)


def full_state(student: nn.Module) -> dict:
    """The student's state dict in full, on rank 0's CPU (other ranks get {}); every rank must call it, since
    under FSDP it gathers each sharded tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def parameter_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- state and output


def state_path(output: Path) -> Path:
    return Path(f"{output}.train-state.pt")


def save_state(
    path: Path, state: dict, student: nn.Module, optimizer, rank: int, writing: threading.Thread | None
) -> threading.Thread | None:
    """The training state in full, by parameter name (gathered under FSDP, so a run resumes with or without
    --fsdp), with `state` (step, spent, fingerprint): every rank calls it; rank 0 writes it in a thread while the
    training goes on, so no process waits in a collective (which times out) for a large state's write. Returns
    rank 0's thread, after waiting for `writing`, the previous one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, optim = get_state_dict(student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    state = {**state, "model": model, "optimizer": optim}
    if next(student.parameters()).device.type == "cpu":  # the state holds the training's own tensors, which the
        state = copy.deepcopy(state)  # next steps change while the thread writes
    finish(writing)
    return in_background(write_state, path, state)


def write_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the last state: a crash leaves one or the other
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def in_background(function, *args) -> threading.Thread:
    """function(*args) in a thread; `finish` waits for it and raises what it raised."""

    def target():
        try:
            function(*args)
        except BaseException as e:
            thread.error = e

    thread = threading.Thread(target=target)
    thread.error = None
    thread.start()
    return thread


def finish(thread: threading.Thread | None) -> None:
    if thread is not None:
        thread.join()
        if thread.error is not None:
            raise thread.error


def load_state(path: Path, student: nn.Module, optimizer, fingerprint: dict) -> tuple[int, float]:
    """Restore a saved run (every rank reads the whole state and keeps its part: its shard under FSDP); returns
    its step and the fraction of the time budget it had used."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if not path.is_file():
        raise LorsError(f"--resume: no training state at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["fingerprint"] != fingerprint:
        changed = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
        raise LorsError(f"--resume: {path} was saved by a run with other settings ({', '.join(changed)})")
    if "model" not in state or "spent" not in state:
        raise LorsError(f"--resume: {path} was saved by an older lors-convert; start again without --resume")
    options = StateDictOptions(full_state_dict=True)
    set_state_dict(
        student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options
    )
    return state["step"], state["spent"]


def write_output(
    output: Path,
    pair: StudentTeacher,
    settings: FinetuneConfig,
    results: dict,
    force: bool,
    state: dict,
    shard_size: int,
) -> list[Path]:
    """The fine-tuned LORS checkpoint from the student's full state: same names, ranks and dtypes, with the
    fine-tune recorded; shards above `shard_size`."""
    from lors_convert.checkpoint import check_output_path, write_safetensors
    from lors_convert.loading import checkpoint_tensors
    from lors_convert.lors_format import header_metadata, reconstruction_errors

    tensors = checkpoint_tensors(pair.student, pair.student.lors, state)
    # the originals from the teacher's checkpoint, a tensor at a time (under --fsdp no process holds the teacher)
    original = open_source(pair.teacher_path) if pair.teacher is not None else None
    groups = [] if original is not None else list(pair.meta.groups)
    # the weights moved: their distance to the originals is measured again; the output error was measured on
    # calibration inputs this run does not have (and the tuned model's layers see other inputs): it is dropped
    for group in pair.meta.groups if original is not None else []:
        error, layer_errors = reconstruction_errors(tensors, group, original.get)
        layer_errors = [round(e, 6) for e in layer_errors]
        groups.append(replace(group, rel_error=error, layer_errors=layer_errors, output_error=None))
    meta = replace(
        pair.meta,
        groups=groups,
        finetune={
            "tool": f"lors-convert {__version__}",
            "from": str(pair.source.path.resolve()),
            "teacher": str(pair.teacher_path.resolve()),
            "teacher_sha256": pair.teacher_sha256,
            "settings": asdict(settings),
            **results,
        },
    )
    check_output_path(output, [*pair.source.files, *teacher_files(pair)], force)
    return write_safetensors(output, tensors, header_metadata(meta), shard_size=shard_size)


def teacher_files(pair: StudentTeacher) -> list[Path]:
    """The teacher's weight files (and its folder's), which an output must never overwrite."""
    return open_source(pair.teacher_path).files if pair.teacher is not None else []


# ---------------------------------------------------------------- the loop


def budget_spent(started: float, spent_before: float, minutes: float, world_size: int, device) -> float:
    """The fraction of the --minutes budget used (0 without one). Rank 0's clock decides for every process, so
    all set the same learning rate and stop at the same step."""
    if not minutes:
        return 0.0
    spent = torch.tensor([spent_before + (time.perf_counter() - started) / (minutes * 60)], device=device)
    if world_size > 1:
        dist.broadcast(spent, 0)
    return spent.item()


def train_progress(quiet: bool, total: int, done: int):
    """A rich bar with loss, tokens/s and ETA on stderr; returns (update(step, loss, tok_per_s), stop)."""
    if quiet:
        return (lambda *args: None), (lambda: None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from lors_convert.console import stderr

    bars = Progress(
        TextColumn("fine-tuning"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[speed]} tok/s"),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
    )
    task = bars.add_task("", total=total, completed=done, loss="-", speed="-")
    bars.start()
    update = lambda step, loss, speed: bars.update(
        task,
        completed=step,
        loss=f"{loss:.4f}",
        speed=f"{speed:,.0f}",
    )
    return update, bars.stop


def finetune(
    lors: str | Path,
    data: list[str | Path],
    output: str | Path,
    settings: FinetuneConfig,
    *,
    teacher: Path | None = None,
    factory: str | None = None,
    allow_teacher_mismatch: bool = False,
    resume: bool = False,
    fsdp: bool = False,
    shard_size: int = SHARD_BYTES,
    force: bool = False,
    quiet: bool = False,
    log=print,
) -> dict:
    """Distil the dense teacher (or, with objective "lm", train on the text) into the LORS checkpoint `lors` on
    `data` (text files, one example per line), evaluate before and after on held-out lines, and write `output`
    (rank 0). Returns the results (steps, losses, the evaluations, the files written)."""
    from lors_convert.checkpoint import check_output_path

    lors, data, output = Path(lors), [Path(d) for d in data], Path(output)
    settings.validate()
    rank, world_size = world()
    if fsdp and world_size < 2:
        raise LorsError(
            "--fsdp shards the model across processes: run it with --nproc-per-node N (or torchrun), N >= 2"
        )
    say = log if rank == 0 else (lambda *a: None)
    device = setup_device(world_size)
    source, meta = read_lors(lors)
    distilled = teacher is not None or meta.source.sha256 is not None  # not a model from `lors-convert init`
    original = open_source(teacher_path_of(meta, teacher)) if distilled and not factory else None
    student_numel = sum(info.numel for info in source.info.values())
    offload = world_size == 1 and fit_training(student_numel, original, settings, device)
    if offload:
        say(
            "the teacher's blocks are read from its checkpoint as they run: with all of it in memory, training "
            "would not fit"
        )
    pair = load_student_teacher(lors, teacher, factory, allow_teacher_mismatch, warn=say, offload_teacher=offload)
    check_output_path(output, [*pair.source.files, *teacher_files(pair)], force)
    torch.manual_seed(settings.seed)
    examples = load_examples(data, pair.tokenizer)
    train, held_out = split_examples(examples, settings.eval_examples)
    if pair.teacher is None and settings.objective != "lm":
        raise LorsError(
            f"{lors} was made by `lors-convert init`: there is no teacher to distil from; train it with "
            "--objective lm (or give --teacher)"
        )
    student, teacher_model = pair.student, pair.teacher
    if settings.lr is None:
        distilling_lm = settings.objective == "distill" and is_causal_lm(student)
        settings = replace(settings, lr=LM_LR if distilling_lm else LR)
    if not fsdp:  # under --fsdp they reach the device a shard at a time: neither need fit one device whole
        student = student.to(device)
        teacher_model = teacher_model.to(device) if teacher_model is not None else None
    paths = stacked_layer_paths(student, pair.meta)  # the same paths in the teacher
    # packing needs the end-of-text token between lines: a tokenizer without one pads
    pack = (
        settings.pack
        and examples.texts is not None
        and is_causal_lm(student)
        and pair.tokenizer.eos_token_id is not None
    )
    batch_of = lambda ex, idx, where=device: ex.batch(idx, pair.tokenizer, settings.max_length, where, pack)
    options = {"batch_size": settings.batch_size, "max_length": settings.max_length, "device": device}
    evaluate = lambda: fidelity(student, teacher_model, held_out, pair.tokenizer, **options)

    probe = batch_of(train, [0, 1], torch.device("cpu") if fsdp else device)  # under --fsdp, before sharding
    frozen = freeze_unreached(student, teacher_model, probe, paths, settings.objective)
    if frozen:
        say(f"frozen (the loss does not reach them): {', '.join(frozen)}")
    if fsdp:
        shard(student, paths)  # before the optimizer, which must hold the sharded parameters
        if teacher_model is not None:
            shard(teacher_model, paths, teacher=True)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    fingerprint = {
        **asdict(settings),
        "lors_sha256": hashlib.sha256(pair.meta.to_json().encode()).hexdigest(),
        "world_size": world_size,
        "examples": len(examples),
    }
    start, spent = load_state(state_path(output), student, optimizer, fingerprint) if resume else (0, 0.0)
    spent_before = spent
    # find_unused_parameters: an MoE expert that this process's batch does not reach has no gradient in this step
    # (another process's may), so DDP must not wait for one. Two examples cannot tell a dense model from an MoE
    # whose experts they all reached, so it is always on (torch warns once where a step used every parameter).
    ddp = lambda model: nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    trained = ddp(student) if world_size > 1 and not fsdp else student

    before = evaluate()
    update, stop = train_progress(quiet or rank != 0, settings.steps, start)
    losses, tokens, started, done = [], 0, time.perf_counter(), start
    writing = None  # rank 0's thread writing the last --save-every state
    try:
        for step in range(start, settings.steps):
            indices = batch_indices(step, len(train), settings.batch_size * world_size, settings.seed)
            batch = batch_of(train, indices[rank * settings.batch_size : (rank + 1) * settings.batch_size])
            with autocast(device):
                loss = step_loss(trained, teacher_model, batch, paths, settings.objective)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(settings, step, spent)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            revise_threads()
            losses.append(loss.item())
            mask = batch.get("attention_mask")
            tokens += int(mask.sum()) * world_size if mask is not None else len(indices)
            update(step + 1, losses[-1], tokens / (time.perf_counter() - started))
            done = step + 1
            spent = budget_spent(started, spent_before, settings.minutes, world_size, device)
            if spent >= 1:
                break
            if settings.save_every and (step + 1) % settings.save_every == 0 and step + 1 < settings.steps:
                progress = {"step": step + 1, "spent": spent, "fingerprint": fingerprint}
                writing = save_state(state_path(output), progress, student, optimizer, rank, writing)
    except BaseException:
        if writing is not None:
            writing.join()  # an interrupted run leaves its last state whole
        raise
    finally:
        stop()
    seconds = time.perf_counter() - started
    after = evaluate()
    results = {
        "steps": done,
        "resumed_at": start,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "seconds": round(seconds, 3),
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "world_size": world_size,
        "fsdp": fsdp,
        "device": device.type,
        "frozen": frozen,
        "eval_before": before,
        "eval_after": after,
        "held_out": held_out_words(held_out, data),
    }
    if world_size > 1 and not fsdp:  # FSDP holds no replicas to compare
        log(f"rank {rank}: parameter digest {parameter_digest(student)}")
    state = full_state(student)
    if world_size > 1:  # that was the last collective: what follows is rank 0's alone, and no process waits for it
        dist.destroy_process_group()
    if rank == 0:
        finish(writing)
        files = write_output(output, pair, settings, results, force, state, shard_size)
        results["files"] = [str(f) for f in files]
        state_path(output).unlink(missing_ok=True)
    return results
