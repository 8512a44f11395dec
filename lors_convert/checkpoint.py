"""Reading checkpoints lazily (safetensors, sharded, HF directories, torch pickles) and writing safetensors atomically.

Safetensors is read and written with a few lines of our own rather than the `safetensors` package so that
a tensor is read with one `pread` (no whole-file mmap whose touched pages count towards resident memory),
every header field is checked before use, and output can be streamed shard by shard.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import glob
import hashlib
import json
import math
import mmap
import os
import pickle
import re
import struct
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

from lors_convert import LorsError
from lors_convert.config import SHARD_SIZE, parse_size

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library enforces too
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_LIBC = ctypes.CDLL(None) if hasattr(mmap, "MADV_DONTNEED") else None  # for madvise on mapped checkpoints


@dataclass
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class TensorSource:
    """A checkpoint opened lazily: names, shapes and dtypes are known up front, data is read by `get`."""

    path: Path
    files: list[Path]
    info: dict[str, TensorInfo]
    read: Callable[[str], torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    # a source read out of a loaded model (a GGUF, which transformers dequantizes): that model, loaded on the first
    # call, so calibration runs the model the tensors come from instead of loading a second one
    model: Callable[[], torch.nn.Module] | None = None
    # the dtype a conversion writes unless told (None: each tensor's own): a quantized GGUF's tensors are its
    # dequantization, and in float32 a 4-bit model's conversion would be several times its size
    written_dtype: torch.dtype | None = None

    def get(self, name: str) -> torch.Tensor:
        return self.read(name)

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


# ---------------------------------------------------------------- safetensors


def _strict_json(raw: bytes):
    """JSON as the safetensors library reads it: UTF-8 without a BOM, finite numbers, no lone surrogates, and
    each key once in an object (where the library keeps the last of two tensors of one name, we refuse)."""

    def each_key_once(pairs: list[tuple]) -> dict:
        obj = {}
        for key, value in pairs:
            if key in obj:
                raise ValueError(f"{key!r} appears twice")
            obj[key] = value
        return obj

    def finite(text: str) -> float:
        number = float(text)
        if not math.isfinite(number):  # NaN, Infinity and 1e400 are not JSON numbers to the library
            raise ValueError(f"{text[:20]} is not a finite number")
        return number

    value = json.loads(raw.decode("utf-8"), object_pairs_hook=each_key_once, parse_float=finite, parse_constant=finite)
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on lone surrogates (escapes like \ud800)
    return value


def read_safetensors_header(path: Path) -> tuple[dict[str, tuple[TensorInfo, int, int]], dict[str, str], int]:
    """Parse and validate a safetensors header: {name: (info, start, end)}, metadata, data offset."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LorsError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise LorsError(f"{path}: not a safetensors file (header length {n} does not fit the file)")
        raw = f.read(n)
    try:
        header = _strict_json(raw)
    except (ValueError, RecursionError) as e:
        raise LorsError(f"{path}: corrupt safetensors header ({e.__class__.__name__}: {e})") from e
    if not isinstance(header, dict):
        raise LorsError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LorsError(f"{path}: corrupt safetensors header (metadata must map strings to strings)")
    tensors, spans = {}, []
    for name, entry in header.items():
        try:
            dtype, shape, offsets = DTYPES.get(entry["dtype"]), entry["shape"], entry["data_offsets"]
            start, end = offsets
            ok = (
                type(shape) is list
                and type(offsets) is list  # not "" or {}, which unpack like an empty list
                and all(type(d) is int and d >= 0 for d in (*shape, start, end))
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise LorsError(f"{path}: corrupt safetensors header (bad entry for {name!r})")
        if dtype is None:
            raise LorsError(
                f"{path}: bad entry for {name!r}: dtype {entry['dtype']!r} is not one this tool reads "
                f"(it reads {', '.join(DTYPES)})"
            )
        # Only a zero-element shape can be this large and still match its offsets; torch cannot build them all.
        if math.prod(max(d, 1) for d in shape) >= 2**63:
            raise LorsError(f"{path}: corrupt safetensors header (shape of {name!r} too large)")
        info = TensorInfo(tuple(shape), dtype)
        if end - start != info.numel * dtype.itemsize:
            raise LorsError(f"{path}: corrupt safetensors header ({name!r}: offsets disagree with shape and dtype)")
        tensors[name] = (info, start, end)
        spans.append((start, end))
    data_size = size - 8 - n
    covered = 0
    for start, end in sorted(spans):
        if start != covered:
            raise LorsError(f"{path}: corrupt safetensors header (tensor data overlaps or leaves a hole)")
        covered = end
    if covered != data_size:
        raise LorsError(f"{path}: truncated or padded safetensors file ({data_size} data bytes, header says {covered})")
    return tensors, metadata, 8 + n


def read_tensor_bytes(path: Path, offset: int, nbytes: int, info: TensorInfo) -> torch.Tensor:
    buf = torch.empty(nbytes, dtype=torch.uint8)  # torch's allocator: no zero-fill, memory it can reuse
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(buf.numpy()) != nbytes:
            raise LorsError(f"{path}: file changed or truncated while reading")
    return buf.view(info.dtype).reshape(info.shape)


def _owning_shards(
    path: Path, names_by_file: Iterable[tuple[Path, Iterable[str]]], weight_map: dict[str, str] | None
) -> dict[str, Path]:
    """The file each tensor is read from. With an index, a shard's tensors that the index does not list there are
    ignored, and every tensor it lists must be in its shard."""
    owner: dict[str, Path] = {}
    for file, names in names_by_file:
        for name in names:
            if weight_map is not None and weight_map.get(name) != file.name:
                continue
            if name in owner:
                raise LorsError(f"{path}: tensor {name!r} appears in two shards")
            owner[name] = file
    missing = sorted(set(weight_map or ()) - set(owner))
    if missing:
        raise LorsError(f"{path}: the index lists {missing[0]!r} but its shard does not hold it")
    return owner


def open_safetensors_files(path: Path, files: list[Path], weight_map: dict[str, str] | None = None) -> TensorSource:
    headers = {file: read_safetensors_header(file) for file in files}
    owner = _owning_shards(path, ((file, tensors) for file, (tensors, _, _) in headers.items()), weight_map)
    info, where = {}, {}
    for name, file in owner.items():
        tensors, _, data_offset = headers[file]
        tinfo, start, end = tensors[name]
        info[name] = tinfo
        where[name] = (file, data_offset + start, end - start)
    metadata = next((meta for _, meta, _ in headers.values() if meta), {})

    def read(name: str) -> torch.Tensor:
        file, offset, nbytes = where[name]
        return read_tensor_bytes(file, offset, nbytes, info[name])

    return TensorSource(path, files, info, read, metadata)


# ---------------------------------------------------------------- torch pickles


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """Find the state dict inside the usual containers and flatten nested dicts with dots."""
    for _ in range(4):
        if isinstance(obj, dict):
            inner = next(
                (
                    obj[k]
                    for k in ("state_dict", "model_state_dict", "model", "module", "net")
                    if isinstance(obj.get(k), dict)
                ),
                None,
            )
            if inner is not None and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
                continue
        break
    if not isinstance(obj, dict):
        raise LorsError(f"{path}: no state dict found (the file holds a {type(obj).__name__})")
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, d: dict) -> None:
        for key, value in d.items():
            name = f"{prefix}{key}"
            if isinstance(value, torch.Tensor):
                if name in flat:  # {"a.b": t, "a": {"b": u}}
                    raise LorsError(f"{path}: tensor {name!r} appears twice in the file (nested and flat)")
                if value.layout != torch.strided or value.device.type != "cpu" or value.dtype not in DTYPE_NAMES:
                    raise LorsError(
                        f"{path}: tensor {name!r} is a {value.layout} {value.dtype} tensor on "
                        f"{value.device}; only dense tensors of safetensors dtypes are read"
                    )
                flat[name] = value
            elif isinstance(value, dict):
                walk(name + ".", value)

    walk("", obj)
    if not flat:
        raise LorsError(f"{path}: no tensors found in the file")
    if all(k.startswith("module.") for k in flat):
        flat = {k.removeprefix("module."): v for k, v in flat.items()}
    return flat


def load_pickle_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """torch.load with weights_only=True: a pickle that would import or call anything is refused unrun.

    Also says whether the tensors are memory-mapped from the file (zip format) or were read into memory.
    """
    mapped = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about pickle protocols it does not expect
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e) and "zip" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
                mapped = False
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            why = f"it would import {found.group(1)}" if found else "it is not a plain tensor checkpoint"
            raise LorsError(
                f"{path}: refusing to unpickle: {why}; only tensors and plain containers are "
                "loaded, nothing in the file was run"
            ) from e
        except Exception as e:  # whatever torch's parser trips over in a damaged file
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise LorsError(f"{path}: not a readable PyTorch checkpoint ({first[:200]})") from e
    return _unwrap_state_dict(obj, path), mapped


def _release_pages(tensor: torch.Tensor) -> None:
    """Drop a memory-mapped tensor's file pages from our resident set (they are re-read if touched again).

    Otherwise every page read once stays resident and peak RSS grows to the size of the file. Only for
    tensors of torch.load(mmap=True): a private, never-written file mapping, so nothing is lost.
    """
    storage = tensor.untyped_storage()
    start = storage.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    _LIBC.madvise(
        ctypes.c_void_p(start), ctypes.c_size_t(storage.data_ptr() + storage.nbytes() - start), mmap.MADV_DONTNEED
    )


def return_freed_memory() -> None:
    """Make glibc return every freed matrix-sized buffer to the OS at once (a fixed 1 MiB mmap threshold).

    By default the threshold grows to the largest buffer freed so far, after which layer-sized float32
    temporaries come from the heap and fragment it: peak RSS of a 200M conversion went 386 -> 457-565 MB.
    """
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is not None:
        mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _mapped_reader(state: dict[str, torch.Tensor], mapped: bool) -> Callable[[str], torch.Tensor]:
    if not mapped or _LIBC is None:
        return lambda name: state[name]

    def read(name: str) -> torch.Tensor:
        tensor = state[name].clone()
        _release_pages(state[name])
        return tensor

    return read


def open_pickle_files(path: Path, files: list[Path], weight_map: dict[str, str] | None = None) -> TensorSource:
    if len(files) == 1 and weight_map is None:
        state, mapped = load_pickle_state_dict(files[0])
        info = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in state.items()}
        return TensorSource(path, files, info, _mapped_reader(state, mapped))
    # Sharded .bin: headers come only from loading, so read each shard once for names, then keep one open.
    shapes = {}
    for file in files:
        shapes[file] = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in load_pickle_state_dict(file)[0].items()}
    where = _owning_shards(path, shapes.items(), weight_map)
    info = {name: shapes[file][name] for name, file in where.items()}
    current: dict = {"file": None, "read": None}

    def read(name: str) -> torch.Tensor:
        if current["file"] != where[name]:
            current["file"], current["read"] = where[name], _mapped_reader(*load_pickle_state_dict(where[name]))
        return current["read"](name)

    return TensorSource(path, files, info, read)


# ---------------------------------------------------------------- dispatch


def _read_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    invalid = f"{index}: not a valid shard index (expected a JSON object with a weight_map of names to shard files)"
    try:
        content = json.loads(index.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise LorsError(invalid) from e
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise LorsError(invalid)
    files = []
    for name in sorted(set(weight_map.values())):
        file = index.parent / name
        if Path(name).name != name or not file.is_file():
            raise LorsError(f"{index}: shard {name!r} is missing")
        files.append(file)
    return files, weight_map


def gguf_file(path: str | Path) -> Path | None:
    """The GGUF file a source names, if it names one: a .gguf file (or a file that starts with GGUF's magic), or a
    folder holding exactly one .gguf and no config.json."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        return found[0] if len(found) == 1 and not (path / "config.json").exists() else None
    if not path.is_file():
        return None
    if path.suffix == ".gguf":
        return path
    with open(path, "rb") as f:
        return path if f.read(4) == b"GGUF" else None


def open_checkpoint(path: str | Path) -> TensorSource:
    """Open a checkpoint file or folder lazily: safetensors (single, sharded) or torch pickles, read without running
    code. A GGUF file is transformers' to read: hf.open_source opens both."""
    path = Path(path)
    if not path.exists():
        index = Path(f"{path}.index.json")
        if path.suffix == ".safetensors" and index.is_file():
            return open_checkpoint(index)
        raise LorsError(f"{path}: no such file or directory")
    if gguf_file(path) is not None:
        raise LorsError(f"{gguf_file(path)}: a GGUF file, read through transformers (lors_convert.hf.open_source)")
    if path.is_dir():
        for name in (
            "model.safetensors.index.json",
            "model.safetensors",
            "pytorch_model.bin.index.json",
            "pytorch_model.bin",
        ):
            if (path / name).is_file():
                return open_checkpoint(path / name)
        weights = sorted(path.glob("*.safetensors"))
        if len(weights) == 1:
            return open_checkpoint(weights[0])
        raise LorsError(
            f"{path}: no model weights in this directory (looked for model.safetensors, "
            "pytorch_model.bin and their .index.json)"
        )
    name = path.name
    if name.endswith(".index.json"):
        files, weight_map = _read_index(path)
        if all(f.suffix == ".safetensors" for f in files):
            return open_safetensors_files(path, files, weight_map)
        return open_pickle_files(path, files, weight_map)
    if name.endswith(".safetensors"):
        return open_safetensors_files(path, [path])
    if name.endswith(PICKLE_SUFFIXES):
        return open_pickle_files(path, [path])
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK" or magic[:1] == b"\x80":
        return open_pickle_files(path, [path])
    return open_safetensors_files(path, [path])


def sha256_files(files: Iterable[Path], stop: threading.Event | None = None) -> str:
    """The hex sha256 of the files' bytes in order ('' when `stop` is set before the end)."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                if stop is not None and stop.is_set():
                    return ""
                digest.update(chunk)
    return digest.hexdigest()


def sha256_at_idle_priority(files: list[Path], stop: threading.Event) -> str:
    """sha256_files from a thread at the lowest CPU priority (Linux sets it per thread), so that hashing takes only
    what the computation it overlaps leaves idle: a team of compute threads that loses a core to it waits for the
    slowest at every barrier (docs/method.md, memory pages)."""
    if sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    return sha256_files(files, stop)


@contextlib.contextmanager
def hashing_in_background(files: list[Path]) -> Iterator[Callable[[], str]]:
    """Hash the files in a thread while the caller works (hashlib releases the GIL on large chunks); yields a
    function that waits for the hex digest. Leaving the block early stops the thread at its next chunk."""
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(sha256_at_idle_priority, files, stop)
        try:
            yield future.result
        finally:
            stop.set()


# ---------------------------------------------------------------- writing


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (a byte view of its storage: no second model-sized buffer)."""
    tensor = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(tensor.view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")


Layout = list[tuple[str, torch.dtype, tuple[int, ...]]]  # (name, dtype, shape) in the order tensors are added


def header_json(entries: dict, metadata: dict[str, str]) -> bytes:
    return json.dumps({"__metadata__": metadata, **dict(sorted(entries.items()))}, separators=(",", ":")).encode()


def header_bytes(entries: dict, metadata: dict[str, str], reserve: int) -> bytes:
    """A shard's header: the JSON padded with spaces to `reserve` bytes (a multiple of 8)."""
    raw = header_json(entries, metadata)
    if len(raw) > reserve:
        raise RuntimeError(f"safetensors header of {len(raw)} bytes exceeds the {reserve} reserved")
    return raw + b" " * (reserve - len(raw))


class SafetensorsWriter:
    """Writes declared tensors into safetensors shards; nothing appears under the final names until `commit`.

    Every name, dtype and shape is declared up front, so each shard's layout is fixed before any data is
    written: data goes straight to its place in the shard (a temporary name beside the output) and the
    header, padded to a reserved size, is written last into the space left for it. Extra disk is the output's
    size, memory one tensor. `commit` renames each shard into place, the index last; any failure or interrupt
    before that removes every temporary file.
    """

    def __init__(self, path: Path, layout: Layout, shard_size: int, metadata_bytes: int):
        self.path, self.shard_size = Path(path), shard_size
        self.tmp_prefix = f".{self.path.name}.tmp{os.getpid()}"
        seen: set[str] = set()
        for name, _, _ in layout:
            if name in seen:
                raise LorsError(f"{self.path}: two tensors would be written as {name!r}")
            seen.add(name)
        self.shards: list[dict] = []
        self.where: dict[str, tuple[dict, int, torch.dtype, tuple[int, ...]]] = {}
        for name, dtype, shape in layout:
            nbytes = math.prod(shape) * dtype.itemsize
            if not self.shards or (self.shards[-1]["size"] and self.shards[-1]["size"] + nbytes > shard_size):
                self.shards.append({"entries": {}, "size": 0, "file": None})
            shard = self.shards[-1]
            shard["entries"][name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [shard["size"], shard["size"] + nbytes],
            }
            self.where[name] = (shard, shard["size"], dtype, tuple(shape))
            shard["size"] += nbytes
        if not self.shards:
            self.shards.append({"entries": {}, "size": 0, "file": None})
        # The header's size bound: the metadata's bound plus the entries (written with the widest offsets).
        for shard in self.shards:
            widest = {name: {**entry, "data_offsets": [shard["size"]] * 2} for name, entry in shard["entries"].items()}
            bound = len(header_json(widest, {})) - len(b"{}") + metadata_bytes
            shard["reserve"] = bound + (-bound % 8)
        self.temp_files = [self.path.parent / f"{self.tmp_prefix}.{final.name}" for final in self.output_files()]
        self.written: set[str] = set()

    def _file(self, shard: dict):
        if shard["file"] is None:
            shard["file"] = open(self.temp_files[self.shards.index(shard)], "wb")
        return shard["file"]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.where or name in self.written:
            raise RuntimeError(f"{name!r} was not declared, or is written twice")
        shard, offset, dtype, shape = self.where[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"{name!r}: declared {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        f = self._file(shard)
        position = 8 + shard["reserve"] + offset
        if f.tell() != position:
            f.seek(position)
        f.write(tensor_bytes(tensor))
        self.written.add(name)

    def output_files(self) -> list[Path]:
        n = len(self.shards)
        if n == 1:
            return [self.path]
        stem = self.path.name.removesuffix(".safetensors")
        return [self.path.parent / f"{stem}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    def commit(self, metadata: dict[str, str]) -> list[Path]:
        """Rename the shards into place, the index last. An earlier checkpoint under the output's name (which
        `check_output_path` found to be lors-convert's own) is moved aside first and removed only once the new one
        is whole: a rename failing partway puts it back."""
        missing = set(self.where) - self.written
        if missing:
            raise RuntimeError(f"{len(missing)} declared tensors were never written, e.g. {sorted(missing)[0]!r}")
        metadata = {**metadata, **WRITTEN_BY}
        finals = self.output_files()
        staged = []
        for shard, tmp, final in zip(self.shards, self.temp_files, finals):
            f = self._file(shard)
            f.seek(0)
            f.write(struct.pack("<Q", shard["reserve"]) + header_bytes(shard["entries"], metadata, shard["reserve"]))
            f.flush()
            os.fsync(f.fileno())
            f.close()
            staged.append((tmp, final))
        if len(finals) > 1:
            weight_map = {name: final.name for shard, final in zip(self.shards, finals) for name in shard["entries"]}
            index = {
                "metadata": {**metadata, "total_size": str(sum(s["size"] for s in self.shards))},
                "weight_map": dict(sorted(weight_map.items())),
            }
            tmp = self.path.parent / f"{self.tmp_prefix}.index"
            self.temp_files.append(tmp)
            with open(tmp, "wb") as f:
                f.write(json.dumps(index, indent=2).encode())
                f.flush()
                os.fsync(f.fileno())
            staged.append((tmp, index_path(self.path)))
        earlier = [p for p in output_layout_files(self.path) if p.is_file()]
        if not all(map(written_by_lors_convert, earlier)):
            raise LorsError(f"{self.path}: files of another checkpoint appeared under this name while writing")
        aside = [(p, p.with_name(f"{self.tmp_prefix}.old.{p.name}")) for p in earlier]
        moved, renamed = [], []
        try:  # an interrupt between renames must leave the earlier checkpoint whole, not a mix of the two
            for final, old in aside:
                os.replace(final, old)
                moved.append((final, old))
            for tmp, final in staged:
                os.replace(tmp, final)
                renamed.append(final)
        except BaseException:
            for final in renamed:
                final.unlink(missing_ok=True)
            for final, old in moved:
                os.replace(old, final)
            raise
        fsync_folder(self.path.parent)
        self.cleanup()
        for _, old in aside:
            old.unlink()
        return renamed

    def cleanup(self) -> None:
        for shard in self.shards:
            if shard["file"] is not None:
                with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                    shard["file"].close()
        for tmp in self.temp_files:
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


SHARD_BYTES = parse_size(SHARD_SIZE)  # output above this size is sharded, unless told otherwise


def write_safetensors(
    path: Path,
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
    *,
    layout: Layout | None = None,
    shard_size: int = SHARD_BYTES,
    advance: Callable[[], None] | None = None,
) -> list[Path]:
    """Write a safetensors checkpoint atomically (SafetensorsWriter) and return its files: a dict of tensors, in
    name order, or (name, tensor) pairs produced one at a time in the order `layout` declares them (memory one
    tensor). `advance` is called after each tensor."""
    if layout is None:
        layout = [(name, tensors[name].dtype, tuple(tensors[name].shape)) for name in sorted(tensors)]
    pairs = ((name, tensors[name]) for name, _, _ in layout) if isinstance(tensors, Mapping) else tensors
    with SafetensorsWriter(path, layout, shard_size, metadata_bytes(metadata)) as writer:
        for name, tensor in pairs:
            writer.add(name, tensor)
            if advance is not None:
                advance()
        return writer.commit(metadata)


WRITTEN_BY_KEY = "written_by"
WRITTEN_BY = {WRITTEN_BY_KEY: "lors-convert"}  # in every header and index this tool writes


def metadata_bytes(metadata: dict[str, str]) -> int:
    """The serialized size of a header's metadata object (with the writer's mark), for SafetensorsWriter's
    reservation."""
    return len(json.dumps({**metadata, **WRITTEN_BY}, separators=(",", ":")).encode())


def output_layout_files(output: Path) -> list[Path]:
    """Every file that belongs to a checkpoint written under this name: the single file, shards and index."""
    stem = glob.escape(output.name.removesuffix(".safetensors"))
    return [output, index_path(output), *sorted(output.parent.glob(f"{stem}-*-of-*.safetensors"))]


def written_by_lors_convert(path: Path) -> bool:
    """Whether a safetensors file or index carries lors-convert's mark (or, from before the mark, LORS metadata):
    the only files `--force` may replace."""
    try:
        if path.name.endswith(".index.json"):
            metadata = json.loads(path.read_text()).get("metadata") or {}
        else:
            metadata = read_safetensors_header(path)[1]
    except (OSError, ValueError, LorsError, AttributeError):
        return False
    return metadata.get(WRITTEN_BY_KEY) == WRITTEN_BY[WRITTEN_BY_KEY] or "lors" in metadata


def remove_checkpoint(path: Path) -> None:
    """Delete the checkpoint this tool wrote under `path`: the single file, or the index (first, so no half
    checkpoint is left readable) and the shards it names. Files without lors-convert's mark stay."""
    index = index_path(path)
    files = [index, *_read_index(index)[0]] if index.is_file() else [path]  # the index alone names the shards
    for file in files:
        if file.is_file() and written_by_lors_convert(file):
            file.unlink()
    fsync_folder(Path(path).parent)


def fsync_folder(folder: Path) -> None:
    """Make renames in a folder durable (a no-op where folders cannot be opened, as on Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def index_path(path: Path) -> Path:
    return Path(f"{path}.index.json")


def check_output_path(output: Path, inputs: Iterable[Path], force: bool) -> None:
    """Refuse writing onto the input, into a missing folder, or over an existing output without --force."""
    output = Path(output)
    if not output.parent.is_dir():
        raise LorsError(f"{output}: the folder {output.parent} does not exist")
    if output.suffix != ".safetensors":
        raise LorsError(f"{output}: the output must end in .safetensors")
    inputs = [Path(p) for p in inputs]
    resolved = {p.resolve() for p in inputs} | {f.resolve() for p in inputs if p.is_dir() for f in p.iterdir()}
    if any(candidate.resolve() in resolved for candidate in output_layout_files(output)):
        raise LorsError(f"{output}: refusing to write onto the input")
    for candidate in output_layout_files(output):
        if candidate.is_dir():
            raise LorsError(f"{candidate}: is a folder")
        if candidate.exists() and not force:
            raise LorsError(f"{candidate}: already exists (use --force to overwrite)")
        if candidate.exists() and not written_by_lors_convert(candidate):
            raise LorsError(
                f"{candidate}: exists and was not written by lors-convert; --force replaces only lors-convert's own "
                "checkpoints (choose another output name)"
            )
