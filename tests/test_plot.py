"""`report --plot` and `inspect --plot`: real PNGs from real checkpoints, through the real CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import bert, rand
from safetensors.torch import save_file

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def imread():
    return pytest.importorskip("matplotlib.image").imread


@pytest.fixture
def converted(tmp_path, cli) -> tuple[Path, Path]:
    """A small BERT-shaped source and its LORS conversion; at --rank 16 the 32x32 groups stay dense."""
    save_file(bert(layers=4), tmp_path / "m.safetensors")
    result = cli(tmp_path / "m.safetensors", "--rank", "16", "--quiet")
    assert result.code == 0, result.err
    return tmp_path / "m.safetensors", tmp_path / "m.lors.safetensors"


def assert_png(path: Path, imread) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert 10_000 < path.stat().st_size < 2_000_000
    height, width = imread(path).shape[:2]
    assert 400 <= height <= 2000 and 600 <= width <= 3000
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_report_plot(converted, tmp_path, cli, imread):
    png = tmp_path / "report.png"
    result = cli("report", converted[1], "--plot", png)
    assert result.code == 0, result.err
    assert "stacked total" in result.out and f"wrote {png}" in result.err
    assert_png(png, imread)


def test_inspect_plot_and_json_stays_json(converted, tmp_path, cli, imread):
    png = tmp_path / "spectra.png"
    result = cli("inspect", converted[0], "--plot", png, "--json", "--quiet")
    assert result.code == 0, result.err
    assert len(result.json()["groups"]) == 6
    assert_png(png, imread)


def test_an_existing_png_is_replaced(converted, tmp_path, cli, imread):
    png = tmp_path / "report.png"
    png.write_bytes(b"old")
    assert cli("report", converted[1], "--plot", png).code == 0
    assert_png(png, imread)


def test_report_plot_marks_layers_stored_dense(tmp_path, cli, imread):
    low = [rand(64, 2, seed=i) @ rand(2, 32, seed=10 + i) for i in range(2)]
    save_file({f"blocks.{i}.w": w for i, w in enumerate([*low, rand(64, 32, seed=9)])}, tmp_path / "m.safetensors")
    assert cli(tmp_path / "m.safetensors", "--shared", "none", "--energy", "0.99", "--quiet").code == 0
    png = tmp_path / "report.png"
    result = cli("report", tmp_path / "m.lors.safetensors", "--plot", png, "--json")
    assert result.code == 0, result.err
    assert result.json()["groups"][0]["ranks"]["per_layer"] == [2, 2, None]
    assert_png(png, imread)


@pytest.mark.slow
def test_minilm_pictures(minilm, tmp_path, cli, imread):
    lors = tmp_path / "minilm.lors.safetensors"
    assert cli(minilm, "-o", lors, "--reduction", "0.5", "--quiet").code == 0
    for command, source in (("report", lors), ("inspect", minilm)):
        png = tmp_path / f"{command}.png"
        result = cli(command, source, "--plot", png, "--quiet")
        assert result.code == 0, result.err
        assert_png(png, imread)


@pytest.mark.parametrize("command", ["report", "inspect"])
@pytest.mark.parametrize("name", ["picture.jpg", "picture", "missing/picture.png"])
def test_a_plot_that_cannot_be_written_is_one_line_and_writes_nothing(converted, tmp_path, cli, command, name):
    pytest.importorskip("matplotlib")
    before = sorted(tmp_path.iterdir())
    result = cli(command, converted[1] if command == "report" else converted[0], "--plot", tmp_path / name)
    assert result.code == 1 and result.out == ""
    assert result.err.count("\n") == 1 and "error:" in result.err
    assert (".png" in result.err) if "missing" not in name else ("does not exist" in result.err)
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("command", ["report", "inspect"])
def test_without_matplotlib_the_plot_is_one_line_saying_what_to_install(converted, tmp_path, cli, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails, as when it is absent
    before = sorted(tmp_path.iterdir())
    result = cli(command, converted[1] if command == "report" else converted[0], "--plot", tmp_path / "p.png")
    assert result.code == 1 and result.out == ""
    assert result.err.count("\n") == 1 and 'pip install "lors-convert[plot]"' in result.err
    assert sorted(tmp_path.iterdir()) == before
