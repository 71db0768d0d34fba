"""Fake (meta) kernels: output shapes for torch.compile and for tracing, no data read."""

import torch

from . import _checks
from .linear_ops import skinny_linear_meta


@torch.library.register_fake("specops::sampling_probs")
def _sampling_probs_fake(logits, temperature, top_k, top_p):
    _checks.sampling_probs_meta(logits, temperature, top_k, top_p)
    return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.library.register_fake("specops::chain_verify")
def _chain_verify_fake(target_probs, draft_tokens, draft_probs, draft_lens, seeds, positions):
    _checks.chain_verify_meta(target_probs, draft_tokens, draft_probs, draft_lens, seeds, positions)
    return _chain_outputs(target_probs)


@torch.library.register_fake("specops::chain_verify_greedy")
def _chain_verify_greedy_fake(target_logits, draft_tokens, draft_lens):
    _checks.chain_verify_greedy_meta(target_logits, draft_tokens, draft_lens)
    return _chain_outputs(target_logits)


def _chain_outputs(target):
    batch, num_rows, _ = target.shape
    return (target.new_empty((batch, num_rows), dtype=torch.int64),
            target.new_empty((batch,), dtype=torch.int32))


@torch.library.register_fake("specops::tree_metadata")
def _tree_metadata_fake(parents, num_nodes):
    _checks.tree_metadata_meta(parents, num_nodes)
    batch, num_slots = parents.shape
    return (parents.new_empty((batch, num_slots, num_slots), dtype=torch.bool),
            parents.new_empty((batch, num_slots), dtype=torch.int32))


@torch.library.register_fake("specops::tree_verify")
def _tree_verify_fake(target_probs, tree_tokens, parents, num_nodes, draft_probs, seeds,
                      positions):
    _checks.tree_verify_meta(target_probs, tree_tokens, parents, num_nodes, draft_probs, seeds,
                             positions)
    return _tree_outputs(target_probs)


@torch.library.register_fake("specops::tree_verify_greedy")
def _tree_verify_greedy_fake(target_logits, tree_tokens, parents, num_nodes):
    _checks.tree_verify_greedy_meta(target_logits, tree_tokens, parents, num_nodes)
    return _tree_outputs(target_logits)


def _tree_outputs(target):
    batch, num_slots, _ = target.shape
    return (target.new_empty((batch, num_slots), dtype=torch.int64),
            target.new_empty((batch, num_slots), dtype=torch.int32),
            target.new_empty((batch,), dtype=torch.int32))


@torch.library.register_fake("specops::kv_commit")
def _kv_commit_fake(kv, cache_lens, path, num_accepted, block_tables):
    _checks.kv_commit_meta(kv, cache_lens, path, num_accepted, block_tables)
    return cache_lens.new_empty(cache_lens.shape, dtype=torch.int32)


@torch.library.register_fake("specops::tree_attention")
def _tree_attention_fake(q, k_cache, v_cache, cache_lens, mask, scale, block_tables):
    _checks.tree_attention_meta(q, k_cache, v_cache, cache_lens, mask, scale, block_tables)
    return q.new_empty(q.shape)


@torch.library.register_fake("specops::skinny_linear")
def _skinny_linear_fake(x, weight, bias):
    skinny_linear_meta(x, weight, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
