#!/usr/bin/env bash
# Every check that needs a GPU, in one command, on a machine with one and the dev install:
#
#   scripts/gpu_check.sh                 # every part, in this order:
#     tests     the GPU tests (pytest -m gpu)
#     decode    TinyLlama-shaped 1.1B, bf16, LORS (--shared auto, none) against dense: decode ms/token at batch 1
#               and 16, eager and by a static cache (torch.compile reduce-overhead: CUDA graphs); prefill; memory
#     step      one fine-tuning step, LORS against the dense student (TinyLlama-shaped and MiniLM, bf16), eager
#               and with each block compiled; and the layer-level paths (materialised, factored, fused [S; A])
#     minilm    MiniLM at 50% by compress's conversion, MINUTES of fine-tuning, fidelity on held-out lines and
#               fortune passages
#     smollm2   SmolLM2-135M at 20% by compress with MINUTES of fine-tuning: perplexity on held-out lines and
#               fortune passages against dense (a GPU row for docs/benchmarks.md's SmolLM2 table)
#   scripts/gpu_check.sh PART...         # some of them
#   MINUTES=5                            # fine-tuning minutes of minilm and smollm2 [5]
#   DATA=FILE                            # mixed_en.txt [data/mixed_en.txt, the scripts' --data default]
#   DEVICE=cpu PRESET=small MINUTES=0.2  # a smoke run of the whole script on a CPU (bench_inference's small preset)
#
# One log per part under $OUT (or gpu-results/), and summary.txt: each part's exit status and wall time. A part that
# fails does not stop the next. Models and text come from the installed packages and $DATA, or from .gpu/.
#
# For a GPU machine with no network, the inputs travel in three smaller folders:
#   scripts/gpu_check.sh prepare         # on a machine with the packages: writes .gpu/a, .gpu/b, .gpu/c
# then, on the GPU machine, with each folder copied there (what a run leaves in .gpu/ stays for the next), in order
# of what matters most:
#   with .gpu/a:  scripts/gpu_check.sh tests decode step          (the GGUF's first part; step without MiniLM,
#                                                                  which is in .gpu/c)
#   with .gpu/b:  MINUTES=3 scripts/gpu_check.sh smollm2          (the GGUF's second part, gguf's wheel, the text)
#   with .gpu/c:  MINUTES=3 scripts/gpu_check.sh minilm step
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
minutes=${MINUTES:-5}
device=${DEVICE:-cuda}
preset=${PRESET:-tinyllama}
work=/tmp/gpu-check
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
gguf_name=SmolLM2-135M-Instruct.Q4_1.gguf
export DATA=${DATA:-data/mixed_en.txt}

prepare() {
    python3 - <<'PY'
import hashlib, importlib.util, os, shutil, sys
from pathlib import Path

from safetensors.torch import load_file, save_file

sys.path.insert(0, "scripts")
from bench_finetune import fortune_passages, minilm_dir
from bench_llm import smollm2_gguf

gpu, data = Path(".gpu"), Path(os.environ["DATA"])
shutil.rmtree(gpu, ignore_errors=True)
for load in "abc":
    (gpu / load).mkdir(parents=True)
lines = data.read_text(encoding="utf-8").splitlines(keepends=True)
fortunes = "\n".join(fortune_passages()) + "\n"

# c: MiniLM in float16 (90 MB in float32; cast back there), the first 40,000 lines, the fortune passages
(gpu / "c" / "minilm").mkdir()
for file in minilm_dir().iterdir():
    if file.name != "model.safetensors" and file.is_file():
        shutil.copy(file, gpu / "c" / "minilm" / file.name)
tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(minilm_dir() / "model.safetensors").items()}
save_file(tensors, gpu / "c" / "minilm" / "model.safetensors", metadata={"format": "pt"})
(gpu / "c" / "mixed_en.txt").write_text("".join(lines[:40000]), encoding="utf-8")
(gpu / "c" / "fortunes.txt").write_text(fortunes, encoding="utf-8")

# a and b: the SmolLM2 GGUF in two parts; b also the LLM text (the calibration lines and the held-out ones, so
# bench_llm's split gives the same lines as on the whole file), the fortunes, and gguf's wheel (not on the device)
gguf = smollm2_gguf().read_bytes()
cut = 58_000_000
(gpu / "a" / "smollm2.part1").write_bytes(gguf[:cut])
(gpu / "b" / "smollm2.part2").write_bytes(gguf[cut:])
(gpu / "b" / "smollm2.sha256").write_text(hashlib.sha256(gguf).hexdigest() + "\n")
(gpu / "b" / "mixed_en.txt").write_text("".join(lines[:20000] + lines[-1000:]), encoding="utf-8")
(gpu / "b" / "fortunes.txt").write_text(fortunes, encoding="utf-8")
for load in "abc":
    size = sum(f.stat().st_size for f in (gpu / load).rglob("*") if f.is_file())
    print(f"{gpu / load}: {size / 1e6:.1f} MB")
PY
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .gpu/b "gguf==$(python3 -c 'import importlib.metadata as m; print(m.version("gguf"))')"
    du -sh .gpu/*
}

minilm_folder() {  # the float16 copy cast back to float32, as the original is stored, or the installed one
    if [ -d $work/minilm ]; then  # cast by an earlier part
        echo $work/minilm
    elif [ -d .gpu/c/minilm ]; then
        python3 - <<'PY' || return
import os, shutil

from safetensors.torch import load_file, save_file

partial = "/tmp/gpu-check/minilm.partial"  # renamed once whole, so a later part never reads a half-cast copy
shutil.rmtree(partial, ignore_errors=True)
shutil.copytree(".gpu/c/minilm", partial)
tensors = {k: v.float() if v.is_floating_point() else v for k, v in load_file(f"{partial}/model.safetensors").items()}
save_file(tensors, f"{partial}/model.safetensors", metadata={"format": "pt"})
os.rename(partial, "/tmp/gpu-check/minilm")
PY
        echo $work/minilm
    else
        python3 -c 'import sys; sys.path.insert(0, "scripts"); from bench_finetune import minilm_dir; print(minilm_dir())'
    fi
}

text() {  # the prepared text file of this name, or $DATA (its first $2 lines, if given)
    if [ -f ".gpu/$1" ]; then
        echo ".gpu/$1"
    elif [ -n "${2:-}" ]; then
        head -n "$2" "$DATA" >"$work/head-$2.txt" && echo "$work/head-$2.txt"
    else
        echo "$DATA"
    fi
}

fortunes() {  # bench scripts' option for the fortune passages: the prepared file, or (empty) the installed package
    if [ -f ".gpu/$1/fortunes.txt" ]; then echo "$2 .gpu/$1/fortunes.txt"; fi
}

part_tests() {
    # a test module that needs a package the machine lacks is no reason to skip the GPU tests of the others
    python3 -m pytest -q -m gpu --continue-on-collection-errors tests
}

part_decode() {
    python3 scripts/bench_inference.py --preset $preset --device $device --dtype bfloat16 --shared auto,none \
        --decode-batches 1,16 --static-decode --skip-minilm --workdir $work/inference
}

part_step() {  # on decode's synthetic model and its LORS file (decode makes them first when they are missing), and on
    # MiniLM where one is here (.gpu/c or the installed package)
    local tiny=$work/inference/$preset lors=$work/inference/$preset-auto-bfloat16.lors.safetensors minilm pairs
    [ -f $lors ] || part_decode || return
    pairs=(--pair $tiny $lors)
    if minilm=$(minilm_folder 2>/dev/null); then
        python3 -m lors_convert "$minilm" -o $work/minilm.lors.safetensors --reduction 0.5 --quiet --force --device $device
        pairs+=(--pair "$minilm" $work/minilm.lors.safetensors)
    fi
    python3 scripts/bench_step.py "${pairs[@]}" --budget 15 &&
        python3 scripts/bench_lors_forward.py --device $device --mode train --budget 0.2
}

part_minilm() {
    python3 scripts/bench_finetune.py --model "$(minilm_folder)" --data "$(text c/mixed_en.txt 40000)" \
        --calibrate-lines 20000 --minutes "$minutes" $(fortunes c --other)
}

part_smollm2() {
    local gguf=()
    if [ -f .gpu/a/smollm2.part1 ] && [ -f .gpu/b/smollm2.part2 ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target $work/site .gpu/b/gguf-*.whl || return
        export PYTHONPATH=$PYTHONPATH:$work/site
        mkdir -p $work/smollm2 && cat .gpu/a/smollm2.part1 .gpu/b/smollm2.part2 >$work/smollm2/$gguf_name
        if [ "$(sha256sum <$work/smollm2/$gguf_name | cut -d' ' -f1)" != "$(cat .gpu/b/smollm2.sha256)" ]; then
            echo "the GGUF's two parts do not join into the prepared file (sha256 differs)" >&2
            return 1
        fi
        gguf=(--gguf $work/smollm2/$gguf_name)
    fi
    python3 scripts/bench_llm.py "${gguf[@]}" --data "$(text b/mixed_en.txt)" --eval-lines 1000 \
        $(fortunes b --fortunes-file) --rows "0.2:compress=$minutes" --out "$out/smollm2.json"
}

if [ "${1:-}" = prepare ]; then
    prepare
    exit
fi
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(tests decode step minilm smollm2)
for part in "${parts[@]}"; do
    if ! declare -F "part_$part" >/dev/null; then
        echo "usage: scripts/gpu_check.sh [prepare | tests decode step minilm smollm2 ...]" >&2
        exit 2
    fi
done
mkdir -p "$out" $work
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } | tee "$out/summary.txt"
for part in "${parts[@]}"; do
    start=$SECONDS
    echo "== $part (MINUTES=$minutes)" | tee -a "$out/summary.txt"
    "part_$part" 2>&1 | tee "$out/$part.log"
    echo "$part: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s" | tee -a "$out/summary.txt"
done
