"""--max-ppl-increase: the largest reduction that keeps a language model's perplexity within a factor of the
original's, chosen on lines that are neither calibration samples nor held out; through the real CLI."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

transformers = pytest.importorskip("transformers")

from test_finetune import make_model_dir, save_tokenizer, text_file
from test_zoo import CASES

import lors_convert
from lors_convert.checkpoint import open_checkpoint
from lors_convert.data import TextLines, calibration_choice, roles
from lors_convert.hf import load_tokenizer
from lors_convert.loading import offloaded_dense_model
from lors_convert.lors_format import read_lors
from lors_convert.offload import OFFLOADED, replaced
from lors_convert.target import perplexity


def meta_of(path) -> dict:
    return read_lors(path)[1].calibration["quality_target"]


def batches_of(tokenizer, lines: list[str]) -> list[dict]:
    """The lines as --max-ppl-increase measures them: one a batch, those of no tokens left out."""
    encoded = [tokenizer(line, return_tensors="pt") for line in lines]
    return [dict(e) for e in encoded if e["input_ids"].shape[1]]


@pytest.mark.slow
def test_max_ppl_increase_keeps_perplexity_within_the_factor_on_the_lines_it_chose_on(tmp_path, cli):
    folder = make_model_dir(tmp_path / "llama", "llama")
    data = text_file(tmp_path / "text.txt", lines=600)
    common = ["--calibrate", data, "--calib-samples", "48", "--fisher", "--quiet", "--json"]
    loose = cli(folder, *common, "--max-ppl-increase", "1.5", "-o", tmp_path / "loose.safetensors")
    tight = cli(folder, *common, "--max-ppl-increase", "1.05", "-o", tmp_path / "tight.safetensors")
    assert loose.code == 0 and tight.code == 0, loose.err + tight.err
    chosen = {}
    for name, factor in (("loose", 1.5), ("tight", 1.05)):
        target = meta_of(tmp_path / f"{name}.safetensors")
        assert target["max_ppl_increase"] == factor and target["trials"]
        chosen[name] = target["chosen_reduction"]
        # every measured reduction above the chosen one missed the target; the chosen one met it (or is 0)
        for trial in target["trials"]:
            assert (trial["ppl_ratio"] <= factor) == (trial["reduction"] <= chosen[name]) or trial["reduction"] == 0
    assert 0 < chosen["loose"] and chosen["tight"] <= chosen["loose"]

    # the written model meets the target on the selection lines, measured again from the file
    lines = TextLines([data])
    tokenizer = load_tokenizer(folder)
    picks = calibration_choice(len(lines), 128, seed=0, skip=48)
    assert not set(picks) & set(calibration_choice(len(lines), 48, seed=0)) and not set(picks) & set(roles(600)[0])
    selection = batches_of(tokenizer, lines.read(picks))
    dense = perplexity(transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), selection)
    student = perplexity(lors_convert.load(tmp_path / "loose.safetensors"), selection)
    assert student <= 1.5 * dense * 1.01
    # and the trial that chose it measured this model, not the original (factors rounded to the stored dtype aside)
    trial = next(t for t in meta_of(tmp_path / "loose.safetensors")["trials"] if t["reduction"] == chosen["loose"])
    assert trial["ppl_ratio"] == pytest.approx(student / dense, rel=2e-3)


@pytest.mark.parametrize("case", [c for c in CASES if c.auto == "AutoModelForCausalLM"], ids=lambda c: c.id)
def test_max_ppl_increase_measures_the_model_it_writes_in_every_family(case, tmp_path, cli):
    """The trial that chose the reduction measured the written model, whatever the family: biases that take the
    mean output error (GPT-2, Qwen2's q/k/v), fused layers (Phi-3), transposed weights (GPT-2's Conv1D)."""
    torch.manual_seed(0)
    model = case.build()
    with torch.no_grad():  # weights large enough that the layers matter to the outputs
        for weight in model.parameters():
            weight.mul_(10 if weight.dim() >= 2 else 1)
    model.save_pretrained(tmp_path / "model")
    save_tokenizer(tmp_path / "model")
    data, out = text_file(tmp_path / "text.txt", lines=400), tmp_path / "o.safetensors"
    options = ["--calibrate", data, "--calib-samples", "16", "--calib-generated", "0", "--fisher", "--quiet"]
    result = cli(tmp_path / "model", *options, "--max-ppl-increase", "1.5", "-o", out)
    assert result.code == 0, result.err
    target = meta_of(out)
    trial = next(t for t in target["trials"] if t["reduction"] == target["chosen_reduction"])
    picks = calibration_choice(len(TextLines([data])), 128, seed=0, skip=16)
    selection = batches_of(load_tokenizer(tmp_path / "model"), TextLines([data]).read(picks))
    dense = perplexity(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval(), selection)
    assert trial["ppl_ratio"] == pytest.approx(perplexity(lors_convert.load(out), selection) / dense, rel=2e-3)


def test_max_ppl_increase_refuses_what_it_cannot_serve(tmp_path, cli):
    folder = make_model_dir(tmp_path / "bert", "bert")
    data = text_file(tmp_path / "text.txt", lines=600)
    out = tmp_path / "o.safetensors"
    cases = [
        (["--max-ppl-increase", "1.2"], "needs --calibrate TEXT and --fisher"),
        (["--max-ppl-increase", "0.9", "--calibrate", data, "--fisher"], "a factor above 1"),
        (["--max-ppl-increase", "1.2", "--reduction", "0.3"], "choose one of"),
        (["--max-ppl-increase", "1.2", "--calibrate", data, "--fisher"], "needs a language model"),
    ]
    for options, message in cases:
        result = cli(folder, *options, "-o", out, "--quiet")
        assert result.code == 1 and message in result.err and len(result.err.strip().splitlines()) == 1, result.err
        assert not out.exists()


@pytest.mark.slow
def test_compress_warns_when_a_language_model_lost_its_function(tmp_path, cli):
    folder = make_model_dir(tmp_path / "llama", "llama")
    data = text_file(tmp_path / "text.txt", lines=300)
    warned = {}
    for reduction in ("0.2", "0.9"):
        out = tmp_path / f"{reduction}.safetensors"
        options = ["--calibrate", data, "--calib-samples", "32", "--reduction", reduction, "--quiet"]
        result = cli("compress", folder, *options, "-o", out)
        assert result.code == 0 and out.is_file(), result.err
        warned[reduction] = "warning: perplexity" in result.err and "--max-ppl-increase" in result.err
    assert warned == {"0.2": False, "0.9": True}


def test_replaced_weights_reach_an_offloaded_model_one_block_at_a_time_and_leave_it_as_it_was(tmp_path):
    folder = make_model_dir(tmp_path / "llama", "llama")
    model, plain = offloaded_dense_model(folder), transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    depth = len(model.model.layers)
    gates = {f"model.layers.{k}.mlp.gate_proj.weight": f"gate{k}" for k in range(depth)}
    assert all(hasattr(layer, OFFLOADED) for layer in model.model.layers)  # the case a plain swap misses
    new = {name: torch.randn(model.get_parameter(path).shape) for path, name in gates.items()}
    replacements = open_checkpoint(save(new, tmp_path / "new.safetensors"))
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    before = model(input_ids=ids).logits
    held = []  # while each block runs: how many of the replaced weights are in memory
    hooks = [
        layer.mlp.register_forward_hook(lambda *_: held.append(resident(model, gates))) for layer in model.model.layers
    ]
    with replaced(model, replacements, gates):
        assert resident(model, gates) == 0  # read when their block runs, not when swapped in
        inside = model(input_ids=ids).logits
    for hook in hooks:
        hook.remove()
    assert held == [1] * depth
    with torch.no_grad():
        for path, name in gates.items():
            plain.get_parameter(path).copy_(new[name])
    assert torch.allclose(inside, plain(input_ids=ids).logits, atol=1e-5)
    assert torch.equal(model(input_ids=ids).logits, before) and resident(model, gates) == 0


def resident(model, paths) -> int:
    return sum(not model.get_parameter(path).is_meta for path in paths)


def save(tensors: dict, path):
    safetensors.torch.save_file(tensors, path)
    return path
