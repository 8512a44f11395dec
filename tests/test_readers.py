"""The readers: sizes, layer names, shard indexes, sharded pickles and calibration data give one-line
LorsErrors that chain their cause; calibration and eval read and call a model the same way; and our
safetensors reader agrees with the `safetensors` library (a differential test)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import save_file
from torch import nn

from conftest import bert, rand
from factory_models import StackedMLP
from lors_convert import LorsError
from lors_convert.calibrate import collect_pair
from lors_convert.checkpoint import TensorInfo, open_checkpoint, open_pickle_files, parse_size
from lors_convert.evaluate import call_model
from lors_convert.stacks import find_stacks
from test_hostile import assert_refused

ROOT = Path(__file__).resolve().parent.parent


def small_model(folder: Path) -> Path:
    save_file(bert(layers=3, hidden=16, inter=32), folder / "m.safetensors")
    return folder / "m.safetensors"


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("text", ["5i", "5ib", "5 IB", "2kibb", "1bb", "2 k b", "٥GB", "1e3", "GB", ""])
def test_odd_shard_sizes_are_one_line_errors_naming_the_text(tmp_path, cli, text):
    model = small_model(tmp_path)
    assert_refused(cli, tmp_path, [model, "--shard-size", text], f"cannot read size {text!r}")
    assert_refused(cli, tmp_path, ["expand", model, "-o", tmp_path / "d.safetensors", "--shard-size", text],
                   f"cannot read size {text!r}")


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


def test_bad_index_is_refused_under_python_O(tmp_path):
    """The checks are not `assert`s, which `python -O` removes."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    index = sharded_safetensors(tmp_path)
    for case in ("weight_map a list", "a shard name not a string"):
        index.write_text(json.dumps(BAD_INDEXES[case]))
        done = subprocess.run([sys.executable, "-O", "-m", "lors_convert", "inspect", str(index)],
                              capture_output=True, text=True, env=env, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, (case, done.stderr)
        assert "not a valid shard index" in lines[0], (case, done.stderr)


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
    index = write_shards(tmp_path, suffix, shards, {"layers.0.w": "s1", "layers.1.w": "s1", "layers.2.w": "s2",
                                                    "ghost": "s2"})
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
    torch.save({"layers.0.w": LAYERS["layers.0.w"], "layers": {"0": {"w": LAYERS["layers.1.w"]}},
                "layers.1.w": LAYERS["layers.1.w"]}, tmp_path / "m.pt")
    assert_refused(cli, tmp_path, ["inspect", tmp_path / "m.pt"], "'layers.0.w' appears twice")


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_shard_tensors_the_index_does_not_list_there_are_ignored(tmp_path, suffix):
    """The same for pickles and safetensors: a tensor is read from the shard the index names, nowhere else."""
    shards = {"s1": {"layers.0.w": LAYERS["layers.0.w"], "layers.1.w": rand(6, 6, seed=99), "extra": rand(2, seed=7)},
              "s2": {"layers.1.w": LAYERS["layers.1.w"], "layers.2.w": LAYERS["layers.2.w"]}}
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
    expected_c = {name: torch.zeros(4, 4, dtype=torch.float64) for name in names}
    expected_g = {name: torch.zeros(4, 4, dtype=torch.float64) for name in names}
    with torch.no_grad():
        for batch in batches:
            x_orig, x_conv = original.inputs(batch["x"]), converted.inputs(batch["x"])
            for name, x_hat in x_conv.items():
                x_hat, x = x_hat.reshape(-1, 4).double(), x_orig[name].reshape(-1, 4).double()
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
    assert_refused(cli, tmp_path, [tmp_path / "mlp.safetensors", "--calibrate", tmp_path / "inputs.safetensors",
                                   "--model-factory", "factory_models:stacked_mlp"], "must share their first dimension")


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
    result = cli(tmp_path / "mlp.safetensors", "--rank", "2", "--calibrate", tmp_path / "ids.safetensors", *factory,
                 "--quiet")
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


class Plain(FromTransformers):
    __module__ = "my_models"


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
    for path, message in (("bad.safetensors", "corrupt safetensors header"), ("bad.pt", "not a readable PyTorch"),
                          ("evil.pt", "refusing to unpickle"), ("m.safetensors.index.json", "not a valid shard index")):
        with pytest.raises(LorsError, match=message) as caught:
            open_checkpoint(tmp_path / path)
        assert "\n" not in str(caught.value)
        if caught.value.__cause__ is None:
            unchained.append(path)
    assert unchained == []
