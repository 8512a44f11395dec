"""Getting an architecture to run: a Hugging Face model directory (the only place that imports transformers:
its model classes, tokenizers and checkpoint names) or any PyTorch model through `--model-factory
package.module:function`. Always offline."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lors_convert import LorsError
from lors_convert.checkpoint import open_checkpoint


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:
        raise LorsError("Hugging Face models need transformers: pip install 'lors-convert[hf]'") from e
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # ours show progress; theirs would leak through --quiet
    return transformers


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: Path | None):
    """The folder's own tokenizer; without its files transformers would build an empty one that maps all text
    to unknown tokens, so that is refused."""
    if not has_tokenizer(folder):
        raise LorsError(
            f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, …) for text data; copy "
            "the model's tokenizer into that folder (or, for eval/finetune, give --teacher a folder "
            "that has them)"
        )
    try:
        return _transformers().AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many kinds for a broken tokenizer; the user needs one line
        raise LorsError(f"{folder}: cannot load its tokenizer ({one_line(e)})") from e


def one_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else error.__class__.__name__)[:200]


def checkpoint_names(model: nn.Module) -> dict[str, str]:
    """{checkpoint name: the model's own name} for every tensor of the model's state dict, as transformers would
    write and read them (the same names where it renames nothing, and for plain PyTorch models)."""
    state = model.state_dict(keep_vars=True)
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 loads checkpoint names as they are
        return {name: name for name in state}
    own = {}
    for name, tensor in state.items():
        own.setdefault(id(tensor), []).append(name)
    mapping = {}
    for checkpoint_name, tensor in revert_weight_conversion(model, dict(state)).items():
        candidates = own.get(id(tensor), [])
        mapping[checkpoint_name] = checkpoint_name if checkpoint_name in candidates else next(iter(candidates), None)
    return {k: v for k, v in mapping.items() if v is not None}


def model_class(config, names: set[str] | None = None):
    """The class config.json names (its `architectures`), else the auto class for its kind. Given the
    checkpoint's tensor names: where they are the base model's alone and hold none of the named task class's
    own head weights, the base model (a sentence-transformers folder whose config names MPNetForMaskedLM over
    the bare encoder would otherwise get a randomly initialised head)."""
    transformers = _transformers()
    base = transformers.AutoModel._model_mapping.get(type(config), None)
    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return base if names is not None and base is not None and headless(cls, base, config, names) else cls
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or [])
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    return auto._model_mapping[type(config)]


def headless(cls, base: type, config, names: set[str]) -> bool:
    """Whether a checkpoint of `names` is a bare `base` model rather than a `cls` one: none of the weights `cls`
    adds to its base model are there (tied ones, like GPT-2's lm_head, do not count: checkpoints leave them
    out), and every name is the base model's (a renamed head weight is not)."""
    from lors_convert.lors_format import is_lors_key

    if cls is base:
        return False
    with torch.device("meta"):
        task, bare = cls(config), base(config)
    in_base = {id(t) for t in task.base_model.state_dict(keep_vars=True).values()}
    head = [k for k, t in task.state_dict(keep_vars=True).items() if id(t) not in in_base]
    bare_names = set(bare.state_dict()) | {k for k, _ in bare.named_buffers()}
    prefix = f"{task.base_model_prefix}."
    plain = {n.removeprefix(prefix) for n in names if not is_lors_key(n)}
    return bool(head) and not any(k in names for k in head) and plain <= bare_names


def factory_architecture(spec: str) -> nn.Module:
    """`package.module:function` returning an nn.Module (weights are loaded afterwards)."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise LorsError(f"--model-factory must look like package.module:function, got {spec!r}")
    try:
        factory: Callable[[], nn.Module] = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise LorsError(f"--model-factory {spec}: {e}") from e
    model = factory()
    if not isinstance(model, nn.Module):
        raise LorsError(f"--model-factory {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """Load a plain PyTorch model's weights strictly, except for buffers the class does not persist."""
    not_persisted = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    state = {k: v for k, v in state.items() if k not in not_persisted}
    prefix = getattr(model, "base_model_prefix", "")
    expected = set(model.state_dict())
    if prefix and not set(state) & expected:  # a bare encoder checkpoint loaded into a model with a prefix
        state = {f"{prefix}.{k}": v for k, v in state.items()}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        example = sorted(missing or unexpected)[0]
        raise LorsError(
            f"{where}: weights do not fit the architecture ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, e.g. {example!r})"
        )
    model.load_state_dict(state, strict=False)
    return model.eval()


def dense_model(source_path: Path, factory: str | None = None) -> nn.Module:
    """The dense original in float32: a Hugging Face folder through `from_pretrained` (its renames, tied weights
    and buffers are transformers' business), or a checkpoint plus --model-factory."""
    source_path = Path(source_path)
    if factory:
        source = open_checkpoint(source_path)
        return load_state(factory_architecture(factory), {n: source.get(n) for n in source.info}, str(source_path))
    folder = architecture_dir(source_path)
    if folder is None:
        raise LorsError(
            f"{source_path}: cannot tell the architecture; give a Hugging Face model directory "
            "or --model-factory package.module:function"
        )
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        cls = model_class(config, set(open_checkpoint(source_path).info))
    except Exception as e:  # an unknown model_type, a malformed config.json, …
        raise LorsError(f"{folder}/config.json: cannot build the model it describes ({one_line(e)})") from e
    option = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        model = cls.from_pretrained(folder, local_files_only=True, **{option: torch.float32})
    except Exception as e:
        raise LorsError(f"{folder}: transformers cannot load it ({one_line(e)})") from e
    return model.eval()


def architecture_dir(source_path: Path) -> Path | None:
    """The Hugging Face directory that describes a checkpoint, if any."""
    source_path = Path(source_path)
    for folder in (source_path, source_path.parent):
        if is_hf_dir(folder):
            return folder
    return None
