"""Calibration: run the original model over sample inputs and accumulate each stacked layer's input second
moment C_i = X_iᵀX_i and input sum X_iᵀ1 (float64, streaming), so residuals can be factored where the inputs
actually live; with --fisher also the second moment of the output's gradients at each layer's output. Then the
glue to conversion: the plans' metrics K_i (damped), means and output weights."""

from __future__ import annotations

import collections
import contextlib
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lors_convert import LorsError
from lors_convert.blocks import StopForward, block_chain, first_tensor, run_until_seen
from lors_convert.checkpoint import TensorSource
from lors_convert.config import ConvertConfig
from lors_convert.factorize import psd_factor
from lors_convert.loading import layer_module, own_names
from lors_convert.nn import is_conv1d
from lors_convert.offload import held
from lors_convert.plan import GroupPlan, bias_name
from lors_convert.runtime import call_model, compute_device, fast_precision, is_causal_lm
from lors_convert.sampling import NEW_TOKENS, sampled_labels, with_model_written
from lors_convert.stacks import Stack
from lors_convert.threads import revise_threads


@dataclass
class Calibration:
    covariances: dict[str, torch.Tensor]  # tensor name -> C (input dim x input dim, float64, on CPU)
    sums: dict[str, torch.Tensor]  # tensor name -> Xᵀ1 (input dim, float64): the mean input is sums / rows
    rows: dict[str, int]  # tensor name -> input rows (tokens) seen; 0 for a hooked layer never reached
    transposed: set[str]  # names stored as in x out (GPT-2 Conv1D): their input side is dim 0
    fisher: dict[str, torch.Tensor]  # tensor name -> G (output dim x output dim, float64, CPU); {} without --fisher


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


Finish = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], None]


def collect(
    model: nn.Module,
    stacks: list[Stack],
    batches: list[dict],
    device: torch.device,
    fisher_seed: int | None = None,
    finish: Finish | None = None,
    spill: Path | None = None,
) -> Calibration:
    """Hook every stacked Linear/Conv1D, run the batches, and hand finish(moments, fisher) each layer's
    [X 1]ᵀ[X 1] (with_ones) and, with `fisher_seed`, its G (output_scalar) as soon as they are complete.

    Where the stacked layers' blocks form a chain (blocks.block_chain), one block at a time (blockwise): memory
    holds one block's statistics. Otherwise the whole model in one pass per batch. Without `finish`, every result
    is kept in the returned Calibration (small models, tests); with it, the Calibration holds only the row counts
    and which layers are transposed. `spill`: a folder for the blocks' inputs that --fisher's backward sweep
    reads again (a temporary folder of its own when None)."""
    kept = Calibration({}, {}, {}, set(), {})
    if finish is None:

        def finish(moments: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]) -> None:
            kept.covariances.update({name: m[:-1, :-1] for name, m in moments.items()})
            # a copy: a view would keep each whole moment matrix alive after its metric K has replaced it
            kept.sums.update({name: m[:-1, -1].clone() for name, m in moments.items()})
            kept.fisher.update(fisher)

    def counted(moments: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]) -> None:
        kept.rows.update({name: round(m[-1, -1].item()) for name, m in moments.items()})
        finish(moments, fisher)

    own = own_names(model, [name for stack in stacks for name in stack.names])
    modules = {}
    for stack in stacks:
        found = [_module_for(model, name, own) for name in stack.names]
        if any(module is None for module in found):
            continue  # calibrate whole groups only; this one stays in weight space
        modules.update(zip(stack.names, found))
    if not modules:
        raise LorsError("calibration found no stacked nn.Linear layers in the model to measure")
    kept.rows.update({name: 0 for name in modules})
    kept.transposed.update(name for name, module in modules.items() if is_conv1d(module))  # y = x @ W + b
    model.to(device).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(fisher_seed) if fisher_seed is not None else None
    with fast_precision(device):
        chain, _ = block_chain(model, [s for s in stacks if s.names[0] in modules], batches, device)
    if chain is None:
        whole_model(model, modules, batches, device, generator, counted)
    else:
        with contextlib.ExitStack() as scope:
            folder = spill or Path(scope.enter_context(tempfile.TemporaryDirectory(prefix="lors-blocks-")))
            blockwise(model, chain, modules, batches, generator, counted, folder)
    return kept


def hook_statistics(modules: dict[str, nn.Module], inputs: Moments, outputs: Moments | None) -> list:
    """Hooks adding each module's [X 1]ᵀ[X 1] to `inputs` and, with `outputs`, its output gradients' G: the rows
    of one input are formed once for all the modules that read it (q, k and v)."""
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
            if not output.requires_grad:
                output.requires_grad_()  # the weights are frozen: only the layers' outputs need gradients
            output.register_hook(accumulate)

        return hook

    hooks = [module.register_forward_pre_hook(accumulate(name)) for name, module in modules.items()]
    if outputs is not None:
        hooks += [module.register_forward_hook(keep_gradient(name)) for name, module in modules.items()]
    return hooks


def whole_model(model, modules, batches, device, generator, finish: Finish) -> None:
    """Every layer's statistics from one pass over the whole model per batch (a forward, and with --fisher a
    backward): the models whose blocks are no chain."""
    inputs, outputs = Moments(), Moments() if generator is not None else None
    hooks = hook_statistics(modules, inputs, outputs)
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
    finish(inputs.result(), outputs.result() if outputs is not None else {})


def blockwise(model, chain, modules, batches, generator, finish: Finish, spill: Path) -> None:
    """Statistics one block at a time, llm-compressor's sequential pipeline for LORS: each block runs on the
    previous block's outputs for every batch, and its layers' statistics are handed on before the next block
    starts. With --fisher, the forward sweep keeps each block's inputs on disk, the model's output gradient is
    taken with every block bypassed, and a backward sweep runs each block again, last to first, on its inputs,
    back-propagating the gradient at its output to its input: the same G as one backward through the whole
    model, with one block's statistics alive at a time."""
    first_inputs, blocks, _ = chain
    device = first_inputs[0][0][0].device
    rest = [(args[1:], kwargs) for args, kwargs in first_inputs]  # masks, positions...: the same for every block
    xs = [args[0] for args, _ in first_inputs]
    block_of = {name: layer_module_index(blocks, module) for name, module in modules.items()}
    first, last = min(block_of.values()), max(block_of.values())
    returns_tuple = False
    for k, block in enumerate(blocks):
        if generator is None and k > last:
            return
        names = {name: modules[name] for name, at in block_of.items() if at == k}
        inputs = Moments()
        hooks = hook_statistics(names, inputs, None) if generator is None else []
        if generator is not None and k >= first:
            save_file({str(j): x.contiguous() for j, x in enumerate(xs)}, spill / f"block-{k}.safetensors")
        try:
            with torch.no_grad(), fast_precision(device), held(block, device):
                outputs = [block(x, *args, **kwargs) for x, (args, kwargs) in zip(xs, rest)]
        finally:
            for hook in hooks:
                hook.remove()
        returns_tuple = type(outputs[0]) in (tuple, list)
        xs = [first_tensor(out) for out in outputs]
        del outputs
        if generator is None and names:
            finish(inputs.result(), {})
    if generator is None:
        return
    grads = []
    for x, batch in zip(xs, batches):  # the output's gradient at the last block's output
        x = x.detach().requires_grad_()
        with bypassed(blocks, x, returns_tuple), torch.enable_grad(), fast_precision(device):
            output_scalar(model, {key: v.to(device) for key, v in batch.items()}, generator).backward()
        grads.append(x.grad)
    del xs
    for k in reversed(range(first, len(blocks))):  # blocks after the last calibrated one still pass the gradient
        names = {name: modules[name] for name, at in block_of.items() if at == k}
        inputs, outputs = Moments(), Moments()
        hooks = hook_statistics(names, inputs, outputs)
        stored = load_file(spill / f"block-{k}.safetensors", device=str(device))
        (spill / f"block-{k}.safetensors").unlink()
        try:
            with torch.enable_grad(), fast_precision(device), held(blocks[k], device):
                for j, (args, kwargs) in enumerate(rest):
                    x = stored.pop(str(j)).requires_grad_(k > first)
                    first_tensor(blocks[k](x, *args, **kwargs)).backward(grads[j])
                    grads[j] = x.grad
        finally:
            for hook in hooks:
                hook.remove()
        if names:
            finish(inputs.result(), outputs.result())


def layer_module_index(blocks: list[nn.Module], module: nn.Module) -> int:
    """The position of the block holding `module`."""
    return next(k for k, block in enumerate(blocks) if any(m is module for m in block.modules()))


@contextmanager
def bypassed(blocks: list[nn.Module], final: torch.Tensor, returns_tuple: bool) -> Iterator[None]:
    """Every block's forward replaced: the first returns `final` (the last block's output, already computed),
    the others pass it on, so a forward of the model runs only what comes before and after the blocks."""

    def passing(x, *args, **kwargs):
        return (x,) if returns_tuple else x

    def first(x, *args, **kwargs):
        return passing(final)

    for k, block in enumerate(blocks):
        block.forward = first if k == 0 else passing
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


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

# --fisher's G is damped more than the inputs' K: its estimate from one probe per sample is noisy
# (docs/benchmarks.md, MiniLM zero-shot). SmolLM2 at 20% from 256 samples with this constant changed, scored by
# scripts/bench_llm.py at 9de0d07: 0.03 within 0.4% of 0.1 on every text, 0.01 breaks the model (ppl x16); at
# a22993d 0.3 within 1.6% of 0.1 (no better on any text)
FISHER_DAMPING = 0.1


GB = 1e9


def one_chain(stacks: list[Stack]) -> bool:
    """Whether the stacks' layers look like one list of blocks (the same name before the layer index), which
    calibration then runs block by block (block_chain checks it for real on the model)."""
    return len({stack.template.partition("{i}")[0] for stack in stacks}) == 1


RUNTIME_BYTES = 5 * 10**8  # the interpreter, torch and transformers, before any tensor (measured: 0.35-0.5 GB)


def calibration_bytes(
    source: TensorSource, stacks: list[Stack], fisher: bool, tokens: int = 256 * 128, offloaded: bool = False
) -> dict[str, float]:
    """What calibration holds at its peak: the dense model in float32, or with `offloaded` (loading.can_offload)
    what lies outside the blocks and the largest block; the stacked layers' input covariances (in x in, float64;
    each metric K is formed in its place) and, under --fisher, their output matrices (out x out) and the factor
    of the largest one (a damped copy, its factor and that in float32), with the rows each layer buffers for its
    next product and the last product kept for the next layer that reads the same input (Moments). Block by block
    (one_chain) those are one block's; with --fisher, the gradient at the current block's output and that block's
    inputs read back from disk, for the calibration's `tokens`. Otherwise every layer's at once. And the runtime."""
    chain = one_chain(stacks)
    blocks = {}
    for stack in stacks:
        for layer in stack.layers:
            blocks.setdefault(layer if chain else 0, []).append(stack)
    heaviest = lambda size: max(sum(size(s) for s in block) for block in blocks.values())  # noqa: E731
    outside, largest, every = block_bytes(source, stacks)
    widest = max(max(s.rows, s.cols) for s in stacks)
    return {
        "model": outside + (largest if offloaded else every),
        "inputs": heaviest(lambda s: s.cols**2 * 8 * (1 if chain else len(s.names))),
        "fisher": heaviest(lambda s: s.rows**2 * 8 * (1 if chain else len(s.names))) if fisher else 0,
        "factor": max(s.rows for s in stacks) ** 2 * 20 if fisher else 0,
        "buffers": heaviest(lambda s: 1 if chain else len(s.names)) * FLUSH_BYTES * (1 + fisher) + widest**2 * 8,
        "gradients": 2 * tokens * min(s.cols for s in stacks) * 4 if fisher and chain else 0,
        "runtime": RUNTIME_BYTES,
    }


def block_bytes(source: TensorSource, stacks: list[Stack]) -> tuple[int, int, int]:
    """The checkpoint in float32: (what lies outside the blocks that hold the stacked layers, the largest block,
    all the blocks)."""
    prefixes = sorted({stack.template.partition("{i}")[0] for stack in stacks}, key=len, reverse=True)
    pattern = re.compile("(" + "|".join(map(re.escape, prefixes)) + r")(\d+)\.")
    outside, per_block = 0, collections.Counter()
    for name, info in source.info.items():
        found = pattern.match(name)
        if found:
            per_block[found.groups()] += info.numel * 4
        else:
            outside += info.numel * 4
    return outside, max(per_block.values(), default=0), sum(per_block.values())


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux's MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def calibration_tokens(settings: ConvertConfig) -> int:
    """The most tokens calibration runs: each sample a line of up to calib_max_length tokens and the end-of-text
    token packing puts after it, a model-written one up to NEW_TOKENS more (its answer to such a line, or as many
    sampled from the start token)."""
    written = round(settings.calib_samples * settings.calib_generated)
    return settings.calib_samples * (settings.calib_max_length + 1) + written * NEW_TOKENS


def refuse_beyond_memory(source: TensorSource, stacks: list[Stack], settings: ConvertConfig) -> None:
    """A calibration that cannot fit in memory stops before it starts (and before the model is built), in one
    line that says what it needs and what fits."""
    from lors_convert.loading import can_offload

    available = available_memory()
    tokens = calibration_tokens(settings)
    offloaded = can_offload(source, settings.model_factory) and not settings.sequential
    needed = calibration_bytes(source, stacks, settings.fisher, tokens, offloaded)
    if available is None or sum(needed.values()) <= available:
        return
    what = "one block at a time" if offloaded else "in float32"
    parts = f"the model {needed['model'] / GB:.1f} GB {what}, input covariances {needed['inputs'] / GB:.1f} GB"
    if settings.fisher:
        parts += f", --fisher's output matrices and a factor {(needed['fisher'] + needed['factor']) / GB:.1f} GB"
    parts += f", buffered rows and products {needed['buffers'] / GB:.1f} GB"
    if needed["gradients"]:
        parts += f", the output's gradient and a block's inputs {needed['gradients'] / GB:.1f} GB"
    without = sum(calibration_bytes(source, stacks, False, tokens, offloaded).values())
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
    """The dense model with the source's weights (its blocks read as they run, where it can be; whole for
    --sequential, which writes converted weights into a copy of it), the calibration batches, and the words that
    say which lines (or rows) they are."""
    from lors_convert.data import tensor_batches, text_batches
    from lors_convert.hf import architecture_dir, dense_model, load_tokenizer
    from lors_convert.loading import offloaded_dense_model

    if source.model is not None and not settings.model_factory:
        model = source.model()
    else:
        model = (dense_model if settings.sequential else offloaded_dense_model)(source.path, settings.model_factory)
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
        written=NEW_TOKENS,
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


class MatrixStore:
    """Per-layer matrices on disk (float32, one safetensors file each) until the plans need them: whatever waits
    for the global rank allocation waits here, not in memory. float32 keeps K's and F's entries to 1e-7 relative,
    far below their damping."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.files = Path(folder), {}

    def put(self, key: str, matrix: torch.Tensor) -> None:
        self.files[key] = self.folder / f"matrix-{len(self.files)}.safetensors"
        save_file({"m": matrix.float().contiguous()}, self.files[key])

    def get(self, key: str) -> torch.Tensor:
        return load_file(self.files[key])["m"].double()


class Stored(Sequence):
    """A plan's per-layer matrices (K_i or F_iᵀ), read from a MatrixStore one at a time, when used."""

    def __init__(self, store: MatrixStore, keys: list[str], device: str, dtype: torch.dtype) -> None:
        self.store, self.keys, self.device, self.dtype = store, keys, device, dtype

    def __getitem__(self, i):
        return self.store.get(self.keys[i]).to(self.device, self.dtype)

    def __len__(self) -> int:
        return len(self.keys)


def calibrate_plans(
    source: TensorSource,
    model: torch.nn.Module,
    batches: list[dict],
    plans: list[GroupPlan],
    settings: ConvertConfig,
    scratch: Path,
) -> tuple[list[GroupPlan], dict, list[str]]:
    """The plans with their calibration (per layer: each saw its own number of tokens), the calibration's summary,
    and warnings about stacked layers that saw no calibration tokens (experts no token was routed to).

    Each layer's statistics become its metric K_i (centred where its bias takes the mean shift, damped) and, with
    --fisher, its output root F_iᵀ as soon as they are complete, and go to disk (`scratch`): memory holds one
    block's statistics, not the model's."""
    stacks, device = [p.stack for p in plans], compute_device()
    store = MatrixStore(scratch)
    modules = modules_named(model, [name for stack in stacks for name in stack.names])
    transposed = {name for name, module in modules.items() if module is not None and is_conv1d(module)}
    out_rows = {name: s.cols if name in transposed else s.rows for s in stacks for name in s.names}
    means, dampings = {}, {}

    def finish(moments: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]) -> None:
        for name, m in [*moments.items(), *fisher.items()]:
            if not torch.isfinite(m).all():
                what = "inputs" if name in moments and m is moments[name] else "output gradients"
                raise LorsError(
                    f"{name}: its {what} on the calibration samples are not finite (inf or NaN): the model "
                    "overflows on this text; check that it runs in float32 on it"
                )
        for name, m in moments.items():
            n = m[-1, -1].item()
            if not n:
                continue
            covariance, sums = m[:-1, :-1], m[:-1, -1]
            if bias_name(source, name, out_rows[name]):
                means[name] = sums / n
                covariance.addr_(means[name], means[name], alpha=-n)
            dampings[name] = damping_term(covariance, settings.damping)
            covariance.diagonal().add_(dampings[name])  # K formed in C's place
            store.put(f"K:{name}", covariance)
        for name, g in fisher.items():
            store.put(f"F:{name}", psd_factor(damped(g, FISHER_DAMPING)).mT)
        revise_threads()  # once a block

    calibration = collect(
        model, stacks, batches, device, settings.seed if settings.fisher else None, finish, spill=scratch
    )
    calibrated, warnings = [], []
    for plan in plans:
        names, template = plan.stack.names, plan.stack.template
        rows = tuple(calibration.rows.get(name, 0) for name in names)
        if any(rows):
            plan = replace(plan, transposed=names[0] in calibration.transposed)
            keys = [f"K:{name}" if n else f"K:{template}" for name, n in zip(names, rows)]
            if not all(rows):  # a layer that saw no tokens: the mean K of the group's other layers
                seen = [name for name, n in zip(names, rows) if n]
                total = store.get(f"K:{seen[0]}")
                for name in seen[1:]:
                    total += store.get(f"K:{name}")
                store.put(f"K:{template}", total / len(seen))
                unseen = [str(layer) for layer, n in zip(plan.stack.layers, rows) if not n]
                warnings.append(
                    f"{template}: layer{'s' * (len(unseen) > 1)} {', '.join(unseen)} saw no calibration tokens; "
                    "factored with its group's mean inputs"
                )
            plan = replace(
                plan,
                dampings=tuple(dampings.get(name) for name in names),
                metrics=Stored(store, keys, plan.device, torch.float64),
                means=tuple(means.get(name) for name in names),
                rows=rows,
            )
            if all(f"F:{name}" in store.files for name in names):  # layers the output does not depend on have no G
                plan = replace(
                    plan, output_roots=Stored(store, [f"F:{name}" for name in names], plan.device, torch.float32)
                )
        elif names[0] in calibration.rows:
            warnings.append(f"{template}: no layer saw calibration tokens; factored in weight space")
        calibrated.append(plan)
    summary = {
        "samples": len(batches),
        "tokens": max(calibration.rows.values(), default=0),  # input rows (tokens, patches) of the busiest layer
        "groups": sum(p.metrics is not None for p in calibrated),
    }
    return calibrated, summary, warnings
