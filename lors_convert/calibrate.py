"""Calibration: run the original model over sample inputs and accumulate each stacked layer's input second
moment C_i = X_iᵀX_i and input sum X_iᵀ1 (float64, streaming), so residuals can be factored where the inputs
actually live; with --fisher also the second moment of the output's gradients at each layer's output. Then the
glue to conversion: the plans' metrics K_i (damped), means and output weights."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

import torch
from torch import nn

from lors_convert import LorsError
from lors_convert.checkpoint import TensorSource
from lors_convert.factorize import psd_factor
from lors_convert.loading import layer_module, own_names
from lors_convert.nn import is_conv1d
from lors_convert.plan import ConvertConfig, GroupPlan, bias_name
from lors_convert.runtime import call_model, compute_device, fast_precision, is_causal_lm
from lors_convert.sampling import sampled_labels, with_model_written
from lors_convert.stacks import Stack


@dataclass
class Calibration:
    covariances: dict[str, torch.Tensor]  # tensor name -> C (input dim x input dim, float64, on CPU)
    sums: dict[str, torch.Tensor]  # tensor name -> Xᵀ1 (input dim, float64): the mean input is sums / rows
    rows: dict[str, int]  # tensor name -> input rows (tokens) seen; 0 for a hooked layer never reached
    transposed: set[str]  # names stored as in x out (GPT-2 Conv1D): their input side is dim 0
    fisher: dict[str, torch.Tensor]  # tensor name -> G (output dim x output dim, float64, CPU); {} without --fisher


class StopForward(Exception):
    """Raised by a hook once every module of interest has seen its input: the rest of the forward is not needed."""


def _module_for(model: nn.Module, name: str, own: dict[str, str]) -> nn.Module | None:
    """The Linear (or GPT-2 Conv1D) module whose `.weight` is this checkpoint tensor, if any."""
    found = layer_module(model, name, own)
    return found[1] if found else None


FLUSH_BYTES = 2**23  # inputs buffered per module before one product: big enough for an efficient matmul


class Moments:
    """Streaming Σ XᵀY per name: products in float32 (bf16 for bf16 values) over blocks of rows (one sequence
    alone is too short for an efficient matmul), sums in float64."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        # the last blocks multiplied and their product: names given the very same blocks (q, k and v read one
        # input) share one product
        self.last: tuple[list, torch.Tensor] | None = None

    def add(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        pending = self.pending.setdefault(name, [])
        pending.append((x, y))
        if sum(x.numel() * x.element_size() for x, _ in pending) >= FLUSH_BYTES:
            self._flush(name)

    def _flush(self, name: str) -> None:
        pairs = self.pending.pop(name, [])
        if not pairs:
            return
        last = self.last[0] if self.last else []
        if len(last) == len(pairs) and all(a is c and b is d for (a, b), (c, d) in zip(pairs, last)):
            product = self.last[1]
        else:
            xs = torch.cat([x for x, _ in pairs])
            symmetric = all(x is y for x, y in pairs)
            product = (gram(xs) if symmetric else xs.T @ torch.cat([y for _, y in pairs])).double()
            self.last = pairs, product
        self.sums[name] = self.sums[name].add_(product) if name in self.sums else product.clone()

    def result(self) -> dict[str, torch.Tensor]:
        for name in list(self.pending):
            self._flush(name)
        return {name: total.cpu() for name, total in self.sums.items()}


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx from two column halves, the lower block the transpose of the upper: a quarter less work than xᵀx, and
    measured 25-35% faster for 576 and 1537 columns on a 2-core CPU (more blocks were no faster)."""
    half = x.shape[1] // 2
    left, right = x[:, :half], x[:, half:]
    top = torch.cat([left.T @ left, left.T @ right], dim=1)
    bottom = torch.cat([top[:, half:].T, right.T @ right], dim=1)
    return torch.cat([top, bottom])


def _flat_input(args: tuple) -> torch.Tensor:
    # A copy: the model may later change its activations in place, and these are kept for a while.
    return args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32, copy=True)


def with_ones(x: torch.Tensor) -> torch.Tensor:
    """[X 1]: its products [X 1]ᵀ[Y 1] hold XᵀY, the column sums of X and Y, and the row count."""
    return torch.cat([x, x.new_ones(len(x), 1)], dim=1)


def modules_named(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    own = own_names(model, names)
    return {name: _module_for(model, name, own) for name in names}


def _hook_inputs(root: nn.Module, modules: dict[str, nn.Module], record, stop: bool = True) -> list:
    """Forward pre-hooks calling record(name, inputs) on `modules`; with `stop`, StopForward after the last one.

    Each forward of `root` starts with none seen: one that skipped a module (a branch not taken) must not leave the
    names it saw behind, or the next forward would stop before reaching the rest.
    """
    fired = set()

    def hook_for(name: str):
        def hook(module, args):
            record(name, _flat_input(args))
            fired.add(name)
            if stop and len(fired) == len(modules):
                raise StopForward

        return hook

    restart = root.register_forward_pre_hook(lambda module, args: fired.clear())
    return [restart] + [module.register_forward_pre_hook(hook_for(name)) for name, module in modules.items()]


def run_until_seen(model: nn.Module, batch: dict) -> None:
    try:
        call_model(model, batch)
    except StopForward:
        pass


@contextmanager
def paired_inputs(
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
    modules = (modules_named(original, names), modules_named(converted, names))
    with paired_inputs((original, converted), modules) as (covariances, cross):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            run_until_seen(original, batch)
            run_until_seen(converted, batch)
    return covariances.result(), cross.result()


def collect(
    model: nn.Module, stacks: list[Stack], batches: list[dict], device: torch.device, fisher_seed: int | None = None
) -> Calibration:
    """Hook every stacked Linear/Conv1D, run the batches once, and return C_i per tensor name; with `fisher_seed`,
    also each layer's G_i (output_scalar) from the same forward passes, each followed by a backward."""
    inputs, outputs, transposed, hooks, hooked = Moments(), Moments(), set(), [], []

    read = {"input": None, "version": None, "rows": None}  # the last input read, unchanged since: its rows

    def accumulate(name: str):
        def hook(module, args):
            if args[0] is not read["input"] or args[0]._version != read["version"]:
                read.update(input=args[0], version=args[0]._version, rows=with_ones(_flat_input(args)))
            inputs.add(name, read["rows"], read["rows"])

        return hook

    def keep_gradient(name: str):
        def accumulate(grad: torch.Tensor) -> None:
            # bf16 gradients (autocast) are multiplied in bf16, 3x faster than float32 for SmolLM2's 1536 columns:
            # the factors are exact, and the product's rounding (2^-9) is far below the noise of one sampled label
            flat = grad.reshape(-1, grad.shape[-1])
            flat = flat if flat.dtype == torch.bfloat16 else flat.float()
            outputs.add(name, flat, flat)

        def hook(module, args, output):
            output.requires_grad_()  # the weights are frozen: only the layers' outputs need gradients
            output.register_hook(accumulate)

        return hook

    own = own_names(model, [name for stack in stacks for name in stack.names])
    for stack in stacks:
        found = [_module_for(model, name, own) for name in stack.names]
        if any(module is None for module in found):
            continue  # calibrate whole groups only; this one stays in weight space
        hooked += stack.names
        for name, module in zip(stack.names, found):
            hooks.append(module.register_forward_pre_hook(accumulate(name)))
            if fisher_seed is not None:
                hooks.append(module.register_forward_hook(keep_gradient(name)))
            if is_conv1d(module):  # y = x @ W + b: the input side is dim 0
                transposed.add(name)
    if not hooks:
        raise LorsError("calibration found no stacked nn.Linear layers in the model to measure")
    model.to(device).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(fisher_seed) if fisher_seed is not None else None
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with fast_precision(device):
                if generator is None:
                    with torch.no_grad():
                        call_model(model, batch)
                else:
                    with torch.enable_grad():
                        output_scalar(model, batch, generator).backward()
    finally:
        for hook in hooks:
            hook.remove()
    moments = inputs.result()
    return Calibration(
        covariances={name: m[:-1, :-1] for name, m in moments.items()},
        # a copy: a view would keep each whole moment matrix alive after its metric K has replaced it
        sums={name: m[:-1, -1].clone() for name, m in moments.items()},
        rows={name: 0 for name in hooked} | {name: round(m[-1, -1].item()) for name, m in moments.items()},
        transposed=transposed,
        fisher=outputs.result(),
    )


def output_scalar(model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """A random scalar of the model's output whose gradient g at a layer's output has E[g gᵀ] = G, so that an output
    error δ moves the output by about δᵀ G δ (G summed over tokens).

    A language model (logits and token ids): the next-token loss of labels sampled from the model's own
    distribution, so G is the Fisher of the next-token distributions, and δᵀ G δ / 2 the KL divergence an error δ
    causes (E_y[∇ log p(y) ∇ log p(y)ᵀ] = Jᵀ(diag p − p pᵀ)J, summed over the positions each layer output
    reaches). Any other model: its unit-norm mean-pooled final hidden state (what fidelity's cosine compares)
    against a random probe u, E[Jᵀu uᵀJ] = JᵀJ."""
    from lors_convert.evaluate import mean_pool
    from lors_convert.runtime import logits_and_hidden

    logits, hidden = logits_and_hidden(model, batch)
    mask = batch.get("attention_mask")
    if logits is not None and "input_ids" in batch:
        return sampled_label_loss(logits, mask, generator)
    output = nn.functional.normalize(mean_pool(hidden, mask), dim=-1)
    probe = torch.randn(output.shape, generator=generator).to(output.device)
    return (output * probe).sum()


LABEL_CHUNK = 1024  # positions sampled at once: their cumulative distributions (SmolLM2: 200 MB)


def sampled_label_loss(logits: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Σ_t −log p(y_t) over the unmasked positions, y_t drawn from the model's own p(· | x_≤t): its gradient's
    second moment is the Fisher information of the next-token distributions (true labels would give the
    empirical Fisher, which is biased where the model is wrong)."""
    flat = logits.float().flatten(0, -2)
    labels = torch.cat([sampled_labels(chunk, generator) for chunk in flat.detach().split(LABEL_CHUNK)])
    losses = nn.functional.cross_entropy(flat, labels, reduction="none")
    return (losses * mask.flatten()).sum() if mask is not None else losses.sum()


# ---------------------------------------------------------------- calibrating the plans

# --fisher's G is damped more than the inputs' K: its estimate from one probe per sample is noisy (MiniLM at 50%,
# text of another kind: cos 0.737 / 0.740 / 0.724 at 0.01 / 0.1 / 1, README)
FISHER_DAMPING = 0.1


GB = 1e9


def calibration_bytes(source: TensorSource, stacks: list[Stack], fisher: bool) -> dict[str, float]:
    """What calibration holds at its peak: the dense model in float32, each stacked layer's input covariance
    (in x in, float64; its metric K is formed in its place), under --fisher its output matrix (out x out,
    float64), and the rows each layer buffers for its next product (Moments)."""
    inputs = sum(len(s.names) * s.cols**2 for s in stacks) * 8
    outputs = sum(len(s.names) * s.rows**2 for s in stacks) * 8 if fisher else 0
    buffers = sum(len(s.names) for s in stacks) * FLUSH_BYTES * (2 if fisher else 1)
    model = sum(info.numel for info in source.info.values()) * 4
    return {"model": model, "inputs": inputs, "fisher": outputs, "buffers": buffers}


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux's MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def refuse_beyond_memory(source: TensorSource, stacks: list[Stack], settings: ConvertConfig) -> None:
    """A calibration that cannot fit in memory stops before it starts (and before the model is built), in one
    line that says what it needs and what fits."""
    available = available_memory()
    needed = calibration_bytes(source, stacks, settings.fisher)
    if available is None or sum(needed.values()) <= available:
        return
    parts = f"the model {needed['model'] / GB:.1f} GB in float32, input covariances {needed['inputs'] / GB:.1f} GB"
    if settings.fisher:
        parts += f", --fisher's output matrices {needed['fisher'] / GB:.1f} GB"
    parts += f", buffered rows {needed['buffers'] / GB:.1f} GB"
    without = sum(calibration_bytes(source, stacks, fisher=False).values())
    remedy = (
        f"without --fisher it needs {without / GB:.1f} GB, which fits; or "
        if settings.fisher and without <= available
        else ""
    )
    raise LorsError(
        f"calibration would hold about {sum(needed.values()) / GB:.1f} GB ({parts}) and this machine has "
        f"{available / GB:.1f} GB available: {remedy}convert in weight space (no --calibrate), or on a machine "
        "with more memory"
    )


def calibration_inputs(source: TensorSource, settings: ConvertConfig) -> tuple[torch.nn.Module, list[dict], str]:
    """The dense model with the source's weights, the calibration batches, and the words that say which lines
    (or rows) they are."""
    from lors_convert.data import tensor_batches, text_batches
    from lors_convert.hf import architecture_dir, dense_model, load_tokenizer

    if source.model is not None and not settings.model_factory:
        model = source.model()
    else:
        model = dense_model(source.path, settings.model_factory)
    if settings.model_factory:
        return model, *tensor_batches(settings.calibrate, settings.calib_samples, settings.seed)
    tokenizer = load_tokenizer(architecture_dir(source.path))
    pack = is_causal_lm(model) and getattr(tokenizer, "eos_token_id", None) is not None
    share = settings.calib_generated if pack else 0.0
    rewrite = (lambda lines: with_model_written(model, tokenizer, lines, share, settings.seed)) if share else None
    return model, *text_batches(
        tokenizer,
        settings.calibrate,
        settings.calib_samples,
        settings.calib_max_length,
        settings.seed,
        pack=pack,
        rewrite=rewrite,
    )


SELECTION_LINES = 128  # lines --max-ppl-increase measures perplexity on (their spread on SmolLM2 is not measured yet)


def selection_batches(source: TensorSource, settings: ConvertConfig) -> list[dict]:
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


def damping_term(covariance: torch.Tensor, damping: float) -> float:
    """λ, relative to the mean input energy, so rank-deficient covariances still work."""
    return damping * covariance.diagonal().mean().item()


def damped(covariance: torch.Tensor, damping: float) -> torch.Tensor:
    """K = C + λI."""
    return covariance + damping_term(covariance, damping) * torch.eye(len(covariance), dtype=covariance.dtype)


def calibrate_plans(
    source: TensorSource, model: torch.nn.Module, batches: list[dict], plans: list[GroupPlan], settings: ConvertConfig
) -> tuple[list[GroupPlan], dict, list[str]]:
    """The plans with their calibration (per layer: each saw its own number of tokens), the calibration's summary,
    and warnings about stacked layers that saw no calibration tokens (experts no token was routed to)."""
    stacks, device = [p.stack for p in plans], compute_device()
    calibration = collect(model, stacks, batches, device, settings.seed if settings.fisher else None)
    fisher = calibration.fisher
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
                roots = (psd_factor(damped(fisher.pop(name), FISHER_DAMPING)).mT.to(plan.device) for name in names)
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
    """A group's plan with each layer's K_i, its damping λ_i, mean input μ_i (where a bias takes the mean shift) and
    row count n_i. A layer that saw no tokens gets the mean K of the group's other layers, no λ (C = 0) and no μ."""
    names = plan.stack.names
    plan = replace(plan, transposed=names[0] in calibration.transposed)
    covariances = [calibration.covariances.pop(name, None) for name in names]
    means = tuple(
        calibration.sums[name] / n if n and bias_name(source, name, plan.out_in[0]) else None
        for name, n in zip(names, rows)
    )
    dampings, metrics = [], []
    for c, m, n in zip(covariances, means, rows):
        if c is not None:  # K formed in C's place: a second copy of a 1.1B's down_proj group alone is 5.6 GB
            if m is not None:
                c.addr_(m, m, alpha=-n)
            dampings.append(damping_term(c, damping))
            c.diagonal().add_(dampings[-1])
        else:
            dampings.append(None)
        metrics.append(c)
    seen = [m for m in metrics if m is not None]
    fallback = sum(seen) / len(seen) if len(seen) < len(metrics) else None
    return replace(
        plan,
        dampings=tuple(dampings),
        metrics=tuple((fallback if m is None else m).to(plan.device) for m in metrics),
        means=means,
        rows=rows,
    )
