"""Op benchmark of specops: chain and tree verification against the plain PyTorch they replace.

Providers, timed in one interleaved loop per case so they share the machine's noise:
  torch-multinomial   BASELINE: the batched equivalent of Hugging Face's _speculative_sampling
  torch-exprace       BASELINE: the same accept test, then a sync-free exponential race
  torch-argmax        BASELINE (greedy): argmax over every row, compare, cumprod
  torch-tree-walk     BASELINE (trees): a Python loop over the walk's tests, torch.rand accept
                      tests, residual rows with torch ops, torch.multinomial for the final token
  torch-tree-argmax   BASELINE (greedy trees): argmax over every row, then a Python walk
  specops-reference   specops' pure-PyTorch reference (use_backend("reference"))
  specops-cpu         specops' C++ kernels (default backend on the CPU)
  specops-triton      specops' Triton kernels (default backend on CUDA)
On CUDA every provider except the reference is also timed as a replayed CUDA graph
("+graph"), and the ratios there are against the graphed baselines. The "floor" is a
``sum()`` over as many contiguous float32 values as the op must read at the least.

    python bench/bench_ops.py --quick                # subset, < 3 min on a 2-core CPU
    python bench/bench_ops.py --quick --only tree    # the tree ops only (or --only chain)
    python bench/bench_ops.py                        # full grid
    python bench/bench_ops.py --quick --device cuda  # GPU (bench/run_gpu.sh)
    python bench/bench_ops.py --smoke                # tiny shapes, seconds, no CSV

Rows are appended to bench/results/ops_<cpu|gpu>.csv; see bench/README.md for the columns.
"""

import argparse
import csv
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
HEADLINE = (1, 5, 151936)  # B, K, V: Qwen2-size vocabulary, 5 drafts, one sequence
SLOW_REPS = 3  # repetitions, at least, of a provider slower than budget / min_reps per call

# ---------------------------------------------------------------------------------------------
# Baselines: what a user writes without specops. They draw their own random numbers (torch's
# generator, not specops' Philox), so their tokens differ from specops'; they are checked for
# valid outputs only.
# ---------------------------------------------------------------------------------------------


def _emit(draft_tokens: Tensor, num_accepted: Tensor, final: Tensor) -> Tensor:
    """[B, K+1] int64: accepted drafts, then the final token, then -1."""
    batch, num_slots = draft_tokens.shape
    slots = torch.arange(num_slots + 1, device=draft_tokens.device)
    padded = torch.cat([draft_tokens, draft_tokens.new_full((batch, 1), -1)], dim=1)
    n = num_accepted.long()[:, None]
    return torch.where(slots == n, final[:, None], torch.where(slots < n, padded, -1))


def _accept_and_residual(target_probs: Tensor, draft_tokens: Tensor,
                         draft_probs: Tensor) -> tuple[Tensor, Tensor]:
    """Accept test with ``torch.rand``; returns (num_accepted [B] int32, row to draw [B, V]).

    The row to draw from is ``max(0, p - q)`` at the first rejection, or the target row after
    the last draft when every draft was accepted (the bonus token).
    """
    batch, num_rows, _ = target_probs.shape
    num_slots = num_rows - 1
    idx = draft_tokens[..., None]
    p_x = target_probs[:, :num_slots].gather(-1, idx).squeeze(-1)   # [B, K]
    q_x = draft_probs.gather(-1, idx).squeeze(-1)                    # [B, K]
    accepted = torch.rand_like(p_x) <= p_x / q_x                     # HF: r_i <= p_i / q_i
    num_accepted = accepted.int().cumprod(-1).sum(-1, dtype=torch.int32)
    n = num_accepted.long()
    rows = torch.arange(batch, device=target_probs.device)
    p_next = target_probs[rows, n]                                   # [B, V]
    q_next = draft_probs[rows, n.clamp(max=num_slots - 1)]           # [B, V]
    rejected = (n < num_slots)[:, None]
    return num_accepted, torch.where(rejected, (p_next - q_next).clamp_min(0), p_next)


def chain_verify_multinomial(target_probs: Tensor, draft_tokens: Tensor,
                             draft_probs: Tensor) -> tuple[Tensor, Tensor]:
    """BASELINE. transformers' ``_speculative_sampling`` batched without host syncs: where
    HF branches on ``n_matches`` (a Python int), this selects with ``torch.where``.
    Residual normalised as HF does, then ``torch.multinomial``."""
    num_accepted, residual = _accept_and_residual(target_probs, draft_tokens, draft_probs)
    residual = residual / residual.sum(-1, keepdim=True)
    final = torch.multinomial(residual, 1).squeeze(-1)
    return _emit(draft_tokens, num_accepted, final), num_accepted


def chain_verify_exprace(target_probs: Tensor, draft_tokens: Tensor,
                         draft_probs: Tensor) -> tuple[Tensor, Tensor]:
    """BASELINE. gpt-fast's sync-free draw, ``argmax(r / Exp(1))``: it materialises one
    exponential per vocabulary entry (B*V noise), which is this baseline's cost."""
    num_accepted, residual = _accept_and_residual(target_probs, draft_tokens, draft_probs)
    noise = torch.empty_like(residual).exponential_(1)
    final = (residual / noise).argmax(-1)
    return _emit(draft_tokens, num_accepted, final), num_accepted


def chain_verify_greedy_argmax(target_logits: Tensor,
                               draft_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """BASELINE (greedy). Reads every row: argmax, compare, leading run, gather."""
    argmax = target_logits.argmax(-1)                                # [B, K+1]
    accepted = draft_tokens == argmax[:, :-1]
    num_accepted = accepted.int().cumprod(-1).sum(-1, dtype=torch.int32)
    final = argmax.gather(1, num_accepted.long()[:, None]).squeeze(1)
    return _emit(draft_tokens, num_accepted, final), num_accepted


# ---------------------------------------------------------------------------------------------
# Cases and the traffic each must move at the least.
# ---------------------------------------------------------------------------------------------


def make_case(op: str, case: str, batch: int, num_slots: int, vocab: int,
              device: str) -> dict[str, Tensor | None]:
    """Inputs for one case. ``random``: independent softmax(randn) rows for p and q (their
    overlap sum(min(p, q)) is about 0.48, so most chains stop at slot 0 or 1). ``accepted``:
    q = p, so every draft is accepted and the token is a bonus drawn from the last row.
    Greedy: ``random`` drafts are uniform ids (rejected at slot 0); ``accepted`` drafts are
    the rows' argmax (all accepted, every row must be read)."""
    gen = torch.Generator(device="cpu").manual_seed(1234 + batch * 7 + num_slots * 131 + vocab)
    shape = (batch, num_slots + 1, vocab)
    logits = torch.randn(shape, generator=gen).to(device)
    inputs: dict[str, Tensor | None] = {}
    if op == "chain_verify_greedy":
        inputs["target"] = logits
        if case == "accepted":
            inputs["draft_tokens"] = logits[:, :num_slots].argmax(-1)
        else:
            drafts = torch.randint(vocab, (batch, num_slots), generator=gen)
            inputs["draft_tokens"] = drafts.to(device)
        return inputs
    target = logits.softmax(-1)
    del logits
    if case == "accepted":
        draft = target[:, :num_slots].clone()
    else:
        draft = torch.randn((batch, num_slots, vocab), generator=gen).to(device).softmax(-1)
    torch.manual_seed(99)
    inputs["target"] = target
    inputs["draft_probs"] = draft
    inputs["draft_tokens"] = torch.multinomial(draft.view(-1, vocab), 1).view(batch, num_slots)
    inputs["seeds"] = torch.arange(batch, dtype=torch.int64, device=device) + 1000
    inputs["positions"] = torch.arange(batch, dtype=torch.int64, device=device) * 3 + 100
    return inputs


def min_traffic(op: str, batch: int, num_slots: int, vocab: int,
                num_accepted: Tensor) -> tuple[int, int]:
    """(bytes the math must move, float32 values in the rows it must read), given where the
    chains stop (``num_accepted`` from the reference: a deterministic function of the inputs).

    chain_verify, per call:
      accept tests read p(x) and q(x) at the draft tokens: 2*B*K floats, plus the tokens
        B*K int64 (an upper bound: a row may stop testing at its first rejection);
      the draw reads the full target row p[b, n_b] once per batch row, and for a row whose
        chain stopped at a rejection (n_b < K) the draft row q[b, n_b] too:
        (B + num_rejected) * V floats, i.e. B*V*4 bytes (all accepted) .. B*2*V*4 (all rejected);
      seeds and positions 2*B int64; writes tokens B*(K+1) int64 and num_accepted B int32.
    chain_verify_greedy, per call:
      slot j's test needs the argmax of row j, and the output is the argmax of row n_b, so a
        row reads rows 0..n_b: sum(n_b + 1) * V floats; plus the drafts B*K int64 and the
        same writes. (The torch-argmax baseline reads all B*(K+1)*V.)
    """
    n = num_accepted.long().cpu()
    io = 8 * batch * num_slots + 8 * batch * (num_slots + 1) + 4 * batch
    if op == "chain_verify_greedy":
        row_floats = int((n + 1).sum()) * vocab
        return 4 * row_floats + io, row_floats
    num_rejected = int((n < num_slots).sum())
    row_floats = (batch + num_rejected) * vocab
    return 4 * row_floats + 4 * 2 * batch * num_slots + 16 * batch + io, row_floats


def check_outputs(out: tuple[Tensor, Tensor], draft_tokens: Tensor, vocab: int,
                  all_accepted: bool) -> None:
    """Raises AssertionError unless ``out`` is a well-formed chain result."""
    tokens, num_accepted = out
    batch, num_slots = draft_tokens.shape
    assert tokens.shape == (batch, num_slots + 1) and tokens.dtype == torch.int64, \
        f"tokens: {tuple(tokens.shape)} {tokens.dtype}"
    assert num_accepted.shape == (batch,) and num_accepted.dtype == torch.int32, \
        f"num_accepted: {tuple(num_accepted.shape)} {num_accepted.dtype}"
    t, n, d = tokens.cpu(), num_accepted.long().cpu(), draft_tokens.cpu()
    assert bool(((n >= 0) & (n <= num_slots)).all()), f"num_accepted out of range: {n.tolist()}"
    slots = torch.arange(num_slots + 1)
    padded = torch.cat([d, torch.full((batch, 1), -1)], dim=1)
    prefix = slots < n[:, None]
    assert bool((t[prefix] == padded[prefix]).all()), "accepted tokens differ from the drafts"
    final = t.gather(1, n[:, None]).squeeze(1)
    assert bool(((final >= 0) & (final < vocab)).all()), f"final token out of range: {final}"
    assert bool((t[slots > n[:, None]] == -1).all()), "slots after the final token are not -1"
    if all_accepted:
        assert bool((n == num_slots).all()), f"q = p but not all accepted: {n.tolist()}"


# ---------------------------------------------------------------------------------------------
# Token trees: tree_verify (sampling) and tree_verify_greedy. The same tree in every row.
# ---------------------------------------------------------------------------------------------

TREE_HEADLINE = (1, 64, 151936)  # B, T, V: one sequence, a 64-node EAGLE-like tree
TREE_TOP_K = 4                   # children per expanded node, nodes expanded per level
RANK_WEIGHT = 0.5                # a child of rank j scores RANK_WEIGHT**j of its parent


def eagle_parents(num_nodes: int, top_k: int = TREE_TOP_K) -> list[int]:
    """An EAGLE-2-like static tree, ``parents`` in topological order: each level expands the
    ``top_k`` best nodes of the level above (path score: the product of ``RANK_WEIGHT**rank``
    along the path; ties to the lower index) into ``top_k`` children each, until ``num_nodes``.
    T=8: 1+4+3 nodes per level; 32: 1+4+16+11; 64: 1+4+16+16+16+11 (depth 5); 128: depth 9."""
    parents, score, level = [-1], [1.0], [0]
    while len(parents) < num_nodes:
        best = sorted(level, key=lambda i: -score[i])[:top_k]
        level = []
        for parent in best:
            for rank in range(top_k):
                if len(parents) < num_nodes:
                    level.append(len(parents))
                    parents.append(parent)
                    score.append(score[parent] * RANK_WEIGHT ** rank)
    return parents


def tree_children_lists(parents: Tensor) -> tuple[Tensor, Tensor]:
    """(first_child, next_sibling), [B, T] int64 with T for none: the index form of a walk,
    as a user computes it once per tree with torch ops."""
    num_slots = parents.shape[1]
    nodes = torch.arange(num_slots, device=parents.device)
    p = parents.long()
    is_child = p[:, None, :] == nodes[:, None]                       # [B, c, i]: c -> i
    first_child = torch.where(is_child, nodes, num_slots).amin(-1)
    later_sibling = (p[:, :, None] == p[:, None, :]) & (nodes[:, None] < nodes)  # [B, i, j]
    next_sibling = torch.where(later_sibling, nodes, num_slots).amin(-1)
    return first_child, next_sibling


def tree_verify_walk(target_probs: Tensor, tree_tokens: Tensor, parents: Tensor,
                     draft_probs: Tensor | None, early_exit: bool = True
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """BASELINE. The walk a user writes in PyTorch: batched over rows, one Python step per
    tested child, ``torch.rand`` accept tests (``u * q(x) < r(x)``), residual rows
    ``max(0, r - q)`` renormalised with torch ops (``q`` one-hot for deterministic children),
    ``torch.multinomial`` for the final token. It stops once no row is testing: one host sync
    per step, free on the CPU; inside a CUDA graph capture (``early_exit=False``) it runs all
    T - 1 steps."""
    batch, num_slots, _ = target_probs.shape
    device = target_probs.device
    rows = torch.arange(batch, device=device)
    first_child, next_sibling = tree_children_lists(parents)
    candidate = first_child[:, 0]
    r = target_probs[:, 0]
    num_accepted = torch.zeros(batch, dtype=torch.int64, device=device)
    tokens = torch.full((batch, num_slots), -1, dtype=torch.int64, device=device)
    path = torch.full((batch, num_slots), -1, dtype=torch.int32, device=device)
    for _ in range(num_slots - 1):
        testing = candidate < num_slots
        if early_exit and not bool(testing.any()):
            break
        node = candidate.clamp(max=num_slots - 1)
        x = tree_tokens[rows, node]
        if draft_probs is None:
            q = torch.zeros_like(r).scatter_(1, x[:, None], 1.0)
        else:
            q = draft_probs[rows, node]
        accept = testing & (torch.rand(batch, device=device) * q[rows, x] < r[rows, x])
        reject = testing & ~accept
        slot = num_accepted
        tokens[rows, slot] = torch.where(accept, x, tokens[rows, slot])
        path[rows, slot] = torch.where(accept, node.int(), path[rows, slot])
        num_accepted = num_accepted + accept.long()
        residual = (r - q).clamp_min(0)
        mass = residual.sum(-1, keepdim=True)
        r = torch.where(accept[:, None], target_probs[rows, node],
                        torch.where(reject[:, None] & (mass > 0), residual / mass, r))
        candidate = torch.where(accept, first_child[rows, node],
                                torch.where(reject, next_sibling[rows, node], candidate))
    tokens[rows, num_accepted] = torch.multinomial(r, 1).squeeze(1)
    return tokens, path, num_accepted.int()


def tree_verify_greedy_argmax(target_logits: Tensor, tree_tokens: Tensor, parents: Tensor,
                              early_exit: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """BASELINE (greedy). Argmax of every row, then a Python walk with torch ops: each step
    moves to the first child whose token is its parent's argmax; emits the argmax where none
    is. Stops early as ``tree_verify_walk`` does."""
    batch, num_slots, _ = target_logits.shape
    device = target_logits.device
    rows = torch.arange(batch, device=device)
    nodes = torch.arange(num_slots, device=device)
    argmax = target_logits.argmax(-1)                                # [B, T]
    p = parents.long()
    match = (p >= 0) & (tree_tokens == argmax.gather(1, p.clamp(min=0)))
    current = torch.zeros(batch, dtype=torch.int64, device=device)
    num_accepted = torch.zeros(batch, dtype=torch.int64, device=device)
    tokens = torch.full((batch, num_slots), -1, dtype=torch.int64, device=device)
    path = torch.full((batch, num_slots), -1, dtype=torch.int32, device=device)
    for _ in range(num_slots - 1):
        chosen = torch.where((p == current[:, None]) & match, nodes, num_slots).amin(-1)
        move = chosen < num_slots
        if early_exit and not bool(move.any()):
            break
        node = chosen.clamp(max=num_slots - 1)
        slot = num_accepted
        tokens[rows, slot] = torch.where(move, tree_tokens[rows, node], tokens[rows, slot])
        path[rows, slot] = torch.where(move, node.int(), path[rows, slot])
        num_accepted = num_accepted + move.long()
        current = torch.where(move, node, current)
    tokens[rows, num_accepted] = argmax[rows, current]
    return tokens, path, num_accepted.int()


def make_tree_case(op: str, case: str, batch: int, num_slots: int, vocab: int,
                   device: str) -> dict[str, Tensor | None]:
    """Inputs for one tree case, built row by row on the CPU (no [B, T, V] temporaries).

    ``eagle4-*``: ``eagle_parents(T)``; the children of each expanded node carry the top-4
    tokens of a random draft row, in rank order (distinct siblings), and are deterministic
    (``draft_probs=None``). ``-random``: target rows ``softmax(randn)``, where a child's token
    has p ~ 1/V: all four children of the root are rejected and the token is drawn there.
    ``-peaked``: the row of each expanded node is ``0.2 softmax(randn) + 0.8`` at one child's
    token, the child picked with probability ~ ``RANK_WEIGHT**rank``: the walk rejects the
    siblings ranked above it, accepts it with probability ~0.8 and goes on down.
    ``star-sampled``: the root and T - 1 children whose tokens are drawn independently (with
    replacement) from one draft row ``q = softmax(randn)``; ``draft_probs`` rows are all ``q``;
    target rows ``softmax(randn)`` (first child accepted with probability ~0.48, and each
    rejection costs a pass over the vocabulary).
    Greedy: logits ``randn`` (``-random``: no child is its parent's argmax), ``-peaked``: +20 at
    the child token picked as above, so the walk follows it to a leaf."""
    gen = torch.Generator(device="cpu").manual_seed(4321 + batch * 7 + num_slots * 131 + vocab)
    greedy = op == "tree_verify_greedy"
    tree, target_kind = case.split("-")
    parent_list = eagle_parents(num_slots) if tree == "eagle4" else [-1] + [0] * (num_slots - 1)
    parents = torch.tensor(parent_list, dtype=torch.int32).expand(batch, -1).contiguous()
    tree_tokens = torch.randint(vocab, (batch, num_slots), generator=gen)
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(parent_list[1:], start=1):
        children.setdefault(parent, []).append(node)

    draft_probs = None
    if tree == "star":
        q = torch.randn(batch, vocab, generator=gen).softmax(-1)
        tree_tokens[:, 1:] = torch.multinomial(q, num_slots - 1, replacement=True, generator=gen)
        draft_probs = q[:, None].expand(batch, num_slots, vocab).contiguous()
    else:
        for parent, kids in children.items():
            draft_row = torch.randn(batch, vocab, generator=gen)
            tree_tokens[:, kids] = draft_row.topk(len(kids), -1).indices

    rows = torch.arange(batch)
    target = torch.empty(batch, num_slots, vocab)
    for node in range(num_slots):
        logits = torch.randn(batch, vocab, generator=gen)
        kids = children.get(node)
        peak = None
        if target_kind == "peaked" and kids:
            weights = torch.tensor([RANK_WEIGHT ** rank for rank in range(len(kids))])
            rank = torch.multinomial(weights.expand(batch, -1), 1, generator=gen).squeeze(1)
            peak = tree_tokens[rows, torch.tensor(kids)[rank]]
        if greedy:
            if peak is not None:
                logits[rows, peak] += 20.0
            target[:, node] = logits
        else:
            target[:, node] = logits.softmax(-1)
            if peak is not None:
                target[:, node] *= 0.2
                target[rows, node, peak] += 0.8
    inputs: dict[str, Tensor | None] = {
        "target": target.to(device), "tree_tokens": tree_tokens.to(device),
        "parents": parents.to(device),
        "draft_probs": None if draft_probs is None else draft_probs.to(device)}
    if not greedy:
        inputs["seeds"] = torch.arange(batch, dtype=torch.int64, device=device) + 1000
        inputs["positions"] = torch.arange(batch, dtype=torch.int64, device=device) * 3 + 100
    return inputs


def tree_num_tested(parents: Tensor, path: Tensor, num_accepted: Tensor) -> Tensor:
    """[B] int64: children a walk tested (children are tested in index order): for each
    accepted node its rank among its siblings + 1, then every child of the node where the
    walk stopped. Rejected children = this - num_accepted."""
    p = parents.long().cpu()
    num_slots = p.shape[1]
    nodes = torch.arange(num_slots)
    rank = ((p[:, :, None] == p[:, None, :]) & (nodes[None, :] < nodes[:, None])).sum(-1)
    num_children = (p[:, None, :] == nodes[:, None]).sum(-1)        # [B, c]
    n = num_accepted.long().cpu()
    path = path.long().cpu()
    on_path = torch.arange(num_slots) < n[:, None]
    tested_on_path = torch.where(on_path, rank.gather(1, path.clamp(min=0)) + 1, 0).sum(-1)
    stop = torch.where(n > 0, path.gather(1, (n - 1).clamp(min=0)[:, None]).squeeze(1), 0)
    return tested_on_path + num_children.gather(1, stop[:, None]).squeeze(1)


def tree_min_traffic(op: str, inputs: dict, reference: tuple[Tensor, Tensor, Tensor]
                     ) -> tuple[int, int]:
    """(bytes the math must move, float32 values in the rows it must read), given the walk
    the reference took (a deterministic function of the inputs).

    tree_verify, per call:
      the tree: parents B*T int32, to find the children of the nodes visited (an upper bound,
        as the chain's tokens);
      accept tests read one entry per tested node: r(x) (4 bytes, a target-row entry scaled by
        the running residual mass), the node's token (8) and, for sampled children, q_i(x)
        (4): num_tested * (12 or 16) bytes;
      each rejection of a sampled child reads the q row and the residual row (the target row
        at the first rejection): 2*V floats per rejection; a rejected deterministic child only
        moves r(x) out of the residual mass (no pass over the row);
      the final draw reads one row (the stop node's target or residual row): B*V floats;
      seeds and positions 2*B int64; writes tokens B*T int64, path B*T int32, num_accepted
        B int32.
      => (B + 2 * sampled rejections) * V floats of rows.
    tree_verify_greedy, per call: the walk needs the argmax of every row it visits (root and
      accepted nodes): sum(n_b + 1) * V floats; plus parents, tokens B*T int64 (an upper
      bound) and the same writes. (The torch-tree-argmax baseline reads all B*T*V.)
    """
    parents = inputs["parents"]
    batch, num_slots, vocab = inputs["target"].shape
    _, path, num_accepted = reference
    n = num_accepted.long().cpu()
    io = 4 * batch * num_slots + 8 * batch * num_slots + 4 * batch * num_slots + 4 * batch
    if op == "tree_verify_greedy":
        row_floats = int((n + 1).sum()) * vocab
        return 4 * row_floats + io + 8 * batch * num_slots, row_floats
    num_tested = int(tree_num_tested(parents, path, num_accepted).sum())
    sampled = inputs["draft_probs"] is not None
    num_rejected = num_tested - int(n.sum())
    row_floats = (batch + (2 * num_rejected if sampled else 0)) * vocab
    tests = num_tested * (16 if sampled else 12)
    return 4 * row_floats + tests + 16 * batch + io, row_floats


def check_tree_outputs(out: tuple[Tensor, Tensor, Tensor], tree_tokens: Tensor,
                       parents: Tensor, vocab: int) -> None:
    """Raises AssertionError unless ``out`` is a well-formed walk of the tree."""
    tokens, path, num_accepted = out
    batch, num_slots = tree_tokens.shape
    assert tokens.shape == (batch, num_slots) and tokens.dtype == torch.int64, \
        f"tokens: {tuple(tokens.shape)} {tokens.dtype}"
    assert path.shape == (batch, num_slots) and path.dtype == torch.int32, \
        f"path: {tuple(path.shape)} {path.dtype}"
    assert num_accepted.shape == (batch,) and num_accepted.dtype == torch.int32, \
        f"num_accepted: {tuple(num_accepted.shape)} {num_accepted.dtype}"
    t, pth, n = tokens.cpu(), path.long().cpu(), num_accepted.long().cpu()
    assert bool(((n >= 0) & (n < num_slots)).all()), f"num_accepted out of range: {n.tolist()}"
    slots = torch.arange(num_slots)
    prefix = slots < n[:, None]
    assert bool(((pth >= 1) & (pth < num_slots))[prefix].all()), "path node out of range"
    previous = torch.cat([torch.zeros(batch, 1, dtype=torch.int64), pth[:, :-1]], dim=1)
    parent_of = parents.long().cpu().gather(1, pth.clamp(min=0))
    assert bool((parent_of == previous)[prefix].all()), "path is not a root-down walk"
    node_tokens = tree_tokens.cpu().gather(1, pth.clamp(min=0))
    assert bool((t == node_tokens)[prefix].all()), "accepted tokens differ from the nodes'"
    final = t.gather(1, n[:, None]).squeeze(1)
    assert bool(((final >= 0) & (final < vocab)).all()), f"final token out of range: {final}"
    assert bool((t[slots > n[:, None]] == -1).all()), "slots after the final token are not -1"
    assert bool((pth[~prefix] == -1).all()), "path slots after the accepted nodes are not -1"


# ---------------------------------------------------------------------------------------------
# Timing: providers alternate inside each repetition (rotating who goes first).
# ---------------------------------------------------------------------------------------------


def _rotations(names: list[str], reps: int, quota: dict[str, int] | None = None):
    """Each repetition's order; a provider with a quota sits out the repetitions past it."""
    quota = quota or {}
    for rep in range(reps):
        k = rep % len(names)
        yield [name for name in names[k:] + names[:k] if rep < quota.get(name, reps)]


def time_cpu(fns: dict[str, Callable], reps: int,
             quota: dict[str, int] | None = None) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for order in _rotations(list(fns), reps, quota):
        for name in order:
            start = time.perf_counter_ns()
            fns[name]()
            samples[name].append((time.perf_counter_ns() - start) / 1e3)
    return samples


def time_cuda(fns: dict[str, Callable], reps: int,
              quota: dict[str, int] | None = None) -> dict[str, list[float]]:
    """CUDA events around each call, as triton.testing.do_bench does (caches stay warm, as
    for the floor). An eager provider's time includes its launch gaps when the GPU waits
    for the host, which is what it costs in a decode loop."""
    pairs: dict[str, list] = {name: [] for name in fns}
    for order in _rotations(list(fns), reps, quota):
        for name in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            pairs[name].append((start, end))
    torch.cuda.synchronize()
    return {name: [s.elapsed_time(e) * 1e3 for s, e in ev] for name, ev in pairs.items()}


def cuda_graphed(fn: Callable) -> tuple[Callable, Callable]:
    """(replay, result): ``fn`` captured once in a CUDA graph; ``result()`` reads its outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, lambda: (graph.replay(), out)[1]


def quantile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


# ---------------------------------------------------------------------------------------------
# One case: build providers, validate each once, time them together.
# ---------------------------------------------------------------------------------------------


def providers_for(op: str, inputs: dict, device: str, specops) -> dict[str, Callable]:
    """name -> a callable returning the op's outputs (chains: tokens, num_accepted; trees:
    tokens, path, num_accepted). Providers that cannot run here are still listed; their first
    call raises and becomes an error row."""
    target = inputs["target"]
    kernels = "specops-cpu" if device == "cpu" else "specops-triton"

    def reference(fn):
        def call():
            with specops.use_backend("reference"):
                return fn()
        return call

    if op.startswith("tree_"):
        tree_tokens, parents = inputs["tree_tokens"], inputs["parents"]

        def eager() -> bool:  # the baselines' early exit syncs; a CUDA graph capture cannot
            return not (target.is_cuda and torch.cuda.is_current_stream_capturing())

        if op == "tree_verify_greedy":
            def specops_call():
                return specops.tree_verify_greedy(target, tree_tokens, parents)
            return {"torch-tree-argmax": lambda: tree_verify_greedy_argmax(
                        target, tree_tokens, parents, early_exit=eager()),
                    "specops-reference": reference(specops_call), kernels: specops_call}
        draft_probs, seeds, positions = inputs["draft_probs"], inputs["seeds"], inputs["positions"]

        def specops_call():
            return specops.tree_verify(target, tree_tokens, parents, None, draft_probs,
                                       seeds=seeds, positions=positions)
        return {"torch-tree-walk": lambda: tree_verify_walk(
                    target, tree_tokens, parents, draft_probs, early_exit=eager()),
                "specops-reference": reference(specops_call), kernels: specops_call}

    drafts = inputs["draft_tokens"]
    if op == "chain_verify_greedy":
        def specops_call():
            return specops.chain_verify_greedy(target, drafts)
        return {"torch-argmax": lambda: chain_verify_greedy_argmax(target, drafts),
                "specops-reference": reference(specops_call), kernels: specops_call}
    draft_probs, seeds, positions = inputs["draft_probs"], inputs["seeds"], inputs["positions"]

    def specops_call():
        return specops.chain_verify(target, drafts, draft_probs, seeds=seeds, positions=positions)
    return {"torch-multinomial": lambda: chain_verify_multinomial(target, drafts, draft_probs),
            "torch-exprace": lambda: chain_verify_exprace(target, drafts, draft_probs),
            "specops-reference": reference(specops_call), kernels: specops_call}


def run_case(op: str, case: str, batch: int, size: int, vocab: int, args,
             specops, kernels_error: str | None) -> list[dict]:
    """One case; ``size`` is K (drafts) for the chain ops and T (nodes) for the tree ops."""
    device = args.device
    tree = op.startswith("tree_")
    if tree:
        inputs = make_tree_case(op, case, batch, size, vocab, device)

        def check(out):
            check_tree_outputs(out, inputs["tree_tokens"], inputs["parents"], vocab)
    else:
        inputs = make_case(op, case, batch, size, vocab, device)

        def check(out):
            check_outputs(out, inputs["draft_tokens"], vocab, case == "accepted")
    calls = providers_for(op, inputs, device, specops)
    kernels = "specops-cpu" if device == "cpu" else "specops-triton"

    # Validate each provider once; on CUDA add the graphed variants (not the reference).
    timed: dict[str, Callable] = {}
    errors: dict[str, str] = {}
    outputs: dict[str, tuple[Tensor, ...]] = {}
    first_call_s: dict[str, float] = {}  # eager calls only; the warm-up decides who is slow
    variants = [(name, fn, False) for name, fn in calls.items()]
    if device == "cuda":
        variants += [(name + "+graph", fn, True) for name, fn in calls.items()
                     if name != "specops-reference"]
    for name, fn, graphed in variants:
        base = name.removesuffix("+graph")
        if base == kernels and kernels_error:
            errors[name] = kernels_error
            continue
        try:
            if graphed:
                replay, result = cuda_graphed(fn)
                out, timed[name] = result(), replay
            else:
                start = time.perf_counter()
                out, timed[name] = fn(), fn
                first_call_s[name] = time.perf_counter() - start
            check(out)
            outputs[name] = out
        except Exception as error:  # a provider that fails is a row, not a crash
            timed.pop(name, None)
            errors[name] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"

    reference = outputs.get("specops-reference")
    if reference is None:  # traffic needs where the walks stop; recompute without timing
        with specops.use_backend("reference"):
            reference = calls["specops-reference"]()
    if tree:
        num_bytes, row_floats = tree_min_traffic(op, inputs, reference)
    else:
        num_bytes, row_floats = min_traffic(op, batch, size, vocab, reference[-1])
    # the floor reads row_floats contiguous values: the target, then the draft rows if more
    # (a star whose sampled children are mostly rejected reads more than B*T*V)
    floor_src, left = [], row_floats
    for values in (inputs["target"], inputs.get("draft_probs")):
        if values is not None and left > 0:
            floor_src.append(values.reshape(-1)[:left])
            left -= floor_src[-1].numel()

    def floor():
        return [t.sum() for t in floor_src]
    if device == "cuda":
        timed["floor"], _ = cuda_graphed(floor)
    else:
        timed["floor"] = floor

    # Warm up, then size the repetitions to the time budget. A provider whose call alone
    # takes more than budget / min_reps (the reference walks of big trees: seconds) is
    # "slow": it leaves the warm-up after one round and is timed in the first
    # max(SLOW_REPS, budget / its time) repetitions only, still interleaved with the others.
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rounds, slow = [], {}
    for _ in range(max(args.warmup, 2)):
        round_s = 0.0
        for name, fn in timed.items():
            if name in slow:
                continue
            start = time.perf_counter()
            fn()
            sync()
            elapsed = time.perf_counter() - start
            call_s = min(elapsed, first_call_s.get(name, elapsed))  # one spike is not slow
            if not rounds and call_s > args.budget / args.min_reps:
                slow[name] = call_s
            else:
                round_s += elapsed
        rounds.append(round_s)
    per_round = max(sorted(rounds[1:])[len(rounds[1:]) // 2], 1e-6)  # the first one compiles
    reps = int(min(args.max_reps, max(args.min_reps, args.budget / per_round)))
    quota = {name: min(reps, max(SLOW_REPS, int(args.budget / elapsed)))
             for name, elapsed in slow.items()}
    load = f"{os.getloadavg()[0]:.2f}"  # other work on the machine skews every provider
    samples = (time_cuda if device == "cuda" else time_cpu)(timed, reps, quota)

    stats = {}
    for name, values in samples.items():
        values.sort()
        stats[name] = (quantile(values, 0.5), quantile(values, 0.1), quantile(values, 0.9))
    floor_us = stats.pop("floor")[0]
    suffix = "+graph" if device == "cuda" else ""
    if tree:
        bases = {"walk": "torch-tree-walk" + suffix, "argmax": "torch-tree-argmax" + suffix}
        shape = {"T": size}
    else:
        bases = {"multinomial": "torch-multinomial" + suffix, "exprace": "torch-exprace" + suffix,
                 "argmax": "torch-argmax" + suffix}
        shape = {"K": size}
    rows = []
    for name, _, _ in variants:
        row = {"op": op, "provider": name, "B": batch, **shape, "V": vocab, "case": case,
               "reps": quota.get(name, reps), "min_bytes": num_bytes, "floor_us": f"{floor_us:.2f}",
               "load_avg": load}
        if name in stats:
            median, p10, p90 = stats[name]
            out = outputs[name]
            row.update(median_us=f"{median:.2f}", p10_us=f"{p10:.2f}", p90_us=f"{p90:.2f}",
                       gbps=f"{num_bytes / median / 1e3:.2f}", vs_floor=f"{median / floor_us:.2f}",
                       mean_accepted=f"{out[-1].float().mean().item():.2f}")
            if tree:
                rejected = tree_num_tested(inputs["parents"], out[1], out[2]) - out[2].long().cpu()
                row["mean_rejected"] = f"{rejected.float().mean().item():.2f}"
            for key, base in bases.items():
                if base in stats:
                    row[f"ratio_vs_{key}"] = f"{stats[base][0] / median:.2f}"
            if name.startswith("specops-") and name.removesuffix("+graph") != "specops-reference":
                # tokens (and, for trees, path) row by row; num_accepted follows from them
                same = torch.stack([(a.cpu() == b.cpu()).all(-1)
                                    for a, b in zip(out[:-1], reference[:-1])]).all(0)
                row["check"] = "ok, = reference" if bool(same.all()) else \
                    f"ok, {int((~same).sum())}/{batch} rows differ from reference"
            else:
                row["check"] = "ok"
        else:
            row["error"] = errors[name]
        rows.append(row)
    del inputs, calls, timed, outputs, reference, floor_src
    return rows


# ---------------------------------------------------------------------------------------------
# Recording: environment, CSV, table, targets.
# ---------------------------------------------------------------------------------------------

COLUMNS = ["date", "commit", "machine", "device", "num_threads", "torch", "triton", "python",
           "command", "op", "provider", "B", "K", "V", "case", "median_us", "p10_us", "p90_us",
           "reps", "ratio_vs_multinomial", "ratio_vs_exprace", "ratio_vs_argmax", "gbps",
           "min_bytes", "floor_us", "vs_floor", "mean_accepted", "check", "checks_level",
           "load_avg", "error", "T", "ratio_vs_walk", "mean_rejected"]  # the last 3: trees


def git_commit() -> str:
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = [line for line in git("status", "--porcelain").splitlines()
                 if not line[3:].startswith("bench/results/")]
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def environment(device: str, specops) -> dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "machine": machine(device), "device": device,
            "num_threads": str(torch.get_num_threads()), "torch": torch.__version__,
            "triton": triton_version, "python": platform.python_version(),
            "command": " ".join(["python", *map(shlex.quote, sys.argv)]),
            "checks_level": specops.get_checks() if hasattr(specops, "get_checks") else ""}


def append_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with path.open() as f:
            header = next(csv.reader(f))
        if header != COLUMNS and header == COLUMNS[:len(header)]:
            # a file from before columns were added at the end: rewrite it with the new
            # header, its rows keep their values and leave the new columns empty
            with path.open(newline="") as f:
                old_rows = list(csv.DictReader(f))
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(old_rows)
        elif header != COLUMNS:
            raise SystemExit(f"{path} has other columns; move it aside or pass --csv")
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def print_rows(rows: list[dict]) -> None:
    first = rows[0]
    reps = max(int(row["reps"]) for row in rows)  # slow providers: fewer, beside their name
    tree = first["op"].startswith("tree_")
    # (header, column): the ratio columns this op has, then the counts
    ratios = [("x walk", "ratio_vs_walk"), ("x argmax", "ratio_vs_argmax")] if tree else \
        [("x multi", "ratio_vs_multinomial"), ("x exprace", "ratio_vs_exprace"),
         ("x argmax", "ratio_vs_argmax")]
    counts = [("acc", "mean_accepted")] + ([("rej", "mean_rejected")] if tree else [])
    widths = {"x multi": 9, "x exprace": 10, "x argmax": 9, "x walk": 9, "acc": 6, "rej": 6}
    shape = f"T={first['T']}" if tree else f"K={first['K']}"
    print(f"\n{first['op']}  B={first['B']} {shape} V={first['V']}  case={first['case']}  "
          f"floor={first['floor_us']} us  min traffic={int(first['min_bytes']) / 1e6:.2f} MB  "
          f"reps={reps}  load={first['load_avg']}")
    print(f"{'provider':<24}{'median us':>11}{'p10-p90 us':>20}"
          + "".join(f"{h:>{widths[h]}}" for h, _ in ratios) + f"{'GB/s':>8}{'/floor':>8}"
          + "".join(f"{h:>{widths[h]}}" for h, _ in counts) + "  check")
    for row in rows:
        if "error" in row:
            print(f"{row['provider']:<24}  ERROR {row['error']}")
            continue
        spread = f"{row['p10_us']}-{row['p90_us']}"
        label = row["provider"] + (f" ({row['reps']})" if int(row["reps"]) != reps else "")
        print(f"{label:<24}{row['median_us']:>11}{spread:>20}"
              + "".join(f"{row.get(k, '-'):>{widths[h]}}" for h, k in ratios)
              + f"{row['gbps']:>8}{row['vs_floor']:>8}"
              + "".join(f"{row.get(k, '-'):>{widths[h]}}" for h, k in counts)
              + f"  {row['check']}")
    sys.stdout.flush()


def print_targets(rows: list[dict], device: str) -> None:
    """The issue's targets beside what this run measured; a target whose row was not measured
    says so instead of passing or failing. Sections only for the ops that ran."""
    def find(op, provider, batch, size, vocab, case):
        key = "T" if op.startswith("tree_") else "K"
        for row in rows:
            if (row["op"], row["provider"], row["B"], row.get(key), row["V"], row["case"]) == \
                    (op, provider, batch, size, vocab, case):
                return row if "median_us" in row else None
        return None

    def verdict(row, key, goal, at_least):
        if row is None or not row.get(key):
            return "not measured"
        value = float(row[key])
        met = value >= goal if at_least else value <= goal
        unit = "x" if key.startswith("ratio") else " us"
        return f"{value:.2f}{unit}: {'MET' if met else 'NOT MET'}"

    ops = {row["op"] for row in rows}
    if ops & {"chain_verify", "chain_verify_greedy"}:
        print("\nTargets (chain_verify, case=random unless named):")
        if device == "cpu":
            for case in ("random", "accepted"):
                row = find("chain_verify", "specops-cpu", *HEADLINE, case)
                print(f"  CPU B=1 K=5 V=151936 {case}: specops-cpu >= 20x torch-multinomial: "
                      f"{verdict(row, 'ratio_vs_multinomial', 20, True)}; >= 10x torch-exprace: "
                      f"{verdict(row, 'ratio_vs_exprace', 10, True)}")
        else:
            for provider in ("specops-triton+graph", "specops-triton"):
                head = find("chain_verify", provider, *HEADLINE, "random")
                big = find("chain_verify", provider, 32, 8, 128256, "random")
                print(f"  GPU {provider}: B=1 K=5 V=151936 <= 8 us: "
                      f"{verdict(head, 'median_us', 8, False)}; B=32 K=8 V=128256 <= 25 us: "
                      f"{verdict(big, 'median_us', 25, False)}; >= 20x torch-multinomial+graph "
                      f"at B=1 K=5 V=151936: {verdict(head, 'ratio_vs_multinomial', 20, True)}")
    if ops & {"tree_verify", "tree_verify_greedy"}:
        print("\nTargets (tree_verify, EAGLE-like top-4 tree, deterministic children):")
        kernels = ["specops-cpu"] if device == "cpu" else ["specops-triton+graph",
                                                           "specops-triton"]
        for provider in kernels:
            for case in ("eagle4-random", "eagle4-peaked"):
                row = find("tree_verify", provider, *TREE_HEADLINE, case)
                goal = (f">= 10x torch-tree-walk: {verdict(row, 'ratio_vs_walk', 10, True)}"
                        if device == "cpu" else
                        f"<= 20 us: {verdict(row, 'median_us', 20, False)}")
                print(f"  {device.upper()} {provider} B=1 T=64 V=151936 {case}: {goal}")
        print("Reported without a target (sampled children: a full-vocabulary pass per rejected "
              "sibling):")
        for row in rows:
            if row["case"] == "star-sampled" and row["provider"] in kernels:
                result = (f"{row['median_us']} us, {row['ratio_vs_walk']}x torch-tree-walk, "
                          f"{row['mean_rejected']} rejected" if "median_us" in row
                          else "not measured")
                print(f"  {row['provider']} star B={row['B']} T={row['T']} V={row['V']}: "
                      f"{result}")


# ---------------------------------------------------------------------------------------------


def grid(mode: str, only: str | None = None) -> list[tuple[str, str, int, int, int]]:
    """(op, case, B, K or T, V) in run order; ``only``: "chain" or "tree"."""
    chain = [("chain_verify", c, *HEADLINE) for c in ("random", "accepted")]
    tree_cases = ("eagle4-random", "eagle4-peaked", "star-sampled")
    greedy_cases = ("eagle4-random", "eagle4-peaked")
    tree = [("tree_verify", c, *TREE_HEADLINE) for c in tree_cases]
    if mode == "smoke":
        chain = ([("chain_verify", c, b, k, 1000) for b in (1, 2) for k in (1, 2)
                  for c in ("random", "accepted")]
                 + [("chain_verify_greedy", c, 2, 2, 1000) for c in ("random", "accepted")])
        tree = ([("tree_verify", c, b, 8, 1000) for b in (1, 2) for c in tree_cases]
                + [("tree_verify_greedy", c, 2, 8, 1000) for c in greedy_cases])
    elif mode == "quick":
        chain += [("chain_verify", "random", 1, 4, 32000),
                  ("chain_verify", "random", 8, 4, 128256),
                  ("chain_verify", "random", 32, 8, 128256),
                  ("chain_verify", "accepted", 32, 8, 128256)]
        tree += [("tree_verify", "eagle4-peaked", 1, t, 151936) for t in (8, 128)]
        tree += [("tree_verify", "eagle4-peaked", 8, 32, 128256),
                 ("tree_verify", "eagle4-peaked", 32, 8, 128256)]
    else:
        chain += [("chain_verify", c, b, k, v) for v in (32000, 128256, 151936)
                  for b in (1, 8, 32, 64) for k in (1, 4, 8) for c in ("random", "accepted")]
        tree += [("tree_verify", c, b, t, v) for v in (128256, 151936) for b in (1, 8, 32)
                 for t in (8, 32, 64, 128) for c in tree_cases]
        tree += [("tree_verify_greedy", c, b, t, v) for v in (128256, 151936)
                 for b in (1, 8, 32) for t in (8, 32, 64, 128)
                 for c in greedy_cases]
    if mode != "smoke":
        chain += [("chain_verify_greedy", c, *HEADLINE) for c in ("random", "accepted")]
        tree += [("tree_verify_greedy", c, *TREE_HEADLINE) for c in greedy_cases]
    tree = list(dict.fromkeys(tree))  # the full grid repeats the headline cases
    return (chain if only != "tree" else []) + (tree if only != "chain" else [])


def import_specops():
    """specops, and why its kernels cannot run here (None if they can)."""
    try:
        import specops
    except ImportError as error:  # extension missing or stale: keep the reference rows
        os.environ["SPECOPS_BACKEND"] = "reference"
        for name in [m for m in sys.modules if m == "specops" or m.startswith("specops.")]:
            del sys.modules[name]
        import specops
        return specops, f"ImportError: {str(error).splitlines()[0][:160]}"
    try:
        specops.set_backend("kernels")
    except RuntimeError as error:
        return specops, f"RuntimeError: {error}"
    return specops, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="headline shape and a few others")
    mode.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds, no CSV")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--only", choices=("chain", "tree"), help="one family of ops")
    parser.add_argument("--csv", type=Path, help="default bench/results/ops_<cpu|gpu>.csv")
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument("--budget", type=float, help="seconds of timing per case")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-reps", type=int, help="repetitions per provider, at least; a "
                        "provider slower than budget/min-reps per call gets >= 3")
    parser.add_argument("--max-reps", type=int, default=2000)
    args = parser.parse_args()
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    gpu = args.device == "cuda"
    if args.budget is None:
        args.budget = {"smoke": 0.05, "quick": 3.0, "full": 3.0}[mode_name] / (5 if gpu else 1)
    if args.min_reps is None:
        args.min_reps = {"smoke": 5, "quick": 10, "full": 10}[mode_name] * (5 if gpu else 1)
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    write_csv = not args.no_csv and (args.csv is not None or not args.smoke)
    csv_path = args.csv or ROOT / "bench" / "results" / f"ops_{'gpu' if gpu else 'cpu'}.csv"

    specops, kernels_error = import_specops()
    env = environment(args.device, specops)
    print(f"{env['date']}  {env['commit']}  {env['machine']}  threads={env['num_threads']}  "
          f"torch {env['torch']}  triton {env['triton']}  python {env['python']}  "
          f"checks={env['checks_level']}\n{env['command']}")
    if kernels_error:
        print(f"specops kernels unavailable: {kernels_error}")
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: load average {load:.2f} on {os.cpu_count()} cores: other work is "
              f"running and will skew these timings (recorded in the load_avg column)")

    all_rows = []
    for op, case, batch, num_slots, vocab in grid(mode_name, args.only):
        rows = run_case(op, case, batch, num_slots, vocab, args, specops, kernels_error)
        print_rows(rows)
        rows = [{**env, **row} for row in rows]
        if write_csv:
            append_csv(csv_path, rows)
        all_rows += rows
    print_targets(all_rows, args.device)
    if write_csv:
        print(f"\nappended {len(all_rows)} rows to {csv_path}")


if __name__ == "__main__":
    main()
