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


def install_lors(model: nn.Module, lors: dict) -> None:
    """Swap the layers `lors["swaps"]` lists for LorsLinear with empty factors (on whatever device the model is
    being built on, meta included) and register one shared Parameter per group (`lors["shared"]`: group → shape).

    A swap is {"path", "group", "rank", "rows", "cols", "transposed"} in the layer's stored layout.
    """
    reference = next(iter(model.parameters()))

    def empty(*shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, dtype=reference.dtype, device=reference.device))

    shared = nn.ParameterDict({group: empty(*shape) for group, shape in lors["shared"].items()})
    setattr(model, SHARED_ATTRIBUTE, shared)
    for swap in lors["swaps"]:
        dense = model.get_submodule(swap["path"])
        group = str(swap["group"])
        layer = LorsLinear(
            (shared, group) if group in shared else None,
            empty(swap["rank"], swap["cols"]),
            empty(swap["rows"], swap["rank"]),
            dense.bias,
            transposed=swap["transposed"],
        )
        model.set_submodule(swap["path"], layer)
        # Its weights come from the checkpoint, and a model's own initialisation may reach into a child's `.weight`
        # (GPT-2 scales c_proj's), which LorsLinear does not hold: transformers skips modules marked initialised.
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
    """`LorsBertModel` and its kind, built on first use: how transformers finds the class config.json names."""
    import transformers

    base = getattr(transformers, name.removeprefix("Lors"), None) if name.startswith("Lors") else None
    if base is None:
        raise AttributeError(name)
    return lors_model_class(base)
