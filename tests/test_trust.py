"""Nothing a command did not write is deleted or replaced: `export` and every `--force` path against hostile
outputs (the current folder, the source's parent, the source file, folders and files of other models), through
the real CLI. A refused case is one line, a non-zero exit and every file as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_hostile import assert_refused, small, snapshot

import lors_convert.checkpoint as checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture
def hf_lors(tmp_path) -> tuple[Path, Path]:
    """A tiny BERT folder (config, weights, a tokenizer-like file) and its LORS checkpoint beside it."""
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2
    )
    folder = tmp_path / "bert"
    transformers.BertModel(config).save_pretrained(folder)
    (folder / "vocab.txt").write_text("[PAD]\n")
    lors = tmp_path / "bert.lors.safetensors"
    return folder, lors


def convert(cli, folder: Path, lors: Path) -> None:
    result = cli(folder, "-o", lors, "--rank", "2", "--quiet")
    assert result.code == 0, result.err


@pytest.mark.parametrize("where", ["cwd", "source parent", "source folder", "lors file", "other folder"])
def test_export_force_never_replaces_what_it_did_not_write(hf_lors, tmp_path, cli, monkeypatch, where):
    folder, lors = hf_lors
    convert(cli, folder, lors)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    output = {
        "cwd": Path("."),
        "source parent": tmp_path,
        "source folder": folder,
        "lors file": lors,
        "other folder": other,
    }[where]
    monkeypatch.chdir(tmp_path)
    assert_refused(cli, tmp_path, ["export", lors, "-o", output, "--force"], "lors-convert")


def test_export_force_replaces_its_own_export_whole(hf_lors, tmp_path, cli):
    folder, lors = hf_lors
    convert(cli, folder, lors)
    out = tmp_path / "out"
    assert cli("export", lors, "-o", out, "--quiet").code == 0
    first = snapshot(out)
    assert cli("export", lors, "-o", out, "--dense", "--force", "--quiet").code == 0
    assert snapshot(out) != first and "lors_modeling.py" not in snapshot(out)
    assert {p.name for p in tmp_path.iterdir()} == {"bert", "bert.lors.safetensors", "out"}  # no staging left
    (out / "added-by-me.txt").write_text("keep me")  # a file the export did not write: the folder is not its own
    assert_refused(cli, tmp_path, ["export", lors, "-o", out, "--force"], "lors-convert")


def test_export_leaves_a_folder_of_the_staging_name_alone(hf_lors, tmp_path, cli):
    folder, lors = hf_lors
    convert(cli, folder, lors)
    staging = tmp_path / f".out.tmp{os.getpid()}"
    staging.mkdir()
    (staging / "mine.txt").write_text("keep me")
    assert cli("export", lors, "-o", tmp_path / "out", "--quiet").code == 0
    assert (staging / "mine.txt").read_text() == "keep me"


def test_force_into_a_model_folder_keeps_the_other_models_shards(tmp_path, cli):
    """model-0000k-of-0000n.safetensors and model.safetensors.index.json are Hugging Face's own names."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    save_file(small(), tmp_path / "m.safetensors")
    for k in (1, 2):
        save_file({"w": torch.ones(2)}, theirs / f"model-0000{k}-of-00002.safetensors")
    (theirs / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model-00001-of-00002.safetensors"}}')
    args = [tmp_path / "m.safetensors", "-o", theirs / "model.safetensors", "--rank", "2", "--force"]
    assert_refused(cli, tmp_path, args, "not written by lors-convert")


def test_force_replaces_a_file_only_if_lors_convert_wrote_it(tmp_path, cli):
    save_file(small(), tmp_path / "m.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "theirs.safetensors")
    args = [tmp_path / "m.safetensors", "--rank", "2", "--force"]
    assert_refused(cli, tmp_path, [*args, "-o", tmp_path / "theirs.safetensors"], "not written by lors-convert")
    assert cli(*args, "-o", tmp_path / "ours.safetensors", "--quiet").code == 0
    assert cli(*args, "-o", tmp_path / "ours.safetensors", "--quiet", "--shard-size", "8kB").code == 0
    assert not (tmp_path / "ours.safetensors").exists() and (tmp_path / "ours.safetensors.index.json").is_file()
    assert cli(*args, "-o", tmp_path / "ours.safetensors", "--quiet").code == 0
    assert sorted(p.name for p in tmp_path.glob("ours*")) == ["ours.safetensors"]


def test_a_rename_failing_partway_through_force_keeps_the_old_checkpoint(tmp_path, cli, monkeypatch):
    save_file(small(), tmp_path / "m.safetensors")
    args = [tmp_path / "m.safetensors", "-o", tmp_path / "o.safetensors", "--shard-size", "8kB", "--quiet"]
    assert cli(*args, "--rank", "2").code == 0
    old = snapshot(tmp_path)
    calls = []
    real = os.replace

    def fail_on_the_third(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("the disk went away")
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", fail_on_the_third)
    result = cli(*args, "--rank", "3", "--force")
    assert result.code == 1 and "the disk went away" in result.err
    assert snapshot(tmp_path) == old
    monkeypatch.setattr(checkpoint.os, "replace", real)
    assert cli(*args, "--rank", "3", "--force").code == 0
    assert load_file(sorted(tmp_path.glob("o-*.safetensors"))[0])  # the new one, whole


@pytest.mark.parametrize("typed, hint", [("compres", "did you mean 'compress'"), ("exprot", "did you mean 'export'")])
def test_a_mistyped_command_is_not_taken_for_a_file(tmp_path, cli, typed, hint):
    save_file(small(), tmp_path / "m.safetensors")
    assert_refused(cli, tmp_path, [typed, tmp_path / "m.safetensors"], hint, code=2)


def test_the_training_state_reaches_the_disk_before_it_replaces_the_last(tmp_path, monkeypatch):
    from lors_convert import finetuning

    events, real_replace, real_fsync = [], os.replace, os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    finetuning.write_state(tmp_path / "state.pt", {"step": 7})
    assert events[:2] == ["fsync", "replace"]
    assert torch.load(tmp_path / "state.pt")["step"] == 7 and [p.name for p in tmp_path.iterdir()] == ["state.pt"]


SLOW_MODEL = """
import time
from factory_models import StackedMLP

def model():
    model = StackedMLP()
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.2))
    return model
"""


KILLED_IN_A_FINALIZER = """
import signal
from factory_models import StackedMLP

class KillInAFinalizer:
    def __del__(self):
        signal.raise_signal(signal.SIGTERM)  # the handler's exit is raised here, where Python prints and ignores it

def model():
    model = StackedMLP()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(KillInAFinalizer()) or calls.clear())
    return model
"""


def conversion_to_kill(tmp_path: Path, factory_source: str, samples: int) -> tuple[list, dict, list[str]]:
    """A calibrated conversion of a stacked MLP built by `factory_source`'s `model` function, as a CLI command:
    (its arguments, its environment, the folder's file names before it runs)."""
    import sys

    from factory_models import stacked_mlp

    (tmp_path / "kill_models.py").write_text(factory_source)
    torch.manual_seed(0)
    save_file(stacked_mlp().state_dict(), tmp_path / "mlp.safetensors")
    save_file({"x": torch.randn(samples, 5, 16)}, tmp_path / "inputs.safetensors")
    before = sorted(p.name for p in tmp_path.iterdir())
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(tests), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "lors_convert", tmp_path / "mlp.safetensors", "-o", tmp_path / "o.safetensors"]
    options = ["--calibrate", tmp_path / "inputs.safetensors", "--model-factory", "kill_models:model", "--rank", "2"]
    return [*command, *options, "--calib-samples", str(samples), "--quiet"], env, before


def test_a_killed_conversion_leaves_nothing_behind(tmp_path):
    """A kill (SIGTERM: a job scheduler's, a container's stop) ends a command as Ctrl-C does: the calibration's
    temporary folder and the unfinished output are removed, and it exits non-zero."""
    import signal
    import subprocess
    import time

    command, env, before = conversion_to_kill(tmp_path, SLOW_MODEL, 512)
    process = subprocess.Popen(command, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".o.safetensors.*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the conversion ended before it could be killed"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) != 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == before


def test_a_kill_whose_exit_python_swallowed_still_ends_the_conversion(tmp_path):
    """A kill can arrive while Python runs a finalizer or a weakref callback (an import lock's, say), where the
    exit the handler raises is printed and ignored: the conversion must still stop at its next step, exit non-zero
    and leave nothing behind, not run on and write its output."""
    import subprocess

    command, env, before = conversion_to_kill(tmp_path, KILLED_IN_A_FINALIZER, 64)
    result = subprocess.run(command, env=env, cwd=tmp_path, timeout=120, capture_output=True, text=True)
    assert "Exception ignored" in result.stderr  # the swallowed exit happened
    assert result.returncode == 128 + 15
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == before
