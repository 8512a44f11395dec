"""Fidelity of a LORS model against its dense teacher, and what fine-tuning and eval share: loading the
pair of models, examples (text lines or tensor files) and running a model on a batch. Calibration reads its
tensor files and calls its models through here too."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lors_convert import LorsError
from lors_convert.checkpoint import open_checkpoint, sha256_files
from lors_convert.lors_format import LorsMeta, read_lors

TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth")


@dataclass
class Pair:
    student: nn.Module
    teacher: nn.Module
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


def load_pair(
    lors: Path,
    teacher: Path | None = None,
    factory: str | None = None,
    allow_teacher_mismatch: bool = False,
    warn=print,
) -> Pair:
    """The LORS student (runtime modules) and the dense teacher, on the CPU in float32."""
    from lors_convert.hf import architecture_dir, dense_model, factory_architecture, has_tokenizer, load_tokenizer
    from lors_convert.model import load

    source, meta = read_lors(lors)
    path = teacher_path_of(meta, teacher)
    digest = sha256_files(open_checkpoint(path).files)
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
    student = load(lors, architecture=(lambda: factory_architecture(factory)) if factory else folder)
    teacher_model = dense_model(path, factory).requires_grad_(False)
    tokenizer = load_tokenizer(folder) if factory is None and has_tokenizer(folder) else None
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        positions = getattr(teacher_model.config, "max_position_embeddings", None) or getattr(
            teacher_model.config, "n_positions", None
        )
        if positions:
            tokenizer.model_max_length = min(tokenizer.model_max_length, positions)
    return Pair(student.float().eval(), teacher_model.float().eval(), tokenizer, source, meta, path, digest)


# ---------------------------------------------------------------- examples


@dataclass
class Examples:
    """Text lines (tokenised per batch) or a dict of tensors whose first dimension indexes examples."""

    texts: list[str] | None = None
    tensors: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.texts) if self.texts is not None else len(next(iter(self.tensors.values())))

    def subset(self, indices: list[int]) -> "Examples":
        if self.texts is not None:
            return Examples(texts=[self.texts[i] for i in indices])
        index = torch.tensor(indices, dtype=torch.long)
        return Examples(tensors={k: v[index] for k, v in self.tensors.items()})

    def batch(self, indices: list[int], tokenizer, max_length: int, device: torch.device) -> dict:
        if self.texts is None:
            return {k: v.to(device) for k, v in self.subset(indices).tensors.items()}
        encoded = tokenizer(
            [self.texts[i] for i in indices],
            padding=True,
            truncation=True,
            max_length=min(max_length, tokenizer.model_max_length),
            return_tensors="pt",
        )
        return {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def load_examples(files: list[Path], tokenizer) -> Examples:
    """Text files (one example per line) or tensor files (.safetensors/.pt: tensors sharing dimension 0)."""
    from lors_convert.hf import read_lines

    files = [Path(f) for f in files]
    if not files:
        raise LorsError("give at least one --data file")
    if not all(f.name.endswith(TENSOR_SUFFIXES) for f in files):
        if tokenizer is None:
            raise LorsError(
                "text data needs the model's tokenizer, and the teacher's folder has no tokenizer files "
                "(tokenizer.json, vocab.txt, …): copy them there, or give .safetensors/.pt files of "
                "input tensors"
            )
        return Examples(texts=read_lines(files))
    parts = [load_tensors(f) for f in files]
    keys = sorted(parts[0])
    if any(sorted(p) != keys for p in parts):
        raise LorsError("the tensor data files hold different names")
    return Examples(tensors={k: torch.cat([p[k] for p in parts]) for k in keys})


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise LorsError(f"{file}: no such file")
    try:
        tensors = open_checkpoint(file)
        data = {name: tensors.get(name) for name in tensors.info}
    except LorsError:
        raise
    except Exception as e:
        raise LorsError(f"{file}: cannot read tensors ({e.__class__.__name__})") from e
    sizes = {t.shape[0] if t.dim() else None for t in data.values()}
    if not data or len(sizes) != 1 or None in sizes:
        raise LorsError(f"{file}: the tensors must share their first dimension (one row per example)")
    return data


def split_examples(examples: Examples, eval_examples: int, seed: int) -> tuple[Examples, Examples]:
    """A seeded held-out slice for evaluation; the rest for training."""
    n = len(examples)
    n_eval = min(eval_examples, n // 5)
    if n - n_eval < 2 or n_eval < 2:
        raise LorsError(f"{n} examples are too few to hold some out for evaluation (need at least 10)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return examples.subset(order[n_eval:]), examples.subset(order[:n_eval])


# ---------------------------------------------------------------- running a model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_hf(model: nn.Module) -> bool:
    """A transformers model (or a subclass of one, like lors_convert.load's LorsBertModel)."""
    return any(cls.__module__.startswith("transformers.") for cls in type(unwrap(model)).__mro__)


def call_model(model: nn.Module, batch: dict, **options):
    """The one way a batch is handed to a model (eval, fine-tuning, calibration): a Hugging Face model takes
    everything by keyword; any other model takes a lone tensor positionally, whatever its name, and several by
    keyword."""
    if len(batch) == 1 and not is_hf(model):
        return model(*batch.values(), **options)
    return model(**batch, **options)


def run(model: nn.Module, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(logits or None, final hidden states) of a model on a batch."""
    if is_hf(model):
        out = call_model(model, batch, output_hidden_states=True)
        logits = getattr(out, "logits", None)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:  # a head on top, or an encoder-decoder (T5): the last layer the output comes from
            states = getattr(out, "hidden_states", None) or getattr(out, "decoder_hidden_states", None)
            hidden = states[-1]
        return logits, hidden
    out = call_model(model, batch)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise LorsError(
            f"--model-factory models must return a tensor (or a tuple starting with one), got {type(out).__name__}"
        )
    return None, out


@contextmanager
def layer_outputs(model: nn.Module, paths: list[str]) -> Iterator[list[torch.Tensor]]:
    """Collects the outputs of the named modules (one per stacked layer) during each forward."""
    captured: list[torch.Tensor] = []

    def hook(module, inputs, output):
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)

    handles = [unwrap(model).get_submodule(p).register_forward_hook(hook) for p in paths]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    hidden = hidden.float()
    if hidden.dim() == 2:
        return hidden
    if mask is None or mask.shape != hidden.shape[:2]:
        return hidden.mean(dim=1)
    weights = mask.unsqueeze(-1).float()
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def token_log_probs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token negative log-likelihoods, number of predicted tokens)."""
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    keep = mask[:, 1:].flatten().float()
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
    """cos, top10 and, where the model has an LM head, ppl_teacher, ppl_student and kl."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    s_emb, t_emb = [], []
    nll_s = nll_t = kl = tokens = positions = 0.0
    lm = False
    for start in range(0, len(examples), batch_size):
        batch = examples.batch(
            list(range(start, min(start + batch_size, len(examples)))), tokenizer, max_length, device
        )
        mask = batch.get("attention_mask")
        with autocast:
            s_logits, s_hidden = run(student, batch)
            t_logits, t_hidden = run(teacher, batch)
        s_emb.append(mean_pool(s_hidden, mask).cpu())
        t_emb.append(mean_pool(t_hidden, mask).cpu())
        if s_logits is not None and "input_ids" in batch:
            lm = True
            mask = mask if mask is not None else torch.ones_like(batch["input_ids"])
            nll, count = token_log_probs(s_logits, batch["input_ids"], mask)
            nll_s, tokens = nll_s + nll.item(), tokens + count.item()
            nll_t += token_log_probs(t_logits, batch["input_ids"], mask)[0].item()
            kl += token_kl(s_logits, t_logits, mask).item()
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
