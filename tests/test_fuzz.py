"""A quick fuzz of every reader: hypothesis picks the mutations of the seed files in tests/fuzz_corpus/.
scripts/fuzz_readers.py runs the same targets for as many inputs as one wants."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lors_convert import LorsError

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_readers.py"
spec = importlib.util.spec_from_file_location("fuzz_readers", SCRIPT)
fuzz_readers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fuzz_readers)


def test_every_seed_file_reads_cleanly():
    for path in (
        fuzz_readers.CORPUS / "model.safetensors",
        fuzz_readers.CORPUS / "model_zip.pt",
        fuzz_readers.CORPUS / "model_legacy.pt",
        fuzz_readers.CORPUS / "sharded",
    ):
        fuzz_readers.read_all(path)
    fuzz_readers.read_lors_all(fuzz_readers.CORPUS / "model.lors.safetensors")


@pytest.mark.parametrize("reader", list(fuzz_readers.READERS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32))
def test_mutated_inputs_raise_only_lors_errors(tmp_path, reader, seed):
    make, read = fuzz_readers.READERS[reader]
    path = make(random.Random(seed), tmp_path)
    try:
        read(path)
    except LorsError:
        pass
