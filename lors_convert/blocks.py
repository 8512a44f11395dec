"""The chain of blocks a model runs (a decoder's layers, an encoder's): finding it, block 0's inputs on each
batch, and running a model only as far as the modules of interest. A chain's blocks can be run one at a time on
the previous block's outputs, which bounds calibration's memory by one block."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from lors_convert.loading import block_path, own_names
from lors_convert.runtime import call_model
from lors_convert.stacks import Stack


class StopForward(Exception):
    """Raised by a hook once every module of interest has seen its input: the rest of the forward is not needed."""


def run_until_seen(model: nn.Module, batch: dict) -> None:
    try:
        call_model(model, batch)
    except StopForward:
        pass


# block 0's inputs per batch, the blocks, and the path of their list in the model
Chain = tuple[list[tuple[tuple, dict]], list[nn.Module], str]


def first_tensor(output) -> torch.Tensor | None:
    """A block's hidden states: its output, or the first of a tuple of outputs."""
    if type(output) in (tuple, list) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


def block_chain(
    original: nn.Module, stacks: list[Stack], batches: list[dict], device: torch.device
) -> tuple[Chain | None, str]:
    """The blocks holding the stacks' layers, and block 0's inputs on each batch, when they make a chain: one
    list P.0, P.1, ... (block k holding the layers of index k) that the model runs once each, in order, each on
    the previous one's output, with the same other inputs (masks, positions) and no state (caches) for all.
    Then each block's inputs follow from block 0's, in either model, and the blocks can be run one at a time.
    Otherwise (None, why): a residual path around the blocks, decoder blocks reading an encoder's outputs,
    a cache, two lists of blocks. Checked on the first batch, by running the original model once."""
    own = own_names(original, [name for stack in stacks for name in stack.names])
    paths = {
        block_path(own[name], stack.template): index
        for stack in stacks
        for index, name in zip(stack.layers, stack.names)
    }
    lists = sorted({path.rpartition(".")[0] for path in paths})
    if len(lists) != 1:
        return None, f"its stacked layers sit in {len(lists)} lists of blocks ({', '.join(lists)})"
    if any(path.rpartition(".")[2] != str(index) for path, index in paths.items()):
        return None, f"the layer numbers are not the positions of the blocks in {lists[0]}"
    container = original.get_submodule(lists[0])
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        return None, f"{lists[0]} is a {type(container).__name__}, not a ModuleList"
    blocks = list(container)
    with _without_kv_cache(original):
        why = _chain_breaks(original, blocks, lists[0], {k: v.to(device) for k, v in batches[0].items()})
        if why:
            return None, why
        inputs = []

        def keep(module, args, kwargs):
            inputs.append((args, kwargs))
            raise StopForward

        hook = blocks[0].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            for batch in batches:
                run_until_seen(original, {k: v.to(device) for k, v in batch.items()})
        finally:
            hook.remove()
    if len(inputs) != len(batches):
        return None, f"{lists[0]}.0 did not run on every batch"
    return (inputs, blocks, lists[0]), ""


@contextmanager
def _without_kv_cache(model: nn.Module) -> Iterator[None]:
    """A transformers model that builds no KV cache: blocks handed a cache object are not a chain, and one
    forward does not need it."""
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", False)
    if cached:
        config.use_cache = False
    try:
        yield
    finally:
        if cached:
            config.use_cache = cached


@torch.no_grad()
def _chain_breaks(model: nn.Module, blocks: list[nn.Module], where: str, batch: dict) -> str:
    """Why `blocks` are not a chain on this batch (block_chain), or "" when they are."""
    calls = []  # (block, its args, kwargs and output as they were when it ran, whether it changed its inputs)

    def hooks(k: int) -> list:
        def before(module, args, kwargs):
            calls.append([k, _snapshot(args), _snapshot(kwargs), None, False])

        def after(module, args, kwargs, output):
            calls[-1][3] = _snapshot(output)
            calls[-1][4] = not (_same(args, calls[-1][1]) and _same(kwargs, calls[-1][2]))

        block = blocks[k]
        return [
            block.register_forward_pre_hook(before, with_kwargs=True),
            block.register_forward_hook(after, with_kwargs=True),
        ]

    handles = [handle for k in range(len(blocks)) for handle in hooks(k)]
    try:
        call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    if [call[0] for call in calls] != list(range(len(blocks))):
        return f"the model does not run {where}.0 to {where}.{len(blocks) - 1} once each, in order"
    for k, args, kwargs, output, changed in calls:
        odd = _odd_type((args, kwargs, output))
        if odd:
            return f"{where}.{k} takes or returns an object of type {odd}"
        if not args or not isinstance(args[0], torch.Tensor):
            return f"{where}.{k} takes no tensor as its first positional input"
        if first_tensor(output) is None:
            return f"{where}.{k} returns no tensor first"
        if changed:
            return f"{where}.{k} changes its inputs in place"
        if k and not _same(args[0], first_tensor(calls[k - 1][3])):
            return f"{where}.{k}'s input is not {where}.{k - 1}'s output (a path around the blocks?)"
        if k and not _same((args[1:], kwargs), (calls[0][1][1:], calls[0][2])):
            return f"{where}.{k}'s other inputs differ from {where}.0's"
    return ""


PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _snapshot(value):
    """A copy of tensors (nested in tuples, lists and dicts) as they are now; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if type(value) in (tuple, list):
        return type(value)(map(_snapshot, value))
    if type(value) is dict:
        return {k: _snapshot(v) for k, v in value.items()}
    return value


def _odd_type(value) -> str:
    """The name of a type nested in `value` other than tensors, plain values, tuples, lists and dicts, or ""."""
    if isinstance(value, (torch.Tensor, *PLAIN)):
        return ""
    if type(value) in (tuple, list):
        return next(filter(None, map(_odd_type, value)), "")
    if type(value) is dict:
        return next(filter(None, map(_odd_type, value.values())), "")
    return type(value).__name__


def _same(a, b) -> bool:
    """Equal values, tensors included (same shape, dtype, device and elements)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
            and torch.equal(a, b)
        )
    if type(a) in (tuple, list):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if type(a) is dict:
        return type(b) is dict and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b
