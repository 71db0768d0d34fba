"""Registers the Triton kernels (specops/triton_kernels/) as the CUDA kernels of the ops.

Triton is imported on the first CUDA call, so specops imports without it; a CUDA call without
Triton installed raises an ImportError saying so. Values are checked on the GPU only at the
"full" level, because reading them needs a host sync (contract, "Bad input").
"""

import torch

from . import _checks


def _triton_kernels():
    try:
        from . import triton_kernels
    except ImportError as error:
        raise ImportError("specops: the GPU kernels need Triton (`pip install triton`)") from error
    return triton_kernels


@torch.library.register_kernel("specops::sampling_probs", "cuda")
def _sampling_probs_cuda(logits, temperature, top_k, top_p):
    _checks.sampling_probs_meta(logits, temperature, top_k, top_p)
    if _checks.values_checked(logits.device):
        _checks.sampling_probs_values(logits, temperature, top_k, top_p)
    return _triton_kernels().sampling_probs_triton(logits, temperature, top_k, top_p)


@torch.library.register_kernel("specops::chain_verify", "cuda")
def _chain_verify_cuda(target_probs, draft_tokens, draft_probs, draft_lens, seeds, positions):
    _checks.chain_verify_meta(target_probs, draft_tokens, draft_probs, draft_lens, seeds, positions)
    if _checks.values_checked(target_probs.device):
        _checks.chain_verify_values(target_probs, draft_tokens, draft_probs, draft_lens, positions)
    return _triton_kernels().chain_verify_triton(
        target_probs, draft_tokens, draft_probs, draft_lens, seeds, positions)


@torch.library.register_kernel("specops::chain_verify_greedy", "cuda")
def _chain_verify_greedy_cuda(target_logits, draft_tokens, draft_lens):
    _checks.chain_verify_greedy_meta(target_logits, draft_tokens, draft_lens)
    if _checks.values_checked(target_logits.device):
        _checks.chain_verify_greedy_values(target_logits, draft_tokens, draft_lens)
    return _triton_kernels().chain_verify_greedy_triton(target_logits, draft_tokens, draft_lens)


@torch.library.register_kernel("specops::tree_metadata", "cuda")
def _tree_metadata_cuda(parents, num_nodes):
    _checks.tree_metadata_meta(parents, num_nodes)
    if _checks.values_checked(parents.device):
        _checks.tree_values("tree_metadata", parents, num_nodes)
    return _triton_kernels().tree_metadata_triton(parents, num_nodes)


@torch.library.register_kernel("specops::tree_verify", "cuda")
def _tree_verify_cuda(target_probs, tree_tokens, parents, num_nodes, draft_probs, seeds,
                      positions):
    args = (target_probs, tree_tokens, parents, num_nodes, draft_probs, seeds, positions)
    _checks.tree_verify_meta(*args)
    if _checks.values_checked(target_probs.device):
        _checks.tree_verify_values(target_probs, tree_tokens, parents, num_nodes, draft_probs,
                                   positions)
    return _triton_kernels().tree_verify_triton(*args)


@torch.library.register_kernel("specops::tree_verify_greedy", "cuda")
def _tree_verify_greedy_cuda(target_logits, tree_tokens, parents, num_nodes):
    args = (target_logits, tree_tokens, parents, num_nodes)
    _checks.tree_verify_greedy_meta(*args)
    if _checks.values_checked(target_logits.device):
        _checks.tree_verify_greedy_values(*args)
    return _triton_kernels().tree_verify_greedy_triton(*args)


@torch.library.register_kernel("specops::kv_commit", "cuda")
def _kv_commit_cuda(kv, cache_lens, path, num_accepted, block_tables):
    args = (kv, cache_lens, path, num_accepted, block_tables)
    _checks.kv_commit_meta(*args)
    _checks.kv_distinct("kv_commit", kv)
    if _checks.values_checked(cache_lens.device):
        _checks.kv_commit_values(*args)  # before any write: a failed check leaves kv as it was
    return _triton_kernels().kv_commit_triton(*args)


@torch.library.register_kernel("specops::tree_attention", "cuda")
def _tree_attention_cuda(q, k_cache, v_cache, cache_lens, mask, scale, block_tables):
    args = (q, k_cache, v_cache, cache_lens, mask, scale, block_tables)
    capacity = _checks.tree_attention_meta(*args)
    if _checks.values_checked(q.device):
        _checks.tree_attention_values(q, k_cache, cache_lens, block_tables, capacity)
    return _triton_kernels().tree_attention_triton(*args)
