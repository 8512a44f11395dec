"""Determinism (same input and settings, byte-identical output) and the full-rank round trip."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import bert, rand
from safetensors.torch import load_file, save_file

from lors_convert.checkpoint import open_checkpoint
from lors_convert.conversion import mean_matrix, write_lors
from lors_convert.factorize import use_randomized
from lors_convert.lors_format import LorsMeta, SourceMeta, expand, read_lors
from lors_convert.plan import GroupPlan, no_progress
from lors_convert.stacks import find_stacks


@pytest.mark.parametrize(
    "options",
    [
        ["--rank", "4"],
        ["--reduction", "0.5"],
        ["--energy", "0.8"],
        ["--rank", "3", "--dtype", "bfloat16", "--shard-size", "30kB"],
    ],
)
def test_same_input_and_settings_give_identical_bytes(tmp_path, cli, options):
    sd = {f"layers.{i}.w": rand(256, 192, seed=i) for i in range(3)}  # large enough for the randomized SVD
    assert use_randomized(256, 192, 4)
    sd.update(bert(layers=2, hidden=16, inter=32))
    save_file(sd, tmp_path / "m.safetensors")
    outputs = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        assert cli(tmp_path / "m.safetensors", "-o", folder / "o.safetensors", "--quiet", *options).code == 0
        outputs.append({p.name: p.read_bytes() for p in sorted(folder.iterdir())})
    assert outputs[0] == outputs[1]


def full_rank_lors(source_path, out) -> LorsMeta:
    """Convert through the library's writer at full rank on the factored path (the planner stores such layers
    dense, since full-rank factors are never smaller than the dense layers)."""
    source = open_checkpoint(source_path)
    stacks, _ = find_stacks(source.info)
    plans = []
    for stack in stacks:
        plan = GroupPlan(stack, stack.dtype, ranks=(min(stack.rows, stack.cols),) * len(stack.layers))
        plans.append(replace(plan, shared_matrix=mean_matrix(source, plan)))
    meta = LorsMeta(source=SourceMeta(str(source_path), [], 0), settings={}, groups=[])
    files, meta = write_lors(source, out, plans, meta, None, 10**9, {}, 0, lambda: "0" * 64, no_progress)
    return meta


def test_expand_of_full_rank_convert_is_the_input(tmp_path):
    sd = {f"tall.{i}.w": rand(40, 12, seed=i) for i in range(3)}
    sd.update({f"wide.{i}.w": rand(12, 40, seed=10 + i) * 100 for i in range(3)})
    sd.update({f"conv.{i}.w": rand(8, 3, 3, 3, seed=20 + i) for i in range(2)})
    sd.update({f"conv.{i}.b": rand(8, seed=30 + i) for i in range(2)})
    save_file(sd, tmp_path / "m.safetensors")
    meta = full_rank_lors(tmp_path / "m.safetensors", tmp_path / "m.lors.safetensors")
    assert len(meta.groups) == 3 and all(g.rel_error < 1e-6 and None not in g.ranks for g in meta.groups)
    dense = dict(expand(*read_lors(tmp_path / "m.lors.safetensors")))
    assert set(dense) == set(sd)
    for name, tensor in sd.items():
        assert dense[name].dtype == tensor.dtype and dense[name].shape == tensor.shape
        torch.testing.assert_close(dense[name], tensor, rtol=1e-5, atol=1e-6 * tensor.abs().max().item())


def test_cli_expand_gives_back_what_the_report_promises(tmp_path, cli):
    save_file(bert(layers=4, hidden=16, inter=32), tmp_path / "m.safetensors")
    assert cli(tmp_path / "m.safetensors", "--quiet", "--rank", "16").code == 0  # full rank for 16 x 16
    assert cli("expand", tmp_path / "m.lors.safetensors", "-o", tmp_path / "d.safetensors", "--quiet").code == 0
    original, dense = load_file(tmp_path / "m.safetensors"), load_file(tmp_path / "d.safetensors")
    assert original.keys() == dense.keys()
    for name in original:
        torch.testing.assert_close(dense[name], original[name], rtol=1e-5, atol=1e-6)
