"""The public API: one verb and a config object per operation (`lors_convert.convert(source, output, config)`…),
on a real tiny Llama (a GGUF written by the `gguf` package), giving what the CLI gives."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch

import lors_convert as lc
from lors_convert.checkpoint import open_checkpoint
from lors_convert.lors_format import read_lors
from lors_convert.nn import LorsLinear

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")
from test_gguf import lines, write_tiny_gguf  # noqa: E402

IDS = torch.tensor([[83, 257, 220, 66, 64, 83]])


def test_every_public_name_is_the_verb_or_config_not_a_module():
    import lors_convert.compression  # noqa: F401  the modules named like verbs, imported first: they must not shadow
    import lors_convert.conversion  # noqa: F401
    import lors_convert.exporting  # noqa: F401
    import lors_convert.finetuning  # noqa: F401

    for name in lc.__all__:
        assert not isinstance(getattr(lc, name), types.ModuleType), name
    assert {"convert", "load", "save", "export", "init", "lorsify", "merge", "finetune", "compress"} <= set(lc.__all__)
    for verb in ("Convert", "Export", "Init", "Lorsify", "Finetune", "Compress"):
        assert isinstance(getattr(lc, f"{verb}Config"), type)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        lc.nothing  # noqa: B018


@pytest.mark.slow
def test_convert_load_merge_save_export_finetune_through_the_api(tmp_path, cli):
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)
    text = lines(tmp_path / "text.txt")
    config = lc.ConvertConfig(reduction=0.3, calibrate=[str(text)], calib_samples=16, dtype="float32")
    files = lc.convert(str(gguf), tmp_path / "api.lors.safetensors", config)
    assert files == [tmp_path / "api.lors.safetensors"]
    by_cli = cli(
        gguf,
        "-o",
        tmp_path / "cli.lors.safetensors",
        "--reduction",
        "0.3",
        "--calibrate",
        text,
        "--calib-samples",
        "16",
        "--dtype",
        "float32",
    )
    assert by_cli.code == 0, by_cli.err
    api, made = open_checkpoint(files[0]), open_checkpoint(tmp_path / "cli.lors.safetensors")
    assert set(api.info) == set(made.info)
    for name in api.info:  # the same conversion, whichever way it was asked for
        torch.testing.assert_close(api.get(name), made.get(name), atol=1e-6, rtol=1e-5)
    assert read_lors(files[0])[1].settings == read_lors(tmp_path / "cli.lors.safetensors")[1].settings

    model = lc.load(files[0]).eval()
    assert any(isinstance(m, LorsLinear) for m in model.modules())
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        merged = lc.merge(copy.deepcopy(model))
        assert not any(isinstance(m, LorsLinear) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, atol=1e-4, rtol=1e-4)
    assert lc.save(model, tmp_path / "saved.lors.safetensors")[0].is_file()

    folder = lc.export(files[0], tmp_path / "dense", lc.ExportConfig(dense=True))
    dense = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=IDS).logits, expected, atol=1e-4, rtol=1e-4)

    results = lc.finetune(
        files[0],
        [text],
        tmp_path / "tuned.lors.safetensors",
        lc.FinetuneConfig(steps=2, batch_size=4, eval_examples=4),
        quiet=True,
        log=lambda *a: None,
    )
    assert results["steps"] == 2 and (tmp_path / "tuned.lors.safetensors").is_file()


def test_init_and_lorsify_take_their_configs(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4
    )
    config.save_pretrained(tmp_path / "config")
    files = lc.init(tmp_path / "config", tmp_path / "scratch.lors.safetensors", lc.InitConfig(rank=4))
    meta = read_lors(files[-1])[1]
    assert meta.groups and all(set(g.ranks) == {4} for g in meta.groups)
    assert json.loads(json.dumps(meta.settings))["rank"] == 4

    model = transformers.LlamaForCausalLM(config)
    lc.lorsify(model, lc.LorsifyConfig(rank=2, shared=False, include=["*.mlp.*"]))
    swapped = [n for n, m in model.named_modules() if isinstance(m, LorsLinear)]
    assert swapped and all(".mlp." in n for n in swapped) and len(swapped) == 3 * 3
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


def test_a_bad_config_is_a_lors_error_and_writes_nothing(tmp_path):
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)
    for config in (
        lc.ConvertConfig(reduction=1.5),
        lc.ConvertConfig(rank=4, reduction=0.5),
        lc.ConvertConfig(dtype="int8"),
        lc.ConvertConfig(fisher=True),
    ):
        with pytest.raises(lc.LorsError):
            lc.convert(gguf, tmp_path / "out.lors.safetensors", config)
    with pytest.raises(lc.LorsError, match="one of --rank and --reduction"):
        lc.init(tmp_path, tmp_path / "scratch.lors.safetensors", lc.InitConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


@pytest.mark.slow
def test_compress_through_the_api_is_the_clis(tmp_path, cli):
    """`lc.compress(source, output, CompressConfig)`: the verb the CLI's compress calls, with the same result."""
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)
    text = lines(tmp_path / "text.txt", 60)
    config = lc.CompressConfig(calibrate=[text], reduction=0.3, calib_samples=16)
    results = lc.compress(gguf, tmp_path / "api.lors.safetensors", config, log=lambda *a: None)
    assert set(results["rows"]) == {"converted"} and "held-out lines of text.txt" in results["held_out"]
    made = cli(
        "compress",
        gguf,
        "--calibrate",
        text,
        "--reduction",
        "0.3",
        "--calib-samples",
        "16",
        "--json",
        "-o",
        tmp_path / "cli.lors.safetensors",
        "--quiet",
    )
    assert made.code == 0, made.err
    assert made.json() == pytest.approx(results["rows"]["converted"])
    api, by_cli = read_lors(tmp_path / "api.lors.safetensors")[1], read_lors(tmp_path / "cli.lors.safetensors")[1]
    assert api.settings == by_cli.settings and api.groups == by_cli.groups
