"""The on-disk LORS format (docs/FORMAT.md): key names, the typed metadata model, reading and expanding.

`LorsMeta.from_json` is the only schema: every reader goes through it, every writer builds a `LorsMeta` and
writes `to_json()`. A test checks docs/FORMAT.md against the fields declared here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from lors_convert import LorsError
from lors_convert.checkpoint import DTYPE_NAMES, TensorSource, open_checkpoint
from lors_convert.factorize import rel_error

FORMAT_VERSION = 2  # 2: per-layer dense fallback (`ranks` entries may be null)
METADATA_KEY = "lors"
FACTOR_SUFFIXES = (".lora_A", ".lora_B")
SHARED_SEGMENT = "lors_shared"


def shared_key(template: str) -> str:
    return template.replace("{i}", SHARED_SEGMENT)


def factor_keys(name: str) -> tuple[str, str]:
    """The (A, B) keys of one layer's private factors."""
    return f"{name}.lora_A", f"{name}.lora_B"


def is_lors_key(name: str) -> bool:
    """A name this format gives a meaning to (a factor or a shared matrix)."""
    return name.endswith(FACTOR_SUFFIXES) or SHARED_SEGMENT in name.split(".")


class SchemaError(ValueError):
    """What is wrong with a metadata field (turned into a LorsError naming the file)."""


def _check(ok: bool, problem: str) -> None:
    if not ok:
        raise SchemaError(problem)


def _ints(value, low: int = 0) -> bool:
    return isinstance(value, list) and all(type(x) is int and x >= low for x in value)


def _number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and 0 <= value < 1e100


def _dtype(name) -> bool:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES


def _fields(cls, data, where: str) -> dict:
    """The dataclass fields of `cls` taken from `data`: required ones must be there, unknown keys are kept out."""
    _check(isinstance(data, dict), f"{where} must be an object")
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name, spec in known.items():
        if name in data:
            values[name] = data[name]
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise SchemaError(f"{where} needs {name!r}")
    return values


@dataclass(frozen=True)
class SourceMeta:
    path: str
    files: list[str]
    bytes: int
    sha256: str | None = None

    @classmethod
    def from_dict(cls, data) -> "SourceMeta":
        meta = cls(**_fields(cls, data, "'source'"))
        _check(
            isinstance(meta.path, str) and type(meta.bytes) is int and meta.bytes >= 0,
            "'source' needs a path and a byte count",
        )
        _check(
            isinstance(meta.files, list) and all(isinstance(f, str) for f in meta.files),
            "'source.files' must list file names",
        )
        _check(
            meta.sha256 is None
            or (
                isinstance(meta.sha256, str)
                and len(meta.sha256) == 64
                and all(c in "0123456789abcdef" for c in meta.sha256)
            ),
            "'source.sha256' must be 64 hex digits",
        )
        return meta


@dataclass(frozen=True)
class GroupMeta:
    """One factored group. `ranks[k]` is None for a layer stored dense under its own name."""

    template: str
    layers: list[int]
    names: list[str]
    shape: list[int]
    dtype: str
    ranks: list[int | None]
    dense_params: int
    lors_params: int
    rel_error: float
    shared: bool = True
    layer_errors: list[float] = field(default_factory=list)
    output_error: float | None = None

    @property
    def rows_cols(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])

    def factored(self) -> Iterator[tuple[str, int]]:
        """(name, rank) of the layers stored as factors."""
        return ((name, rank) for name, rank in zip(self.names, self.ranks) if rank is not None)

    def stored_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the group owns in the file, with its shape."""
        rows, cols = self.rows_cols
        shapes = {shared_key(self.template): tuple(self.shape)} if self.shared else {}
        for name, rank in zip(self.names, self.ranks):
            if rank is None:
                shapes[name] = tuple(self.shape)
            else:
                a_key, b_key = factor_keys(name)
                shapes[a_key], shapes[b_key] = (rank, cols), (rows, rank)
        return shapes

    @classmethod
    def from_dict(cls, data) -> "GroupMeta":
        group = cls(**_fields(cls, data, "a group"))
        _check(
            isinstance(group.template, str)
            and "{i}" in group.template
            and _ints(group.layers)
            and len(group.layers) > 0,
            "a group needs a template with {i} and its layers",
        )
        n, label = len(group.layers), group.template
        _check(
            isinstance(group.names, list)
            and len(group.names) == n
            and all(isinstance(name, str) for name in group.names)
            and isinstance(group.ranks, list)
            and len(group.ranks) == n
            and all(r is None or (type(r) is int and r >= 0) for r in group.ranks),
            f"{label}: names and ranks must list each of its {n} layers",
        )
        _check(
            _ints(group.shape, low=1)
            and len(group.shape) >= 2
            and _dtype(group.dtype)
            and getattr(torch, group.dtype).is_floating_point,
            f"{label}: shape or dtype malformed",
        )
        _check(
            # 0 numbers: every layer at rank 0 without S (the weight removed), where an allocation put it
            _ints([group.dense_params], low=1) and _ints([group.lors_params]) and _number(group.rel_error),
            f"{label}: parameter counts or error malformed",
        )
        _check(type(group.shared) is bool, f"{label}: 'shared' must be true or false")
        _check(
            isinstance(group.layer_errors, list)
            and len(group.layer_errors) in (0, n)
            and all(_number(e) for e in group.layer_errors),
            f"{label}: 'layer_errors' malformed",
        )
        _check(group.output_error is None or _number(group.output_error), f"{label}: 'output_error' malformed")
        return group


@dataclass(frozen=True)
class KeptDense:
    template: str
    layers: list[int]
    reason: str

    @classmethod
    def from_dict(cls, data) -> "KeptDense":
        kept = cls(**_fields(cls, data, "a kept_dense entry"))
        _check(
            isinstance(kept.template, str) and _ints(kept.layers) and isinstance(kept.reason, str),
            "a kept_dense entry needs a template, layers and a reason",
        )
        return kept


@dataclass(frozen=True)
class LorsMeta:
    """The description stored under the `lors` metadata key."""

    source: SourceMeta
    settings: dict
    groups: list[GroupMeta]
    kept_dense: list[KeptDense] = field(default_factory=list)
    dtypes: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    calibration: dict | None = None
    finetune: dict | None = None
    tool: str = ""
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, text: str) -> "LorsMeta":
        """Parse and validate; raises SchemaError (with what is wrong) or LorsError (a newer format)."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError, TypeError) as e:
            raise SchemaError("not JSON") from e
        _check(isinstance(data, dict), "not a JSON object")
        version = data.get("format_version")
        _check(type(version) is int and version >= 1, f"format_version {version!r}")
        if version > FORMAT_VERSION:
            raise LorsError(
                f"LORS format_version {version} is newer than this tool reads ({FORMAT_VERSION}); upgrade lors-convert"
            )
        values = _fields(cls, data, "the description")
        _check(isinstance(values.get("groups"), list), "'groups' is missing or not a list")
        _check(isinstance(values.get("kept_dense", []), list), "'kept_dense' must be a list")
        _check(isinstance(values.get("settings"), dict), "'settings' is missing or not an object")
        for key in ("calibration", "finetune"):
            _check(values.get(key) is None or isinstance(values[key], dict), f"{key!r} must be an object")
        _check(isinstance(values.get("tool", ""), str), "'tool' must be a string")
        dtypes = values.get("dtypes", {})
        _check(
            isinstance(dtypes, dict) and all(isinstance(k, str) and _dtype(v) for k, v in dtypes.items()),
            "'dtypes' names something that is not a dtype",
        )
        warnings = values.get("warnings", [])
        _check(
            isinstance(warnings, list) and all(isinstance(w, str) for w in warnings),
            "'warnings' must be a list of strings",
        )
        meta = cls(
            **{
                **values,
                "source": SourceMeta.from_dict(values["source"]),
                "groups": [GroupMeta.from_dict(g) for g in values["groups"]],
                "kept_dense": [KeptDense.from_dict(k) for k in values.get("kept_dense", [])],
            }
        )
        owners: dict[str, str] = {}
        for group in meta.groups:
            for key in group.stored_shapes():
                _check(key not in owners, f"{key!r} belongs to two groups")
                owners[key] = group.template
        return meta

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    def group_keys(self) -> set[str]:
        """Every tensor name owned by a group (shared matrices, factors, layers stored dense)."""
        return {key for group in self.groups for key in group.stored_shapes()}


def header_metadata(meta: LorsMeta) -> dict[str, str]:
    """The safetensors header metadata of a LORS checkpoint."""
    return {"format": "pt", METADATA_KEY: meta.to_json()}


def read_meta(source: TensorSource, path: str | Path) -> LorsMeta | None:
    """The LORS description of an opened checkpoint, None when it has none."""
    raw = source.metadata.get(METADATA_KEY)
    if raw is None and source.path.name.endswith(".index.json"):
        index_meta = json.loads(source.path.read_text()).get("metadata")
        raw = index_meta.get(METADATA_KEY) if isinstance(index_meta, dict) else None
    if raw is None:
        return None
    try:
        return LorsMeta.from_json(raw)
    except SchemaError as e:
        raise LorsError(f"{path}: corrupt LORS metadata ({e})") from e
    except LorsError as e:
        raise LorsError(f"{path}: {e}") from e


def read_lors(path: str | Path, check: bool = True) -> tuple[TensorSource, LorsMeta]:
    """Open a LORS checkpoint and return it with its validated description (and, with `check`, refuse it when
    a factor is missing or misshapen)."""
    source = open_checkpoint(path)
    meta = read_meta(source, path)
    if meta is None:
        raise LorsError(f"{path}: not a LORS checkpoint (no '{METADATA_KEY}' metadata; convert it first)")
    problems = consistency_problems(source, meta) if check else []
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LorsError(f"{path}: damaged LORS checkpoint: {problems[0]}{more}")
    return source, meta


def refuse_lors_input(source: TensorSource, path: str | Path) -> None:
    """Converting or inspecting a LORS checkpoint would factor its factors: say what to do instead."""
    if read_meta(source, path) is not None or any(name.endswith(FACTOR_SUFFIXES) for name in source.info):
        raise LorsError(
            f"{path}: already a LORS checkpoint (or LoRA adapters); run `lors-convert expand` on it "
            "first to get the dense weights"
        )


def consistency_problems(source: TensorSource, meta: LorsMeta) -> list[str]:
    """Every tensor the metadata names must be present with the shape it implies."""
    problems = []
    for group in meta.groups:
        for key, shape in group.stored_shapes().items():
            if key not in source.info:
                problems.append(f"tensor {key!r} is missing")
            elif source.info[key].shape != shape:
                problems.append(f"{key!r} has shape {list(source.info[key].shape)}, the metadata implies {list(shape)}")
    return problems


def reconstruct(source: TensorSource | dict[str, torch.Tensor], group: GroupMeta) -> Iterator[tuple[str, torch.Tensor]]:
    """Dense float32 weights of one group, layer by layer: S + B_i A_i (or the layer stored dense) in the
    original shape (from a LORS file, or from its tensors in a dict)."""
    get = source.get
    rows, cols = group.rows_cols
    shared = get(shared_key(group.template)).float().reshape(rows, cols) if group.shared else None
    for name, rank in zip(group.names, group.ranks):
        if rank is None:
            yield name, get(name).float().reshape(group.shape)
            continue
        a_key, b_key = factor_keys(name)
        low_rank = get(b_key).float() @ get(a_key).float()
        weight = low_rank if shared is None else low_rank.add_(shared)
        yield name, weight.reshape(group.shape)


def reconstruction_errors(
    lors: TensorSource | dict[str, torch.Tensor], group: GroupMeta, original: Callable[[str], torch.Tensor]
) -> tuple[float, list[float]]:
    """The group's relative error ‖W − Ŵ‖_F / ‖W‖_F against the original weights, and each layer's."""
    err_total = norm_total = 0.0
    layer_errors = []
    for name, weight in reconstruct(lors, group):
        dense = original(name).float().reshape(weight.shape)
        err, norm = (dense - weight).square().sum().item(), dense.square().sum().item()
        err_total, norm_total = err_total + err, norm_total + norm
        layer_errors.append(rel_error(err, norm))
    return rel_error(err_total, norm_total), layer_errors


def dense_layout(source: TensorSource, meta: LorsMeta) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of what `expand` yields, in its order."""
    owned = meta.group_keys()
    layout = [
        (name, getattr(torch, meta.dtypes[name]) if name in meta.dtypes else info.dtype, info.shape)
        for name, info in source.info.items()
        if name not in owned
    ]
    return layout + [(name, getattr(torch, g.dtype), tuple(g.shape)) for g in meta.groups for name in g.names]


def expand(source: TensorSource, meta: LorsMeta) -> Iterator[tuple[str, torch.Tensor]]:
    """The dense state dict again: original names, shapes and dtypes."""
    owned = meta.group_keys()
    for name in source.info:
        if name not in owned:
            tensor = source.get(name)
            yield name, tensor.to(getattr(torch, meta.dtypes[name])) if name in meta.dtypes else tensor
    for group in meta.groups:
        dtype = getattr(torch, group.dtype)
        for name, weight in reconstruct(source, group):
            yield name, weight.to(dtype)
