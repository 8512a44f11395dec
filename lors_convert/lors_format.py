"""The on-disk LORS format (docs/FORMAT.md): key names, the metadata schema, reading and expanding."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import torch

from lors_convert import LorsError
from lors_convert.checkpoint import TensorSource, open_checkpoint

FORMAT_VERSION = 1
METADATA_KEY = "lors"


def shared_key(template: str) -> str:
    return template.replace("{i}", "lors_shared")


def factor_keys(name: str) -> tuple[str, str]:
    """The (A, B) keys of one layer's private factors."""
    return f"{name}.lora_A", f"{name}.lora_B"


def read_lors(path: str | Path) -> tuple[TensorSource, dict]:
    """Open a LORS checkpoint and return it with its parsed, version-checked description."""
    source = open_checkpoint(path)
    raw = source.metadata.get(METADATA_KEY)
    if raw is None and source.path.name.endswith(".index.json"):
        raw = json.loads(source.path.read_text()).get("metadata", {}).get(METADATA_KEY)
    if raw is None:
        raise LorsError(f"{path}: not a LORS checkpoint (no '{METADATA_KEY}' metadata; convert it first)")
    try:
        meta = json.loads(raw)
        version = meta["format_version"]
    except (json.JSONDecodeError, TypeError, KeyError):
        raise LorsError(f"{path}: corrupt LORS metadata") from None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LorsError(f"{path}: LORS format_version {version} is newer than this tool reads "
                        f"({FORMAT_VERSION}); upgrade lors-convert")
    check_consistency(source, meta, path)
    return source, meta


def check_consistency(source: TensorSource, meta: dict, path: str | Path) -> None:
    """Every factor the metadata names is present with the shape it implies."""
    try:
        for group in meta["groups"]:
            rows, cols = group["shape"][0], math.prod(group["shape"][1:])
            expected = {shared_key(group["template"]): tuple(group["shape"])} if is_shared(group) else {}
            for name, rank in zip(group["names"], group["ranks"], strict=True):
                a_key, b_key = factor_keys(name)
                expected[a_key], expected[b_key] = (rank, cols), (rows, rank)
            for key, shape in expected.items():
                if key not in source.info:
                    raise LorsError(f"{path}: damaged LORS checkpoint: tensor {key!r} is missing")
                if source.info[key].shape != shape:
                    raise LorsError(f"{path}: damaged LORS checkpoint: {key!r} has shape "
                                    f"{list(source.info[key].shape)}, the metadata implies {list(shape)}")
    except (KeyError, TypeError, ValueError, IndexError):
        raise LorsError(f"{path}: corrupt LORS metadata (groups malformed)") from None


def is_shared(group: dict) -> bool:
    """Groups converted with --shared none store no shared matrix (W_i ≈ B_i A_i)."""
    return group.get("shared", True)


def factor_keys_of(meta: dict) -> set[str]:
    keys = set()
    for group in meta["groups"]:
        if is_shared(group):
            keys.add(shared_key(group["template"]))
        for name in group["names"]:
            keys.update(factor_keys(name))
    return keys


def reconstruct(source: TensorSource, group: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Dense float32 weights of one group, layer by layer: S + B_i A_i in the original shape."""
    shape = tuple(group["shape"])
    shared = (source.get(shared_key(group["template"])).float().reshape(shape[0], -1) if is_shared(group)
              else torch.zeros(shape[0], math.prod(shape[1:])))
    for name in group["names"]:
        a_key, b_key = factor_keys(name)
        weight = shared + source.get(b_key).float() @ source.get(a_key).float()
        yield name, weight.reshape(shape)


def expand(source: TensorSource, meta: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """The dense state dict again: original names, shapes and dtypes."""
    factor_names = factor_keys_of(meta)
    dtypes = meta.get("dtypes", {})
    for name in source.info:
        if name not in factor_names:
            tensor = source.get(name)
            yield name, tensor.to(getattr(torch, dtypes[name])) if name in dtypes else tensor
    for group in meta["groups"]:
        dtype = getattr(torch, group["dtype"])
        for name, weight in reconstruct(source, group):
            yield name, weight.to(dtype)
