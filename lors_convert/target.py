"""--max-ppl-increase: the largest reduction whose converted language model keeps its perplexity within a factor of
the dense model's, measured on selection lines (never calibration lines, never the held-out lines reports use).

Cheap estimate first: with --fisher the allocation's objective is, to second order, twice the KL divergence the
errors cause, and it is known for every reduction from the spectra measured once. A real measurement (every
layer factored, the model run on the selection lines) calibrates that estimate's scale; a few more bisect on real
perplexity alone.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from lors_convert.checkpoint import TensorSource, open_safetensors_files, write_safetensors
from lors_convert.config import ConvertConfig
from lors_convert.factorize import tail
from lors_convert.loading import own_names
from lors_convert.offload import replaced
from lors_convert.plan import (
    GroupPlan,
    Progress,
    bias_name,
    factor_layer,
    input_metric,
    mean_shift,
    read_matrix,
)

LOWEST, HIGHEST = 0.0, 0.9  # the reductions searched
MEASUREMENTS = 5  # real perplexity measurements at most: each factors every layer once


def perplexity(model: nn.Module, batches: list[dict]) -> float:
    """Token-weighted next-token perplexity over unpadded single-sequence batches."""
    from lors_convert.evaluate import next_token_nll

    nll, tokens = next_token_nll(model, batches, next(model.parameters()).device)
    return math.exp(nll / max(tokens, 1))


@contextmanager
def converted_weights(
    model: nn.Module, source: TensorSource, plans: list[GroupPlan], seed: int, scratch: Path
) -> Iterator[None]:
    """The dense model with every factored layer's weight replaced by S + B A (and its bias as the written file
    has it) while inside, restored on exit. The replacements are factored one layer at a time into a file in
    `scratch` (in the dtype the output stores), which an offloaded model's blocks read as they run: memory holds
    one layer's and one block's weights, not every layer's (a model held whole reads them all in). The weights
    are swapped, not written into: the model may be the one the source's tensors are read from (a GGUF's)."""
    weights = [(plan, i, name) for plan in plans for i, name in enumerate(plan.stack.names)]
    # where calibration kept a layer's mean input, the written file's bias takes its mean output error
    biases = {
        name: bias_name(source, name, plan.out_in[0])
        for plan, i, name in weights
        if plan.means and plan.means[i] is not None
    }
    own = own_names(model, [*(name for _, _, name in weights), *biases.values()])
    factored = [(plan, i, name) for plan, i, name in weights if plan.ranks[i] is not None and name in own]
    layout = []  # in the order approximations() yields
    for plan, _, name in factored:
        layout.append((name, plan.dtype, tuple(model.get_parameter(own[name]).shape)))
        if name in biases:
            layout.append((biases[name], plan.dtype, tuple(source.info[biases[name]].shape)))
    shapes = {name: shape for name, _, shape in layout}

    def approximations() -> Iterator[tuple[str, torch.Tensor]]:
        for plan, i, name in factored:
            residual = plan.residual(read_matrix(source, plan, i))
            b, a = factor_layer(plan, i, residual, input_metric(plan, i), seed)
            low_rank = b.float() @ a.float()
            approx = low_rank + (plan.shared_matrix if plan.shared else 0)
            yield name, (approx.T if plan.transposed else approx).reshape(shapes[name]).to(plan.dtype).cpu()
            if name in biases:
                shift = mean_shift(plan, i, residual - low_rank).float().cpu()
                yield biases[name], (source.get(biases[name]).float() + shift).to(plan.dtype)

    path = scratch / "trial.safetensors"
    files = write_safetensors(path, approximations(), {}, layout=layout, shard_size=sys.maxsize)
    try:
        with replaced(model, open_safetensors_files(path, files), {own[name]: name for name, _, _ in layout}):
            yield
    finally:
        for file in files:
            file.unlink(missing_ok=True)


def choose_reduction(
    source: TensorSource,
    model: nn.Module,
    selection: list[dict],
    planned: Callable[[float], list[GroupPlan]],
    measured: list,
    settings: ConvertConfig,
    progress: Progress,
    scratch: Path,
) -> tuple[float, dict]:
    """The largest reduction in [LOWEST, HIGHEST] whose converted model's perplexity on `selection` is at most
    settings.max_ppl_increase times the dense model's; and what was measured, for the report. `planned(f)` gives
    the plans at reduction f, from `measured`, each group's spectra (convert.Spectra); each measurement's
    approximations wait in `scratch`."""
    dense = perplexity(model, selection)
    allowed = math.log(settings.max_ppl_increase)

    def estimate(reduction: float) -> float:
        chosen = planned(reduction)
        return sum(tail(m.shared if p.shared else m.unshared, p.ranks) for p, m in zip(chosen, measured))

    def solve(predict) -> float:
        """The reduction where `predict` (non-decreasing in it) reaches the allowed log-ratio, by bisection."""
        low, high = LOWEST, HIGHEST
        if predict(high) <= allowed:
            return high
        for _ in range(12):
            middle = (low + high) / 2
            low, high = (middle, high) if predict(middle) <= allowed else (low, middle)
        return low

    tokens = max((n for p in planned(LOWEST) for n in p.rows), default=1)
    scale = 1 / (2 * max(tokens, 1) ** 2)  # Σ over tokens of δᵀGδ / 2 with G and K both summed over tokens
    trials: list[dict] = []
    advance = progress("quality target", MEASUREMENTS)
    met, failed = LOWEST, HIGHEST
    for _ in range(MEASUREMENTS):
        if trials and failed - met < 0.01:
            break
        reduction = min(max(solve(lambda f: scale * estimate(f)), met), failed)
        if trials and not met < reduction < failed:
            reduction = (met + failed) / 2  # the estimate points outside what is known: bisect instead
        with converted_weights(model, source, planned(reduction), settings.seed, scratch):
            ratio = perplexity(model, selection) / dense
        trials.append({"reduction": round(reduction, 4), "ppl_ratio": round(ratio, 4)})
        advance()
        if ratio <= settings.max_ppl_increase:
            met = reduction
        else:
            failed = reduction
        predicted = estimate(reduction)
        if predicted > 0 and ratio > 1:
            scale = math.log(ratio) / predicted  # the estimate's scale, from the real measurement
    return met, {
        "max_ppl_increase": settings.max_ppl_increase,
        "chosen_reduction": round(met, 4),
        "selection_lines": len(selection),
        "dense_ppl": round(dense, 4),
        "trials": trials,
    }
