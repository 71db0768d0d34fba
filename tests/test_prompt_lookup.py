"""Prompt lookup on token lists a reader checks by eye, and against a brute-force scan."""

import time

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from specops.prompt_lookup import PromptLookup, prompt_lookup


def prompt_lookup_brute(tokens, num_draft, max_ngram, min_ngram):
    """The definition, literally: longest key first, then the latest start that is not the key."""
    if num_draft == 0:
        return []
    length = len(tokens)
    for n in range(max_ngram, min_ngram - 1, -1):
        if n > length:
            continue
        key = tokens[length - n:]
        for start in range(length - n - 1, -1, -1):  # start + n <= length - 1
            if tokens[start:start + n] == key:
                return tokens[start + n:start + n + num_draft]
    return []


@pytest.mark.parametrize("tokens, num_draft, max_ngram, min_ngram, expected", [
    # key [1, 2] seen at the start -> what followed it, through to the end of the row
    ([1, 2, 3, 4, 1, 2], 8, 2, 1, [3, 4, 1, 2]),
    ([1, 2, 3, 4, 1, 2], 2, 2, 1, [3, 4]),
    # key [7, 2] seen at 0 beats the more recent [2] at 3 (longest n wins)
    ([7, 2, 5, 2, 6, 7, 2], 2, 2, 1, [5, 2]),
    # the same row with only unigrams: the most recent [2] (at 3) wins
    ([7, 2, 5, 2, 6, 7, 2], 2, 1, 1, [6, 7]),
    # key [1] at 0 and 2: the most recent (2) wins among equal n
    ([1, 8, 1, 9, 1], 1, 3, 1, [9]),
    # continuation truncated where the row ends
    ([5, 6, 5], 4, 1, 1, [6, 5]),
    # the occurrence may overlap the key; the key itself never matches
    ([1, 1, 1], 3, 3, 1, [1]),
    ([4, 4], 3, 3, 1, [4]),
    # no earlier occurrence of any key
    ([1, 2, 3, 4], 3, 3, 1, []),
    ([3], 3, 3, 1, []),
    ([], 3, 3, 1, []),
    # min_ngram 2 rules out the unigram match [2]
    ([2, 9, 8, 2], 2, 3, 2, []),
    ([2, 9, 8, 2], 2, 3, 1, [9, 8]),
    # num_draft 0 -> nothing, even with a match
    ([1, 2, 1], 0, 3, 1, []),
])
def test_token_lists(tokens, num_draft, max_ngram, min_ngram, expected):
    got = prompt_lookup(tokens, num_draft, max_ngram=max_ngram, min_ngram=min_ngram)
    assert got == expected
    assert got == prompt_lookup_brute(tokens, num_draft, max_ngram, min_ngram)


def test_accepts_numpy_and_tensor_rows():
    row = [1, 2, 3, 4, 1, 2]
    assert prompt_lookup(np.array(row, dtype=np.int32), 2, max_ngram=2) == [3, 4]
    assert prompt_lookup(torch.tensor(row), 2, max_ngram=2) == [3, 4]
    assert all(type(t) is int for t in prompt_lookup(torch.tensor(row), 2))


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_draft=-1), "num_draft"),
    (dict(num_draft=2, min_ngram=0), "min_ngram"),
    (dict(num_draft=2, max_ngram=1, min_ngram=2), "max_ngram"),
])
def test_bad_arguments(kwargs, name):
    num_draft = kwargs.pop("num_draft")
    with pytest.raises(ValueError, match=name):
        prompt_lookup([1, 2, 1], num_draft, **kwargs)
    with pytest.raises(ValueError, match=name):
        PromptLookup(num_draft=num_draft, **kwargs)


def test_tokens_must_be_one_row():
    with pytest.raises(ValueError, match="tokens"):
        prompt_lookup([[1, 2], [1, 2]], 2)


def test_propose_is_one_lookup_per_row():
    drafter = PromptLookup(max_ngram=2, min_ngram=1, num_draft=4)
    rows = [[1, 2, 3, 4, 1, 2], [1, 2, 3], [5, 6, 5]]
    assert drafter.propose(rows, 3) == [[3, 4, 1], [], [6, 5]]
    assert drafter.propose(rows, 0) == [[], [], []]
    assert drafter.propose([], 3) == []


@given(tokens=st.lists(st.integers(0, 3), max_size=40), num_draft=st.integers(0, 6),
       min_ngram=st.integers(1, 4), extra=st.integers(0, 3))
def test_matches_brute_force(tokens, num_draft, min_ngram, extra):
    # a vocabulary of 4 makes repeats, and so matches of every length, common
    max_ngram = min_ngram + extra
    assert (prompt_lookup(tokens, num_draft, max_ngram=max_ngram, min_ngram=min_ngram)
            == prompt_lookup_brute(tokens, num_draft, max_ngram, min_ngram))


def test_long_row_is_fast():
    # The loop calls this once per row per step; a Python scan of 4k tokens would take ms.
    rng = np.random.default_rng(0)
    row = rng.integers(0, 32000, 4096)
    row[-3:] = row[100:103]  # a trigram match far back
    assert prompt_lookup(row, 8) == row[103:111].tolist()
    start = time.perf_counter()
    for _ in range(200):
        prompt_lookup(row, 8)
    per_call = (time.perf_counter() - start) / 200
    assert per_call < 2e-3, f"{per_call * 1e6:.0f} us per call"
