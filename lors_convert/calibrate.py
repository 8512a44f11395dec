"""Calibration: run the original model over sample inputs and accumulate each stacked layer's input second
moment C_i = X_iᵀX_i and input sum X_iᵀ1 (float64, streaming), so residuals can be factored where the inputs
actually live; with --fisher also the second moment of the output's gradients at each layer's output. Then the
glue to conversion: the plans' metrics K_i (damped), means and output weights, and --sequential's factors."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

import torch
from torch import nn

from lors_convert import LorsError
from lors_convert.checkpoint import TensorSource
from lors_convert.factorize import sqrt_psd
from lors_convert.loading import block_path, layer_module, own_names
from lors_convert.nn import is_conv1d
from lors_convert.plan import GroupPlan, Progress, Settings, bias_name, factor_layer, read_matrix
from lors_convert.runtime import call_model, compute_device
from lors_convert.stacks import Stack


@dataclass
class Calibration:
    covariances: dict[str, torch.Tensor]  # tensor name -> C (input dim x input dim, float64, on CPU)
    sums: dict[str, torch.Tensor]  # tensor name -> Xᵀ1 (input dim, float64): the mean input is sums / rows
    rows: dict[str, int]  # tensor name -> input rows (tokens) seen; 0 for a hooked layer never reached
    transposed: set[str]  # names stored as in x out (GPT-2 Conv1D): their input side is dim 0


class _Stop(Exception):
    """Raised by a hook once every module of interest has seen its input: the rest of the forward is not needed."""


def _module_for(model: nn.Module, name: str, own: dict[str, str]) -> nn.Module | None:
    """The Linear (or GPT-2 Conv1D) module whose `.weight` is this checkpoint tensor, if any."""
    found = layer_module(model, name, own)
    return found[1] if found else None


FLUSH_BYTES = 2**23  # inputs buffered per module before one product: big enough for an efficient matmul


class Moments:
    """Streaming Σ XᵀY per name: products in float32 over blocks of rows (one sequence alone is too short for an
    efficient matmul), sums in float64."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        pending = self.pending.setdefault(name, [])
        pending.append((x, y))
        if sum(x.numel() for x, _ in pending) * 4 >= FLUSH_BYTES:
            self._flush(name)

    def _flush(self, name: str) -> None:
        pairs = self.pending.pop(name, [])
        if not pairs:
            return
        xs = torch.cat([x for x, _ in pairs])
        ys = xs if all(x is y for x, y in pairs) else torch.cat([y for _, y in pairs])
        product = (xs.T @ ys).double()
        self.sums[name] = self.sums[name].add_(product) if name in self.sums else product

    def result(self) -> dict[str, torch.Tensor]:
        for name in list(self.pending):
            self._flush(name)
        return {name: total.cpu() for name, total in self.sums.items()}


def _flat_input(args: tuple) -> torch.Tensor:
    # A copy: the model may later change its activations in place, and these are kept for a while.
    return args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32, copy=True)


def with_ones(x: torch.Tensor) -> torch.Tensor:
    """[X 1]: its products [X 1]ᵀ[Y 1] hold XᵀY, the column sums of X and Y, and the row count."""
    return torch.cat([x, x.new_ones(len(x), 1)], dim=1)


def _modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    own = own_names(model, names)
    return {name: _module_for(model, name, own) for name in names}


def _hook_inputs(root: nn.Module, modules: dict[str, nn.Module], record, stop: bool = True) -> list:
    """Forward pre-hooks calling record(name, inputs) on `modules`; with `stop`, _Stop after the last one.

    Each forward of `root` starts with none seen: one that skipped a module (a branch not taken) must not leave the
    names it saw behind, or the next forward would stop before reaching the rest.
    """
    fired = set()

    def hook_for(name: str):
        def hook(module, args):
            record(name, _flat_input(args))
            fired.add(name)
            if stop and len(fired) == len(modules):
                raise _Stop

        return hook

    restart = root.register_forward_pre_hook(lambda module, args: fired.clear())
    return [restart] + [module.register_forward_pre_hook(hook_for(name)) for name, module in modules.items()]


def _run_until_seen(model: nn.Module, batch: dict) -> None:
    try:
        call_model(model, batch)
    except _Stop:
        pass


@contextmanager
def _paired_inputs(
    roots: tuple[nn.Module, nn.Module], modules: tuple[dict, dict], stop_original: bool = True
) -> Iterator[tuple[Moments, Moments]]:
    """Hooks pairing each named module's input in the original (roots[0], run first on each batch) with its input
    in the converted model (roots[1]); yields the Moments of [X̂ 1]ᵀ[X̂ 1] and [X̂ 1]ᵀ[X 1] (with_ones)."""
    original_inputs: dict[str, torch.Tensor] = {}
    covariances, cross = Moments(), Moments()

    def keep(name: str, x: torch.Tensor) -> None:
        original_inputs[name] = x

    def accumulate(name: str, x_hat: torch.Tensor) -> None:
        x_hat, x = with_ones(x_hat), with_ones(original_inputs.pop(name))
        covariances.add(name, x_hat, x_hat)
        cross.add(name, x_hat, x)

    hooks = _hook_inputs(roots[0], modules[0], keep, stop_original) + _hook_inputs(roots[1], modules[1], accumulate)
    try:
        yield covariances, cross
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def collect_pair(
    original: nn.Module, converted: nn.Module, names: list[str], batches: list[dict], device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """For `names` (Linear/Conv1D weights), run both models on the same batches, each only as far as those
    modules, and return [X̂ 1]ᵀ[X̂ 1] and [X̂ 1]ᵀ[X 1] per name (float64, CPU), where X are the inputs in the
    original model and X̂ those in the converted one (with_ones)."""
    modules = (_modules(original, names), _modules(converted, names))
    with _paired_inputs((original, converted), modules) as (covariances, cross):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            _run_until_seen(original, batch)
            _run_until_seen(converted, batch)
    return covariances.result(), cross.result()


@torch.no_grad()
def collect(model: nn.Module, stacks: list[Stack], batches: list[dict], device: torch.device) -> Calibration:
    """Hook every stacked Linear/Conv1D, run the batches, and return C_i per tensor name."""
    covariances, transposed, hooks, hooked = Moments(), set(), [], []

    def accumulate(name: str):
        def hook(module, args):
            x = with_ones(_flat_input(args))
            covariances.add(name, x, x)

        return hook

    own = own_names(model, [name for stack in stacks for name in stack.names])
    for stack in stacks:
        found = [_module_for(model, name, own) for name in stack.names]
        if any(module is None for module in found):
            continue  # calibrate whole groups only; this one stays in weight space
        hooked += stack.names
        for name, module in zip(stack.names, found):
            hooks.append(module.register_forward_pre_hook(accumulate(name)))
            if is_conv1d(module):  # y = x @ W + b: the input side is dim 0
                transposed.add(name)
    if not hooks:
        raise LorsError("calibration found no stacked nn.Linear layers in the model to measure")
    model.to(device).eval()
    try:
        for batch in batches:
            call_model(model, {k: v.to(device) for k, v in batch.items()})
    finally:
        for hook in hooks:
            hook.remove()
    moments = covariances.result()
    return Calibration(
        covariances={name: m[:-1, :-1] for name, m in moments.items()},
        sums={name: m[:-1, -1] for name, m in moments.items()},
        rows={name: 0 for name in hooked} | {name: round(m[-1, -1].item()) for name, m in moments.items()},
        transposed=transposed,
    )


def output_fisher(model: nn.Module, stacks: list[Stack], batches: list[dict], device: torch.device, seed: int) -> dict:
    """G_i = E[g gᵀ] per stacked layer, summed over tokens, g the gradient at the layer's output of a random
    scalar of the model's output, so that an output error δ moves that output by about δᵀ G δ.

    A language model (logits and token ids): the scalar is the next-token loss of labels sampled from the
    model's own distribution, so G is the Fisher of the next-token distributions, and δᵀ G δ / 2 the KL
    divergence an error δ causes (E_y[∇ log p(y) ∇ log p(y)ᵀ] = Jᵀ(diag p − p pᵀ)J, summed over the positions
    each layer output reaches). Any other model: its unit-norm mean-pooled final hidden state (what fidelity's
    cosine compares) against a random probe u, E[Jᵀu uᵀJ] = JᵀJ. Returns out x out matrices (float64, CPU)."""
    from lors_convert.evaluate import mean_pool
    from lors_convert.runtime import run

    moments, hooks = Moments(), []

    def keep_gradient(name: str):
        def accumulate(grad: torch.Tensor) -> None:
            flat = grad.reshape(-1, grad.shape[-1]).float()
            moments.add(name, flat, flat)

        def hook(module, args, output):
            output.requires_grad_()  # the weights are frozen: only the layers' outputs need gradients
            output.register_hook(accumulate)

        return hook

    own = own_names(model, [name for stack in stacks for name in stack.names])
    model.to(device).eval().requires_grad_(False)
    for stack in stacks:
        for name in stack.names:
            module = _module_for(model, name, own)
            if module is not None:
                hooks.append(module.register_forward_hook(keep_gradient(name)))
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                logits, hidden = run(model, batch)
                mask = batch.get("attention_mask")
                if logits is not None and "input_ids" in batch:
                    sampled_label_loss(logits, mask, generator).backward()
                    continue
                output = nn.functional.normalize(mean_pool(hidden, mask), dim=-1)
                probe = torch.randn(output.shape, generator=generator).to(device)
                (output * probe).sum().backward()
    finally:
        for hook in hooks:
            hook.remove()
    return moments.result()


def sampled_label_loss(logits: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Σ_t −log p(y_t) over the unmasked positions, y_t drawn from the model's own p(· | x_≤t): its gradient's
    second moment is the Fisher information of the next-token distributions (true labels would give the
    empirical Fisher, which is biased where the model is wrong)."""
    flat = logits.float().flatten(0, -2)
    probabilities = flat.detach().softmax(-1).cpu()
    labels = torch.multinomial(probabilities, 1, generator=generator)[:, 0].to(flat.device)
    losses = nn.functional.cross_entropy(flat, labels, reduction="none")
    return (losses * mask.flatten()).sum() if mask is not None else losses.sum()


# ---------------------------------------------------------------- calibrating the plans

# --sequential's correction is a regression from the drifted inputs to the original ones; with the metric's small
# damping it fits noise in low-energy directions (MiniLM at 50%: cos 0.734 vs 0.761 with this ridge, README).
SEQUENTIAL_RIDGE = 1.0
# --fisher's G is damped more than the inputs' K: its estimate from one probe per sample is noisy (MiniLM at 50%,
# text of another kind: cos 0.737 / 0.740 / 0.724 at 0.01 / 0.1 / 1, README)
FISHER_DAMPING = 0.1


def calibration_inputs(source: TensorSource, settings: Settings) -> tuple[torch.nn.Module, list[dict], str]:
    """The dense model with the source's weights, the calibration batches, and the words that say which lines
    (or rows) they are."""
    from lors_convert.data import tensor_batches, text_batches
    from lors_convert.hf import architecture_dir, dense_model, load_tokenizer

    model = dense_model(source.path, settings.model_factory)
    if settings.model_factory:
        return model, *tensor_batches(settings.calibrate, settings.calib_samples, settings.seed)
    tokenizer = load_tokenizer(architecture_dir(source.path))
    return model, *text_batches(
        tokenizer, settings.calibrate, settings.calib_samples, settings.calib_max_length, settings.seed
    )


SELECTION_LINES = 128  # lines --max-ppl-increase measures perplexity on (their spread on SmolLM2 is not measured yet)


def selection_batches(source: TensorSource, settings: Settings) -> list[dict]:
    """The lines --max-ppl-increase chooses on: the calibration pool's next picks after the calibration samples."""
    from lors_convert.data import text_batches
    from lors_convert.hf import architecture_dir, load_tokenizer

    tokenizer = load_tokenizer(architecture_dir(source.path))
    batches, _ = text_batches(
        tokenizer, settings.calibrate, SELECTION_LINES, settings.calib_max_length, settings.seed, settings.calib_samples
    )
    if len(batches) < SELECTION_LINES // 4:
        raise LorsError(
            f"--max-ppl-increase needs {SELECTION_LINES} lines beside the {settings.calib_samples} calibration samples "
            f"and the held-out fifth; {', '.join(map(str, settings.calibrate))} has only {len(batches)} left"
        )
    return batches


def damped(covariance: torch.Tensor, damping: float) -> torch.Tensor:
    """K = C + λI with λ relative to the mean input energy, so rank-deficient covariances still work."""
    return covariance + damping * covariance.diagonal().mean() * torch.eye(len(covariance), dtype=covariance.dtype)


def calibrate_plans(
    source: TensorSource, model: torch.nn.Module, batches: list[dict], plans: list[GroupPlan], settings: Settings
) -> tuple[list[GroupPlan], dict, list[str]]:
    """The plans with their calibration (per layer: each saw its own number of tokens), the calibration's summary,
    and warnings about stacked layers that saw no calibration tokens (experts no token was routed to)."""
    stacks, device = [p.stack for p in plans], compute_device()
    calibration = collect(model, stacks, batches, device)
    fisher = output_fisher(model, stacks, batches, device, settings.seed) if settings.fisher else {}
    calibrated, warnings = [], []
    for plan in plans:
        names, template = plan.stack.names, plan.stack.template
        rows = tuple(calibration.rows.get(name, 0) for name in names)
        if any(rows):
            plan = calibrated_plan(source, plan, calibration, rows, settings.damping)
            unseen = [str(layer) for layer, n in zip(plan.stack.layers, rows) if not n]
            if unseen:
                warnings.append(
                    f"{template}: layer{'s' * (len(unseen) > 1)} {', '.join(unseen)} saw no calibration tokens; "
                    "factored with its group's mean inputs"
                )
            if all(name in fisher for name in names):  # layers the output does not depend on have no G
                roots = (sqrt_psd(damped(fisher.pop(name), FISHER_DAMPING)).to(plan.device) for name in names)
                plan = replace(plan, output_roots=tuple(roots))
        elif names[0] in calibration.rows:
            warnings.append(f"{template}: no layer saw calibration tokens; factored in weight space")
        calibrated.append(plan)
    summary = {
        "samples": len(batches),
        "tokens": max(calibration.rows.values(), default=0),  # input rows (tokens, patches) of the busiest layer
        "groups": sum(p.metrics is not None for p in calibrated),
    }
    return calibrated, summary, warnings


def calibrated_plan(
    source: TensorSource, plan: GroupPlan, calibration: Calibration, rows: tuple[int, ...], damping: float
) -> GroupPlan:
    """A group's plan with each layer's C_i, K_i, mean input μ_i (where a bias takes the mean shift) and row count
    n_i. A layer that saw no tokens gets the mean K of the group's other layers, C = 0, and no μ."""
    names = plan.stack.names
    plan = replace(plan, transposed=names[0] in calibration.transposed)
    covariances = [calibration.covariances.pop(name, None) for name in names]
    means = tuple(
        calibration.sums[name] / n if n and bias_name(source, name, plan.out_in[0]) else None
        for name, n in zip(names, rows)
    )
    metrics = [
        None if c is None else damped(c if m is None else c - n * torch.outer(m, m), damping)
        for c, m, n in zip(covariances, means, rows)
    ]
    seen = [m for m in metrics if m is not None]
    fallback = sum(seen) / len(seen)
    return replace(
        plan,
        covariances=tuple(torch.zeros_like(fallback) if c is None else c for c in covariances),
        metrics=tuple((fallback if m is None else m).to(plan.device) for m in metrics),
        means=means,
        rows=rows,
    )


Factors = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def sequential_factors(
    source: TensorSource,
    original: torch.nn.Module,
    batches: list[dict],
    plans: list[GroupPlan],
    settings: Settings,
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
    settings: Settings,
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
        modules = (_modules(original, names), _modules(converted, names))
        with _paired_inputs((block, block_hat), modules, stop_original=False) as (covariances, cross):
            outputs = []
            for x, x_hat, (args, kwargs) in zip(xs, xs_hat, rest):
                outputs.append(_first(block(x, *args, **kwargs)))
                if names:
                    try:
                        block_hat(x_hat, *args, **kwargs)
                    except _Stop:
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
            raise _Stop

        hook = blocks[0].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            for batch in batches:
                _run_until_seen(original, {k: v.to(device) for k, v in batch.items()})
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
