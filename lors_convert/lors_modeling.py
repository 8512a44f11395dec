"""LORS layers for any model: `LorsLinear` and the swap that puts them in a model as it is built.

This file imports only torch (and transformers where a model class is named), because `lors-convert export` copies
it into a Hugging Face model folder as its modeling code: `from_pretrained(folder, trust_remote_code=True)` then
loads the LORS model with lors-convert not installed. The folder's config.json carries the swap (`lors`) and names
the class in `auto_map`; export appends the line that defines that class from the source's own model class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHARED_ATTRIBUTE = "lors_shared"  # the model's nn.ParameterDict of shared matrices, one per group


class LorsLinear(nn.Module):
    """y = x Wᵀ + b with W = S + B A (nn.Linear layout: S out×in, B out×r, A r×in), or, for GPT-2's Conv1D
    (`transposed`, weights stored in×out), y = x W + b with S in×out, B in×r, A r×out.

    `forward` chooses its computation by the number of tokens (`use_factored`): factored, x·Sᵀ + (x·Aᵀ)·Bᵀ,
    for decoding and small batches, never forming an out×in matrix (under no_grad the memory held is the
    LORS file's); materialised, S + B A formed then one linear, for training-size batches, where B A's
    out·in·r flops are paid once instead of r·(out + in) per token. Speed against memory: merging every layer
    back to a plain dense one (lors_convert.nn.merge_lors) is as fast as the original model and holds every
    dense weight again.
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

    @property
    def weight(self) -> torch.Tensor:
        """S + B A, formed on each read (an out×in matrix, in×out for Conv1D, like the weight of the layer it
        replaced), in the factors' dtype and device. It tracks gradients to S, B and A like any computed tensor
        (none under no_grad); writing into it changes nothing."""
        if self.shared is None:
            return self.lora_B @ self.lora_A
        return torch.addmm(self.shared, self.lora_B, self.lora_A)

    @property
    def in_features(self) -> int:
        return self.lora_B.shape[0] if self.transposed else self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_A.shape[1] if self.transposed else self.lora_B.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols, rank = self.lora_B.shape[0], self.lora_A.shape[1], self.lora_A.shape[0]
        tokens = x.numel() // max(x.shape[-1], 1)
        if use_factored(tokens, rows, cols, rank, self.shared is not None):
            return factored_forward(self, x)
        return materialised_forward(self, x)

    def extra_repr(self) -> str:
        rows, cols = self.lora_B.shape[0], self.lora_A.shape[1]
        rank = self.lora_A.shape[0]
        return f"{rows}x{cols}, shared={self.shared is not None}, rank={rank}, transposed={self.transposed}"


FACTORED_PENALTY = 1.2  # thin rank-r matmuls cost this much more per flop than a full one (see use_factored)


def use_factored(tokens: int, rows: int, cols: int, rank: int, shared: bool) -> bool:
    """Whether `LorsLinear.forward` computes x·Sᵀ + (x·Aᵀ)·Bᵀ (factored) rather than materialising S + B A
    for an input of `tokens` rows: factored costs tokens·r·(rows + cols) flops in thin matmuls (plus the
    x·Sᵀ that a dense linear costs too), materialised rows·cols·r once plus tokens·rows·cols. With S that
    means factored below tokens = rows·cols / (1.2·(rows + cols)), whatever the rank (TinyLlama 2048x2048:
    853); without S, below rows·cols·r / (1.2·r·(rows + cols) − rows·cols), always when that is negative.
    """
    thin = FACTORED_PENALTY * tokens * rank * (rows + cols)  # (x·Aᵀ)·Bᵀ
    full = tokens * rows * cols  # x·Sᵀ, or x·Wᵀ once W is materialised
    return thin + (full if shared else 0) < rows * cols * rank + full


def factored_forward(layer: LorsLinear, x: torch.Tensor) -> torch.Tensor:
    """x·Sᵀ + (x·Aᵀ)·Bᵀ + b (for Conv1D: x·S + (x·B)·A + b), never forming an out×in matrix."""
    shared, first, second = layer.shared, layer.lora_A, layer.lora_B
    if layer.transposed:  # S in×out, B in×r, A r×out: the same computation on transposed views
        shared, first, second = None if shared is None else shared.t(), second.t(), first.t()
    low = F.linear(F.linear(x, first), second)
    if shared is None:
        return low if layer.bias is None else low.add_(layer.bias)
    return F.linear(x, shared, layer.bias).add_(low)


def materialised_forward(layer: LorsLinear, x: torch.Tensor) -> torch.Tensor:
    """W = S + B A formed once, then one linear."""
    weight = layer.weight
    return F.linear(x, weight.t() if layer.transposed else weight, layer.bias)


def install_lors(model: nn.Module, lors: dict) -> None:
    """Swap the layers `lors["swaps"]` lists for LorsLinear with empty factors, each in the dtype and on the device
    of the layer it replaces (meta included), and register one shared Parameter per group (`lors["shared"]`:
    group → shape), in the dtype and on the device of the group's first layer.

    A swap is {"path", "group", "rank", "rows", "cols", "transposed"} in the layer's stored layout.
    """
    dense = {swap["path"]: model.get_submodule(swap["path"]) for swap in lors["swaps"]}
    first = {}  # group → the weight of its first layer, whose dtype and device S takes
    for swap in lors["swaps"]:
        first.setdefault(str(swap["group"]), dense[swap["path"]].weight)

    def empty(like: torch.Tensor, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, dtype=like.dtype, device=like.device))

    shared = nn.ParameterDict({group: empty(first[group], *shape) for group, shape in lors["shared"].items()})
    setattr(model, SHARED_ATTRIBUTE, shared)
    for swap in lors["swaps"]:
        replaced = dense[swap["path"]]
        group = str(swap["group"])
        layer = LorsLinear(
            (shared, group) if group in shared else None,
            empty(replaced.weight, swap["rank"], swap["cols"]),
            empty(replaced.weight, swap["rows"], swap["rank"]),
            replaced.bias,
            transposed=swap["transposed"],
        )
        model.set_submodule(swap["path"], layer)
        # Its weights come from the checkpoint, and a model's own initialisation may reach into a child's `.weight`
        # (GPT-2 scales c_proj's), which LorsLinear only computes: transformers skips modules marked initialised.
        model.get_submodule(swap["path"].rpartition(".")[0])._is_hf_initialized = True


_classes: dict[type, type] = {}


def lors_model_class(base: type) -> type:
    """A subclass of a Hugging Face model class (`LorsBertModel` of `BertModel`) that swaps in the LORS layers its
    config lists (`config.lors`) as it is built, before `from_pretrained` loads the weights. Its `save_pretrained`
    writes this file beside the weights and names the class in config.json's `auto_map`, so what it saves loads
    again with `trust_remote_code=True`."""
    if base not in _classes:

        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            install_lors(self, config.lors)

        cls = type(f"Lors{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})
        cls.register_for_auto_class(auto_class_of(base))
        _classes[base] = cls
    return _classes[base]


def auto_class_of(base: type) -> str:
    """The transformers Auto class that builds `base` for its config (AutoModel when no task class does)."""
    import transformers

    for name in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM"):
        mapping = getattr(transformers, name)._model_mapping
        if base.config_class in mapping and mapping[base.config_class] is base:
            return name
    return "AutoModel"


def __getattr__(name: str) -> type:
    """`LorsBertModel` and its kind, built on first use: how transformers finds the class config.json names.
    Other names fail before transformers is imported (the import system asks every module for `__path__`)."""
    if not name.startswith("Lors"):
        raise AttributeError(name)
    import transformers

    base = getattr(transformers, name.removeprefix("Lors"), None)
    if base is None:
        raise AttributeError(name)
    return lors_model_class(base)
