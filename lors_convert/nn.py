"""Runtime LORS modules: swap a model's stacked Linear / GPT-2 Conv1D modules for ones computing with
S + B_i A_i, one shared nn.Parameter per group, and merge them back to plain modules.

Plain PyTorch; the model comes from `hf.py` (or --model-factory) with the dense architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lors_convert import LorsError
from lors_convert.checkpoint import TensorSource
from lors_convert.lors_format import LorsMeta, expand, factor_keys, shared_key


class LorsLinear(nn.Module):
    """y = x Wᵀ + b with W = S + B A (nn.Linear layout: S out×in, B out×r, A r×in), or, for GPT-2's Conv1D
    (`transposed`, weights stored in×out), y = x W + b with S in×out, B in×r, A r×out.

    The weight is materialised before the matmul rather than computing x·Sᵀ + (x·Aᵀ)·Bᵀ. Measured with
    scripts/bench_lors_forward.py (forward + backward of one layer, MiniLM shapes 384x384 r96, 1536x384 and
    384x1536 r160, float32, 2-core shared CPU): at 8192 tokens per batch materialised took 0.92-1.20x the
    dense layer's time and factored 1.43-1.60x; at 2048 tokens 0.91-1.37x against 1.00-1.82x. B A costs
    out·in·r flops once per step, while the factored form pays N·r·(out + in) for each of N tokens and
    two more thin matmuls in the backward. Only with a few tokens (16: decoding) was factored ahead;
    fine-tuning batches are far above that.
    """

    def __init__(
        self,
        shared: tuple[nn.ParameterDict, str] | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        bias: nn.Parameter | None,
        transposed: bool = False,
    ):
        super().__init__()
        # Where the group's one shared Parameter lives: (the model's lors_shared dict, the group's key), or None for
        # --shared none. Looked up at each use, so it stays right when loading replaces the Parameter; a tuple keeps
        # nn.Module from registering the dict here again.
        self._shared = shared
        self.lora_A = nn.Parameter(lora_a)
        self.lora_B = nn.Parameter(lora_b)
        self.bias = bias
        self.transposed = transposed

    @property
    def shared(self) -> nn.Parameter | None:
        if self._shared is None:
            return None
        holder, key = self._shared
        return holder[key]

    def weight(self) -> torch.Tensor:
        if self.shared is None:
            return self.lora_B @ self.lora_A
        return torch.addmm(self.shared, self.lora_B, self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight()
        return F.linear(x, weight.t() if self.transposed else weight, self.bias)

    def extra_repr(self) -> str:
        rows, cols = self.lora_B.shape[0], self.lora_A.shape[1]
        rank = self.lora_A.shape[0]
        return f"{rows}x{cols}, shared={self.shared is not None}, rank={rank}, transposed={self.transposed}"


def module_of(name: str, model: nn.Module, prefix: str) -> tuple[str, nn.Module]:
    """The module whose `.weight` a checkpoint tensor is, refusing anything we cannot swap."""
    if not name.endswith(".weight"):
        raise LorsError(f"{name}: only Linear/Conv1D weights can run in LORS form; expand this group first")
    path = prefix + name.removesuffix(".weight")
    try:
        module = model.get_submodule(path)
    except AttributeError as e:
        raise LorsError(f"{name}: no module {path!r} in the architecture") from e
    if not is_swappable(module):
        raise LorsError(
            f"{name}: a {type(module).__name__} cannot run in LORS form (only Linear and GPT-2 "
            "Conv1D); convert with --exclude for this group"
        )
    return path, module


def is_swappable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transformers.pytorch_utils.Conv1D (a Linear with its weight stored in×out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def state_prefix(model: nn.Module, names: list[str]) -> str:
    """'' if the checkpoint's names are the model's, else the model's base prefix (bare encoder → with head)."""
    own = set(model.state_dict())
    if any(n in own for n in names):
        return ""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and any(f"{prefix}.{n}" in own for n in names):
        return prefix + "."
    raise LorsError("the checkpoint's tensor names do not match the architecture's")


def to_lors(model: nn.Module, source: TensorSource, meta: LorsMeta) -> nn.Module:
    """Load a LORS checkpoint into a dense-architecture model: stacked modules become LorsLinear sharing one
    float32 Parameter per group; every other tensor is loaded by name. Returns the model (changed in place)."""
    from lors_convert.hf import load_state

    load_state(model, {name: tensor.float() for name, tensor in expand(source, meta)}, str(source.path))
    prefix = state_prefix(model, list(source.info))
    for group in meta.groups:
        rows, cols = group.rows_cols
        shared = (
            nn.Parameter(source.get(shared_key(group.template)).float().reshape(rows, cols)) if group.shared else None
        )
        for name, _ in group.factored():  # layers stored dense stay plain modules
            path, dense = module_of(name, model, prefix)
            if dense.weight.shape != (rows, cols):
                raise LorsError(
                    f"{name}: the module's weight is {list(dense.weight.shape)}, the group's {[rows, cols]}"
                )
            a_key, b_key = factor_keys(name)
            lors = LorsLinear(
                shared, source.get(a_key).float(), source.get(b_key).float(), dense.bias, transposed=is_conv1d(dense)
            )
            model.set_submodule(path, lors)
    return model


def merge_lors(model: nn.Module) -> nn.Module:
    """Replace every LorsLinear by a plain nn.Linear (or GPT-2 Conv1D) holding S + B A. In place."""
    for path, module in list(model.named_modules()):
        if not isinstance(module, LorsLinear):
            continue
        with torch.no_grad():
            weight = module.weight().detach().clone()
        has_bias = module.bias is not None
        if module.transposed:
            from transformers.pytorch_utils import Conv1D  # only GPT-2-style models have these

            dense = Conv1D(weight.shape[1], weight.shape[0])
        else:
            dense = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
        dense = dense.to(weight.device)
        dense.weight = nn.Parameter(weight)
        if has_bias:
            dense.bias = module.bias
        model.set_submodule(path, dense)
    return model


def lors_groups(model: nn.Module) -> dict[int, list[LorsLinear]]:
    """The LORS modules of a model, grouped by their shared Parameter (keyed by its id)."""
    groups: dict[int, list[LorsLinear]] = {}
    for module in model.modules():
        if isinstance(module, LorsLinear) and module.shared is not None:
            groups.setdefault(id(module.shared), []).append(module)
    return groups


def lors_state(model: nn.Module, source: TensorSource, meta: LorsMeta) -> dict[str, torch.Tensor]:
    """The model's weights under the LORS checkpoint's names and dtypes (the inverse of `to_lors`)."""
    prefix = state_prefix(model, list(source.info))
    state = model.state_dict()
    out = {}
    for group in meta.groups:
        dtype = getattr(torch, group.dtype)
        for name, _ in group.factored():
            module = model.get_submodule(prefix + name.removesuffix(".weight"))
            a_key, b_key = factor_keys(name)
            out[a_key], out[b_key] = module.lora_A.detach().cpu().to(dtype), module.lora_B.detach().cpu().to(dtype)
            if module.shared is not None:
                out[shared_key(group.template)] = module.shared.detach().cpu().reshape(group.shape).to(dtype)
    for name, info in source.info.items():
        if name not in out:  # a buffer the class does not persist (BERT's position_ids) stays as it was
            out[name] = (
                state[prefix + name].detach().cpu().to(info.dtype) if prefix + name in state else source.get(name)
            )
    return out
