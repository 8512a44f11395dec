"""Fuzz every reader with mutations of the seed files in tests/fuzz_corpus/.

    python scripts/fuzz_readers.py --count 10000          # every reader, 10,000 inputs each
    python scripts/fuzz_readers.py --reader index --count 500 --seed 3
    python scripts/fuzz_readers.py --make-corpus          # rewrite the seed files

Each input is a seed file with a few random byte edits (flip, insert, delete, truncate, splice, a boundary
integer) or, for JSON, one structural edit (a value replaced by a hostile one, a key removed). Reading it
must either succeed or raise LorsError; any other exception is a finding, saved under --findings. A
watchdog kills the run when one input takes longer than --limit seconds (a hang), and the file
`<findings>/current` names the input that was running, as it does after a crash.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import random
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lors_convert import LorsError
from lors_convert.checkpoint import open_checkpoint
from lors_convert.lors_format import expand, read_lors
from lors_convert.report import build_report

CORPUS = ROOT / "tests" / "fuzz_corpus"
BOUNDARY_INTS = [0, 1, -1, 7, 8, 255, 2**31 - 1, 2**31, 2**32, 2**63 - 1, -(2**63), 10**8, 10**12]
HOSTILE_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**64,
    1e308,
    -0.5,
    float("nan"),
    float("inf"),
    "",
    "x",
    "{i}",
    "{0}",
    "float99",
    "int32",
    "complex64",
    "nn",
    "../x",
    "\u0000",
    [],
    {},
    [1, 2],
    [-1, 3],
    [[1]],
    {"a": 1},
    "F32",
    "BF16",
    "model-00001-of-00002.safetensors",
]


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(data) + 1) if rng.random() < 0.5 else rng.randrange(min(len(data), 400) + 1)
        op = rng.randrange(6)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 1:
            del data[pos : pos + rng.randint(1, 64)]
        elif op == 2:
            data[pos:pos] = rng.randbytes(rng.randint(1, 64))
        elif op == 3:
            del data[pos:]
        elif op == 4:
            data[pos : pos + 8] = struct.pack("<q", rng.choice(BOUNDARY_INTS))
        else:
            start = rng.randrange(len(data) + 1)
            data[pos:pos] = data[start : start + rng.randint(1, 256)]
    return bytes(data)


def json_slots(value, out: list) -> list:
    """Every (container, key) in a JSON value, depth first."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        out.append((value, key))
        json_slots(child, out)
    return out


def mutate_json_text(text: str, rng: random.Random) -> str:
    if rng.random() < 0.3:
        return mutate_bytes(text.encode(), rng).decode("utf-8", "replace")
    value = json.loads(text)
    slots = json_slots(value, [])
    if not slots:
        return json.dumps(rng.choice(HOSTILE_VALUES))
    container, key = rng.choice(slots)
    if rng.random() < 0.25:
        del container[key]
    else:
        container[key] = rng.choice(HOSTILE_VALUES)
    return json.dumps(value)


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def read_all(path: Path) -> None:
    source = open_checkpoint(path)
    for name in source.info:
        source.get(name)


def read_lors_all(path: Path) -> None:
    source, meta = read_lors(path)
    build_report(source, meta)
    for _ in expand(source, meta):
        pass


def bytes_input(seed_name: str, out_name: str):
    def make(rng: random.Random, work: Path) -> Path:
        (work / out_name).write_bytes(mutate_bytes((CORPUS / seed_name).read_bytes(), rng))
        return work / out_name

    return make


def index_input(rng: random.Random, work: Path) -> Path:
    for shard in (CORPUS / "sharded").glob("*.safetensors"):
        if not (work / shard.name).exists():
            shutil.copy(shard, work / shard.name)
    index = work / "model.safetensors.index.json"
    index.write_text(mutate_json_text((CORPUS / "sharded" / index.name).read_text(), rng))
    return index


def lors_metadata_input(rng: random.Random, work: Path) -> Path:
    header, data = safetensors_parts(CORPUS / "model.lors.safetensors")
    header["__metadata__"]["lors"] = mutate_json_text(header["__metadata__"]["lors"], rng)
    raw = json.dumps(header).encode()
    (work / "m.lors.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return work / "m.lors.safetensors"


READERS = {
    "safetensors": (bytes_input("model.safetensors", "m.safetensors"), read_all),
    "index": (index_input, read_all),
    "pt-zip": (bytes_input("model_zip.pt", "m.pt"), read_all),
    "pt-legacy": (bytes_input("model_legacy.pt", "m.pt"), read_all),
    "lors-metadata": (lors_metadata_input, read_lors_all),
}


def fuzz(reader: str, count: int, seed: int, findings: Path, limit: float = 10.0) -> list[str]:
    """Run `count` mutated inputs through one reader; returns one line per finding."""
    make, read = READERS[reader]
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for k in range(count):
            rng = random.Random(f"{reader}:{seed}:{k}")
            path = make(rng, work)
            (findings / "current").write_text(f"{reader} seed={seed} input={k}\n")
            faulthandler.dump_traceback_later(limit, exit=True)
            try:
                read(path)
            except LorsError:
                pass
            except Exception as e:  # noqa: BLE001 - any other exception is what we are looking for
                saved = findings / f"{reader}-{seed}-{k}{path.suffix}"
                shutil.copy(path, saved)
                found.append(f"{reader} input {k}: {e.__class__.__name__}: {str(e)[:200]} (saved {saved.name})")
            finally:
                faulthandler.cancel_dump_traceback_later()
    return found


def make_corpus() -> None:
    import torch
    from safetensors.torch import save_file

    from lors_convert.config import ConvertConfig
    from lors_convert.conversion import convert

    torch.manual_seed(0)
    sd = {"emb.weight": torch.randn(6, 4), "norm.weight": torch.ones(4), "ids": torch.arange(3)}
    for i in range(3):
        sd[f"layers.{i}.attn.weight"] = torch.randn(4, 4)
        sd[f"layers.{i}.mlp.weight"] = torch.randn(8, 4).half()
        sd[f"layers.{i}.bias"] = torch.randn(4)
    CORPUS.mkdir(parents=True, exist_ok=True)
    save_file(sd, CORPUS / "model.safetensors")
    torch.save(sd, CORPUS / "model_zip.pt")
    torch.save(sd, CORPUS / "model_legacy.pt", _use_new_zipfile_serialization=False)
    shards = {"model-00001-of-00002.safetensors": sorted(sd)[:6], "model-00002-of-00002.safetensors": sorted(sd)[6:]}
    (CORPUS / "sharded").mkdir(exist_ok=True)
    for name, keys in shards.items():
        save_file({k: sd[k] for k in keys}, CORPUS / "sharded" / name)
    index = {"metadata": {"total_size": "1"}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (CORPUS / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    lors = CORPUS / "model.lors.safetensors"
    lors.unlink(missing_ok=True)
    convert(open_checkpoint(CORPUS / "model.safetensors"), lors, ConvertConfig(rank=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reader", choices=list(READERS), action="append", help="default: all of them")
    parser.add_argument("--count", type=int, default=1000, help="inputs per reader")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=float, default=10.0, help="seconds one input may take")
    parser.add_argument("--findings", type=Path, default=Path("fuzz-findings"))
    parser.add_argument("--make-corpus", action="store_true")
    args = parser.parse_args()
    if args.make_corpus:
        make_corpus()
        return
    faulthandler.enable()
    args.findings.mkdir(parents=True, exist_ok=True)
    all_found = []
    for reader in args.reader or list(READERS):
        start = time.perf_counter()
        found = fuzz(reader, args.count, args.seed, args.findings, args.limit)
        print(
            f"{reader}: {args.count} inputs in {time.perf_counter() - start:.1f} s, {len(found)} findings", flush=True
        )
        all_found += found
    for line in all_found:
        print(line)
    sys.exit(1 if all_found else 0)


if __name__ == "__main__":
    main()
