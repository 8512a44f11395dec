"""A model whose blocks' weights stay in the checkpoint until the block runs: each block reads its tensors (in
float32 or the dtype asked for, on the device of its input; as stored under autocast to their own dtype) just
before its forward and drops them after, so a forward of the whole model holds one block's weights, not the
model's. Everything outside the blocks (embeddings, final norm, head, LORS shared matrices) is read once and stays.
This is what lets calibration and evaluation of a model larger than memory run."""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from lors_convert.checkpoint import TensorSource

OFFLOADED = "_lors_offloaded"  # the attribute a block's offloading state lives under


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory) and their buffers for real:
    buffers computed at construction (rotary frequencies) are not in a checkpoint."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _slot(module: nn.Module, path: str) -> tuple[dict, str, bool]:
    """The table (parameters or buffers) holding the tensor at `path` under `module`, its key, and whether it is
    the parameters'."""
    owner, _, leaf = path.rpartition(".")
    owner_module = module.get_submodule(owner) if owner else module
    is_parameter = leaf in owner_module._parameters
    return (owner_module._parameters if is_parameter else owner_module._buffers), leaf, is_parameter


def _set(module: nn.Module, path: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in the place of the parameter or buffer at `path`, in that one's shape (a LORS file stores
    a shared matrix in the group's layer shape)."""
    table, leaf, is_parameter = _slot(module, path)
    tensor = tensor.reshape(table[leaf].shape) if table.get(leaf) is not None else tensor
    table[leaf] = nn.Parameter(tensor, requires_grad=False) if is_parameter else tensor


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A floating tensor in `dtype`; integer ones (position ids) as they are."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def offload_blocks(
    model: nn.Module, source: TensorSource, own: dict[str, str], blocks: list[str], dtype: torch.dtype = torch.float32
) -> list[str]:
    """Fill a model built under parameters_on_meta from `source` (`own`: checkpoint name -> the model's name):
    the tensors under the module paths `blocks` are read when their block runs, the others now, all in `dtype`.
    Returns the model's tensors the checkpoint has nothing for (the model cannot run offloaded then)."""
    prefixes = tuple(f"{path}." for path in blocks)
    lazy: dict[str, dict[str, tuple[TensorSource, str]]] = {path: {} for path in blocks}
    for name, target in own.items():
        if target.startswith(prefixes):
            path = next(p for p in blocks if target.startswith(f"{p}."))
            lazy[path][target.removeprefix(f"{path}.")] = (source, name)
        else:
            _set(model, target, _as(source.get(name), dtype))
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # a tied head takes the embedding just read
    for path, names in lazy.items():
        block = model.get_submodule(path)
        # names: each tensor's local path -> where it is read from (a source and its name there)
        setattr(block, OFFLOADED, {"names": names, "holders": 0, "dtype": dtype})
        block.register_forward_pre_hook(_onload_hook, with_kwargs=True)
        # always: a hook inside the block may stop the forward (calibration's StopForward)
        block.register_forward_hook(_offload_hook, with_kwargs=True, always_call=True)
        block._apply = types.MethodType(_apply_to_held, block)
    waiting = {f"{path}.{local}" for path, names in lazy.items() for local in names}
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, t in tensors if t.device.type == "meta" and name not in waiting]


def _onload(block: nn.Module, device: torch.device) -> None:
    state = getattr(block, OFFLOADED)
    if state["holders"] == 0:
        # under autocast to the checkpoint's own dtype (bf16 passes on a CPU that multiplies bf16) the products
        # would round float32 matrices back to what is stored: they are read as stored, at half the cost (norms'
        # weights, which some kernels want in float32 beside float32 inputs, are not)
        autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
        for local, (source, name) in state["names"].items():
            info = source.info[name]
            as_stored = info.dtype == autocast and len(info.shape) >= 2
            _set(block, local, _as(source.get(name), info.dtype if as_stored else state["dtype"]).to(device))
    state["holders"] += 1


def _offload(block: nn.Module) -> None:
    state = getattr(block, OFFLOADED)
    if state["holders"] == 0:  # a forward stopped before the block was read
        return
    state["holders"] -= 1
    if state["holders"] == 0:
        for local in state["names"]:
            table, leaf, _ = _slot(block, local)
            kept = table[leaf]
            empty = torch.empty(kept.shape, dtype=kept.dtype, device="meta")
            table[leaf] = nn.Parameter(empty, requires_grad=False) if isinstance(kept, nn.Parameter) else empty


def _apply_to_held(block: nn.Module, fn, recurse: bool = True) -> nn.Module:
    """Module._apply (`.to`, `.float`, `.cuda`) for the tensors the block holds now: the others are on the meta
    device until it runs, and come in float32 on the device of its input."""
    return nn.Module._apply(block, lambda t: t if t.is_meta else fn(t), recurse)


def _device_of(args: tuple, kwargs: dict) -> torch.device:
    found = [v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor)]
    return found[0].device if found else torch.device("cpu")


def _onload_hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
    _onload(block, _device_of(args, kwargs))


def _offload_hook(block: nn.Module, args: tuple, kwargs: dict, output) -> None:
    _offload(block)


def _offloading_block(model: nn.Module, path: str) -> tuple[str, nn.Module] | None:
    """The offloaded block holding the tensor at `path` (the model's name) and its path, if one does."""
    for block_path, block in model.named_modules():
        if hasattr(block, OFFLOADED) and path.startswith(f"{block_path}."):
            return block_path, block
    return None


@contextmanager
def replaced(model: nn.Module, source: TensorSource, names: dict[str, str]) -> Iterator[None]:
    """The model's parameters at these paths (its own names) replaced by `source`'s tensors of the given names
    while inside, restored on exit. An offloaded block reads its replacements from `source` when it runs, as it
    reads its other tensors from the checkpoint, so memory holds one block's, not all of them; any other
    parameter is read now. (A weight swapped into an offloaded block would be overwritten by the checkpoint's.)"""
    restore = []
    try:
        for path, name in names.items():
            found = _offloading_block(model, path)
            if found:
                block_path, block = found
                lazy, local = getattr(block, OFFLOADED)["names"], path.removeprefix(f"{block_path}.")
                restore.append((lazy, local, lazy[local]))
                lazy[local] = (source, name)
                continue
            table, leaf, _ = _slot(model, path)
            kept = table[leaf]
            restore.append((table, leaf, kept))
            table[leaf] = nn.Parameter(source.get(name).reshape(kept.shape).to(kept.device, kept.dtype), False)
        yield
    finally:
        for table, key, kept in reversed(restore):
            table[key] = kept


@contextmanager
def held(block: nn.Module, device: torch.device) -> Iterator[None]:
    """An offloaded block's weights kept in memory while it runs many times (a sweep over the batches); nothing
    for any other module."""
    if not hasattr(block, OFFLOADED):
        yield
        return
    _onload(block, device)
    try:
        yield
    finally:
        _offload(block)
