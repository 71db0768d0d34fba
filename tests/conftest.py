import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. This must be
# set before any Triton kernel is decorated, i.e. before specops.triton_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("default", deadline=None, max_examples=60, print_blob=True)
# CI runs a fixed sequence of examples, so a red CI run always reproduces.
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads the real default models (set SPECOPS_SLOW=1); "
                                       "not run in CI")
