"""--sequential: factor the calibrated layers in depth order, each against the inputs it receives once the layers
before it are converted, block by block where the model's blocks form a chain (each block run a few times per
sample, whatever the depth), else by running the model from its input for each layer."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from lors_convert.calibrate import StopForward, collect_pair, damped, modules_named, paired_inputs, run_until_seen
from lors_convert.checkpoint import TensorSource
from lors_convert.loading import block_path, own_names
from lors_convert.plan import ConvertConfig, GroupPlan, Progress, factor_layer, read_matrix
from lors_convert.runtime import call_model, compute_device

# --sequential's correction is a regression from the drifted inputs to the original ones; with the metric's small
# damping it fits noise in low-energy directions (MiniLM at 50%: cos 0.734 vs 0.761 with this ridge, README).
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

    chain, why = block_chain(original, converted, own, todo, batches, device)
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

Chain = tuple[list[tuple[tuple, dict]], list[nn.Module], list[nn.Module]]  # block 0's inputs per batch; the blocks


@torch.no_grad()
def block_by_block(
    original: nn.Module, converted: nn.Module, chain: Chain, names_at: dict[int, list[str]], refit
) -> None:
    """sequential_factors' loop over a chain of blocks: each block of both models runs on the previous block's
    outputs (kept per batch), so each runs at most three times per batch whatever the depth. refit(names,
    covariances, cross) changes the converted block before its outputs are computed."""
    inputs, blocks, blocks_hat = chain
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
                outputs.append(_first(block(x, *args, **kwargs)))
                if names:
                    try:
                        block_hat(x_hat, *args, **kwargs)
                    except StopForward:
                        pass
        if names:
            refit(names, covariances.result(), cross.result())
        if names or xs_hat is not xs:  # the converted block, or its inputs, differ from the original's
            xs_hat = [_first(block_hat(x, *args, **kwargs)) for x, (args, kwargs) in zip(xs_hat, rest)]
        else:
            xs_hat = outputs
        xs = outputs


def _first(output) -> torch.Tensor | None:
    """A block's hidden states: its output, or the first of a tuple of outputs."""
    if type(output) in (tuple, list) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


def block_chain(
    original: nn.Module,
    converted: nn.Module,
    own: dict[str, str],
    todo: list[GroupPlan],
    batches: list[dict],
    device: torch.device,
) -> tuple[Chain | None, str]:
    """The blocks holding the layers to refit, and block 0's inputs on each batch, when they make a chain: one
    list P.0, P.1, ... (block k holding the layers of index k) that the model runs once each, in order, each on
    the previous one's output, with the same other inputs (masks, positions) and no state (caches) for all.
    Then each block's inputs follow from block 0's, in either model, and the blocks can be run one at a time.
    Otherwise (None, why): a residual path around the blocks, decoder blocks reading an encoder's outputs,
    a cache, two lists of blocks. Checked on the first batch, by running the original model once."""
    paths = {
        block_path(own[name], p.stack.template): index
        for p in todo
        for index, name in zip(p.stack.layers, p.stack.names)
    }
    lists = sorted({path.rpartition(".")[0] for path in paths})
    if len(lists) != 1:
        return None, f"its stacked layers sit in {len(lists)} lists of blocks ({', '.join(lists)})"
    if any(path.rpartition(".")[2] != str(index) for path, index in paths.items()):
        return None, f"the layer numbers are not the positions of the blocks in {lists[0]}"
    container = original.get_submodule(lists[0])
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        return None, f"{lists[0]} is a {type(container).__name__}, not a ModuleList"
    blocks = list(container)
    with _without_kv_cache(original):
        why = _chain_breaks(original, blocks, lists[0], {k: v.to(device) for k, v in batches[0].items()})
        if why:
            return None, why
        inputs = []

        def keep(module, args, kwargs):
            inputs.append((args, kwargs))
            raise StopForward

        hook = blocks[0].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            for batch in batches:
                run_until_seen(original, {k: v.to(device) for k, v in batch.items()})
        finally:
            hook.remove()
    if len(inputs) != len(batches):
        return None, f"{lists[0]}.0 did not run on every batch"
    return (inputs, blocks, list(converted.get_submodule(lists[0]))), ""


@contextmanager
def _without_kv_cache(model: nn.Module) -> Iterator[None]:
    """A transformers model that builds no KV cache: blocks handed a cache object are not a chain, and one
    forward does not need it."""
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", False)
    if cached:
        config.use_cache = False
    try:
        yield
    finally:
        if cached:
            config.use_cache = cached


@torch.no_grad()
def _chain_breaks(model: nn.Module, blocks: list[nn.Module], where: str, batch: dict) -> str:
    """Why `blocks` are not a chain on this batch (block_chain), or "" when they are."""
    calls = []  # (block, its args, kwargs and output as they were when it ran, whether it changed its inputs)

    def hooks(k: int) -> list:
        def before(module, args, kwargs):
            calls.append([k, _snapshot(args), _snapshot(kwargs), None, False])

        def after(module, args, kwargs, output):
            calls[-1][3] = _snapshot(output)
            calls[-1][4] = not (_same(args, calls[-1][1]) and _same(kwargs, calls[-1][2]))

        block = blocks[k]
        return [
            block.register_forward_pre_hook(before, with_kwargs=True),
            block.register_forward_hook(after, with_kwargs=True),
        ]

    handles = [handle for k in range(len(blocks)) for handle in hooks(k)]
    try:
        call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    if [call[0] for call in calls] != list(range(len(blocks))):
        return f"the model does not run {where}.0 to {where}.{len(blocks) - 1} once each, in order"
    for k, args, kwargs, output, changed in calls:
        odd = _odd_type((args, kwargs, output))
        if odd:
            return f"{where}.{k} takes or returns an object of type {odd}"
        if not args or not isinstance(args[0], torch.Tensor):
            return f"{where}.{k} takes no tensor as its first positional input"
        if _first(output) is None:
            return f"{where}.{k} returns no tensor first"
        if changed:
            return f"{where}.{k} changes its inputs in place"
        if k and not _same(args[0], _first(calls[k - 1][3])):
            return f"{where}.{k}'s input is not {where}.{k - 1}'s output (a path around the blocks?)"
        if k and not _same((args[1:], kwargs), (calls[0][1][1:], calls[0][2])):
            return f"{where}.{k}'s other inputs differ from {where}.0's"
    return ""


PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _snapshot(value):
    """A copy of tensors (nested in tuples, lists and dicts) as they are now; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if type(value) in (tuple, list):
        return type(value)(map(_snapshot, value))
    if type(value) is dict:
        return {k: _snapshot(v) for k, v in value.items()}
    return value


def _odd_type(value) -> str:
    """The name of a type nested in `value` other than tensors, plain values, tuples, lists and dicts, or ""."""
    if isinstance(value, (torch.Tensor, *PLAIN)):
        return ""
    if type(value) in (tuple, list):
        return next(filter(None, map(_odd_type, value)), "")
    if type(value) is dict:
        return next(filter(None, map(_odd_type, value.values())), "")
    return type(value).__name__


def _same(a, b) -> bool:
    """Equal values, tensors included (same shape, dtype, device and elements)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
            and torch.equal(a, b)
        )
    if type(a) in (tuple, list):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if type(a) is dict:
        return type(b) is dict and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b
