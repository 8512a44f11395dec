"""Fidelity of a LORS model against its dense teacher, and what fine-tuning and eval share: loading the
pair of models and comparing their outputs (examples are data.py's, running a model on a batch runtime.py's)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lors_convert import LorsError
from lors_convert.checkpoint import sha256_files
from lors_convert.data import Examples
from lors_convert.hf import open_source
from lors_convert.lors_format import LorsMeta, read_lors
from lors_convert.runtime import autocast, logits_and_hidden
from lors_convert.threads import revise_threads


@dataclass
class StudentTeacher:
    student: nn.Module
    teacher: nn.Module | None  # None for a checkpoint from `lors-convert init`
    tokenizer: object | None
    source: object  # the LORS TensorSource
    meta: LorsMeta
    teacher_path: Path
    teacher_sha256: str


def teacher_path_of(meta: LorsMeta, teacher: Path | None) -> Path:
    path = Path(teacher) if teacher else Path(meta.source.path)
    if not path.exists():
        raise LorsError(f"teacher {path} not found; give the dense original with --teacher PATH")
    return path


def load_student_teacher(
    lors: Path,
    teacher: Path | None = None,
    factory: str | None = None,
    allow_teacher_mismatch: bool = False,
    warn=print,
    offload_student: bool = False,
    offload_teacher: bool = False,
) -> StudentTeacher:
    """The LORS student (runtime modules) and the dense teacher, on the CPU in float32; offloaded, a model's blocks
    are read from its checkpoint as they run (offload.py; the student only to evaluate, not to train), where they
    can be: memory holds one block of it."""
    from lors_convert.hf import architecture_dir, dense_model, factory_architecture, has_tokenizer, load_tokenizer
    from lors_convert.loading import load, offloaded_dense_model

    source, meta = read_lors(lors)
    if teacher is None and meta.source.sha256 is None:  # from `lors-convert init`: nothing to distil from
        folder = Path(meta.source.path)
        student = load(lors, architecture=(lambda: factory_architecture(factory)) if factory else folder)
        tokenizer = load_tokenizer(folder) if factory is None and has_tokenizer(folder) else None
        return StudentTeacher(student, None, fit_tokenizer(tokenizer, student), source, meta, folder, "")
    path = teacher_path_of(meta, teacher)
    digest = sha256_files(open_source(path).files)
    if digest != meta.source.sha256:
        message = (
            f"teacher {path} is not the checkpoint this LORS file was converted from (sha256 "
            f"{digest[:12]}…, recorded {(meta.source.sha256 or 'none')[:12]}…)"
        )
        if not allow_teacher_mismatch:
            raise LorsError(message + "; pass --allow-teacher-mismatch to distil from it anyway")
        warn(f"warning: {message}")
    folder = architecture_dir(path)
    if factory is None and folder is None:
        raise LorsError(
            f"{path}: cannot tell the architecture; give a Hugging Face model directory as "
            "--teacher or --model-factory package.module:function"
        )
    architecture = (lambda: factory_architecture(factory)) if factory else folder
    student = load(lors, architecture=architecture, offload=offload_student and not factory)
    teacher_model = (offloaded_dense_model if offload_teacher else dense_model)(path, factory).requires_grad_(False)
    tokenizer = load_tokenizer(folder) if factory is None and has_tokenizer(folder) else None
    return StudentTeacher(
        student, teacher_model.float().eval(), fit_tokenizer(tokenizer, student), source, meta, path, digest
    )


def fit_tokenizer(tokenizer, model: nn.Module):
    """A padding token, and no longer sequences than the model has positions for."""
    if tokenizer is None:
        return None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions:
        tokenizer.model_max_length = min(tokenizer.model_max_length, positions)
    return tokenizer


# ---------------------------------------------------------------- examples


# ---------------------------------------------------------------- running a model


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    hidden = hidden.float()
    if hidden.dim() == 2:
        return hidden
    if mask is None or mask.shape != hidden.shape[:2]:
        return hidden.mean(dim=1)
    weights = mask.unsqueeze(-1).float()
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def token_log_probs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token negative log-likelihoods, number of predicted tokens): predictions of a real token made
    at a real token (never at padding, on either side)."""
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    keep = (mask[:, 1:] * mask[:, :-1]).flatten().float()
    return (nll * keep).sum(), keep.sum()


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-token KL(teacher ‖ student), summed; divide by the token count for a mean."""
    kl = F.kl_div(
        F.log_softmax(student_logits.float(), -1),
        F.log_softmax(teacher_logits.float(), -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    return (kl * mask).sum() if mask is not None else kl.sum()


def neighbour_agreement(student: torch.Tensor, teacher: torch.Tensor, k: int = 10) -> float:
    """Mean fraction of each example's k nearest neighbours (cosine) that both embeddings agree on."""
    k = min(k, len(teacher) - 1)
    if k < 1:
        return float("nan")

    def neighbours(embeddings: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(embeddings, dim=-1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-float("inf"))
        return similarity.topk(k, dim=-1).indices

    s, t = neighbours(student), neighbours(teacher)
    hits = (s.unsqueeze(-1) == t.unsqueeze(-2)).any(-1).float().sum(-1)
    return (hits / k).mean().item()


LOGITS_BYTES = 2**27  # a scored batch's float32 logits at most: its scoring holds about eight times that


def scored_batches(model: nn.Module, batches: Iterator[dict]) -> Iterator[dict]:
    """The batches cut into fewer rows where their logits would pass LOGITS_BYTES (a 256k vocabulary: 4.3 GB for
    32 rows of 128 tokens, per model, before the scoring's own copies)."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    vocab = head.weight.shape[0] if isinstance(getattr(head, "weight", None), torch.Tensor) else 0
    for batch in batches:
        revise_threads()
        ids = batch.get("input_ids")
        if ids is None or not vocab:
            yield batch
            continue
        rows = max(1, LOGITS_BYTES // (ids.shape[1] * vocab * 4))
        for first in range(0, len(ids), rows):
            yield {k: v[first : first + rows] for k, v in batch.items()}


@torch.no_grad()
def next_token_nll(model: nn.Module, batches: Iterable[dict], device: torch.device) -> tuple[float, float]:
    """(summed next-token negative log-likelihood, tokens predicted) of a causal LM over the batches: the one
    perplexity loop (held-out loss, --max-ppl-increase's choice)."""
    nll = tokens = 0.0
    for batch in scored_batches(model, batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device):
            logits, _ = logits_and_hidden(model, batch)
        if logits is None or "input_ids" not in batch:
            raise LorsError("a next-token loss needs a causal language model and token ids")
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        total, count = token_log_probs(logits, batch["input_ids"], mask)
        nll, tokens = nll + total.item(), tokens + count.item()
    return nll, tokens


def held_out_loss(
    model: nn.Module,
    examples: Examples,
    tokenizer,
    *,
    batch_size: int = 32,
    max_length: int = 128,
    device: torch.device = torch.device("cpu"),
) -> dict:
    """Next-token loss and perplexity on held-out examples (for models trained without a teacher)."""
    nll, tokens = next_token_nll(model, examples.batches(batch_size, tokenizer, max_length, device), device)
    loss = nll / max(tokens, 1)
    return {"examples": len(examples), "loss": loss, "ppl": float(torch.tensor(loss).exp())}


@torch.no_grad()
def fidelity(
    student: nn.Module,
    teacher: nn.Module,
    examples: Examples,
    tokenizer,
    *,
    batch_size: int = 32,
    max_length: int = 128,
    device: torch.device = torch.device("cpu"),
) -> dict:
    """cos, top10 and, where the model has an LM head, ppl_teacher, ppl_student, kl (teacher ‖ student, per token)
    and top1 (the fraction of positions where both predict the same next token)."""
    s_emb, t_emb = [], []
    nll_s = nll_t = kl = agree = tokens = positions = 0.0
    lm = False
    for batch in scored_batches(teacher, examples.batches(batch_size, tokenizer, max_length, device)):
        mask = batch.get("attention_mask")
        with autocast(device):
            s_logits, s_hidden = logits_and_hidden(student, batch)
            t_logits, t_hidden = logits_and_hidden(teacher, batch)
        s_emb.append(mean_pool(s_hidden, mask).cpu())
        t_emb.append(mean_pool(t_hidden, mask).cpu())
        if s_logits is not None and "input_ids" in batch:
            lm = True
            mask = mask if mask is not None else torch.ones_like(batch["input_ids"])
            nll, count = token_log_probs(s_logits, batch["input_ids"], mask)
            nll_s, tokens = nll_s + nll.item(), tokens + count.item()
            nll_t += token_log_probs(t_logits, batch["input_ids"], mask)[0].item()
            kl += token_kl(s_logits, t_logits, mask).item()
            agree += ((s_logits.argmax(-1) == t_logits.argmax(-1)) * mask).sum().item()
            positions += mask.sum().item()
    s_all, t_all = torch.cat(s_emb), torch.cat(t_emb)
    result = {
        "examples": len(examples),
        "cos": F.cosine_similarity(s_all, t_all, dim=-1).mean().item(),
        "top10": neighbour_agreement(s_all, t_all),
    }
    if lm:
        result.update(
            ppl_teacher=float(torch.tensor(nll_t / tokens).exp()),
            ppl_student=float(torch.tensor(nll_s / tokens).exp()),
            kl=kl / positions,
            top1=agree / positions,
        )
    return result


def print_fidelity(rows: dict[str, dict], as_json: bool, title: str) -> None:
    """One column per evaluated state (e.g. before / after fine-tuning)."""
    import json

    from rich.table import Table

    from lors_convert.console import stdout

    if as_json:
        print(json.dumps(rows if len(rows) > 1 else next(iter(rows.values())), indent=2))
        return
    stdout.print(title)
    table = Table()
    table.add_column("metric")
    for label in rows:
        table.add_column(label, justify="right")
    first = next(iter(rows.values()))
    for metric in first:
        table.add_row(
            metric, *(f"{r[metric]:.4f}" if isinstance(r[metric], float) else str(r[metric]) for r in rows.values())
        )
    stdout.print(table)
