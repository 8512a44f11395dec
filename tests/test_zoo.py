"""The zoo: one table of tiny models (real transformers configs, and plain PyTorch models for what transformers has
no small example of), each put through the same checks, PEFT-style: conversion through the real CLI,
`lors_convert.load` against the original model, `merge_lors` and `save`, export to a Hugging Face folder that loads
with trust_remote_code and without lors_convert, generate() for causal and seq2seq LMs, one fine-tuning step.

Before conversion every stacked group is made LORS-exact (`exact`): its layers are S + R, S - R in pairs, R of rank
2, so `--rank 2 --shared mean` stores them without loss and the converted model must give the original's outputs."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import factory_models
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lors_convert
from lors_convert import LorsError
from lors_convert.checkpoint import TensorInfo
from lors_convert.cli import main
from lors_convert.lors_format import read_lors, shared_key
from lors_convert.nn import LorsLinear, is_conv1d, is_swappable, lors_groups, merge_lors
from lors_convert.stacks import find_stacks

T = pytest.importorskip("transformers")

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def hf(model_class: str, config_class: str, **config) -> Callable[[], nn.Module]:
    return lambda: getattr(T, model_class)(getattr(T, config_class)(**config))


def factory(name: str) -> Callable[[], nn.Module]:
    return getattr(factory_models, name)


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], nn.Module]
    inputs: dict[str, torch.Tensor]
    auto: str | None = None  # the transformers Auto class of an exported folder; None for a plain PyTorch model
    options: tuple[str, ...] = ("--rank", "2", "--shared", "mean")
    rel: float = 1e-5  # the largest relative difference from the original, in the weights and the outputs
    kept_dense: tuple[str, ...] = ()  # the groups the conversion leaves dense
    refused: str | None = None  # what `load` says of a model it cannot run in LORS form

    @property
    def factory(self) -> str | None:
        return None if self.auto else f"factory_models:{self.build.__name__}"

    @property
    def generates(self) -> bool:
        return self.auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM")


def x(*shape: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(*shape, generator=torch.Generator().manual_seed(1))}


SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
GPT2 = hf("GPT2LMHeadModel", "GPT2Config", vocab_size=64, n_embd=32, n_layer=3, n_head=4)
T5 = dict(vocab_size=64, d_model=32, d_ff=64, num_layers=3, num_heads=4, d_kv=8, decoder_start_token_id=0)
CAUSAL, SEQ2SEQ, BASE = "AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModel"
LLAMA = dict(SMALL, num_key_value_heads=2)  # GQA: k and v narrower than q
HEADS = dict(LLAMA, head_dim=8)
# layers 0 and 2 see the last 4 tokens, layer 1 all of them (transformers 4.57 and 5 both read `layer_types`)
MIXED = ["sliding_attention", "full_attention", "sliding_attention"]
GEMMA = dict(HEADS, query_pre_attn_scalar=8, sliding_window=4, layer_types=MIXED)
TEXT, PIXELS = {"input_ids": IDS}, {"pixel_values": x(2, 3, 16, 16)["x"]}
# fmt: off
CASES = [
    Case("llama", hf("LlamaForCausalLM", "LlamaConfig", **LLAMA, tie_word_embeddings=True), TEXT, CAUSAL),  # SmolLM2's
    # the LLM families transformers also reads from GGUF
    Case("mistral", hf("MistralForCausalLM", "MistralConfig", **HEADS, sliding_window=4), TEXT, CAUSAL),
    Case("qwen2", hf("Qwen2ForCausalLM", "Qwen2Config", **LLAMA), TEXT, CAUSAL),  # biased q, k and v
    Case("qwen3", hf("Qwen3ForCausalLM", "Qwen3Config", **HEADS), TEXT, CAUSAL),  # q and k normed
    # Gemma: post-norms, tied embeddings; 2 soft-caps attention scores and logits, 3 norms q and k
    Case("gemma2", hf("Gemma2ForCausalLM", "Gemma2Config", **GEMMA), TEXT, CAUSAL),
    Case("gemma3-text", hf("Gemma3ForCausalLM", "Gemma3TextConfig", **GEMMA), TEXT, CAUSAL),
    # fused qkv_proj and gate_up_proj; its default pad and end tokens (32,000) are outside a 64-token vocabulary
    Case("phi3", hf("Phi3ForCausalLM", "Phi3Config", **LLAMA, pad_token_id=0, eos_token_id=2), TEXT, CAUSAL),
    # GPT-2's Conv1D stores weights in x out; with and without a shared matrix
    Case("gpt2", GPT2, TEXT, CAUSAL),
    Case("gpt2-no-shared", GPT2, TEXT, CAUSAL, ("--rank", "2", "--shared", "none")),
    # transformers 5 renames GPT-NeoX's and ViT's layers when it loads them
    Case("neox", hf("GPTNeoXForCausalLM", "GPTNeoXConfig", **SMALL), TEXT, CAUSAL),
    Case("bert", hf("BertModel", "BertConfig", **SMALL), TEXT, BASE),
    # nested block.N.layer.M, encoder and decoder, tied embeddings
    Case("t5", hf("T5ForConditionalGeneration", "T5Config", **T5), {**TEXT, "decoder_input_ids": IDS}, SEQ2SEQ),
    Case("vit", hf("ViTModel", "ViTConfig", **SMALL, image_size=16, patch_size=8), PIXELS, BASE),
    # two layers near break-even: S and rank 7 store 1,920 numbers for q_proj's 2,048, and would store more than
    # k_proj's and v_proj's, which stay dense
    Case("two-layers", hf("LlamaForCausalLM", "LlamaConfig", **{**LLAMA, "num_hidden_layers": 2}), TEXT, CAUSAL,
         ("--rank", "7", "--shared", "mean"),
         kept_dense=("model.layers.{i}.self_attn.k_proj.weight", "model.layers.{i}.self_attn.v_proj.weight")),
    Case("mlp", factory("stacked_mlp"), x(5, 16)),
    Case("nested", factory("nested_stages"), x(5, 16)),  # Swin-style layers.S.blocks.B: a group per stage
    Case("routed", factory("routed_experts"), x(2, 6, 8)),  # token-routed experts, one of them reached by no token
    Case("mixed-dtypes", factory("mixed_dtypes"), x(5, 16), rel=3e-2),  # a bfloat16 group: its rounding
    Case("conv", factory("conv_stack"), x(2, 8, 6, 6), refused="cannot run in LORS form"),
]
# Mixtral's experts are `experts.E.w1` Linear layers in its checkpoint, but transformers 5 runs them fused, as one
# 3-D `experts.gate_up_proj` parameter a layer: convert factors them, load finds no layer to swap.
MIXTRAL = Case("mixtral", hf("MixtralForCausalLM", "MixtralConfig", **LLAMA, num_local_experts=4), TEXT, CAUSAL)
# fmt: on
FUSED_EXPERTS = pytest.mark.xfail(
    int(T.__version__.split(".")[0]) >= 5, reason="transformers 5 fuses MoE experts", raises=LorsError, strict=True
)
CASE = {case.id: case for case in CASES}
LOADABLE = [case for case in CASES if not case.refused]


def tiny(case_id: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A case's model as built (seeded, not made exact) and its inputs, for tests elsewhere that need a model."""
    torch.manual_seed(0)
    return CASE[case_id].build(), CASE[case_id].inputs


def params(cases: list[Case]) -> list:
    return [pytest.param(case, id=case.id) for case in cases]


def exact(state: dict[str, torch.Tensor], shared: bool, rank: int = 2) -> dict[str, torch.Tensor]:
    """The state with each stacked group (as convert finds them) made S + R_k, S - R_k for layer pairs k (and S for
    an odd last layer), R_k of the given rank and as large as S, which is zero unless `shared`."""
    gen = torch.Generator().manual_seed(0)
    state = dict(state)
    info = {name: TensorInfo(tuple(t.shape), t.dtype) for name, t in state.items()}
    for stack in find_stacks(info)[0]:
        scale = stack.cols**-0.5
        s = torch.randn(stack.rows, stack.cols, generator=gen) * scale * shared
        for i, name in enumerate(stack.names):
            if i % 2 == 0:
                r = torch.randn(stack.rows, rank, generator=gen) @ torch.randn(rank, stack.cols, generator=gen)
                r = r * scale / rank**0.5 * (i + 1 < len(stack.names))
            state[name] = (s + r * (-1) ** i).reshape(stack.shape).to(stack.dtype)
    return state


def converted(case: Case, folder: Path) -> tuple[nn.Module, Path, dict]:
    """(the original model, made exact; its LORS file, converted by the CLI's entry point; the report)."""
    torch.manual_seed(0)
    model = case.build()
    shared = "none" not in case.options
    if case.factory:
        source = folder / "model.safetensors"
        state = exact(model.state_dict(), shared)
        save_file(state, source)
        model.load_state_dict(state)
    else:
        source = folder / "model"
        model.save_pretrained(source)
        weights = source / "model.safetensors"
        save_file(exact(load_file(weights), shared), weights, metadata={"format": "pt"})
        model = type(model).from_pretrained(source)
    lors, printed = folder / "m.lors.safetensors", io.StringIO()
    with contextlib.redirect_stdout(printed):
        main([str(source), "-o", str(lors), *case.options, "--quiet", "--json"])
    return model.eval(), lors, json.loads(printed.getvalue())


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Callable[[Case], tuple[nn.Module, Path, dict]]:
    """`converted`, once a case for all the checks."""
    done = {}

    def get(case: Case):
        if case.id not in done:
            done[case.id] = converted(case, tmp_path_factory.mktemp(case.id))
        return done[case.id]

    return get


def output(result) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result
    logits = getattr(result, "logits", None)
    return logits if logits is not None else result.last_hidden_state


def close(got: torch.Tensor, expected: torch.Tensor, rel: float) -> bool:
    return got.shape == expected.shape and (got - expected).norm() <= rel * expected.norm()


def generated(model: nn.Module, case: Case) -> torch.Tensor:
    return model.generate(input_ids=case.inputs["input_ids"][:1, :4], max_new_tokens=6, do_sample=False)


def tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and head.weight is model.get_input_embeddings().weight


def buffers(lors: Path) -> int:
    """The numbers a LORS file holds that are not parameters of its model (BERT's position_ids)."""
    return sum(info.numel for info in read_lors(lors)[0].info.values() if not info.dtype.is_floating_point)


@pytest.mark.parametrize("case", [*params(CASES), pytest.param(MIXTRAL, id="mixtral", marks=FUSED_EXPERTS)])
def test_convert_then_load_gives_the_original_outputs_and_saves_back(case, zoo, tmp_path):
    model, lors, report = zoo(case)
    assert report["groups"] and report["stacked"]["rel_error"] <= case.rel
    assert sorted(g["template"] for g in report["kept_dense"]) == sorted(case.kept_dense)
    source, meta = read_lors(lors)
    for group in meta.groups:  # every group stored in its layers' own dtype
        assert {str(source.info[f"{name}.lora_A"].dtype) for name in group.names} == {f"torch.{group.dtype}"}
    architecture = factory(case.build.__name__) if case.factory else None
    if case.refused:
        with pytest.raises(LorsError, match=case.refused):
            lors_convert.load(lors, architecture=architecture)
        return

    loaded = lors_convert.load(lors, architecture=architecture)
    assert isinstance(loaded, type(model)) and tied(loaded) == tied(model)
    layers = {path: m for path, m in loaded.named_modules() if isinstance(m, LorsLinear)}
    assert len(layers) == sum(len(g["layers"]) for g in report["groups"])
    assert all(m.transposed == is_conv1d(model.get_submodule(path)) for path, m in layers.items())
    shared = [len(g["layers"]) for g in report["groups"] if g["shared"]]
    assert sorted(map(len, lors_groups(loaded).values())) == sorted(shared)  # one Parameter per group's S
    assert sum(p.numel() for p in loaded.parameters()) == report["total"]["lors_params"] - buffers(lors)
    with torch.no_grad():
        expected = output(model(**case.inputs))
        assert close(output(loaded(**case.inputs)), expected, case.rel)
        merged = merge_lors(copy.deepcopy(loaded))
        assert not any(isinstance(m, LorsLinear) for m in merged.modules())
        assert close(output(merged(**case.inputs)), expected, case.rel)
    assert set(merged.state_dict()) == set(model.state_dict())
    if case.generates:
        assert torch.equal(generated(loaded, case), generated(model, case))

    lors_convert.save(loaded, tmp_path / "again.lors.safetensors")
    again = read_lors(tmp_path / "again.lors.safetensors")[0]
    assert again.info == source.info  # names, shapes and dtypes
    assert all(torch.equal(again.get(name), source.get(name)) for name in source.info)


@pytest.mark.parametrize("case", params([case for case in CASES if case.auto]))
def test_export_loads_with_trust_remote_code_and_without_lors_convert(case, zoo, tmp_path, cli, monkeypatch):
    model, lors, report = zoo(case)
    assert cli("export", lors, "-o", tmp_path / "lors", "--quiet").code == 0
    assert cli("export", lors, "-o", tmp_path / "dense", "--dense", "--quiet").code == 0
    for name in list(sys.modules):
        if name.startswith("transformers_modules"):  # the folder's modeling file runs again, here
            monkeypatch.delitem(sys.modules, name)
        if name.split(".")[0] == "lors_convert":  # and `import lors_convert` fails (only torch and transformers)
            monkeypatch.setitem(sys.modules, name, None)
    auto = getattr(T, case.auto)
    with torch.no_grad():
        expected = output(model(**case.inputs))
    for folder, remote in (("lors", True), ("dense", False)):
        exported = auto.from_pretrained(tmp_path / folder, trust_remote_code=remote).eval()
        assert type(exported).__name__.startswith("Lors") == remote
        exported.save_pretrained(tmp_path / f"{folder}-again")
        again = auto.from_pretrained(tmp_path / f"{folder}-again", trust_remote_code=remote).eval()
        with torch.no_grad():
            got = output(exported(**case.inputs))
            assert close(got, expected, case.rel) and torch.equal(output(again(**case.inputs)), got)
        if case.generates:
            assert torch.equal(generated(exported, case), generated(model, case))
        if remote:
            assert sum(p.numel() for p in exported.parameters()) == report["total"]["lors_params"] - buffers(lors)


@pytest.mark.parametrize("case", params([case for case in CASES if case.auto]))
def test_an_offloaded_original_holds_one_block_and_gives_the_same_outputs(case, tmp_path):
    """What calibration and evaluation run for a Hugging Face folder: the blocks read from the (bfloat16)
    checkpoint one at a time, in float32, with the whole model's outputs and generations."""
    from lors_convert.blocks import StopForward
    from lors_convert.hf import dense_model
    from lors_convert.loading import offloaded_dense_model
    from lors_convert.offload import OFFLOADED

    torch.manual_seed(0)
    case.build().to(torch.bfloat16).save_pretrained(tmp_path / "model")
    whole, offloaded = dense_model(tmp_path / "model"), offloaded_dense_model(tmp_path / "model").to("cpu")
    blocks = [module for module in offloaded.modules() if hasattr(module, OFFLOADED)]
    assert len(blocks) >= 2 and all(t.is_meta for block in blocks for t in block.parameters())
    live, dtypes = [], set()

    def count(module, args):
        live.append(sum(not t.is_meta for block in blocks for t in block.parameters(recurse=True)))
        if torch.is_autocast_enabled("cpu"):
            dtypes.update(t.dtype for t in module.parameters() if t.dim() >= 2)  # matrices

    hooks = [block.register_forward_pre_hook(count) for block in blocks]  # after the offload hooks: weights in
    with torch.no_grad():
        expected, got = output(whole(**case.inputs)), output(offloaded(**case.inputs))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the blocks read as stored: the very same products
            assert torch.equal(output(offloaded(**case.inputs)), output(whole(**case.inputs)))
    for hook in hooks:
        hook.remove()
    per_block = max(sum(1 for _ in block.parameters()) for block in blocks)
    assert live and max(live) <= per_block  # one block's weights at a time
    assert got.dtype == torch.float32 and close(got, expected, 1e-6) and dtypes == {torch.bfloat16}
    assert all(t.is_meta for block in blocks for t in block.parameters())  # dropped after use
    if case.generates:
        assert torch.equal(generated(offloaded, case), generated(whole, case))
    inner = next(m for m in blocks[0].modules() if is_swappable(m))  # a Linear (or Conv1D), which runs

    def stop(module, args):
        raise StopForward

    handle = inner.register_forward_pre_hook(stop)
    with torch.no_grad(), pytest.raises(StopForward):  # a forward stopped inside a block (calibration's hooks)
        offloaded(**case.inputs)
    handle.remove()
    assert all(t.is_meta for block in blocks for t in block.parameters())


@pytest.mark.parametrize("case", params(LOADABLE))
def test_an_offloaded_lors_model_gives_the_loaded_ones_outputs(case, zoo):
    """`load(offload=True)`: what evaluation runs, the blocks' factors read from the LORS file as they run."""
    from lors_convert.offload import OFFLOADED

    _, lors, _ = zoo(case)
    architecture = case.build if case.factory else None
    if case.factory:
        with pytest.raises(LorsError, match="needs a Hugging Face architecture"):
            lors_convert.load(lors, architecture=architecture, offload=True)
        return
    loaded, offloaded = lors_convert.load(lors), lors_convert.load(lors, offload=True)
    blocks = [module for module in offloaded.modules() if hasattr(module, OFFLOADED)]
    assert blocks and all(t.is_meta for block in blocks for t in block.parameters())
    with torch.no_grad():
        assert close(output(offloaded(**case.inputs)), output(loaded(**case.inputs)), 1e-6)
    assert all(t.is_meta for block in blocks for t in block.parameters())
    if case.generates:
        assert torch.equal(generated(offloaded, case), generated(loaded, case))


GEMMA3 = hf(
    "Gemma3ForConditionalGeneration",
    "Gemma3Config",
    text_config={**LLAMA, "head_dim": 8},
    vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28),
    mm_tokens_per_image=4,
)


@pytest.mark.parametrize(
    "build, causal",
    [(case.build, case.auto == CAUSAL) for case in CASES if case.auto] + [(GEMMA3, True)],
    ids=[case.id for case in CASES if case.auto] + ["gemma3-conditional-generation"],
)
def test_a_language_model_is_known_by_what_it_does_not_its_class_name(build, causal):
    """Defect: class-name suffixes missed Gemma 3's *ForConditionalGeneration language model, which then got no
    packing, no model-written calibration text, no --max-ppl-increase and an encoder's learning rate."""
    from lors_convert.runtime import is_causal_lm

    torch.manual_seed(0)
    assert is_causal_lm(build()) == causal


@pytest.mark.parametrize("case", params(LOADABLE))
def test_one_finetune_step_trains_every_shared_matrix_then_eval(case, zoo, tmp_path, cli):
    _, lors, _ = zoo(case)
    data = tmp_path / "data.safetensors"
    save_file({k: torch.cat([v] * 6).contiguous() for k, v in case.inputs.items()}, data)
    factory_option = ("--model-factory", case.factory) if case.factory else ()
    out = tmp_path / "ft.safetensors"
    args = ("-d", data, "--quiet", "--json", *factory_option)
    result = cli("finetune", lors, "-o", out, "--steps", "1", "--batch-size", "4", "--eval-examples", "4", *args)
    assert result.code == 0, result.err
    before, after = load_file(lors), load_file(out)
    assert before.keys() == after.keys()
    shared = [shared_key(g.template) for g in read_lors(lors)[1].groups if g.shared]
    assert all(not torch.equal(before[name], after[name]) for name in shared)
    evaluated = cli("eval", out, *args)
    assert evaluated.code == 0, evaluated.err
    assert evaluated.json()["examples"] == 6 * len(next(iter(case.inputs.values())))


FRESH = """
import sys, torch, transformers
sys.modules["lors_convert"] = None  # `import lors_convert` fails: only torch and transformers
folder, inputs, result = sys.argv[1:]
model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(model(**torch.load(inputs)).logits, result)
"""


@pytest.mark.slow
def test_an_export_loads_in_a_fresh_interpreter(zoo, tmp_path, cli):
    """What the in-process check above cannot show: nothing lors_convert registered in this process is needed."""
    import subprocess

    case = CASE["llama"]
    model, lors, _ = zoo(case)
    assert cli("export", lors, "-o", tmp_path / "lors", "--quiet").code == 0
    torch.save(case.inputs, tmp_path / "inputs.pt")
    command = [sys.executable, "-c", FRESH, *(str(tmp_path / name) for name in ("lors", "inputs.pt", "out.pt"))]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        assert close(torch.load(tmp_path / "out.pt"), output(model(**case.inputs)), case.rel)


# causal LMs that transform their head's output otherwise than Gemma's soft cap: Cohere scales it, Granite divides it
SCALED = [
    Case("cohere", hf("CohereForCausalLM", "CohereConfig", **LLAMA), TEXT, CAUSAL),
    Case("granite", hf("GraniteForCausalLM", "GraniteConfig", **LLAMA, logits_scaling=4.0), TEXT, CAUSAL),
]
PADDED = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])  # IDS's second row right-padded


def distilled(student: nn.Module, teacher: nn.Module, objective: str) -> tuple[torch.Tensor, dict, list[int]]:
    """step_loss on IDS with 4 positions of logits a chunk: (loss, the student's gradients, the positions each
    call of either model's head made logits for)."""
    from lors_convert import evaluate
    from lors_convert.finetuning import step_loss

    rows = []
    hooks = [m.get_output_embeddings().register_forward_hook(lambda m, a, out: rows.append(out[..., 0].numel()))
             for m in (student, teacher)]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "LOGITS_BYTES", 4 * 4 * teacher.config.get_text_config().vocab_size)
        loss = step_loss(student, teacher, {"input_ids": IDS, "attention_mask": PADDED}, [], objective)
        loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {name: p.grad for name, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    return loss.detach(), grads, rows


def whole_logits_loss(student: nn.Module, teacher: nn.Module, objective: str) -> tuple[torch.Tensor, dict]:
    """The same loss from the models' whole logits, as transformers makes them: (loss, the student's gradients)."""
    F = nn.functional
    s = student(input_ids=IDS, attention_mask=PADDED).logits
    if objective == "lm":
        keep = (PADDED[:, 1:] * PADDED[:, :-1]).flatten()
        loss = (F.cross_entropy(s[:, :-1].flatten(0, 1), IDS[:, 1:].flatten(), reduction="none") * keep).sum()
        loss = loss / keep.sum()
    else:
        with torch.no_grad():
            t = teacher(input_ids=IDS, attention_mask=PADDED).logits
        kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
        loss = (kl * PADDED).sum() / PADDED.sum()
    loss.backward()
    grads = {name: p.grad for name, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    return loss.detach(), grads


def student_of(case: Case) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = case.build().eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return student, teacher


def same_gradients(got: dict, expected: dict) -> bool:
    present = lambda grads: {name for name, g in grads.items() if g is not None}
    return present(got) == present(expected) and all(
        (got[name] - g).norm() <= 1e-4 * g.norm() + 1e-9 for name, g in expected.items() if g is not None
    )


@pytest.mark.parametrize("case", params([case for case in CASES if case.auto == CAUSAL] + SCALED))
def test_distillation_makes_logits_a_few_positions_at_a_time_with_the_whole_logits_loss_and_gradients(case):
    """Defect: distillation made both models' logits for the whole batch (a 256k vocabulary: 4.3 GB a copy at 32 x
    128 tokens, five copies and more). A chunk of positions' logits is made from the final hidden states, with
    the model's own transform of them (Gemma 2's soft cap, Cohere's scale, Granite's divisor), and again in the
    backward: the same loss and gradients as from the whole logits, for the distillation and the lm objective."""
    student, teacher = student_of(case)
    for objective in ("distill", "lm"):
        loss, grads, rows = distilled(student, teacher, objective)
        expected, expected_grads = whole_logits_loss(student, teacher, objective)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5), objective
        assert same_gradients(grads, expected_grads), objective
        assert max(rows) <= 4 < PADDED.sum(), objective  # the check's position, the chunks


@pytest.mark.parametrize("case", params(SCALED))
def test_a_model_whose_logits_are_made_otherwise_than_known_is_distilled_from_its_whole_logits(case, monkeypatch):
    """Where the head and the known transforms do not give a model's own logits (here: none are known), they
    come from its forward, whole, rather than wrong."""
    from lors_convert import runtime

    monkeypatch.setattr(runtime, "logit_transform", lambda config: lambda logits: logits)
    student, teacher = student_of(case)
    loss, grads, rows = distilled(student, teacher, "distill")
    expected, expected_grads = whole_logits_loss(student, teacher, "distill")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and same_gradients(grads, expected_grads)
    assert max(rows) == IDS.numel()
