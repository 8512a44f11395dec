"""Examples for evaluation, fine-tuning and calibration: text files (streamed line by line) and tensor files,
the held-out split, and the batches they become."""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from lors_convert import LorsError
from lors_convert.checkpoint import open_checkpoint

TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth")
SORT_WINDOW = 16  # batches of text evaluation sorts by length at a time (a bounded read, whatever the data's size)


class TextLines:
    """The non-empty lines of text files, read from disk when asked for: only each line's file and byte offset
    are held (16 bytes a line), so a corpus of any size costs no memory. Indexing gives the stripped line."""

    def __init__(self, files: list[Path], positions: torch.Tensor | None = None):
        self.files = [Path(f) for f in files]
        self.positions = positions if positions is not None else self._index()  # rows of (file index, offset)

    def _index(self) -> torch.Tensor:
        positions = array("q")  # flat (file index, offset) pairs: 16 bytes a line while indexing too
        for number, file in enumerate(self.files):
            try:
                with open(file, "rb") as stream:
                    offset = 0
                    for line in stream:
                        if line.strip():
                            line.decode("utf-8")
                            positions.extend((number, offset))
                        offset += len(line)
            except (OSError, UnicodeDecodeError) as e:
                raise LorsError(f"{file}: cannot read text ({e.__class__.__name__})") from e
        if not positions:
            raise LorsError(f"no text in {', '.join(map(str, self.files))}")
        return torch.frombuffer(positions, dtype=torch.long).clone().view(-1, 2)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> str:
        return self.read([i])[0]

    def read(self, indices: list[int]) -> list[str]:
        lines, streams = [], {}
        try:
            for number, offset in self.positions[indices].tolist():
                stream = streams.get(number) or streams.setdefault(number, open(self.files[number], "rb"))
                stream.seek(offset)
                lines.append(stream.readline().decode("utf-8").strip())
        finally:
            for stream in streams.values():
                stream.close()
        return lines

    def subset(self, indices: list[int]) -> "TextLines":
        return TextLines(self.files, self.positions[torch.as_tensor(indices, dtype=torch.long)])


@dataclass
class Examples:
    """Text lines (a list, or TextLines read from disk; tokenised per batch) or a dict of tensors whose first
    dimension indexes examples."""

    texts: list[str] | TextLines | None = None
    tensors: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.texts) if self.texts is not None else len(next(iter(self.tensors.values())))

    def lines(self, indices: list[int]) -> list[str]:
        return self.texts.read(indices) if isinstance(self.texts, TextLines) else [self.texts[i] for i in indices]

    def subset(self, indices: list[int]) -> "Examples":
        if isinstance(self.texts, TextLines):
            return Examples(texts=self.texts.subset(indices))
        if self.texts is not None:
            return Examples(texts=self.lines(indices))
        index = torch.tensor(indices, dtype=torch.long)
        return Examples(tensors={k: v[index] for k, v in self.tensors.items()})

    def batches(self, batch_size: int, tokenizer, max_length: int, device: torch.device) -> Iterator[dict]:
        """All examples, `batch_size` at a time (evaluation): text lines of similar length together, sorted within
        windows of SORT_WINDOW batches, since a batch padded to its longest line spends most of its compute on
        padding (masked: results do not depend on the order); tensor rows in order."""
        step = batch_size * (SORT_WINDOW if self.texts is not None else 1)
        for start in range(0, len(self), step):
            window = list(range(start, min(start + step, len(self))))
            # the window's lines read once, sorted, and batched from memory
            held = self if self.texts is None else Examples(texts=sorted(self.lines(window), key=len))
            indices = window if self.texts is None else list(range(len(window)))
            for first in range(0, len(indices), batch_size):
                yield held.batch(indices[first : first + batch_size], tokenizer, max_length, device)

    def batch(self, indices: list[int], tokenizer, max_length: int, device: torch.device, pack: bool = False) -> dict:
        """The examples at `indices` as one batch: padded to the longest, or with `pack` (text for a causal LM)
        joined end to end, each line followed by the end-of-text token, and cut into rows of `max_length`, so no
        step spends compute on padding (short lines padded to a long one can be most of a batch)."""
        if self.texts is None:
            return {k: v.to(device) for k, v in trimmed(self.subset(indices).tensors).items()}
        if pack:
            return packed(self.lines(indices), tokenizer, min(max_length, tokenizer.model_max_length), device)
        encoded = tokenizer(
            self.lines(indices),
            padding=True,
            truncation=True,
            max_length=min(max_length, tokenizer.model_max_length),
            return_tensors="pt",
        )
        return {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def trimmed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rows of a tensor file cut after the batch's last unmasked position: a file's rows are padded to its longest,
    and a batch of short ones would spend most of its compute on that padding (left padding is left alone)."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2 or not mask.any():
        return batch
    width = int(mask.any(0).nonzero().max()) + 1
    return {k: v[:, :width] if v.dim() >= 2 and v.shape[:2] == mask.shape else v for k, v in batch.items()}


def packed(lines: list[str], tokenizer, length: int, device: torch.device, line_length: int | None = None) -> dict:
    """Lines tokenised (each cut to `line_length`, or to `length`), joined with the end-of-text token after each,
    cut into rows of `length` tokens; the last row is padded, and its padding masked."""
    if tokenizer.eos_token_id is None:
        raise LorsError("packing lines needs a tokenizer with an end-of-text token")
    stream = [
        t
        for ids in tokenizer(lines, truncation=True, max_length=min(length, line_length or length))["input_ids"]
        for t in ids + [tokenizer.eos_token_id]
    ]
    rows = -(-len(stream) // length)
    ids = torch.full((rows, length), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((rows, length), dtype=torch.long)
    ids.view(-1)[: len(stream)] = torch.tensor(stream)
    mask.view(-1)[: len(stream)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def load_examples(files: list[Path], tokenizer) -> Examples:
    """Text files (one example per line, streamed from disk) or tensor files (.safetensors/.pt: tensors sharing
    dimension 0)."""
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
        return Examples(texts=TextLines(files))
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


# ---------------------------------------------------------------- the one split rule

HELD_OUT = 256  # held-out examples unless asked otherwise (at most a fifth of the data)
SPLIT_SEED = 0  # the order behind every role, whatever --seed: convert, finetune, compress and eval agree on it


def roles(n: int, held_out: int = HELD_OUT) -> tuple[list[int], list[int], list[int]]:
    """The package's one split rule for n examples (lines of text, or rows of tensor files): (held-out,
    calibration, training) indices. One fixed seeded order; its first fifth is the held-out reserve, of which
    evaluation takes the first `held_out`; calibration draws only from the other four fifths, so no held-out
    slice, of any size, ever holds a calibration line; training takes every line not held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    count = min(held_out, n // 5)
    return order[:count], order[n // 5 :], order[count:]


def split_examples(examples: Examples, eval_examples: int = HELD_OUT) -> tuple[Examples, Examples]:
    """(training, held-out) examples by `roles`."""
    n = len(examples)
    held_out, _, train = roles(n, eval_examples)
    if len(train) < 2 or len(held_out) < 2:
        raise LorsError(f"{n} examples are too few to hold some out for evaluation (need at least 10)")
    return examples.subset(train), examples.subset(held_out)


def held_out_words(held_out: Examples, files: list[Path]) -> str:
    """How a table names its held-out examples."""
    unit = "lines" if held_out.texts is not None else "rows"
    names = ", ".join(f.name for f in files)
    return f"{len(held_out)} held-out {unit} of {names}, disjoint from calibration and training"


def calibration_choice(n: int, samples: int, seed: int, skip: int = 0) -> list[int]:
    """`samples` seeded picks among the calibration lines of `roles` (fewer when the data has fewer), after the
    first `skip` picks: --max-ppl-increase chooses on the lines after the calibration samples, so they are never
    calibration lines nor held-out ones."""
    pool = roles(n)[1]
    picked = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[skip : skip + samples]
    return [pool[i] for i in picked.tolist()]


def calibration_words(count: int, n: int, files: list[Path], unit: str = "lines") -> str:
    """How a report names its calibration lines (or rows)."""
    return f"{count} of the {n} {unit} of {', '.join(f.name for f in files)}, none held out"


# Tokens per calibration row of a causal LM. Its lines are packed (data.packed): a forward (and --fisher's backward)
# of one short line is mostly overhead. SmolLM2 at 20% with --fisher, ppl on held-out lines / fortunes: 98.8 / 197.2
# packed into 512-token rows, 99.7 / 198.5 line by line.
PACKED_ROW = 512


def text_batches(
    tokenizer,
    files: list[Path],
    samples: int,
    max_length: int,
    seed: int,
    skip: int = 0,
    pack: bool = False,
    rewrite: Callable[[list[str]], tuple[list[str], str]] | None = None,
    written: int = 0,
) -> tuple[list[dict], str]:
    """Calibration: `samples` seeded lines of the files (streamed; after `skip` picks), each cut to `max_length`
    tokens, one unpadded sequence per batch, so padding never enters the statistics; with `pack`, the lines
    packed into unpadded rows of PACKED_ROW tokens (texts `rewrite` returns for the chosen lines, up to
    `max_length` + `written` tokens: a prompt and the model's answer). And the words that say which."""
    lines = TextLines(files)
    chosen = calibration_choice(len(lines), samples, seed, skip)
    words = calibration_words(len(chosen), len(lines), files)
    if not pack:
        encoded = [
            tokenizer(t, return_tensors="pt", truncation=True, max_length=max_length) for t in lines.read(chosen)
        ]
        return [dict(e) for e in encoded if e["input_ids"].shape[1]], words  # a line of no tokens has nothing to run
    texts, how = rewrite(lines.read(chosen)) if rewrite else (lines.read(chosen), "")
    rows = packed(texts, tokenizer, PACKED_ROW, torch.device("cpu"), max_length + (written if how else 0))
    words += how
    lengths = rows["attention_mask"].sum(1).tolist()
    batches = [{k: v[i : i + 1, :n] for k, v in rows.items()} for i, n in enumerate(lengths)]
    return batches, f"{words}, packed into {len(batches)} rows of up to {PACKED_ROW} tokens"


def tensor_batches(files: list[Path], samples: int, seed: int) -> tuple[list[dict], str]:
    """Calibration inputs for --model-factory models: rows of safetensors/pt files of tensors sharing their first
    dimension (one row per sample), read and checked as eval and fine-tuning read theirs, chosen as text lines are."""
    if not all(Path(f).name.endswith(TENSOR_SUFFIXES) for f in files):
        raise LorsError("--model-factory calibrates on tensor files (.safetensors, .pt)")
    tensors = load_examples(files, tokenizer=None).tensors
    n = len(next(iter(tensors.values())))
    chosen = calibration_choice(n, samples, seed)
    return [{k: v[i : i + 1] for k, v in tensors.items()} for i in chosen], calibration_words(
        len(chosen), n, files, "rows"
    )
