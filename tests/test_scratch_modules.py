"""LORS as the paper trains it: `lorsify` (static LORS from scratch or from trained weights) and `AdaptiveLors`."""

from __future__ import annotations

import copy

import pytest
import torch
from factory_models import StackedMLP
from torch import nn

from lors_convert.config import LorsifyConfig
from lors_convert.nn import AdaptiveLors, LorsLinear, lors_groups, lorsify, merge_lors


def stacked(layers: int = 4, dim: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return StackedMLP(dim=dim, layers=layers)


@pytest.mark.parametrize("shared", [True, False])
def test_lorsify_parameter_counts(shared):
    model = lorsify(stacked(), LorsifyConfig(rank=3, shared=shared))
    layers = [m for m in model.modules() if isinstance(m, LorsLinear)]
    assert len(layers) == 4
    stacked_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "lors_shared" in n)
    assert stacked_params == (16 * 16 if shared else 0) + 4 * 3 * (16 + 16)
    biases_and_norm = 4 * 16 + 2 * 16
    assert sum(p.numel() for p in model.parameters()) == stacked_params + biases_and_norm


def test_scratch_layers_start_as_their_shared_matrix_and_s_learns_from_every_layer():
    model = lorsify(stacked(), LorsifyConfig(rank=3))
    layers = [m for m in model.modules() if isinstance(m, LorsLinear)]
    shared = layers[0].shared
    assert all(torch.count_nonzero(m.lora_B) == 0 for m in layers)  # B = 0 at init
    assert all(torch.equal(m.weight, shared) for m in layers)  # so each layer is S
    x = torch.randn(8, 16)
    with torch.no_grad():
        expected = x
        for layer in model.layers:
            expected = expected + nn.functional.gelu(nn.functional.linear(expected, shared, layer[0].bias))
        assert torch.allclose(model(x), model.norm(expected), atol=1e-6)
    merged = merge_lors(copy.deepcopy(model))
    model(x).square().sum().backward()
    merged(x).square().sum().backward()
    assert len(lors_groups(model)) == 1
    # dL/dS = Σ_i dL/dW_i: the one shared matrix learns from every layer of its group
    expected = sum(layer[0].weight.grad for layer in merged.layers)
    assert torch.allclose(shared.grad, expected, rtol=1e-4, atol=1e-6)
    assert all(layer[0].weight.grad.abs().sum() > 0 for layer in merged.layers)


def test_full_rank_conversion_reproduces_the_dense_layers():
    dense = stacked()
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = dense(x)
    model = lorsify(dense, LorsifyConfig(rank=16, init="convert"))
    with torch.no_grad():
        assert torch.allclose(model(x), expected, rtol=1e-4, atol=1e-5)


def test_adaptive_shapes_initialisation_and_the_plain_generator_when_private_parts_are_zero():
    torch.manual_seed(0)
    mixer = AdaptiveLors(query_dim=24, in_dim=16, out_dim=12, stages=6, core_sizes=4, core_groups=(1, 1, 2, 2, 3, 3))
    x, q = torch.randn(2, 5, 7, 16), torch.randn(2, 5, 24)
    for stage in range(6):
        out = mixer(x, q, stage)
        assert out.shape == (2, 5, 7, 12) and torch.count_nonzero(out) == 0  # generators start at zero
        assert mixer.left[stage].shape == (16, mixer.groups[stage] * 4)
        assert mixer.right[stage].shape == (mixer.groups[stage] * 4, 12)
    with torch.no_grad():  # a trained common generator, private generators still zero: the plain AdaMixer mixing
        mixer.common.weight.normal_()
        mixer.common.bias.normal_()
    plain = x @ mixer.common(q).unflatten(-1, (16, 12))
    assert all(torch.allclose(mixer(x, q, stage), plain, atol=1e-5) for stage in range(6))
    with torch.no_grad():  # with private cores, forward equals x · M_i(q) built densely, block-diagonal core
        for core in mixer.cores:
            core.weight.normal_()
    for stage in range(6):
        expected = x @ mixer.mixing(q, stage)
        assert torch.allclose(mixer(x, q, stage), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(mixer(x, q, 0), mixer(x, q, 5), atol=1e-3)  # stages differ through their private parts


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_init_then_finetune_lm_lowers_the_loss_and_the_checkpoint_works_like_any(tmp_path, cli, kind):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    import lors_convert
    from lors_convert.lors_format import read_lors

    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=32, n_embd=32, n_layer=3, n_head=2, n_positions=64)
    else:
        config = transformers.LlamaConfig(
            vocab_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    config.architectures = [{"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[kind]]
    config.save_pretrained(tmp_path / "config")
    lors = tmp_path / "init.lors.safetensors"
    result = cli("init", tmp_path / "config", "-o", lors, "--reduction", "0.5", "--quiet", "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert report["from_scratch"] and report["groups"] and all(g["shared"] for g in report["groups"])
    assert 0.4 <= report["stacked"]["reduction"] <= 0.6
    source, meta = read_lors(lors)
    assert all(torch.count_nonzero(source.get(n + ".lora_B")) == 0 for g in meta.groups for n in g.names)

    # a repeating pattern a small model learns quickly
    ids = torch.arange(32).repeat(6)[:160].reshape(10, 16).repeat(6, 1)
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "data.safetensors")
    tuned = cli(
        "finetune",
        lors,
        "-d",
        tmp_path / "data.safetensors",
        "-o",
        tmp_path / "ft.safetensors",
        "--objective",
        "lm",
        "--steps",
        "30",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--warmup",
        "2",
        "--eval-examples",
        "10",
        "--quiet",
        "--json",
    )
    assert tuned.code == 0, tuned.err
    assert tuned.json()["after"]["loss"] < tuned.json()["before"]["loss"] - 0.5
    refused = cli("finetune", lors, "-d", tmp_path / "data.safetensors", "-o", tmp_path / "x.safetensors", "--quiet")
    assert refused.code == 1 and "--objective lm" in refused.err

    model = lors_convert.load(tmp_path / "ft.safetensors")
    assert (
        sum(p.numel() for p in model.parameters())
        == cli("report", tmp_path / "ft.safetensors", "--json").json()["total"]["lors_params"]
    )
    assert cli("expand", tmp_path / "ft.safetensors", "-o", tmp_path / "dense.safetensors", "--quiet").code == 0
    assert cli("export", tmp_path / "ft.safetensors", "-o", tmp_path / "exported", "--quiet").code == 0
    evaluated = cli("eval", tmp_path / "ft.safetensors", "-d", tmp_path / "data.safetensors", "--held-out", "--json")
    assert evaluated.code == 0, evaluated.err
    assert evaluated.json()["loss"] == pytest.approx(tuned.json()["after"]["loss"], rel=1e-4)


def test_lorsify_leaves_the_layers_biases_as_they_were():
    model = stacked()
    biases = [layer[0].bias.detach().clone() for layer in model.layers]
    lorsify(model, LorsifyConfig(rank=2))
    assert all(torch.equal(layer[0].bias, bias) for layer, bias in zip(model.layers, biases))


def tiny_llama_config(folder, layers: int = 3) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)


def test_init_no_shared_reduction_removes_that_fraction(tmp_path, cli):
    """Without S nothing is spent on it: --reduction 0.5 stores half the stacked numbers, not less."""
    tiny_llama_config(tmp_path / "config")
    out = tmp_path / "init.lors.safetensors"
    result = cli("init", tmp_path / "config", "-o", out, "--reduction", "0.5", "--no-shared", "--quiet", "--json")
    assert result.code == 0, result.err
    assert 0.5 <= result.json()["stacked"]["reduction"] <= 0.55  # ranks round down; subtracting S's size gave 0.87


@pytest.mark.parametrize("shared", [True, False])
def test_scratch_layers_are_not_zero_maps_with_or_without_s(tmp_path, cli, shared):
    """B = 0 only where S carries the function; without S, B A starts with the variance of the layer's own init."""
    import lors_convert

    tiny_llama_config(tmp_path / "config")
    out = tmp_path / "init.lors.safetensors"
    flag = "--shared" if shared else "--no-shared"
    assert cli("init", tmp_path / "config", "-o", out, "--rank", "8", flag, "--quiet").code == 0
    # Llama initialises its Linear weights normal(0, 0.02); nn.Linear uniform(±1/sqrt(in)), variance 1/(3 in)
    for model, variance in (
        (lors_convert.load(out), lambda m: 0.02**2),
        (lorsify(stacked(dim=64), LorsifyConfig(rank=8, shared=shared)), lambda m: 1 / (3 * m.in_features)),
    ):
        layers = [m for m in model.modules() if isinstance(m, LorsLinear)]
        assert layers and all(torch.count_nonzero(m.weight) > 0 for m in layers)
        assert all(0.5 < m.weight.detach().var().item() / variance(m) < 2 for m in layers)


@pytest.mark.parametrize("conv1d", [False, True])
def test_merge_lors_initialises_no_dense_weight_it_then_replaces(monkeypatch, conv1d):
    """The dense layers are built on the meta device: their own random init never touches real memory."""
    model = stacked()
    if conv1d:  # GPT-2's layers
        conv = pytest.importorskip("transformers.pytorch_utils").Conv1D
        for layer in model.layers:
            layer[0] = conv(16, 16)
    lorsify(model, LorsifyConfig(rank=3, init="convert"))
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = model(x)
    initialised = []

    def recording(real):
        def init(tensor, *args, **kwargs):
            initialised.append(tensor.device)
            return real(tensor, *args, **kwargs)

        return init

    for name in ("kaiming_uniform_", "uniform_", "normal_"):
        monkeypatch.setattr(nn.init, name, recording(getattr(nn.init, name)))
    merge_lors(model)
    assert all(device.type == "meta" for device in initialised)
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_init_stacks_only_the_layers_load_can_swap(tmp_path, cli):
    """wav2vec2's feature extractor stacks conv kernels (conv_layers.1 and .2, 8 x 8 x 3): init keeps them as the
    model initialises them, since load swaps only what the one dispatch table (nn.lors_layout) names; before, init
    stacked every floating >= 2-D weight (and crashed on the 3-D kernels)."""
    import lors_convert
    from lors_convert.lors_format import read_lors

    transformers = pytest.importorskip("transformers")
    transformers.Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8, 8),
        conv_stride=(2, 2, 2),
        conv_kernel=(3, 3, 3),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
    ).save_pretrained(tmp_path / "config")
    out = tmp_path / "init.lors.safetensors"
    result = cli("init", tmp_path / "config", "-o", out, "--rank", "2", "--quiet")
    assert result.code == 0, result.err
    source, meta = read_lors(out)
    assert meta.groups and not any("conv" in g.template for g in meta.groups)
    assert "feature_extractor.conv_layers.1.conv.weight" in source.info
    model = lors_convert.load(out)
    assert sum(isinstance(m, LorsLinear) for m in model.modules()) == sum(len(g.names) for g in meta.groups)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 64)).last_hidden_state).all()
