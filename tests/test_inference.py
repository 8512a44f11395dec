"""LorsLinear's two computations (factored for few tokens, materialised for many) and generation with a LORS
model: same outputs as the materialised weight, gradients on the training path, the factored path chosen
under no_grad for decoding without forming a dense matrix, and greedy tokens equal to the dense expansion's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lors_convert.lors_modeling import LorsLinear, factored_forward, materialised_forward, use_factored


def holder(matrix: torch.Tensor) -> tuple[nn.ParameterDict, str]:
    """A shared matrix held the way a model holds it (its lors_shared dict, the group's key)."""
    return nn.ParameterDict({"0": nn.Parameter(matrix)}), "0"


ROWS, COLS, RANK = 48, 40, 6  # out x in for nn.Linear (in x out for Conv1D)


def layer(shared: bool, transposed: bool, seed: int = 0, grad: bool = False) -> LorsLinear:
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen) * 0.1
    s = holder(rand(ROWS, COLS)) if shared else None
    bias = nn.Parameter(rand(COLS if transposed else ROWS))
    return LorsLinear(s, rand(RANK, COLS), rand(ROWS, RANK), bias, transposed=transposed).requires_grad_(grad)


def reference(module: LorsLinear, x: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ + b (Conv1D: x W + b) with W = S + B A, in float64."""
    weight = module.lora_B.double() @ module.lora_A.double()
    if module.shared is not None:
        weight = weight + module.shared.double()
    y = x.double() @ (weight if module.transposed else weight.T)
    return y if module.bias is None else y + module.bias.double()


def inputs(tokens: int, module: LorsLinear, seed: int = 1) -> torch.Tensor:
    width = ROWS if module.transposed else COLS
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed))
    return x.reshape(2, tokens // 2, width) if tokens % 2 == 0 else x  # batch × sequence, or one token


def close(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> bool:
    return got.shape == expected.shape and (got.double() - expected).norm() <= rel * expected.norm()


@pytest.mark.parametrize("tokens", [1, 16, 4096])
@pytest.mark.parametrize("shared", [True, False], ids=["S", "noS"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_both_paths_and_forward_equal_the_materialised_weight(tokens, shared, transposed):
    module = layer(shared, transposed)
    x = inputs(tokens, module)
    expected = reference(module, x)
    with torch.no_grad():
        assert close(factored_forward(module, x), expected)
        assert close(materialised_forward(module, x), expected)
        assert close(module(x), expected)
    assert close(module(x), expected)  # with grad mode on


@pytest.mark.parametrize("tokens", [1, 4096])
@pytest.mark.parametrize("shared", [True, False], ids=["S", "noS"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_gradients_reach_s_a_b_and_bias_on_both_paths(tokens, shared, transposed):
    module = layer(shared, transposed, grad=True)
    twin = layer(shared, transposed, grad=True)  # the same values, for the float64 reference
    x = inputs(tokens, module)
    for path in (factored_forward, materialised_forward, LorsLinear.forward):
        module.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        path(module, x).square().sum().backward()
        reference(twin, x).square().sum().backward()
        for name, param in module.named_parameters():
            expected = dict(twin.named_parameters())[name].grad
            assert param.grad is not None, name
            assert close(param.grad, expected, rel=1e-4), (path.__name__, name)


# (out, in, rank, S, tokens, the faster path) where scripts/bench_lors_forward.py measured a clear winner
# (2-core CPU, float32, inference and training alike): TinyLlama shapes at 50% fewer stacked parameters, MiniLM.
MEASURED = [
    *[(2048, 2048, 465, True, n, "factored") for n in (1, 16, 128, 512)],
    *[(2048, 2048, 465, True, n, "materialised") for n in (2048, 4096)],
    *[(256, 2048, 103, True, n, "factored") for n in (1, 16, 128)],
    *[(256, 2048, 103, True, n, "materialised") for n in (512, 1024, 4096)],
    *[(5632, 2048, 682, True, n, "factored") for n in (1, 16, 128, 512)],
    *[(2048, 5632, 682, True, n, "materialised") for n in (2048, 4096)],
    *[
        (rows, cols, rank, False, n, "factored")
        for rows, cols, rank in ((2048, 2048, 512), (5632, 2048, 750))
        for n in (1, 16, 512, 4096)
    ],
    (384, 384, 170, True, 1, "factored"),
    (384, 384, 170, True, 16, "factored"),
    (384, 384, 170, True, 32 * 128, "materialised"),  # a MiniLM training or encoding batch
    (384, 384, 170, False, 32 * 128, "materialised"),  # rank near half the width: thin matmuls lose
    (384, 1536, 90, False, 32 * 128, "factored"),  # low rank: fewer flops at any batch
    (1536, 384, 90, True, 16, "factored"),
    (1536, 384, 90, True, 1024, "materialised"),
]


@pytest.mark.parametrize("rows,cols,rank,shared,tokens,faster", MEASURED)
def test_the_rule_picks_the_measured_faster_path(rows, cols, rank, shared, tokens, faster):
    assert use_factored(tokens, rows, cols, rank, shared) == (faster == "factored")


def test_this_files_layers_take_the_paths_the_tests_above_mean_to_cover():
    assert use_factored(1, ROWS, COLS, RANK, True) and use_factored(16, ROWS, COLS, RANK, True)
    assert not use_factored(4096, ROWS, COLS, RANK, True)
    assert all(use_factored(n, ROWS, COLS, RANK, False) for n in (1, 16, 4096))  # rank 6 of 40: fewer flops
    assert not use_factored(4096, ROWS, COLS, 3 * COLS // 5, False)  # a rank near half the width: not


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_decoding_under_no_grad_never_allocates_a_dense_weight(transposed):
    rows, cols, rank = 512, 384, 16
    gen = torch.Generator().manual_seed(0)
    module = LorsLinear(
        holder(torch.randn(rows, cols, generator=gen)),
        torch.randn(rank, cols, generator=gen),
        torch.randn(rows, rank, generator=gen),
        None,
        transposed=transposed,
    ).requires_grad_(False)
    x = torch.randn(1, 1, rows if transposed else cols, generator=gen)
    assert use_factored(1, rows, cols, rank, shared=True)
    with (
        torch.no_grad(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        got = module(x)
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert 0 < largest < rows * cols * 4 // 8  # only token-sized outputs, far below one dense weight
    assert close(got, reference(module, x))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        materialised_forward(module, x)  # the probe does see a dense weight when one is formed
    assert max(event.cpu_memory_usage for event in prof.events()) >= rows * cols * 4


# ---------------------------------------------------------------- generation with a converted model


@pytest.mark.parametrize("shared", ["mean", "none"])
def test_generate_with_the_lors_model_gives_the_dense_expansion_tokens(tmp_path, cli, shared):
    transformers = pytest.importorskip("transformers")
    import shutil

    import lors_convert

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    folder = tmp_path / "llama"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    lors = tmp_path / "llama.lors.safetensors"
    result = cli(folder, "-o", lors, "--reduction", "0.5", "--shared", shared, "--quiet")
    assert result.code == 0, result.err
    assert cli("expand", lors, "-o", tmp_path / "dense.safetensors", "--quiet").code == 0

    shutil.copy(folder / "config.json", tmp_path / "config.json")
    shutil.move(tmp_path / "dense.safetensors", tmp_path / "model.safetensors")
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = lors_convert.load(lors)
    assert sum(isinstance(m, LorsLinear) for m in model.modules()) > 0
    # a 40-token prompt: with S the prefill materialises (64x64 layers: factored below 26 tokens), decoding not
    prompt = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(3))
    settings = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = dense.generate(prompt, **settings)
        got = model.generate(prompt, **settings)
    assert expected.shape == (1, 50)
    assert torch.equal(got, expected)


# ---------------------------------------------------------------- LorsLinear passes for nn.Linear (and Conv1D)


@pytest.mark.parametrize("shared", [True, False], ids=["S", "noS"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_lors_linear_has_nn_linears_attributes(shared, transposed):
    """No isinstance: what code that takes an nn.Linear reads (weight, in_features, out_features, bias)."""
    module = layer(shared, transposed, grad=True)
    dense = nn.Linear(*((ROWS, COLS) if transposed else (COLS, ROWS)))  # (in, out)
    assert (module.in_features, module.out_features) == (dense.in_features, dense.out_features)
    weight = module.weight
    assert isinstance(weight, torch.Tensor) and weight.shape == (ROWS, COLS)  # the stored layout, as Conv1D's
    assert (weight.dtype, weight.device) == (module.lora_A.dtype, module.lora_A.device)
    expected = module.lora_B @ module.lora_A + (module.shared if shared else 0)
    torch.testing.assert_close(weight, expected)
    assert module.bias is not None and module.bias.shape == (COLS if transposed else ROWS,)
    x = inputs(16, module)
    torch.testing.assert_close(module(x), F.linear(x, weight.t() if transposed else weight, module.bias))
    weight.sum().backward()  # the weight is S + B A: its gradient reaches the factors, as nn.Linear's reaches it
    assert module.lora_A.grad is not None and (module.shared is None or module.shared.grad is not None)
    with torch.no_grad():
        assert not module.weight.requires_grad


def test_a_transformers_model_that_reads_q_proj_weight_dtype_runs_with_lors_layers(tmp_path, cli):
    """GPT-Neo's and Falcon's flash-attention paths cast the query to `self.q_proj.weight.dtype`; this attention
    function, registered through transformers' AttentionInterface, does the same on a converted Llama."""
    transformers = pytest.importorskip("transformers")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import lors_convert

    def dtype_reading_attention(module, query, key, value, attention_mask, **kwargs):
        target = module.q_proj.weight.dtype  # the line that raised AttributeError on a LorsLinear
        return sdpa_attention_forward(module, query.to(target), key, value, attention_mask, **kwargs)

    transformers.AttentionInterface.register("dtype_reading", dtype_reading_attention)
    from test_zoo import tiny

    tiny("llama")[0].save_pretrained(tmp_path / "llama")
    lors = tmp_path / "llama.lors.safetensors"
    assert cli(tmp_path / "llama", "-o", lors, "--rank", "3", "--quiet").code == 0
    model = lors_convert.load(lors).eval()
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LorsLinear) and q_proj.weight.dtype == torch.float32
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        model.set_attn_implementation("dtype_reading")
        got = model(ids).logits
    torch.testing.assert_close(got, expected)
