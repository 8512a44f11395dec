"""The fact probe (scripts/llm_answers.py): its questions and scoring, without a model, and the models --per-group
scores."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import pytest
import torch
from llm_answers import QUESTIONS, is_right, one_group_models, scored


def test_questions_are_many_and_never_answer_themselves():
    assert len(QUESTIONS) >= 50
    assert len({q for q, _ in QUESTIONS}) == len(QUESTIONS)
    assert not [q for q, accepted in QUESTIONS if not accepted or is_right(q, accepted)]


def test_whole_words_any_case():
    assert is_right("12 + 7 = 19.", ["19", "nineteen"])
    assert is_right("It is Nineteen", ["19", "nineteen"])
    assert not is_right("It is 119", ["19"])
    assert not is_right("Parisian", ["Paris"])
    assert is_right("carbon dioxide (CO2)", ["carbon dioxide"])


def test_a_cut_reply_loses_its_last_word():
    assert not is_right(scored("equal to 100", cut=True), ["100"])
    assert is_right(scored("equal to 100", cut=False), ["100"])


def test_per_group_models_take_one_group_from_the_checkpoint_and_every_other_weight_from_the_original(tmp_path, cli):
    pytest.importorskip("transformers")
    from test_finetune import make_model_dir

    import lors_convert
    from lors_convert.hf import dense_model
    from lors_convert.lors_format import read_lors
    from lors_convert.nn import merge_lors

    folder = make_model_dir(tmp_path / "llama", "llama")
    lors = tmp_path / "m.lors.safetensors"
    assert cli(folder, "-o", lors, "--rank", "2", "--quiet").code == 0
    original, converted = dense_model(folder).state_dict(), merge_lors(lors_convert.load(lors)).state_dict()
    groups = read_lors(lors)[1].groups
    models = one_group_models(folder, lors)
    assert [name for name, _ in models] == [f"{lors} (only {g.template})" for g in groups]
    for (_, make), group in zip(models, groups):
        weights = make().state_dict()
        assert set(weights) == set(original)
        for name, weight in weights.items():
            assert torch.equal(weight, converted[name] if name in group.names else original[name]), name
        assert not all(torch.equal(weights[name], original[name]) for name in group.names)


def test_a_layer_drop_model_kept_by_bench_llm_is_scored_from_its_folder(tmp_path):
    """bench_llm.py --keep writes a layer-drop row's model as a Hugging Face folder; llm_answers.py reads it back
    as it was, with its blocks removed."""
    pytest.importorskip("transformers")
    from bench_llm import keep_model, layer_drop, smollm2_tokenizer
    from llm_answers import load_model
    from test_finetune import make_model_dir, text_file

    folder = make_model_dir(tmp_path / "llama", "llama", layers=3)
    tokenizer = smollm2_tokenizer(folder)
    tokenizer.eos_token = "[SEP]"  # distillation packs lines, ended by it
    dropped_model, dropped = layer_drop(folder, text_file(tmp_path / "t.txt"), tokenizer, 0.34, 0.001, "cpu")
    kept = keep_model(dropped_model, tmp_path / "keep", "0.34:drop=0")
    assert kept == tmp_path / "keep" / "0.34-drop=0" and len(dropped) == 1
    read = load_model(kept).eval()
    assert read.config.num_hidden_layers == len(read.model.layers) == 2
    ids = torch.tensor([[4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(read(ids).logits, dropped_model(ids).logits, atol=1e-5)
