"""``torch.argmax``'s rule in Triton: the first maximal index, a NaN larger than every number."""

import triton
import triton.language as tl

NO_INDEX = tl.constexpr(2147483647)  # int32 max: the index of a block without valid lanes


@triton.jit
def block_argmax(x, offs, mask):
    """(value, index) of a block: float32 [BLOCK] values, int32 [BLOCK] indices, bool [BLOCK] mask.

    value is NaN when the block holds a NaN (index = the first NaN), else the largest valid
    value (index = its first lane). Masked lanes never win: a block without valid lanes gives
    (-inf, NO_INDEX).
    """
    is_nan = (x != x) & mask
    first_nan = tl.min(tl.where(is_nan, offs, NO_INDEX))
    largest = tl.max(tl.where(mask & (x == x), x, float("-inf")))
    first_largest = tl.min(tl.where(mask & (x == largest), offs, NO_INDEX))
    has_nan = first_nan < NO_INDEX
    return tl.where(has_nan, float("nan"), largest), tl.where(has_nan, first_nan, first_largest)


@triton.jit
def combine_argmax(value, index, next_value, next_index):
    """Argmax of two blocks, ``next_*`` holding only later indices than ``value, index``."""
    is_nan = value != value
    take_next = (next_index < NO_INDEX) & (
        (index == NO_INDEX) | (~is_nan & ((next_value != next_value) | (next_value > value))))
    return tl.where(take_next, next_value, value), tl.where(take_next, next_index, index)
