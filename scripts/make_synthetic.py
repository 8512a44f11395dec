"""Generate a synthetic Llama-shaped checkpoint: bf16, sharded safetensors with an index, and a config.json.

Each stacked weight is  W_i = a·S_g + b·(power-law low-rank part_i + noise_i): a component shared by the
layers of its group, a spectrum that decays like a trained weight's (power-law head on a Marchenko–Pastur
bulk) and no more than one matrix in memory besides the shared components. Deterministic for a given seed.

    python scripts/make_synthetic.py 200m /tmp/lors-bench/200m
    python scripts/make_synthetic.py tinyllama /tmp/lors-bench/tinyllama --shard-size 1GB
    python scripts/make_synthetic.py custom OUT --layers 4 --hidden 512 --mlp 1408 --heads 8 --kv-heads 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lors_convert.checkpoint import write_safetensors
from lors_convert.config import parse_size

# name: (layers, hidden, mlp, heads, kv_heads, vocab)
PRESETS = {
    "100m": (8, 768, 2048, 12, 4, 32000),
    "200m": (12, 1024, 2816, 16, 4, 32000),
    "tinyllama": (22, 2048, 5632, 32, 4, 32000),
    "3b": (26, 3200, 8640, 32, 32, 32000),
    "7b": (32, 4096, 11008, 32, 32, 32000),
}
SPECTRUM_RANK = 256  # components in the power-law part; the rest of the spectrum is the noise bulk
DECAY = 0.6  # s_j ∝ (1 + j)^-DECAY
SHARED_ENERGY = 0.2  # fraction of each weight's energy in the group's shared component
NOISE_ENERGY = 0.15  # fraction of the private part's energy in the flat bulk
WEIGHT_STD = 0.02


def layer_shapes(hidden: int, mlp: int, heads: int, kv_heads: int) -> dict[str, tuple[int, int]]:
    kv = kv_heads * (hidden // heads)
    return {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (mlp, hidden),
        "mlp.up_proj": (mlp, hidden),
        "mlp.down_proj": (hidden, mlp),
    }


def checkpoint_shapes(
    layers: int, hidden: int, mlp: int, heads: int, kv_heads: int, vocab: int
) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, in a Llama checkpoint's order (untied head)."""
    shapes_by_name = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        shapes_by_name.update(
            {
                f"model.layers.{i}.{part}.weight": shape
                for part, shape in layer_shapes(hidden, mlp, heads, kv_heads).items()
            }
        )
        shapes_by_name.update(
            {f"model.layers.{i}.{norm}.weight": (hidden,) for norm in ("input_layernorm", "post_attention_layernorm")}
        )
    shapes_by_name.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return shapes_by_name


def trained_like(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A float32 matrix of unit mean square: power-law spectrum on top of a small flat bulk."""
    gen = torch.Generator().manual_seed(seed)
    rank = min(SPECTRUM_RANK, rows, cols)
    values = (1 + torch.arange(rank, dtype=torch.float32)) ** -DECAY
    left = torch.randn(rows, rank, generator=gen) * (values / values.norm())
    head = left @ torch.randn(rank, cols, generator=gen)  # energy ≈ rows·cols
    head.mul_(math.sqrt(1 - NOISE_ENERGY)).add_(torch.randn(rows, cols, generator=gen), alpha=math.sqrt(NOISE_ENERGY))
    return head


def tensor_seed(name: str, seed: int) -> int:
    return zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1 & 0xFFFFFFFF)


def generate(
    out_dir: Path,
    layers: int,
    hidden: int,
    mlp: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    seed: int,
    shard_size: int | None,
) -> int:
    shapes = layer_shapes(hidden, mlp, heads, kv_heads)
    shapes_by_name = checkpoint_shapes(layers, hidden, mlp, heads, kv_heads, vocab)
    params = sum(math.prod(shape) for shape in shapes_by_name.values())
    shard_size = shard_size or min(2 * 10**9, math.ceil(2 * params / 4))  # at least a few shards
    out_dir.mkdir(parents=True, exist_ok=True)
    shared = {
        part: trained_like(r, c, tensor_seed(f"shared.{part}", seed)).bfloat16() for part, (r, c) in shapes.items()
    }
    layout = [(name, torch.bfloat16, shape) for name, shape in shapes_by_name.items()]

    def tensors():
        for name, (rows, *cols) in shapes_by_name.items():
            if name == "model.embed_tokens.weight" or name == "lm_head.weight":
                generator = torch.Generator().manual_seed(seed + (name == "lm_head.weight"))
                tensor = torch.randn(vocab, hidden, generator=generator) * WEIGHT_STD
            elif not cols:
                tensor = torch.ones(rows)
            else:
                part = name.split(".", 3)[3].removesuffix(".weight")
                private = trained_like(rows, cols[0], tensor_seed(name, seed))
                weight = private.mul_(math.sqrt(1 - SHARED_ENERGY)).add_(
                    shared[part].float(), alpha=math.sqrt(SHARED_ENERGY)
                )
                tensor = weight.mul_(WEIGHT_STD)
            yield name, tensor.bfloat16()
            print(f"\r{name:60s}", end="", file=sys.stderr, flush=True)

    write_safetensors(out_dir / "model.safetensors", tensors(), {"format": "pt"}, layout=layout, shard_size=shard_size)
    print(file=sys.stderr)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=[*PRESETS, "custom"], help="a size preset, or custom with the dims below")
    parser.add_argument("out_dir", type=Path)
    for flag in ("layers", "hidden", "mlp", "heads", "kv-heads", "vocab"):
        parser.add_argument(f"--{flag}", type=int, help="override the preset's value")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=parse_size, help="default: a quarter of the model, at most 2GB")
    args = parser.parse_args()
    dims = dict(zip(("layers", "hidden", "mlp", "heads", "kv_heads", "vocab"), PRESETS.get(args.preset, (None,) * 6)))
    dims.update({k: v for k, v in vars(args).items() if k in dims and v is not None})
    if None in dims.values():
        parser.error(f"custom needs every dimension: missing {[k for k, v in dims.items() if v is None]}")
    params = generate(args.out_dir, **dims, seed=args.seed, shard_size=args.shard_size)
    print(f"wrote {args.out_dir}: {params / 1e6:.0f}M parameters ({dims})")


if __name__ == "__main__":
    main()
