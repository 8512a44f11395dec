#!/usr/bin/env bash
# Every check that needs a GPU, as one command on a machine with one (the device machine lent to some sessions
# can reach no network and takes a working tree of at most 64 MiB, so the inputs travel in .gpu/).
#
#   scripts/gpu_check.sh prepare            # here, with the dev install: writes .gpu/ (about 52 MB, git-ignored)
#   scripts/gpu_check.sh finetune           # there (carry .gpu): GPU tests, LORS/dense step ratio, MiniLM at 50%
#                                           #   fine-tuned for 5 GPU minutes, fidelity on held-out and fortune text
#   scripts/gpu_check.sh inference          # there: TinyLlama-shaped 1.1B decode/prefill/memory, LORS vs dense
#
# Results go to $OUT (or gpu-results/). The teacher travels in float16 (all-MiniLM-L6-v2 is 90 MB in float32)
# and is cast back to float32 there, so the fp16 rounding is all that differs from the original.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1

case "${1:-}" in
prepare)
    python - <<'PY'
import shutil, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, "scripts")
from bench_finetune import fortune_passages, minilm_dir

gpu = Path(".gpu")
shutil.rmtree(gpu, ignore_errors=True)
(gpu / "minilm").mkdir(parents=True)
source = minilm_dir()
for file in source.iterdir():
    if file.name != "model.safetensors" and file.is_file():
        shutil.copy(file, gpu / "minilm" / file.name)
tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(source / "model.safetensors").items()}
save_file(tensors, gpu / "minilm" / "model.safetensors", metadata={"format": "pt"})
data = Path("..") / "shared" / "data" / "mixed_en.txt"
with open(data, encoding="utf-8") as lines, open(gpu / "mixed_en.txt", "w", encoding="utf-8") as head:
    for _, line in zip(range(40000), lines):
        head.write(line)
(gpu / "fortunes.txt").write_text("\n".join(fortune_passages()) + "\n", encoding="utf-8")
print(f"wrote {gpu}: {sum(f.stat().st_size for f in gpu.rglob('*') if f.is_file()) / 1e6:.1f} MB")
PY
    ;;
finetune)
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
    python -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu-tests.log" || true
    python - <<'PY'  # the teacher back in float32, as the original is stored
import shutil

from safetensors.torch import load_file, save_file

shutil.copytree(".gpu/minilm", "/tmp/minilm", dirs_exist_ok=True)
tensors = {k: v.float() if v.is_floating_point() else v for k, v in load_file("/tmp/minilm/model.safetensors").items()}
save_file(tensors, "/tmp/minilm/model.safetensors", metadata={"format": "pt"})
PY
    python scripts/bench_finetune.py --model /tmp/minilm --data .gpu/mixed_en.txt --calibrate-lines 20000 \
        --minutes 5 --other .gpu/fortunes.txt 2>&1 | tee "$out/finetune.log"
    ;;
inference)
    mkdir -p "$out"
    python scripts/bench_inference.py --preset tinyllama --device cuda --shared auto,none --skip-minilm \
        --workdir /tmp/lors-bench-inference 2>&1 | tee "$out/inference.log"
    ;;
*)
    echo "usage: scripts/gpu_check.sh prepare|finetune|inference" >&2
    exit 2
    ;;
esac
