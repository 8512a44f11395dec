"""Using a LORS checkpoint where models run, beyond what every model of the zoo (test_zoo.py) goes through: training
moves each group's one shared matrix, the real MiniLM, layer dtypes, clear errors, task classes and nested blocks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_zoo import output, tiny

import lors_convert
from lors_convert import LorsError
from lors_convert.lors_format import expand, read_lors
from lors_convert.nn import LorsLinear

transformers = pytest.importorskip("transformers")


def dense_reference(model, lors_path, tmp_path):
    """The dense expansion of the LORS file, loaded by transformers as an ordinary checkpoint."""
    folder = tmp_path / "dense"
    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in expand(*read_lors(lors_path))}, folder / "model.safetensors")
    return type(model).from_pretrained(folder).float().eval()


def test_one_shared_parameter_per_group_that_training_moves(tmp_path, cli):
    model, inputs = tiny("llama")
    model.save_pretrained(tmp_path / "model")
    assert cli(tmp_path / "model", "-o", tmp_path / "m.safetensors", "--rank", "2", "--shared", "mean", "-q").code == 0
    loaded = lors_convert.load(tmp_path / "m.safetensors")
    layers = [m for m in loaded.modules() if isinstance(m, LorsLinear)]
    groups = {id(m.shared) for m in layers}
    assert len(groups) == 7 and len(layers) == 21  # seven groups of three layers, one matrix each
    loss = output(loaded(**inputs)).square().mean()
    loss.backward()
    shared = layers[0].shared
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    with torch.no_grad():
        shared.add_(1.0)
    lors_convert.save(loaded, tmp_path / "trained.safetensors")
    reloaded = lors_convert.load(tmp_path / "trained.safetensors", architecture=tmp_path / "model")
    assert torch.equal(next(m for m in reloaded.modules() if isinstance(m, LorsLinear)).shared, shared)


@pytest.mark.slow
def test_load_the_real_minilm(tmp_path, cli, minilm):
    result = cli(minilm, "-o", tmp_path / "m.lors.safetensors", "--quiet", "--json")
    assert result.code == 0
    loaded = lors_convert.load(tmp_path / "m.lors.safetensors")
    assert type(loaded).__name__ == "LorsBertModel"
    source, _ = read_lors(tmp_path / "m.lors.safetensors")
    buffers = sum(info.numel for info in source.info.values() if not info.dtype.is_floating_point)  # position_ids
    assert sum(p.numel() for p in loaded.parameters()) == result.json()["total"]["lors_params"] - buffers
    reference = dense_reference(
        transformers.BertModel(transformers.BertConfig.from_pretrained(minilm)),
        tmp_path / "m.lors.safetensors",
        tmp_path,
    )
    ids = torch.randint(1000, 2000, (2, 12))
    with torch.no_grad():
        got, expected = loaded(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state
    assert (got - expected).norm() <= 1e-5 * expected.norm()


def test_swapped_layers_take_the_dtype_of_the_layer_they_replace():
    """A mixed-dtype model (float32 embedding first, bfloat16 attention, float64 MLP): each LorsLinear and each
    group's S are in its own layers' dtype, not the model's first parameter's."""
    from lors_convert.lors_modeling import SHARED_ATTRIBUTE, install_lors

    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(10, 16)
    model.attn = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3)).to(torch.bfloat16)
    model.mlp = torch.nn.ModuleList(torch.nn.Linear(16, 32) for _ in range(3)).to(torch.float64)
    swap = dict(rank=2, cols=16, transposed=False)
    swaps = [{"path": f"attn.{i}", "group": 0, "rows": 16, **swap} for i in range(3)]
    swaps += [{"path": f"mlp.{i}", "group": 1, "rows": 32, **swap} for i in range(3)]
    install_lors(model, {"swaps": swaps, "shared": {"0": [16, 16], "1": [32, 16]}})
    for part, dtype in (("attn", torch.bfloat16), ("mlp", torch.float64)):
        layers = getattr(model, part)
        assert all(isinstance(m, LorsLinear) for m in layers)
        assert {p.dtype for m in layers for p in m.parameters()} == {dtype}
    assert [p.dtype for p in getattr(model, SHARED_ATTRIBUTE).values()] == [torch.bfloat16, torch.float64]
    assert model.embed.weight.dtype == torch.float32


def test_load_without_an_architecture_is_one_clear_error(tmp_path, cli):
    from factory_models import StackedMLP

    save_file(StackedMLP().state_dict(), tmp_path / "m.safetensors")
    assert cli(tmp_path / "m.safetensors", "--rank", "4", "--quiet").code == 0
    with pytest.raises(LorsError, match="cannot tell the architecture"):
        lors_convert.load(tmp_path / "m.lors.safetensors")
    with pytest.raises(LorsError, match="not made by lors_convert.load"):
        lors_convert.save(StackedMLP(), tmp_path / "x.safetensors")


def test_load_into_the_wrong_architecture_is_one_clear_error(tmp_path, cli):
    model, _ = tiny("llama")
    model.save_pretrained(tmp_path / "llama")
    other, _ = tiny("bert")
    other.save_pretrained(tmp_path / "bert")
    assert cli(tmp_path / "llama", "-o", tmp_path / "m.safetensors", "--rank", "2", "--quiet").code == 0
    with pytest.raises(LorsError, match="no such layer|do not fit"):
        lors_convert.load(tmp_path / "m.safetensors", architecture=tmp_path / "bert")


@pytest.mark.slow
def test_export_of_minilm_keeps_its_tokenizer_and_sentence_transformers_files(tmp_path, cli, minilm):
    assert cli(minilm, "-o", tmp_path / "m.lors.safetensors", "--quiet").code == 0
    assert cli("export", tmp_path / "m.lors.safetensors", "-o", tmp_path / "out", "--quiet").code == 0
    copied = {p.relative_to(minilm) for p in minilm.rglob("*") if p.is_file()}
    written = {p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*") if p.is_file()}
    kept = {p for p in copied if p.name not in ("model.safetensors", "config.json") and p.suffix != ".bin"}
    assert kept <= written and "lors_modeling.py" in {p.name for p in written}
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id
    result = cli("export", tmp_path / "m.lors.safetensors", "-o", tmp_path / "out", "--quiet")
    assert result.code == 1 and "already exists" in result.err


def test_a_bare_encoder_under_a_task_class_name_loads_as_the_base_model(tmp_path, cli):
    """all-mpnet-base-v2's config names MPNetForMaskedLM over the bare encoder's weights: the base model is built
    (not the task class with a randomly initialised head), by lors_convert.load and for the teacher alike. A
    checkpoint that has the head keeps its class."""
    import json

    from lors_convert.hf import dense_model

    model, inputs = tiny("bert")
    model.save_pretrained(tmp_path / "bare")
    config = json.loads((tmp_path / "bare" / "config.json").read_text())
    (tmp_path / "bare" / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    transformers.BertForMaskedLM(model.config).save_pretrained(tmp_path / "head")

    assert type(dense_model(tmp_path / "bare")) is transformers.BertModel
    assert type(dense_model(tmp_path / "head")) is transformers.BertForMaskedLM
    for folder, cls in (("bare", transformers.BertModel), ("head", transformers.BertForMaskedLM)):
        lors_path = tmp_path / f"{folder}.lors.safetensors"
        assert cli(tmp_path / folder, "-o", lors_path, "--rank", "3", "--quiet").code == 0
        loaded = lors_convert.load(lors_path)
        assert isinstance(loaded, cls) and any(isinstance(m, LorsLinear) for m in loaded.modules())
    with torch.no_grad():
        teacher = dense_model(tmp_path / "bare")
        torch.testing.assert_close(teacher(**inputs).last_hidden_state, model.eval()(**inputs).last_hidden_state)


def test_block_paths_take_the_templates_index_in_nested_models(tmp_path, cli):
    """Swin-style `layers.S.blocks.B`: each block is one path, not its stage where B equals S (layers.0 for block
    0 of stage 0, which dropped that block and made the whole stage one "block" for the layer loss and FSDP)."""
    from factory_models import NestedStages, nested_stages

    from lors_convert.loading import block_paths

    torch.manual_seed(0)
    save_file(NestedStages().state_dict(), tmp_path / "m.safetensors")
    assert cli(tmp_path / "m.safetensors", "--rank", "4", "--quiet").code == 0
    loaded = lors_convert.load(tmp_path / "m.lors.safetensors", architecture=nested_stages)
    assert [g.template for g in loaded.lors.meta.groups] == [f"layers.{s}.blocks.{{i}}.0.weight" for s in (0, 1)]
    assert block_paths(loaded, loaded.lors.meta) == [f"layers.{s}.blocks.{b}" for s in (0, 1) for b in range(3)]
