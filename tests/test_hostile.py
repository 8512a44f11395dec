"""Hostile inputs and faults through the real CLI: each bad case is one line on stderr, a non-zero exit,
nothing written and the input untouched."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import struct
import warnings
from pathlib import Path

import pytest
import torch
from conftest import bert, rand
from safetensors.torch import load_file, save_file

import lors_convert.checkpoint as checkpoint
import lors_convert.conversion as convert_module
import lors_convert.lors_format as lors_format
import lors_convert.plan as plan_module
from lors_convert.lors_format import FORMAT_VERSION


def small() -> dict[str, torch.Tensor]:
    return bert(layers=3, hidden=16, inter=32)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


def assert_refused(cli, folder: Path, args: list, message: str, code: int = 1) -> None:
    """The command fails with one line naming the problem and leaves every file as it was."""
    before = snapshot(folder)
    result = cli(*args, "--quiet")
    assert result.code == code, (args, result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert message in lines[0], (message, lines[0])
    assert "Traceback" not in result.err
    assert snapshot(folder) == before


def put(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def write_safetensors_raw(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# ---------------------------------------------------------------- damaged files of each format


def truncated(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def corrupted(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    rng = random.Random(0)
    for i in rng.sample(range(len(data) // 4, len(data)), 64):
        data[i] = rng.randrange(256)
    path.write_bytes(bytes(data))
    return path


def st(tmp: Path) -> Path:
    save_file(small(), tmp / "m.safetensors")
    return tmp / "m.safetensors"


def pt_zip(tmp: Path) -> Path:
    torch.save(small(), tmp / "m.pt")
    return tmp / "m.pt"


def pt_legacy(tmp: Path) -> Path:
    torch.save(small(), tmp / "m.pt", _use_new_zipfile_serialization=False)
    return tmp / "m.pt"


def sharded_index(tmp: Path) -> Path:
    sd = small()
    names = sorted(sd)
    shards = {"m-00001-of-00002.safetensors": names[:10], "m-00002-of-00002.safetensors": names[10:]}
    for shard, keys in shards.items():
        save_file({k: sd[k] for k in keys}, tmp / shard)
    index = {"weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (tmp / "m.safetensors.index.json").write_text(json.dumps(index))
    return tmp / "m.safetensors.index.json"


def header_of(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def lying_header(tmp: Path, change) -> Path:
    header, data = header_of(st(tmp))
    change(header)
    return write_safetensors_raw(tmp / "m.safetensors", header, data)


def first_entry(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


BAD_FILES = {
    "safetensors truncated": (lambda t: truncated(st(t)), "truncated"),
    "safetensors cut in its header": (lambda t: truncated(st(t), 0.01), "does not fit the file"),
    "safetensors empty": (lambda t: put(t / "m.safetensors", b""), "too short"),
    "safetensors random bytes": (
        lambda t: put(t / "m.safetensors", random.Random(1).randbytes(4096)),
        "not a safetensors file",
    ),
    "header length lies": (
        lambda t: put(t / "m.safetensors", struct.pack("<Q", 2**40) + b"{}"),
        "does not fit the file",
    ),
    "header not JSON": (
        lambda t: put(t / "m.safetensors", struct.pack("<Q", 4) + b"\xff{[x"),
        "corrupt safetensors header",
    ),
    "header nested too deep": (
        lambda t: put(t / "m.safetensors", struct.pack("<Q", 50000) + b"[" * 50000),
        "corrupt safetensors header",
    ),
    "header shape lies": (
        lambda t: lying_header(t, lambda h: first_entry(h)["shape"].__setitem__(0, 17)),
        "offsets disagree",
    ),
    "header offsets overlap": (
        lambda t: lying_header(
            t, lambda h: h[sorted(h)[-1]].__setitem__("data_offsets", first_entry(h)["data_offsets"])
        ),
        None,
    ),
    "header offsets past the end": (
        lambda t: lying_header(t, lambda h: first_entry(h)["data_offsets"].__setitem__(1, 2**62)),
        "corrupt safetensors header",
    ),
    "header negative offset": (
        lambda t: lying_header(t, lambda h: first_entry(h)["data_offsets"].__setitem__(0, -4)),
        "bad entry",
    ),
    "header unknown dtype": (
        lambda t: lying_header(t, lambda h: first_entry(h).__setitem__("dtype", "F128")),
        "bad entry",
    ),
    "header metadata not strings": (
        lambda t: lying_header(t, lambda h: h.__setitem__("__metadata__", {"a": 1})),
        "metadata must map strings",
    ),
    "index not JSON": (lambda t: put(sharded_index(t), "{oops"), "not a valid shard index"),
    "index shard missing": (
        lambda t: (sharded_index(t), (t / "m-00002-of-00002.safetensors").unlink())[0],
        "is missing",
    ),
    "index escapes its folder": (
        lambda t: put(sharded_index(t), json.dumps({"weight_map": {"a": "../m.safetensors"}})),
        "is missing",
    ),
    "index lists an absent tensor": (
        lambda t: put(sharded_index(t), json.dumps({"weight_map": {"ghost": "m-00001-of-00002.safetensors"}})),
        "does not hold it",
    ),
    "pt zip truncated": (lambda t: truncated(pt_zip(t)), "not a readable PyTorch checkpoint"),
    "pt zip corrupt": (lambda t: corrupted(pt_zip(t)), None),
    "pt legacy truncated": (lambda t: truncated(pt_legacy(t)), None),
    "pt empty": (lambda t: put(t / "m.pt", b""), "not a readable PyTorch checkpoint"),
    "bin random bytes": (lambda t: put(t / "m.bin", random.Random(2).randbytes(4096)), None),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_damaged_input_files(tmp_path, cli, case):
    build, message = BAD_FILES[case]
    path = build(tmp_path)
    assert_refused(cli, tmp_path, [path], message or str(path.name))
    assert_refused(cli, tmp_path, ["inspect", path], message or str(path.name))


def test_corrupt_tensor_data_is_refused(tmp_path, cli):
    path = corrupted(st(tmp_path))  # random bytes in float data: NaN, Inf and huge values
    assert_refused(cli, tmp_path, [path], "NaN or Inf")


# ---------------------------------------------------------------- pickles


class RunsCode:
    def __init__(self, marker: Path, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "exec":
            return (exec, (f"open({str(self.marker)!r}, 'w').close()",))
        return (os.system, (f"touch {self.marker}",))


def evil_files(tmp: Path, marker: Path) -> list[Path]:
    files = []
    for protocol in (0, 2, 5):
        path = tmp / f"evil{protocol}.bin"
        path.write_bytes(pickle.dumps({"layers.0.w": RunsCode(marker, "exec")}, protocol=protocol))
        files.append(path)
    torch.save({"layers.0.w": torch.zeros(3, 3), "layers.1.w": RunsCode(marker, "system")}, tmp / "evil_zip.pt")
    folder = tmp / "sharded"
    folder.mkdir()
    torch.save({"layers.0.w": torch.zeros(3, 3)}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"layers.1.w": RunsCode(marker, "system")}, folder / "pytorch_model-00002-of-00002.bin")
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "layers.0.w": "pytorch_model-00001-of-00002.bin",
                    "layers.1.w": "pytorch_model-00002-of-00002.bin",
                }
            }
        )
    )
    return [*files, tmp / "evil_zip.pt", folder]


def test_pickles_that_would_run_code_are_refused_unrun(tmp_path, cli):
    marker = tmp_path / "marker"
    for path in evil_files(tmp_path, marker):
        assert_refused(cli, tmp_path, [path], "refusing to unpickle")
        assert_refused(cli, tmp_path, ["inspect", path], "nothing in the file was run")
    assert not marker.exists()
    RunsCode(marker, "exec").__reduce__()[0](*RunsCode(marker, "exec").__reduce__()[1])
    assert marker.exists()  # the payload does work when it is run: its absence above means it never ran


def quantized_ones() -> torch.Tensor:
    """A quantized tensor, as old checkpoints hold them (torch deprecates making new ones: not our warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_tensor(torch.ones(4, 4), 0.1, 0, torch.qint8)


ODD_PICKLES = {
    "no tensors": ({"epoch": 3, "lr": 0.1}, "no tensors found"),
    "a list": ([torch.zeros(2, 2)], "no state dict found"),
    "a bare tensor": (torch.zeros(2, 2), "no state dict found"),
    "tensors only inside lists": ({"layers": [torch.zeros(2, 2), torch.zeros(2, 2)]}, "no tensors found"),
    "meta tensors": ({"layers.0.w": torch.empty(4, 4, device="meta")}, "only dense tensors"),
    "sparse tensors": ({"layers.0.w": torch.eye(4).to_sparse()}, "only dense tensors"),
    "quantized tensors": (
        {"layers.0.w": quantized_ones()},
        "only dense tensors",
    ),
    "complex128 tensors": ({"layers.0.w": torch.ones(4, 4, dtype=torch.complex128)}, "only dense tensors"),
    "integer stack only": (
        {f"layers.{i}.w": torch.ones(4, 4, dtype=torch.int32) for i in range(3)},
        "no stacked layers found",
    ),
}


@pytest.mark.parametrize("case", list(ODD_PICKLES))
def test_odd_pickles(tmp_path, cli, case):
    obj, message = ODD_PICKLES[case]
    torch.save(obj, tmp_path / "m.pt")
    assert_refused(cli, tmp_path, [tmp_path / "m.pt"], message)


def test_directories_and_missing_paths(tmp_path, cli):
    (tmp_path / "empty").mkdir()
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text("{}")
    assert_refused(cli, tmp_path, [tmp_path / "empty"], "no model weights")
    assert_refused(cli, tmp_path, [tmp_path / "config_only"], "no model weights")
    assert_refused(cli, tmp_path, [tmp_path / "nope.safetensors"], "no such file")
    assert_refused(cli, tmp_path, ["report", tmp_path / "nope.safetensors"], "no such file")
    assert_refused(cli, tmp_path, ["expand", tmp_path / "nope", "-o", tmp_path / "x.safetensors"], "no such file")


# ---------------------------------------------------------------- odd contents


def test_integer_and_complex_tensors_are_kept_unchanged(tmp_path, cli):
    sd = small()
    sd.update(
        {
            "encoder.layer.0.ids": torch.arange(12, dtype=torch.int64).reshape(3, 4),
            "encoder.layer.1.ids": torch.arange(12, dtype=torch.int64).reshape(3, 4),
            "encoder.layer.0.phase": torch.ones(3, 4, dtype=torch.complex64),
            "encoder.layer.1.phase": torch.ones(3, 4, dtype=torch.complex64),
            "encoder.layer.0.count": torch.ones(3, 4, dtype=torch.uint16),
        }
    )
    torch.save(sd, tmp_path / "m.pt")
    result = cli(tmp_path / "m.pt", "--quiet", "--json")
    assert result.code == 0, result.err
    assert all("ids" not in g["template"] and "phase" not in g["template"] for g in result.json()["groups"])
    out = load_file(tmp_path / "m.lors.safetensors")
    for name in ("encoder.layer.0.ids", "encoder.layer.1.phase", "encoder.layer.0.count"):
        assert out[name].dtype == sd[name].dtype and torch.equal(out[name], sd[name])


def test_mismatched_shape_inside_a_stack_stays_dense(tmp_path, cli):
    sd = {f"layers.{i}.w": rand(16, 16, seed=i) for i in range(4)}
    sd["layers.4.w"] = rand(16, 8, seed=9)
    save_file(sd, tmp_path / "m.safetensors")
    result = cli(tmp_path / "m.safetensors", "--quiet", "--json", "--rank", "2")
    assert result.code == 0, result.err
    assert "warning" in result.err and "layers [4]" in result.err and "stay dense" in result.err
    assert [g["layers"] for g in result.json()["groups"]] == [[0, 1, 2, 3]]
    out = load_file(tmp_path / "m.lors.safetensors")
    assert torch.equal(out["layers.4.w"], sd["layers.4.w"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("option", [["--rank", "2"], ["--reduction", "0.3"], ["--energy", "0.9"]])
def test_non_finite_weights_are_refused(tmp_path, cli, bad, option):
    sd = {f"layers.{i}.w": rand(16, 16, seed=i) for i in range(4)}
    sd["layers.2.w"][3, 5] = bad
    save_file(sd, tmp_path / "m.safetensors")
    assert_refused(cli, tmp_path, [tmp_path / "m.safetensors", *option], "NaN or Inf")


def test_factors_that_overflow_the_storage_dtype_are_refused(tmp_path, cli):
    sd = {f"layers.{i}.w": rand(16, 16, seed=0) * 1e12 * (-1) ** i for i in range(4)}  # mean 0, huge residuals
    save_file(sd, tmp_path / "m.safetensors")
    assert_refused(cli, tmp_path, [tmp_path / "m.safetensors", "--rank", "2", "--dtype", "float16"], "overflow")


@pytest.mark.parametrize("shared", ["mean", "refit"])
def test_a_shared_matrix_that_overflows_the_storage_dtype_is_refused_by_name(tmp_path, cli, shared):
    sd = {f"layers.{i}.w": rand(16, 16, seed=i) + 1e5 for i in range(4)}  # S about 1e5: float16 ends at 65,504
    save_file(sd, tmp_path / "m.safetensors")
    options = ["--rank", "2", "--dtype", "float16", "--shared", shared]
    assert_refused(cli, tmp_path, [tmp_path / "m.safetensors", *options], "layers.lors_shared.w")


# ---------------------------------------------------------------- options


BAD_OPTIONS = [
    (["--rank", "-1"], "--rank", 1),
    (["--rank", "two"], "--rank", 2),
    (["--reduction", "-0.1"], "--reduction", 1),
    (["--reduction", "1"], "--reduction", 1),
    (["--reduction", "nan"], "--reduction", 1),
    (["--reduction", "inf"], "--reduction", 1),
    (["--reduction", "0.999", "--shared", "mean"], "out of reach", 1),
    (["--energy", "0"], "--energy", 1),
    (["--energy", "1.5"], "--energy", 1),
    (["--energy", "nan"], "--energy", 1),
    (["--rank", "2", "--reduction", "0.5"], "choose one", 1),
    (["--dtype", "int8"], "unknown floating dtype", 1),
    (["--dtype", "complex64"], "unknown floating dtype", 1),
    (["--dtype", "nn"], "unknown floating dtype", 1),
    (["--dtype", "float8_e4m3fnuz"], "unknown floating dtype", 1),
    (["--shard-size", "0"], "shard size", 1),
    (["--shard-size", "-5GB"], "cannot read size", 1),
    (["--shard-size", "lots"], "cannot read size", 1),
    (["--shard-size", "0.1"], "shard size", 1),
    (["--seed", "-1"], "--seed", 1),
    (["--seed", str(2**70)], "--seed", 1),
    (["--no-such-option"], "No such option", 2),
]


@pytest.mark.parametrize("args,message,code", BAD_OPTIONS, ids=[" ".join(a) for a, _, _ in BAD_OPTIONS])
def test_nonsense_options(tmp_path, cli, args, message, code):
    save_file(small(), tmp_path / "m.safetensors")
    assert_refused(cli, tmp_path, [tmp_path / "m.safetensors", *args], message, code)


def test_huge_rank_is_capped_and_keeps_groups_dense(tmp_path, cli):
    save_file(small(), tmp_path / "m.safetensors")
    result = cli(tmp_path / "m.safetensors", "--quiet", "--json", "--rank", str(10**30))
    assert result.code == 0, result.err
    report = result.json()
    assert report["stacked"]["lors_params"] <= report["stacked"]["dense_params"]


# ---------------------------------------------------------------- outputs


def test_bad_outputs(tmp_path, cli):
    index = sharded_index(tmp_path)
    shard = tmp_path / "m-00001-of-00002.safetensors"
    (tmp_path / "folder.safetensors").mkdir()
    assert_refused(cli, tmp_path, [shard, "-o", shard, "--force"], "onto the input")
    assert_refused(cli, tmp_path, [index, "-o", tmp_path / "m.safetensors", "--force"], "onto the input")
    assert_refused(cli, tmp_path, [index, "-o", tmp_path / "missing" / "x.safetensors"], "does not exist")
    assert_refused(cli, tmp_path, [index, "-o", tmp_path / "x.pt"], "must end in .safetensors")
    assert_refused(cli, tmp_path, [index, "-o", tmp_path / "folder.safetensors", "--force"], "is a folder")
    assert_refused(cli, tmp_path, ["expand", index, "-o", tmp_path / "d.safetensors"], "not a LORS checkpoint")
    assert cli(index, "-o", tmp_path / "o.safetensors", "--quiet", "--shard-size", "4kB").code == 0
    shard = sorted(tmp_path.glob("o-*.safetensors"))[0]
    assert_refused(cli, tmp_path, ["expand", tmp_path / "o.safetensors", "-o", shard, "--force"], "onto the input")
    (tmp_path / "o.safetensors.index.json").unlink()  # a previous sharded output without its index
    assert_refused(cli, tmp_path, [index, "-o", tmp_path / "o.safetensors"], "already exists")


class FullDisk(io.FileIO):
    """A file on a disk that fills up after `budget` bytes in all."""

    budget = 0

    def write(self, data) -> int:
        if len(data) > FullDisk.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        FullDisk.budget -= len(data)
        return super().write(data)


def full_disk_open(path, mode="r", *args, **kwargs):
    if "w" in mode:
        return io.BufferedWriter(FullDisk(path, "w"))
    return open(path, mode, *args, **kwargs)


@pytest.mark.parametrize("fraction", [0, 0.3, 0.6, 0.999])
@pytest.mark.parametrize("shard_size", ["5GB", "8kB"])
def test_full_disk_leaves_nothing(tmp_path, cli, monkeypatch, fraction, shard_size):
    save_file(small(), tmp_path / "m.safetensors")
    args = [tmp_path / "m.safetensors", "--rank", "2", "--shard-size", shard_size]
    monkeypatch.setattr(checkpoint, "open", full_disk_open, raising=False)
    FullDisk.budget = 10**9
    assert cli(*args, "-o", tmp_path / "fits.safetensors", "--quiet").code == 0
    needed = 10**9 - FullDisk.budget
    for path in tmp_path.glob("fits*"):
        path.unlink()
    FullDisk.budget = int(needed * fraction)
    assert_refused(cli, tmp_path, args, "No space left on device")


def raise_on_call(real, n: int = 1):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return wrapper


INTERRUPTS = {
    "reading the header": (checkpoint, "read_safetensors_header", 1, ["--rank", "2"]),
    "hashing the source": (checkpoint, "sha256_files", 1, ["--rank", "2"]),
    "the shared matrices": (convert_module, "mean_matrix", 2, ["--rank", "2"]),
    "the spectra": (convert_module, "metric_spectrum", 4, ["--reduction", "0.4"]),
    "factoring": (plan_module, "metric_low_rank", 5, ["--rank", "2"]),
    "writing tensors": (checkpoint.SafetensorsWriter, "add", 20, ["--rank", "2"]),
    "syncing the output": (os, "fsync", 1, ["--rank", "2"]),
    "renaming the shards": (os, "replace", 2, ["--rank", "2", "--shard-size", "8kB"]),
}


@pytest.mark.parametrize("stage", list(INTERRUPTS))
def test_ctrl_c_leaves_nothing(tmp_path, cli, monkeypatch, stage):
    owner, name, n, options = INTERRUPTS[stage]
    save_file(small(), tmp_path / "m.safetensors")
    monkeypatch.setattr(owner, name, raise_on_call(getattr(owner, name), n))
    assert_refused(cli, tmp_path, [tmp_path / "m.safetensors", *options], "interrupted: nothing was written", 130)


def test_ctrl_c_during_expand_leaves_nothing(tmp_path, cli, monkeypatch):
    save_file(small(), tmp_path / "m.safetensors")
    assert cli(tmp_path / "m.safetensors", "--quiet").code == 0
    monkeypatch.setattr(lors_format, "reconstruct", raise_on_call(lors_format.reconstruct, 2))
    assert_refused(
        cli,
        tmp_path,
        ["expand", tmp_path / "m.lors.safetensors", "-o", tmp_path / "d.safetensors"],
        "interrupted: nothing was written",
        130,
    )


# ---------------------------------------------------------------- damaged LORS checkpoints


def lors_file(tmp: Path, cli) -> Path:
    save_file(small(), tmp / "m.safetensors")
    assert cli(tmp / "m.safetensors", "--quiet", "--rank", "3", "--shared", "mean").code == 0
    return tmp / "m.lors.safetensors"


def rewrite(path: Path, change_tensors=None, change_meta=None) -> None:
    """Rewrite a LORS file with its tensors and/or its parsed metadata changed."""
    tensors = load_file(path)
    header, _ = header_of(path)
    metadata = header["__metadata__"]
    if change_tensors:
        change_tensors(tensors)
    if change_meta:
        metadata = change_meta(metadata)
    save_file(tensors, path, metadata=metadata)


def meta_edit(edit):
    def change(metadata: dict) -> dict:
        meta = json.loads(metadata["lors"])
        edit(meta)
        return {**metadata, "lors": json.dumps(meta)}

    return change


FACTOR = "encoder.layer.1.output.dense.weight.lora_A"
DAMAGED_LORS = {
    "a factor missing": ({"change_tensors": lambda t: t.pop(FACTOR)}, "is missing"),
    "a shared matrix missing": (
        {"change_tensors": lambda t: t.pop("encoder.layer.lors_shared.output.dense.weight")},
        "is missing",
    ),
    "a factor of the wrong shape": (
        {"change_tensors": lambda t: t.__setitem__(FACTOR, t[FACTOR][:2])},
        "the metadata implies",
    ),
    "metadata missing": ({"change_meta": lambda m: {"format": "pt"}}, "not a LORS checkpoint"),
    "metadata not JSON": ({"change_meta": lambda m: {**m, "lors": '{"format_version": 1, '}}, "corrupt LORS"),
    "metadata a list": ({"change_meta": lambda m: {**m, "lors": "[1, 2]"}}, "corrupt LORS"),
    "newer format_version": (
        {"change_meta": meta_edit(lambda m: m.__setitem__("format_version", FORMAT_VERSION + 1))},
        "newer than this tool reads",
    ),
    "format_version a string": (
        {"change_meta": meta_edit(lambda m: m.__setitem__("format_version", "1"))},
        "corrupt LORS",
    ),
    "groups missing": ({"change_meta": meta_edit(lambda m: m.pop("groups"))}, "corrupt LORS"),
    "source missing": ({"change_meta": meta_edit(lambda m: m.pop("source"))}, "corrupt LORS"),
    "group dtype not a dtype": (
        {"change_meta": meta_edit(lambda m: m["groups"][0].__setitem__("dtype", "nn"))},
        "corrupt LORS",
    ),
    "group dtype an integer type": (
        {"change_meta": meta_edit(lambda m: m["groups"][0].__setitem__("dtype", "int32"))},
        "corrupt LORS",
    ),
    "dtypes naming a non-dtype": (
        {"change_meta": meta_edit(lambda m: m.__setitem__("dtypes", {"x": "float99"}))},
        "corrupt LORS",
    ),
    "ranks shorter than the layers": (
        {"change_meta": meta_edit(lambda m: m["groups"][0]["ranks"].pop())},
        "corrupt LORS",
    ),
    "recorded error huge (found by fuzzing)": (
        {"change_meta": meta_edit(lambda m: m["groups"][0].__setitem__("rel_error", 1e308))},
        "corrupt LORS",
    ),
    "zero dense params": (
        {"change_meta": meta_edit(lambda m: m["groups"][0].__setitem__("dense_params", 0))},
        "corrupt LORS",
    ),
    "kept_dense template with a format field": (
        {
            "change_meta": meta_edit(
                lambda m: m["kept_dense"].append({"template": "{0}.{i}", "layers": [0], "reason": "x"})
            )
        },
        None,
    ),
    "truncated": ({"change_tensors": None}, "truncated"),
}

# The commands that read a LORS checkpoint; `finetune` and `eval` are one line each here when they exist.
LORS_COMMANDS = {
    "report": lambda lors, tmp: ["report", lors],
    "report --json": lambda lors, tmp: ["report", lors, "--json"],
    "expand": lambda lors, tmp: ["expand", lors, "-o", tmp / "dense.safetensors"],
    "verify": lambda lors, tmp: ["verify", lors],
    "eval": lambda lors, tmp: ["eval", lors, "-d", text_data(tmp)],
    "finetune": lambda lors, tmp: ["finetune", lors, "-d", text_data(tmp), "-o", tmp / "ft.safetensors"],
}


def text_data(folder: Path) -> Path:
    (folder / "data.txt").write_text("one line of text\nanother line\n")
    return folder / "data.txt"


@pytest.fixture(scope="module")
def sound_lors(tmp_path_factory) -> Path:
    """One LORS checkpoint, converted once: each of the 150 damage cases damages its own copy."""
    from lors_convert.cli import main

    tmp = tmp_path_factory.mktemp("sound")
    save_file(small(), tmp / "m.safetensors")
    main([str(tmp / "m.safetensors"), "--quiet", "--rank", "3", "--shared", "mean"])
    return tmp / "m.lors.safetensors"


@pytest.mark.parametrize("command", list(LORS_COMMANDS))
@pytest.mark.parametrize("damage", list(DAMAGED_LORS))
def test_damaged_lors_checkpoints(tmp_path, cli, command, damage, sound_lors):
    import shutil

    lors = Path(shutil.copy(sound_lors, tmp_path / "m.lors.safetensors"))
    change, message = DAMAGED_LORS[damage]
    if damage == "truncated":
        truncated(lors, 0.9)
    else:
        rewrite(lors, **change)
    if message is None:  # damage that is harmless: the command still works
        if command in ("eval", "finetune"):
            pytest.skip("a sound checkpoint: running it needs an architecture, which this random one lacks")
        assert cli(*LORS_COMMANDS[command](lors, tmp_path), "--quiet").code == 0
        return
    assert_refused(cli, tmp_path, LORS_COMMANDS[command](lors, tmp_path), message)


# ---------------------------------------------------------------- verify


def test_verify_accepts_a_sound_checkpoint(tmp_path, cli):
    save_file(small(), tmp_path / "m.safetensors")
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.safetensors"
        assert cli(tmp_path / "m.safetensors", "-o", out, "--dtype", dtype, "--quiet").code == 0
        result = cli("verify", out, "--source", tmp_path / "m.safetensors", "--json")
        assert result.code == 0, result.err
        assert result.json()["ok"] and result.json()["problems"] == []


def nan_in(key: str):
    return lambda t: t[key].view(-1).__setitem__(0, float("nan"))


VERIFY_DAMAGE = {
    "NaN in two factors": (
        {"change_tensors": lambda t: (nan_in(FACTOR)(t), nan_in(FACTOR[:-1] + "B")(t))},
        ["holds NaN or Inf", "holds NaN or Inf"],
        False,
    ),
    "recorded lors_params wrong": (
        {
            "change_meta": meta_edit(
                lambda m: m["groups"][1].__setitem__("lors_params", m["groups"][1]["lors_params"] + 1)
            )
        },
        ["recorded lors_params"],
        False,
    ),
    "recorded dense_params wrong": (
        {"change_meta": meta_edit(lambda m: m["groups"][0].__setitem__("dense_params", 7))},
        ["recorded dense_params"],
        False,
    ),
    "factor changed slightly": ({"change_tensors": lambda t: t[FACTOR].mul_(2)}, ["relative error is"], True),
    "recorded error wrong": (
        {
            "change_meta": meta_edit(
                lambda m: m["groups"][2].__setitem__("rel_error", m["groups"][2]["rel_error"] * 0.9)
            )
        },
        ["relative error is"],
        True,
    ),
    "sha256 differs": (
        {"change_meta": meta_edit(lambda m: m["source"].__setitem__("sha256", "0" * 64))},
        ["sha256 differs"],
        True,
    ),
}


@pytest.mark.parametrize("damage", list(VERIFY_DAMAGE))
def test_verify_lists_each_problem(tmp_path, cli, damage):
    lors = lors_file(tmp_path, cli)
    change, expected, needs_source = VERIFY_DAMAGE[damage]
    assert cli("verify", lors, "--source", tmp_path / "m.safetensors").code == 0
    rewrite(lors, **change)
    if needs_source:
        assert cli("verify", lors).code == 0  # only the source shows the problem
    result = cli("verify", lors, "--source", tmp_path / "m.safetensors")
    lines = result.err.strip().splitlines()
    assert result.code == 1 and len(lines) == len(expected), result.err
    assert all(e in line for e, line in zip(expected, lines)), result.err
