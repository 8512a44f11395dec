"""lors-convert: turn stacked layers of a pretrained model into LORS (shared + low-rank residual) form."""

__version__ = "0.1.0"


class LorsError(Exception):
    """A problem the user can fix (bad input, bad option). The CLI prints it as one line."""
