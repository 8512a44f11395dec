"""The core conversion through the real CLI: formats, naming conventions, accounting, rank options, writes."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import bert, detr, gpt2, llama, low_rank_stack, rand, t5, vit
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lors_convert.checkpoint import open_checkpoint
from lors_convert.lors_format import FORMAT_VERSION, read_lors


def convert_json(cli, *args) -> dict:
    result = cli(*args, "--quiet", "--json")
    assert result.code == 0, result.err
    return result.json()


def stored_numbers(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


# ---------------------------------------------------------------- input formats


def test_safetensors_input_default_output_and_accounting(tmp_path, cli):
    save_file(bert(), tmp_path / "model.safetensors")
    report = convert_json(cli, tmp_path / "model.safetensors")
    out = tmp_path / "model.lors.safetensors"
    assert out.is_file()
    assert report["total"]["lors_params"] == stored_numbers(out)
    assert report["total"]["dense_params"] == sum(t.numel() for t in bert().values())
    assert report["stacked"]["dense_params"] == sum(g["dense_params"] for g in report["groups"])
    assert abs(report["stacked"]["reduction"] - 0.5) < 0.02
    assert report["stacked"]["lors_params"] <= 0.5 * report["stacked"]["dense_params"]
    for g in report["groups"]:
        rows, cols = g["shape"][0], math.prod(g["shape"][1:])
        assert g["lors_params"] == rows * cols * g["shared"] + sum(g["ranks"]["per_layer"]) * (rows + cols)
    assert report["bytes"]["after"] == out.stat().st_size


@pytest.mark.parametrize("container", ["plain", "state_dict", "model", "ddp"])
def test_pickle_inputs_are_unwrapped(tmp_path, cli, container):
    sd = bert()
    wrapped = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd, "optimizer": {}},
        "ddp": {f"module.{k}": v for k, v in sd.items()},
    }[container]
    torch.save(wrapped, tmp_path / "ckpt.pt")
    report = convert_json(cli, tmp_path / "ckpt.pt", "--rank", "4")
    assert len(report["groups"]) == 6
    expanded = expand(cli, tmp_path / "ckpt.lors.safetensors", tmp_path)
    assert set(expanded) == set(sd)


def test_sharded_safetensors_and_hf_directory(tmp_path, cli):
    sd = llama()
    names = sorted(sd)
    half = len(names) // 2
    folder = tmp_path / "hf"
    folder.mkdir()
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: sd[k] for k in keys}, folder / shard)
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text("{}")
    by_index = convert_json(
        cli, folder / "model.safetensors.index.json", "--rank", "2", "-o", tmp_path / "a.safetensors"
    )
    by_dir = convert_json(cli, folder, "--rank", "2")
    assert (tmp_path / "hf.lors.safetensors").is_file()
    assert by_index["groups"] == by_dir["groups"]
    assert {g["template"] for g in by_dir["groups"]} == {
        f"model.layers.{{i}}.{n}.weight"
        for n in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }


def test_sharded_bin_directory(tmp_path, cli):
    sd = bert()
    names = sorted(sd)
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save({k: sd[k] for k in names[:10]}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in names[10:]}, folder / "pytorch_model-00002-of-00002.bin")
    weight_map = {
        k: "pytorch_model-00001-of-00002.bin" if i < 10 else "pytorch_model-00002-of-00002.bin"
        for i, k in enumerate(names)
    }
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    convert_json(cli, folder, "--rank", "3")
    dense = expand(cli, tmp_path / "bin.lors.safetensors", tmp_path)
    assert set(dense) == set(sd)


class Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_that_runs_code_is_refused_unrun(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for protocol in (2, 4):
        with open(tmp_path / f"evil{protocol}.pt", "wb") as f:
            pickle.dump({"w": Boom()}, f, protocol=protocol)
    torch.save({"layer.0.w": torch.zeros(3, 3), "payload": Boom()}, tmp_path / "evil_zip.pt")
    for name in ("evil2.pt", "evil4.pt", "evil_zip.pt"):
        result = cli(tmp_path / name, "--quiet")
        assert result.code == 1
        assert "refusing to unpickle" in result.err and "nothing in the file was run" in result.err
        assert name == "evil4.pt" or "system" in result.err  # names what it would have imported
        assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "PWNED").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil2.pt", "evil4.pt", "evil_zip.pt"]


# ---------------------------------------------------------------- naming conventions


@pytest.mark.parametrize(
    "build,expected",
    [
        (
            bert,
            {
                "encoder.layer.{i}.attention.self.query.weight",
                "encoder.layer.{i}.attention.self.key.weight",
                "encoder.layer.{i}.attention.self.value.weight",
                "encoder.layer.{i}.attention.output.dense.weight",
                "encoder.layer.{i}.intermediate.dense.weight",
                "encoder.layer.{i}.output.dense.weight",
            },
        ),
        (
            gpt2,
            {
                "h.{i}.attn.c_attn.weight",
                "h.{i}.attn.c_proj.weight",
                "h.{i}.mlp.c_fc.weight",
                "h.{i}.mlp.c_proj.weight",
            },
        ),
        (
            vit,
            {
                "blocks.{i}.attn.qkv.weight",
                "blocks.{i}.attn.proj.weight",
                "blocks.{i}.mlp.fc1.weight",
                "blocks.{i}.mlp.fc2.weight",
            },
        ),
        (
            detr,
            {
                f"transformer.{p}.layers.{{i}}.{n}"
                for p in ("encoder", "decoder")
                for n in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight")
            }
            | {
                "transformer.decoder.layers.{i}.multihead_attn.in_proj_weight",
                "transformer.decoder.layers.{i}.multihead_attn.out_proj.weight",
            },
        ),
        (
            t5,
            {f"encoder.block.{{i}}.layer.0.SelfAttention.{n}.weight" for n in "qkvo"}
            | {f"encoder.block.{{i}}.layer.1.DenseReluDense.{n}.weight" for n in ("wi", "wo")}
            | {
                f"decoder.block.{{i}}.layer.{j}.{k}.{n}.weight"
                for j, k in ((0, "SelfAttention"), (1, "EncDecAttention"))
                for n in "qkvo"
            }
            | {f"decoder.block.{{i}}.layer.2.DenseReluDense.{n}.weight" for n in ("wi", "wo")},
        ),
    ],
)
def test_naming_conventions(tmp_path, cli, build, expected):
    sd = build()
    save_file(sd, tmp_path / "m.safetensors")
    report = convert_json(cli, "inspect", tmp_path / "m.safetensors")
    assert {g["template"] for g in report["groups"]} == expected
    convert_json(cli, tmp_path / "m.safetensors", "--rank", "4")
    dense = expand(cli, tmp_path / "m.lors.safetensors", tmp_path)
    assert set(dense) == set(sd)
    for name, tensor in sd.items():
        assert dense[name].shape == tensor.shape and dense[name].dtype == tensor.dtype


def test_detr_stacks_are_separate_and_llama_gqa_shapes(tmp_path, cli):
    save_file(detr(enc=3, dec=4), tmp_path / "d.safetensors")
    groups = convert_json(cli, "inspect", tmp_path / "d.safetensors")["groups"]
    layers = {g["template"]: g["layers"] for g in groups}
    assert layers["transformer.encoder.layers.{i}.linear1.weight"] == [0, 1, 2]
    assert layers["transformer.decoder.layers.{i}.linear1.weight"] == [0, 1, 2, 3]
    save_file(llama(hidden=32, heads=4, kv_heads=2), tmp_path / "l.safetensors")
    shapes = {g["template"]: g["shape"] for g in convert_json(cli, "inspect", tmp_path / "l.safetensors")["groups"]}
    assert shapes["model.layers.{i}.self_attn.k_proj.weight"] == [16, 32]
    assert shapes["model.layers.{i}.self_attn.q_proj.weight"] == [32, 32]


def test_include_exclude_filters(tmp_path, cli):
    save_file(llama(), tmp_path / "l.safetensors")
    only_mlp = convert_json(cli, tmp_path / "l.safetensors", "--include", "*.mlp.*", "--rank", "2")
    assert {g["template"].split(".")[3] for g in only_mlp["groups"]} == {"mlp"}
    no_mlp = convert_json(cli, tmp_path / "l.safetensors", "--exclude", "*.mlp.*", "--rank", "2", "--force")
    assert {g["template"].split(".")[3] for g in no_mlp["groups"]} == {"self_attn"}


def test_conv_kernels_and_one_d_tensors(tmp_path, cli):
    sd = {f"stages.{i}.conv.weight": torch.randn(8, 4, 3, 3) for i in range(3)}
    sd.update({f"stages.{i}.bn.weight": torch.randn(8) for i in range(3)})
    save_file(sd, tmp_path / "c.safetensors")
    report = convert_json(cli, tmp_path / "c.safetensors", "--rank", "2", "--shared", "mean")
    assert [g["template"] for g in report["groups"]] == ["stages.{i}.conv.weight"]
    assert report["groups"][0]["shape"] == [8, 4, 3, 3]
    source, _ = read_lors(tmp_path / "c.lors.safetensors")
    assert source.info["stages.0.conv.weight.lora_A"].shape == (2, 36)
    assert source.get("stages.1.bn.weight").equal(sd["stages.1.bn.weight"])


# ---------------------------------------------------------------- rank options and the math


def test_exact_recovery_of_shared_plus_low_rank(tmp_path, cli):
    layers = low_rank_stack(layers=4, rank=3, centred=True)
    sd = {f"blocks.{i}.w": w for i, w in enumerate(layers)}
    save_file(sd, tmp_path / "m.safetensors")
    report = convert_json(cli, tmp_path / "m.safetensors", "--rank", "3")
    assert report["groups"][0]["rel_error"] < 1e-5
    dense = expand(cli, tmp_path / "m.lors.safetensors", tmp_path)
    for name, w in sd.items():
        assert torch.allclose(dense[name], w, atol=1e-4, rtol=0)
    lower = convert_json(cli, tmp_path / "m.safetensors", "--rank", "2", "--force")
    assert lower["groups"][0]["rel_error"] > 1e-2


def test_rank_options(tmp_path, cli):
    save_file(bert(layers=4), tmp_path / "m.safetensors")
    path = tmp_path / "m.safetensors"
    fixed = convert_json(cli, path, "--rank", "5", "--shared", "mean")
    assert all(g["ranks"]["per_layer"] == [5] * 4 for g in fixed["groups"])
    decaying = {
        f"blocks.{i}.w": w for i, w in enumerate(low_rank_stack(layers=6, rows=48, cols=64, rank=8, centred=False))
    }
    save_file(decaying, tmp_path / "d.safetensors")
    errors = [
        convert_json(cli, tmp_path / "d.safetensors", "--energy", str(e), "--force")["stacked"]["rel_error"]
        for e in (0.5, 0.8, 0.95)
    ]
    assert errors[0] > errors[1] > errors[2] > 0
    everything = convert_json(cli, path, "--energy", "1", "--force")  # full rank: LORS is larger, all stays dense
    assert everything["stacked"]["reduction"] == 0 and everything["stacked"]["rel_error"] == 0
    assert len(everything["kept_dense"]) == 6 and not everything["groups"]
    reductions = {f: convert_json(cli, path, "--reduction", str(f), "--force")["stacked"] for f in (0.3, 0.6)}
    for f, stacked in reductions.items():
        assert stacked["reduction"] >= f and stacked["reduction"] - f < 0.03
    assert reductions[0.6]["rel_error"] > reductions[0.3]["rel_error"]


def test_rank_0_without_s_removes_the_weights_and_reads_back(tmp_path, cli):
    """A group of rank-0 layers without S stores no numbers (an allocation at a high reduction can choose it too):
    the file reads back, and the layers compute zero."""
    save_file(bert(layers=3), tmp_path / "m.safetensors")
    removed = convert_json(cli, tmp_path / "m.safetensors", "--rank", "0", "--shared", "none")
    assert removed["groups"] and all(g["lors_params"] == 0 for g in removed["groups"])
    dense = expand(cli, tmp_path / "m.lors.safetensors", tmp_path)
    assert torch.count_nonzero(dense["encoder.layer.1.intermediate.dense.weight"]) == 0
    bias = "encoder.layer.1.intermediate.dense.bias"
    assert torch.equal(dense[bias], bert(layers=3)[bias])


def test_reduction_allocation_beats_uniform_rank(tmp_path, cli):
    """Same budget: the allocated ranks give a lower total relative squared error than a uniform rank."""
    save_file(bert(layers=4), tmp_path / "m.safetensors")
    uniform = convert_json(cli, tmp_path / "m.safetensors", "--rank", "6", "--shared", "mean")
    target = uniform["stacked"]["reduction"]
    allocated = convert_json(
        cli, tmp_path / "m.safetensors", "--reduction", f"{target - 1e-4:.6f}", "--force", "--shared", "mean"
    )
    assert allocated["stacked"]["lors_params"] <= uniform["stacked"]["lors_params"]
    objective = lambda r: sum(g["rel_error"] ** 2 for g in r["groups"])
    assert objective(allocated) <= objective(uniform) + 1e-9


def test_rank_under_auto_drops_s_before_keeping_a_group_dense(tmp_path, cli):
    """2 x 64x64 at --rank 20: with S the group stores 9,216 numbers (dense: 8,192), without S 5,120."""
    save_file({f"layers.{i}.w": rand(64, 64, seed=i) for i in range(2)}, tmp_path / "m.safetensors")
    report = convert_json(cli, tmp_path / "m.safetensors", "--rank", "20")
    assert not report["kept_dense"] and [g["shared"] for g in report["groups"]] == [False]
    assert report["stacked"]["lors_params"] == 5120 == stored_numbers(tmp_path / "m.lors.safetensors")
    # where S lowers the error and the group stays smaller than dense, auto keeps it
    shared = {f"layers.{i}.w": w for i, w in enumerate(low_rank_stack(layers=4, rows=64, cols=64, rank=3))}
    save_file(shared, tmp_path / "s.safetensors")
    assert [g["shared"] for g in convert_json(cli, tmp_path / "s.safetensors", "--rank", "3")["groups"]] == [True]


def test_group_that_cannot_shrink_stays_dense(tmp_path, cli):
    sd = {f"layers.{i}.w": torch.randn(4, 6) for i in range(2)}
    sd.update({f"layers.{i}.big": torch.randn(32, 32) for i in range(4)})
    save_file(sd, tmp_path / "m.safetensors")
    report = convert_json(cli, tmp_path / "m.safetensors", "--rank", "4", "--shared", "mean")
    assert [k["template"] for k in report["kept_dense"]] == ["layers.{i}.w"]
    assert report["total"]["lors_params"] == stored_numbers(tmp_path / "m.lors.safetensors")
    assert report["total"]["lors_params"] < report["total"]["dense_params"]
    dense = expand(cli, tmp_path / "m.lors.safetensors", tmp_path)
    assert dense["layers.1.w"].equal(sd["layers.1.w"])


def test_dtype_is_kept_or_chosen(tmp_path, cli):
    sd = {k: v.to(torch.bfloat16) for k, v in llama().items()}
    save_file(sd, tmp_path / "m.safetensors")
    convert_json(cli, tmp_path / "m.safetensors", "--rank", "3")
    source, _ = read_lors(tmp_path / "m.lors.safetensors")
    assert {i.dtype for i in source.info.values()} == {torch.bfloat16}
    convert_json(cli, tmp_path / "m.safetensors", "--rank", "3", "--dtype", "float32", "-o", tmp_path / "f.safetensors")
    source, _ = read_lors(tmp_path / "f.safetensors")
    assert {i.dtype for i in source.info.values()} == {torch.float32}
    dense = expand(cli, tmp_path / "f.safetensors", tmp_path)
    assert {t.dtype for t in dense.values()} == {torch.bfloat16}


def test_a_narrower_dtype_that_cannot_hold_a_tensor_is_refused_naming_it(tmp_path, cli):
    """Defect 11: --dtype float16 wrote inf for kept tensors above 65,504, without a word."""
    sd = llama()
    sd["model.embed_tokens.weight"][3, 5] = 1e5  # kept (not stacked), beyond float16's largest 65,504
    sd["model.norm.weight"][0] = -7e4
    save_file(sd, tmp_path / "m.safetensors")
    result = cli(tmp_path / "m.safetensors", "--rank", "3", "--dtype", "float16", "-o", tmp_path / "h.safetensors")
    assert result.code == 1 and len(result.err.strip().splitlines()) == 1, result.err
    assert "model.embed_tokens.weight" in result.err and "model.norm.weight" in result.err
    assert not list(tmp_path.glob("h*"))
    convert_json(
        cli, tmp_path / "m.safetensors", "--rank", "3", "--dtype", "bfloat16", "-o", tmp_path / "b.safetensors"
    )
    source, _ = read_lors(tmp_path / "b.safetensors")
    assert all(torch.isfinite(source.get(name)).all() for name in source.info)


# ---------------------------------------------------------------- writes and refusals


def test_refusals_leave_nothing(tmp_path, cli):
    save_file(bert(), tmp_path / "m.safetensors")
    before = (tmp_path / "m.safetensors").read_bytes()
    cases = [
        ([tmp_path / "m.safetensors", "-o", tmp_path / "m.safetensors", "--force"], "onto the input"),
        ([tmp_path / "m.safetensors", "-o", tmp_path / "missing" / "x.safetensors"], "does not exist"),
        ([tmp_path / "m.safetensors", "--rank", "-1"], "--rank"),
        ([tmp_path / "m.safetensors", "--reduction", "1.0"], "--reduction"),
        ([tmp_path / "m.safetensors", "--reduction", "0.99", "--shared", "mean"], "out of reach"),
        ([tmp_path / "m.safetensors", "--shared", "median"], "--shared"),
        ([tmp_path / "m.safetensors", "--rank", "2", "--energy", "0.5"], "choose one"),
        ([tmp_path / "nope.safetensors"], "no such file"),
    ]
    for args, message in cases:
        result = cli(*args, "--quiet")
        assert result.code != 0, args
        assert message in result.err, (args, result.err)
        assert len(result.err.strip().splitlines()) == 1, result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert (tmp_path / "m.safetensors").read_bytes() == before


def test_existing_output_needs_force(tmp_path, cli):
    save_file(bert(), tmp_path / "m.safetensors")
    assert cli(tmp_path / "m.safetensors", "--quiet", "--rank", "2").code == 0
    first = (tmp_path / "m.lors.safetensors").read_bytes()
    result = cli(tmp_path / "m.safetensors", "--quiet", "--rank", "3")
    assert result.code != 0 and "--force" in result.err
    assert (tmp_path / "m.lors.safetensors").read_bytes() == first
    assert cli(tmp_path / "m.safetensors", "--quiet", "--rank", "3", "--force").code == 0
    assert (tmp_path / "m.lors.safetensors").read_bytes() != first


def test_failure_mid_write_leaves_nothing(tmp_path, cli, monkeypatch):
    save_file(bert(), tmp_path / "m.safetensors")
    import lors_convert.plan as plan_module

    calls = {"n": 0}
    real = plan_module.metric_low_rank

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_module, "metric_low_rank", interrupted)
    result = cli(tmp_path / "m.safetensors", "--quiet", "--rank", "2")
    assert result.code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_sharded_output_and_determinism(tmp_path, cli):
    save_file(llama(layers=4), tmp_path / "m.safetensors")
    out = tmp_path / "o.safetensors"
    report = convert_json(cli, tmp_path / "m.safetensors", "-o", out, "--shard-size", "20kB")
    index = json.loads((tmp_path / "o.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not out.exists()
    assert report["total"]["lors_params"] == sum(stored_numbers(tmp_path / s) for s in shards)
    source, meta = read_lors(out)  # the report finds a sharded output by its plain name
    assert meta.groups
    again = convert_json(cli, tmp_path / "m.safetensors", "-o", tmp_path / "p.safetensors", "--shard-size", "20kB")
    for s in shards:
        assert (tmp_path / s).read_bytes() == (tmp_path / s.replace("o-", "p-")).read_bytes()
    assert again["groups"] == report["groups"]


def test_report_and_inspect_commands(tmp_path, cli):
    save_file(bert(), tmp_path / "m.safetensors")
    converted = convert_json(cli, tmp_path / "m.safetensors")
    reported = convert_json(cli, "report", tmp_path / "m.lors.safetensors")
    assert reported == converted
    table = cli("report", tmp_path / "m.lors.safetensors")
    assert table.code == 0 and "stacked total" in table.out and "encoder.layer.{i}.output.dense.weight" in table.out
    inspected = convert_json(cli, "inspect", tmp_path / "m.safetensors", "--rank", "4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.lors.safetensors", "m.safetensors"]
    g = inspected["groups"][0]
    rows, cols = g["shape"]
    assert g["lors_params_at_rank"]["4"] == rows * cols + 4 * len(g["layers"]) * (rows + cols)
    assert cli("report", tmp_path / "m.safetensors").code == 1


def test_source_metadata_recorded(tmp_path, cli):
    import hashlib

    save_file(bert(), tmp_path / "m.safetensors")
    convert_json(cli, tmp_path / "m.safetensors")
    _, meta = read_lors(tmp_path / "m.lors.safetensors")
    assert meta.source.sha256 == hashlib.sha256((tmp_path / "m.safetensors").read_bytes()).hexdigest()
    assert meta.format_version == FORMAT_VERSION and meta.settings["reduction"] == 0.5
    with safe_open(str(tmp_path / "m.lors.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"


def expand(cli, lors: Path, folder: Path) -> dict[str, torch.Tensor]:
    out = folder / "expanded.safetensors"
    result = cli("expand", lors, "-o", out, "--quiet", "--force")
    assert result.code == 0, result.err
    return load_file(out)


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_real_minilm(tmp_path, cli, minilm):
    transformers = pytest.importorskip("transformers")
    report = convert_json(cli, minilm, "-o", tmp_path / "m.lors.safetensors")
    assert len(report["groups"]) == 6 and all(len(g["layers"]) == 6 for g in report["groups"])
    assert abs(report["stacked"]["reduction"] - 0.5) < 0.01
    assert report["total"]["lors_params"] == stored_numbers(tmp_path / "m.lors.safetensors")
    dense = expand(cli, tmp_path / "m.lors.safetensors", tmp_path)
    model = transformers.BertModel(transformers.BertConfig.from_pretrained(minilm))
    original = open_checkpoint(minilm)
    assert set(dense) == set(original.info)
    # The checkpoint (like its original) carries position_ids, a buffer current transformers no longer persists.
    not_persisted = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    model.load_state_dict({k: v for k, v in dense.items() if k not in not_persisted}, strict=True)
    for g in report["groups"]:
        err = sum(
            (dense[g["template"].format(i=i)] - original.get(g["template"].format(i=i))).square().sum()
            for i in g["layers"]
        )
        norm = sum(original.get(g["template"].format(i=i)).square().sum() for i in g["layers"])
        assert abs((err / norm).sqrt().item() - g["rel_error"]) < 1e-5


def test_allocation_floor_keeps_every_layer_above_a_tenth_of_break_even():
    """A group whose error looks free to the objective (tiny spectrum) still gets a tenth of its break-even rank
    where the budget allows it; without a floor the greedy gives it nothing."""
    from lors_convert.factorize import allocate_ranks, break_even_cap, lors_params

    shapes = [(64, 64), (64, 64)]
    loud = [torch.linspace(100, 1, 64) for _ in range(3)]
    quiet = [torch.full((64,), 1e-9) for _ in range(3)]
    budget = 3 * 40 * 128
    floor = math.ceil(0.1 * break_even_cap(64, 64))
    assert min(allocate_ranks([loud, quiet], [1.0, 1.0], shapes, budget)[1]) == 0
    floored = allocate_ranks([loud, quiet], [1.0, 1.0], shapes, budget, floor=0.1)
    assert min(floored[1]) == floor
    assert sum(lors_params(64, 64, group, shared=False) for group in floored) <= budget
