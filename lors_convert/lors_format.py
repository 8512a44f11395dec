"""The on-disk LORS format (docs/FORMAT.md): key names, the metadata schema, reading and expanding."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterator

import torch

from lors_convert import LorsError
from lors_convert.checkpoint import DTYPE_NAMES, TensorSource, open_checkpoint
from lors_convert.factorize import rel_error

FORMAT_VERSION = 1
METADATA_KEY = "lors"


def shared_key(template: str) -> str:
    return template.replace("{i}", "lors_shared")


def factor_keys(name: str) -> tuple[str, str]:
    """The (A, B) keys of one layer's private factors."""
    return f"{name}.lora_A", f"{name}.lora_B"


def read_lors(path: str | Path, check: bool = True) -> tuple[TensorSource, dict]:
    """Open a LORS checkpoint and return it with its parsed, version-checked description (and, with `check`,
    refuse it when a factor is missing or misshapen)."""
    source = open_checkpoint(path)
    raw = source.metadata.get(METADATA_KEY)
    if raw is None and source.path.name.endswith(".index.json"):
        index_meta = json.loads(source.path.read_text()).get("metadata")
        raw = index_meta.get(METADATA_KEY) if isinstance(index_meta, dict) else None
    if raw is None:
        raise LorsError(f"{path}: not a LORS checkpoint (no '{METADATA_KEY}' metadata; convert it first)")
    try:
        meta = json.loads(raw)
        version = meta["format_version"]
    except (json.JSONDecodeError, RecursionError, TypeError, KeyError):
        raise LorsError(f"{path}: corrupt LORS metadata") from None
    if type(version) is not int or version < 1:
        raise LorsError(f"{path}: corrupt LORS metadata (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise LorsError(f"{path}: LORS format_version {version} is newer than this tool reads "
                        f"({FORMAT_VERSION}); upgrade lors-convert")
    problem = schema_problem(meta)
    if problem:
        raise LorsError(f"{path}: corrupt LORS metadata ({problem})")
    problems = consistency_problems(source, meta) if check else []
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LorsError(f"{path}: damaged LORS checkpoint: {problems[0]}{more}")
    return source, meta


def _ints(value, n: int | None = None, low: int = 0) -> bool:
    return (isinstance(value, list) and all(type(x) is int and x >= low for x in value)
            and (n is None or len(value) == n))


def _is_dtype_name(name) -> bool:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES


def schema_problem(meta: dict) -> str | None:
    """What is wrong with the fields report and expand rely on, or None."""
    for key, kind in (("groups", list), ("kept_dense", list), ("source", dict), ("settings", dict),
                      ("dtypes", dict)):
        if not isinstance(meta.get(key, {} if key == "dtypes" else None), kind):
            return f"{key!r} is missing or not a {kind.__name__}"
    if not (isinstance(meta["source"].get("path"), str) and type(meta["source"].get("bytes")) is int):
        return "'source' needs a path and a byte count"
    if not all(_is_dtype_name(v) for v in meta.get("dtypes", {}).values()):
        return "'dtypes' names something that is not a dtype"
    for g in meta["groups"]:
        if not (isinstance(g, dict) and isinstance(g.get("template"), str) and "{i}" in g["template"]
                and _ints(g.get("layers")) and g["layers"]):
            return "a group needs a template with {i} and its layers"
        n = len(g["layers"])
        if not (isinstance(g.get("names"), list) and len(g["names"]) == n
                and all(isinstance(name, str) for name in g["names"]) and _ints(g.get("ranks"), n)):
            return f"{g['template']}: names and ranks must list each of its {n} layers"
        if not (_ints(g.get("shape"), low=1) and len(g["shape"]) >= 2 and _is_dtype_name(g.get("dtype"))
                and getattr(torch, g["dtype"]).is_floating_point):
            return f"{g['template']}: shape or dtype malformed"
        if not (_ints([g.get("dense_params"), g.get("lors_params")], low=1)
                and type(g.get("rel_error")) in (int, float) and 0 <= g["rel_error"] < 1e100):
            return f"{g['template']}: parameter counts or error malformed"
        if type(g.get("shared", True)) is not bool:
            return f"{g['template']}: 'shared' must be true or false"
    for k in meta["kept_dense"]:
        if not (isinstance(k, dict) and isinstance(k.get("template"), str) and _ints(k.get("layers"))
                and isinstance(k.get("reason"), str)):
            return "a kept_dense entry needs a template, layers and a reason"
    return None


def consistency_problems(source: TensorSource, meta: dict) -> list[str]:
    """Every factor the metadata names must be present with the shape it implies (schema already checked)."""
    problems = []
    for group in meta["groups"]:
        rows, cols = group["shape"][0], math.prod(group["shape"][1:])
        expected = {shared_key(group["template"]): tuple(group["shape"])} if is_shared(group) else {}
        for name, rank in zip(group["names"], group["ranks"], strict=True):
            a_key, b_key = factor_keys(name)
            expected[a_key], expected[b_key] = (rank, cols), (rows, rank)
        for key, shape in expected.items():
            if key not in source.info:
                problems.append(f"tensor {key!r} is missing")
            elif source.info[key].shape != shape:
                problems.append(f"{key!r} has shape {list(source.info[key].shape)}, the metadata implies "
                                f"{list(shape)}")
    return problems


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


def reconstruct(source: TensorSource | dict[str, torch.Tensor], group: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Dense float32 weights of one group, layer by layer: S + B_i A_i in the original shape (from a LORS file,
    or from its tensors in a dict)."""
    shape = tuple(group["shape"])
    shared = (source.get(shared_key(group["template"])).float().reshape(shape[0], -1) if is_shared(group)
              else torch.zeros(shape[0], math.prod(shape[1:])))
    for name in group["names"]:
        a_key, b_key = factor_keys(name)
        weight = shared + source.get(b_key).float() @ source.get(a_key).float()
        yield name, weight.reshape(shape)


def reconstruction_errors(lors: TensorSource | dict[str, torch.Tensor], group: dict,
                          original: Callable[[str], torch.Tensor]) -> tuple[float, list[float]]:
    """The group's relative error ‖W − Ŵ‖_F / ‖W‖_F against the original weights, and each layer's."""
    err_total = norm_total = 0.0
    layer_errors = []
    for name, weight in reconstruct(lors, group):
        dense = original(name).float().reshape(weight.shape)
        err, norm = (dense - weight).square().sum().item(), dense.square().sum().item()
        err_total, norm_total = err_total + err, norm_total + norm
        layer_errors.append(rel_error(err, norm))
    return rel_error(err_total, norm_total), layer_errors


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
