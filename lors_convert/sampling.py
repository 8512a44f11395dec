"""Text a causal language model writes itself, for calibration: statistics gathered only on the calibration file's
kind of text (documentation, glosses) fit the model to that kind and cost it elsewhere, and a chat model's own
answers are the inputs it runs on when it is used. Sampled at temperature 1 with no truncation: the model's own
distribution, seeded, so a conversion is reproducible.

SmolLM2 at 20%, `compress --finetune-minutes 0` (256 calibration samples, --fisher), ppl on held-out lines / fortune
passages (dense 77.2 / 113.0): 98.3 / 193.0 on the file's lines alone, 102.8 / 168.5 with half of them written by
the model (64 tokens each), and every chat answer in form again (scripts/bench_llm.py, scripts/llm_answers.py)."""

from __future__ import annotations

import torch
from torch import nn

from lors_convert.runtime import fast_precision
from lors_convert.threads import revise_threads

BATCH = 32  # prompts answered together (SmolLM2: 48 no faster, 96 slower: each pads to its longest prompt)
FREE_BATCH = 96  # texts sampled together from the start token: no padding, so larger batches share each step's weights
# Tokens written per sample. Text of another kind loses most after its first few tokens, where the model reads long
# context that short samples calibrate little (scripts/llm_positions.py). SmolLM2 at 20% (scripts/bench_llm.py from
# its GGUF, Intel Xeon), ppl x dense on held-out lines / fortunes / narrative prose, from 256 calibration samples:
# 64 tokens 1.38 / 1.49 / 1.96 in 3.4 minutes, 128 1.36 / 1.44 / 1.77 in 5.7, 256 (an answer cut at 256 with its
# prompt) 1.37 / 1.40 / 1.63 in 11.6;
# compress's 512 at 256 tokens 1.37 / 1.36 / 1.59 in 19.7, where 1,024 at 64 gave 1.34 / 1.43 / 1.84 in 16.9
NEW_TOKENS = 256


def prompt_of(tokenizer, line: str) -> str:
    """A calibration line as the model sees a user's message (its chat template), or the line itself."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": line}], tokenize=False, add_generation_prompt=True
        )
    return line


def with_model_written(model: nn.Module, tokenizer, lines: list[str], share: float, seed: int) -> tuple[list[str], str]:
    """The calibration lines with `share` of them replaced by text the model writes: half of those sampled from its
    start token, half its continuations of the last lines (as chat answers where it has a chat template). And the
    words that say so."""
    count = round(len(lines) * share)
    free, prompts = count // 2, lines[len(lines) - (count - count // 2) :]
    if not count:
        return lines, ""
    kept = lines[: len(lines) - count]
    how = "its answers to" if getattr(tokenizer, "chat_template", None) else "its continuations of"
    words = f"; {count} of them written by the model ({free} from its start token, {how} {len(prompts)} lines)"
    return kept + model_written(model, tokenizer, prompts, free, seed), words


def model_written(model: nn.Module, tokenizer, prompts: list[str], free: int, seed: int) -> list[str]:
    """`free` texts sampled from the model's start token alone, then one per prompt: the prompt (as a chat turn
    where the tokenizer has a chat template) followed by what the model writes after it. Special tokens are kept,
    so the texts tokenise back to what the model saw."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    texts: list[str] = []
    draw = DrawFromSoftmax(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for first in range(0, free, FREE_BATCH):
            count = min(FREE_BATCH, free - first)
            ids = torch.full((count, 1), start, dtype=torch.long, device=device)
            texts += sample(model, tokenizer, ids, torch.ones_like(ids), pad, draw, skip=1)
        encoded = [
            tokenizer(prompt_of(tokenizer, line), add_special_tokens=False)["input_ids"] or [start] for line in prompts
        ]
        # batches of prompts of like lengths: the padding to a batch's longest prompt is computed too (SmolLM2's
        # chat prompts in file order: 29 s of prefill)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        answers = {}
        for first in range(0, len(order), BATCH):
            batch = [encoded[i] for i in order[first : first + BATCH]]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, tokens in enumerate(batch):  # padded on the left: generation continues each row's last token
                ids[row, width - len(tokens) :] = torch.tensor(tokens)
                mask[row, width - len(tokens) :] = 1
            written = sample(model, tokenizer, ids.to(device), mask.to(device), pad, draw, skip=0)
            answers.update(zip(order[first : first + BATCH], written))
        texts += [answers[i] for i in range(len(prompts))]
    return texts


def sampled_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of logits, drawn from its softmax by inverse CDF: one uniform per row, 3x faster than
    torch.multinomial, which draws one per vocabulary entry. float32 sums of non-negative terms never decrease, so
    the search is sound; 4x faster than float64 on a 2-core CPU, and the drawn token differs only where a uniform
    falls within the sums' error of a boundary (at most 6e-8 against float64 over 49,152 entries, measured)."""
    cumulative = logits.float().softmax(-1).cpu().cumsum(-1)
    uniform = torch.rand(len(cumulative), 1, generator=generator) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, uniform, right=True)[:, 0].to(logits.device)


class DrawFromSoftmax:
    """A logits processor for greedy decoding that leaves each row one token, drawn from the softmax of its
    scores as the largest of the scores plus Gumbel noise (from a CPU generator: a seed writes the same texts on
    any device). Unlike inverse CDF (sampled_labels), whose boundaries move with the rounding of every earlier
    probability, the draw changes only where two perturbed scores nearly tie, so the same weights in float32 and
    in bf16 write far more of the same texts (one changed token changes every token after it)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        gumbel = torch.rand(scores.shape, generator=self.generator).log_().neg_().log_().neg_()
        drawn = (scores.float().cpu() + gumbel).argmax(-1).to(scores.device)
        return torch.full_like(scores, float("-inf")).scatter_(1, drawn[:, None], 0.0)


def sample(
    model: nn.Module, tokenizer, ids: torch.Tensor, mask: torch.Tensor, pad: int, draw: DrawFromSoftmax, skip: int
) -> list[str]:
    """Each row continued by NEW_TOKENS tokens drawn by `draw` (or up to its end of text), decoded from position
    `skip`; left padding and the padding after an end of text are dropped."""
    from lors_convert.hf import logits_processors

    revise_threads()
    with fast_precision(ids.device):  # as calibration's passes: bf16 where the CPU multiplies it natively
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            logits_processor=logits_processors(draw),
            max_new_tokens=NEW_TOKENS,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
    texts = []
    for row, row_mask in zip(out, mask):
        prompt = int(row_mask.sum())
        tokens = row[ids.shape[1] - prompt :].tolist()  # without the left padding
        written = tokens[prompt:]
        if tokenizer.eos_token_id in written:  # generation pads after it; packing puts one after every text
            written = written[: written.index(tokenizer.eos_token_id)]
        kept = tokens[skip:prompt] + written
        if kept[:1] == [tokenizer.bos_token_id] and adds_start_token(tokenizer):  # it comes back when tokenized
            kept = kept[1:]
        texts.append(tokenizer.decode(kept, skip_special_tokens=False))
    return texts


def adds_start_token(tokenizer) -> bool:
    """Whether tokenizing a text puts the start token before it (Llama's, Gemma's, Mistral's tokenizers)."""
    start = tokenizer.bos_token_id
    return start is not None and callable(tokenizer) and tokenizer("a")["input_ids"][:1] == [start]
