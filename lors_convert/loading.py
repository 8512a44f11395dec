"""Using a LORS checkpoint as a model: `load` builds the source's own model class with its stacked layers as LORS
modules, `save` writes a LORS checkpoint back from such a model; checkpoint names against the model's own and the
swaps that put LorsLinear where the stacked layers were.

Hugging Face models load through `from_pretrained` itself, so tied weights, buffers the checkpoint does not hold,
dtypes and the meta-device build are transformers' business. The model class is a subclass of the source's
(`LorsBertModel` is a `BertModel`) whose `__init__` swaps the stacked layers for `LorsLinear` before the weights
arrive: memory never holds a dense copy of them. Each group's shared matrix is one Parameter, held once by the
model under `lors_shared.<group>`, so `sum(p.numel() for p in model.parameters())` counts what the file stores.

Checkpoint names and the model's own names can differ (transformers 5 renames ViT's `attention.attention.query`
to `attention.q_proj` when it loads); the mapping is transformers' own (hf.checkpoint_names), so a later rename is
picked up without a change here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lors_convert import LorsError
from lors_convert.checkpoint import TensorSource, check_output_path, gguf_file, write_safetensors
from lors_convert.hf import (
    _transformers,
    architecture_dir,
    auto_config,
    checkpoint_names,
    dense_model,
    model_class,
    one_line,
    open_source,
)
from lors_convert.lors_format import GroupMeta, LorsMeta, factor_keys, header_metadata, read_lors, shared_key
from lors_convert.lors_modeling import SHARED_ATTRIBUTE, install_lors, lors_model_class
from lors_convert.nn import is_conv1d, is_swappable
from lors_convert.offload import offload_blocks, parameters_on_meta
from lors_convert.stacks import find_stacks, is_index


@dataclasses.dataclass(frozen=True)
class CheckpointLayout:
    """What `save` needs to write a loaded model back: its description, where each checkpoint tensor lives in the
    model, and the dtype the file stored it in."""

    meta: LorsMeta
    own_name: dict[str, str]
    swaps: list[Swap]
    dtypes: dict[str, torch.dtype]


@dataclasses.dataclass(frozen=True)
class Swap:
    """One stacked layer that runs as LorsLinear: where it lives in the model and what it holds."""

    path: str  # the module path in the model
    group: int  # index into the LORS description's groups
    name: str  # the checkpoint name of its weight
    rank: int
    rows: int
    cols: int
    transposed: bool


def lors_description(swaps: list[Swap], groups: list[GroupMeta]) -> dict:
    """What lors_modeling.install_lors needs, as plain JSON (it goes into an exported folder's config.json)."""
    used = {swap.group for swap in swaps}
    return {
        "swaps": [
            {
                "path": s.path,
                "group": s.group,
                "rank": s.rank,
                "rows": s.rows,
                "cols": s.cols,
                "transposed": s.transposed,
            }
            for s in swaps
        ],
        "shared": {str(g): list(group.rows_cols) for g, group in enumerate(groups) if group.shared and g in used},
    }


def group_used(group: int, swaps: list[Swap]) -> bool:
    return any(s.group == group for s in swaps)


# ---------------------------------------------------------------- names


def resolve(names: list[str], mapping: dict[str, str], prefix: str) -> dict[str, str]:
    """The model's name for each checkpoint name, with the base model's prefix added or dropped when the
    checkpoint was saved from the bare base model (or the model is one)."""
    resolved = {}
    for name in names:
        for candidate in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
            if candidate in mapping:
                resolved[name] = mapping[candidate]
                break
    return resolved


def own_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """The model's own name for each checkpoint tensor name it has a place for."""
    return resolve(names, checkpoint_names(model), getattr(model, "base_model_prefix", ""))


def layer_module(model: nn.Module, name: str, own: dict[str, str]) -> tuple[str, nn.Module] | None:
    """(path, module) of the Linear or GPT-2 Conv1D whose weight a checkpoint tensor is, if any."""
    target = own.get(name, "")
    if not target.endswith(".weight"):
        return None
    path = target.removesuffix(".weight")
    module = model.get_submodule(path)
    return (path, module) if is_swappable(module) else None


def block_paths(model: nn.Module, meta: LorsMeta) -> list[str]:
    """Module paths of the blocks holding stacked layers (`encoder.layer.3` for template `encoder.layer.{i}.…`, in
    the model's own names), in layer order."""
    loaded = getattr(model, "lors", None)  # a LORS model no longer holds its stacked weights under their names
    own = (
        loaded.own_name
        if isinstance(loaded, CheckpointLayout)
        else own_names(model, [n for g in meta.groups for n in g.names])
    )
    paths = {block_path(own.get(name, name), group.template) for group in meta.groups for name in group.names}
    return sorted(paths, key=lambda p: [int(s) if s.isdigit() else s for s in p.split(".")])


def block_path(name: str, template: str) -> str:
    """`name` up to its index segment in the template's `{i}` place, counted among the index segments (Swin's
    `layers.1.blocks.{i}.…` is the second), so a prefix added or a rename inside the block does not move it."""
    before = template.split("{i}")[0].split(".")
    ordinal = sum(is_index(part) for part in before)
    parts = name.split(".")
    indices = [k for k, part in enumerate(parts) if is_index(part)] + [len(parts) - 1]
    return ".".join(parts[: indices[min(ordinal, len(indices) - 1)] + 1])


def swaps_for(model: nn.Module, meta: LorsMeta, own_name: dict[str, str]) -> list[Swap]:
    swaps = []
    for g, group in enumerate(meta.groups):
        rows, cols = group.rows_cols
        for name, rank in group.factored():
            target = own_name.get(name)
            if target is None or not target.endswith(".weight"):
                raise LorsError(f"{name}: no such layer in {type(model).__name__}; is this the model it came from?")
            path = target.removesuffix(".weight")
            module = model.get_submodule(path)
            if not is_swappable(module):
                raise LorsError(
                    f"{name}: a {type(module).__name__} cannot run in LORS form (only Linear and GPT-2 Conv1D); "
                    "convert with --exclude for this group"
                )
            transposed = is_conv1d(module)
            if tuple(module.weight.shape) != (rows, cols):
                raise LorsError(
                    f"{name}: the model's weight is {list(module.weight.shape)}, the group's {[rows, cols]}"
                )
            swaps.append(Swap(path, g, name, rank, rows, cols, transposed))  # the stored layout, as in the file
    return swaps


def lors_names(source: TensorSource, meta: LorsMeta, own_name: dict[str, str], swaps: list[Swap]) -> dict[str, str]:
    """{the LORS file's tensor name: the model's own name for it}: factors as `<layer>.lora_A`/`.lora_B`, shared
    matrices as `lors_shared.<group>`, everything else under the model's name for the original tensor."""
    factored = {swap.name: swap for swap in swaps}
    owned = meta.group_keys()
    names = {name: own_name.get(name, name) for name in source.info if name not in owned}
    for g, group in enumerate(meta.groups):
        if group.shared and group_used(g, swaps):
            names[shared_key(group.template)] = f"{SHARED_ATTRIBUTE}.{g}"
        for name, rank in zip(group.names, group.ranks):
            if rank is None:
                names[name] = own_name.get(name, name)
                continue
            a_key, b_key = factor_keys(name)
            names[a_key], names[b_key] = f"{factored[name].path}.lora_A", f"{factored[name].path}.lora_B"
    return names


def lors_state_dict(source: TensorSource, meta: LorsMeta, own_name: dict[str, str], swaps: list[Swap]) -> dict:
    """The LORS file's tensors under the model's own names (lors_names), every one read into memory here: loading
    holds the whole file's tensors at once (the LORS tensors, not a dense copy of the stacked layers)."""
    state = {own: source.get(key) for key, own in lors_names(source, meta, own_name, swaps).items()}
    for g, group in enumerate(meta.groups):
        shared = f"{SHARED_ATTRIBUTE}.{g}"
        if shared in state:
            state[shared] = state[shared].reshape(group.rows_cols)
    return state


# ---------------------------------------------------------------- load


def architecture_folder(meta: LorsMeta, architecture) -> Path | None:
    """The Hugging Face folder (or GGUF file) describing the model: given, or the one the LORS file was converted
    from."""
    candidates = [Path(architecture)] if isinstance(architecture, (str, Path)) else []
    if architecture is None:
        source = Path(meta.source.path)
        candidates = [source, source.parent]
    if candidates and gguf_file(candidates[0]) is not None:
        return gguf_file(candidates[0])
    for folder in candidates:
        if folder.is_file() and folder.name == "config.json":
            folder = folder.parent
        if (folder / "config.json").is_file():
            return folder
    return None


def load(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    architecture=None,
    offload: bool = False,
) -> nn.Module:
    """The model of a LORS checkpoint, ready to run: its stacked Linear/Conv1D layers are LorsLinear modules.

    `architecture`: a Hugging Face folder (or its config.json, or a `PretrainedConfig`), a GGUF file, or a callable
    returning the model (plain PyTorch); by default the folder or GGUF the checkpoint was converted from. The model
    is in eval mode, float32 unless `dtype` says otherwise, on `device`. Every tensor of the file is read before the
    model takes them (not lazily): peak memory is about the file's tensors plus the model. With `offload` (Hugging
    Face architectures), each block's tensors stay in the file until the block runs and are dropped after it:
    memory holds the shared matrices, what lies outside the blocks, and one block (inference only).
    """
    source, meta = read_lors(path)
    if callable(architecture) and not isinstance(architecture, (str, Path)) and not is_config(architecture):
        if offload:
            raise LorsError("offload=True needs a Hugging Face architecture (a folder, config or GGUF)")
        model, own_name, swaps = load_plain(architecture, source, meta)
    else:
        config = architecture if is_config(architecture) else None
        folder = None if config is not None else architecture_folder(meta, architecture)
        if config is None and folder is None:
            raise LorsError(
                f"{path}: cannot tell the architecture (no config.json at {meta.source.path} or given); pass "
                "architecture= a Hugging Face folder or config, or a function building the model"
            )
        model, own_name, swaps = load_hf(config or folder, source, meta, (dtype or torch.float32) if offload else None)
    model.lors = CheckpointLayout(meta, own_name, swaps, {name: info.dtype for name, info in source.info.items()})
    return model.to(device=device, dtype=dtype or torch.float32).eval()


def can_offload(source: TensorSource, factory: str | None = None) -> bool:
    """Whether offloaded_dense_model can keep the blocks of this source in its files: safetensors under a Hugging
    Face folder (transformers dequantizes a GGUF whole; --model-factory models are built whole)."""
    folder = architecture_dir(source.path)
    plain = folder is not None and gguf_file(folder) is None and not factory
    return plain and all(str(file).endswith(".safetensors") for file in source.files)


def offloaded_dense_model(source_path: Path, factory: str | None = None) -> nn.Module:
    """The dense original in float32 (hf.dense_model), its blocks offloaded where it can be: a Hugging Face
    folder of safetensors whose stacked layers sit in blocks and whose every tensor the checkpoint holds. A GGUF
    (transformers dequantizes it whole) and --model-factory models are built whole."""
    source = open_source(source_path)
    folder = architecture_dir(source_path)
    if not can_offload(source, factory):
        return dense_model(source_path, factory)
    config = auto_config(folder)
    try:
        with parameters_on_meta():
            model = model_class(config, set(source.info))(config)
    except Exception as e:
        raise LorsError(f"{folder / 'config.json'}: cannot build the model it describes ({one_line(e)})") from e
    own = own_names(model, list(source.info))
    stacks = find_stacks(source.info)[0]
    blocks = sorted({block_path(own[n], s.template) for s in stacks for n in s.names if n in own})
    if not blocks or offload_blocks(model, source, own, blocks):
        return dense_model(source_path, factory)
    return model.eval().requires_grad_(False)


def is_config(value) -> bool:
    return type(value).__name__.endswith("Config") and hasattr(value, "to_dict")


def load_hf(architecture, source: TensorSource, meta: LorsMeta, offload: torch.dtype | None = None) -> nn.Module:
    """The LORS model of a Hugging Face architecture, with every tensor of the file; with `offload` (a dtype), the
    blocks' tensors read as their block runs (offload.py), in that dtype."""
    transformers = _transformers()
    config = architecture if is_config(architecture) else auto_config(architecture)
    try:
        cls = model_class(config, set(source.info))
        with torch.device("meta"):
            skeleton = cls(config)
    except Exception as e:
        raise LorsError(f"{architecture}: cannot build the model its config describes ({one_line(e)})") from e
    own_name = own_names(skeleton, list(source.info) + [n for g in meta.groups for n in g.names])
    swaps = swaps_for(skeleton, meta, own_name)
    config.lors = lors_description(swaps, meta.groups)
    if offload is not None:
        with parameters_on_meta():
            model = lors_model_class(cls)(config)
        blocks = sorted({block_path(own_name.get(n, n), g.template) for g in meta.groups for n in g.names})
        missing = offload_blocks(model, source, lors_names(source, meta, own_name, swaps), blocks, offload)
        if missing:
            raise LorsError(f"{source.path}: cannot offload {cls.__name__}: the file has no {missing[0]!r}")
        return model, own_name, swaps
    state = lors_state_dict(source, meta, own_name, swaps)
    dtype_option = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
    model, info = lors_model_class(cls).from_pretrained(
        None, config=config, state_dict=state, output_loading_info=True, **dtype_option
    )
    tensors = model.state_dict(keep_vars=True)
    loaded = {id(tensors[k]) for k in tensors if k not in info.get("missing_keys", [])}
    missing = [k for k in info.get("missing_keys", []) if id(tensors.get(k)) not in loaded]  # not tied to a loaded one
    problems = missing or list(info.get("unexpected_keys", [])) or list(info.get("mismatched_keys", []))
    if problems:
        raise LorsError(
            f"{source.path}: its tensors do not fit {cls.__name__} ({len(missing)} missing, "
            f"{len(info.get('unexpected_keys', []))} unexpected, e.g. {sorted(map(str, problems))[0]!r})"
        )
    return model, own_name, swaps


def load_plain(build: Callable[[], nn.Module], source: TensorSource, meta: LorsMeta):
    """A plain PyTorch model from a function: built on the meta device when all its state is in the checkpoint
    (no dense copy of anything), else on the CPU."""
    for device in ("meta", "cpu"):
        with torch.device(device):
            model = build()
        if not isinstance(model, nn.Module):
            raise LorsError(f"the architecture function returned a {type(model).__name__}, not a torch.nn.Module")
        own_name = own_names(model, list(source.info) + [n for g in meta.groups for n in g.names])
        swaps = swaps_for(model, meta, own_name)
        install_lors(model, lors_description(swaps, meta.groups))
        state = lors_state_dict(source, meta, own_name, swaps)
        expected = set(model.state_dict())
        if device == "meta" and expected - set(state):
            continue  # buffers the checkpoint does not hold need the model's own initialisation
        result = model.load_state_dict(state, strict=False, assign=device == "meta")
        if result.missing_keys or result.unexpected_keys:
            example = (result.missing_keys or result.unexpected_keys)[0]
            raise LorsError(f"{source.path}: its tensors do not fit the model (e.g. {example!r})")
        return model, own_name, swaps
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- save


def save(model: nn.Module, path: str | Path, *, force: bool = False) -> list[Path]:
    """Write a LORS checkpoint from a model `load` returned (trained or not): the same tensor names, ranks and
    dtypes as the checkpoint it came from, so loading what this writes gives the model back exactly. The errors
    recorded are the conversion's; `lors-convert verify --source` recomputes them against the original."""
    loaded: CheckpointLayout | None = getattr(model, "lors", None)
    if not isinstance(loaded, CheckpointLayout):
        raise LorsError("this model was not made by lors_convert.load (it carries no LORS description)")
    tensors = checkpoint_tensors(model, loaded)
    path = Path(path)
    check_output_path(path, [], force)
    return write_safetensors(path, tensors, header_metadata(loaded.meta))


def checkpoint_tensors(
    model: nn.Module, loaded: CheckpointLayout, state: dict | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint the model was loaded from, read from the model (or from `state`, its state
    dict gathered in full when FSDP shards it), in the file's dtype."""
    state = model.state_dict() if state is None else state
    state = {**dict(model.named_buffers()), **state}  # buffers a class stopped persisting too
    own = dict(loaded.own_name)
    for g, group in enumerate(loaded.meta.groups):
        if group.shared:
            own[shared_key(group.template)] = f"{SHARED_ATTRIBUTE}.{g}"
    for swap in loaded.swaps:
        a_key, b_key = factor_keys(swap.name)
        own[a_key], own[b_key] = f"{swap.path}.lora_A", f"{swap.path}.lora_B"
    out = {}
    for name, dtype in loaded.dtypes.items():
        tensor = state.get(own.get(name, name))
        if tensor is None:
            raise LorsError(f"{name}: the model no longer holds it")
        out[name] = tensor.detach().to("cpu", dtype).reshape(loaded_shape(loaded, name, tensor)).contiguous()
    return out


def loaded_shape(loaded: CheckpointLayout, name: str, tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape the file stores a tensor in (a shared matrix is kept 2-D in the model)."""
    for group in loaded.meta.groups:
        if name == shared_key(group.template):
            return tuple(group.shape)
    return tuple(tensor.shape)
