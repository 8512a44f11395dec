"""The SVD engine (accuracy, determinism, cost model, devices) and byte-identical output through the real CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from conftest import llama
from safetensors.torch import save_file

from lors_convert.factorize import low_rank, randomized_factors, spectrum, use_randomized


def decaying(rows: int, cols: int, decay: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix with a trained-like spectrum: power-law singular values on a small flat floor."""
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u = torch.linalg.qr(torch.randn(rows, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(cols, k, generator=gen)).Q
    values = (1 + torch.arange(k, dtype=torch.float32)) ** -decay + 0.02
    return (u * values) @ v.T, values


@pytest.mark.parametrize(
    "rows, cols, rank, decay", [(600, 300, 16, 0.6), (300, 600, 32, 0.8), (512, 512, 8, 0.4), (1000, 200, 64, 1.0)]
)
def test_randomized_within_two_percent_of_optimal(rows, cols, rank, decay):
    matrix, values = decaying(rows, cols, decay, seed=rows + rank)
    optimal = values[rank:].square().sum().sqrt()  # Eckart–Young
    exact = torch.linalg.svd(matrix, full_matrices=False)
    exact_err = (matrix - (exact.U[:, :rank] * exact.S[:rank]) @ exact.Vh[:rank]).norm()
    b, a = randomized_factors(matrix, rank, seed=1)
    err = (matrix - b @ a).norm()
    assert torch.isclose(exact_err, optimal, rtol=1e-3)
    assert err <= 1.02 * optimal
    assert b.shape == (rows, rank) and a.shape == (rank, cols)


def test_factors_are_balanced_and_seeded():
    matrix, _ = decaying(400, 300, 0.6, seed=3)
    b1, a1 = randomized_factors(matrix, 16, seed=7)
    b2, a2 = randomized_factors(matrix, 16, seed=7)
    assert torch.equal(b1, b2) and torch.equal(a1, a2)
    torch.testing.assert_close(b1.norm(dim=0), a1.norm(dim=1))  # √σ on each side


def test_spectrum_is_squared_singular_values():
    matrix, _ = decaying(300, 200, 0.7, seed=4)
    torch.testing.assert_close(spectrum(matrix).float(), torch.linalg.svdvals(matrix).square(), rtol=1e-3, atol=1e-6)


def test_cost_model_picks_randomized_for_small_ranks():
    for rows, cols in ((1024, 1024), (2816, 1024), (1024, 2816), (5632, 2048), (4096, 11008)):
        assert use_randomized(rows, cols, 16) and use_randomized(rows, cols, 64)
    assert not use_randomized(512, 512, 400)  # near full rank: the exact route
    assert not use_randomized(64, 64, 8)  # tiny: the exact route costs nothing
    assert not use_randomized(100, 300, 95)  # oversampling would exceed the matrix


def test_low_rank_routes_agree():
    matrix, _ = decaying(300, 200, 0.6, seed=5)
    for rank in (10, 150):
        b, a = low_rank(matrix, rank, seed=0)
        exact = torch.linalg.svd(matrix, full_matrices=False)
        best = (matrix - (exact.U[:, :rank] * exact.S[:rank]) @ exact.Vh[:rank]).norm()
        assert (matrix - b @ a).norm() <= 1.02 * best


def file_hashes(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("option", [["--rank", "16"], ["--reduction", "0.5"]])
def test_cli_output_is_byte_identical_across_runs(tmp_path, cli, option):
    sd = llama(layers=4, hidden=128, inter=320, heads=4, kv_heads=2)
    save_file({k: v.bfloat16() for k, v in sd.items()}, tmp_path / "model.safetensors")
    hashes = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        result = cli(
            tmp_path / "model.safetensors",
            "-o",
            tmp_path / run / "out.safetensors",
            *option,
            "--device",
            "cpu",
            "--shard-size",
            "200KB",
            "-q",
        )
        assert result.code == 0, result.err
        hashes.append(file_hashes(tmp_path / run))
    assert len(hashes[0]) > 1 and hashes[0] == hashes[1]


def child(code: str) -> str:
    """What a fresh interpreter running `code` prints (nothing imported before it)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_converting_a_plain_checkpoint_never_imports_transformers(tmp_path):
    """transformers' import is 0.4 s and 40 MB of a 200M model's 5 s conversion; a checkpoint without a
    Hugging Face folder has no use for it."""
    save_file(llama(layers=2), tmp_path / "model.safetensors")
    code = (
        "import sys; from lors_convert.cli import main\n"
        f"try: main([{str(tmp_path / 'model.safetensors')!r}, '-o', {str(tmp_path / 'o.safetensors')!r}, '-q'])\n"
        "except SystemExit: pass\n"
        "print('transformers' in sys.modules)"
    )
    assert child(code).strip().splitlines()[-1] == "False"
    assert (tmp_path / "o.safetensors").is_file()


def test_checking_rounded_tensors_for_overflow_takes_a_fraction_of_their_memory():
    """The check once counted finite values, which sums booleans in int64: 8 bytes a number, 250 MB on top of a
    32k-row embedding. Peak resident memory before and after the check, with 8M numbers rounded to bf16."""
    code = (
        "import json, resource, torch\n"
        "from lors_convert.conversion import overflows\n"
        "original = torch.randn(8 * 2**20); rounded = original.bfloat16()\n"
        "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "before = peak(); found = overflows(original, rounded)\n"
        "print(json.dumps([found, peak() - before]))"
    )
    found, grown = json.loads(child(code))
    assert found is False
    assert grown < 8 * 2**20 * 2  # a boolean mask or two at most, not int64 copies (64 MB)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_device_cuda_without_cuda_is_one_line_error(tmp_path, cli):
    save_file(llama(layers=2), tmp_path / "model.safetensors")
    result = cli(tmp_path / "model.safetensors", "--device", "cuda")
    assert result.code == 1
    assert "CUDA is not available" in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "model.lors.safetensors").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tmp_path, cli):
    save_file(llama(layers=4, hidden=128, inter=320), tmp_path / "model.safetensors")
    reports = {}
    for device in ("cpu", "cuda"):
        result = cli(
            tmp_path / "model.safetensors",
            "-o",
            tmp_path / f"{device}.safetensors",
            "--rank",
            "16",
            "--device",
            device,
            "-q",
            "--json",
        )
        assert result.code == 0, result.err
        reports[device] = result.json()
    for cpu, gpu in zip(reports["cpu"]["groups"], reports["cuda"]["groups"]):
        assert gpu["rel_error"] == pytest.approx(cpu["rel_error"], rel=1e-2)
