"""A fresh LORS checkpoint for a Hugging Face config (training from scratch, as the paper does): `init`."""

from __future__ import annotations

from pathlib import Path

import torch

from lors_convert import LorsError
from lors_convert.checkpoint import check_output_path, write_safetensors
from lors_convert.config import InitConfig
from lors_convert.hf import _transformers, checkpoint_names, model_class, one_line
from lors_convert.lors_format import GroupMeta, LorsMeta, factor_keys, header_metadata, shared_key
from lors_convert.nn import scratch_factors, swappable_weights


def scratch_ranks(rows: int, cols: int, layers: int, reduction: float, shared: bool = True) -> int:
    """The rank whose group (S, when `shared`, and L rank-r factor pairs) stores `reduction` fewer numbers than L
    dense layers."""
    budget = (1 - reduction) * layers * rows * cols - (rows * cols if shared else 0)
    return max(0, int(budget // (layers * (rows + cols))))


def init_checkpoint(
    config_dir: str | Path, output: str | Path, config: InitConfig, *, force: bool = False
) -> tuple[list[Path], LorsMeta]:
    """A fresh LORS checkpoint for a Hugging Face config, initialised as the paper trains LORS: per group S with
    the layer's own default initialisation (a freshly initialised layer of the group), factors by `scratch_factors`
    (A kaiming-uniform, B zeros, or random without S), every other tensor as transformers initialises it.
    `finetune --objective lm` trains it without a teacher."""
    from lors_convert.checkpoint import TensorInfo
    from lors_convert.lors_format import SourceMeta
    from lors_convert.stacks import find_stacks

    config.validate()
    rank, reduction, shared, seed = config.rank, config.reduction, config.shared, config.seed
    config_dir, output = Path(config_dir), Path(output)
    check_output_path(output, [], force)
    transformers = _transformers()
    try:
        model_config = transformers.AutoConfig.from_pretrained(config_dir, local_files_only=True)
        cls = model_class(model_config)
    except Exception as e:
        raise LorsError(f"{config_dir}: cannot build the model its config describes ({one_line(e)})") from e
    torch.manual_seed(seed)
    model = cls(model_config)
    state = model.state_dict()
    own = checkpoint_names(model)
    tensors, seen = {}, set()
    for (
        checkpoint_name,
        own_name,
    ) in own.items():  # tied tensors (GPT-2's lm_head) are stored once, as transformers does
        if own_name in state and state[own_name].data_ptr() not in seen:
            seen.add(state[own_name].data_ptr())
            tensors[checkpoint_name] = state[own_name]
    info = {name: TensorInfo(tuple(t.shape), t.dtype) for name, t in tensors.items()}
    swappable = swappable_weights(model)  # only what load can swap back in: no conv kernels
    stacks, warnings = find_stacks({n: i for n, i in info.items() if own[n] in swappable})
    groups, out = [], {}
    for stack in stacks:
        r = rank if rank is not None else scratch_ranks(stack.rows, stack.cols, len(stack.layers), reduction, shared)
        r = min(r, stack.rows, stack.cols)
        if shared:
            out[shared_key(stack.template)] = tensors[stack.names[0]].clone()  # a layer's own default initialisation
        for name in stack.names:
            a_key, b_key = factor_keys(name)
            out[b_key], out[a_key] = scratch_factors(tensors[name], r, shared)
        groups.append(
            GroupMeta(
                template=stack.template,
                layers=stack.layers,
                names=stack.names,
                shape=list(stack.shape),
                dtype=str(stack.dtype).removeprefix("torch."),
                ranks=[r] * len(stack.layers),
                dense_params=stack.dense_params,
                lors_params=(stack.rows * stack.cols if shared else 0)
                + len(stack.layers) * r * (stack.rows + stack.cols),
                rel_error=0.0,
                shared=shared,
            )
        )
    stacked = {name for stack in stacks for name in stack.names}
    out.update({name: t for name, t in tensors.items() if name not in stacked})
    meta = LorsMeta(
        source=SourceMeta(str(config_dir.resolve()), [], 0, None),
        settings={"init": "scratch", "rank": rank, "reduction": reduction, "shared": shared, "seed": seed},
        groups=groups,
        kept_dense=[],
        warnings=warnings,
        tool="lors-convert init",
    )
    return write_safetensors(output, out, header_metadata(meta)), meta
