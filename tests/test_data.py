"""Text data files streamed from disk (TextLines): the lines, the errors, and the memory they do not take."""

from __future__ import annotations

import tracemalloc

import pytest
import torch
from safetensors.torch import save_file

from lors_convert import LorsError
from lors_convert.data import Examples, TextLines, load_examples, split_examples, text_batches


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_lines_of_several_files_in_order_stripped_blank_lines_skipped(tmp_path):
    first = write(tmp_path / "a.txt", "  one \r\n\r\ntwo ünïcödé\n   \n".encode())
    second = write(tmp_path / "b.txt", b"three\nfour")  # no final newline
    lines = TextLines([first, second])
    assert len(lines) == 4
    assert [lines[i] for i in range(4)] == ["one", "two ünïcödé", "three", "four"]
    assert lines.read([3, 0]) == ["four", "one"]
    picked = lines.subset([2, 1])
    assert len(picked) == 2 and picked.read([0, 1]) == ["three", "two ünïcödé"]


def test_examples_split_and_batch_read_the_lines_back(tmp_path):
    texts = [f"line number {i}" for i in range(50)]
    data = write(tmp_path / "d.txt", ("\n".join(texts) + "\n").encode())
    examples = load_examples([data], tokenizer=object())
    assert isinstance(examples.texts, TextLines) and len(examples) == 50
    train, held_out = split_examples(examples, eval_examples=10)
    seen = train.lines(list(range(len(train)))) + held_out.lines(list(range(len(held_out))))
    assert sorted(seen) == sorted(texts) and len(held_out) == 10
    listed = Examples(texts=texts).subset([4, 2])
    assert listed.texts == ["line number 4", "line number 2"]


def test_bad_or_empty_text_is_a_one_line_error_naming_the_file(tmp_path):
    bad = write(tmp_path / "bad.txt", b"fine\n\xff\xfe broken\n")
    with pytest.raises(LorsError, match=r"bad\.txt: cannot read text \(UnicodeDecodeError\)"):
        TextLines([bad])
    empty = write(tmp_path / "empty.txt", b"\n  \n")
    with pytest.raises(LorsError, match="no text in"):
        TextLines([empty])
    with pytest.raises(LorsError, match="cannot read text"):
        TextLines([tmp_path / "missing.txt"])


def test_indexing_a_large_file_holds_offsets_not_text(tmp_path):
    line = ("lorem ipsum dolor sit amet " * 4).encode() + b"\n"  # 109 bytes
    count = 30_000  # the check is per line (16 bytes held against 109 read), so 3 MB shows it as 300 MB would
    data = write(tmp_path / "big.txt", line * count)
    tracemalloc.start()
    lines = TextLines([data])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(lines) == count and lines[count - 1] == line.decode().strip()
    assert peak < data.stat().st_size / 4, f"indexing held {peak / 2**20:.1f} MB"


def test_calibration_samples_are_distinct_seeded_lines(tmp_path):
    data = write(tmp_path / "c.txt", "".join(f"sample {i}\n" for i in range(100)).encode())

    def tokenizer(text, **_):  # enough of a tokenizer's call: the text back, as character codes
        return {"input_ids": torch.tensor([[ord(c) for c in text]])}

    def texts(seed: int) -> list[str]:
        batches, _ = text_batches(tokenizer, [data], 20, 64, seed)
        return ["".join(map(chr, b["input_ids"][0].tolist())) for b in batches]

    first = texts(0)
    assert len(first) == len(set(first)) == 20 and all(t.startswith("sample ") for t in first)
    assert texts(0) == first and texts(1) != first


def test_no_held_out_slice_of_any_size_holds_a_calibration_or_training_line():
    """Defect 1: one split rule, the same whatever the seed, for convert, finetune, compress and eval."""
    from lors_convert.data import calibration_choice, roles

    for n in (10, 80, 1000):
        for held_out in (2, 16, 256, 10**6):
            held, _, train = roles(n, held_out)
            assert len(held) == min(held_out, n // 5) and sorted(held + train) == list(range(n))
            for seed in (0, 1):
                assert not set(held) & set(calibration_choice(n, 10**6, seed))


def test_packed_rows_hold_every_token_once_with_end_of_text_between_lines():
    """Packing joins the lines' tokens (each cut to the row length), an end-of-text token after each, into rows
    of the given length: every token once and in order, only the last row padded, its padding masked."""
    from lors_convert.data import packed

    tokenizer = word_tokenizer(["<eos>", "<pad>", *"a b c d e f g".split()])
    lines = ["a b c", "d", "e f g a b"]
    batch = packed(lines, tokenizer, 4, torch.device("cpu"))
    stream = [2, 3, 4, 0, 5, 0, 6, 7, 8, 2, 0]  # "e f g a b" cut to 4 tokens
    assert batch["input_ids"].tolist() == [stream[0:4], stream[4:8], stream[8:11] + [1]]
    assert batch["attention_mask"].view(-1).tolist() == [1] * 11 + [0]
    short = packed(["a b"], tokenizer, 4, torch.device("cpu"))
    assert short["input_ids"].tolist() == [[2, 3, 0, 1]] and short["attention_mask"].tolist() == [[1, 1, 1, 0]]


def word_tokenizer(words: list[str]):
    """A real transformers tokenizer over a few words (index 0 the end-of-text token, 1 the padding)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")


def test_evaluation_batches_hold_every_line_once_and_lines_of_similar_length_together(tmp_path):
    """Evaluation reads every line once, in batches of lines of similar length: padded to its longest line, a
    batch of mixed lengths is mostly padding (SmolLM2's fidelity took 29% of a conversion before)."""
    tokenizer = word_tokenizer(["<eos>", "<pad>", "a"])
    texts = [" ".join(["a"] * (1 + (i * 37) % 50)) for i in range(100)]  # lengths 1..50, shuffled
    data = write(tmp_path / "d.txt", ("\n".join(texts) + "\n").encode())
    examples = load_examples([data], tokenizer)
    batches = list(examples.batches(10, tokenizer, 64, torch.device("cpu")))
    assert sorted(n for b in batches for n in b["attention_mask"].sum(1).tolist()) == sorted(
        len(t.split()) for t in texts
    )
    padded = sum(b["attention_mask"].numel() for b in batches)
    assert padded < 1.2 * sum(len(t.split()) for t in texts)  # in file order: 1.8x


def test_tensor_rows_are_cut_to_the_longest_in_the_batch(tmp_path):
    """A tensor file's rows are padded to its longest; a batch of short rows must not carry that padding (it cost
    fine-tuning on sampled text 2.6x its compute), and left-padded rows keep every column."""
    ids = torch.arange(4 * 10).reshape(4, 10)
    mask = torch.zeros(4, 10, dtype=torch.long)
    for row, n in enumerate((3, 5, 10, 2)):
        mask[row, :n] = 1
    save_file({"input_ids": ids, "attention_mask": mask, "labels": torch.arange(4)}, tmp_path / "rows.safetensors")
    examples = load_examples([tmp_path / "rows.safetensors"], tokenizer=None)
    batch = examples.batch([0, 1], None, 128, torch.device("cpu"))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 5)
    assert torch.equal(batch["input_ids"], ids[:2, :5]) and torch.equal(batch["labels"], torch.arange(2))
    assert examples.batch([0, 2], None, 128, torch.device("cpu"))["input_ids"].shape == (2, 10)
    left = mask.flip(1)
    save_file({"input_ids": ids, "attention_mask": left}, tmp_path / "left.safetensors")
    flipped = load_examples([tmp_path / "left.safetensors"], tokenizer=None)
    assert flipped.batch([0, 3], None, 128, torch.device("cpu"))["input_ids"].shape == (2, 10)
