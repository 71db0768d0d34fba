"""``sampling_probs`` in Triton: temperature, top-k, top-p, softmax without sorting the row.

Same semantics as specops/reference/sampling.py. One program per row loops over the
vocabulary in blocks. A sort of V = 151936 per row does not fit one block, so both cuts are
found by bisection on the float's bit pattern (an int32 key whose order is the float order),
each step one pass over the row:

- top-k: the largest key ``t`` with ``count(key >= t) >= k`` is the k-th largest logit.
- top-p: a token's "mass before" (probability of the tokens ahead of it in the order
  descending probability, then ascending id) is below ``top_p`` exactly for a prefix of that
  order. The smallest key ``t`` with ``mass(key > t) < top_p`` is the probability of the last
  kept token; tokens above it are kept, below it dropped, and the tokens equal to it are
  resolved by id with a prefix count in the final passes: the ``r``-th of them (0-based) is
  kept iff ``mass(key > t) + r * t < top_p``, and the first always (at least one token).

Traffic per row: about 32 passes for top-k and 31 for top-p over V logits (from L2 after the
first), plus 3 to 4 plain passes; writes V floats. Masses are summed in float64 like the
reference's cumsum, so the two agree except where rounding decides a boundary.
"""

import torch
import triton
import triton.language as tl

from .argmax import NO_INDEX, block_argmax, combine_argmax

_KEY_BELOW_INF = tl.constexpr(-2139095041)  # key of -inf
_KEY_ABOVE_INF = tl.constexpr(2139095041)  # key of +inf, plus one


@triton.jit
def _order_key(x):
    """int32 key whose signed order is the float order of x; -0.0 and +0.0 get one key."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _load_tempered(row_ptr, offs, mask, temperature):
    """logits / temperature in float32 (IEEE division, as the reference); masked lanes -inf."""
    x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    return tl.where(mask, tl.math.div_rn(x, temperature), float("-inf"))


@triton.jit
def _top_p_keep(p, in_top_k, cut_key, mass_above_cut, top_p, num_at_cut_before):
    """Tokens kept by top-p in a block, and how many of its tokens sit exactly at the cut.

    p: [BLOCK] float32 probabilities after top-k; in_top_k: [BLOCK] bool (false on masked
    lanes); cut_key: int32 key of the last kept probability (-1: keep all); mass_above_cut:
    float64 mass of keys above it; num_at_cut_before: int32 count in earlier blocks.
    """
    key = p.to(tl.int32, bitcast=True)
    at_cut = in_top_k & (key == cut_key)
    at_cut_i = at_cut.to(tl.int32)
    rank = num_at_cut_before + tl.cumsum(at_cut_i, 0) - at_cut_i
    mass_before = mass_above_cut + rank.to(tl.float64) * p.to(tl.float64)
    keep = in_top_k & ((key > cut_key) | (at_cut & ((rank == 0) | (mass_before < top_p))))
    return keep, tl.sum(at_cut_i, 0)


@triton.jit
def _sampling_probs_kernel(
    logits_ptr,  # [N, V] float32/bfloat16/float16
    temperature_ptr,  # [N] float32
    top_k_ptr,  # [N] int32
    top_p_ptr,  # [N] float32
    probs_ptr,  # [N, V] float32, out
    vocab,
    BLOCK: tl.constexpr,
):
    """Program n: row n's sampling distribution. Reads the logits row 2 to ~68 times (see the
    module docstring), 3 scalars; writes V floats."""
    row = tl.program_id(0).to(tl.int64)
    in_ptr = logits_ptr + row * vocab
    out_ptr = probs_ptr + row * vocab
    lanes = tl.arange(0, BLOCK)
    temperature = tl.load(temperature_ptr + row)
    if temperature == 0:
        # Greedy: one-hot at the first maximal raw logit (a NaN counts as the largest).
        best = tl.full([], float("-inf"), tl.float32)
        best_index = tl.full([], NO_INDEX, tl.int32)
        for start in range(0, vocab, BLOCK):
            offs = start + lanes
            mask = offs < vocab
            x = tl.load(in_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
            value, index = block_argmax(x, offs, mask)
            best, best_index = combine_argmax(best, best_index, value, index)
        for start in range(0, vocab, BLOCK):
            offs = start + lanes
            tl.store(out_ptr + offs, tl.where(offs == best_index, 1.0, 0.0), mask=offs < vocab)
    else:
        # Pass 1: the largest tempered logit. A NaN or an infinite maximum (also a row of -inf)
        # makes the reference's softmax NaN everywhere; such a row is written as NaN.
        largest = tl.full([], float("-inf"), tl.float32)
        num_nan = tl.full([], 0, tl.int32)
        for start in range(0, vocab, BLOCK):
            offs = start + lanes
            mask = offs < vocab
            x = _load_tempered(in_ptr, offs, mask, temperature)
            num_nan += tl.sum((x != x).to(tl.int32), 0)
            largest = tl.maximum(largest, tl.max(tl.where(x == x, x, float("-inf")), 0))
        bad_row = (num_nan > 0) | (largest == float("inf")) | (largest == float("-inf"))

        # Top-k: bisection for the largest key t with count(key >= t) >= k. Invariant:
        # count(key >= k_lo) >= k > count(key >= k_hi).
        k = tl.minimum(tl.maximum(tl.load(top_k_ptr + row), 0), vocab)
        top_k_key = tl.full([], -2147483648, tl.int32)  # keeps every token
        if (k > 0) & (k < vocab) & ~bad_row:
            k_lo = tl.full([], _KEY_BELOW_INF, tl.int32)
            k_hi = tl.full([], _KEY_ABOVE_INF, tl.int32)
            while k_lo + 1 < k_hi:
                mid = (k_lo & k_hi) + ((k_lo ^ k_hi) >> 1)  # floor of the mean, no overflow
                # Per-lane counts, reduced once per pass rather than once per block.
                count = tl.zeros([BLOCK], tl.int32)
                for start in range(0, vocab, BLOCK):
                    offs = start + lanes
                    mask = offs < vocab
                    key = _order_key(_load_tempered(in_ptr, offs, mask, temperature))
                    count += (mask & (key >= mid)).to(tl.int32)
                enough = tl.sum(count, 0) >= k
                k_lo = tl.where(enough, mid, k_lo)
                k_hi = tl.where(enough, k_hi, mid)
            top_k_key = k_lo

        # Softmax denominator over the top-k survivors (the largest logit is one of them).
        total = tl.full([], 0.0, tl.float32)
        for start in range(0, vocab, BLOCK):
            offs = start + lanes
            mask = offs < vocab
            x = _load_tempered(in_ptr, offs, mask, temperature)
            in_top_k = mask & (_order_key(x) >= top_k_key)
            total += tl.sum(tl.where(in_top_k, tl.exp(x - largest), 0.0), 0)

        # Top-p: bisection for the smallest probability key t with mass(key > t) < top_p.
        # Invariant: mass(key > p_lo) >= top_p > mass(key > p_hi); p_hi starts at the largest
        # probability, above which there is no mass (if top_p <= 0 the invariant fails there
        # and the rank-0 rule keeps exactly the first token, as the reference does).
        top_p = tl.load(top_p_ptr + row).to(tl.float64)
        cut_key = tl.full([], -1, tl.int32)  # every probability's key is above -1: keep all
        mass_above_cut = tl.full([], 0.0, tl.float64)
        kept_total = total
        if (top_p < 1.0) & ~bad_row:
            p_hi = tl.full([], 0, tl.int32)
            for start in range(0, vocab, BLOCK):
                offs = start + lanes
                mask = offs < vocab
                x = _load_tempered(in_ptr, offs, mask, temperature)
                in_top_k = mask & (_order_key(x) >= top_k_key)
                p = tl.math.div_rn(tl.exp(x - largest), total)
                p_key = tl.where(in_top_k, p.to(tl.int32, bitcast=True), 0)
                p_hi = tl.maximum(p_hi, tl.max(p_key, 0))
            p_lo = tl.full([], -1, tl.int32)
            while p_lo + 1 < p_hi:
                mid = p_lo + ((p_hi - p_lo) >> 1)
                lane_mass = tl.zeros([BLOCK], tl.float64)
                for start in range(0, vocab, BLOCK):
                    offs = start + lanes
                    mask = offs < vocab
                    x = _load_tempered(in_ptr, offs, mask, temperature)
                    in_top_k = mask & (_order_key(x) >= top_k_key)
                    p = tl.math.div_rn(tl.exp(x - largest), total)
                    above = in_top_k & (p.to(tl.int32, bitcast=True) > mid)
                    lane_mass += tl.where(above, p.to(tl.float64), 0.0)
                mass = tl.sum(lane_mass, 0)
                below = mass < top_p
                p_hi = tl.where(below, mid, p_hi)
                mass_above_cut = tl.where(below, mass, mass_above_cut)
                p_lo = tl.where(below, p_lo, mid)
            cut_key = p_hi
            kept_total = tl.full([], 0.0, tl.float32)
            num_at_cut = tl.full([], 0, tl.int32)
            for start in range(0, vocab, BLOCK):
                offs = start + lanes
                mask = offs < vocab
                x = _load_tempered(in_ptr, offs, mask, temperature)
                in_top_k = mask & (_order_key(x) >= top_k_key)
                e = tl.exp(x - largest)
                keep, num = _top_p_keep(tl.math.div_rn(e, total), in_top_k, cut_key,
                                        mass_above_cut, top_p, num_at_cut)
                num_at_cut += num
                kept_total += tl.sum(tl.where(keep, e, 0.0), 0)

        # Final pass: softmax over the kept tokens.
        num_at_cut = tl.full([], 0, tl.int32)
        for start in range(0, vocab, BLOCK):
            offs = start + lanes
            mask = offs < vocab
            x = _load_tempered(in_ptr, offs, mask, temperature)
            in_top_k = mask & (_order_key(x) >= top_k_key)
            e = tl.exp(x - largest)
            keep, num = _top_p_keep(tl.math.div_rn(e, total), in_top_k, cut_key, mass_above_cut,
                                    top_p, num_at_cut)
            num_at_cut += num
            probs = tl.where(keep, tl.math.div_rn(e, kept_total), 0.0)
            tl.store(out_ptr + offs, tl.where(bad_row, float("nan"), probs), mask=mask)


def sampling_probs_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                          top_p: torch.Tensor, *, block_size: int | None = None) -> torch.Tensor:
    """Per-row sampling distribution: temperature, then top-k, then top-p, then softmax.

    Args:
        logits: [N, V] float32/bfloat16/float16.
        temperature: [N] float32, ``0`` = greedy (one-hot at the first maximal logit).
        top_k: [N] int32, ``0`` = off; keeps every logit ``>=`` the k-th largest.
        top_p: [N] float32, ``>= 1`` = off; keeps the smallest most-probable set whose mass
            reaches ``top_p`` (equal probabilities by lower token id first), at least one token.
        block_size: lanes per loop step, a power of two (default: from V).

    Returns:
        [N, V] float32 probabilities, equal to ``sampling_probs_ref`` within float tolerance.
    """
    num_rows, vocab = logits.shape
    probs = torch.empty((num_rows, vocab), dtype=torch.float32, device=logits.device)
    if num_rows == 0 or vocab == 0:
        return probs
    block = block_size or min(2048, triton.next_power_of_2(vocab))
    if block < 1 or block & (block - 1):
        raise ValueError(f"block_size must be a power of two, got {block}")
    _sampling_probs_kernel[(num_rows,)](
        logits.contiguous(), temperature.contiguous(), top_k.contiguous(), top_p.contiguous(),
        probs, vocab, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return probs
