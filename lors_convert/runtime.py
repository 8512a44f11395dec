"""Running a model: devices, torchrun's world and process group, autocast, handing a batch to a model (one rule),
its logits made outside its forward (a chunk of positions at a time) and the outputs of its layers."""

from __future__ import annotations

import functools
import inspect
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from lors_convert import LorsError


def compute_device() -> torch.device:
    """Where models run: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_hf(model: nn.Module) -> bool:
    """A transformers model (or a subclass of one, like lors_convert.load's LorsBertModel)."""
    return any(cls.__module__.startswith("transformers.") for cls in type(unwrap(model)).__mro__)


def call_model(model: nn.Module, batch: dict, **options):
    """The one way a batch is handed to a model (eval, fine-tuning, calibration): a Hugging Face model takes
    everything by keyword; any other model takes a lone tensor positionally, whatever its name, and several by
    keyword."""
    if len(batch) == 1 and not is_hf(model):
        return model(*batch.values(), **options)
    return model(**batch, **options)


def is_causal_lm(model: nn.Module) -> bool:
    """A transformers decoder that predicts the next token: it generates and is no encoder-decoder (*ForCausalLM,
    *LMHeadModel, and the language models named otherwise, like Gemma 3's *ForConditionalGeneration)."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    generates = is_hf(model) and callable(getattr(model, "can_generate", None)) and model.can_generate()
    return generates and not getattr(config, "is_encoder_decoder", False)


def logits_and_hidden(model: nn.Module, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(logits or None, final hidden states) of a model on a batch."""
    if is_hf(model):
        out = call_model(model, batch, output_hidden_states=True)
        logits = getattr(out, "logits", None)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:  # a head on top, or an encoder-decoder (T5): the last layer the output comes from
            states = getattr(out, "hidden_states", None) or getattr(out, "decoder_hidden_states", None)
            hidden = states[-1]
        return logits, hidden
    out = call_model(model, batch)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise LorsError(
            f"--model-factory models must return a tensor (or a tuple starting with one), got {type(out).__name__}"
        )
    return None, out


Logits = Callable[[torch.Tensor], torch.Tensor]  # flat positions (row * length + column) -> their logits
HEAD_CHECKED = "_lors_head_checked"  # a model's attribute: whether output_head's check found its logits


def logit_transform(config) -> Logits:
    """What transformers' causal LMs do to their head's output, by their config: Gemma 2's soft cap, Cohere's
    scale, Granite's divisor. Any other is caught by output_head's check."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        logits = logits * scale if scale is not None else logits
        logits = logits / divisor if divisor is not None else logits
        return torch.tanh(logits / cap) * cap if cap else logits

    return transform


def output_head(model: nn.Module | None) -> Logits | None:
    """The function from a causal LM's final hidden states to its logits, so that they can be made a chunk of
    positions at a time outside its forward; None where they cannot: any model but transformers' causal LMs that
    take `logits_to_keep` (the positions their forward makes logits for), a model FSDP shards (its
    head's weights are gathered for its forward only), one whose logits the check does not find. The check, on a
    model's first call: the head and logit_transform give its forward's own logits, on two tokens. Being a forward,
    it runs the model's hooks: call this before registering any that collect outputs."""
    inner = unwrap(model) if model is not None else None
    if not is_causal_lm(inner) or "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        return None
    from torch.distributed import fsdp

    head = inner.get_output_embeddings()
    if head is None or isinstance(inner, getattr(fsdp, "FSDPModule", ())):
        return None
    transform = logit_transform(inner.config.get_text_config())
    apply = lambda hidden: transform(head(hidden))
    if not hasattr(inner, HEAD_CHECKED):
        ids = torch.arange(2, device=head.weight.device)[None]
        with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
            out = call_model(inner, {"input_ids": ids}, output_hidden_states=True, logits_to_keep=1)
            made = apply(out.hidden_states[-1][:, -1:])
        setattr(inner, HEAD_CHECKED, torch.allclose(made.float(), out.logits.float(), rtol=1e-4, atol=1e-6))
    return apply if getattr(inner, HEAD_CHECKED) else None


def lazy_logits(model: nn.Module, batch: dict, head: Logits | None) -> tuple[Logits | None, torch.Tensor]:
    """(the logits of flat positions, or None for a model without logits; final hidden states) of a model on a
    batch. With `head` (output_head's), the forward makes none (`logits_to_keep`: no position) and they are made
    as they are asked for; without, they are the forward's, whole."""
    if head is None:
        logits, hidden = logits_and_hidden(model, batch)
        return (None if logits is None else lambda positions: logits.flatten(0, 1)[positions]), hidden
    none = torch.zeros(0, dtype=torch.long, device=next(iter(batch.values())).device)
    hidden = call_model(model, batch, output_hidden_states=True, logits_to_keep=none).hidden_states[-1]
    return (lambda positions: head(hidden.flatten(0, 1)[positions])), hidden


def vocab_size(model: nn.Module) -> int:
    """The width of a model's logits (0 without an output head)."""
    model = unwrap(model)
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    return head.weight.shape[0] if isinstance(getattr(head, "weight", None), torch.Tensor) else 0


@contextmanager
def layer_outputs(model: nn.Module, paths: list[str]) -> Iterator[list[torch.Tensor]]:
    """Collects the outputs of the named modules (one per stacked layer) during each forward."""
    captured: list[torch.Tensor] = []

    def hook(module, inputs, output):
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)

    handles = [unwrap(model).get_submodule(p).register_forward_hook(hook) for p in paths]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def world() -> tuple[int, int]:
    """(rank, world size): torchrun's environment, or a single process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def exit_worker(code: int) -> None:
    """End a torchrun worker without the interpreter's shutdown. gloo's threads outlive destroy_process_group
    (which does not stop them) and can free tensors while Python shuts down, which aborts the process
    ("terminate called without an active exception", about 1 in 140 two-process runs on a 2-core machine)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def setup_device(world_size: int) -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank >= torch.cuda.device_count():
            raise LorsError(
                f"process {local_rank} has no GPU: {torch.cuda.device_count()} visible; use at most "
                "that many processes per node (or CUDA_VISIBLE_DEVICES= to train on the CPU)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def fast_precision(device: torch.device):
    """bf16 autocast for calibration's passes and its model-written samples, on a CPU that multiplies bf16
    natively (AVX512-BF16, AMX), where float32 products run at a fraction of its speed. The statistics are still
    summed in float64, from inputs and gradients that carry bf16's rounding, as a bf16 model's would."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=device.type == "cpu" and native_bf16())


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX, by Linux's /proc/cpuinfo)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & flags)
