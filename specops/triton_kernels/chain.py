"""Chain verification in Triton: the GPU kernels of ``chain_verify`` and ``chain_verify_greedy``.

Same words and semantics as specops/reference/chain.py (the executable specification): slot
``j`` holds draft token ``x_j`` at position ``positions + 1 + j``; it is *accepted* iff
``u * q(x_j) < p(x_j)``; the output token at slot ``num_accepted`` is *drawn* from the
residual ``max(0, p - q)`` after a rejection, or is a *bonus* token drawn from ``p``.

Traffic: the accept tests read two floats per slot; only the one output row per batch row is
read in full, split into vocabulary chunks so that even B=1 fills the GPU. Launch 1 on grid
(B, num_chunks) reads ``B*V`` floats of ``p`` (and of ``q`` when given) and writes
``2*B*num_chunks`` doubles of chunk masses; launch 2 on grid (B,) reads those masses and
rescans one chunk per row, then writes ``B*(K+1)`` token ids. No noise tensor is ever built.
"""

import torch
import triton
import triton.language as tl

from .argmax import NO_INDEX, block_argmax
from .blockdraw import draw_in_block, locate_block
from .philox import PURPOSE_ACCEPT, PURPOSE_DRAW, philox_uniform


def _chunk_size(num_rows: int, vocab: int) -> int:
    """Vocabulary chunk per program: about 512 programs in all, 1024..4096 lanes each.

    A heuristic from shapes only (no sync); small batches get small chunks so that B=1 still
    spreads its one row over many SMs. Not tuned on hardware yet.
    """
    return min(4096, max(1024, triton.next_power_of_2(triton.cdiv(num_rows * vocab, 512))))


def _check_chunk(chunk_size: int) -> int:
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two, got {chunk_size}")
    return chunk_size


@triton.jit
def _num_accepted(target_probs_ptr, draft_tokens_ptr, draft_probs_ptr, b, draft_len, seed,
                  position, num_slots, vocab, HAS_DRAFT_PROBS: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """Leading run of accepted slots of row ``b`` (int32, ``0..draft_len``): 2 loads per slot."""
    slots = tl.arange(0, BLOCK_K)
    in_draft = slots < draft_len
    x = tl.load(draft_tokens_ptr + b * num_slots + slots, mask=in_draft, other=-1)
    # Out-of-range tokens read p(x) = q(x) = 0, so they are rejected without a load.
    valid = in_draft & (x >= 0) & (x < vocab)
    x = tl.where(valid, x, 0)
    p_x = tl.load(target_probs_ptr + (b * (num_slots + 1) + slots) * vocab + x, mask=valid,
                  other=0.0)
    if HAS_DRAFT_PROBS:
        q_x = tl.load(draft_probs_ptr + (b * num_slots + slots) * vocab + x, mask=valid,
                      other=0.0)
    else:
        q_x = tl.where(valid, 1.0, 0.0)
    u = philox_uniform(seed, position + 1 + slots, 0, PURPOSE_ACCEPT)
    accept = valid & (u * q_x < p_x)
    return tl.min(tl.where(accept, BLOCK_K, slots))


@triton.jit
def _draw_weights(target_probs_ptr, draft_tokens_ptr, draft_probs_ptr, b, out_slot, rejected,
                  num_slots, vocab, offs, HAS_DRAFT_PROBS: tl.constexpr):
    """(residual, target) float32 weights of lanes ``offs`` of row ``b``'s output slot.

    residual = sanitize(p - q) with q = 0 unless the slot holds a rejected draft; target =
    sanitize(p), the fallback for a residual without mass. Lanes past the vocabulary are 0.
    """
    in_vocab = offs < vocab
    p = tl.load(target_probs_ptr + (b * (num_slots + 1) + out_slot) * vocab + offs,
                mask=in_vocab, other=0.0)
    # q is read only after a rejection (a bonus token has q = 0). Scalar conditions enter lane
    # masks as bounds, not as `lanes & scalar`, which Triton 3.9's interpreter cannot broadcast.
    q_slot = tl.maximum(tl.minimum(out_slot, num_slots - 1), 0)
    if HAS_DRAFT_PROBS:
        q_vocab = tl.where(rejected, vocab, 0)
        q = tl.load(draft_probs_ptr + (b * num_slots + q_slot) * vocab + offs,
                    mask=offs < q_vocab, other=0.0)
    else:
        x = tl.load(draft_tokens_ptr + b * num_slots + q_slot, mask=rejected, other=-1)
        q = tl.where(offs == x, 1.0, 0.0)
    r = p - q
    residual = tl.where(in_vocab & (r > 0) & (r < float("inf")), r, 0.0)
    target = tl.where(in_vocab & (p > 0) & (p < float("inf")), p, 0.0)
    return residual, target


@triton.jit
def _chain_verify_chunk_mass_kernel(
    target_probs_ptr,  # [B, K+1, V] float32
    draft_tokens_ptr,  # [B, K] int64
    draft_probs_ptr,  # [B, K, V] float32; any float32 tensor when HAS_DRAFT_PROBS is False
    draft_lens_ptr,  # [B] int32
    seeds_ptr,  # [B] int64
    positions_ptr,  # [B] int64
    num_accepted_ptr,  # [B] int32, out (written by chunk 0)
    chunk_mass_ptr,  # [2, B, num_chunks] float64, out: residual mass, then target mass
    batch, num_slots, vocab, num_chunks,
    HAS_DRAFT_PROBS: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
):
    """Program (b, c): redo row b's accept tests, sum chunk c of its output row's weights.

    Reads 2*K floats for the tests and CHUNK floats of p (and of q); writes 2 doubles.
    """
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    draft_len = tl.minimum(tl.maximum(tl.load(draft_lens_ptr + b), 0), num_slots)
    seed = tl.load(seeds_ptr + b)
    position = tl.load(positions_ptr + b)
    n = _num_accepted(target_probs_ptr, draft_tokens_ptr, draft_probs_ptr, b, draft_len, seed,
                      position, num_slots, vocab, HAS_DRAFT_PROBS, BLOCK_K)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    residual, target = _draw_weights(target_probs_ptr, draft_tokens_ptr, draft_probs_ptr, b, n,
                                     n < draft_len, num_slots, vocab, offs, HAS_DRAFT_PROBS)
    tl.store(chunk_mass_ptr + b * num_chunks + chunk, tl.sum(residual.to(tl.float64), 0))
    tl.store(chunk_mass_ptr + (batch + b) * num_chunks + chunk, tl.sum(target.to(tl.float64), 0))
    tl.store(num_accepted_ptr + b, n, mask=chunk == 0)


@triton.jit
def _chain_verify_draw_kernel(
    target_probs_ptr,  # [B, K+1, V] float32
    draft_tokens_ptr,  # [B, K] int64
    draft_probs_ptr,  # [B, K, V] float32; any float32 tensor when HAS_DRAFT_PROBS is False
    draft_lens_ptr,  # [B] int32
    seeds_ptr,  # [B] int64
    positions_ptr,  # [B] int64
    num_accepted_ptr,  # [B] int32, from launch 1
    chunk_mass_ptr,  # [2, B, num_chunks] float64, from launch 1
    tokens_ptr,  # [B, K+1] int64, out
    batch, num_slots, vocab, num_chunks,
    HAS_DRAFT_PROBS: tl.constexpr, BLOCK_SLOTS: tl.constexpr, BLOCK_CHUNKS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Program b: draw row b's output token (contract's drawing rule) and write its tokens.

    The threshold u * total is located first among the chunk masses, then inside the one chunk
    that holds it. Reads 2*num_chunks doubles and CHUNK floats of p (and of q); writes K+1 ids.
    """
    b = tl.program_id(0).to(tl.int64)
    draft_len = tl.minimum(tl.maximum(tl.load(draft_lens_ptr + b), 0), num_slots)
    n = tl.load(num_accepted_ptr + b)
    u = philox_uniform(tl.load(seeds_ptr + b), tl.load(positions_ptr + b) + 1 + n, 0,
                       PURPOSE_DRAW)

    chunks = tl.arange(0, BLOCK_CHUNKS)
    in_row = chunks < num_chunks
    residual_mass = tl.load(chunk_mass_ptr + b * num_chunks + chunks, mask=in_row, other=0.0)
    target_mass = tl.load(chunk_mass_ptr + (batch + b) * num_chunks + chunks, mask=in_row,
                          other=0.0)
    # A residual that lost all its mass to rounding is replaced by p (contract).
    use_target = tl.sum(residual_mass, 0) == 0.0
    mass = tl.where(use_target, target_mass, residual_mass)
    chunk, mass_before, threshold = locate_block(mass, chunks, u)
    offs = tl.maximum(chunk, 0) * CHUNK + tl.arange(0, CHUNK)
    residual, target = _draw_weights(target_probs_ptr, draft_tokens_ptr, draft_probs_ptr, b, n,
                                     n < draft_len, num_slots, vocab, offs, HAS_DRAFT_PROBS)
    w = tl.where(use_target, target, residual).to(tl.float64)
    token = draw_in_block(w, offs, chunk, mass_before, threshold)

    slots = tl.arange(0, BLOCK_SLOTS)
    drafts = tl.load(draft_tokens_ptr + b * num_slots + slots, mask=slots < n, other=-1)
    out = tl.where(slots == n, token.to(tl.int64), drafts)
    tl.store(tokens_ptr + b * (num_slots + 1) + slots, out, mask=slots < num_slots + 1)


def chain_verify_triton(target_probs: torch.Tensor, draft_tokens: torch.Tensor,
                        draft_probs: torch.Tensor | None, draft_lens: torch.Tensor,
                        seeds: torch.Tensor, positions: torch.Tensor, *,
                        chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless rejection sampling of one draft chain per row, in two sync-free launches.

    Args:
        target_probs: [B, K+1, V] float32. draft_tokens: [B, K] int64.
        draft_probs: [B, K, V] float32, or None for a deterministic drafter (one-hot q).
        draft_lens: [B] int32 (clamped into ``0..K``). seeds, positions: [B] int64.
        chunk_size: vocabulary lanes per program, a power of two (default: from the shapes).

    Returns:
        tokens [B, K+1] int64 (accepted drafts, the drawn token, then -1),
        num_accepted [B] int32. Equal to ``chain_verify_ref`` except where float rounding
        decides a draw boundary.
    """
    batch, num_rows, vocab = target_probs.shape
    num_slots = num_rows - 1
    device = target_probs.device
    tokens = torch.empty((batch, num_rows), dtype=torch.int64, device=device)
    num_accepted = torch.empty((batch,), dtype=torch.int32, device=device)
    if batch == 0:
        return tokens, num_accepted
    chunk = _check_chunk(chunk_size or _chunk_size(batch, vocab))
    num_chunks = max(1, triton.cdiv(vocab, chunk))
    chunk_mass = torch.empty((2, batch, num_chunks), dtype=torch.float64, device=device)
    target_probs = target_probs.contiguous()
    has_draft_probs = draft_probs is not None
    draft_probs = draft_probs.contiguous() if has_draft_probs else target_probs
    args = (target_probs, draft_tokens.contiguous(), draft_probs, draft_lens.contiguous(),
            seeds.contiguous(), positions.contiguous(), num_accepted)
    _chain_verify_chunk_mass_kernel[(batch, num_chunks)](
        *args, chunk_mass, batch, num_slots, vocab, num_chunks,
        HAS_DRAFT_PROBS=has_draft_probs, BLOCK_K=triton.next_power_of_2(max(num_slots, 1)),
        CHUNK=chunk)
    _chain_verify_draw_kernel[(batch,)](
        *args, chunk_mass, tokens, batch, num_slots, vocab, num_chunks,
        HAS_DRAFT_PROBS=has_draft_probs, BLOCK_SLOTS=triton.next_power_of_2(num_rows),
        BLOCK_CHUNKS=triton.next_power_of_2(num_chunks), CHUNK=chunk)
    return tokens, num_accepted


@triton.jit
def _chain_verify_greedy_argmax_kernel(
    target_logits_ptr,  # [B, K+1, V] float32/bfloat16/float16
    draft_lens_ptr,  # [B] int32
    chunk_max_ptr,  # [B, K+1, num_chunks] float32, out: NaN if the chunk holds one
    chunk_argmax_ptr,  # [B, K+1, num_chunks] int32, out
    num_slots, vocab, num_chunks,
    CHUNK: tl.constexpr,
):
    """Program (b, j, c): argmax of chunk c of logits row j (torch.argmax's rule).

    Rows past draft_lens[b] can never be reached and are not read. Reads CHUNK logits,
    writes one float and one int.
    """
    b = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1)
    chunk = tl.program_id(2)
    draft_len = tl.minimum(tl.maximum(tl.load(draft_lens_ptr + b), 0), num_slots)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < tl.where(row <= draft_len, vocab, 0)
    x = tl.load(target_logits_ptr + (b * (num_slots + 1) + row) * vocab + offs, mask=mask,
                other=float("-inf")).to(tl.float32)
    value, index = block_argmax(x, offs, mask)
    out = (b * (num_slots + 1) + row) * num_chunks + chunk
    tl.store(chunk_max_ptr + out, value)
    tl.store(chunk_argmax_ptr + out, index)


@triton.jit
def _chain_verify_greedy_accept_kernel(
    draft_tokens_ptr,  # [B, K] int64
    draft_lens_ptr,  # [B] int32
    chunk_max_ptr,  # [B, K+1, num_chunks] float32, from launch 1
    chunk_argmax_ptr,  # [B, K+1, num_chunks] int32, from launch 1
    tokens_ptr,  # [B, K+1] int64, out
    num_accepted_ptr,  # [B] int32, out
    num_slots, num_chunks,
    BLOCK_SLOTS: tl.constexpr, BLOCK_CHUNKS: tl.constexpr,
):
    """Program b: combine the chunk argmaxes of row b, accept while draft == argmax.

    Reads (K+1)*num_chunks (float, int) pairs and K ids; writes K+1 ids and one count.
    """
    b = tl.program_id(0).to(tl.int64)
    draft_len = tl.minimum(tl.maximum(tl.load(draft_lens_ptr + b), 0), num_slots)
    rows = tl.arange(0, BLOCK_SLOTS)
    chunks = tl.arange(0, BLOCK_CHUNKS)
    valid = (rows[:, None] <= draft_len) & (chunks[None, :] < num_chunks)
    at = (b * (num_slots + 1) + rows[:, None]) * num_chunks + chunks[None, :]
    value = tl.load(chunk_max_ptr + at, mask=valid, other=float("-inf"))
    index = tl.load(chunk_argmax_ptr + at, mask=valid, other=NO_INDEX)
    # Chunks hold increasing indices, so the smallest index among the winning chunks is the
    # first maximal (or first NaN) index of the row.
    is_nan = (value != value) & valid
    row_has_nan = tl.max(is_nan.to(tl.int32), 1) > 0
    largest = tl.max(tl.where(valid & ~is_nan, value, float("-inf")), 1)
    wins = valid & tl.where(row_has_nan[:, None], is_nan, value == largest[:, None])
    argmax = tl.min(tl.where(wins, index, NO_INDEX), 1).to(tl.int64)

    in_draft = rows < draft_len
    drafts = tl.load(draft_tokens_ptr + b * num_slots + rows, mask=in_draft, other=-1)
    accept = in_draft & (drafts == argmax)
    n = tl.min(tl.where(accept, BLOCK_SLOTS, rows), 0)
    final = tl.sum(tl.where(rows == n, argmax, 0), 0)
    out = tl.where(rows < n, drafts, tl.where(rows == n, final, -1))
    tl.store(tokens_ptr + b * (num_slots + 1) + rows, out, mask=rows < num_slots + 1)
    tl.store(num_accepted_ptr + b, n)


def chain_verify_greedy_triton(target_logits: torch.Tensor, draft_tokens: torch.Tensor,
                               draft_lens: torch.Tensor, *, chunk_size: int | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification on raw logits in two sync-free launches.

    Args:
        target_logits: [B, K+1, V] float32/bfloat16/float16; argmax = first maximal index,
            NaN larger than every number (``torch.argmax``'s rule).
        draft_tokens: [B, K] int64. draft_lens: [B] int32 (clamped into ``0..K``).
        chunk_size: vocabulary lanes per program, a power of two (default: from the shapes).

    Returns:
        tokens [B, K+1] int64, num_accepted [B] int32, equal to ``chain_verify_greedy_ref``.
    """
    batch, num_rows, vocab = target_logits.shape
    num_slots = num_rows - 1
    device = target_logits.device
    tokens = torch.empty((batch, num_rows), dtype=torch.int64, device=device)
    num_accepted = torch.empty((batch,), dtype=torch.int32, device=device)
    if batch == 0:
        return tokens, num_accepted
    chunk = _check_chunk(chunk_size or _chunk_size(batch * num_rows, vocab))
    num_chunks = max(1, triton.cdiv(vocab, chunk))
    chunk_max = torch.empty((batch, num_rows, num_chunks), dtype=torch.float32, device=device)
    chunk_argmax = torch.empty((batch, num_rows, num_chunks), dtype=torch.int32, device=device)
    draft_lens = draft_lens.contiguous()
    _chain_verify_greedy_argmax_kernel[(batch, num_rows, num_chunks)](
        target_logits.contiguous(), draft_lens, chunk_max, chunk_argmax, num_slots, vocab,
        num_chunks, CHUNK=chunk)
    _chain_verify_greedy_accept_kernel[(batch,)](
        draft_tokens.contiguous(), draft_lens, chunk_max, chunk_argmax, tokens, num_accepted,
        num_slots, num_chunks, BLOCK_SLOTS=triton.next_power_of_2(num_rows),
        BLOCK_CHUNKS=triton.next_power_of_2(num_chunks))
    return tokens, num_accepted
