"""Loads the C++ extension (schemas + CPU kernels) and refuses one built for another torch."""

import os

import torch

REBUILD_HINT = ("rebuild it against the installed torch: `pip install --no-build-isolation "
                "--no-deps --force-reinstall -e <specops checkout>` (or `make build` there)")


def load_extension():
    """Returns the ``specops._C`` module, or None when the reference backend was asked for.

    An extension that fails to load, or was built for another torch version, raises an
    ImportError that says how to rebuild, unless ``SPECOPS_BACKEND=reference`` is set: then
    specops warns and runs on the pure-PyTorch reference (explicitly chosen, never silent).
    """
    reference_only = os.environ.get("SPECOPS_BACKEND", "") == "reference"
    try:
        from . import _C
    except ImportError as error:
        message = (f"specops: the C++ extension specops._C did not load ({error}); it is "
                   f"missing or was built for a torch other than the installed "
                   f"{torch.__version__}: {REBUILD_HINT}.")
        if reference_only:
            import warnings
            warnings.warn(message + " Using the reference backend (SPECOPS_BACKEND=reference).")
            return None
        raise ImportError(message) from error
    if _C.torch_version != torch.__version__:
        raise ImportError(f"specops: the C++ extension was built for torch {_C.torch_version} "
                          f"but torch {torch.__version__} is installed: {REBUILD_HINT}.")
    return _C
