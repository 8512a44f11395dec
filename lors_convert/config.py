"""Every public operation's settings, one config object per verb (torchao's `quantize_(model, config)`):
`ConvertConfig`, `FinetuneConfig`, `CompressConfig`, `ExportConfig`, `InitConfig`, `LorsifyConfig`. Each field is
the CLI option of the same name, whose default the CLI reads from here. No torch at import (the CLI reads these
before it chooses its thread count), only where a dtype is parsed or named."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

from lors_convert import LorsError

if TYPE_CHECKING:
    import torch

SHARED_CHOICES = ("auto", "mean", "refit", "none")
DEFAULT_REDUCTION = 0.5  # when none of --rank, --reduction, --energy, --max-ppl-increase is given
SHARD_SIZE = "5GB"  # outputs above this size are sharded, unless told otherwise
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")  # safetensors holds


def parse_dtype(name: str) -> torch.dtype:
    import torch

    if name not in FLOAT_DTYPES:
        raise LorsError(f"unknown floating dtype {name!r} (try float32, float16 or bfloat16)")
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


SIZE_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}
# Built from the table, so every unit it matches has an entry; ASCII digits only, at most 20 on each side.
SIZE_PATTERN = re.compile(
    r"\s*([0-9]{1,20}(?:\.[0-9]{1,20})?)\s*(" + "|".join(sorted(SIZE_UNITS, key=len, reverse=True)) + r")b?\s*"
)


def parse_size(text: str) -> int:
    """Bytes from "5GB", "500MB", "1.5GiB" or a number."""
    found = SIZE_PATTERN.fullmatch(text.lower())
    if not found:
        raise LorsError(f"cannot read size {text!r} (try 5GB, 500MB or a number of bytes)")
    size = int(Fraction(found.group(1)) * SIZE_UNITS[found.group(2)])  # exact: 1.005kB is 1005 bytes
    if size <= 0:
        raise LorsError(f"shard size must be positive, got {text!r}")
    return size


@dataclass
class ConvertConfig:
    """`convert`'s choices; each field is the CLI option of the same name (`lors-convert convert --help`). At most
    one of `rank`, `reduction`, `energy`, `max_ppl_increase` (none: `reduction` 0.5). `calibrate` takes text files
    (tensor files with `model_factory`); `dtype` a torch dtype or its name."""

    rank: int | None = None
    reduction: float | None = None
    energy: float | None = None
    shared: str = "auto"
    dtype: torch.dtype | str | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    calibrate: list[Path | str] = field(default_factory=list)
    calib_samples: int = 256
    calib_max_length: int = 128
    # Of a causal LM's calibration samples, the share written by the model (sampling.py): plain lines never show
    # the model its chat template; 0.75 kept text of another kind best after distillation (docs/benchmarks.md)
    calib_generated: float = 0.75
    damping: float = 0.01
    sequential: bool = False
    fisher: bool = False
    max_ppl_increase: float | None = None  # choose the reduction: the largest keeping ppl within this factor
    model_factory: str | None = None
    device: str = "cpu"  # where matrices are factored; not part of the output's description

    def validate(self) -> None:
        self.calibrate = [Path(p) for p in self.calibrate]
        if isinstance(self.dtype, str):
            self.dtype = parse_dtype(self.dtype)
        chosen = [
            n
            for n, v in (("--rank", self.rank), ("--reduction", self.reduction), ("--energy", self.energy))
            if v is not None
        ]
        if self.max_ppl_increase is not None:
            chosen.append("--max-ppl-increase")
        if len(chosen) > 1:
            raise LorsError(
                f"choose one of --rank, --reduction, --energy, --max-ppl-increase (got {' and '.join(chosen)})"
            )
        if self.max_ppl_increase is not None and not self.max_ppl_increase > 1:
            raise LorsError(
                f"--max-ppl-increase is a factor above 1 (1.2: at most 20% higher), got {self.max_ppl_increase}"
            )
        if self.max_ppl_increase is not None and not (self.calibrate and self.fisher and self.model_factory is None):
            raise LorsError("--max-ppl-increase needs --calibrate TEXT and --fisher on a language model")
        if not chosen:
            self.reduction = DEFAULT_REDUCTION
        if self.rank is not None and self.rank < 0:
            raise LorsError(f"--rank must be 0 or more, got {self.rank}")
        if self.reduction is not None and not 0 <= self.reduction < 1:
            raise LorsError(f"--reduction must be in [0, 1), got {self.reduction}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise LorsError(f"--energy must be in (0, 1], got {self.energy}")
        if self.shared not in SHARED_CHOICES:
            raise LorsError(f"--shared must be one of {', '.join(SHARED_CHOICES)}, got {self.shared!r}")
        if self.calib_samples < 1 or self.calib_max_length < 1:
            raise LorsError("--calib-samples and --calib-max-length must be at least 1")
        if not 0 <= self.calib_generated <= 1:
            raise LorsError(f"--calib-generated is a fraction in [0, 1], got {self.calib_generated}")
        if self.sequential and not self.calibrate:
            raise LorsError("--sequential needs --calibrate (it recalibrates layer after layer)")
        if self.fisher and not self.calibrate:
            raise LorsError("--fisher needs --calibrate (it measures the output's gradients on those samples)")
        if self.fisher and (self.sequential or self.shared == "refit"):
            raise LorsError("--fisher does not combine with --sequential or --shared refit")
        if not 0 <= self.damping:
            raise LorsError(f"--damping must be 0 or more, got {self.damping}")
        if not 0 <= self.seed < 2**32:
            raise LorsError(f"--seed must be in [0, 2**32), got {self.seed}")

    def as_json(self) -> dict:
        calibration = (
            {
                "calibrate": [str(p) for p in self.calibrate],
                "calib_samples": self.calib_samples,
                "calib_max_length": self.calib_max_length,
                "calib_generated": self.calib_generated,
                "damping": self.damping,
                "sequential": self.sequential,
                "fisher": self.fisher,
                "max_ppl_increase": self.max_ppl_increase,
            }
            if self.calibrate
            else {}
        )
        return {
            "rank": self.rank,
            "reduction": self.reduction,
            "energy": self.energy,
            "shared": self.shared,
            "dtype": dtype_name(self.dtype) if self.dtype else None,
            "include": self.include,
            "exclude": self.exclude,
            "seed": self.seed,
            **calibration,
        }


OBJECTIVES = ("distill", "lm")


# Peak learning rates: LR for encoders; a pretrained LM loses less of its function at the lower LM_LR
# (docs/finetune.md)
LR, LM_LR = 5e-4, 1e-4


@dataclass
class FinetuneConfig:
    """`finetune`'s choices; each field is the CLI option of the same name (`lors-convert finetune --help`)."""

    steps: int = 1000
    batch_size: int = 32
    lr: float | None = None  # None: LM_LR to distil a causal language model, LR otherwise
    warmup: int = 50
    weight_decay: float = 0.0
    max_length: int = 128
    seed: int = 0
    objective: str = "distill"
    eval_examples: int = 256
    save_every: int = 0
    minutes: float = 0.0  # stop after this much training time (0: run every step); evaluation and saving follow
    pack: bool = True  # a causal LM trains on lines packed into full rows (data.packed), not padded ones

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.max_length < 2:
            raise LorsError("--steps and --batch-size must be at least 1, --max-length at least 2")
        if not self.minutes >= 0:
            raise LorsError("--minutes must be 0 or more")
        if self.lr is not None and not self.lr > 0:
            raise LorsError("--lr must be positive")
        if self.warmup < 0 or self.save_every < 0 or self.eval_examples < 2:
            raise LorsError("--warmup and --save-every must be 0 or more, --eval-examples at least 2")
        if self.objective not in OBJECTIVES:
            raise LorsError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")


@dataclass
class CompressConfig:
    """`compress`'s choices; each field is the CLI option of the same name (`lors-convert compress --help`):
    `calibrate` text files (calibration, fine-tuning and the held-out lines), `reduction` or `max_ppl_increase`
    (none: `reduction` 0.5), `finetune_minutes` (0: convert and evaluate), the training's `batch_size` and `lr`,
    calibration's `calib_samples`, `calib_generated` and `fisher`, `seed`, and `shard_size` (bytes, or "5GB")."""

    calibrate: list[Path | str] = field(default_factory=list)
    reduction: float | None = None
    max_ppl_increase: float | None = None
    finetune_minutes: float = 0.0
    batch_size: int = 32
    lr: float | None = None
    # None: four times convert's (the recipe spends minutes where they buy quality), or twice for a causal LM
    # that writes its samples: each of those is up to NEW_TOKENS longer (docs/benchmarks.md, how long the model's
    # texts are)
    calib_samples: int | None = None
    calib_generated: float = 0.75
    fisher: bool = True
    seed: int = 0
    shard_size: int | str = SHARD_SIZE

    def conversion(self, causal_lm: bool = False) -> ConvertConfig:
        """The conversion's settings, for a causal language model or not (the default sample count)."""
        times = 2 if causal_lm and self.calib_generated else 4  # convert's default samples
        settings = ConvertConfig(
            reduction=self.reduction,
            max_ppl_increase=self.max_ppl_increase,
            calibrate=list(self.calibrate),
            calib_samples=times * ConvertConfig.calib_samples if self.calib_samples is None else self.calib_samples,
            calib_generated=self.calib_generated,
            fisher=self.fisher,
            seed=self.seed,
        )
        settings.validate()
        return settings

    def training(self) -> FinetuneConfig:
        if not self.finetune_minutes >= 0:  # in compress's names: finetune's would name options compress lacks
            raise LorsError("--finetune-minutes must be 0 or more")
        settings = FinetuneConfig(  # the state a rerun resumes from is saved every 50 steps
            steps=10**6,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=self.seed,
            minutes=self.finetune_minutes,
            save_every=50,
        )
        settings.validate()
        return settings


@dataclass
class ExportConfig:
    """`dense`: write the plain dense model instead of the LORS one; `architecture`: the Hugging Face folder (or
    GGUF) the checkpoint came from, when the one its metadata records has moved."""

    dense: bool = False
    architecture: str | Path | None = None


@dataclass
class InitConfig:
    """`init`'s choices: one of `rank` (every layer's) and `reduction` (per group, the rank storing this fraction
    fewer stacked numbers); `shared`: a shared matrix per group (the paper's form); `seed` of the initialisation."""

    rank: int | None = None
    reduction: float | None = None
    shared: bool = True
    seed: int = 0

    def validate(self) -> None:
        if (self.rank is None) == (self.reduction is None):
            raise LorsError("choose one of --rank and --reduction")
        if (self.rank is not None and self.rank < 1) or (self.reduction is not None and not 0 < self.reduction < 1):
            raise LorsError("--rank must be at least 1 and --reduction in (0, 1)")


@dataclass
class LorsifyConfig:
    """`lorsify`'s choices: per-layer `rank`, a shared matrix per group (`shared`), `init` ("scratch" or "convert",
    see `lorsify`), and globs over group templates to `include`/`exclude`."""

    rank: int
    shared: bool = True
    init: str = "scratch"
    include: list[str] | None = None
    exclude: list[str] | None = None
