"""lors-convert: turn stacked layers of a pretrained model into LORS (shared + low-rank residual) form."""

import os

# OpenMP threads that spin while waiting made LAPACK calls (eigh, svd) 4-40x slower whenever another
# process held a core (measured on a 2-core machine); passive waiting costs matrix products nothing.
# It must be set before torch loads OpenMP, so here, where every entry point starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


class LorsError(Exception):
    """A problem the user can fix (bad input, bad option). The CLI prints it as one line."""
