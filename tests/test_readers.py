"""The readers: sizes, layer names, shard indexes, sharded pickles and calibration data give one-line
LorsErrors that chain their cause; calibration and eval read and call a model the same way; and our
safetensors reader agrees with the `safetensors` library (a differential test)."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import bert, rand
from factory_models import StackedMLP
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from test_fuzz import fuzz_readers
from test_hostile import assert_refused
from torch import nn

from lors_convert import LorsError
from lors_convert.calibrate import collect_pair
from lors_convert.checkpoint import TensorInfo, open_checkpoint, open_pickle_files
from lors_convert.config import parse_size
from lors_convert.runtime import call_model
from lors_convert.stacks import find_stacks

ROOT = Path(__file__).resolve().parent.parent


def small_model(folder: Path) -> Path:
    save_file(bert(layers=3, hidden=16, inter=32), folder / "m.safetensors")
    return folder / "m.safetensors"


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("text", ["5i", "5ib", "5 IB", "2kibb", "1bb", "2 k b", "٥GB", "1e3", "GB", ""])
def test_odd_shard_sizes_are_one_line_errors_naming_the_text(tmp_path, cli, text):
    model = small_model(tmp_path)
    assert_refused(cli, tmp_path, [model, "--shard-size", text], f"cannot read size {text!r}")
    assert_refused(
        cli,
        tmp_path,
        ["expand", model, "-o", tmp_path / "d.safetensors", "--shard-size", text],
        f"cannot read size {text!r}",
    )


def test_sizes_are_exact():
    assert parse_size("1.005kB") == 1005  # not 1004.9999… rounded down
    assert parse_size("5GB") == parse_size("5 gb") == 5 * 10**9
    assert parse_size("1.5 GiB") == 3 * 2**29
    assert parse_size("2kib") == parse_size("2 KiB") == 2048
    assert parse_size("9" * 20 + "TB") == int("9" * 20) * 10**12
    with pytest.raises(LorsError, match="cannot read size"):
        parse_size("9" * 400)  # no float overflow


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789.kKmMgGtTiIbB -+e٥²", max_size=8))
def test_any_size_text_is_a_size_or_a_lors_error(text):
    try:
        assert parse_size(text) > 0
    except LorsError as e:
        assert "\n" not in str(e)


# ---------------------------------------------------------------- layer indices


def test_only_ascii_digits_are_layer_indices(tmp_path, cli):
    odd = ["layers.².w", "layers.٣.w", "layers.①.w", "layers.३.w"]
    sd = {f"layers.{i}.w": rand(8, 8, seed=i) for i in range(3)} | {name: rand(8, 8, seed=9) for name in odd}
    info = {name: TensorInfo(tuple(t.shape), t.dtype) for name, t in sd.items()}
    assert [(s.template, s.layers) for s in find_stacks(info)[0]] == [("layers.{i}.w", [0, 1, 2])]
    del info["layers.2.w"]  # "٣" is not layer 3 either
    assert [(s.template, s.layers) for s in find_stacks(info)[0]] == [("layers.{i}.w", [0, 1])]
    save_file(sd, tmp_path / "m.safetensors")
    result = cli("inspect", tmp_path / "m.safetensors", "--json")
    assert result.code == 0, result.err
    assert [g["layers"] for g in result.json()["groups"]] == [[0, 1, 2]]
    assert cli(tmp_path / "m.safetensors", "--rank", "2", "--quiet").code == 0
    assert cli("expand", tmp_path / "m.lors.safetensors", "-o", tmp_path / "d.safetensors", "--quiet").code == 0
    dense = open_checkpoint(tmp_path / "d.safetensors")
    assert set(dense.info) == set(sd)
    assert all(torch.equal(dense.get(name), sd[name]) for name in odd)  # kept as they were, under their names


# ---------------------------------------------------------------- shard indexes


def sharded_safetensors(folder: Path) -> Path:
    save_file({"layers.0.w": rand(4, 4, seed=0)}, folder / "m-1.safetensors")
    save_file({"layers.1.w": rand(4, 4, seed=1)}, folder / "m-2.safetensors")
    return folder / "m.safetensors.index.json"


BAD_INDEXES = {
    "weight_map a list": {"weight_map": ["m-1.safetensors"]},
    "a shard name not a string": {"weight_map": {"layers.0.w": 1}},
    "not an object": ["weight_map"],
    "no weight_map": {"metadata": {}},
    "an empty weight_map": {"weight_map": {}},
}


@pytest.mark.parametrize("case", list(BAD_INDEXES))
def test_bad_index_is_one_line_error(tmp_path, cli, case):
    index = sharded_safetensors(tmp_path)
    index.write_text(json.dumps(BAD_INDEXES[case]))
    assert_refused(cli, tmp_path, ["inspect", index], "not a valid shard index")


UNDER_O = """
import sys
from lors_convert.cli import main
print(sys.flags.optimize)
for path in sys.argv[1:]:
    try:
        main(["inspect", path])
    except SystemExit as e:
        print(e.code)
"""


def test_no_check_in_the_package_is_an_assert():
    """`python -O` removes asserts: a check written as one would let a bad input through (the test below runs it)."""
    import ast

    found = [
        f"{path.name}:{node.lineno}"
        for path in sorted((ROOT / "lors_convert").glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert not found, found


@pytest.mark.slow
def test_bad_index_is_refused_under_python_O(tmp_path):
    """The checks are not `assert`s, which `python -O` removes (one interpreter for both cases: it is the slow part)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cases = ("weight_map a list", "a shard name not a string")
    indexes = []
    for n, case in enumerate(cases):
        (tmp_path / str(n)).mkdir()
        indexes.append(sharded_safetensors(tmp_path / str(n)))
        indexes[-1].write_text(json.dumps(BAD_INDEXES[case]))
    done = subprocess.run(
        [sys.executable, "-O", "-c", UNDER_O, *map(str, indexes)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.stdout.split() == ["1", "1", "1"], done.stdout + done.stderr  # -O, then each exit code
    lines = done.stderr.strip().splitlines()
    assert len(lines) == len(cases) and all("not a valid shard index" in line for line in lines), done.stderr


# ---------------------------------------------------------------- sharded pickles


def write_shards(folder: Path, suffix: str, shards: dict[str, dict], weight_map: dict[str, str]) -> Path:
    """Shards `name -> tensors` as .bin pickles or .safetensors, with their index."""
    for shard, tensors in shards.items():
        (torch.save if suffix == ".bin" else save_file)(tensors, folder / f"{shard}{suffix}")
    stem = "pytorch_model.bin" if suffix == ".bin" else "model.safetensors"
    index = folder / f"{stem}.index.json"
    index.write_text(json.dumps({"weight_map": {k: v + suffix for k, v in weight_map.items()}}))
    return index


LAYERS = {f"layers.{i}.w": rand(6, 6, seed=i) for i in range(3)}


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_index_listing_a_tensor_its_shard_lacks_is_refused(tmp_path, cli, suffix):
    shards = {"s1": {k: LAYERS[k] for k in ("layers.0.w", "layers.1.w")}, "s2": {"layers.2.w": LAYERS["layers.2.w"]}}
    index = write_shards(
        tmp_path, suffix, shards, {"layers.0.w": "s1", "layers.1.w": "s1", "layers.2.w": "s2", "ghost": "s2"}
    )
    assert_refused(cli, tmp_path, ["inspect", index], "the index lists 'ghost' but its shard does not hold it")
    assert_refused(cli, tmp_path, ["inspect", tmp_path], "does not hold it")


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_index_with_a_single_shard_is_checked_too(tmp_path, cli, suffix):
    index = write_shards(tmp_path, suffix, {"s1": LAYERS}, {**{k: "s1" for k in LAYERS}, "ghost": "s1"})
    assert_refused(cli, tmp_path, ["inspect", index], "does not hold it")


def test_pickle_shards_repeating_a_name_are_refused(tmp_path):
    torch.save({"layers.0.w": LAYERS["layers.0.w"]}, tmp_path / "a.bin")
    torch.save({"layers.0.w": LAYERS["layers.1.w"]}, tmp_path / "b.bin")
    with pytest.raises(LorsError, match="'layers.0.w' appears in two shards"):
        open_pickle_files(tmp_path, [tmp_path / "a.bin", tmp_path / "b.bin"])


def test_pickle_naming_a_tensor_twice_is_refused(tmp_path, cli):
    """{"a.b": t, "a": {"b": u}} flattens to "a.b" twice: refused rather than one silently dropped."""
    torch.save(
        {
            "layers.0.w": LAYERS["layers.0.w"],
            "layers": {"0": {"w": LAYERS["layers.1.w"]}},
            "layers.1.w": LAYERS["layers.1.w"],
        },
        tmp_path / "m.pt",
    )
    assert_refused(cli, tmp_path, ["inspect", tmp_path / "m.pt"], "'layers.0.w' appears twice")


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_shard_tensors_the_index_does_not_list_there_are_ignored(tmp_path, suffix):
    """The same for pickles and safetensors: a tensor is read from the shard the index names, nowhere else."""
    shards = {
        "s1": {"layers.0.w": LAYERS["layers.0.w"], "layers.1.w": rand(6, 6, seed=99), "extra": rand(2, seed=7)},
        "s2": {"layers.1.w": LAYERS["layers.1.w"], "layers.2.w": LAYERS["layers.2.w"]},
    }
    index = write_shards(tmp_path, suffix, shards, {"layers.0.w": "s1", "layers.1.w": "s2", "layers.2.w": "s2"})
    source = open_checkpoint(index)
    assert sorted(source.info) == sorted(LAYERS)
    assert all(torch.equal(source.get(name), LAYERS[name]) for name in LAYERS)


# ---------------------------------------------------------------- calibration: a forward that skips a layer


class Branchy(nn.Module):
    """Three Linear layers; the middle one is skipped for inputs whose first feature sums below zero."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x):
        h = self.layers[0](x)
        if x[..., 0].sum() >= 0:
            h = self.layers[1](torch.tanh(h))
        return self.layers[2](torch.tanh(h))

    def inputs(self, x) -> dict[str, torch.Tensor]:
        """The same forward by hand: each layer's input, for the layers this input reaches."""
        seen, h = {"layers.0.weight": x}, self.layers[0](x)
        if x[..., 0].sum() >= 0:
            seen["layers.1.weight"] = torch.tanh(h)
            h = self.layers[1](torch.tanh(h))
        seen["layers.2.weight"] = torch.tanh(h)
        return seen


def test_collect_pair_restarts_for_each_batch_when_a_forward_skips_a_layer():
    original, converted = Branchy(seed=0), Branchy(seed=1)
    names = [f"layers.{i}.weight" for i in range(3)]
    batches = []
    for i, sign in enumerate([-1, 1, -1, 1, 1]):  # the first batch skips layer 1, the second does not
        x = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(i))
        x[..., 0] = sign * x[..., 0].abs()
        batches.append({"x": x})
    covariances, cross = collect_pair(original, converted, names, batches, torch.device("cpu"))
    expected_c = {name: torch.zeros(5, 5, dtype=torch.float64) for name in names}  # [X 1]ᵀ[X 1]
    expected_g = {name: torch.zeros(5, 5, dtype=torch.float64) for name in names}
    with torch.no_grad():
        for batch in batches:
            x_orig, x_conv = original.inputs(batch["x"]), converted.inputs(batch["x"])
            for name, x_hat in x_conv.items():
                x_hat, x = x_hat.reshape(-1, 4).double(), x_orig[name].reshape(-1, 4).double()
                x_hat, x = (torch.cat([t, torch.ones(len(t), 1, dtype=t.dtype)], dim=1) for t in (x_hat, x))
                expected_c[name] += x_hat.T @ x_hat
                expected_g[name] += x_hat.T @ x
    for name in names:
        torch.testing.assert_close(covariances[name], expected_c[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cross[name], expected_g[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- calibration data


CALIBRATION_DATA = {
    "first dimensions differ": {"x": torch.randn(8, 5, 16), "y": torch.randn(3, 16)},
    "a scalar": {"x": torch.randn(8, 5, 16), "s": torch.tensor(1.0)},
    "no tensors": {},
}


@pytest.mark.parametrize("case", list(CALIBRATION_DATA))
def test_calibration_tensor_files_are_checked_like_eval_data(tmp_path, cli, case):
    torch.manual_seed(0)
    save_file(StackedMLP().state_dict(), tmp_path / "mlp.safetensors")
    save_file(CALIBRATION_DATA[case], tmp_path / "inputs.safetensors")
    assert_refused(
        cli,
        tmp_path,
        [
            tmp_path / "mlp.safetensors",
            "--calibrate",
            tmp_path / "inputs.safetensors",
            "--model-factory",
            "factory_models:stacked_mlp",
        ],
        "must share their first dimension",
    )


# ---------------------------------------------------------------- one call rule for calibration and eval


CALLS: list[tuple[int, tuple[str, ...]]] = []  # (positional tensors, keyword names) of each forward


class RecordingMLP(StackedMLP):
    def forward(self, *args, **kwargs):
        CALLS.append((len(args), tuple(sorted(kwargs))))
        (x,) = [*args, *kwargs.values()]
        return super().forward(x)


def recording_mlp() -> nn.Module:
    return RecordingMLP()


def test_calibration_and_eval_call_a_factory_model_the_same_way(tmp_path, cli):
    torch.manual_seed(0)
    save_file(RecordingMLP().state_dict(), tmp_path / "mlp.safetensors")
    save_file({"input_ids": torch.randn(12, 5, 16)}, tmp_path / "ids.safetensors")
    factory = ["--model-factory", "test_readers:recording_mlp"]
    CALLS.clear()
    result = cli(
        tmp_path / "mlp.safetensors", "--rank", "2", "--calibrate", tmp_path / "ids.safetensors", *factory, "--quiet"
    )
    assert result.code == 0, result.err
    calibration_calls = set(CALLS)
    CALLS.clear()
    result = cli("eval", tmp_path / "mlp.lors.safetensors", "-d", tmp_path / "ids.safetensors", *factory, "--quiet")
    assert result.code == 0, result.err
    assert calibration_calls == set(CALLS) == {(1, ())}


class FromTransformers(nn.Module):
    __module__ = "transformers.models.fake"  # how call_model tells a Hugging Face model

    def forward(self, *args, **kwargs):
        return len(args), tuple(sorted(kwargs))


class Plain(nn.Module):  # not a subclass: a subclass of a transformers model is one (lors_convert.load's are)
    __module__ = "my_models"

    def forward(self, *args, **kwargs):
        return len(args), tuple(sorted(kwargs))


def test_one_dispatch_rule_for_model_inputs():
    one, two = {"input_ids": torch.ones(1)}, {"input_ids": torch.ones(1), "attention_mask": torch.ones(1)}
    assert call_model(Plain(), one) == (1, ())
    assert call_model(Plain(), two) == (0, ("attention_mask", "input_ids"))
    assert call_model(FromTransformers(), one) == (0, ("input_ids",))
    assert call_model(FromTransformers(), one, output_hidden_states=True) == (0, ("input_ids", "output_hidden_states"))


# ---------------------------------------------------------------- errors chain their cause


def raw_safetensors(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def test_errors_chain_their_cause(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(raw_safetensors(b"{oops"))
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 not a zip")
    (tmp_path / "evil.pt").write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    (tmp_path / "m.safetensors.index.json").write_text("{oops")
    unchained = []
    for path, message in (
        ("bad.safetensors", "corrupt safetensors header"),
        ("bad.pt", "not a readable PyTorch"),
        ("evil.pt", "refusing to unpickle"),
        ("m.safetensors.index.json", "not a valid shard index"),
    ):
        with pytest.raises(LorsError, match=message) as caught:
            open_checkpoint(tmp_path / path)
        assert "\n" not in str(caught.value)
        if caught.value.__cause__ is None:
            unchained.append(path)
    assert unchained == []


# ---------------------------------------------------------------- differential: our safetensors reader and the library

# Where our reader and the library legitimately disagree: (the side that refuses, a fragment of its error, why).
LEGIT_DIFFERENCES = [
    (
        "ours",
        "is not one this tool reads",
        "F4, F6_*, F8_E8M0 and the FNUZ float8s: nothing here factors or writes them back",
    ),
    (
        "ours",
        "appears twice",
        "a key twice in one JSON object is ambiguous; the library keeps the last tensor "
        "(or metadata value) of that name",
    ),
    (
        "ours",
        "too large",
        "a zero-element shape whose other dimensions multiply past 2^63: torch cannot build "
        "every such shape, so we refuse them all",
    ),
    (
        "library",
        "recursion limit exceeded",
        "JSON nested deeper than serde_json's 128 levels in a field nobody reads; Python's json goes deeper",
    ),
    ("library", "`-0.0`", "JSON -0 in a shape: an integer (0) to Python, a float to serde_json"),
]


def described(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tensor.dtype, bytes(tensor.reshape(-1).view(torch.uint8).numpy())


def read_ours(path: Path) -> tuple[dict, dict] | str:
    """({name: (shape, dtype, bytes)}, metadata), or the message of the LorsError (anything else fails the test)."""
    try:
        source = open_checkpoint(path)
        return {name: described(source.get(name)) for name in source.info}, source.metadata
    except LorsError as e:
        return str(e)


def read_library(path: Path) -> tuple[dict, dict] | str:
    try:
        with safe_open(path, framework="pt") as f:
            return {name: described(f.get_tensor(name)) for name in f.keys()}, f.metadata() or {}
    except Exception as e:  # SafetensorError, or torch refusing a shape the header allows
        return str(e)


def disagreement(path: Path) -> str | None:
    """None when both readers refuse, or both read the same tensors and metadata; else what differs."""
    ours, library = read_ours(path), read_library(path)
    if isinstance(ours, str) and isinstance(library, str):
        return None
    if not isinstance(ours, str) and not isinstance(library, str):
        return None if ours == library else "both read the file but get different tensors or metadata"
    side, message = ("ours", ours) if isinstance(ours, str) else ("library", library)
    return f"only {side} refuses: {message}"


def is_legit(difference: str | None) -> bool:
    return difference is None or any(
        difference.startswith(f"only {side} refuses") and fragment in difference
        for side, fragment, _ in LEGIT_DIFFERENCES
    )


def various_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    floats = torch.randn(3, 5, generator=g)
    return {
        "f32": floats,
        "f16": floats.half(),
        "bf16": floats.bfloat16(),
        "f64": floats.double(),
        "f8_e4m3": floats.to(torch.float8_e4m3fn),
        "f8_e5m2": floats.to(torch.float8_e5m2),
        "c64": torch.randn(2, 2, dtype=torch.complex64, generator=g),
        "bool": floats > 0,
        "i64": torch.tensor([-(2**62), 0, 2**62]),
        "i32": torch.tensor([-5, 7], dtype=torch.int32),
        "i16": torch.tensor([-300], dtype=torch.int16),
        "i8": torch.tensor([-1, 1], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "u16": torch.tensor([1, 2], dtype=torch.uint16),
        "u32": torch.tensor([3], dtype=torch.uint32),
        "u64": torch.tensor([2**40]).view(torch.uint64),
        "empty": torch.empty(0, 3),
        "empty bf16": torch.empty(2, 0, 4, dtype=torch.bfloat16),
        "scalar": torch.tensor(1.5),
        "scalar i8": torch.tensor(-7, dtype=torch.int8),
        'odd name: ü."x"\\/\n': torch.ones(2),
    }


def valid_files(folder: Path) -> list[bytes]:
    save_file(various_tensors(), folder / "various", metadata={"format": "pt", "note": "ünï ✓"})
    save_file({f"layers.{i}.w": rand(i % 4, 3, seed=i) for i in range(64)}, folder / "many")
    return [(folder / "various").read_bytes(), (folder / "many").read_bytes()]


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def rewritten(data: bytes, change) -> bytes:
    """The file with its parsed header changed by `change(header)` and written back."""
    header, rest = split(data)
    change(header)
    return raw_safetensors(json.dumps(header).encode(), rest)


def header_text(data: bytes, old: bytes, new: bytes) -> bytes:
    """The header with one piece of its text replaced (and its length fixed)."""
    (n,) = struct.unpack("<Q", data[:8])
    return raw_safetensors(data[8 : 8 + n].replace(old, new, 1), data[8 + n :])


F32 = b'"dtype":"F32","shape":[1],"data_offsets":[0,4]'


def one_tensor(extra: bytes = b"", name: bytes = b"a", dtype: bytes = b"F32", shape: bytes = b"[1]") -> bytes:
    return raw_safetensors(
        b'{"%s":{"dtype":"%s","shape":%s,"data_offsets":[0,4]%s}}' % (name, dtype, shape, extra), b"\0\0\x80\x3f"
    )


def zero_elements(shape: bytes) -> bytes:
    return raw_safetensors(b'{"a":{"dtype":"F32","shape":%s,"data_offsets":[0,0]}}' % shape)


def hand_written_cases(various: bytes) -> dict[str, bytes]:
    (n,) = struct.unpack("<Q", various[:8])
    last = max(split(various)[0].items(), key=lambda kv: kv[1].get("data_offsets", [0])[0])[0]
    return {
        "valid": various,
        "truncated by one byte": various[:-1],
        "truncated in the header": various[:40],
        "shorter than the length field": various[:5],
        "a byte appended": various + b"\0",
        "header length one more": struct.pack("<Q", n + 1) + various[8:],
        "header length one less": struct.pack("<Q", n - 1) + various[8:],
        "header length 2^64-1": struct.pack("<Q", 2**64 - 1) + various[8:],
        "header length past the end": struct.pack("<Q", len(various)) + various[8:],
        "invalid UTF-8 in the header": various[:20] + b"\xff" + various[21:],
        "a JSON brace flipped": various[:8] + b"[" + various[9:],
        "header not an object (array)": raw_safetensors(b"[]"),
        "header not an object (number)": raw_safetensors(b"1"),
        "header not an object (string)": raw_safetensors(b'"x"'),
        "header null": raw_safetensors(b"null"),
        "header empty": raw_safetensors(b""),
        "header nested 5000 deep": raw_safetensors(b"[" * 5000 + b"]" * 5000),
        "offsets overlap": rewritten(various, lambda h: h[last].__setitem__("data_offsets", h["f32"]["data_offsets"])),
        "offsets end before start": rewritten(various, lambda h: h["f32"]["data_offsets"].reverse()),
        "offsets past the end": rewritten(various, lambda h: h["f32"]["data_offsets"].__setitem__(1, 2**62)),
        "offsets 2^64": rewritten(various, lambda h: h["f32"]["data_offsets"].__setitem__(1, 2**64)),
        "a hole before the last tensor": rewritten(
            various + b"\0" * 4, lambda h: h[last].__setitem__("data_offsets", [o + 4 for o in h[last]["data_offsets"]])
        ),
        "three offsets": rewritten(various, lambda h: h["f32"]["data_offsets"].append(0)),
        "unknown dtype": rewritten(various, lambda h: h["f32"].__setitem__("dtype", "F33")),
        "lowercase dtype": rewritten(various, lambda h: h["f32"].__setitem__("dtype", "f32")),
        "dtype a number": rewritten(various, lambda h: h["f32"].__setitem__("dtype", 1)),
        "dtype a list": rewritten(various, lambda h: h["f32"].__setitem__("dtype", ["F32"])),
        "shape disagrees": rewritten(various, lambda h: h["f32"]["shape"].__setitem__(0, 4)),
        "negative dimension": rewritten(various, lambda h: h["f32"]["shape"].__setitem__(0, -3)),
        "shape a string": rewritten(various, lambda h: h["f32"].__setitem__("shape", "35")),
        "scalar shape an empty string": rewritten(various, lambda h: h["scalar"].__setitem__("shape", "")),
        "scalar shape an empty object": rewritten(various, lambda h: h["scalar"].__setitem__("shape", {})),
        "offsets a string of two digits": zero_elements(b"[0]").replace(b"[0,0]", b'"00"'),
        "offsets an object": one_tensor().replace(b"[0,4]", b'{"0":0,"4":4}'),
        "entry missing a field": rewritten(various, lambda h: h["f32"].pop("shape")),
        "entry not an object": rewritten(various, lambda h: h.__setitem__("f32", [1, 2])),
        "extra fields in an entry": rewritten(various, lambda h: h["f32"].update(x=[1, {"y": None}], z="w")),
        "metadata values not strings": rewritten(various, lambda h: h["__metadata__"].__setitem__("n", 1)),
        "metadata a list": rewritten(various, lambda h: h.__setitem__("__metadata__", [])),
        "metadata an empty string": rewritten(various, lambda h: h.__setitem__("__metadata__", "")),
        "metadata false": rewritten(various, lambda h: h.__setitem__("__metadata__", False)),
        "metadata null": rewritten(various, lambda h: h.__setitem__("__metadata__", None)),
        "metadata shaped like a tensor": rewritten(
            various, lambda h: h.__setitem__("__metadata__", {"dtype": "F32", "shape": "[1]"})
        ),
        "no tensors": raw_safetensors(b"{}"),
        "only metadata": raw_safetensors(b'{"__metadata__":{"a":"b"}}'),
        "header padded with spaces": header_text(various, b"}", b"}   "),
        "header padded with tabs and newlines": header_text(various, b"}", b"}\t\r\n"),
        "header padded with NULs": header_text(various, b"}", b"}\0\0\0"),
        "garbage after the JSON": header_text(various, b"}", b"} x"),
        "leading whitespace": raw_safetensors(b" \n{" + F32.join([b'"a":{', b"}"]) + b"}", b"\0" * 4),
        "UTF-8 BOM": raw_safetensors(b"\xef\xbb\xbf{" + F32.join([b'"a":{', b"}"]) + b"}", b"\0" * 4),
        "UTF-16 header": raw_safetensors(('{"a":{' + F32.decode() + "}}").encode("utf-16"), b"\0" * 4),
        "NaN in an extra field": one_tensor(b',"x":NaN'),
        "Infinity in an extra field": one_tensor(b',"x":-Infinity'),
        "1e400 in an extra field": one_tensor(b',"x":1e400'),
        "a huge integer in an extra field": one_tensor(b',"x":' + b"9" * 40),
        "nested 200 deep in an extra field": one_tensor(b',"x":' + b"[" * 200 + b"]" * 200),
        "escaped name": one_tensor(name=b"\\u0061\\n"),
        "NUL in a name": one_tensor(name=b"a\\u0000"),
        "emoji as a surrogate pair": one_tensor(name=b"\\ud83d\\ude00"),
        "lone surrogate in a name": one_tensor(name=b"\\ud800"),
        "lone surrogate in an extra field": one_tensor(b',"x":["\\udc00"]'),
        "lone surrogate in metadata": raw_safetensors(b'{"__metadata__":{"a":"\\ud800"}}'),
        "control character in a name": one_tensor(name=b"a\x01"),
        "dimension a float": one_tensor(shape=b"[1.0]"),
        "dimension 1e0": one_tensor(shape=b"[1e0]"),
        "dimension true": one_tensor(shape=b"[true]"),
        "dimension -0": zero_elements(b"[-0]"),
        "dimension with a leading zero": one_tensor(shape=b"[01]"),
        "a non-ASCII digit": one_tensor(shape=b"[\xd9\xa1]"),
        "zero elements, a dimension 2^62": zero_elements(b"[4611686018427387904,0]"),
        "zero elements, dimensions 2^62 and 2": zero_elements(b"[4611686018427387904,2,0]"),
        "zero elements, dimensions 2^62 and 4": zero_elements(b"[0,4611686018427387904,4]"),
        "zero elements, a dimension 2^63": zero_elements(b"[0,9223372036854775808]"),
        "zero elements, a dimension 2^64-1": zero_elements(b"[0,18446744073709551615]"),
        "zero elements, a dimension 2^70": zero_elements(b"[0,1180591620717411303424]"),
        "two empty tensors at one offset": raw_safetensors(
            b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"I8","shape":[0,5],'
            b'"data_offsets":[0,0]}}'
        ),
        "an empty tensor inside another's data": raw_safetensors(
            b'{"a":{' + F32 + b'},"b":{"dtype":"F32","shape":[0],"data_offsets":[2,2]}}', b"\0" * 4
        ),
        "duplicate name, the same entry": raw_safetensors(b'{"a":{' + F32 + b'},"a":{' + F32 + b"}}", b"\0" * 4),
        "duplicate name, an empty tensor": raw_safetensors(
            b'{"a":{' + F32 + b'},"b":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"F32",'
            b'"shape":[0],"data_offsets":[4,4]}}',
            b"\0" * 4,
        ),
        "duplicate __metadata__": raw_safetensors(b'{"__metadata__":{},"__metadata__":{"a":"b"}}'),
        "duplicate metadata key": raw_safetensors(b'{"__metadata__":{"a":"b","a":"c"}}'),
        "duplicate field in an entry": one_tensor(b',"dtype":"F32"'),
        "duplicate extra field in an entry": one_tensor(b',"x":1,"x":2'),
        **{
            f"dtype {name}": raw_safetensors(
                b'{"a":{"dtype":"%s","shape":[2],"data_offsets":[0,%d]}}' % (name.encode(), size), b"\0" * size
            )
            for name, size in (
                ("F4", 1),
                ("F6_E2M3", 2),
                ("F6_E3M2", 2),
                ("F8_E8M0", 2),
                ("F8_E4M3FNUZ", 2),
                ("F8_E5M2FNUZ", 2),
            )
        },
    }


# Each hand-written case that the readers decide differently, and the legit difference it shows.
EXPECTED_DIFFERENCES = {
    "dimension -0": "`-0.0`",
    "nested 200 deep in an extra field": "recursion limit exceeded",
    "duplicate name, the same entry": "appears twice",
    "duplicate name, an empty tensor": "appears twice",
    "duplicate metadata key": "appears twice",
    "duplicate extra field in an entry": "appears twice",
    "zero elements, dimensions 2^62 and 2": "too large",
    "zero elements, dimensions 2^62 and 4": "too large",
    "dtype F4": "is not one this tool reads",
    "dtype F8_E8M0": "is not one this tool reads",
    "dtype F8_E4M3FNUZ": "is not one this tool reads",
    "dtype F8_E5M2FNUZ": "is not one this tool reads",
}


def test_safetensors_reader_agrees_with_the_library_on_hand_written_files(tmp_path):
    bases = valid_files(tmp_path)
    path = tmp_path / "case.safetensors"
    for data in bases:
        path.write_bytes(data)
        assert not isinstance(read_ours(path), str) and read_ours(path) == read_library(path)
    various = bases[0]
    found = {}
    for case, data in hand_written_cases(various).items():
        path.write_bytes(data)
        difference = disagreement(path)
        if difference is not None:
            found[case] = difference
    unexpected = {
        case: d
        for case, d in found.items()
        if not (case in EXPECTED_DIFFERENCES and is_legit(d) and EXPECTED_DIFFERENCES[case] in d)
    }
    assert not unexpected, unexpected
    assert set(found) == set(EXPECTED_DIFFERENCES), set(EXPECTED_DIFFERENCES) ^ set(found)


def mutated(data: bytes, rng: random.Random) -> bytes:
    """One random edit of a valid file: of its header's JSON (a value replaced by a hostile one, a key removed, a few
    bytes; by scripts/fuzz_readers.py), of one digit (offsets and shapes a little off), of one data byte, or of
    any bytes, the length field included."""
    header, rest = split(data)
    choice = rng.random()
    if choice < 0.4:
        return raw_safetensors(fuzz_readers.mutate_json_text(json.dumps(header), rng).encode(), rest)
    if choice < 0.65:
        (n,) = struct.unpack("<Q", data[:8])
        digits = [i for i in range(8, 8 + n) if data[i] in b"0123456789"]
        at = rng.choice(digits)
        return data[:at] + bytes([rng.choice(b"0123456789")]) + data[at + 1 :]
    if choice < 0.75 and rest:
        at = len(data) - rng.randrange(len(rest)) - 1
        return data[:at] + bytes([data[at] ^ 1 << rng.randrange(8)]) + data[at + 1 :]
    return fuzz_readers.mutate_bytes(data, rng)


@pytest.mark.slow
def test_safetensors_reader_agrees_with_the_library_on_mutated_files(tmp_path):
    bases = valid_files(tmp_path)
    rng = random.Random(20261128)
    path = tmp_path / "case.safetensors"
    findings = []
    for case in range(2000):
        data = mutated(rng.choice(bases), rng)
        path.write_bytes(data)
        difference = disagreement(path)
        if not is_legit(difference):
            findings.append((case, difference, data[:200]))
    assert not findings, findings[:5]
