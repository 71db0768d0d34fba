"""Pure-PyTorch reference implementations: the executable specification of every op.

Vectorised and sync-free, but written for clarity, not speed. Select them for debugging with
``specops.set_backend("reference")``; they are never used as a silent fallback.
"""

from .attention import logical_cache_ref, tree_attention_ref
from .chain import chain_verify_greedy_ref, chain_verify_ref
from .kv import kv_commit_ref
from .sampling import sampling_probs_ref
from .tree import (
    tree_children_ref,
    tree_metadata_ref,
    tree_paths_ref,
    tree_verify_greedy_ref,
    tree_verify_ref,
)

__all__ = ["chain_verify_ref", "chain_verify_greedy_ref", "sampling_probs_ref",
           "tree_metadata_ref", "tree_children_ref", "tree_paths_ref", "tree_verify_ref",
           "tree_verify_greedy_ref", "kv_commit_ref", "tree_attention_ref", "logical_cache_ref"]
