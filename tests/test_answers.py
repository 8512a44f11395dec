"""The fact probe's questions and scoring (scripts/llm_answers.py), without a model."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from llm_answers import QUESTIONS, is_right, scored


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
