"""--sequential: factor the calibrated layers in depth order, each against the inputs it receives once the layers
before it are converted, block by block where the model's blocks form a chain (each block run a few times per
sample, whatever the depth), else by running the model from its input for each layer."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lors_convert.blocks import StopForward, block_chain, first_tensor
from lors_convert.calibrate import collect_pair, damped, modules_named, paired_inputs
from lors_convert.checkpoint import TensorSource
from lors_convert.config import ConvertConfig
from lors_convert.loading import own_names
from lors_convert.plan import GroupPlan, Progress, factor_layer, read_matrix
from lors_convert.runtime import compute_device

# --sequential's correction is a regression from the drifted inputs to the original ones; with the metric's small
# damping it fits noise in low-energy directions.
SEQUENTIAL_RIDGE = 1.0

Factors = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def sequential_factors(
    source: TensorSource,
    original: torch.nn.Module,
    batches: list[dict],
    plans: list[GroupPlan],
    settings: ConvertConfig,
    progress: Progress,
) -> tuple[Factors, str | None]:
    """--sequential: factor the calibrated layers in layer-index order, each against the inputs it receives once
    the layers before it are converted, so their errors are corrected instead of compounded. Returns the
    factors (B, A) and the bias shift (None for a layer without a bias) by tensor name, for the writer, and a
    note when the model had to be run from its input for each layer (block_chain says why).

    With X the layer's inputs in the original model and X̂ those in the converted one, the target
    T = W (XᵀX̂ + μI)(X̂ᵀX̂ + μI)⁻¹ is the ridge regression of the original outputs X Wᵀ on X̂ (T = W when nothing
    before the layer changed), and B A minimises ‖(T − S − B A) K^{1/2}‖² with K = X̂ᵀX̂ + λI. A layer with a bias
    regresses with an intercept: X and X̂ centred, and the bias shifted by W x̄ − Ŵ x̂̄, which the converted model
    takes at once, so later layers see it.
    """
    device = compute_device()
    converted = copy.deepcopy(original)  # collect() already moved the original to the device
    own = own_names(converted, [n for p in plans for n in p.stack.names])
    todo = [p for p in plans if p.metrics is not None and not p.kept_dense]
    factors: Factors = {}
    if not todo:
        return factors, None
    advance = progress("sequential", sum(len(p.stack.names) for p in todo))
    place = {name: (plan, i) for plan in todo for i, name in enumerate(plan.stack.names)}
    names_at: dict[int, list[str]] = {}  # the names to refit at each layer index, in order
    for name, (plan, i) in place.items():
        names_at.setdefault(plan.stack.layers[i], []).append(name)
    names_at = dict(sorted(names_at.items()))

    def refit(names: list[str], covariances: dict, cross: dict) -> None:
        for name in names:
            plan, i = place[name]
            if name in covariances and plan.ranks[i] is not None:  # else never reached, or exact: factored later
                module = converted.get_submodule(own[name].removesuffix(".weight"))
                factors[name] = refit_layer(source, plan, i, covariances[name], cross[name], module, settings)
            advance()

    chain, why = block_chain(original, [p.stack for p in todo], batches, device)
    if chain is None:
        for names in names_at.values():
            refit(names, *collect_pair(original, converted, names, batches, device))
        return factors, f"--sequential ran the model from its input for each layer (time grows with depth²): {why}"
    block_by_block(original, converted, chain, names_at, refit)
    return factors, None


def refit_layer(
    source: TensorSource,
    plan: GroupPlan,
    i: int,
    moments: torch.Tensor,
    joint: torch.Tensor,
    module: nn.Module,
    settings: ConvertConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Layer i's (B, A, bias shift) from [X̂ 1]ᵀ[X̂ 1] and [X̂ 1]ᵀ[X 1] (sequential_factors' objective); the
    converted model's `module` takes the new weight and bias at once."""
    rows = moments[-1, -1]
    covariance, product = moments[:-1, :-1], joint[:-1, :-1]
    mean_hat, mean = moments[:-1, -1] / rows, joint[-1, :-1] / rows
    centred = plan.means is not None and plan.means[i] is not None
    if centred:
        covariance = covariance - rows * torch.outer(mean_hat, mean_hat)
        product = product - rows * torch.outer(mean_hat, mean)
    k = damped(covariance, settings.damping)
    weights = read_matrix(source, plan, i).cpu().double()
    ridge = damped(covariance, SEQUENTIAL_RIDGE)
    target = torch.linalg.solve(ridge, weights @ (product.T + ridge - covariance), left=False)
    b, a = factor_layer(plan, i, plan.residual(target.float().to(plan.device)), k.to(plan.device), settings.seed)
    approx = b.double().cpu() @ a.double().cpu()
    if plan.shared:
        approx += plan.shared_matrix.double().cpu()
    shift = weights @ mean - approx @ mean_hat if centred else None
    with torch.no_grad():
        module.weight.copy_(approx.T if plan.transposed else approx)
        if shift is not None:
            module.bias.add_(shift.to(module.bias))
    return b, a, shift


# ---------------------------------------------------------------- --sequential, one block after another


@torch.no_grad()
def block_by_block(
    original: nn.Module, converted: nn.Module, chain: tuple, names_at: dict[int, list[str]], refit
) -> None:
    """sequential_factors' loop over a chain of blocks: each block of both models runs on the previous block's
    outputs (kept per batch), so each runs at most three times per batch whatever the depth. refit(names,
    covariances, cross) changes the converted block before its outputs are computed."""
    inputs, blocks, where = chain
    blocks_hat = list(converted.get_submodule(where))
    xs = xs_hat = [args[0] for args, _ in inputs]  # each batch's input to the current block, in each model
    rest = [(args[1:], kwargs) for args, kwargs in inputs]  # masks, positions...: the same for every block
    for layer, (block, block_hat) in enumerate(zip(blocks, blocks_hat)):
        if layer > max(names_at):
            return
        names = names_at.get(layer, [])
        modules = (modules_named(original, names), modules_named(converted, names))
        with paired_inputs((block, block_hat), modules, stop_original=False) as (covariances, cross):
            outputs = []
            for x, x_hat, (args, kwargs) in zip(xs, xs_hat, rest):
                outputs.append(first_tensor(block(x, *args, **kwargs)))
                if names:
                    try:
                        block_hat(x_hat, *args, **kwargs)
                    except StopForward:
                        pass
        if names:
            refit(names, covariances.result(), cross.result())
        if names or xs_hat is not xs:  # the converted block, or its inputs, differ from the original's
            xs_hat = [first_tensor(block_hat(x, *args, **kwargs)) for x, (args, kwargs) in zip(xs_hat, rest)]
        else:
            xs_hat = outputs
        xs = outputs
