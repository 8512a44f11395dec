"""Fidelity of a LORS model against its dense teacher, and what fine-tuning and eval share: loading the
pair of models and comparing their outputs (examples are data.py's, running a model on a batch runtime.py's)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lors_convert import LorsError
from lors_convert.checkpoint import sha256_files
from lors_convert.data import Examples
from lors_convert.hf import open_source
from lors_convert.lors_format import LorsMeta, read_lors
from lors_convert.runtime import Logits, autocast, lazy_logits, output_head, vocab_size
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


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), -1)


def token_nll(log_p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's negative log-likelihood of its label."""
    return -log_p.gather(-1, labels[:, None])[:, 0]


def token_kl(student_log_p: torch.Tensor, teacher_log_p: torch.Tensor) -> torch.Tensor:
    """Each row's KL(teacher ‖ student)."""
    return F.kl_div(student_log_p, teacher_log_p, log_target=True, reduction="none").sum(-1)


def next_tokens(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the token after each flat position, whether its prediction is scored): a real token's, made at a real
    token (never at padding, on either side)."""
    scored = torch.zeros_like(ids, dtype=torch.bool)
    scored[:, :-1] = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    return ids.roll(-1, 1).flatten(), scored.flatten()


# float32 logits of one chunk of positions, per model (32 positions of a 262k vocabulary): scoring or distilling a
# chunk holds about seven times that, less than calibrating on a row of 128 tokens holds (compress peaks there)
LOGITS_BYTES = 2**25


def chunk_positions(vocab: int) -> int:
    """The positions of a chunk of logits: LOGITS_BYTES of them."""
    return max(1, LOGITS_BYTES // (4 * max(vocab, 1)))


def chunk_sums(score, positions: torch.Tensor, vocab: int, *logits: Logits) -> torch.Tensor:
    """The sum over chunks of `positions` of score(chunk, each model's logits at them): a 256k vocabulary's
    float32 logits are 4.3 GB for 32 rows of 128 tokens, per model and copy. With gradients on, a chunk's logits
    are made again in the backward rather than kept for it (torch.utils.checkpoint)."""
    total = 0
    for chunk in positions.split(chunk_positions(vocab)):
        run = lambda chunk: score(chunk, *(logits_at(chunk) for logits_at in logits))
        if torch.is_grad_enabled():
            total = total + checkpoint(run, chunk, use_reentrant=False, preserve_rng_state=False)
        else:
            total = total + run(chunk)
    return total


def next_token_loss(logits: Logits, batch: dict, vocab: int) -> tuple[torch.Tensor, int]:
    """(summed next-token negative log-likelihood, tokens predicted) of a batch's logits (runtime.lazy_logits)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels, scored = next_tokens(ids, mask if mask is not None else torch.ones_like(ids))
    positions = scored.nonzero()[:, 0]
    total = chunk_sums(lambda chunk, s: token_nll(log_probs(s), labels[chunk]).sum(), positions, vocab, logits)
    return total, len(positions)


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


def scored_batches(models: list[nn.Module], batches: Iterator[dict]) -> Iterator[dict]:
    """The batches, cut into fewer rows where a model makes its logits whole (output_head finds no head) and they
    would pass LOGITS_BYTES."""
    vocab = max((vocab_size(model) for model in models if output_head(model) is None), default=0)
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
    head, vocab = output_head(model), vocab_size(model)
    for batch in scored_batches([model], batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device):
            logits, _ = lazy_logits(model, batch, head)
            if logits is None or "input_ids" not in batch:
                raise LorsError("a next-token loss needs a causal language model and token ids")
            total, count = next_token_loss(logits, batch, vocab)
        nll, tokens = nll + total.item(), tokens + count
    return nll, tokens


@torch.no_grad()
def fidelity(
    student: nn.Module,
    teacher: nn.Module | None,
    examples: Examples,
    tokenizer,
    *,
    batch_size: int = 32,
    max_length: int = 128,
    device: torch.device = torch.device("cpu"),
) -> dict:
    """cos, top10 and, where the model has an LM head, ppl_teacher, ppl_student, kl (teacher ‖ student, per token)
    and top1 (the fraction of positions where both predict the same next token). With no teacher (a model trained
    from scratch): the student's own next-token loss and perplexity."""
    if teacher is None:
        nll, tokens = next_token_nll(student, examples.batches(batch_size, tokenizer, max_length, device), device)
        loss = nll / max(tokens, 1)
        return {"examples": len(examples), "loss": loss, "ppl": float(torch.tensor(loss).exp())}
    s_emb, t_emb = [], []
    nll_s = nll_t = kl = agree = tokens = positions = 0.0
    lm = False
    s_head, t_head, vocab = output_head(student), output_head(teacher), vocab_size(teacher)
    for batch in scored_batches([student, teacher], examples.batches(batch_size, tokenizer, max_length, device)):
        mask = batch.get("attention_mask")
        with autocast(device):
            s_logits, s_hidden = lazy_logits(student, batch, s_head)
            t_logits, t_hidden = lazy_logits(teacher, batch, t_head)
        s_emb.append(mean_pool(s_hidden, mask).cpu())
        t_emb.append(mean_pool(t_hidden, mask).cpu())
        if s_logits is not None and "input_ids" in batch:
            lm = True
            mask = mask if mask is not None else torch.ones_like(batch["input_ids"])
            labels, scored = next_tokens(batch["input_ids"], mask)

            def sums(chunk: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                s_log, t_log, keep = log_probs(s), log_probs(t), scored[chunk]
                return torch.stack(
                    [
                        (token_nll(s_log, labels[chunk]) * keep).sum(),
                        (token_nll(t_log, labels[chunk]) * keep).sum(),
                        token_kl(s_log, t_log).sum(),
                        (s.argmax(-1) == t.argmax(-1)).sum().float(),
                    ]
                )

            with autocast(device):
                totals = chunk_sums(sums, mask.flatten().nonzero()[:, 0], vocab, s_logits, t_logits).tolist()
            nll_s, nll_t, kl, agree = (a + b for a, b in zip((nll_s, nll_t, kl, agree), totals))
            tokens, positions = tokens + scored.sum().item(), positions + mask.sum().item()
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
