"""Triton GPU kernels of specops (registered as the ops' CUDA kernels by specops/_gpu.py).

Each launcher takes validated arguments, is sync-free (grids from shapes only) and so works
inside CUDA graphs. Importing this package needs Triton but no GPU; with
``TRITON_INTERPRET=1`` set before the import, the kernels run on CPU tensors in Triton's
interpreter (how the tests run without a GPU).
"""

from .attention import tree_attention_triton
from .chain import chain_verify_greedy_triton, chain_verify_triton
from .kv import kv_commit_triton
from .sampling import sampling_probs_triton
from .tree import tree_metadata_triton, tree_verify_greedy_triton, tree_verify_triton

__all__ = ["chain_verify_triton", "chain_verify_greedy_triton", "kv_commit_triton",
           "sampling_probs_triton", "tree_attention_triton", "tree_metadata_triton",
           "tree_verify_triton", "tree_verify_greedy_triton"]
