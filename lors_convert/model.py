"""Everything about running a model: `load` builds the source's own model class with its stacked layers as LORS
modules, `save` writes a LORS checkpoint back from such a model, `export` writes a Hugging Face folder; checkpoint
names against the model's own; devices and autocast; data files to batches and a batch to a model (one rule).

Hugging Face models load through `from_pretrained` itself, so tied weights, buffers the checkpoint does not hold,
dtypes and the meta-device build are transformers' business. The model class is a subclass of the source's
(`LorsBertModel` is a `BertModel`) whose `__init__` swaps the stacked layers for `LorsLinear` before the weights
arrive: memory never holds a dense copy of them. Each group's shared matrix is one Parameter, held once by the
model under `lors_shared.<group>`, so `sum(p.numel() for p in model.parameters())` counts what the file stores.

Checkpoint names and the model's own names can differ (transformers 5 renames ViT's `attention.attention.query`
to `attention.q_proj` when it loads); the mapping is transformers' own, read from what it would write back
(`revert_weight_conversion`), so a later rename is picked up without a change here.
"""

from __future__ import annotations

import dataclasses
import os
from array import array
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from lors_convert import LorsError
from lors_convert.checkpoint import SafetensorsWriter, TensorSource, check_output_path, metadata_bytes, open_checkpoint
from lors_convert.lors_format import GroupMeta, LorsMeta, factor_keys, header_metadata, read_lors, shared_key
from lors_convert.lors_modeling import SHARED_ATTRIBUTE, install_lors, lors_model_class
from lors_convert.nn import is_conv1d, is_swappable


@dataclasses.dataclass(frozen=True)
class Loaded:
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
    own = loaded.own_name if isinstance(loaded, Loaded) else own_names(model, [n for g in meta.groups for n in g.names])
    paths = set()
    for group in meta.groups:
        for index, name in zip(group.layers, group.names):
            parts = own.get(name, name).split(".")
            cut = next((k for k, part in enumerate(parts) if part == str(index)), len(parts) - 1)
            paths.add(".".join(parts[: cut + 1]))
    return sorted(paths, key=lambda p: [int(s) if s.isdigit() else s for s in p.split(".")])


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


def lors_state_dict(source: TensorSource, meta: LorsMeta, own_name: dict[str, str], swaps: list[Swap]) -> dict:
    """The LORS file's tensors under the model's own names (factors as `<layer>.lora_A`/`.lora_B`, shared
    matrices as `lors_shared.<group>`), read lazily one at a time by the loader."""
    state = {}
    factored = {swap.name: swap for swap in swaps}
    owned = meta.group_keys()
    for name in source.info:
        if name not in owned:
            state[own_name.get(name, name)] = source.get(name)
    for g, group in enumerate(meta.groups):
        if group.shared and group_used(g, swaps):
            state[f"{SHARED_ATTRIBUTE}.{g}"] = source.get(shared_key(group.template)).reshape(group.rows_cols)
        for name, rank in zip(group.names, group.ranks):
            if rank is None:
                state[own_name.get(name, name)] = source.get(name)
                continue
            swap = factored[name]
            a_key, b_key = factor_keys(name)
            state[f"{swap.path}.lora_A"], state[f"{swap.path}.lora_B"] = source.get(a_key), source.get(b_key)
    return state


# ---------------------------------------------------------------- load


def architecture_folder(meta: LorsMeta, architecture) -> Path | None:
    """The Hugging Face folder describing the model: given, or the one the LORS file was converted from."""
    candidates = [Path(architecture)] if isinstance(architecture, (str, Path)) else []
    if architecture is None:
        source = Path(meta.source.path)
        candidates = [source, source.parent]
    for folder in candidates:
        if folder.is_file() and folder.name == "config.json":
            folder = folder.parent
        if (folder / "config.json").is_file():
            return folder
    return None


def load(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, architecture=None
) -> nn.Module:
    """The model of a LORS checkpoint, ready to run: its stacked Linear/Conv1D layers are LorsLinear modules.

    `architecture`: a Hugging Face folder (or its config.json, or a `PretrainedConfig`), or a callable returning
    the model (plain PyTorch); by default the folder the checkpoint was converted from. The model is in eval mode,
    float32 unless `dtype` says otherwise, on `device`.
    """
    source, meta = read_lors(path)
    if callable(architecture) and not isinstance(architecture, (str, Path)) and not is_config(architecture):
        model, own_name, swaps = load_plain(architecture, source, meta)
    else:
        config = architecture if is_config(architecture) else None
        folder = None if config is not None else architecture_folder(meta, architecture)
        if config is None and folder is None:
            raise LorsError(
                f"{path}: cannot tell the architecture (no config.json at {meta.source.path} or given); pass "
                "architecture= a Hugging Face folder or config, or a function building the model"
            )
        model, own_name, swaps = load_hf(config or folder, source, meta)
    model.lors = Loaded(meta, own_name, swaps, {name: info.dtype for name, info in source.info.items()})
    return model.to(device=device, dtype=dtype or torch.float32).eval()


def is_config(value) -> bool:
    return type(value).__name__.endswith("Config") and hasattr(value, "to_dict")


def model_class(config, names: set[str] | None = None):
    """The class config.json names (its `architectures`), else the auto class for its kind. Given the
    checkpoint's tensor names: where they are the base model's alone and hold none of the named task class's
    own head weights, the base model (a sentence-transformers folder whose config names MPNetForMaskedLM over
    the bare encoder would otherwise get a randomly initialised head)."""
    from lors_convert.hf import _transformers

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


def load_hf(architecture, source: TensorSource, meta: LorsMeta) -> nn.Module:
    from lors_convert.hf import _transformers, one_line

    transformers = _transformers()
    try:
        config = architecture if is_config(architecture) else transformers.AutoConfig.from_pretrained(architecture)
        cls = model_class(config, set(source.info))
        with torch.device("meta"):
            skeleton = cls(config)
    except Exception as e:
        raise LorsError(f"{architecture}: cannot build the model its config describes ({one_line(e)})") from e
    own_name = own_names(skeleton, list(source.info) + [n for g in meta.groups for n in g.names])
    swaps = swaps_for(skeleton, meta, own_name)
    state = lors_state_dict(source, meta, own_name, swaps)
    dtype_option = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
    config.lors = lors_description(swaps, meta.groups)
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
    loaded: Loaded | None = getattr(model, "lors", None)
    if not isinstance(loaded, Loaded):
        raise LorsError("this model was not made by lors_convert.load (it carries no LORS description)")
    tensors = checkpoint_tensors(model, loaded)
    path = Path(path)
    check_output_path(path, [], force)
    metadata = header_metadata(loaded.meta)
    layout = [(name, tensors[name].dtype, tuple(tensors[name].shape)) for name in sorted(tensors)]
    with SafetensorsWriter(path, layout, 5 * 10**9, metadata_bytes(metadata)) as writer:
        for name, _, _ in layout:
            writer.add(name, tensors[name])
        return writer.commit(metadata)


def checkpoint_tensors(model: nn.Module, loaded: Loaded, state: dict | None = None) -> dict[str, torch.Tensor]:
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


def loaded_shape(loaded: Loaded, name: str, tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape the file stores a tensor in (a shared matrix is kept 2-D in the model)."""
    for group in loaded.meta.groups:
        if name == shared_key(group.template):
            return tuple(group.shape)
    return tuple(tensor.shape)


# ---------------------------------------------------------------- running a model: devices, data, batches


TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth")


def compute_device() -> torch.device:
    """Where models run: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TextLines:
    """The non-empty lines of text files, read from disk when asked for: only each line's file and byte offset
    are held (16 bytes a line), so a corpus of any size costs no memory. Indexing gives the stripped line."""

    def __init__(self, files: list[Path], positions: torch.Tensor | None = None):
        self.files = [Path(f) for f in files]
        self.positions = positions if positions is not None else self._index()  # rows of (file index, offset)

    def _index(self) -> torch.Tensor:
        positions = array("q")  # flat (file index, offset) pairs: 16 bytes a line while indexing too
        for number, file in enumerate(self.files):
            try:
                with open(file, "rb") as stream:
                    offset = 0
                    for line in stream:
                        if line.strip():
                            line.decode("utf-8")
                            positions.extend((number, offset))
                        offset += len(line)
            except (OSError, UnicodeDecodeError) as e:
                raise LorsError(f"{file}: cannot read text ({e.__class__.__name__})") from e
        if not positions:
            raise LorsError(f"no text in {', '.join(map(str, self.files))}")
        return torch.frombuffer(positions, dtype=torch.long).clone().view(-1, 2)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> str:
        return self.read([i])[0]

    def read(self, indices: list[int]) -> list[str]:
        lines, streams = [], {}
        try:
            for number, offset in self.positions[indices].tolist():
                stream = streams.get(number) or streams.setdefault(number, open(self.files[number], "rb"))
                stream.seek(offset)
                lines.append(stream.readline().decode("utf-8").strip())
        finally:
            for stream in streams.values():
                stream.close()
        return lines

    def subset(self, indices: list[int]) -> "TextLines":
        return TextLines(self.files, self.positions[torch.as_tensor(indices, dtype=torch.long)])


@dataclass
class Examples:
    """Text lines (a list, or TextLines read from disk; tokenised per batch) or a dict of tensors whose first
    dimension indexes examples."""

    texts: list[str] | TextLines | None = None
    tensors: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.texts) if self.texts is not None else len(next(iter(self.tensors.values())))

    def lines(self, indices: list[int]) -> list[str]:
        return self.texts.read(indices) if isinstance(self.texts, TextLines) else [self.texts[i] for i in indices]

    def subset(self, indices: list[int]) -> "Examples":
        if isinstance(self.texts, TextLines):
            return Examples(texts=self.texts.subset(indices))
        if self.texts is not None:
            return Examples(texts=self.lines(indices))
        index = torch.tensor(indices, dtype=torch.long)
        return Examples(tensors={k: v[index] for k, v in self.tensors.items()})

    def batches(self, batch_size: int, tokenizer, max_length: int, device: torch.device) -> Iterator[dict]:
        """All examples in order, `batch_size` at a time (evaluation)."""
        for start in range(0, len(self), batch_size):
            yield self.batch(list(range(start, min(start + batch_size, len(self)))), tokenizer, max_length, device)

    def batch(self, indices: list[int], tokenizer, max_length: int, device: torch.device) -> dict:
        if self.texts is None:
            return {k: v.to(device) for k, v in self.subset(indices).tensors.items()}
        encoded = tokenizer(
            self.lines(indices),
            padding=True,
            truncation=True,
            max_length=min(max_length, tokenizer.model_max_length),
            return_tensors="pt",
        )
        return {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def load_examples(files: list[Path], tokenizer) -> Examples:
    """Text files (one example per line, streamed from disk) or tensor files (.safetensors/.pt: tensors sharing
    dimension 0)."""
    files = [Path(f) for f in files]
    if not files:
        raise LorsError("give at least one --data file")
    if not all(f.name.endswith(TENSOR_SUFFIXES) for f in files):
        if tokenizer is None:
            raise LorsError(
                "text data needs the model's tokenizer, and the teacher's folder has no tokenizer files "
                "(tokenizer.json, vocab.txt, …): copy them there, or give .safetensors/.pt files of "
                "input tensors"
            )
        return Examples(texts=TextLines(files))
    parts = [load_tensors(f) for f in files]
    keys = sorted(parts[0])
    if any(sorted(p) != keys for p in parts):
        raise LorsError("the tensor data files hold different names")
    return Examples(tensors={k: torch.cat([p[k] for p in parts]) for k in keys})


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise LorsError(f"{file}: no such file")
    try:
        tensors = open_checkpoint(file)
        data = {name: tensors.get(name) for name in tensors.info}
    except LorsError:
        raise
    except Exception as e:
        raise LorsError(f"{file}: cannot read tensors ({e.__class__.__name__})") from e
    sizes = {t.shape[0] if t.dim() else None for t in data.values()}
    if not data or len(sizes) != 1 or None in sizes:
        raise LorsError(f"{file}: the tensors must share their first dimension (one row per example)")
    return data


def split_examples(examples: Examples, eval_examples: int, seed: int) -> tuple[Examples, Examples]:
    """A seeded held-out slice for evaluation; the rest for training."""
    n = len(examples)
    n_eval = min(eval_examples, n // 5)
    if n - n_eval < 2 or n_eval < 2:
        raise LorsError(f"{n} examples are too few to hold some out for evaluation (need at least 10)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return examples.subset(order[n_eval:]), examples.subset(order[:n_eval])


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


def run(model: nn.Module, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
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


def text_batches(tokenizer, files: list[Path], samples: int, max_length: int, seed: int) -> list[dict]:
    """`samples` seeded lines of the files (streamed), one unpadded sequence per batch, so padding never enters
    the statistics."""
    lines = TextLines(files)
    chosen = torch.randperm(len(lines), generator=torch.Generator().manual_seed(seed))[:samples].tolist()
    texts = lines.read(chosen)
    return [dict(tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)) for text in texts]


def tensor_batches(files: list[Path], samples: int) -> list[dict]:
    """Inputs for --model-factory models: safetensors/pt files of tensors sharing their first dimension (one row per
    sample), read and checked as eval and fine-tuning read theirs."""
    batches: list[dict] = []
    for file in files:
        tensors = load_tensors(Path(file))
        rows = len(next(iter(tensors.values())))
        batches += [{k: v[i : i + 1] for k, v in tensors.items()} for i in range(rows)]
    return batches[:samples]


# ---------------------------------------------------------------- export

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json", ".msgpack", ".h5")


def export(
    path: str | Path, output: str | Path, *, dense: bool = False, architecture=None, force: bool = False
) -> Path:
    """Write a Hugging Face model folder: the LORS model with its modeling file (`trust_remote_code=True`; needs
    only torch and transformers) or, with `dense`, the plain dense model. Tokenizer and sentence-transformers files
    are copied from the source folder. The folder appears under its name only once complete."""
    import shutil

    source, meta = read_lors(path)
    folder = architecture_folder(meta, architecture)
    if folder is None:
        raise LorsError(f"{path}: export needs the source's Hugging Face folder (config.json); pass --architecture DIR")
    output = Path(output)
    if output.exists() and not force:
        raise LorsError(f"{output}: already exists (use --force to replace it)")
    if output.resolve() == folder.resolve():
        raise LorsError(f"{output}: refusing to write onto the source folder")
    staging = output.parent / f".{output.name}.tmp{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for item in folder.iterdir():  # tokenizer, sentence-transformers modules, README…: not weights or config
            if item.name != "config.json" and not item.name.endswith(WEIGHT_SUFFIXES):
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
        if dense:
            write_dense(source, meta, folder, staging)
        else:
            write_lors_folder(path, folder, staging)
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def write_dense(source: TensorSource, meta: LorsMeta, folder: Path, out: Path) -> None:
    """config.json as it was and the dense weights under their checkpoint names: loads with no remote code."""
    import shutil

    from lors_convert.lors_format import dense_layout, expand

    shutil.copy2(folder / "config.json", out / "config.json")
    metadata = {"format": "pt"}
    layout = dense_layout(source, meta)
    with SafetensorsWriter(out / "model.safetensors", layout, 5 * 10**9, metadata_bytes(metadata)) as writer:
        for name, tensor in expand(source, meta):
            writer.add(name, tensor)
        writer.commit(metadata)


def write_lors_folder(path: Path, folder: Path, out: Path) -> None:
    """transformers' own save of the LORS model: weights, config.json (with the swap and an auto_map naming the
    class) and lors_modeling.py."""
    import json

    meta = read_lors(path)[1]
    dtype = getattr(torch, meta.groups[0].dtype) if meta.groups else torch.float32
    model = load(path, architecture=folder, dtype=dtype)
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["auto_map"].setdefault("AutoModel", config["auto_map"][next(iter(config["auto_map"]))])
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------- a fresh LORS model (training from scratch)


def scratch_ranks(rows: int, cols: int, layers: int, reduction: float) -> int:
    """The rank whose group (S + L rank-r factor pairs) stores `reduction` fewer numbers than L dense layers."""
    return max(0, int(((1 - reduction) * layers * rows * cols - rows * cols) // (layers * (rows + cols))))


def init_checkpoint(
    config_dir: str | Path,
    output: str | Path,
    *,
    rank: int | None = None,
    reduction: float | None = None,
    shared: bool = True,
    seed: int = 0,
    force: bool = False,
) -> tuple[list[Path], LorsMeta]:
    """A fresh LORS checkpoint for a Hugging Face config, initialised as the paper trains LORS: per group S with
    the layer's own default initialisation (a freshly initialised layer of the group), A kaiming-uniform, B zeros,
    every other tensor as transformers initialises it. `finetune --objective lm` trains it without a teacher."""
    from lors_convert.checkpoint import TensorInfo
    from lors_convert.hf import _transformers, one_line
    from lors_convert.lors_format import SourceMeta
    from lors_convert.stacks import find_stacks

    if (rank is None) == (reduction is None):
        raise LorsError("choose one of --rank and --reduction")
    if (rank is not None and rank < 1) or (reduction is not None and not 0 < reduction < 1):
        raise LorsError("--rank must be at least 1 and --reduction in (0, 1)")
    config_dir, output = Path(config_dir), Path(output)
    check_output_path(output, [], force)
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(config_dir, local_files_only=True)
        cls = model_class(config)
    except Exception as e:
        raise LorsError(f"{config_dir}: cannot build the model its config describes ({one_line(e)})") from e
    torch.manual_seed(seed)
    model = cls(config)
    state = model.state_dict()
    own = checkpoint_names(model)
    tensors, seen = {}, set()
    for (
        checkpoint_name,
        own_name,
    ) in own.items():  # tied tensors (GPT-2's lm_head) are stored once, as transformers does
        if own_name in state and state[own_name].data_ptr() not in seen:
            seen.add(state[own_name].data_ptr())
            tensors[checkpoint_name] = state[own_name]
    info = {name: TensorInfo(tuple(t.shape), t.dtype) for name, t in tensors.items()}
    stacks, warnings = find_stacks({n: i for n, i in info.items() if n.endswith(".weight")})
    groups, out = [], {}
    for stack in stacks:
        r = rank if rank is not None else scratch_ranks(stack.rows, stack.cols, len(stack.layers), reduction)
        r = min(r, stack.rows, stack.cols)
        if shared:
            out[shared_key(stack.template)] = tensors[stack.names[0]].clone()  # a layer's own default initialisation
        for name in stack.names:
            a = torch.empty(r, stack.cols)
            torch.nn.init.kaiming_uniform_(a, a=5**0.5)
            a_key, b_key = factor_keys(name)
            out[a_key], out[b_key] = a.to(tensors[name].dtype), torch.zeros(stack.rows, r, dtype=tensors[name].dtype)
        groups.append(
            GroupMeta(
                template=stack.template,
                layers=stack.layers,
                names=stack.names,
                shape=list(stack.shape),
                dtype=str(stack.dtype).removeprefix("torch."),
                ranks=[r] * len(stack.layers),
                dense_params=stack.dense_params,
                lors_params=(stack.rows * stack.cols if shared else 0)
                + len(stack.layers) * r * (stack.rows + stack.cols),
                rel_error=0.0,
                shared=shared,
            )
        )
    stacked = {name for stack in stacks for name in stack.names}
    out.update({name: t for name, t in tensors.items() if name not in stacked})
    meta = LorsMeta(
        source=SourceMeta(str(config_dir.resolve()), [], 0, None),
        settings={"init": "scratch", "rank": rank, "reduction": reduction, "shared": shared, "seed": seed},
        groups=groups,
        kept_dense=[],
        warnings=warnings,
        tool="lors-convert init",
    )
    metadata = header_metadata(meta)
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in sorted(out.items())]
    with SafetensorsWriter(output, layout, 5 * 10**9, metadata_bytes(metadata)) as writer:
        for name, _, _ in layout:
            writer.add(name, out[name].contiguous())
        return writer.commit(metadata), meta
