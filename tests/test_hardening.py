"""Defects, each a test that failed before its fix: LORS checkpoints as input, --rank under auto, per-layer
break-even, --force onto another layout, name collisions, the CLI's help and messages, the typed format model and its
documentation, OpenMP waiting."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import bert, low_rank_stack, rand
from safetensors.torch import load_file, save_file
from test_hostile import assert_refused, small

from lors_convert import LorsError
from lors_convert.checkpoint import SafetensorsWriter, open_checkpoint
from lors_convert.lors_format import GroupMeta, LorsMeta, SourceMeta, read_lors

ROOT = Path(__file__).resolve().parents[1]


def convert_json(cli, *args) -> dict:
    result = cli(*args, "--quiet", "--json")
    assert result.code == 0, result.err
    return result.json()


# ---------------------------------------------------------------- a LORS checkpoint is not a source


@pytest.mark.parametrize("command", [[], ["inspect"]])
def test_a_lors_checkpoint_given_to_convert_or_inspect_is_refused(tmp_path, cli, command):
    save_file(small(), tmp_path / "m.safetensors")
    assert cli(tmp_path / "m.safetensors", "--quiet").code == 0
    assert_refused(
        cli,
        tmp_path,
        [*command, tmp_path / "m.lors.safetensors", "-o", tmp_path / "x.safetensors"]
        if not command
        else [*command, tmp_path / "m.lors.safetensors"],
        "lors-convert expand",
    )


@pytest.mark.parametrize("name", ["layers.0.w.lora_A", "layers.lors_shared.w"])
def test_a_source_holding_reserved_names_is_refused_before_writing(tmp_path, cli, name):
    sd = {f"layers.{i}.w": rand(12, 16, seed=i) for i in range(3)}
    sd[name] = rand(2, 16, seed=9)
    save_file(sd, tmp_path / "m.safetensors")
    expected = "expand" if name.endswith("lora_A") else "reserves"
    assert_refused(cli, tmp_path, [tmp_path / "m.safetensors"], expected)


def test_the_writer_refuses_duplicate_names_before_writing(tmp_path):
    layout = [("a", torch.float32, (2,)), ("b", torch.float32, (2,)), ("a", torch.float32, (3,))]
    with pytest.raises(LorsError, match="two tensors would be written as 'a'"):
        SafetensorsWriter(tmp_path / "o.safetensors", layout, 10**9, 10)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- ranks


@pytest.mark.parametrize("shared", ["auto", "mean", "none", "refit"])
def test_rank_n_gives_every_layer_rank_n_whatever_shared_is(tmp_path, cli, shared):
    save_file(bert(layers=4, hidden=32, inter=64), tmp_path / "m.safetensors")
    report = convert_json(cli, tmp_path / "m.safetensors", "--rank", "2", "--shared", shared)
    assert report["groups"] and all(g["ranks"]["per_layer"] == [2] * 4 for g in report["groups"])
    if shared == "none":
        assert not any(g["shared"] for g in report["groups"])


def test_auto_at_a_fixed_rank_keeps_s_where_the_layers_share_it(tmp_path, cli):
    shared_part = {f"shared.{i}.w": w for i, w in enumerate(low_rank_stack(layers=6, rows=48, cols=64, rank=2))}
    # rank-2 layers in unrelated subspaces: each is exact at rank 2, but not once their mean is subtracted
    unrelated = {f"unrelated.{i}.w": rand(48, 2, seed=100 + i) @ rand(2, 64, seed=200 + i) for i in range(6)}
    save_file({**shared_part, **unrelated}, tmp_path / "m.safetensors")
    groups = {g["template"]: g for g in convert_json(cli, tmp_path / "m.safetensors", "--rank", "2")["groups"]}
    assert groups["shared.{i}.w"]["shared"] and not groups["unrelated.{i}.w"]["shared"]
    assert groups["shared.{i}.w"]["rel_error"] < 1e-5 and groups["unrelated.{i}.w"]["rel_error"] < 1e-5


@pytest.mark.parametrize(
    "options", [["--reduction", "0.3"], ["--energy", "0.999", "--shared", "none"], ["--rank", "12"]]
)
def test_no_layer_stores_factors_costing_as_much_as_the_layer(tmp_path, cli, options):
    """16x16 layers break even at rank 8: above it a layer is stored dense, and the file holds what the
    metadata says (verify recomputes the counts and, with --source, the errors)."""
    sd = {
        f"layers.{i}.w": rand(16, 2, seed=i) @ rand(2, 16, seed=20 + i) if i % 2 else rand(16, 16, seed=i)
        for i in range(4)
    }  # the odd layers have rank 2, the even ones need every rank
    sd.update({f"mlp.{i}.w": rand(48, 16, seed=10 + i) @ torch.diag(torch.linspace(0.01, 1, 16)) for i in range(4)})
    save_file(sd, tmp_path / "m.safetensors")
    report = convert_json(cli, tmp_path / "m.safetensors", *options)
    source, meta = read_lors(tmp_path / "m.lors.safetensors")
    dense_layers = 0
    for group in meta.groups:
        rows, cols = group.rows_cols
        for name, rank in zip(group.names, group.ranks):
            if rank is None:
                dense_layers += 1
                assert name in source.info and source.info[name].shape == tuple(group.shape)
            else:
                assert rank * (rows + cols) < rows * cols
    if options[0] == "--energy":  # the full-rank layers go dense, the rank-2 ones do not
        assert dense_layers == 2
    if options[0] == "--rank":  # every layer of a group has one shape: past break-even the whole group stays dense
        assert {k["template"] for k in report["kept_dense"]} == {"layers.{i}.w", "mlp.{i}.w"}
    assert report["stacked"]["lors_params"] <= report["stacked"]["dense_params"]
    assert cli("verify", tmp_path / "m.lors.safetensors", "--source", tmp_path / "m.safetensors").code == 0
    assert load_file(tmp_path / "m.lors.safetensors").keys() == source.info.keys()  # the library reads it too


def test_dense_layers_round_trip_through_expand(tmp_path, cli):
    sd = {f"layers.{i}.w": rand(16, 16, seed=i) for i in range(3)}
    save_file(sd, tmp_path / "m.safetensors")
    assert cli(tmp_path / "m.safetensors", "--rank", "12", "--shared", "mean", "--quiet").code == 0
    assert cli("expand", tmp_path / "m.lors.safetensors", "-o", tmp_path / "d.safetensors", "--quiet").code == 0
    dense = open_checkpoint(tmp_path / "d.safetensors")
    for name, weight in sd.items():
        assert torch.equal(dense.get(name), weight)  # stored whole: nothing lost


# ---------------------------------------------------------------- --force onto another layout


@pytest.mark.parametrize("first, second", [("5GB", "8kB"), ("8kB", "5GB"), ("8kB", "4kB")])
def test_force_leaves_exactly_one_checkpoint_under_the_name(tmp_path, cli, first, second):
    save_file(small(), tmp_path / "m.safetensors")
    out = tmp_path / "o.safetensors"
    assert cli(tmp_path / "m.safetensors", "-o", out, "--shard-size", first, "--rank", "2", "--quiet").code == 0
    assert (
        cli(tmp_path / "m.safetensors", "-o", out, "--shard-size", second, "--rank", "3", "--quiet", "--force").code
        == 0
    )
    written = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o"))
    if second == "5GB":
        assert written == ["o.safetensors"]
    else:
        index = json.loads((tmp_path / "o.safetensors.index.json").read_text())
        assert written == sorted({*index["weight_map"].values(), "o.safetensors.index.json"})
    report = convert_json(cli, "report", out)
    assert all(g["ranks"]["max"] == 3 for g in report["groups"])


# ---------------------------------------------------------------- the CLI


@pytest.mark.parametrize("command", ["", "convert", "report", "inspect", "expand", "verify", "finetune", "eval"])
def test_dash_h_is_help_everywhere(cli, command):
    result = cli(*filter(None, [command, "-h"]))
    assert result.code == 0 and "Usage" in result.out, result.err


def test_help_shows_defaults_and_flags_without_types(cli):
    text = re.sub(r"[│\s]+", " ", cli("convert", "--help").out)  # the help's box wraps long lines
    for shown in (
        "[default: (0.5)]",
        "[default: (<input stem>.lors.safetensors beside the input)]",
        "[default: 5GB]",
        "[default: auto]",
    ):
        assert shown in text, shown
    assert "<bool>" not in text and "list[str]" not in text


def test_kept_dense_groups_are_labelled_and_a_lossy_conversion_hints_at_recovery(tmp_path, cli):
    sd = {f"tiny.{i}.w": rand(2, 2, seed=i) for i in range(3)}  # nothing to gain: kept dense
    sd.update({f"layers.{i}.w": rand(32, 4, seed=10 + i) @ rand(4, 32, seed=20 + i) for i in range(3)})
    save_file(sd, tmp_path / "m.safetensors")
    result = cli(tmp_path / "m.safetensors", "--quiet", "--rank", "1", "--shared", "none")
    assert result.code == 0
    row = next(line for line in result.out.splitlines() if "tiny.{i}.w" in line)
    assert "kept dense" in row and "not factored" in row and "0.0%" not in row
    assert "hint:" in result.err and "--calibrate" in result.err and "finetune" in result.err
    assert "hint:" not in cli(tmp_path / "m.safetensors", "--rank", "4", "--quiet", "--force").err


def test_one_thread_per_free_core_unless_the_user_chose():
    code = (
        "import os, sys; from lors_convert import cli, threads; assert 'torch' not in sys.modules; "
        "threads.choose_threads(); print(os.environ.get('OMP_NUM_THREADS'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    run = lambda extra: subprocess.run(
        [sys.executable, "-c", code],
        env={**env, **extra},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert 1 <= int(run({})) <= len(os.sched_getaffinity(0))
    assert run({"OMP_NUM_THREADS": "3"}) == "3"
    assert run({"MKL_NUM_THREADS": "2"}) == "None"


@pytest.mark.skipif(sys.platform != "linux", reason="thread priorities are Linux's")
def test_the_source_is_hashed_at_idle_priority_while_the_conversion_computes(tmp_path, monkeypatch):
    """The background hash must not take a core from the compute threads: its thread runs at nice 19."""
    from lors_convert import checkpoint

    seen = []
    hash_files = checkpoint.sha256_files

    def recording(files, stop=None):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return hash_files(files, stop)

    monkeypatch.setattr(checkpoint, "sha256_files", recording)
    path = tmp_path / "m.safetensors"
    save_file({f"layers.{i}.w": torch.randn(8, 8) for i in range(3)}, path)
    with checkpoint.hashing_in_background([path]) as digest:
        assert digest() == hash_files([path])
    assert seen == [19] and os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 19


def test_commands_put_large_torch_buffers_on_huge_pages_unless_the_user_chose():
    """torch reads THP_MEM_ALLOC_ENABLE at its first allocation, so the CLI sets it before torch is imported."""
    code = (
        "import os, sys; from lors_convert import cli\ntry: cli.run(['--version'])\nexcept SystemExit: pass\n"
        "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    run = lambda extra: subprocess.run(
        [sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True, check=True
    ).stdout.split()[-2:]
    assert run({}) == ["1", "False"]
    assert run({"THP_MEM_ALLOC_ENABLE": "0"}) == ["0", "False"]


def test_the_thread_count_follows_the_load_while_a_command_runs(monkeypatch):
    """Another job starting after the command started takes a core; when it ends, the core comes back. The
    machine's CPU seconds are scripted: (busy, total) of two CPUs and this process's own."""
    from lors_convert import threads

    clock, machine = [0.0], [(0.0, 0.0, 0.0)]
    monkeypatch.setattr(threads, "usable_cpus", lambda: {0, 1})
    monkeypatch.setattr(threads, "look", lambda: machine[0])
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(threads, "_chosen", {"ours": False, "last": None})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    kept = torch.get_num_threads()

    def elapse(seconds: float, others: float = 0, own: float = 0) -> None:
        """`seconds` pass; other processes keep `others` cores busy, this one `own`."""
        busy, total, mine = machine[0]
        clock[0] += seconds
        machine[0] = (busy + (others + own) * seconds, total + 2 * seconds, mine + own * seconds)

    monkeypatch.setattr(threads.time, "sleep", elapse)
    try:
        threads.choose_threads()  # an idle machine: both cores
        assert os.environ["OMP_NUM_THREADS"] == "2"
        torch.set_num_threads(2)
        elapse(5, others=0, own=2)  # this command alone, on both cores: still both
        threads.revise_threads()
        assert torch.get_num_threads() == 2
        elapse(5, others=1, own=1)  # another job takes a core
        threads.revise_threads()
        assert torch.get_num_threads() == 1
        elapse(1, others=0, own=1)  # it ends, but the next look is not due yet
        threads.revise_threads()
        assert torch.get_num_threads() == 1
        elapse(4, others=0, own=1)
        threads.revise_threads()
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(threads, "_chosen", {"ours": False, "last": None})  # the user's own count: never revised
        torch.set_num_threads(2)
        elapse(5, others=2, own=0)
        threads.revise_threads()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(kept)


# ---------------------------------------------------------------- the typed format model


def documented_fields(heading: str) -> set[str]:
    """The backticked names in the first column of the table under a FORMAT.md heading or lead-in line."""
    text = (ROOT / "docs" / "FORMAT.md").read_text()
    table = next(block for block in text[text.index(heading) :].split("\n\n") if block.startswith("|"))
    return {name for line in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", line.split("|")[1])}


def test_format_md_documents_exactly_the_typed_model():
    assert documented_fields("## Metadata") == {f.name for f in dataclasses.fields(LorsMeta)}
    assert documented_fields("A group object:") == {f.name for f in dataclasses.fields(GroupMeta)}
    source_row = next(
        line for line in (ROOT / "docs" / "FORMAT.md").read_text().splitlines() if line.startswith("| `source` |")
    )
    assert set(re.findall(r"`(\w+)` \(", source_row)) == {f.name for f in dataclasses.fields(SourceMeta)}


def meta_of(tmp_path, cli) -> dict:
    save_file(small(), tmp_path / "m.safetensors")
    assert cli(tmp_path / "m.safetensors", "--quiet").code == 0
    _, meta = read_lors(tmp_path / "m.lors.safetensors")
    return json.loads(meta.to_json())


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda m: m.__setitem__("warnings", [1, 2]), "warnings"),
        (lambda m: m.__setitem__("warnings", "text"), "warnings"),
        (lambda m: m["groups"][0].__setitem__("output_error", "high"), "output_error"),
        (lambda m: m["groups"][0].__setitem__("layer_errors", [0.1]), "layer_errors"),
        (lambda m: m["source"].__setitem__("sha256", 12), "sha256"),
        (lambda m: m["source"].__setitem__("sha256", "abc"), "sha256"),
        (lambda m: m["groups"][0]["ranks"].__setitem__(0, -1), "ranks"),
        (lambda m: m.__setitem__("calibration", [1]), "calibration"),
        (lambda m: m["groups"].append(m["groups"][0]), "two groups"),
    ],
)
def test_the_schema_catches_what_the_old_validator_missed(tmp_path, cli, edit, problem):
    meta = meta_of(tmp_path, cli)
    edit(meta)
    with pytest.raises(ValueError, match=problem):
        LorsMeta.from_json(json.dumps(meta))


def test_to_json_and_from_json_round_trip(tmp_path, cli):
    meta = meta_of(tmp_path, cli)
    assert json.loads(LorsMeta.from_json(json.dumps(meta)).to_json()) == meta


def test_report_of_a_checkpoint_with_corrupt_warnings_is_one_line(tmp_path, cli):
    from test_hostile import lors_file, meta_edit, rewrite

    lors = lors_file(tmp_path, cli)
    rewrite(lors, change_meta=meta_edit(lambda m: m.__setitem__("warnings", [{"not": "a string"}])))
    assert_refused(cli, tmp_path, ["report", lors], "corrupt LORS metadata")


# ---------------------------------------------------------------- fine-tuning never overwrites its teacher


def test_finetune_refuses_to_write_onto_its_teacher(tmp_path, cli):
    folder = bert_folder(tmp_path, with_tokenizer=False)
    assert cli(folder, "-o", tmp_path / "s.lors.safetensors", "--rank", "2", "--quiet").code == 0
    data = tmp_path / "d.pt"
    torch.save({"input_ids": torch.randint(0, 64, (20, 8))}, data)
    assert_refused(
        cli,
        tmp_path,
        [
            "finetune",
            tmp_path / "s.lors.safetensors",
            "--data",
            data,
            "--steps",
            "1",
            "-o",
            folder / "model.safetensors",
            "--force",
        ],
        "onto the input",
    )


def test_errors_chain_their_cause_which_debug_shows(tmp_path, cli):
    import traceback

    from lors_convert.cli import main

    save_file(small(), tmp_path / "m.safetensors")
    args = [str(tmp_path / "m.safetensors"), "--device", "no such device"]
    plain = cli(*args)
    assert plain.code == 1 and len(plain.err.strip().splitlines()) == 1
    with pytest.raises(LorsError) as caught:  # --debug lets it out, for Python to print with its cause
        main([*args, "--debug"])
    shown = "".join(traceback.format_exception(caught.value))
    assert "RuntimeError" in shown and "direct cause" in shown and "LorsError" in shown


@pytest.mark.parametrize("shard_size", ["5GB", "8kB"])
def test_a_write_puts_each_byte_on_disk_once(tmp_path, cli, monkeypatch, shard_size):
    """The header is written last into reserved space: what a conversion writes is the output, not a data file
    copied into it afterwards (which needed twice the output's size on disk)."""
    from test_hostile import FullDisk, full_disk_open

    from lors_convert import checkpoint

    save_file(small(), tmp_path / "m.safetensors")
    monkeypatch.setattr(checkpoint, "open", full_disk_open, raising=False)
    FullDisk.budget = 10**9
    out = tmp_path / "o.safetensors"
    assert cli(tmp_path / "m.safetensors", "-o", out, "--rank", "2", "--shard-size", shard_size, "--quiet").code == 0
    shards = [p for p in tmp_path.glob("o*.safetensors")]
    written = 10**9 - FullDisk.budget
    headers = sum(8 + int.from_bytes(p.read_bytes()[:8], "little") for p in shards)
    assert written <= sum(p.stat().st_size for p in shards) + headers  # data once, each header twice at most


def test_transformers_progress_bars_are_off():
    pytest.importorskip("transformers")
    from lors_convert.hf import _transformers

    assert not _transformers().utils.logging.is_progress_bar_enabled()


def bert_folder(tmp_path, with_tokenizer: bool) -> Path:
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    BertModel(config).save_pretrained(folder)
    if with_tokenizer:
        (folder / "vocab.txt").write_text(
            "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]) + "\n"
        )
    return folder


def test_text_data_without_a_tokenizer_is_one_line(tmp_path, cli):
    folder = bert_folder(tmp_path, with_tokenizer=False)
    assert cli(folder, "-o", tmp_path / "s.lors.safetensors", "--rank", "2", "--quiet").code == 0
    (tmp_path / "t.txt").write_text("\n".join(f"w{i} w{i + 1}" for i in range(30)))
    assert_refused(
        cli, tmp_path, ["eval", tmp_path / "s.lors.safetensors", "--data", tmp_path / "t.txt"], "no tokenizer files"
    )
    assert_refused(
        cli,
        tmp_path,
        [folder, "--calibrate", tmp_path / "t.txt", "-o", tmp_path / "c.safetensors"],
        "no tokenizer files",
    )


def test_a_config_transformers_cannot_build_is_one_line(tmp_path, cli):
    folder = bert_folder(tmp_path, with_tokenizer=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    (tmp_path / "t.txt").write_text("\n".join(f"w{i} w{i + 1}" for i in range(30)))
    assert_refused(
        cli, tmp_path, [folder, "--calibrate", tmp_path / "t.txt", "-o", tmp_path / "c.safetensors"], "config.json"
    )


def test_eval_held_out_holds_out_what_finetune_held_out(tmp_path, cli):
    """Defect: `eval --held-out` held out its default 256 (here a fifth: 16 lines) whatever finetune had held out,
    so after `finetune --eval-examples 8` it scored 8 training lines as held-out."""
    folder = bert_folder(tmp_path, with_tokenizer=True)
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"w{i % 59} w{i // 59}" for i in range(80)))
    assert cli(folder, "-o", tmp_path / "s.lors.safetensors", "--rank", "2", "--quiet").code == 0
    tuned = tmp_path / "t.lors.safetensors"
    options = ("--data", text, "--quiet", "--json")
    assert (
        cli(
            "finetune", tmp_path / "s.lors.safetensors", "-o", tuned, "--steps", "1", "--eval-examples", "8", *options
        ).code
        == 0
    )
    result = cli("eval", tuned, "--held-out", *options)
    assert result.code == 0, result.err
    assert result.json()["examples"] == 8
    assert cli("eval", tuned, "--held-out", "--eval-examples", "12", *options).json()["examples"] == 12


def test_the_eval_table_names_its_data(tmp_path, cli):
    folder = bert_folder(tmp_path, with_tokenizer=True)
    assert cli(folder, "-o", tmp_path / "s.lors.safetensors", "--rank", "2", "--quiet").code == 0
    (tmp_path / "other.txt").write_text("\n".join(f"w{i} w{i + 2}" for i in range(30)))
    result = cli("eval", tmp_path / "s.lors.safetensors", "--data", tmp_path / "other.txt", "--quiet")
    assert result.code == 0, result.err
    assert "other.txt (30 examples)" in result.out and "held-out" not in result.out


def compress_args(folder, data, out, *more) -> list:
    return ["compress", folder, "--calibrate", data, "-o", out, "--batch-size", "8", "--quiet", *more]


@pytest.mark.slow
def test_compress_converts_finetunes_and_shows_before_and_after(tmp_path, cli):
    folder = bert_folder(tmp_path, with_tokenizer=True)
    (tmp_path / "t.txt").write_text("\n".join(f"w{i % 50} w{(i * 7) % 50} w{(i * 3) % 50}" for i in range(80)))
    out = tmp_path / "final.lors.safetensors"
    result = cli(
        *compress_args(folder, tmp_path / "t.txt", out, "--finetune-minutes", "0.001", "--lr", "3e-4", "--json")
    )
    assert result.code == 0, result.err
    table = result.json()
    assert set(table) == {"converted", "fine-tuned"} and table["converted"]["examples"] == 16
    assert out.is_file() and not (tmp_path / "final.lors.converted.safetensors").exists()
    assert read_lors(out)[1].finetune["settings"]["lr"] == 3e-4 and read_lors(out)[1].calibration is not None
    again = cli("compress", folder, "--calibrate", tmp_path / "t.txt", "-o", out, "--quiet")
    assert again.code == 1 and "already exists" in again.err


@pytest.mark.slow
def test_compress_calibrates_a_causal_lm_on_half_the_samples_it_gives_an_encoder(tmp_path, cli):
    """compress's default sample count: 1,024, or 512 for a causal LM, three quarters of whose samples are texts
    it writes (each up to 256 tokens longer than a line). A count the user gives is taken as it is, and a causal
    LM that writes none gets the encoder's."""
    from test_finetune import make_model_dir, text_file

    data = text_file(tmp_path / "t.txt", lines=64)
    folders = {kind: make_model_dir(tmp_path / kind, kind, 2) for kind in ("llama", "bert")}

    def samples(kind, *more) -> int:
        out = tmp_path / f"{kind}{len(more)}.lors.safetensors"
        result = cli(*compress_args(folders[kind], data, out, "--finetune-minutes", "0", *more))
        assert result.code == 0, result.err
        return read_lors(out)[1].settings["calib_samples"]

    assert samples("llama") == 512 and samples("bert") == 1024
    assert samples("llama", "--calib-generated", "0") == 1024 and samples("bert", "--calib-samples", "300") == 300


@pytest.mark.slow
def test_compress_holds_out_lines_it_never_calibrates_or_trains_on(tmp_path, cli, monkeypatch):
    """Defect 1: calibration and the held-out split each drew their own permutation of the same file, so compress
    measured "held-out" fidelity on its calibration lines. Every line compress reads is recorded with its role
    (the function that asked for it)."""
    import inspect

    from lors_convert.data import TextLines

    folder = bert_folder(tmp_path, with_tokenizer=True)
    (tmp_path / "t.txt").write_text("\n".join(f"w{i % 59} w{i // 59}" for i in range(80)))  # 80 distinct lines
    read, roles = TextLines.read, {"calibration": set(), "held-out": set(), "training": set()}

    def spy(self, indices):
        lines = read(self, indices)
        callers = {frame.function for frame in inspect.stack()}
        role = "held-out" if "fidelity" in callers else "calibration" if "text_batches" in callers else "training"
        roles[role].update(lines)
        return lines

    monkeypatch.setattr(TextLines, "read", spy)
    out = tmp_path / "final.lors.safetensors"
    result = cli(*compress_args(folder, tmp_path / "t.txt", out, "--finetune-minutes", "0.001"))
    assert result.code == 0, result.err
    assert all(roles.values()), {role: len(lines) for role, lines in roles.items()}
    assert not roles["held-out"] & roles["calibration"] and not roles["held-out"] & roles["training"]
    assert "16 held-out lines of t.txt, disjoint from calibration and training" in " ".join(result.out.split())
    assert "of the 80 lines of t.txt, none held out" in read_lors(out)[1].calibration["data"]


@pytest.mark.slow
def test_compress_reuses_a_leftover_conversion_only_of_the_same_source(tmp_path, cli):
    """Defect 9: a leftover OUT.converted.safetensors of another model with the same settings was reused."""
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"w{i % 59} w{i // 59}" for i in range(80)))
    first, second = (bert_folder(tmp_path / name, with_tokenizer=True) for name in ("first", "second"))
    out = tmp_path / "second.lors.safetensors"
    assert cli(*compress_args(first, text, tmp_path / "first.lors.safetensors")).code == 0
    (tmp_path / "first.lors.safetensors").rename(tmp_path / "second.lors.converted.safetensors")  # the leftover

    result = cli(*compress_args(second, text, out))
    assert result.code == 0, result.err
    assert "reusing" not in result.err
    assert Path(read_lors(out)[1].source.path).parent == second.resolve()  # the second model, converted afresh


@pytest.mark.slow
@pytest.mark.parametrize("minutes", ["0", "0.001"])
def test_compress_shards_resumes_and_ends_with_one_checkpoint(tmp_path, cli, monkeypatch, minutes):
    """Outputs above --shard-size: the conversion and the result are shards plus an index. An interrupted run's
    conversion is reused by the next one, and the end leaves the output's files alone (no intermediate)."""
    import lors_convert.compression

    folder = bert_folder(tmp_path, with_tokenizer=True)
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"w{i % 59} w{i // 59}" for i in range(80)))
    out, size = tmp_path / "final.lors.safetensors", ("--shard-size", "4KB")
    finetune = lors_convert.compression.finetune
    if minutes != "0":

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(lors_convert.compression, "finetune", interrupted)
        assert cli(*compress_args(folder, text, out, "--finetune-minutes", minutes, *size)).code != 0
        assert len(list(tmp_path.glob("final.lors.converted-*-of-*.safetensors"))) > 1
        monkeypatch.setattr(lors_convert.compression, "finetune", finetune)
    result = cli(*compress_args(folder, text, out, "--finetune-minutes", minutes, *size))
    assert result.code == 0, result.err
    assert ("reusing" in result.err) == (minutes != "0")
    shards = sorted(p.name for p in tmp_path.glob("final.lors-*-of-*.safetensors"))
    assert len(shards) > 1 and sorted(p.name for p in tmp_path.glob("final.*")) == sorted(
        [*shards, "final.lors.safetensors.index.json"]
    )
    assert read_lors(out)[1].calibration is not None


def test_compress_refuses_bad_training_options_before_converting(tmp_path, cli):
    folder = bert_folder(tmp_path, with_tokenizer=True)
    (tmp_path / "t.txt").write_text("\n".join(f"w{i % 59} w{i // 59}" for i in range(80)))
    for option, value in (("--lr", "-1"), ("--finetune-minutes", "-1")):
        result = cli(*compress_args(folder, tmp_path / "t.txt", tmp_path / "o.safetensors", option, value))
        assert result.code == 1 and len(result.err.strip().splitlines()) == 1
        assert f"error: {option} " in result.err  # compress's own name of the option
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "t.txt"]


def test_compress_refuses_to_write_onto_its_source_even_with_force(tmp_path, cli):
    """Defect 10: -o MODEL_DIR/model.safetensors --force overwrote the model being compressed."""
    folder = bert_folder(tmp_path, with_tokenizer=True)
    (tmp_path / "t.txt").write_text("\n".join(f"w{i % 59} w{i // 59}" for i in range(80)))
    before = (folder / "model.safetensors").read_bytes()
    result = cli(*compress_args(folder, tmp_path / "t.txt", folder / "model.safetensors", "--force"))
    assert result.code == 1 and "refusing to write onto the input" in result.err
    assert (folder / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("command", [[], ["compress", "--calibrate", "t.txt"]])
def test_an_existing_output_is_refused_before_the_source_is_opened(tmp_path, cli, monkeypatch, command):
    """Opening a GGUF parses its metadata for seconds: a rerun that forgot --force is told at once."""
    save_file(small(), tmp_path / "m.safetensors")
    (tmp_path / "t.txt").write_text("a line\n")
    (tmp_path / "o.safetensors").write_bytes(b"keep")

    def opened(path):
        raise AssertionError(f"opened {path}")

    monkeypatch.setattr("lors_convert.checkpoint.open_checkpoint", opened)
    args = [a if a != "t.txt" else tmp_path / a for a in command]
    result = cli(*args[:1], tmp_path / "m.safetensors", *args[1:], "-o", tmp_path / "o.safetensors")
    assert result.code == 1 and "already exists" in result.err, result.err
    assert (tmp_path / "o.safetensors").read_bytes() == b"keep"


@pytest.mark.parametrize(
    "command, config",
    [("convert", "ConvertConfig"), ("compress", "CompressConfig"), ("finetune", "FinetuneConfig"),
     ("init", "InitConfig"), ("export", "ExportConfig")],
)  # fmt: skip
def test_every_cli_default_is_its_config_fields(command, config):
    """The CLI restates no default: an option named as a config field defaults to the field's value (but
    --device, which the CLI chooses: cuda where there is one)."""
    import typer

    from lors_convert import config as configs
    from lors_convert.cli import app

    fields = {f.name: f for f in dataclasses.fields(getattr(configs, config))}
    params = typer.main.get_command(app).commands[command].params
    shared = [p for p in params if p.name in fields and fields[p.name].default is not dataclasses.MISSING]
    shared = [p for p in shared if p.name != "device"]
    assert len(shared) >= 2
    for param in shared:
        assert param.default == fields[param.name].default, (command, param.name)
