"""Hugging Face model folders from a LORS checkpoint: the LORS model with its modeling file, or the dense model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lors_convert import LorsError
from lors_convert.checkpoint import WRITTEN_BY, WRITTEN_BY_KEY, TensorSource, gguf_file, write_safetensors
from lors_convert.config import ExportConfig
from lors_convert.hf import save_gguf_description
from lors_convert.loading import architecture_folder, load
from lors_convert.lors_format import LorsMeta, read_lors

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json", ".msgpack", ".h5")


def export(path: str | Path, output: str | Path, config: ExportConfig | None = None, *, force: bool = False) -> Path:
    """Write a Hugging Face model folder: the LORS model with its modeling file (`trust_remote_code=True`; needs
    only torch and transformers) or, with `dense`, the plain dense model. Tokenizer and sentence-transformers files
    are copied from the source folder; from a GGUF source, config.json and the tokenizer are written from it. The
    folder appears under its name only once complete; `force` replaces only a folder that export wrote and nobody
    has added to (MANIFEST lists its files)."""
    config = config or ExportConfig()
    source, meta = read_lors(path)
    folder = architecture_folder(meta, config.architecture)
    if folder is None:
        raise LorsError(
            f"{path}: export needs the source's Hugging Face folder (config.json) or GGUF; pass --architecture DIR"
        )
    output = Path(output).absolute()
    if output.exists() or output.is_symlink():
        if not force:
            raise LorsError(f"{output}: already exists (use --force to replace it)")
        check_own_export(output)
    for kept in (Path(path), folder):
        if output == kept.absolute() or output in kept.absolute().parents:
            raise LorsError(f"{output}: refusing to write over {kept}")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        if gguf_file(folder) is not None:
            save_gguf_description(folder, staging)  # config.json and tokenizer: the folder needs no GGUF
        else:
            for item in folder.iterdir():  # tokenizer, sentence-transformers modules, README…: not weights or config
                if item.name != "config.json" and not item.name.endswith(WEIGHT_SUFFIXES):
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
        if config.dense:
            write_dense(source, meta, folder, staging)
        else:
            write_lors_folder(path, folder, staging)
        manifest = {**WRITTEN_BY, "files": folder_files(staging)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_folder(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


MANIFEST = "lors_export.json"


def folder_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != MANIFEST)


def check_own_export(output: Path) -> None:
    """Refuse to replace anything but a folder that export wrote, holding exactly the files it wrote."""
    try:
        manifest = json.loads((output / MANIFEST).read_text())
        own = not output.is_symlink() and manifest[WRITTEN_BY_KEY] == WRITTEN_BY[WRITTEN_BY_KEY]
        own = own and manifest["files"] == folder_files(output)
    except (OSError, ValueError, KeyError, TypeError):
        own = False
    if not own:
        raise LorsError(
            f"{output}: not a folder that lors-convert exported, or files were added to it; --force replaces only "
            "an export of its own (choose another folder)"
        )


def replace_folder(staging: Path, output: Path) -> None:
    """Put the staging folder under the output's name; an earlier export goes only once the new one is in place."""
    if not output.exists():
        os.replace(staging, output)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
    os.replace(output, aside / "old")
    try:
        os.replace(staging, output)
    except BaseException:
        os.replace(aside / "old", output)
        aside.rmdir()
        raise
    shutil.rmtree(aside)


def write_dense(source: TensorSource, meta: LorsMeta, folder: Path, out: Path) -> None:
    """config.json as it was (a GGUF's is already written) and the dense weights under their checkpoint names:
    loads with no remote code."""
    from lors_convert.lors_format import dense_layout, expand

    if gguf_file(folder) is None:
        shutil.copy2(folder / "config.json", out / "config.json")
    write_safetensors(
        out / "model.safetensors", expand(source, meta), {"format": "pt"}, layout=dense_layout(source, meta)
    )


def write_lors_folder(path: Path, folder: Path, out: Path) -> None:
    """transformers' own save of the LORS model: weights, config.json (with the swap and an auto_map naming the
    class) and lors_modeling.py."""
    meta = read_lors(path)[1]
    dtype = getattr(torch, meta.groups[0].dtype) if meta.groups else torch.float32
    model = load(path, architecture=folder, dtype=dtype)
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["auto_map"].setdefault("AutoModel", config["auto_map"][next(iter(config["auto_map"]))])
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
