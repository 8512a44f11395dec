"""lors-convert: turn stacked layers of a pretrained model into LORS (shared + low-rank residual) form.

One verb per operation, each with a config object (torchao's `quantize_(model, config)`):

    import lors_convert as lc
    config = lc.ConvertConfig(reduction=0.2, calibrate=["text.txt"], fisher=True)
    lc.convert("model_dir", "model.lors.safetensors", config)
    model = lc.load("model.lors.safetensors")       # the source's own model class, LORS layers inside
    lc.save(model, "trained.lors.safetensors")      # after your own training loop
    lc.finetune("model.lors.safetensors", ["text.txt"], "tuned.lors.safetensors", lc.FinetuneConfig(minutes=15))
    lc.compress("model_dir", "small.lors.safetensors", lc.CompressConfig(calibrate=["text.txt"], reduction=0.2))
    lc.export("tuned.lors.safetensors", "hf_dir", lc.ExportConfig())  # loads without lors-convert
    lc.merge(model)                                 # LORS layers back to plain Linear, in place
    lc.init("config_dir", "scratch.lors.safetensors", lc.InitConfig(reduction=0.5))  # to train from scratch
    lc.lorsify(my_model, lc.LorsifyConfig(rank=16))  # stacked layers of a model in memory, in place
"""

from importlib import import_module

__version__ = "0.1.0"


class LorsError(Exception):
    """A problem the user can fix (bad input, bad option). The CLI prints it as one line."""


def convert(source, output, config=None, *, force=False):
    """Convert the checkpoint at `source` (a .safetensors file or index, a Hugging Face folder, .pt/.bin, .gguf) to
    a LORS checkpoint at `output`, as `config` (a ConvertConfig; default: remove half the stacked parameters)
    says. Returns the files written; `lors-convert report FILE` prints what was saved and what it cost."""
    from pathlib import Path

    from lors_convert.config import ConvertConfig
    from lors_convert.conversion import convert as convert_checkpoint
    from lors_convert.hf import open_source

    files, _ = convert_checkpoint(open_source(source), Path(output), config or ConvertConfig(), force=force)
    return files


def init(config_dir, output, config, *, force=False):
    """Write a freshly initialised LORS checkpoint for the Hugging Face config in `config_dir` (an InitConfig says
    the rank or reduction); train it with `finetune` and `FinetuneConfig(objective="lm")`. Returns the files."""
    from lors_convert.scratch import init_checkpoint

    files, _ = init_checkpoint(config_dir, output, config, force=force)
    return files


def merge(model):
    """Every LORS layer of a loaded model back to a plain Linear (or GPT-2 Conv1D) holding S + B A, in place:
    dense speed at the dense model's size. Returns the model."""
    from lors_convert.nn import merge_lors

    return merge_lors(model)


# name -> the module that defines it; imported on first use, so `import lors_convert` stays light
_LAZY = {
    "ConvertConfig": "config",
    "load": "loading",
    "save": "loading",
    "finetune": "finetuning",
    "FinetuneConfig": "config",
    "compress": "compression",
    "CompressConfig": "config",
    "export": "exporting",
    "ExportConfig": "config",
    "InitConfig": "config",
    "lorsify": "nn",
    "LorsifyConfig": "config",
    "LorsLinear": "nn",
    "AdaptiveLors": "nn",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f"lors_convert.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lors_convert' has no attribute {name!r}")


__all__ = ["LorsError", "convert", "init", "merge", *_LAZY]
