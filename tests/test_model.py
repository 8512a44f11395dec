"""Using a LORS checkpoint where models run: `lors_convert.load` and `lors_convert.save` on tiny random models saved
by transformers itself (GPT-2, Llama with GQA, GPT-NeoX, T5, ViT, BERT), the real MiniLM and a plain PyTorch model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import lors_convert
from lors_convert import LorsError
from lors_convert.lors_format import expand, read_lors
from lors_convert.nn import LorsLinear

transformers = pytest.importorskip("transformers")


def tiny(kind: str):
    """A tiny random model of each architecture, and inputs for it."""
    T = transformers
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 7))
    if kind == "bert":
        config = T.BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32
        )
        return T.BertModel(config), {"input_ids": ids}
    if kind == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2)), {"input_ids": ids}
    if kind == "llama":
        config = T.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        return T.LlamaForCausalLM(config), {"input_ids": ids}
    if kind == "neox":
        config = T.GPTNeoXConfig(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=64
        )
        return T.GPTNeoXForCausalLM(config), {"input_ids": ids}
    if kind == "t5":
        config = T.T5Config(
            d_model=32, d_ff=64, num_layers=3, num_heads=2, d_kv=16, vocab_size=64, decoder_start_token_id=0
        )
        return T.T5ForConditionalGeneration(config), {"input_ids": ids, "decoder_input_ids": ids}
    config = T.ViTConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8
    )
    return T.ViTModel(config), {"pixel_values": torch.randn(2, 3, 16, 16)}


def output(result) -> torch.Tensor:
    logits = getattr(result, "logits", None)
    return logits if logits is not None else result.last_hidden_state


def dense_reference(model, lors_path, tmp_path):
    """The dense expansion of the LORS file, loaded by transformers as an ordinary checkpoint."""
    folder = tmp_path / "dense"
    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in expand(*read_lors(lors_path))}, folder / "model.safetensors")
    return type(model).from_pretrained(folder).float().eval()


ARCHITECTURES = ["bert", "gpt2", "llama", "neox", "t5", "vit"]


@pytest.mark.parametrize("kind", ARCHITECTURES)
@pytest.mark.parametrize("shared", ["mean", "none"])
def test_load_runs_the_lors_model_of_each_architecture(tmp_path, cli, kind, shared):
    model, inputs = tiny(kind)
    model.save_pretrained(tmp_path / "model")
    lors_path = tmp_path / "m.lors.safetensors"
    result = cli(tmp_path / "model", "-o", lors_path, "--rank", "3", "--shared", shared, "--quiet", "--json")
    assert result.code == 0, result.err
    report = result.json()

    loaded = lors_convert.load(lors_path)
    assert isinstance(loaded, type(model)) and any(isinstance(m, LorsLinear) for m in loaded.modules())
    assert sum(p.numel() for p in loaded.parameters()) == report["total"]["lors_params"]
    reference = dense_reference(model, lors_path, tmp_path)
    with torch.no_grad():
        got, expected = output(loaded(**inputs)), output(reference(**inputs))
    assert (got - expected).norm() <= 1e-5 * expected.norm()
    if kind in ("gpt2", "llama", "neox", "t5"):
        prompt = {"input_ids": inputs["input_ids"][:1, :4]}
        options = {"max_new_tokens": 6, "do_sample": False}
        assert torch.equal(loaded.generate(**prompt, **options), reference.generate(**prompt, **options))

    again = tmp_path / "again.lors.safetensors"
    lors_convert.save(loaded, again)
    before, after = read_lors(lors_path)[0], read_lors(again)[0]
    assert set(before.info) == set(after.info)
    assert all(torch.equal(before.get(name), after.get(name)) for name in before.info)


def test_one_shared_parameter_per_group_that_training_moves(tmp_path, cli):
    model, inputs = tiny("llama")
    model.save_pretrained(tmp_path / "model")
    assert cli(tmp_path / "model", "-o", tmp_path / "m.safetensors", "--rank", "2", "--shared", "mean", "-q").code == 0
    loaded = lors_convert.load(tmp_path / "m.safetensors")
    layers = [m for m in loaded.modules() if isinstance(m, LorsLinear)]
    groups = {id(m.shared) for m in layers}
    assert len(groups) == 7 and len(layers) == 21  # seven groups of three layers, one matrix each
    loss = output(loaded(**inputs)).square().mean()
    loss.backward()
    shared = layers[0].shared
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    with torch.no_grad():
        shared.add_(1.0)
    lors_convert.save(loaded, tmp_path / "trained.safetensors")
    reloaded = lors_convert.load(tmp_path / "trained.safetensors", architecture=tmp_path / "model")
    assert torch.equal(next(m for m in reloaded.modules() if isinstance(m, LorsLinear)).shared, shared)


@pytest.mark.slow
def test_load_the_real_minilm(tmp_path, cli, minilm):
    result = cli(minilm, "-o", tmp_path / "m.lors.safetensors", "--quiet", "--json")
    assert result.code == 0
    loaded = lors_convert.load(tmp_path / "m.lors.safetensors")
    assert type(loaded).__name__ == "LorsBertModel"
    source, _ = read_lors(tmp_path / "m.lors.safetensors")
    buffers = sum(info.numel for info in source.info.values() if not info.dtype.is_floating_point)  # position_ids
    assert sum(p.numel() for p in loaded.parameters()) == result.json()["total"]["lors_params"] - buffers
    reference = dense_reference(
        transformers.BertModel(transformers.BertConfig.from_pretrained(minilm)),
        tmp_path / "m.lors.safetensors",
        tmp_path,
    )
    ids = torch.randint(1000, 2000, (2, 12))
    with torch.no_grad():
        got, expected = loaded(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state
    assert (got - expected).norm() <= 1e-5 * expected.norm()


def test_load_a_plain_pytorch_model_from_a_function(tmp_path, cli):
    from factory_models import StackedMLP, stacked_mlp

    torch.manual_seed(0)
    dense = StackedMLP()
    save_file(dense.state_dict(), tmp_path / "m.safetensors")
    assert cli(tmp_path / "m.safetensors", "--rank", "4", "--shared", "mean", "--quiet").code == 0
    loaded = lors_convert.load(tmp_path / "m.lors.safetensors", architecture=stacked_mlp)
    reference = StackedMLP()
    reference.load_state_dict(dict(expand(*read_lors(tmp_path / "m.lors.safetensors"))))
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), reference(x), rtol=1e-5, atol=1e-6)
    lors_convert.save(loaded, tmp_path / "again.safetensors")
    before, after = read_lors(tmp_path / "m.lors.safetensors")[0], read_lors(tmp_path / "again.safetensors")[0]
    assert all(torch.equal(before.get(name), after.get(name)) for name in before.info)


def test_swapped_layers_take_the_dtype_of_the_layer_they_replace():
    """A mixed-dtype model (float32 embedding first, bfloat16 attention, float64 MLP): each LorsLinear and each
    group's S are in its own layers' dtype, not the model's first parameter's."""
    from lors_convert.lors_modeling import SHARED_ATTRIBUTE, install_lors

    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(10, 16)
    model.attn = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3)).to(torch.bfloat16)
    model.mlp = torch.nn.ModuleList(torch.nn.Linear(16, 32) for _ in range(3)).to(torch.float64)
    swap = dict(rank=2, cols=16, transposed=False)
    swaps = [{"path": f"attn.{i}", "group": 0, "rows": 16, **swap} for i in range(3)]
    swaps += [{"path": f"mlp.{i}", "group": 1, "rows": 32, **swap} for i in range(3)]
    install_lors(model, {"swaps": swaps, "shared": {"0": [16, 16], "1": [32, 16]}})
    for part, dtype in (("attn", torch.bfloat16), ("mlp", torch.float64)):
        layers = getattr(model, part)
        assert all(isinstance(m, LorsLinear) for m in layers)
        assert {p.dtype for m in layers for p in m.parameters()} == {dtype}
    assert [p.dtype for p in getattr(model, SHARED_ATTRIBUTE).values()] == [torch.bfloat16, torch.float64]
    assert model.embed.weight.dtype == torch.float32


def test_load_without_an_architecture_is_one_clear_error(tmp_path, cli):
    from factory_models import StackedMLP

    save_file(StackedMLP().state_dict(), tmp_path / "m.safetensors")
    assert cli(tmp_path / "m.safetensors", "--rank", "4", "--quiet").code == 0
    with pytest.raises(LorsError, match="cannot tell the architecture"):
        lors_convert.load(tmp_path / "m.lors.safetensors")
    with pytest.raises(LorsError, match="not made by lors_convert.load"):
        lors_convert.save(StackedMLP(), tmp_path / "x.safetensors")


def test_load_into_the_wrong_architecture_is_one_clear_error(tmp_path, cli):
    model, _ = tiny("llama")
    model.save_pretrained(tmp_path / "llama")
    other, _ = tiny("bert")
    other.save_pretrained(tmp_path / "bert")
    assert cli(tmp_path / "llama", "-o", tmp_path / "m.safetensors", "--rank", "2", "--quiet").code == 0
    with pytest.raises(LorsError, match="no such layer|do not fit"):
        lors_convert.load(tmp_path / "m.safetensors", architecture=tmp_path / "bert")


@pytest.mark.parametrize("kind", ["t5", "vit", "neox"])
def test_finetune_and_eval_run_on_renamed_and_tied_architectures(tmp_path, cli, kind):
    """ViT and GPT-NeoX are renamed by transformers 5 when they load, T5 ties its embeddings."""
    model, inputs = tiny(kind)
    model.save_pretrained(tmp_path / "model")
    lors = tmp_path / "m.lors.safetensors"
    assert cli(tmp_path / "model", "-o", lors, "--rank", "3", "--shared", "mean", "--quiet").code == 0
    examples = 40
    data = {k: torch.cat([v] * (examples // len(v))) for k, v in inputs.items()}
    save_file({k: v.contiguous() for k, v in data.items()}, tmp_path / "data.safetensors")
    result = cli(
        "finetune",
        lors,
        "-d",
        tmp_path / "data.safetensors",
        "-o",
        tmp_path / "ft.safetensors",
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--eval-examples",
        "8",
        "--quiet",
        "--json",
    )
    assert result.code == 0, result.err
    assert result.json()["after"]["cos"] > 0
    evaluated = cli("eval", tmp_path / "ft.safetensors", "-d", tmp_path / "data.safetensors", "--quiet", "--json")
    assert evaluated.code == 0, evaluated.err
    assert evaluated.json()["examples"] == examples


WITHOUT_LORS_CONVERT = """
import sys, torch
sys.modules["lors_convert"] = None  # `import lors_convert` fails here: only torch and transformers are used
import transformers
kind, folder, inputs_file, result_file, remote = sys.argv[1:6]
auto = {"causal": transformers.AutoModelForCausalLM, "seq2seq": transformers.AutoModelForSeq2SeqLM}.get(
    kind, transformers.AutoModel)
model = auto.from_pretrained(folder, trust_remote_code=remote == "1").float().eval()
inputs = torch.load(inputs_file)
def out(model):
    with torch.no_grad():
        result = model(**inputs)
    logits = getattr(result, "logits", None)
    return logits if logits is not None else result.last_hidden_state
result = {"out": out(model), "params": sum(p.numel() for p in model.parameters()), "class": type(model).__name__}
if kind == "causal":
    result["generated"] = model.generate(input_ids=inputs["input_ids"][:1, :4], max_new_tokens=6, do_sample=False)
model.save_pretrained(folder + "-again")
result["again"] = out(auto.from_pretrained(folder + "-again", trust_remote_code=remote == "1").float().eval())
torch.save(result, result_file)
"""


def run_without_lors_convert(tmp_path, kind: str, folder, inputs: dict, remote: bool) -> dict:
    import subprocess
    import sys

    torch.save(inputs, tmp_path / "inputs.pt")
    family = {"gpt2": "causal", "llama": "causal", "neox": "causal", "t5": "seq2seq"}.get(kind, "base")
    command = [
        sys.executable,
        "-c",
        WITHOUT_LORS_CONVERT,
        family,
        str(folder),
        str(tmp_path / "inputs.pt"),
        str(tmp_path / "result.pt"),
        "1" if remote else "0",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(tmp_path / "result.pt")


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_export_loads_with_trust_remote_code_and_without_lors_convert(tmp_path, cli, kind):
    model, inputs = tiny(kind)
    model.save_pretrained(tmp_path / "model")
    lors_path = tmp_path / "m.lors.safetensors"
    report = cli(tmp_path / "model", "-o", lors_path, "--rank", "3", "--shared", "mean", "--quiet", "--json")
    assert report.code == 0
    assert cli("export", lors_path, "-o", tmp_path / "lors", "--quiet").code == 0
    assert cli("export", lors_path, "-o", tmp_path / "dense", "--dense", "--quiet").code == 0

    exported = run_without_lors_convert(tmp_path, kind, tmp_path / "lors", inputs, remote=True)
    plain = run_without_lors_convert(tmp_path, kind, tmp_path / "dense", inputs, remote=False)
    expected = output(dense_reference(model, lors_path, tmp_path)(**inputs)).detach()
    for result in (exported, plain):
        assert (result["out"] - expected).norm() <= 1e-5 * expected.norm()
        assert torch.equal(result["again"], result["out"])  # save_pretrained -> from_pretrained round trip
    assert exported["class"].startswith("Lors") and not plain["class"].startswith("Lors")
    buffers = sum(info.numel for info in read_lors(lors_path)[0].info.values() if not info.dtype.is_floating_point)
    assert exported["params"] == report.json()["total"]["lors_params"] - buffers
    if kind in ("gpt2", "llama", "neox"):
        assert torch.equal(exported["generated"], plain["generated"])


@pytest.mark.slow
def test_export_of_minilm_keeps_its_tokenizer_and_sentence_transformers_files(tmp_path, cli, minilm):
    assert cli(minilm, "-o", tmp_path / "m.lors.safetensors", "--quiet").code == 0
    assert cli("export", tmp_path / "m.lors.safetensors", "-o", tmp_path / "out", "--quiet").code == 0
    copied = {p.relative_to(minilm) for p in minilm.rglob("*") if p.is_file()}
    written = {p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*") if p.is_file()}
    kept = {p for p in copied if p.name not in ("model.safetensors", "config.json") and p.suffix != ".bin"}
    assert kept <= written and "lors_modeling.py" in {p.name for p in written}
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id
    result = cli("export", tmp_path / "m.lors.safetensors", "-o", tmp_path / "out", "--quiet")
    assert result.code == 1 and "already exists" in result.err


def test_a_bare_encoder_under_a_task_class_name_loads_as_the_base_model(tmp_path, cli):
    """all-mpnet-base-v2's config names MPNetForMaskedLM over the bare encoder's weights: the base model is built
    (not the task class with a randomly initialised head), by lors_convert.load and for the teacher alike. A
    checkpoint that has the head keeps its class."""
    import json

    from lors_convert.hf import dense_model

    model, inputs = tiny("bert")
    model.save_pretrained(tmp_path / "bare")
    config = json.loads((tmp_path / "bare" / "config.json").read_text())
    (tmp_path / "bare" / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    transformers.BertForMaskedLM(model.config).save_pretrained(tmp_path / "head")

    assert type(dense_model(tmp_path / "bare")) is transformers.BertModel
    assert type(dense_model(tmp_path / "head")) is transformers.BertForMaskedLM
    for folder, cls in (("bare", transformers.BertModel), ("head", transformers.BertForMaskedLM)):
        lors_path = tmp_path / f"{folder}.lors.safetensors"
        assert cli(tmp_path / folder, "-o", lors_path, "--rank", "3", "--quiet").code == 0
        loaded = lors_convert.load(lors_path)
        assert isinstance(loaded, cls) and any(isinstance(m, LorsLinear) for m in loaded.modules())
    with torch.no_grad():
        teacher = dense_model(tmp_path / "bare")
        torch.testing.assert_close(teacher(**inputs).last_hidden_state, model.eval()(**inputs).last_hidden_state)


def test_block_paths_take_the_templates_index_in_nested_models(tmp_path, cli):
    """Swin-style `layers.S.blocks.B`: each block is one path, not its stage where B equals S (layers.0 for block
    0 of stage 0, which dropped that block and made the whole stage one "block" for the layer loss and FSDP)."""
    from factory_models import NestedStages, nested_stages

    from lors_convert.loading import block_paths

    torch.manual_seed(0)
    save_file(NestedStages().state_dict(), tmp_path / "m.safetensors")
    assert cli(tmp_path / "m.safetensors", "--rank", "4", "--quiet").code == 0
    loaded = lors_convert.load(tmp_path / "m.lors.safetensors", architecture=nested_stages)
    assert [g.template for g in loaded.lors.meta.groups] == [f"layers.{s}.blocks.{{i}}.0.weight" for s in (0, 1)]
    assert block_paths(loaded, loaded.lors.meta) == [f"layers.{s}.blocks.{b}" for s in (0, 1) for b in range(3)]
