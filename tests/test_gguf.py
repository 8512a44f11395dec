"""GGUF files as sources: a tiny Llama written by the `gguf` package (F32 or F16 tensors, a byte-level BPE vocabulary
in its tokenizer.ggml.* fields, tied embeddings as SmolLM2's), read through transformers, through the real CLI."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lors_convert
from lors_convert import LorsError
from lors_convert.checkpoint import sha256_files
from lors_convert.hf import open_source
from lors_convert.lors_format import read_lors

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 3


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes (what a byte-level BPE vocabulary is written in)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled, extra = {b: chr(b) for b in kept}, 0
    for b in range(256):
        if b not in spelled:
            spelled[b], extra = chr(256 + extra), extra + 1
    return [spelled[b] for b in range(256)]


def write_tiny_gguf(
    path: Path, dtype=np.float32, seed: int = 0, tokenizer: bool = True, quantized=None
) -> dict[str, np.ndarray]:
    """A 3-layer Llama (hidden 64, GQA 4/2 heads) as llama.cpp writes one, its matrices in `dtype` or, given a
    `quantized` type (gguf.GGMLQuantizationType), in that; returns the matrices written (before quantizing)."""
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n", "e r", "Ġ a", "o n", "a t", "Ġ c"]
    tokens = byte_alphabet() + ["".join(m.split()) for m in merges] + ["<|endoftext|>"]
    rng = np.random.default_rng(seed)
    written = {}

    def matrix(name: str, rows: int, cols: int) -> None:
        written[name] = (rng.standard_normal((rows, cols)) * 0.05).astype(dtype)
        if quantized is None:
            writer.add_tensor(name, written[name])
        else:
            writer.add_tensor(name, gguf.quants.quantize(written[name], quantized), raw_dtype=quantized)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(len(tokens))
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types([1] * (len(tokens) - 1) + [3])  # the last is a control token
        writer.add_token_merges(merges)
        writer.add_bos_token_id(len(tokens) - 1)
        writer.add_eos_token_id(len(tokens) - 1)
    matrix("token_embd.weight", len(tokens), HIDDEN)  # no output.weight: the head is tied to it
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    kv = KV_HEADS * HIDDEN // HEADS
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        for name, rows, cols in (
            ("attn_q", HIDDEN, HIDDEN),
            ("attn_k", kv, HIDDEN),
            ("attn_v", kv, HIDDEN),
            ("attn_output", HIDDEN, HIDDEN),
            ("ffn_gate", INTER, HIDDEN),
            ("ffn_up", INTER, HIDDEN),
            ("ffn_down", HIDDEN, INTER),
        ):
            matrix(f"blk.{i}.{name}.weight", rows, cols)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("gguf")
    return folder / "tiny.gguf", write_tiny_gguf(folder / "tiny.gguf")


def lines(path: Path, n: int = 40) -> Path:
    words = "the cat sat on the mat and then another cat ran at the hen in a barn".split()
    path.write_text("\n".join(" ".join(words[(i + k) % len(words)] for k in range(8 + i % 5)) for i in range(n)))
    return path


def test_gguf_tensors_are_the_transformers_models(tiny_gguf, tmp_path):
    path, written = tiny_gguf
    source = open_source(path)
    assert source.path == path and source.files == [path]
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    state = model.state_dict()
    assert set(source.info) == set(state) - {"lm_head.weight"}  # the tied head, as save_pretrained leaves it out
    for name, info in source.info.items():
        tensor = source.get(name)
        assert info.dtype == tensor.dtype == torch.float32 and info.shape == tuple(tensor.shape)
        assert torch.equal(tensor, state[name]), name
    # and the file's own numbers, where transformers does not permute them (q and k it does, for rotary halves)
    assert np.array_equal(source.get("model.embed_tokens.weight").numpy(), written["token_embd.weight"])
    assert np.array_equal(source.get("model.layers.2.mlp.down_proj.weight").numpy(), written["blk.2.ffn_down.weight"])
    # a folder holding one GGUF (and no config.json) is the same source
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(path, folder / "model.gguf")
    assert open_source(folder).path == folder / "model.gguf"
    write_tiny_gguf(tmp_path / "half.gguf", dtype=np.float16)
    half = open_source(tmp_path / "half.gguf")
    assert half.info["model.layers.0.mlp.up_proj.weight"].dtype == torch.float16  # the GGUF's own float type


@pytest.mark.slow
def test_gguf_convert_inspect_eval_load_export_finetune(tiny_gguf, tmp_path, cli):
    path = tmp_path / "tiny.gguf"
    shutil.copy(tiny_gguf[0], path)
    text = lines(tmp_path / "text.txt")
    out = tmp_path / "tiny.lors.safetensors"
    inspected = cli("inspect", path, "--json")
    assert inspected.code == 0, inspected.err
    converted = cli(path, "--reduction", "0.3", "--calibrate", text, "--quiet")  # the default output name
    assert converted.code == 0, converted.err
    assert "model.layers.{i}.mlp.down_proj.weight" in converted.out and "Converting" not in converted.err
    meta = read_lors(out)[1]
    assert meta.source.path == str(path.resolve()) and meta.source.sha256 == sha256_files([path])
    assert meta.groups and all(g.template.startswith("model.layers.{i}.") for g in meta.groups)
    evaluated = cli("eval", out, "--data", text, "--quiet", "--json")  # the teacher: the GGUF, from the metadata
    assert evaluated.code == 0, evaluated.err
    result = evaluated.json()
    assert result["ppl_teacher"] > 1 and result["ppl_student"] > 1 and result["cos"] > 0.5

    model = lors_convert.load(out)  # the architecture: the GGUF's config
    assert type(model).__name__.endswith("LlamaForCausalLM") and model.lors.swaps
    ids = torch.tensor([[83, 257, 220, 66, 64, 83]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    tuned = cli("finetune", out, "--data", text, "-o", tmp_path / "ft.lors.safetensors", "--steps", "2")
    assert tuned.code == 0, tuned.err
    assert read_lors(tmp_path / "ft.lors.safetensors")[1].finetune["settings"]["lr"] == 1e-4  # an LM's default
    options = ["--calib-samples", "8", "--calib-generated", "0.25"]
    compressed = cli("compress", path, "--calibrate", text, "-o", tmp_path / "c.lors.safetensors", *options)
    assert compressed.code == 0, compressed.err
    assert "ppl_teacher" in compressed.out
    assert read_lors(tmp_path / "c.lors.safetensors")[1].settings["calib_generated"] == 0.25
    assert cli("export", out, "-o", tmp_path / "lors", "--quiet").code == 0
    assert cli("export", out, "-o", tmp_path / "dense", "--dense", "--quiet").code == 0
    path.unlink()  # the exported folders need neither the GGUF nor lors_convert's reading of it
    for folder, remote in ((tmp_path / "lors", True), (tmp_path / "dense", False)):
        exported = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        prompt = tokenizer("the cat", return_tensors="pt")
        generated = exported.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert generated.shape == (1, prompt["input_ids"].shape[1] + 5)
        with torch.no_grad():
            torch.testing.assert_close(exported(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("damage", ["not a gguf", "truncated"])
def test_unreadable_gguf_is_one_line_and_writes_nothing(tiny_gguf, tmp_path, cli, damage):
    path = tmp_path / "broken.gguf"
    data = tiny_gguf[0].read_bytes()
    path.write_bytes(b"\x00" * 64 if damage == "not a gguf" else data[: len(data) // 2])
    out = tmp_path / "out.lors.safetensors"
    for args in ((path, "-o", out), ("inspect", path)):
        result = cli(*args)
        assert result.code != 0
        assert result.err.startswith("error: ") and len(result.err.strip().splitlines()) == 1, result.err
        assert "GGUF" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]


def test_missing_gguf_package_names_the_extra(tiny_gguf, monkeypatch, cli):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    result = cli("inspect", tiny_gguf[0])
    assert result.code != 0 and "pip install 'lors-convert[gguf]'" in result.err
    with pytest.raises(LorsError, match=r"lors-convert\[gguf\]"):
        open_source(tiny_gguf[0])


def test_gguf_without_a_tokenizer_converts_but_refuses_text(tmp_path, cli):
    path = tmp_path / "bare.gguf"
    write_tiny_gguf(path, tokenizer=False)
    assert cli(path, "-o", tmp_path / "bare.lors.safetensors", "--quiet").code == 0
    result = cli(path, "-o", tmp_path / "text.lors.safetensors", "--calibrate", lines(tmp_path / "t.txt"), "--quiet")
    assert result.code != 0 and "holds no tokenizer" in result.err


@pytest.mark.slow
def test_a_calibrated_conversion_dequantizes_the_gguf_once_and_matches_its_folder(
    tiny_gguf, tmp_path, monkeypatch, cli
):
    """The source's tensors and calibration's model are one dequantized model; --max-ppl-increase, which puts
    converted weights into that model while it reads the source's, still factors the original weights: the same
    file as from the GGUF's transformers model saved as a folder."""
    from lors_convert import hf

    path, _ = tiny_gguf
    folder = tmp_path / "folder"
    hf.dense_model(path).save_pretrained(folder)
    hf.save_gguf_description(path, folder)
    loads = []
    real = hf.dense_model
    monkeypatch.setattr(hf, "dense_model", lambda *args, **kw: loads.append(args) or real(*args, **kw))
    text = lines(tmp_path / "text.txt", 400)
    common = ["--calibrate", text, "--calib-samples", "16", "--fisher", "--max-ppl-increase", "1.5", "--quiet"]
    converted = cli(path, *common, "-o", tmp_path / "gguf.safetensors")
    assert converted.code == 0, converted.err
    assert len(loads) == 1
    assert cli(folder, *common, "-o", tmp_path / "folder.safetensors").code == 0
    from_gguf, from_folder = load_file(tmp_path / "gguf.safetensors"), load_file(tmp_path / "folder.safetensors")
    assert from_gguf.keys() == from_folder.keys()
    for name in from_gguf:
        torch.testing.assert_close(from_gguf[name], from_folder[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "dtype, quantized, written",
    [(np.float16, None, torch.float16), (np.float32, gguf.GGMLQuantizationType.Q8_0, torch.bfloat16)],
)
def test_a_quantized_gguf_converts_to_bfloat16_and_a_float_one_to_its_own_type(
    tmp_path, cli, dtype, quantized, written
):
    """A quantized GGUF's tensors are its dequantization: in float32 a 4-bit model's conversion came out 4.6x its
    size (SmolLM2's 98 MB Q4_1: 453 MB). --dtype still decides when given."""
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, dtype, quantized=quantized)
    for options, expected in (([], written), (["--dtype", "float32"], torch.float32)):
        out = tmp_path / f"out{len(options)}.lors.safetensors"
        result = cli(path, "-o", out, "--reduction", "0.3", "--quiet", *options)
        assert result.code == 0, result.err
        dtypes = {info.dtype for info in read_lors(out)[0].info.values() if info.dtype.is_floating_point}
        assert dtypes == {expected}, (options, dtypes)
