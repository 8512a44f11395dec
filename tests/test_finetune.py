"""Runtime LORS modules, fine-tuning, DDP, resume and eval, through the real CLI on tiny random HF models."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

transformers = pytest.importorskip("transformers")

import lors_convert
from lors_convert.config import FinetuneConfig
from lors_convert.evaluate import load_student_teacher
from lors_convert.finetuning import learning_rate, stacked_layer_paths, step_loss
from lors_convert.lors_format import read_lors, shared_key
from lors_convert.nn import lors_groups, merge_lors

WORDS = (
    "the a function module returns value list string object class method file error type data name "
    "python call argument default new time number line code example set dictionary key"
).split()
REPO = Path(__file__).resolve().parents[1]


def tiny_config(kind: str, layers: int = 3, **overrides):
    common = dict(vocab_size=len(WORDS) + 4, initializer_range=0.2) | overrides  # large weights: layers matter
    if kind == "bert":
        return transformers.BertConfig(
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            **common,
        )
    if kind == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=64, **common)
    return transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        **common,
    )


def make_model_dir(folder: Path, kind: str, layers: int = 3, **overrides) -> Path:
    """A tiny random model saved with save_pretrained, with a word-level tokenizer (no network)."""
    torch.manual_seed(0)
    config = tiny_config(kind, layers, **overrides)
    model = transformers.BertModel(config) if kind == "bert" else transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer of len(WORDS) + 4 entries, saved beside a model (no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]"
    ).save_pretrained(folder)


def text_file(path: Path, lines: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choices(WORDS, k=rng.randint(4, 20))) for _ in range(lines)) + "\n")
    return path


def test_scores_do_not_depend_on_the_tokenizers_padding_side(tmp_path, cli):
    """Defect: a tokenizer that pads on the left (Llama-2's, Mistral's) had the prediction made at the last pad
    position counted, and the real tokens moved to later positions: eval and fine-tuning score right-padded."""
    import json

    folder = make_model_dir(tmp_path / "llama", "llama")
    data = text_file(tmp_path / "t.txt")
    lors = tmp_path / "m.lors.safetensors"
    assert cli(folder, "-o", lors, "--rank", "4", "--quiet").code == 0
    scores = {}
    for side in ("right", "left"):
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": side}))
        result = cli("eval", lors, "--data", data, "--batch-size", "8", "--json", "--quiet")
        assert result.code == 0, result.err
        scores[side] = result.json()
    for key in ("ppl_teacher", "ppl_student", "kl", "top1"):
        assert scores["left"][key] == pytest.approx(scores["right"][key], rel=1e-5), key


def test_scoring_a_large_vocabulary_holds_a_few_rows_of_logits_at_a_time(tmp_path, cli, monkeypatch):
    """Defect: 32 rows of a 256k vocabulary's float32 logits are 4.3 GB per model; where a model makes its logits
    whole (this forward names no `logits_to_keep`: they cannot be made a chunk of positions at a time), eval cuts
    a batch into fewer rows where its logits would pass LOGITS_BYTES, with the same scores."""
    from lors_convert import evaluate

    folder = make_model_dir(tmp_path / "llama", "llama")
    data = text_file(tmp_path / "t.txt")
    lors = tmp_path / "m.lors.safetensors"
    assert cli(folder, "-o", lors, "--rank", "4", "--quiet").code == 0
    args = ("eval", lors, "--data", data, "--batch-size", "16", "--json", "--quiet")
    whole = cli(*args).json()
    rows = []
    head = transformers.LlamaForCausalLM.forward

    def forward(self, *a, **kw):
        rows.append(len(kw.get("input_ids", a[0] if a else None)))
        return head(self, *a, **kw)

    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", forward)
    monkeypatch.setattr(evaluate, "LOGITS_BYTES", 8 * tiny_config("llama", 3).vocab_size * 4)  # 8 positions
    cut = cli(*args).json()
    assert rows and max(rows) == 1
    for key in ("ppl_teacher", "ppl_student", "kl", "top1", "cos", "top10"):
        assert cut[key] == pytest.approx(whole[key], rel=1e-5), key


VOCAB = 262_144  # Gemma 3's


class LargestLogits(TorchDispatchMode):
    """Records the bytes of the largest tensor torch makes while it is on (a new one, not a view of or a write
    into another) whose last dimension is VOCAB's: logits, their softmaxes and their gradients, forward and
    backward, whichever code makes them."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        storage = lambda t: t.untyped_storage().data_ptr()
        inputs = {storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and not t.is_meta}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta and t.dim() >= 2 and t.shape[-1] == VOCAB:
                if storage(t) not in inputs:
                    self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.fixture
def vocab_256k(tmp_path, cli, monkeypatch):
    """(model dir, its LORS file, text) of a Llama with a 256k vocabulary (hidden 32, 2 layers, tied embeddings),
    its logits made 16 positions at a time: 16 MiB a chunk, where a batch of 8 rows of 32 tokens makes 256 MiB."""
    from lors_convert import evaluate

    folder = make_model_dir(tmp_path / "llama", "llama", 2, vocab_size=VOCAB, tie_word_embeddings=True)
    data = text_file(tmp_path / "t.txt")
    lors = tmp_path / "m.lors.safetensors"
    assert cli(folder, "-o", lors, "--rank", "4", "--quiet").code == 0
    monkeypatch.setattr(evaluate, "LOGITS_BYTES", 16 * VOCAB * 4)
    return folder, lors, data


def test_a_256k_vocabulary_fine_tunes_and_evaluates_a_chunk_of_logits_at_a_time(tmp_path, cli, vocab_256k):
    """Defect: distillation held the whole batch's logits of both models, log-softmaxes of each and the logits'
    gradient (a real 262k-vocabulary model was killed at 24 GB); its evaluations before and after each held a
    row's at least. Every logits-sized tensor of a fine-tune, its backward's included, is a chunk's at most."""
    _, lors, data = vocab_256k
    run = ("-d", data, "--steps", "2", "--batch-size", "8", "--max-length", "32", "--eval-examples", "8")
    with LargestLogits() as seen:
        result = cli("finetune", lors, "-o", tmp_path / "ft.safetensors", *run, "--lr", "1e-3", "--quiet", "--json")
    assert result.code == 0, result.err
    assert math.isfinite(result.json()["after"]["kl"])
    assert 0 < seen.largest <= 16 * VOCAB * 4  # 16 MiB, where a step's batch makes 256 MiB a copy


def test_a_256k_vocabularys_eval_and_compress_evaluate_a_chunk_of_logits_at_a_time(tmp_path, cli, vocab_256k):
    """eval, and compress's own evaluation after its conversion: every logits-sized tensor is a chunk's at most,
    no larger than the conversion's own (its calibration's, a row at a time). On main, eval made a row's whole."""
    from lors_convert import compression

    folder, lors, data = vocab_256k
    with LargestLogits() as seen:
        evaluated = cli("eval", lors, "--data", data, "--batch-size", "16", "--max-length", "32", "--quiet", "--json")
    assert evaluated.code == 0, evaluated.err
    assert math.isfinite(evaluated.json()["kl"]) and 0 < seen.largest <= 16 * VOCAB * 4
    fidelity, largest = compression.fidelity, {}

    def measured(*args, **kwargs):
        largest["conversion"], seen.largest = seen.largest, 0
        result = fidelity(*args, **kwargs)
        largest["evaluation"] = seen.largest
        return result

    compression.fidelity = measured
    try:
        out = tmp_path / "c.lors.safetensors"
        with LargestLogits() as seen:
            compressed = cli("compress", folder, "--calibrate", data, "-o", out, "--calib-samples", "8", "--quiet")
    finally:
        compression.fidelity = fidelity
    assert compressed.code == 0, compressed.err
    assert 0 < largest["evaluation"] <= min(16 * VOCAB * 4, largest["conversion"]), largest


def test_a_fine_tune_that_cannot_fit_offloads_the_teacher_or_refuses_before_it_starts(tmp_path, cli, monkeypatch):
    """Fine-tuning estimates its peak (student with gradients and AdamW state, teacher, activations and logits):
    where the whole teacher does not fit, its blocks are read as they run; where nothing fits, one line with the
    numbers and the --batch-size that fits, before any training (and, in compress, before converting)."""
    from lors_convert import calibrate, finetuning
    from lors_convert.checkpoint import open_checkpoint
    from lors_convert.hf import auto_config

    folder = make_model_dir(tmp_path / "llama", "llama")
    data = text_file(tmp_path / "t.txt")
    lors = tmp_path / "m.lors.safetensors"
    assert cli(folder, "-o", lors, "--rank", "4", "--quiet").code == 0
    student = sum(info.numel for info in open_checkpoint(lors).info.values())
    teacher = sum(info.numel for info in open_checkpoint(folder).info.values())
    config = auto_config(folder)

    def needed(teacher_numel: int, batch_size: int) -> float:
        return sum(finetuning.training_bytes(student, teacher_numel, config, True, batch_size, 128).values())

    run = ("finetune", lors, "--data", data, "--steps", "1", "--batch-size", "8", "--eval-examples", "8", "--quiet")
    monkeypatch.setattr(calibrate, "available_memory", lambda: needed(teacher, 8) - 1)  # all but the whole teacher
    result = cli(*run, "-o", tmp_path / "a.lors.safetensors")
    assert result.code == 0, result.err
    assert "the teacher's blocks are read from its checkpoint" in result.err
    monkeypatch.setattr(calibrate, "available_memory", lambda: needed(0, 2) + 4 * teacher)  # batch 2 fits, 4 not
    refused = cli(*run, "-o", tmp_path / "b.lors.safetensors")
    assert refused.code == 1 and len(refused.err.strip().splitlines()) == 1
    assert "fine-tuning would hold about" in refused.err and "--batch-size 2 fits" in refused.err
    assert not (tmp_path / "b.lors.safetensors").exists()
    out = tmp_path / "c.lors.safetensors"
    compressed = cli("compress", folder, "--calibrate", data, "-o", out, "--finetune-minutes", "1", "--quiet")
    assert compressed.code == 1 and "--batch-size" in compressed.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.lors.safetensors", "llama", "m.lors.safetensors", "t.txt"]


@pytest.fixture
def converted(tmp_path, cli):
    """(model dir, LORS file, report) of a tiny model converted at rank 4."""

    def make(kind: str, *options: str):
        folder = make_model_dir(tmp_path / kind, kind)
        out = tmp_path / f"{kind}.lors.safetensors"
        options = options or ("--rank", "4")
        result = cli(
            folder, "-o", out, "--quiet", "--json", *options, *(() if "--shared" in options else ("--shared", "mean"))
        )
        assert result.code == 0, result.err
        return folder, out, result.json()

    return make


def finetune_args(lors: Path, data: Path, out: Path, *extra: str) -> list:
    return [
        "finetune",
        lors,
        "-d",
        data,
        "-o",
        out,
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--warmup",
        "1",
        "--eval-examples",
        "16",
        "--max-length",
        "32",
        "--quiet",
        "--json",
        *extra,
    ]


def random_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, len(WORDS) + 4, (3, 17), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- runtime modules


def test_shared_parameter_gets_the_gradient_of_all_its_layers(tmp_path, converted):
    folder, lors, _ = converted("bert")
    pair = load_student_teacher(lors)
    paths = stacked_layer_paths(pair.teacher, pair.meta)
    merged = merge_lors(copy.deepcopy(pair.student))
    batch = {"input_ids": random_ids()}
    step_loss(pair.student, pair.teacher, batch, paths, "distill").backward()
    step_loss(merged, pair.teacher, batch, paths, "distill").backward()
    for modules in lors_groups(pair.student).values():
        shared = modules[0].shared
        # dL/dS = Σ_i dL/dW_i over the layers sharing S (each W_i = S + B_i A_i)
        paths_of = {id(m): p for p, m in pair.student.named_modules()}
        expected = sum(merged.get_submodule(paths_of[id(m)]).weight.grad for m in modules)
        assert torch.allclose(shared.grad, expected, rtol=1e-4, atol=1e-7)
        for m in modules:
            w_grad = merged.get_submodule(paths_of[id(m)]).weight.grad
            assert torch.allclose(m.lora_B.grad, w_grad @ m.lora_A.detach().T, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- fine-tuning


def test_finetune_lowers_the_loss_and_trains_exactly_the_lors_and_unshared_parameters(tmp_path, cli, converted):
    folder, lors, _ = converted("bert", "--rank", "1")
    data = text_file(tmp_path / "train.txt")
    result = cli(*finetune_args(lors, data, tmp_path / "ft.safetensors"))
    assert result.code == 0, result.err
    assert set(result.json()) == {"before", "after"}
    out_source, out_meta = read_lors(tmp_path / "ft.safetensors")
    ft = out_meta.finetune
    assert ft["loss_last"] < ft["loss_first"]
    assert ft["frozen"] == ["pooler.dense.weight", "pooler.dense.bias"]
    assert [g.ranks for g in out_meta.groups] == [g.ranks for g in read_lors(lors)[1].groups]
    old, new = load_file(lors), load_file(tmp_path / "ft.safetensors")
    assert set(old) == set(new)
    unchanged = {k for k in old if torch.equal(old[k], new[k])}
    assert unchanged == {"pooler.dense.weight", "pooler.dense.bias"}
    assert not (tmp_path / "ft.safetensors.train-state.pt").exists()


def test_an_encoders_default_learning_rate_is_5e_4(tmp_path, cli, converted):
    """(A causal LM distils at 1e-4: test_gguf.)"""
    folder, lors, _ = converted("bert")
    args = finetune_args(lors, text_file(tmp_path / "train.txt"), tmp_path / "ft.safetensors")
    at = args.index("--lr")
    result = cli(*args[:at], *args[at + 2 :], "--steps", "1")
    assert result.code == 0, result.err
    assert read_lors(tmp_path / "ft.safetensors")[1].finetune["settings"]["lr"] == 5e-4


def test_finetune_drops_the_output_error_of_the_weights_it_changed(tmp_path, cli, converted):
    """output_error describes the converted factors on calibration inputs; fine-tuning changes both."""
    data = text_file(tmp_path / "train.txt")
    folder, lors, report = converted("bert", "--rank", "1", "--calibrate", data, "--calib-samples", "16")
    assert all(g["output_error"] > 0 for g in report["groups"])
    assert cli(*finetune_args(lors, data, tmp_path / "ft.safetensors")).code == 0
    before, after = read_lors(lors)[1].groups, read_lors(tmp_path / "ft.safetensors")[1].groups
    assert all(g.output_error is None for g in after)
    assert [g.rel_error for g in after] != [g.rel_error for g in before]  # recomputed on the tuned weights
    tuned = cli("report", tmp_path / "ft.safetensors", "--json").json()
    assert not any("output_error" in g for g in tuned["groups"])


def test_resume_continues_where_the_run_stopped(tmp_path, cli, converted, monkeypatch):
    folder, lors, _ = converted("bert")
    data = text_file(tmp_path / "train.txt")
    assert cli(*finetune_args(lors, data, tmp_path / "straight.safetensors", "--save-every", "3")).code == 0

    real_step, calls = torch.optim.AdamW.step, []

    def interrupted_step(self, *args, **kwargs):  # Ctrl-C during the 5th optimizer step
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted_step)
    out = tmp_path / "resumed.safetensors"
    assert cli(*finetune_args(lors, data, out, "--save-every", "3")).code != 0
    assert not out.exists() and Path(f"{out}.train-state.pt").is_file()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)

    refused = cli(*finetune_args(lors, data, out, "--save-every", "3", "--lr", "2e-3", "--resume"))
    assert refused.code == 1 and "other settings (lr)" in refused.err
    result = cli(*finetune_args(lors, data, out, "--save-every", "3", "--resume"))
    assert result.code == 0, result.err
    assert read_lors(out)[1].finetune["resumed_at"] == 3
    straight, resumed = load_file(tmp_path / "straight.safetensors"), load_file(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_objective_lm_and_lm_metrics_on_a_causal_model(tmp_path, cli, converted):
    folder, lors, _ = converted("llama")
    data = text_file(tmp_path / "train.txt")
    result = cli(*finetune_args(lors, data, tmp_path / "lm.safetensors", "--objective", "lm", "--lr", "1e-2"))
    assert result.code == 0, result.err
    before, after = result.json()["before"], result.json()["after"]
    assert {"cos", "top10", "ppl_teacher", "ppl_student", "kl"} <= set(after)
    assert after["ppl_student"] < before["ppl_student"] and after["ppl_teacher"] == before["ppl_teacher"]
    assert read_lors(tmp_path / "lm.safetensors")[1].finetune["settings"]["objective"] == "lm"


def test_eval_and_teacher_mismatch(tmp_path, cli, converted):
    folder, lors, _ = converted("gpt2")
    data = text_file(tmp_path / "held_out.txt", lines=30, seed=1)
    result = cli("eval", lors, "-d", data, "--json")
    assert result.code == 0, result.err
    metrics = result.json()
    assert metrics["examples"] == 30 and 0 < metrics["cos"] <= 1 and 0 <= metrics["top10"] <= 1
    assert metrics["kl"] > 0 and metrics["ppl_student"] > 1 and 0 < metrics["top1"] < 1

    other = tmp_path / "other"
    other.mkdir()
    for f in folder.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    weights = load_file(other / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.weight"] *= 3
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    refused = cli("eval", lors, "-d", data, "--teacher", other)
    assert refused.code == 1 and "--allow-teacher-mismatch" in refused.err and "\n" not in refused.err.strip()
    refused = cli(*finetune_args(lors, data, tmp_path / "ft.safetensors", "--teacher", other))
    assert refused.code == 1 and "--allow-teacher-mismatch" in refused.err and "\n" not in refused.err.strip()
    assert not list(tmp_path.glob("*ft.safetensors*"))
    allowed = cli("eval", lors, "-d", data, "--teacher", other, "--allow-teacher-mismatch", "--json")
    assert allowed.code == 0 and "warning" in allowed.err
    assert allowed.json()["cos"] != metrics["cos"]


def test_factory_model_with_tensor_data(tmp_path, cli):
    from factory_models import stacked_mlp

    torch.manual_seed(0)
    save_file(stacked_mlp().state_dict(), tmp_path / "mlp.safetensors")
    assert cli(tmp_path / "mlp.safetensors", "--rank", "2", "--shared", "mean", "--quiet", "--json").code == 0
    save_file({"x": torch.randn(60, 5, 16)}, tmp_path / "inputs.safetensors")
    lors = tmp_path / "mlp.lors.safetensors"
    no_factory = cli("eval", lors, "-d", tmp_path / "inputs.safetensors")
    assert no_factory.code == 1 and "--model-factory" in no_factory.err
    result = cli(
        *finetune_args(
            lors,
            tmp_path / "inputs.safetensors",
            tmp_path / "ft.safetensors",
            "--model-factory",
            "factory_models:stacked_mlp",
        )
    )
    assert result.code == 0, result.err
    assert result.json()["after"]["cos"] > result.json()["before"]["cos"]


def routed_data(path: Path, examples: int = 60, eval_examples: int = 16) -> Path:
    """Rows for factory_models.content_routed_experts: expert 2 gets a token only in every third training row
    after the first two (the rows `finetune` looked at to decide what to freeze), the other experts everywhere."""
    from lors_convert.data import roles

    x = torch.randn(examples, 6, 8, generator=torch.Generator().manual_seed(0))
    x[..., 2] = -5
    train = roles(examples, eval_examples)[2]
    for row in train[2::3]:
        x[row, 1, 2] = 5
    save_file({"x": x}, path)
    return path


def test_finetune_trains_experts_that_the_first_examples_do_not_reach(tmp_path, cli):
    """An MoE expert that no token of the first two training examples is routed to is still trained: the rest of
    the data reaches it (on main it was frozen for the whole run, from two examples)."""
    from factory_models import content_routed_experts

    torch.manual_seed(0)
    save_file(content_routed_experts().state_dict(), tmp_path / "moe.safetensors")
    lors = tmp_path / "moe.lors.safetensors"
    assert cli(tmp_path / "moe.safetensors", "-o", lors, "--rank", "2", "--shared", "mean", "--quiet").code == 0
    assert {g.template for g in read_lors(lors)[1].groups} == {f"blocks.{{i}}.experts.{e}.weight" for e in range(3)}
    out = tmp_path / "ft.safetensors"
    factory = ("--model-factory", "factory_models:content_routed_experts")
    result = cli(*finetune_args(lors, routed_data(tmp_path / "x.safetensors"), out, *factory))
    assert result.code == 0, result.err
    assert read_lors(out)[1].finetune["frozen"] == []
    old, new = load_file(lors), load_file(out)
    assert {k for k in old if torch.equal(old[k], new[k])} == set()  # expert 2's factors, shared matrix and biases too


# ---------------------------------------------------------------- multi-process


def two_processes(*args, script: Path | None = None) -> subprocess.CompletedProcess:
    """`lors-convert ARGS` under torchrun with two processes, on the CPU with gloo (even on a one-GPU machine); or
    `script ARGS` under torchrun, for a script that calls lors_convert.cli.main."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join((str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", ""))),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    if script is None:
        command = ["-m", "lors_convert", *args, "--nproc-per-node", "2"]
    else:
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script, *args]
    return subprocess.run([sys.executable, *map(str, command)], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """(LORS file, training text, output, process) of a tiny BERT fine-tuned by two DDP processes with
    --save-every 3: run once, for the DDP test and as the reference of the FSDP test."""
    from lors_convert.cli import main

    tmp = tmp_path_factory.mktemp("two_processes")
    lors = tmp / "bert.lors.safetensors"
    folder = make_model_dir(tmp / "bert", "bert")
    main([str(a) for a in (folder, "-o", lors, "--quiet", "--json", "--rank", "4", "--shared", "mean")])
    data, out = text_file(tmp / "train.txt"), tmp / "ddp.safetensors"
    done = two_processes(*finetune_args(lors, data, out, "--batch-size", "4", "--save-every", "3"))
    return lors, data, out, done


@pytest.mark.slow
def test_two_process_gloo_ddp_keeps_replicas_identical_and_writes_one_output(ddp_run):
    lors, data, out, done = ddp_run
    assert done.returncode == 0, done.stderr[-3000:]
    digests = dict(line.split(": parameter digest ") for line in done.stderr.splitlines() if "digest" in line)
    assert set(digests) == {"rank 0", "rank 1"} and len(set(digests.values())) == 1
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(("ddp", ".ddp"))) == ["ddp.safetensors"]
    meta = read_lors(out)[1].finetune
    assert meta["world_size"] == 2 and not meta["fsdp"] and meta["loss_last"] < meta["loss_first"]
    assert json.loads(done.stdout)["after"]["cos"] > json.loads(done.stdout)["before"]["cos"]


INTERRUPTED = """
import torch
from lors_convert.cli import main

real_step, calls = torch.optim.AdamW.step, []


def interrupted_step(self, *args, **kwargs):  # Ctrl-C during the 5th optimizer step, in every process
    calls.append(1)
    if len(calls) == 5:
        raise KeyboardInterrupt
    return real_step(self, *args, **kwargs)


torch.optim.AdamW.step = interrupted_step
main()
"""


SLOW_RANK_ZERO = """
import datetime
import time

import torch
import torch.distributed as dist

import lors_convert.finetuning
from lors_convert.cli import main

# a collective times out after 15 s here (NCCL's watchdog: 10 minutes), and what rank 0 does alone takes 20 s: writing
# the --save-every state (torch.save) and the output (write_output)
real_init, real_save, real_write = dist.init_process_group, torch.save, lors_convert.finetuning.write_output
dist.init_process_group = lambda *args, **kwargs: real_init(*args, **kwargs, timeout=datetime.timedelta(seconds=15))
torch.save = lambda *args, **kwargs: (time.sleep(20), real_save(*args, **kwargs))[1]
lors_convert.finetuning.write_output = lambda *args, **kwargs: (time.sleep(20), real_write(*args, **kwargs))[1]
main()
"""


@pytest.mark.slow
def test_two_process_gloo_no_process_waits_in_a_collective_while_rank_0_writes(tmp_path, ddp_run):
    """Rank 0 alone writes the --save-every state and the output; the other process must not sit in a collective
    meanwhile (on main it waited in dist.barrier, which times out). The result is the DDP run's."""
    lors, data, ddp_out, ddp_done = ddp_run
    assert ddp_done.returncode == 0, ddp_done.stderr[-3000:]
    out = tmp_path / "slow.safetensors"
    (tmp_path / "slow.py").write_text(SLOW_RANK_ZERO)
    args = finetune_args(lors, data, out, "--batch-size", "4", "--save-every", "3")
    done = two_processes(*args, script=tmp_path / "slow.py")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if "slow" in p.name) == ["slow.py", "slow.safetensors"]
    expected, got = load_file(ddp_out), load_file(out)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_two_process_gloo_fsdp_trains_as_ddp_resumes_and_writes_one_output(tmp_path, ddp_run):
    lors, data, ddp_out, ddp_done = ddp_run
    assert ddp_done.returncode == 0, ddp_done.stderr[-3000:]
    out = tmp_path / "fsdp.safetensors"
    args = finetune_args(lors, data, out, "--batch-size", "4", "--save-every", "3", "--fsdp")
    (tmp_path / "interrupted.py").write_text(INTERRUPTED)
    stopped = two_processes(*args, script=tmp_path / "interrupted.py")  # the state at step 3 gathered from shards
    assert stopped.returncode != 0 and not out.exists() and Path(f"{out}.train-state.pt").is_file()
    done = two_processes(*args, "--resume")  # each process takes its shard of it
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if "fsdp" in p.name) == ["fsdp.safetensors"]
    assert "digest" not in done.stderr  # no replicas: every process holds half of each tensor

    meta = read_lors(out)[1]
    assert meta.finetune["fsdp"] and meta.finetune["world_size"] == 2 and meta.finetune["resumed_at"] == 3
    original, ddp, fsdp = load_file(lors), load_file(ddp_out), load_file(out)
    assert set(fsdp) == set(ddp) == set(original)
    assert all(
        shared_key(g.template) in fsdp and list(fsdp[shared_key(g.template)].shape) == g.shape for g in meta.groups
    )
    for name in fsdp:
        if name.endswith("attention.self.key.bias"):  # the loss ignores it (softmax drops a shift common to all
            continue  # keys): its gradient is rounding noise, which AdamW scales to full steps
        assert (fsdp[name] - ddp[name]).norm() <= 1e-5 * ddp[name].norm(), name
    assert not torch.equal(fsdp[shared_key(meta.groups[0].template)], original[shared_key(meta.groups[0].template)])
    groups = lors_groups(lors_convert.load(out))
    assert len(groups) == len(meta.groups) and all(len(modules) == 3 for modules in groups.values())


TEACHER_BYTES = """
import sys

import lors_convert.finetuning
from lors_convert.cli import main
from lors_convert.runtime import world

real_step_loss = lors_convert.finetuning.step_loss


def step_loss(student, teacher, *args):
    loss = real_step_loss(student, teacher, *args)  # the teacher has run forward
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # a process's shard of an FSDP parameter
    held = sum(local(p).numel() * p.element_size() for p in teacher.parameters())
    full = sum(p.numel() * p.element_size() for p in teacher.parameters())
    print(f"rank {world()[0]}: teacher parameters {held} of {full} bytes", file=sys.stderr)
    return loss


lors_convert.finetuning.step_loss = step_loss
main()
"""


@pytest.mark.slow
def test_two_process_gloo_fsdp_shards_the_teacher_too(tmp_path, ddp_run):
    """Under --fsdp each of 2 processes holds half of the teacher's parameters once it has sharded them, after each
    forward too (on main each held all of it, on the GPU as well)."""
    lors, data, _, _ = ddp_run
    (tmp_path / "teacher_bytes.py").write_text(TEACHER_BYTES)
    args = finetune_args(lors, data, tmp_path / "fsdp.safetensors", "--batch-size", "4", "--fsdp")
    done = two_processes(*args, script=tmp_path / "teacher_bytes.py")
    assert done.returncode == 0, done.stderr[-3000:]
    last = {}  # the two processes share stderr: one's line can run into the other's
    for rank, held, full in re.findall(r"(rank \d+): teacher parameters (\d+) of (\d+) bytes", done.stderr):
        last[rank] = [int(held), int(full)]
    assert set(last) == {"rank 0", "rank 1"}
    for held, full in last.values():
        assert abs(held - full / 2) <= 0.01 * full, (held, full)  # half, up to the padding of odd rows


@pytest.mark.slow
def test_two_process_gloo_fsdp_gradients_equal_ddp_and_one_process(ddp_run):
    done = two_processes(ddp_run[0], script=REPO / "tests" / "fsdp_gradients.py")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "fsdp: largest relative gradient difference" in done.stdout


@pytest.mark.slow
def test_two_process_gloo_ddp_and_fsdp_train_experts_that_one_process_does_not_reach(tmp_path):
    """Under DDP and FSDP an expert that one process's batch reaches and the other's does not gets no gradient in
    the other: each must still take part in the reduction (DDP errs on the next step otherwise; FSDP's
    reduce-scatters no longer match)."""
    from factory_models import content_routed_experts

    from lors_convert.cli import main
    from lors_convert.finetuning import batch_indices

    torch.manual_seed(0)
    save_file(content_routed_experts().state_dict(), tmp_path / "moe.safetensors")
    lors = tmp_path / "moe.lors.safetensors"
    main([str(tmp_path / "moe.safetensors"), "-o", str(lors), "--rank", "2", "--shared", "mean", "--quiet", "--json"])
    data = routed_data(tmp_path / "x.safetensors")
    reaches = lambda rows: any(i >= 2 and i % 3 == 2 for i in rows)  # routed_data's rows for expert 2
    steps = [batch_indices(step, 48, 8, 0) for step in range(6)]
    assert any(reaches(rows[:4]) != reaches(rows[4:]) for rows in steps)  # the case this test is about
    factory = ("--model-factory", "factory_models:content_routed_experts")
    for mode in ((), ("--fsdp",)):
        out = tmp_path / f"ft{len(mode)}.safetensors"
        done = two_processes(*finetune_args(lors, data, out, "--batch-size", "4", *factory), *mode)
        assert done.returncode == 0, done.stderr[-3000:]
        assert read_lors(out)[1].finetune["frozen"] == []
        old, new = load_file(lors), load_file(out)
        assert {k for k in old if torch.equal(old[k], new[k])} == set(), mode


def test_fsdp_needs_several_processes(tmp_path, cli, converted):
    folder, lors, _ = converted("bert")
    refused = cli(*finetune_args(lors, text_file(tmp_path / "train.txt"), tmp_path / "ft.safetensors", "--fsdp"))
    assert refused.code == 1 and "--nproc-per-node" in refused.err and "\n" not in refused.err.strip()
    assert not (tmp_path / "ft.safetensors").exists()


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_minilm_end_to_end(tmp_path, cli, minilm):
    lors = tmp_path / "minilm.lors.safetensors"
    assert cli(minilm, "-o", lors, "--rank", "32", "--quiet", "--json").code == 0
    data = tmp_path / "text.txt"
    data.write_text(
        "\n".join(
            f"Sentence number {i} talks about {w} and {v}." for i, (w, v) in enumerate(zip(WORDS, reversed(WORDS)))
        )
    )
    result = cli(*finetune_args(lors, data, tmp_path / "ft.safetensors", "--steps", "4", "--lr", "1e-3"))
    assert result.code == 0, result.err
    before, after = result.json()["before"], result.json()["after"]
    assert after["cos"] > before["cos"]
    evaluated = cli("eval", tmp_path / "ft.safetensors", "-d", data, "--json")
    assert evaluated.code == 0 and evaluated.json()["examples"] == data.read_text().count("\n") + 1


def test_minutes_stops_training_at_the_time_budget_then_evaluates_and_saves(tmp_path, cli, converted):
    folder, lors, _ = converted("bert")
    data = text_file(tmp_path / "train.txt", 60)
    result = cli(*finetune_args(lors, data, tmp_path / "ft.safetensors", "--minutes", "0.0001", "--steps", "500"))
    assert result.code == 0, result.err
    out = result.json()
    assert out["after"]["examples"] == 12 and (tmp_path / "ft.safetensors").is_file()
    assert read_lors(tmp_path / "ft.safetensors")[1].finetune["steps"] == 1  # stopped after its first step


def test_learning_rate_warms_up_then_decays_to_zero_over_steps_or_time_budget():
    settings = FinetuneConfig(steps=110, warmup=10, lr=1e-3)
    assert learning_rate(settings, 0, 0.0) == pytest.approx(1e-4)  # warm-up: (step + 1) / warmup
    assert learning_rate(settings, 9, 0.0) == pytest.approx(1e-3)
    assert learning_rate(settings, 60, 0.0) == pytest.approx(0.5e-3)  # half way through the decay
    assert learning_rate(settings, 110, 0.0) == pytest.approx(0.0, abs=1e-12)
    # the clock ahead of the steps: the decay follows the time budget
    assert learning_rate(settings, 20, 0.5) == pytest.approx(0.5e-3)
    assert learning_rate(settings, 20, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(settings, 20, 0.05) == learning_rate(settings, 20, 0.0)  # the steps ahead: they decide
    # few steps in a time budget: the warm-up ends at a tenth of it, not after --warmup steps
    assert learning_rate(settings, 2, 0.05) == pytest.approx(0.5e-3)
    assert learning_rate(settings, 3, 0.1) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.1)))


def test_fidelity_of_a_model_against_itself_agrees_everywhere(tmp_path, converted):
    """top1 counts positions where both models predict the same next token: 1 for a model against itself, with
    KL 0; lower for a converted student."""
    from lors_convert.data import Examples
    from lors_convert.evaluate import fidelity, load_student_teacher

    _, lors, _ = converted("llama")
    pair = load_student_teacher(lors)
    examples = Examples(texts=text_file(tmp_path / "t.txt", lines=12).read_text().splitlines())
    same = fidelity(pair.teacher, pair.teacher, examples, pair.tokenizer)
    assert same["top1"] == 1.0 and abs(same["kl"]) < 1e-6
    assert fidelity(pair.student, pair.teacher, examples, pair.tokenizer)["top1"] < 1.0


def test_a_bf16_source_converts_as_its_float32_twin_and_fine_tunes(tmp_path, cli):
    """The source's dtype never decides precision: the same weights as float32 and as bfloat16 safetensors convert
    (calibrated, with --fisher) to the same model within bf16 rounding, and fine-tuning the bf16 source's
    conversion lowers its distance to the teacher."""
    f32 = make_model_dir(tmp_path / "f32", "llama")
    weights = {name: t.bfloat16() for name, t in load_file(f32 / "model.safetensors").items()}
    save_file({name: t.float() for name, t in weights.items()}, f32 / "model.safetensors", metadata={"format": "pt"})
    bf16 = make_model_dir(tmp_path / "bf16", "llama", torch_dtype="bfloat16")
    save_file(weights, bf16 / "model.safetensors", metadata={"format": "pt"})
    text = text_file(tmp_path / "text.txt")
    options = ["--calibrate", text, "--fisher", "--rank", "4", "--calib-samples", "16", "--dtype", "float32", "-q"]
    merged = {}
    for folder in (f32, bf16):
        result = cli(folder, "-o", folder / "m.lors.safetensors", *options)
        assert result.code == 0, result.err
        merged[folder] = merge_lors(lors_convert.load(folder / "m.lors.safetensors")).state_dict()
    for name, weight in merged[f32].items():
        assert (merged[bf16][name] - weight).norm() <= 1e-2 * weight.norm(), name
    tuned = cli(
        "finetune",
        bf16 / "m.lors.safetensors",
        "--data",
        text,
        "-o",
        tmp_path / "ft.safetensors",
        "--steps",
        "60",
        "--json",
    )
    assert tuned.code == 0, tuned.err
    assert tuned.json()["after"]["kl"] < tuned.json()["before"]["kl"]
