"""Token trees in Triton: the GPU kernels of ``tree_metadata``, ``tree_verify`` and
``tree_verify_greedy``.

Same words and semantics as specops/reference/tree.py (the executable specification). A node
is *attached* when it is below ``num_nodes`` and every node on its way up to the root is too,
with ``0 <= parents[i] < i``; the others are *detached* (never visited, depth -1, an all-False
mask row). Children of an attached node ``c`` are exactly the nodes ``c < i < num_nodes`` with
``parents[i] == c``, so the walks find them by scanning the parents row in registers; no
children lists are built.

Design. The verify walk is sequential per row: which child is tested next depends on the
previous test, and every rejection changes the residual ``r`` through a full-row float64 sum
(its scale ``S``). ``tree_verify`` has two paths (``uses_one_hot_path`` picks one):

- Deterministic children (``draft_probs`` None, one-hot q), while ``B * T <= 1024``: two
  launches, as ``tree_verify_greedy``. Rejecting child ``x`` only removes ``x`` from the
  residual (``sanitize(r / S - onehot(x))`` is ``r / S`` with ``x`` zeroed, as a rejected
  ``x`` has ``r(x) / S <= u < 1``), so after rejecting the set ``E`` at node ``c`` the
  residual is ``sanitize(p_c)`` without ``E``, rescaled, and its mass is the row's minus the
  rejected tokens' values. Launch 1 on grid (B, T, chunks) writes the float64 chunk masses of
  ``sanitize(p_i)`` for every visitable row; launch 2 on grid (B,) walks with no vocabulary
  pass: a test reads one float, ``E`` lives in registers, a rejection updates one chunk mass,
  and the final draw locates ``u * total`` among the chunk masses and rescans one chunk with
  ``E`` zeroed. The tokens equal the reference's except where float rounding decides a
  boundary (after two rejections at one node the reference divides twice, this path once).
- Otherwise (sampled children with ``draft_probs``, or large ``B * T``): one launch on grid
  (B,): program b walks row b, tests a child with two loads (``r(x)`` and ``q(x)``), and on
  a rejection makes one pass over the vocabulary in blocks that reads ``r`` (the target row,
  or the workspace) and ``q``, writes the new residual to the other half of a [B, 2, V]
  float32 workspace, and writes its float64 block masses. The final draw then locates
  ``u * total`` among the block masses and rescans one block; only a draw from an untouched
  target row needs one extra summing pass. The vocabulary is *not* split across programs: a
  split would need a grid-wide barrier per rejection, which Triton cannot express without
  relying on co-resident programs (and deadlocks the interpreter). With B ~ 1 each pass
  therefore runs on one SM; rows of a batch run in parallel.

Traffic of ``tree_verify``, two-launch path: launch 1 reads the rows below ``num_nodes`` once,
``B*T*V`` floats at most, fully parallel, and writes ``B*T*chunks`` doubles; launch 2 reads per
tested child one float, per visited node ``chunks`` doubles, per draw one chunk of floats (and
one chunk per rejection whose chunk mass cancels, rare), and writes 2T ids. E.g. B = 1, T = 64,
V = 151936, chunk 4096: 38.9 MB read by 2432 programs, 19 KB written, then one 16 KB chunk plus
304 bytes per visited node read by one program. Single walk: 2 loads per tested child; per
rejection V floats of ``r`` (and V of ``q`` when given) read, V floats and V / BLOCK doubles
written, all on one SM (607 KB read and 607 KB written per rejection at V = 151936); per draw
at most V floats read twice plus one block. So the two-launch path reads T rows once in
parallel where the walk reads about two rows per rejection serially per batch row; it loses
only once B fills the GPU and T exceeds the rows a walk passes over, hence the B * T bound.

``tree_verify_greedy``: launch 1 on grid (B, T, chunks) reads the logits rows below
``num_nodes`` once (``B*T*V`` elements at most) and writes one (max, argmax) pair per chunk;
launch 2 on grid (B,) walks the tree, combining the chunk pairs of each visited node.
``tree_metadata``: one launch on grid (B, T / BLOCK_I, T / BLOCK_J), each program walks BLOCK_I
nodes up to the root in lock step (at most depth + 1 steps of one parent gather) and writes a
[BLOCK_I, BLOCK_J] mask tile and the depths.
"""

import torch
import triton
import triton.language as tl

from .argmax import NO_INDEX, block_argmax
from .blockdraw import draw_in_block, locate_block
from .chain import _check_chunk, _chunk_size
from .philox import PURPOSE_ACCEPT, PURPOSE_DRAW, philox_uniform

_NUM_WS = tl.constexpr(3)  # block-mass slots per row: workspace halves 0 and 1, target row 2
# A chunk mass minus a rejected token's value is re-summed when it keeps less than this
# fraction: float64 cancellation then still leaves ~1e-10 relative error, far below float32's.
_CANCELS = tl.constexpr(2.0 ** -20)
_MAX_ONE_HOT_ROWS = 1024  # B * T up to which deterministic children take the two-launch path


def _power_of_two(name: str, value: int) -> int:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value


# ----------------------------------------------------------------------------- tree_metadata


@triton.jit
def _tree_metadata_kernel(
    parents_ptr,  # [B, T] int32
    num_nodes_ptr,  # [B] int32
    mask_ptr,  # [B, T, T] bool viewed as uint8, out
    depth_ptr,  # [B, T] int32, out (written by the programs of column tile 0)
    num_slots,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Program (b, i, j): mask rows of nodes tile i, columns tile j, of row b.

    Every node of the tile climbs to the root in lock step, one parent gather per step, and
    marks the nodes it passes; a climb that leaves the attached nodes makes the row detached.
    Reads at most (depth + 1) * BLOCK_I parents; writes BLOCK_I * BLOCK_J bytes.
    """
    b = tl.program_id(0).to(tl.int64)
    nodes = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    cols = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    num_nodes = tl.load(num_nodes_ptr + b)
    cur = nodes
    depth = tl.zeros([BLOCK_I], tl.int32)
    attached = nodes < 0
    active = nodes < num_slots
    bits = tl.zeros([BLOCK_I, BLOCK_J], tl.int1)
    num_active = tl.sum(active.to(tl.int32), 0)
    # Each step moves every active lane to a strictly smaller node: at most T steps.
    while num_active > 0:
        at_root = active & (cur == 0) & (cur < num_nodes)  # the root is attached iff num_nodes >= 1
        in_use = active & (cur >= 1) & (cur < num_nodes)
        parent = tl.load(parents_ptr + b * num_slots + cur, mask=in_use, other=-1)
        climbs = in_use & (parent >= 0) & (parent < cur)
        bits = bits | ((cols[None, :] == cur[:, None]) & (at_root | climbs)[:, None])
        attached = attached | at_root
        depth += climbs.to(tl.int32)
        cur = tl.where(climbs, parent, cur)
        active = climbs
        num_active = tl.sum(active.to(tl.int32), 0)
    in_tile = (nodes[:, None] < num_slots) & (cols[None, :] < num_slots)
    out = (b * num_slots + nodes[:, None]) * num_slots + cols[None, :]
    tl.store(mask_ptr + out, (bits & attached[:, None]).to(tl.uint8), mask=in_tile)
    depth_rows = tl.where(tl.program_id(2) == 0, num_slots, 0)
    tl.store(depth_ptr + b * num_slots + nodes, tl.where(attached, depth, -1),
             mask=nodes < depth_rows)


def tree_metadata_triton(parents: torch.Tensor, num_nodes: torch.Tensor, *,
                         block_nodes: int | None = None, block_cols: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestor-or-self mask and depths in one sync-free launch.

    Args:
        parents: [B, T] int32. num_nodes: [B] int32 (values outside ``1..T`` allowed: nodes
            past it, and all nodes when it is below 1, are detached).
        block_nodes, block_cols: mask tile, powers of two (default: from T).

    Returns:
        mask [B, T, T] bool, depth [B, T] int32, equal to ``tree_metadata_ref``.
    """
    batch, num_slots = parents.shape
    device = parents.device
    mask = torch.empty((batch, num_slots, num_slots), dtype=torch.bool, device=device)
    depth = torch.empty((batch, num_slots), dtype=torch.int32, device=device)
    if batch == 0 or num_slots == 0:
        return mask, depth
    block_j = _power_of_two("block_cols", block_cols or min(256, triton.next_power_of_2(num_slots)))
    block_i = _power_of_two("block_nodes", block_nodes or max(1, min(16, 4096 // block_j)))
    grid = (batch, triton.cdiv(num_slots, block_i), triton.cdiv(num_slots, block_j))
    _tree_metadata_kernel[grid](parents.contiguous(), num_nodes.contiguous(),
                                mask.view(torch.uint8), depth, num_slots,
                                BLOCK_I=block_i, BLOCK_J=block_j)
    return mask, depth


# ------------------------------------------------------------------------------- tree_verify


@triton.jit
def _next_child(parents, lanes, cur, after, num_nodes):
    """First child of ``cur`` with an index above ``after`` (NO_INDEX: none); ``parents`` is
    the row's [BLOCK_T] parents vector, lanes past num_nodes are nobody's child."""
    is_child = (lanes > after) & (lanes < num_nodes) & (parents == cur)
    return tl.min(tl.where(is_child, lanes, NO_INDEX), 0)


@triton.jit
def _load_r(target_row_ptr, ws_row_ptr, from_ws, offs, bound):
    """The current residual ``r`` at ``offs`` (lanes ``< bound``, others 0): the target row
    while ``from_ws`` is false, else the workspace row. Scalar conditions enter the masks as
    bounds (Triton 3.9's interpreter cannot broadcast ``lanes & scalar``)."""
    p = tl.load(target_row_ptr + offs, mask=offs < tl.where(from_ws, 0, bound), other=0.0)
    w = tl.load(ws_row_ptr + offs, mask=offs < tl.where(from_ws, bound, 0), other=0.0)
    return tl.where(from_ws, w, p)


@triton.jit
def _sanitize(w, mask):
    return tl.where(mask & (w > 0) & (w < float("inf")), w, 0.0)


@triton.jit
def _walk_start(num_nodes_ptr, parents_ptr, seeds_ptr, positions_ptr, b, num_slots, lanes):
    """Row ``b``'s walk inputs: its node count (at most T), parents ([BLOCK_T], -1 past T),
    Philox seed and root position."""
    num_nodes = tl.minimum(tl.load(num_nodes_ptr + b), num_slots)
    parents = tl.load(parents_ptr + b * num_slots + lanes, mask=lanes < num_slots, other=-1)
    return num_nodes, parents, tl.load(seeds_ptr + b), tl.load(positions_ptr + b)


@triton.jit
def _accept(lanes, num_accepted, child, token, path, tokens):
    """Appends ``child`` and its ``token`` to a walk's accepted path: ``(path, tokens,
    num_accepted + 1)``."""
    path = tl.where(lanes == num_accepted, child, path)
    tokens = tl.where(lanes == num_accepted, token, tokens)
    return path, tokens, num_accepted + 1


@triton.jit
def _store_row(tokens_ptr, path_ptr, num_accepted_ptr, b, num_slots, lanes, tokens, path,
               num_accepted, token):
    """A row's outputs: its accepted tokens with the drawn one after them, path, count."""
    tokens = tl.where(lanes == num_accepted, token.to(tl.int64), tokens)
    out = b * num_slots + lanes
    tl.store(tokens_ptr + out, tokens, mask=lanes < num_slots)
    tl.store(path_ptr + out, path, mask=lanes < num_slots)
    tl.store(num_accepted_ptr + b, num_accepted)


@triton.jit
def _tree_verify_kernel(
    target_probs_ptr,  # [B, T, V] float32
    tree_tokens_ptr,  # [B, T] int64
    parents_ptr,  # [B, T] int32
    num_nodes_ptr,  # [B] int32
    draft_probs_ptr,  # [B, T, V] float32; any float32 tensor when HAS_DRAFT_PROBS is False
    seeds_ptr,  # [B] int64
    positions_ptr,  # [B] int64
    ws_ptr,  # [B, 2, V] float32 workspace: residuals after rejections
    ws_mass_ptr,  # [B, 3, num_blocks] float64 workspace: block masses of the drawable rows
    tokens_ptr,  # [B, T] int64, out
    path_ptr,  # [B, T] int32, out
    num_accepted_ptr,  # [B] int32, out
    num_slots, vocab, num_blocks,
    HAS_DRAFT_PROBS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_NB: tl.constexpr,
):
    """Program b: walk row b's tree (see the module docstring), draw the final token, write
    the row's outputs. The residual is ``r`` (target row of ``cur`` when ``buf < 0``, else
    workspace half ``buf``) with scale ``S``, as in the reference."""
    b = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_T)
    blocks = tl.arange(0, BLOCK)
    num_nodes, parents, seed, position = _walk_start(num_nodes_ptr, parents_ptr, seeds_ptr,
                                                     positions_ptr, b, num_slots, lanes)

    cur = tl.full([], 0, tl.int32)
    depth = tl.where(num_nodes >= 1, 0, -1)  # a root without nodes is detached (depth -1)
    num_accepted = tl.full([], 0, tl.int32)
    buf = tl.full([], -1, tl.int32)
    scale = tl.full([], 1.0, tl.float32)
    rank = tl.full([], 0, tl.int32)
    path = tl.full([BLOCK_T], -1, tl.int32)
    tokens = tl.full([BLOCK_T], -1, tl.int64)
    child = _next_child(parents, lanes, cur, cur, num_nodes)
    # child rises strictly every step, so at most T - 1 tests.
    while child < NO_INDEX:
        target_row = target_probs_ptr + (b * num_slots + cur) * vocab
        ws_row = ws_ptr + (b * 2 + tl.maximum(buf, 0)) * vocab
        from_ws = buf >= 0
        x = tl.load(tree_tokens_ptr + b * num_slots + child)
        valid = (x >= 0) & (x < vocab)
        x_safe = tl.where(valid, x, 0)
        # Out-of-range tokens read r(x) = q(x) = 0 and so are rejected.
        r_x = _load_r(target_row, ws_row, from_ws, x_safe, tl.where(valid, vocab, 0))
        if HAS_DRAFT_PROBS:
            q_row = draft_probs_ptr + (b * num_slots + child) * vocab
            q_x = tl.load(q_row + x_safe, mask=valid, other=0.0)
        else:
            q_x = tl.where(valid, 1.0, 0.0)
        u = philox_uniform(seed, position + depth + 1, rank.to(tl.uint32), PURPOSE_ACCEPT)
        if u * q_x < tl.math.div_rn(r_x, scale):
            path, tokens, num_accepted = _accept(lanes, num_accepted, child, x, path,
                                                tokens)
            cur = child
            depth += 1
            buf = tl.full([], -1, tl.int32)
            scale = tl.full([], 1.0, tl.float32)
            rank = tl.full([], 0, tl.int32)
        else:
            # r = sanitize(r / S - q) into the other workspace half, with its block masses.
            dst = tl.where(buf == 0, 1, 0)
            dst_row = ws_ptr + (b * 2 + dst) * vocab
            one_hot_at = tl.where(valid, x, -1)
            mass = tl.full([], 0.0, tl.float64)
            for start in range(0, vocab, BLOCK):
                offs = start + blocks
                in_vocab = offs < vocab
                r = _load_r(target_row, ws_row, from_ws, offs, vocab)
                if HAS_DRAFT_PROBS:
                    q = tl.load(q_row + offs, mask=in_vocab, other=0.0)
                else:
                    q = tl.where(offs == one_hot_at, 1.0, 0.0)
                residual = _sanitize(tl.math.div_rn(r, scale) - q, in_vocab)
                tl.store(dst_row + offs, residual, mask=in_vocab)
                block_mass = tl.sum(residual.to(tl.float64), 0)
                tl.store(ws_mass_ptr + (b * _NUM_WS + dst) * num_blocks + start // BLOCK,
                         block_mass)
                mass += block_mass
            # The next loads of the workspace come from other threads of this program.
            tl.debug_barrier()
            # A residual without mass keeps the previous r and S (contract).
            buf = tl.where(mass > 0, dst, buf)
            scale = tl.where(mass > 0, mass.to(tl.float32), scale)
            rank += 1
        child = _next_child(parents, lanes, cur, child, num_nodes)

    # Final draw from sanitize(r): locate u * total among the block masses, rescan one block.
    target_row = target_probs_ptr + (b * num_slots + cur) * vocab
    ws_row = ws_ptr + (b * 2 + tl.maximum(buf, 0)) * vocab
    from_ws = buf >= 0
    slot = tl.where(from_ws, buf, 2)
    if buf < 0:
        for start in range(0, vocab, BLOCK):
            offs = start + blocks
            in_vocab = offs < vocab
            p = _sanitize(tl.load(target_row + offs, mask=in_vocab, other=0.0), in_vocab)
            tl.store(ws_mass_ptr + (b * _NUM_WS + 2) * num_blocks + start // BLOCK,
                     tl.sum(p.to(tl.float64), 0))
        tl.debug_barrier()
    u = philox_uniform(seed, position + depth + 1, 0, PURPOSE_DRAW)
    nb = tl.arange(0, BLOCK_NB)
    mass = tl.load(ws_mass_ptr + (b * _NUM_WS + slot) * num_blocks + nb, mask=nb < num_blocks,
                   other=0.0)
    hit_block, mass_before, threshold = locate_block(mass, nb, u)
    offs = tl.maximum(hit_block, 0) * BLOCK + blocks
    w = _sanitize(_load_r(target_row, ws_row, from_ws, offs, vocab), offs < vocab)
    token = draw_in_block(w.to(tl.float64), offs, hit_block, mass_before, threshold)
    _store_row(tokens_ptr, path_ptr, num_accepted_ptr, b, num_slots, lanes, tokens, path,
               num_accepted, token)


# ------------------------------------------------------- tree_verify, deterministic children


@triton.jit
def _tree_verify_chunk_mass_kernel(
    target_probs_ptr,  # [B, T, V] float32
    num_nodes_ptr,  # [B] int32
    chunk_mass_ptr,  # [B, T, num_chunks] float64, out
    num_slots, vocab, num_chunks,
    CHUNK: tl.constexpr,
):
    """Program (b, i, c): the float64 mass of chunk c of ``sanitize(target_probs[b, i])``.

    Only rows below num_nodes (and the root's) can be visited; the others are not read (their
    masses are written as 0). Reads CHUNK floats, writes one double.
    """
    b = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1)
    chunk = tl.program_id(2)
    visitable = tl.maximum(tl.load(num_nodes_ptr + b), 1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < tl.where(row < visitable, vocab, 0)
    p = tl.load(target_probs_ptr + (b * num_slots + row) * vocab + offs, mask=mask, other=0.0)
    mass = tl.sum(_sanitize(p, mask).to(tl.float64), 0)
    tl.store(chunk_mass_ptr + (b * num_slots + row) * num_chunks + chunk, mass)


@triton.jit
def _chunk_without(row_ptr, chunk, vocab, excluded, lanes, num_excluded, CHUNK: tl.constexpr):
    """Chunk ``chunk`` of ``sanitize(row)`` with the tokens ``excluded[:num_excluded]`` zeroed:
    (offs [CHUNK] int32, w [CHUNK] float32). Reads CHUNK floats."""
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    in_vocab = offs < vocab
    w = _sanitize(tl.load(row_ptr + offs, mask=in_vocab, other=0.0), in_vocab)
    for j in range(0, num_excluded):
        token = tl.sum(tl.where(lanes == j, excluded, 0), 0)
        w = tl.where(offs == token, 0.0, w)
    return offs, w


@triton.jit
def _tree_verify_one_hot_walk_kernel(
    target_probs_ptr,  # [B, T, V] float32
    tree_tokens_ptr,  # [B, T] int64
    parents_ptr,  # [B, T] int32
    num_nodes_ptr,  # [B] int32
    seeds_ptr,  # [B] int64
    positions_ptr,  # [B] int64
    chunk_mass_ptr,  # [B, T, num_chunks] float64, from launch 1
    tokens_ptr,  # [B, T] int64, out
    path_ptr,  # [B, T] int32, out
    num_accepted_ptr,  # [B] int32, out
    num_slots, vocab, num_chunks,
    BLOCK_T: tl.constexpr, BLOCK_CHUNKS: tl.constexpr, CHUNK: tl.constexpr,
):
    """Program b: walk row b's tree with deterministic children (one-hot q), no vocabulary
    passes.

    At node ``cur`` the residual is ``p = target_probs[b, cur]`` (raw, scale 1) until the first
    rejection that leaves mass; from then on it is ``sanitize(p)`` without the rejected tokens
    ``E`` (``excluded[:num_excluded]``), scale ``S = float32(mass)``: with one-hot q,
    ``sanitize(r / S - onehot(x))`` is ``r / S`` with ``x`` zeroed (a rejected ``x`` has
    ``r(x) / S <= u < 1``), i.e. the same tokens rescaled, so only ``E`` and the float64 chunk
    masses ``mass`` (launch 1's, minus the rejected tokens' values) are kept. A subtraction
    that cancels (more than 1 - 2**-20 of its chunk) re-sums that chunk instead, so a chunk
    whose positive entries are all rejected has mass exactly 0, as the reference's float64 sum,
    and the zero-mass rule (keep the previous r, S) is decided as there. Reads per tested
    child one float; per visited node num_chunks doubles; per draw one chunk; per cancelling
    rejection one chunk. Writes 2T ids and one count.
    """
    b = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_T)
    chunks = tl.arange(0, BLOCK_CHUNKS)
    num_nodes, parents, seed, position = _walk_start(num_nodes_ptr, parents_ptr, seeds_ptr,
                                                     positions_ptr, b, num_slots, lanes)

    cur = tl.full([], 0, tl.int32)
    depth = tl.where(num_nodes >= 1, 0, -1)  # a root without nodes is detached (depth -1)
    num_accepted = tl.full([], 0, tl.int32)
    rank = tl.full([], 0, tl.int32)
    path = tl.full([BLOCK_T], -1, tl.int32)
    tokens = tl.full([BLOCK_T], -1, tl.int64)
    untouched = tl.full([], 1, tl.int32)  # r is the raw target row, S = 1
    scale = tl.full([], 1.0, tl.float32)
    excluded = tl.full([BLOCK_T], -1, tl.int32)
    num_excluded = tl.full([], 0, tl.int32)
    mass = tl.load(chunk_mass_ptr + b * num_slots * num_chunks + chunks,
                   mask=chunks < num_chunks, other=0.0)
    child = _next_child(parents, lanes, cur, cur, num_nodes)
    # child rises strictly every step, so at most T - 1 tests.
    while child < NO_INDEX:
        target_row = target_probs_ptr + (b * num_slots + cur) * vocab
        x = tl.load(tree_tokens_ptr + b * num_slots + child)
        valid = (x >= 0) & (x < vocab)
        x_safe = tl.where(valid, x, 0).to(tl.int32)
        # Out-of-range tokens read r(x) = q(x) = 0 and so are rejected.
        p_x = tl.load(target_row + x_safe, mask=valid, other=0.0)
        in_e = tl.max((excluded == x_safe).to(tl.int32), 0) > 0
        kept_x = tl.where(valid & ~in_e, _sanitize(p_x, valid), 0.0)  # s(x) unless rejected
        r_x = tl.where(untouched != 0, p_x, kept_x)
        q_x = tl.where(valid, 1.0, 0.0)
        u = philox_uniform(seed, position + depth + 1, rank.to(tl.uint32), PURPOSE_ACCEPT)
        if u * q_x < tl.math.div_rn(r_x, scale):
            path, tokens, num_accepted = _accept(lanes, num_accepted, child, x, path,
                                                tokens)
            cur = child
            depth += 1
            rank = tl.full([], 0, tl.int32)
            untouched = tl.full([], 1, tl.int32)
            scale = tl.full([], 1.0, tl.float32)
            excluded = tl.full([BLOCK_T], -1, tl.int32)
            num_excluded = tl.full([], 0, tl.int32)
            mass = tl.load(chunk_mass_ptr + (b * num_slots + cur) * num_chunks + chunks,
                           mask=chunks < num_chunks, other=0.0)
        else:
            # The residual without x: x's chunk loses s(x) (re-summed if that cancels).
            chunk = x_safe // CHUNK
            before = tl.sum(tl.where(chunks == chunk, mass, 0.0), 0)
            left = before - kept_x.to(tl.float64)
            if (kept_x > 0) & (left <= before * _CANCELS):
                offs, w = _chunk_without(target_row, chunk, vocab, excluded, lanes,
                                         num_excluded, CHUNK)
                left = tl.sum(tl.where(offs == x_safe, 0.0, w).to(tl.float64), 0)
            new_mass = tl.where(chunks == chunk, left, mass)
            total = tl.sum(new_mass, 0)
            # A residual without mass keeps the previous r and S (contract).
            if total > 0:
                mass = new_mass
                scale = total.to(tl.float32)
                untouched = tl.full([], 0, tl.int32)
                slot = tl.where(kept_x > 0, num_excluded, -1)
                excluded = tl.where(lanes == slot, x_safe, excluded)
                num_excluded += (kept_x > 0).to(tl.int32)
            rank += 1
        child = _next_child(parents, lanes, cur, child, num_nodes)

    # Final draw from the residual: locate u * total among the chunk masses, rescan one chunk.
    target_row = target_probs_ptr + (b * num_slots + cur) * vocab
    u = philox_uniform(seed, position + depth + 1, 0, PURPOSE_DRAW)
    hit_chunk, mass_before, threshold = locate_block(mass, chunks, u)
    offs, w = _chunk_without(target_row, tl.maximum(hit_chunk, 0), vocab, excluded, lanes,
                             num_excluded, CHUNK)
    token = draw_in_block(w.to(tl.float64), offs, hit_chunk, mass_before, threshold)
    _store_row(tokens_ptr, path_ptr, num_accepted_ptr, b, num_slots, lanes, tokens, path,
               num_accepted, token)


def uses_one_hot_path(batch: int, num_slots: int, has_draft_probs: bool) -> bool:
    """Whether ``tree_verify_triton`` takes the two-launch path of deterministic children.

    Only without draft_probs (one-hot q), and only while ``B * T <= _MAX_ONE_HOT_ROWS``: the
    two-launch path reads every visitable row once, B*T*V floats, fully parallel, so its time
    grows with B*T; the single walk reads about two rows per rejection (plus up to two for the
    draw) on one SM per batch row, so it gains on the two-launch path only once B fills the
    GPU and the trees are deep (T above the number of row passes per walk).
    """
    return not has_draft_probs and batch * num_slots <= _MAX_ONE_HOT_ROWS


def tree_verify_triton(target_probs: torch.Tensor, tree_tokens: torch.Tensor,
                       parents: torch.Tensor, num_nodes: torch.Tensor,
                       draft_probs: torch.Tensor | None, seeds: torch.Tensor,
                       positions: torch.Tensor, *, block_size: int | None = None,
                       one_hot_path: bool | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lossless verification of a token tree per row, sync-free: one launch (the walk), or
    two (chunk masses, then a walk without vocabulary passes) for deterministic children.

    Args:
        target_probs: [B, T, V] float32, row i = target distribution after node i.
        tree_tokens: [B, T] int64. parents: [B, T] int32. num_nodes: [B] int32.
        draft_probs: [B, T, V] float32 (row 0 unused), or None for deterministic children.
        seeds, positions: [B] int64.
        block_size: vocabulary lanes per loop step of the single walk, or per chunk of the
            two-launch path; a power of two (default: from the shapes).
        one_hot_path: take the two-launch path (needs draft_probs None); default
            ``uses_one_hot_path``.

    Returns:
        tokens [B, T] int64, path [B, T] int32, num_accepted [B] int32, equal to
        ``tree_verify_ref`` except where float rounding decides a boundary.
    """
    batch, num_slots, vocab = target_probs.shape
    device = target_probs.device
    has_draft_probs = draft_probs is not None
    if one_hot_path is None:
        one_hot_path = uses_one_hot_path(batch, num_slots, has_draft_probs)
    if one_hot_path and has_draft_probs:
        raise ValueError("one_hot_path needs draft_probs=None (deterministic children)")
    tokens = torch.empty((batch, num_slots), dtype=torch.int64, device=device)
    path = torch.empty((batch, num_slots), dtype=torch.int32, device=device)
    num_accepted = torch.empty((batch,), dtype=torch.int32, device=device)
    if batch == 0:
        return tokens, path, num_accepted
    target_probs = target_probs.contiguous()
    if one_hot_path:
        chunk = _power_of_two("block_size", block_size or _chunk_size(batch * num_slots, vocab))
        num_chunks = max(1, triton.cdiv(vocab, chunk))
        chunk_mass = torch.empty((batch, num_slots, num_chunks), dtype=torch.float64,
                                 device=device)
        num_nodes = num_nodes.contiguous()
        _tree_verify_chunk_mass_kernel[(batch, num_slots, num_chunks)](
            target_probs, num_nodes, chunk_mass, num_slots, vocab, num_chunks, CHUNK=chunk)
        _tree_verify_one_hot_walk_kernel[(batch,)](
            target_probs, tree_tokens.contiguous(), parents.contiguous(), num_nodes,
            seeds.contiguous(), positions.contiguous(), chunk_mass, tokens, path,
            num_accepted, num_slots, vocab, num_chunks,
            BLOCK_T=triton.next_power_of_2(num_slots),
            BLOCK_CHUNKS=triton.next_power_of_2(num_chunks), CHUNK=chunk)
        return tokens, path, num_accepted
    # Not tuned on hardware: 4096 lanes and 16 warps keep many loads in flight on one SM.
    block = _power_of_two("block_size", block_size or min(4096, triton.next_power_of_2(vocab)))
    num_blocks = triton.cdiv(vocab, block)
    ws = torch.empty((batch, 2, vocab), dtype=torch.float32, device=device)
    ws_mass = torch.empty((batch, 3, num_blocks), dtype=torch.float64, device=device)
    _tree_verify_kernel[(batch,)](
        target_probs, tree_tokens.contiguous(), parents.contiguous(), num_nodes.contiguous(),
        draft_probs.contiguous() if has_draft_probs else target_probs, seeds.contiguous(),
        positions.contiguous(), ws, ws_mass, tokens, path, num_accepted,
        num_slots, vocab, num_blocks,
        HAS_DRAFT_PROBS=has_draft_probs, BLOCK_T=triton.next_power_of_2(num_slots),
        BLOCK=block, BLOCK_NB=triton.next_power_of_2(num_blocks),
        num_warps=16 if block >= 4096 else (8 if block >= 2048 else 4))
    return tokens, path, num_accepted


# ------------------------------------------------------------------------ tree_verify_greedy


@triton.jit
def _tree_verify_greedy_argmax_kernel(
    target_logits_ptr,  # [B, T, V] float32/bfloat16/float16
    num_nodes_ptr,  # [B] int32
    chunk_max_ptr,  # [B, T, num_chunks] float32, out: NaN if the chunk holds one
    chunk_argmax_ptr,  # [B, T, num_chunks] int32, out
    num_slots, vocab, num_chunks,
    CHUNK: tl.constexpr,
):
    """Program (b, i, c): argmax of chunk c of logits row i (torch.argmax's rule).

    Only rows below num_nodes (and the root's) can be visited; the others are not read.
    Reads CHUNK logits, writes one float and one int.
    """
    b = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1)
    chunk = tl.program_id(2)
    visitable = tl.maximum(tl.load(num_nodes_ptr + b), 1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < tl.where(row < visitable, vocab, 0)
    x = tl.load(target_logits_ptr + (b * num_slots + row) * vocab + offs, mask=mask,
                other=float("-inf")).to(tl.float32)
    value, index = block_argmax(x, offs, mask)
    out = (b * num_slots + row) * num_chunks + chunk
    tl.store(chunk_max_ptr + out, value)
    tl.store(chunk_argmax_ptr + out, index)


@triton.jit
def _row_argmax(chunk_max_ptr, chunk_argmax_ptr, row, num_chunks, BLOCK_CHUNKS: tl.constexpr):
    """Combine the chunk (max, argmax) pairs of one logits row (flat row index ``row``)."""
    chunks = tl.arange(0, BLOCK_CHUNKS)
    valid = chunks < num_chunks
    value = tl.load(chunk_max_ptr + row * num_chunks + chunks, mask=valid, other=float("-inf"))
    index = tl.load(chunk_argmax_ptr + row * num_chunks + chunks, mask=valid, other=NO_INDEX)
    # Chunks hold increasing indices: the smallest index among the winning chunks is the first
    # maximal (or first NaN) index of the row.
    is_nan = (value != value) & valid
    has_nan = tl.max(is_nan.to(tl.int32), 0) > 0
    largest = tl.max(tl.where(valid & ~is_nan, value, float("-inf")), 0)
    wins = valid & tl.where(has_nan, is_nan, value == largest)
    return tl.min(tl.where(wins, index, NO_INDEX), 0).to(tl.int64)


@triton.jit
def _tree_verify_greedy_walk_kernel(
    tree_tokens_ptr,  # [B, T] int64
    parents_ptr,  # [B, T] int32
    num_nodes_ptr,  # [B] int32
    chunk_max_ptr,  # [B, T, num_chunks] float32, from launch 1
    chunk_argmax_ptr,  # [B, T, num_chunks] int32, from launch 1
    tokens_ptr,  # [B, T] int64, out
    path_ptr,  # [B, T] int32, out
    num_accepted_ptr,  # [B] int32, out
    num_slots, num_chunks,
    BLOCK_T: tl.constexpr, BLOCK_CHUNKS: tl.constexpr,
):
    """Program b: from the root, move to the first child whose token is the node's argmax;
    emit the last node's argmax. Reads the row's parents and tokens once and num_chunks pairs
    per visited node; writes 2T ids and one count."""
    b = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_T)
    in_row = lanes < num_slots
    num_nodes = tl.minimum(tl.load(num_nodes_ptr + b), num_slots)
    parents = tl.load(parents_ptr + b * num_slots + lanes, mask=in_row, other=-1)
    drafts = tl.load(tree_tokens_ptr + b * num_slots + lanes, mask=in_row, other=-1)
    cur = tl.full([], 0, tl.int32)
    num_accepted = tl.full([], 0, tl.int32)
    path = tl.full([BLOCK_T], -1, tl.int32)
    tokens = tl.full([BLOCK_T], -1, tl.int64)
    argmax = _row_argmax(chunk_max_ptr, chunk_argmax_ptr, b * num_slots, num_chunks,
                         BLOCK_CHUNKS)
    is_match = (lanes > cur) & (lanes < num_nodes) & (parents == cur) & (drafts == argmax)
    child = tl.min(tl.where(is_match, lanes, NO_INDEX), 0)
    while child < NO_INDEX:
        # the child's token is the argmax it matched
        path, tokens, num_accepted = _accept(lanes, num_accepted, child, argmax, path, tokens)
        cur = child
        argmax = _row_argmax(chunk_max_ptr, chunk_argmax_ptr, b * num_slots + cur, num_chunks,
                             BLOCK_CHUNKS)
        is_match = (lanes > cur) & (lanes < num_nodes) & (parents == cur) & (drafts == argmax)
        child = tl.min(tl.where(is_match, lanes, NO_INDEX), 0)
    _store_row(tokens_ptr, path_ptr, num_accepted_ptr, b, num_slots, lanes, tokens, path,
               num_accepted, argmax)


def tree_verify_greedy_triton(target_logits: torch.Tensor, tree_tokens: torch.Tensor,
                              parents: torch.Tensor, num_nodes: torch.Tensor, *,
                              chunk_size: int | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy tree verification on raw logits in two sync-free launches.

    Args:
        target_logits: [B, T, V] float32/bfloat16/float16; argmax = first maximal index,
            NaN larger than every number (``torch.argmax``'s rule).
        tree_tokens: [B, T] int64. parents: [B, T] int32. num_nodes: [B] int32.
        chunk_size: vocabulary lanes per argmax program, a power of two (default: from the
            shapes).

    Returns:
        tokens [B, T] int64, path [B, T] int32, num_accepted [B] int32, equal to
        ``tree_verify_greedy_ref``.
    """
    batch, num_slots, vocab = target_logits.shape
    device = target_logits.device
    tokens = torch.empty((batch, num_slots), dtype=torch.int64, device=device)
    path = torch.empty((batch, num_slots), dtype=torch.int32, device=device)
    num_accepted = torch.empty((batch,), dtype=torch.int32, device=device)
    if batch == 0:
        return tokens, path, num_accepted
    chunk = _check_chunk(chunk_size or _chunk_size(batch * num_slots, vocab))
    num_chunks = max(1, triton.cdiv(vocab, chunk))
    chunk_max = torch.empty((batch, num_slots, num_chunks), dtype=torch.float32, device=device)
    chunk_argmax = torch.empty((batch, num_slots, num_chunks), dtype=torch.int32, device=device)
    num_nodes = num_nodes.contiguous()
    _tree_verify_greedy_argmax_kernel[(batch, num_slots, num_chunks)](
        target_logits.contiguous(), num_nodes, chunk_max, chunk_argmax, num_slots, vocab,
        num_chunks, CHUNK=chunk)
    _tree_verify_greedy_walk_kernel[(batch,)](
        tree_tokens.contiguous(), parents.contiguous(), num_nodes, chunk_max, chunk_argmax,
        tokens, path, num_accepted, num_slots, num_chunks,
        BLOCK_T=triton.next_power_of_2(num_slots),
        BLOCK_CHUNKS=triton.next_power_of_2(num_chunks))
    return tokens, path, num_accepted
