"""Getting an architecture to run: a Hugging Face model directory or a GGUF file (the only place that imports
transformers: its model classes, tokenizers, checkpoint names and GGUF reading) or any PyTorch model through
`--model-factory package.module:function`. Always offline.

Where a function takes a Hugging Face folder, it also takes a GGUF file (`checkpoint.gguf_file`): its config,
tokenizer and weights are transformers' reading of the GGUF."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from lors_convert import LorsError
from lors_convert.checkpoint import TensorInfo, TensorSource, gguf_file, open_checkpoint


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


def conv1d(in_features: int, out_features: int) -> nn.Module:
    """GPT-2's Conv1D layer (a Linear whose weight is stored in x out)."""
    _transformers()
    return importlib.import_module("transformers.pytorch_utils").Conv1D(out_features, in_features)


def logits_processors(*processors):
    """transformers' list of logits processors, for `generate`."""
    return _transformers().LogitsProcessorList(processors)


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


GGUF_INSTALL = "pip install 'lors-convert[gguf]'"


def pretrained_args(where: Path) -> tuple[Path, dict]:
    """`from_pretrained`'s folder and options for a Hugging Face folder or a GGUF file."""
    gguf = gguf_file(where)
    if gguf is None:
        return Path(where), {"local_files_only": True}
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise LorsError(f"{gguf}: reading GGUF files needs {' and '.join(missing)}: {GGUF_INSTALL}")
    return gguf.parent, {"gguf_file": gguf.name, "local_files_only": True}


def auto_config(where: Path):
    """The config of a Hugging Face folder or a GGUF file. A GGUF names no model class: it gets the causal LM of
    its kind (what llama.cpp runs), so the model built and a config.json written from it are the language model."""
    folder, options = pretrained_args(where)
    try:
        if "gguf_file" in options:
            config = copy.deepcopy(_gguf_config(file_stamp(folder / options["gguf_file"])))
        else:
            config = _transformers().AutoConfig.from_pretrained(folder, **options)
    except Exception as e:  # an unknown model_type, a malformed config.json, a corrupt or unsupported GGUF, …
        if "gguf_file" in options:
            raise LorsError(f"{gguf_file(where)}: transformers cannot read this GGUF ({one_line(e)})") from e
        raise LorsError(f"{folder}/config.json: cannot build the model it describes ({one_line(e)})") from e
    causal = _transformers().AutoModelForCausalLM._model_mapping.get(type(config), None)
    if "gguf_file" in options and not config.architectures and causal is not None:
        config.architectures = [causal.__name__]
    return config


def open_source(path: str | Path) -> TensorSource:
    """A model's weights, opened lazily: any checkpoint checkpoint.open_checkpoint reads, or a GGUF file (open_gguf)."""
    gguf = gguf_file(path)
    return open_gguf(gguf) if gguf is not None else open_checkpoint(path)


def open_gguf(path: Path) -> TensorSource:
    """A GGUF file as a checkpoint: the tensors of the transformers model it loads as, under that model's own
    checkpoint names (what `save_pretrained` writes: a tied `lm_head.weight` is left out), dequantized.

    Names and shapes come from the config (the model built on the meta device). The first `get` loads the whole
    model in float32 (transformers dequantizes) and keeps its weights until the source is dropped: memory is the
    model's float32 size, fine up to a few billion parameters. Tensors are given in the GGUF's own float type
    where all its matrices have one (F32, F16, BF16), else (quantized) in float32, and then a conversion writes
    bfloat16 (rounding SmolLM2's Q4_1 dequantization to bf16 costs its 20% conversion under 0.1% perplexity,
    docs/benchmarks.md)."""
    config = auto_config(path)
    try:
        with torch.device("meta"):
            skeleton = model_class(config)(config)
    except Exception as e:
        raise LorsError(f"{path}: cannot build the model it describes ({one_line(e)})") from e
    state = skeleton.state_dict(keep_vars=True)
    names, seen = {}, set()
    for name, own in checkpoint_names(skeleton).items():
        if id(state[own]) not in seen:  # tied weights: the first name (the embedding) stands for both
            seen.add(id(state[own]))
            names[name] = own
    dtype = gguf_dtype(path)
    info = {name: TensorInfo(tuple(state[own].shape), dtype) for name, own in names.items()}
    model = functools.cache(lambda: dense_model(path))

    def read(name: str) -> torch.Tensor:
        tensor = model().state_dict().get(names[name])
        if tensor is None:
            raise LorsError(f"{path}: transformers' model of it has no tensor {names[name]!r}")
        return tensor.detach().to("cpu", dtype, copy=True)  # a copy: calibration may move the model to a GPU

    written = torch.bfloat16 if dtype == torch.float32 and gguf_quantized(path) else None
    return TensorSource(path, [path], info, read, model=model, written_dtype=written)


@contextlib.contextmanager
def without_gguf_bar() -> Iterator[None]:
    """transformers' GGUF reading draws a tqdm bar of its own, which its progress-bar switch does not reach (it
    would leak through --quiet); it becomes a plain loop while a model loads."""
    try:
        module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        module = None
    bar = getattr(module, "tqdm", None)
    if bar is not None:
        module.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        if bar is not None:
            module.tqdm = bar


# Reading a GGUF's metadata parses every field (SmolLM2's 49,152-token vocabulary and its merges): 3-5 s each time on
# two cores, and a conversion asked for it again and again (its config, its float type, whether it holds a tokenizer).
# Each file's reading is kept, keyed by its path, size and modification time.


def file_stamp(path: Path) -> tuple[Path, int, int]:
    stat = path.stat()
    return path.resolve(), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _gguf_config(stamp: tuple[Path, int, int]):
    return _transformers().AutoConfig.from_pretrained(stamp[0].parent, gguf_file=stamp[0].name, local_files_only=True)


@functools.lru_cache(maxsize=4)
def _gguf_reader(stamp: tuple[Path, int, int]):
    import gguf

    return gguf.GGUFReader(stamp[0])


def gguf_reader(path: Path):
    """The gguf package's reading of a GGUF: `.fields` (metadata) and `.tensors` (their types)."""
    pretrained_args(path)  # the one-line error where the gguf package is missing
    try:
        return _gguf_reader(file_stamp(path))
    except Exception as e:  # a truncated or corrupt file
        raise LorsError(f"{path}: not a readable GGUF file ({one_line(e)})") from e


def gguf_quantized(path: Path) -> bool:
    """Whether any of a GGUF's matrices is stored in a quantized type (not F32, F16 or BF16)."""
    import gguf

    floats = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    return any(t.tensor_type not in floats for t in gguf_reader(path).tensors if len(t.shape) >= 2)


def gguf_dtype(path: Path) -> torch.dtype:
    """The float type all of a GGUF's matrices are stored in, else (quantized or mixed) float32."""
    import gguf

    floats = {
        gguf.GGMLQuantizationType.F32: torch.float32,
        gguf.GGMLQuantizationType.F16: torch.float16,
        gguf.GGMLQuantizationType.BF16: torch.bfloat16,
    }
    kinds = {floats.get(t.tensor_type) for t in gguf_reader(path).tensors if len(t.shape) >= 2}
    return kinds.pop() if len(kinds) == 1 and None not in kinds else torch.float32


def save_gguf_description(gguf: Path, out: Path) -> None:
    """config.json and the tokenizer files of a GGUF: a folder exported from it loads without it."""
    auto_config(gguf).save_pretrained(out)
    if has_tokenizer(gguf):
        load_tokenizer(gguf).save_pretrained(out)


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
    if folder is not None and gguf_file(folder) is not None:
        return "tokenizer.ggml.model" in gguf_reader(gguf_file(folder)).fields
    return folder is not None and any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: Path | None):
    """The folder's own tokenizer, or the one a GGUF file carries; without its files transformers would build an
    empty one that maps all text to unknown tokens, so that is refused."""
    if not has_tokenizer(folder):
        if folder is not None and gguf_file(folder) is not None:
            raise LorsError(f"{folder}: the GGUF file holds no tokenizer (no tokenizer.ggml.* fields) for text data")
        raise LorsError(
            f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, …) for text data; copy "
            "the model's tokenizer into that folder (or, for eval/finetune, give --teacher a folder "
            "that has them)"
        )
    transformers = _transformers()
    where, options = pretrained_args(folder)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, **options)
    except Exception as e:  # transformers raises many kinds for a broken tokenizer; the user needs one line
        raise LorsError(f"{folder}: cannot load its tokenizer ({one_line(e)})") from e
    # batches of lines are scored and trained on right-padded, so every row starts at position 0 (Llama-2's and
    # Mistral's tokenizers pad on the left, for generation, which pads its prompts itself)
    tokenizer.padding_side = "right"
    return tokenizer


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


def names_causal_lm(config) -> bool:
    """Whether a config names a model that predicts the next token (*ForCausalLM, GPT-2's *LMHeadModel)."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or [])


def is_causal_lm_source(path: Path) -> bool:
    """Whether `path` is a GGUF file or a Hugging Face folder of a causal LM."""
    if gguf_file(path) is None and not (Path(path) / "config.json").is_file():
        return False
    return names_causal_lm(auto_config(Path(path)))


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
    auto = transformers.AutoModelForCausalLM if names_causal_lm(config) else transformers.AutoModel
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
    """The dense original in float32: a Hugging Face folder or a GGUF file through `from_pretrained` (its renames,
    tied weights, buffers and dequantizing are transformers' business), or a checkpoint plus --model-factory."""
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
    config = auto_config(folder)
    gguf = gguf_file(folder)
    try:  # a GGUF's names are its model's own: no headless checkpoint to tell apart
        cls = model_class(config, None if gguf else set(open_checkpoint(source_path).info))
    except Exception as e:
        raise LorsError(f"{gguf or folder / 'config.json'}: cannot build the model it describes ({one_line(e)})") from e
    option = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    where, options = pretrained_args(folder)
    if gguf and hasattr(transformers, "GgufConfig"):  # transformers 5 keeps quantized blocks where it has kernels
        options["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        with without_gguf_bar() if gguf else contextlib.nullcontext():
            model = cls.from_pretrained(where, config=config, **options, **{option: torch.float32})
    except Exception as e:
        raise LorsError(f"{folder}: transformers cannot load it ({one_line(e)})") from e
    if gguf and getattr(model, "hf_quantizer", None) is not None:  # dequantized: a plain model (casts, trains, saves)
        model.hf_quantizer.remove_quantization_config(model)
    return model.eval()


def architecture_dir(source_path: Path) -> Path | None:
    """The Hugging Face directory that describes a checkpoint, if any; for a GGUF source, its GGUF file."""
    source_path = Path(source_path)
    if gguf_file(source_path) is not None:
        return gguf_file(source_path)
    for folder in (source_path, source_path.parent):
        if is_hf_dir(folder):
            return folder
    return None
