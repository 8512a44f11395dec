"""The readers: sizes, layer names, shard indexes, sharded pickles and calibration data give one-line
LorsErrors that chain their cause; calibration and eval read and call a model the same way; and our
safetensors reader agrees with the `safetensors` library (a differential test)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from safetensors.torch import save_file

from conftest import bert
from lors_convert import LorsError
from lors_convert.checkpoint import parse_size
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
