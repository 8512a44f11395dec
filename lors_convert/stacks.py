"""Discovering stacked groups: tensors whose names differ only in one integer path segment."""

from __future__ import annotations

import fnmatch
import math
import re
from collections import defaultdict
from dataclasses import dataclass

import torch

from lors_convert.checkpoint import TensorInfo


@dataclass
class Stack:
    template: str  # the name with the layer index written as {i}, e.g. "encoder.layer.{i}.output.dense.weight"
    layers: list[int]
    names: list[str]
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def dense_params(self) -> int:
        return len(self.layers) * self.rows * self.cols


def is_index(part: str) -> bool:
    """Whether a path segment is a layer index. Only ASCII digits make one: str.isdigit also accepts "²" or "٣",
    which int() refuses or reads as 3."""
    return re.fullmatch(r"0|[1-9][0-9]*", part) is not None


def _templates(name: str) -> list[tuple[str, int, int]]:
    """Every (template, layer index, segment position) obtained by replacing one integer segment with {i}."""
    parts = name.split(".")
    out = []
    for pos, part in enumerate(parts):
        if is_index(part):
            out.append((".".join(parts[:pos] + ["{i}"] + parts[pos + 1 :]), int(part), pos))
    return out


def is_factorable(info: TensorInfo) -> bool:
    """A matrix (or conv kernel, seen as out x rest) of floats with at least two rows and columns."""
    return (
        info.dtype.is_floating_point and len(info.shape) >= 2 and info.shape[0] >= 2 and math.prod(info.shape[1:]) >= 2
    )


def find_stacks(
    info: dict[str, TensorInfo], include: list[str] | None = None, exclude: list[str] | None = None
) -> tuple[list[Stack], list[str]]:
    """Group factorable tensors into stacks. Returns the stacks and warnings about near-stacks left dense.

    A name with several integer segments (T5's block.N.layer.M) joins the candidate group with the most
    members of its shape and dtype; ties go to the outermost segment, so T5 stacks run over blocks.
    """
    candidates: dict[tuple, dict[int, str]] = defaultdict(dict)
    for name, tinfo in info.items():
        if is_factorable(tinfo):
            for template, index, _ in _templates(name):
                candidates[(template, tinfo.shape, tinfo.dtype)][index] = name
    chosen: dict[tuple, dict[int, str]] = defaultdict(dict)
    for name, tinfo in info.items():
        if not is_factorable(tinfo):
            continue
        options = [
            (len(candidates[(t, tinfo.shape, tinfo.dtype)]), -pos, t, index) for t, index, pos in _templates(name)
        ]
        if options:
            _, _, template, index = max(options)
            chosen[(template, tinfo.shape, tinfo.dtype)][index] = name
    by_template: dict[str, list[tuple]] = defaultdict(list)
    for key, members in chosen.items():
        by_template[key[0]].append((len(members), key, members))
    stacks, warnings = [], []
    for template, options in sorted(by_template.items()):
        options.sort(key=lambda o: (-o[0], str(o[1][1])))
        size, (_, shape, dtype), members = options[0]
        leftovers = options[1:] if size >= 2 else (options if len(options) > 1 else [])
        for _, (_, other_shape, other_dtype), other in leftovers:
            warnings.append(
                f"{template}: layers {sorted(other)} have shape {list(other_shape)} "
                f"{str(other_dtype).removeprefix('torch.')}, unlike the rest; they stay dense"
            )
        if size < 2:
            continue
        if include and not any(fnmatch.fnmatchcase(template, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(template, p) for p in exclude):
            continue
        layers = sorted(members)
        stacks.append(Stack(template, layers, [members[i] for i in layers], shape, dtype))
    return stacks, warnings
