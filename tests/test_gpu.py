"""The CUDA paths of the real CLI and API on tiny real transformers models, each against what the CPU gives or a
property the CPU tests check. Skipped without a GPU (`scripts/gpu_check.sh tests` runs them on one)."""

from __future__ import annotations

import math

import pytest
import torch

from lors_convert.lors_format import read_lors

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_fisher_calibration_on_the_gpu_lowers_the_output_error(tmp_path, cli):
    from test_calibration import hf_dir, output_error_on

    folder, calib = hf_dir(tmp_path, "llama")
    errors = {}
    for name, options in (("plain", ()), ("fisher", ("--calibrate", calib, "--fisher"))):
        out = tmp_path / f"{name}.lors.safetensors"
        result = cli(folder, "--rank", "2", "--shared", "mean", "-o", out, "--quiet", *options)
        assert result.code == 0, result.err
        errors[name] = output_error_on(folder, out, calib.read_text().splitlines()[:8])
    assert errors["fisher"] < errors["plain"]


def test_compress_on_the_gpu_converts_finetunes_and_scores(tmp_path, cli):
    from test_finetune import make_model_dir, text_file

    folder, data = make_model_dir(tmp_path / "llama", "llama"), text_file(tmp_path / "t.txt", lines=200)
    out = tmp_path / "c.lors.safetensors"
    result = cli("compress", folder, "--calibrate", data, "-o", out, "--finetune-minutes", "0.05", "--quiet", "--json")
    assert result.code == 0, result.err
    table = result.json()
    assert set(table) == {"converted", "fine-tuned"}
    assert all(math.isfinite(v) for row in table.values() for v in row.values() if isinstance(v, float))
    assert read_lors(out)[1].finetune["steps"] > 0


def test_a_lors_model_on_the_gpu_gives_the_cpus_logits(tmp_path, cli):
    from test_finetune import make_model_dir

    import lors_convert

    folder, out = make_model_dir(tmp_path / "llama", "llama"), tmp_path / "m.lors.safetensors"
    assert cli(folder, "--rank", "4", "-o", out, "--quiet").code == 0
    model = lors_convert.load(out).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_cpu = model(ids).logits
        on_gpu = model.to("cuda")(ids.cuda()).logits.cpu()
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-4, rtol=1e-3)
