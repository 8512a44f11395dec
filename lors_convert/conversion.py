"""The conversion pipeline: source checkpoint -> stacks -> shared matrix + truncated residuals -> LORS file.

Streaming: each group's mean is accumulated layer by layer, each residual is factored as it is read, and factors
go straight to the writer. Without calibration memory holds a few matrices plus the shared ones; calibration adds
the dense model and one block's statistics (calibrate.py), the rest waiting on disk.

Every matrix is handled in out x in orientation (a GPT-2 Conv1D weight is transposed on the way in and
its factors on the way out), so that calibration can weight the input side: the objective of layer i is
‖(W_i − Ŵ_i) K_i^{1/2}‖_F with K_i = C_i + λI when calibrated and K_i = I otherwise.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from lors_convert import LorsError, __version__
from lors_convert.calibrate import calibrate_plans, calibration_inputs, refuse_beyond_memory, selection_batches
from lors_convert.checkpoint import (
    SHARD_BYTES,
    SafetensorsWriter,
    TensorSource,
    check_output_path,
    hashing_in_background,
    metadata_bytes,
)
from lors_convert.config import ConvertConfig, dtype_name
from lors_convert.factorize import (
    allocate_ranks,
    as_matrix,
    capped,
    energy_rank,
    head_spectrum,
    metric_energy,
    metric_low_rank,
    metric_spectrum,
    rel_error,
    seed_for,
    tail,
)
from lors_convert.lors_format import (
    SHARED_SEGMENT,
    GroupMeta,
    KeptDense,
    LorsMeta,
    SourceMeta,
    factor_keys,
    header_metadata,
    is_lors_key,
    refuse_lors_input,
    shared_key,
)
from lors_convert.plan import (
    GroupPlan,
    Progress,
    bias_name,
    factor_layer,
    input_energy,
    input_metric,
    mean_shift,
    no_progress,
    output_weighted,
    read_matrix,
)
from lors_convert.runtime import is_causal_lm
from lors_convert.sequential import sequential_factors
from lors_convert.stacks import Stack, find_stacks
from lors_convert.target import choose_reduction

REFIT_MAX_ITERS, REFIT_TOL = 50, 1e-6
# --reduction gives every factored layer at least this fraction of its break-even rank: an error that looks cheap
# to the allocation's objective can still harm the model (scripts/bench_llm.py measures it)
RANK_FLOOR = 0.1


def squared_norm(matrix: torch.Tensor) -> float:
    return torch.linalg.vector_norm(matrix).item() ** 2


def mean_matrix(source: TensorSource, plan: GroupPlan) -> torch.Tensor:
    """The shared matrix in the storage dtype (residuals are taken against what is stored)."""
    total = None
    for i in range(len(plan.stack.names)):
        matrix = read_matrix(source, plan, i)
        total = matrix.clone() if total is None else total.add_(matrix)  # a copy: the first may be the source's
    return stored_shared(total / len(plan.stack.names), plan)


def stored_shared(shared: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
    """A shared matrix rounded to the storage dtype, in which plans hold it (half of float32's memory in bf16)."""
    stored = shared.to(plan.dtype)
    if overflows(shared, stored):
        refuse_overflow([shared_key(plan.stack.template)], plan.dtype)
    return stored


@dataclass
class Spectra:
    """Per layer: squared singular values of the (weighted) residual around S and of the layer itself."""

    shared: list[torch.Tensor] = field(default_factory=list)
    unshared: list[torch.Tensor] = field(default_factory=list)
    norm_sq: float = 0.0


def layer_spectra(
    source: TensorSource, plans: list[GroupPlan], unshared: bool, advance: Callable[[], None]
) -> list[Spectra]:
    """Spectra of each layer's (weighted) residual, and of the layer itself when the unshared form is considered."""
    measured = []
    for plan in plans:
        result = Spectra()
        for i in range(len(plan.stack.names)):
            matrix, k = read_matrix(source, plan, i), input_metric(plan, i)
            result.norm_sq += metric_energy(output_weighted(plan, i, matrix), k)
            if plan.shared:
                result.shared.append(metric_spectrum(output_weighted(plan, i, matrix - plan.shared_matrix), k).cpu())
            if unshared:
                result.unshared.append(metric_spectrum(output_weighted(plan, i, matrix), k).cpu())
            advance()
        measured.append(result)
    return measured


def residual_spectra(source: TensorSource, stacks: list[Stack], progress: Progress = no_progress) -> list[Spectra]:
    """Per stack, the spectra conversion measures for its default S (the mean): what `inspect --plot` draws."""
    plans = [GroupPlan(stack, stack.dtype) for stack in stacks]
    plans = [replace(p, shared_matrix=mean_matrix(source, p)) for p in plans]
    return layer_spectra(source, plans, False, progress("spectra", sum(len(s.names) for s in stacks)))


DECISION_LAYERS = 4  # layers per group sampled to decide, at a fixed rank, whether S lowers the error


def sampled_layers(count: int) -> list[int]:
    """Up to DECISION_LAYERS layer positions spread over the stack (all of them in a short stack)."""
    if count <= DECISION_LAYERS:
        return list(range(count))
    return sorted({round(j * (count - 1) / (DECISION_LAYERS - 1)) for j in range(DECISION_LAYERS)})


def keep_shared_at_rank(source: TensorSource, plan: GroupPlan, seed: int) -> bool:
    """At the ranks given (--rank under auto), whether S lowers the error: the rank-r truncation error of the
    residuals W_i − S against that of the layers W_i themselves, over a sample of the group's layers (the
    leading spectrum only, estimated for large layers: the decision must cost little beside the factoring)."""
    with_s = without_s = 0.0
    for i in sampled_layers(len(plan.stack.names)):
        rank = plan.ranks[i]
        if rank is None:
            continue
        matrix, k = read_matrix(source, plan, i), input_metric(plan, i)
        layer_seed = seed_for(plan.stack.names[i], seed)
        for target, is_residual in ((matrix - plan.shared_matrix, True), (matrix, False)):
            target = output_weighted(plan, i, target)
            values = metric_spectrum(target, k) if k is not None else head_spectrum(target, rank + 1, layer_seed)
            if is_residual:
                with_s += tail([values.cpu()], [rank])
            else:
                without_s += tail([values.cpu()], [rank])
    return with_s <= without_s


def plan_ranks(
    source: TensorSource, plans: list[GroupPlan], settings: ConvertConfig, progress: Progress
) -> list[GroupPlan]:
    """Choose, per group, shared or not and the rank of every layer (None: stored dense).

    --rank N gives every layer rank N (dense where N is past its break-even rank) and, under `auto`, S where
    it lowers the error at those ranks and the group with S is still smaller than dense; --energy the smallest
    rank keeping that energy; --reduction allocates a budget. Under `auto` with --energy or --reduction, a group
    keeps S only where S leaves less error than the same numbers spent on rank without it.
    """
    shapes = [p.out_in for p in plans]
    auto = settings.shared == "auto"
    if settings.rank is not None:
        plans = [
            replace(p, ranks=tuple(capped(min(settings.rank, *shape), *shape) for _ in p.stack.names))
            for p, shape in zip(plans, shapes)
        ]
        if not auto:
            return plans
        advance = progress("choosing S", len(plans))
        decided = []
        for plan in plans:
            # S stays where the group with it is smaller than dense and it lowers the error; otherwise the group
            # goes without S (and stays dense only if it is no smaller without)
            if plan.shared and (plan.kept_dense or not keep_shared_at_rank(source, plan, settings.seed)):
                plan = replace(plan, shared=False, shared_matrix=None)
            decided.append(plan)
            advance()
        return decided
    return ranks_for(plans, measure_spectra(source, plans, settings, progress), settings)


def measure_spectra(
    source: TensorSource, plans: list[GroupPlan], settings: ConvertConfig, progress: Progress
) -> list[Spectra]:
    unshared = settings.shared in ("auto", "none")
    return layer_spectra(source, plans, unshared, progress("spectra", sum(len(p.stack.names) for p in plans)))


def ranks_for(plans: list[GroupPlan], measured: list[Spectra], settings: ConvertConfig) -> list[GroupPlan]:
    """The plans with ranks for --energy or --reduction, from the spectra measured once."""
    shapes = [p.out_in for p in plans]
    auto = settings.shared == "auto"
    spectra = [m.shared if p.shared else m.unshared for p, m in zip(plans, measured)]
    # Under --fisher every error is in one unit, the model output's (for a language model, twice the KL divergence
    # it causes), so the budget goes where their sum falls most; otherwise each group's error is taken relative to
    # its own energy. Relative errors let an LLM's massive activations hide harm: they dominate ‖W K^{1/2}‖, and
    # SmolLM2's down_proj was cut to median rank 1.5 (ppl ×1,000) while it reported 5% error.
    norms = [1.0 if settings.fisher else m.norm_sq for m in measured]
    if settings.energy is not None:
        ranks = [
            [capped(energy_rank(sq, settings.energy), *shape) for sq in layers]
            for layers, shape in zip(spectra, shapes)
        ]
    else:
        dense = sum(p.stack.dense_params for p in plans)
        shared_cost = sum(rows * cols for p, (rows, cols) in zip(plans, shapes) if p.shared)
        budget = int((1 - settings.reduction) * dense) - shared_cost
        if budget < 0 and auto:  # sharing alone is over budget: store every group unshared
            plans = [replace(p, shared=False, shared_matrix=None) for p in plans]
            spectra = [m.unshared for m in measured]
            budget = int((1 - settings.reduction) * dense)
        if budget < 0:
            raise LorsError(
                f"--reduction {settings.reduction:g} is out of reach: the shared matrices alone keep "
                f"{shared_cost / dense:.1%} of the stacked parameters, so at most "
                f"{1 - shared_cost / dense:.3f} can be removed (or use --shared none)"
            )
        ranks = allocate_ranks(spectra, norms, shapes, budget, floor=RANK_FLOOR)
    planned = []
    for plan, group_ranks, shape, m in zip(plans, ranks, shapes, measured):
        plan = replace(plan, ranks=tuple(group_ranks))
        if auto and plan.shared:  # what S's numbers buy as rank instead: the same budget without S
            unshared = allocate_ranks([m.unshared], [m.norm_sq], [shape], plan.lors_params)[0]
            if tail(m.unshared, unshared) < tail(m.shared, group_ranks):
                plan = replace(plan, shared=False, shared_matrix=None, ranks=tuple(unshared))
        planned.append(plan)
    return planned


def refit_shared(source: TensorSource, plan: GroupPlan, seed: int) -> tuple[GroupPlan, list[float]]:
    """Alternate (a) factoring residuals with S fixed and (b) the closed-form S, while the objective falls.

    J(S) = Σ_i tr((D_i − S) K_i (D_i − S)ᵀ) with D_i = W_i − B_i A_i is quadratic in S: with P = Σ D_i K_i,
    Q = Σ K_i (K_i = I in weight space), J(S) = Σ tr(D_i K_i D_iᵀ) − 2⟨P, S⟩ + ⟨S Q, S⟩ and S* = P Q⁻¹.
    Returns the plan with the S of lowest objective, and the objective after every half-step. Layers stored
    dense are exact whatever S is, so they do not enter J.
    """
    factored = [i for i, r in enumerate(plan.ranks) if r is not None]
    history, best = [], (float("inf"), plan.shared_matrix)
    current = plan.shared_matrix
    for _ in range(REFIT_MAX_ITERS if factored else 0):
        constant, p_acc, q_acc = 0.0, 0.0, 0.0
        for i in factored:
            matrix, k = read_matrix(source, plan, i), input_metric(plan, i)
            b, a = metric_low_rank(matrix - current, k, plan.ranks[i], seed_for(plan.stack.names[i], seed))
            rest = (matrix - b.to(plan.dtype).float() @ a.to(plan.dtype).float()).double()
            weighted_rest = rest if k is None else rest @ k
            constant += (weighted_rest * rest).sum().item()
            p_acc = p_acc + weighted_rest
            q_acc = q_acc + (0 if k is None else k)

        def objective(s: torch.Tensor) -> float:
            s = s.double()
            quad = (s.square().sum() * len(factored)) if plan.metrics is None else ((s @ q_acc) * s).sum()
            return constant - 2 * (p_acc * s).sum().item() + quad.item()

        after_factoring = objective(current)
        history.append(after_factoring)
        if after_factoring < best[0]:
            best = (after_factoring, current)
        if len(history) > 1 and after_factoring > history[-2] * (1 + 1e-9):
            break  # an inexact factor step raised the objective: keep the best S seen
        solved = p_acc / len(factored) if plan.metrics is None else torch.linalg.solve(q_acc, p_acc.T).T
        candidate = stored_shared(solved.float(), plan)
        after_solve = objective(candidate)
        if after_solve > after_factoring:  # storage rounding can undo a tiny gain
            break
        history.append(after_solve)
        converged = after_factoring - after_solve <= REFIT_TOL * max(after_factoring, 1e-30)
        current = candidate
        if converged:
            break
    return replace(plan, shared_matrix=best[1]), history


# ---------------------------------------------------------------- the pipeline


def refuse_unconvertible(source: TensorSource) -> None:
    """A LORS checkpoint (or LoRA adapters) would be factored again, and its names would collide with ours."""
    refuse_lors_input(source, source.path)
    reserved = next((name for name in source.info if is_lors_key(name)), None)
    if reserved is not None:
        raise LorsError(
            f"{source.path}: tensor {reserved!r} uses a name the LORS format reserves ('.lora_A', "
            f"'.lora_B' or a '{SHARED_SEGMENT}' segment); rename it before converting"
        )


def plan_conversion(
    source: TensorSource,
    stacks: list[Stack],
    settings: ConvertConfig,
    progress: Progress,
    warnings: list[str],
    scratch: Path,
) -> tuple[list[GroupPlan], dict | None, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]]:
    """Every group's plan (S, shared or not, ranks), the calibration summary, and --sequential's factors; what
    calibration warns about, and why --sequential had to run the whole model per layer, is added to `warnings`."""
    plans = [
        GroupPlan(
            stack, written_dtype(source, settings) or stack.dtype, settings.device, shared=settings.shared != "none"
        )
        for stack in stacks
    ]
    calibration, model, batches = None, None, []
    if settings.calibrate:
        refuse_beyond_memory(source, stacks, settings)
        model, batches, data = calibration_inputs(source, settings)
        if settings.max_ppl_increase and not is_causal_lm(model):
            raise LorsError("--max-ppl-increase needs a language model (its next-token perplexity): use --reduction")
        plans, calibration, unseen = calibrate_plans(source, model, batches, plans, settings, scratch)
        warnings += unseen
        calibration["data"] = data
        if not (settings.sequential or settings.max_ppl_increase):
            model = None  # not needed again: free it before factoring
    advance = progress("shared matrices", sum(len(p.stack.names) for p in plans if p.shared))
    with_mean = []
    for plan in plans:
        if plan.shared:
            plan = replace(plan, shared_matrix=mean_matrix(source, plan))
            for _ in plan.stack.names:
                advance()
        with_mean.append(plan)
    if settings.max_ppl_increase:
        selection = selection_batches(source, settings)
        measured = measure_spectra(source, with_mean, settings, progress)
        reduction, calibration["quality_target"] = choose_reduction(
            source,
            model,
            selection,
            lambda f: ranks_for(with_mean, measured, replace(settings, reduction=f)),
            measured,
            settings,
            progress,
            scratch,
        )
        settings, model = replace(settings, reduction=reduction), None
        plans = ranks_for(with_mean, measured, settings)
    else:
        plans = plan_ranks(source, with_mean, settings, progress)
    if settings.shared == "refit":
        advance = progress("refitting S", len(plans))
        refitted = []
        for plan in plans:
            refitted.append(refit_shared(source, plan, settings.seed)[0])
            advance()
        plans = refitted
    factors = {}
    if settings.sequential:
        factors, note = sequential_factors(source, model, batches, plans, settings, progress)
        warnings += [note] if note else []
    return plans, calibration, factors


def convert(
    source: TensorSource,
    output: Path,
    settings: ConvertConfig,
    *,
    shard_size: int = SHARD_BYTES,
    force: bool = False,
    progress: Progress = no_progress,
) -> tuple[list[Path], LorsMeta]:
    """Write the LORS checkpoint; returns the files written and its description."""
    settings.validate()
    refuse_unconvertible(source)
    check_output_path(output, [source.path, *source.files], force)
    stacks, warnings = find_stacks(source.info, settings.include, settings.exclude)
    if not stacks:
        raise LorsError(
            f"{source.path}: no stacked layers found (no group of >= 2 same-shaped matrices "
            "whose names differ only in a layer index)"
        )
    # calibration's per-layer statistics wait on disk beside the output, in a folder of their own
    with (
        hashing_in_background(source.files) as source_sha256,  # overlaps the work below
        tempfile.TemporaryDirectory(prefix=f".{output.name}.", suffix=".calibration", dir=output.parent) as scratch,
    ):
        plans, calibration, factors = plan_conversion(source, stacks, settings, progress, warnings, Path(scratch))
        factored = [p for p in plans if not p.kept_dense]
        kept = [
            KeptDense(
                p.stack.template,
                p.stack.layers,
                f"LORS would store {p.lors_params:,} numbers, dense {p.stack.dense_params:,}",
            )
            for p in plans
            if p.kept_dense
        ]
        meta = LorsMeta(
            source=SourceMeta(str(source.path.resolve()), [f.name for f in source.files], source.nbytes),
            settings=settings.as_json(),
            groups=[],
            kept_dense=kept,
            warnings=warnings,
            calibration=calibration,
            tool=f"lors-convert {__version__}",
        )
        return write_lors(
            source,
            output,
            factored,
            meta,
            written_dtype(source, settings),
            shard_size,
            factors,
            settings.seed,
            source_sha256,
            progress,
        )


def written_dtype(source: TensorSource, settings: ConvertConfig) -> torch.dtype | None:
    """The dtype every floating tensor of the output is stored in (None: each its source's): --dtype, else the
    source's choice (a quantized GGUF: bfloat16)."""
    return settings.dtype or source.written_dtype


def kept_tensors(
    source: TensorSource, plans: list[GroupPlan], dtype: torch.dtype | None
) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...]]], dict[str, str]]:
    """The layout of every tensor copied as it is (not factored), and the original dtypes --dtype changed."""
    factored = {name for plan in plans for name in plan.stack.names}
    layout, changed = [], {}
    for name, info in source.info.items():
        if name in factored:
            continue
        if dtype is not None and info.dtype.is_floating_point and info.dtype != dtype:
            changed[name] = dtype_name(info.dtype)
        layout.append((name, dtype if name in changed else info.dtype, info.shape))
    return layout, changed


def write_lors(
    source: TensorSource,
    output: Path,
    plans: list[GroupPlan],
    meta: LorsMeta,
    dtype: torch.dtype | None,
    shard_size: int,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    seed: int,
    source_sha256: Callable[[], str],
    progress: Progress,
) -> tuple[list[Path], LorsMeta]:
    """Stream the planned groups and the kept tensors into the output; the header (with the errors measured
    on the way and the source's hash) is written last into space reserved for it."""
    kept_layout, changed = kept_tensors(source, plans, dtype)
    layout = [entry for plan in plans for entry in plan.layout()] + kept_layout
    placeholder = replace(
        meta,
        dtypes=changed,
        groups=[
            group_entry(p, WIDEST_FLOAT, [WIDEST_FLOAT] * len(p.ranks), WIDEST_FLOAT if p.dampings else None)
            for p in plans
        ],
        source=replace(meta.source, sha256="0" * 64),
    )
    with SafetensorsWriter(output, layout, shard_size, metadata_bytes(header_metadata(placeholder))) as writer:
        advance = progress("factoring", sum(len(p.stack.names) for p in plans))
        shifts: dict[str, torch.Tensor] = {}  # bias name -> (W − Ŵ)μ, added to the bias
        groups = [write_group(source, plan, writer, factors, seed, advance, shifts) for plan in plans]
        overflowed = []
        for name, out_dtype, _ in kept_layout:
            tensor = source.get(name)
            if name in shifts:
                tensor = tensor.float() + shifts[name].float().cpu()
            stored = tensor.to(out_dtype)
            if overflows(tensor, stored):
                overflowed.append(name)
            writer.add(name, stored)
        if overflowed:  # raised before the commit: nothing is left on disk
            refuse_overflow(overflowed, dtype)
        meta = replace(meta, dtypes=changed, groups=groups, source=replace(meta.source, sha256=source_sha256()))
        return writer.commit(header_metadata(meta)), meta


def overflows(original: torch.Tensor, rounded: torch.Tensor) -> bool:
    """Whether rounding to a narrower dtype made finite values infinite. A tensor's extremes are found without a
    copy (counting finite values sums booleans in int64: 8 bytes a number, 250 MB for a 32k x 1k embedding); only
    where they are not finite are the values compared one by one."""
    if not rounded.is_floating_point() or rounded.dtype == original.dtype or not rounded.numel():
        return False
    if all(math.isfinite(extreme.item()) for extreme in torch.aminmax(rounded)):
        return False
    return bool((rounded.isinf() & original.isfinite()).any())


def refuse_overflow(names: list[str], dtype: torch.dtype | None) -> None:
    what = f"--dtype {dtype_name(dtype)}" if dtype else "their dtype"
    raise LorsError(f"{what} cannot hold {', '.join(names)}: values would become inf; choose a wider --dtype")


WIDEST_FLOAT = 2.2250738585072014e-308  # a float with the longest JSON form an error can take: reserves room


def group_entry(plan: GroupPlan, rel_err: float, layer_errors: list[float], output_error: float | None) -> GroupMeta:
    stack = plan.stack
    return GroupMeta(
        template=stack.template,
        layers=stack.layers,
        names=stack.names,
        shape=list(stack.shape),
        dtype=dtype_name(stack.dtype),
        ranks=list(plan.ranks),
        dense_params=stack.dense_params,
        lors_params=plan.lors_params,
        rel_error=rel_err,
        shared=plan.shared,
        layer_errors=layer_errors,
        output_error=output_error,
    )


def write_group(
    source: TensorSource,
    plan: GroupPlan,
    writer: SafetensorsWriter,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    seed: int,
    advance: Callable[[], None],
    shifts: dict[str, torch.Tensor],
) -> GroupMeta:
    """Write one group's tensors in `plan.layout()` order and measure what they lose. A layer with a mean input
    μ gets its mean output shift (W − Ŵ)μ in `shifts`, for its bias."""
    stack = plan.stack
    if plan.shared:
        shared = plan.shared_matrix
        stored = (shared.T if plan.transposed else shared).reshape(stack.shape)
        writer.add(shared_key(stack.template), stored)
    err_sq, norm_sq, out_err_sq, out_norm_sq, layer_errors = 0.0, 0.0, 0.0, 0.0, []
    for i, name in enumerate(stack.names):
        matrix = read_matrix(source, plan, i)
        layer_norm_sq = squared_norm(matrix)
        calibrated = plan.dampings is not None
        if calibrated:
            out_norm_sq += input_energy(plan, i, matrix)
        if plan.ranks[i] is None:  # stored dense: only rounding to the storage dtype is lost
            stored = (matrix.T if plan.transposed else matrix).reshape(stack.shape).to(plan.dtype)
            if overflows(matrix, stored):
                refuse_overflow([name], plan.dtype)
            writer.add(name, stored.cpu())
            stored_matrix = as_matrix(stored, plan.device)
            error = matrix - (stored_matrix.T if plan.transposed else stored_matrix)
        else:
            residual = plan.residual(matrix)
            del matrix
            b, a, shift = factors.get(name) or (*factor_layer(plan, i, residual, input_metric(plan, i), seed), None)
            error = residual.addmm_(b.float(), a.float(), alpha=-1)  # in place: one full-size buffer per layer
            a_key, b_key = factor_keys(name)
            if plan.transposed:  # stored W is Wᵀ: (B A)ᵀ = Aᵀ Bᵀ
                a, b = b.T, a.T
            writer.add(a_key, a.contiguous())
            writer.add(b_key, b.contiguous())
        layer_err_sq = squared_norm(error)
        err_sq, norm_sq = err_sq + layer_err_sq, norm_sq + layer_norm_sq
        layer_errors.append(round(rel_error(layer_err_sq, layer_norm_sq), 6))
        if calibrated:
            out_err_sq += input_energy(plan, i, error)
            mean_error = mean_shift(plan, i, error)
            if mean_error is not None:  # the bias takes the mean shift: what is left is the error on centred inputs
                shifts[bias_name(source, name, plan.out_in[0])] = mean_error if shift is None else shift
                out_err_sq -= plan.rows[i] * mean_error.square().sum().item()
        advance()
    # the centred error is a difference of sums, ≥ 0 exactly but not always once rounded (inputs with no spread)
    output_error = rel_error(max(out_err_sq, 0.0), out_norm_sq) if plan.dampings is not None else None
    return group_entry(plan, rel_error(err_sq, norm_sq), layer_errors, output_error)
