"""lors-convert: turn stacked layers of a pretrained model into LORS (shared + low-rank residual) form.

import lors_convert
model = lors_convert.load("model.lors.safetensors")   # the source's own model class, LORS layers inside
lors_convert.save(model, "trained.lors.safetensors")  # after your own training loop
"""

__version__ = "0.1.0"


class LorsError(Exception):
    """A problem the user can fix (bad input, bad option). The CLI prints it as one line."""


def load(path, *, device="cpu", dtype=None, architecture=None):
    """The model of a LORS checkpoint with its stacked layers as LORS modules (see lors_convert.loading.load)."""
    from lors_convert.loading import load as load_model

    return load_model(path, device=device, dtype=dtype, architecture=architecture)


def save(model, path, *, force=False):
    """Write a LORS checkpoint from a model `load` returned (see lors_convert.loading.save)."""
    from lors_convert.loading import save as save_model

    return save_model(model, path, force=force)
