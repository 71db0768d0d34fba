"""specops: speculative-decoding ops for PyTorch.

Lossless verification of draft chains and token trees, sampling distributions, tree
attention and KV-cache commit, each with a pure-PyTorch reference, a C++ CPU kernel and a
Triton GPU kernel behind one set of ``torch.ops.specops`` schemas. Contract:
specops-contract.md; see README.md.
"""

import os

from . import _checks
from ._extension import load_extension

_C = load_extension()
if _C is not None:
    from . import _fake, _gpu  # noqa: F401  (registrations)

from . import reference  # noqa: E402
from .kv_ops import kv_commit, kv_write  # noqa: E402
from .ops import (  # noqa: E402
    chain_verify,
    chain_verify_greedy,
    get_backend,
    get_checks,
    sampling_probs,
    set_backend,
    set_checks,
    use_backend,
)
from .tree_ops import tree_metadata, tree_verify, tree_verify_greedy  # noqa: E402
from .trees import (  # noqa: E402
    chain_parents,
    grow_tree,
    keep_best_nodes,
    pack_tree_mask,
    tokens_from_topk,
    tree_children,
    tree_from_choices,
    tree_paths,
    unpack_tree_mask,
)
from .attention_ops import tree_attention  # noqa: E402
from .linear_ops import skinny_linear  # noqa: E402
from . import hf  # noqa: E402  (transformers integration; imports transformers lazily)

__version__ = "0.1.0"
__all__ = ["chain_verify", "chain_verify_greedy", "sampling_probs", "set_backend", "get_backend",
           "use_backend", "set_checks", "get_checks", "reference", "tree_metadata",
           "tree_verify", "tree_verify_greedy", "tree_children", "tree_paths", "pack_tree_mask",
           "unpack_tree_mask", "chain_parents", "tree_from_choices", "tokens_from_topk",
           "grow_tree", "keep_best_nodes", "kv_commit", "kv_write", "tree_attention",
           "skinny_linear", "hf",
           "generate", "SpeculativeGenerator", "GenerationOutput", "GenerationSession",
           "DynamicTree", "Hybrid",
           "PromptLookup", "Proposer", "StaticTree"]

# The decoding loop is imported on first use: it pulls in transformers' model classes, which
# users of the ops alone need not load.
_LOOP_NAMES = {"generate", "SpeculativeGenerator", "GenerationOutput", "GenerationSession",
               "DynamicTree", "Hybrid",
               "PromptLookup", "Proposer", "StaticTree"}


def __getattr__(name: str):
    if name in _LOOP_NAMES:
        from . import loop as loop_module
        return getattr(loop_module, name)
    raise AttributeError(f"module 'specops' has no attribute {name!r}")

if _C is None:
    set_backend("reference")
else:
    set_backend(os.environ.get("SPECOPS_BACKEND", "kernels") or "kernels")
    set_checks(_checks.level_from_env())
