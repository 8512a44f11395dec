"""Calibration: run the original model over sample inputs and accumulate each stacked layer's input second
moment C_i = X_iᵀX_i (float64, streaming), so residuals can be factored where the inputs actually live."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lors_convert import LorsError
from lors_convert.nn import is_conv1d, is_swappable, state_prefix
from lors_convert.stacks import Stack


@dataclass
class Calibration:
    covariances: dict[str, torch.Tensor]  # tensor name -> C (input dim x input dim, float64, on CPU)
    transposed: set[str]  # names stored as in x out (GPT-2 Conv1D): their input side is dim 0
    tokens: int


def _module_for(model: nn.Module, name: str, prefix: str) -> nn.Module | None:
    """The Linear (or GPT-2 Conv1D) module whose `.weight` is this tensor, if any."""
    if not name.endswith(".weight"):
        return None
    try:
        module = model.get_submodule(prefix + name.removesuffix(".weight"))
    except AttributeError:
        return None
    return module if is_swappable(module) else None


def text_batches(tokenizer, files: list[Path], samples: int, max_length: int, seed: int) -> list[dict]:
    """One unpadded sequence per batch, so padding never enters the statistics."""
    from lors_convert.hf import read_lines

    lines = read_lines(files)
    random.Random(seed).shuffle(lines)
    return [dict(tokenizer(line, return_tensors="pt", truncation=True, max_length=max_length))
            for line in lines[:samples]]


def tensor_batches(files: list[Path], samples: int) -> list[dict]:
    """Inputs for --model-factory models: a safetensors/pt file of tensors whose first dimension is the batch."""
    from lors_convert.checkpoint import open_checkpoint

    batches: list[dict] = []
    for file in files:
        source = open_checkpoint(file)
        inputs = {name: source.get(name) for name in source.info}
        count = min(len(t) for t in inputs.values())
        batches += [{k: v[i:i + 1] for k, v in inputs.items()} for i in range(count)]
    return batches[:samples]


def run_model(model: nn.Module, batch: dict):
    return model(**batch) if len(batch) > 1 or "input_ids" in batch else model(*batch.values())


@torch.no_grad()
def collect(model: nn.Module, stacks: list[Stack], batches: list[dict], device: torch.device) -> Calibration:
    """Hook every stacked Linear/Conv1D, run the batches, and return C_i per tensor name."""
    covariances, transposed, hooks = {}, set(), []

    def accumulate(name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            covariances[name] = covariances.get(name, 0) + (x.T @ x).double()  # float64 across batches
        return hook

    prefix = state_prefix(model, [name for stack in stacks for name in stack.names])
    for stack in stacks:
        found = [_module_for(model, name, prefix) for name in stack.names]
        if any(module is None for module in found):
            continue  # calibrate whole groups only; this one stays in weight space
        for name, module in zip(stack.names, found):
            hooks.append(module.register_forward_pre_hook(accumulate(name)))
            if is_conv1d(module):  # y = x @ W + b: the input side is dim 0
                transposed.add(name)
    if not hooks:
        raise LorsError("calibration found no stacked nn.Linear layers in the model to measure")
    model.to(device).eval()
    tokens = 0
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            run_model(model, batch)
            tokens += next(iter(batch.values())).numel()
    finally:
        for hook in hooks:
            hook.remove()
    return Calibration({k: v.cpu() for k, v in covariances.items()}, transposed, tokens)
