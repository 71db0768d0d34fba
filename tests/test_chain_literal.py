"""Hand-checkable chain cases, written as token lists (vLLM style), on every backend."""

import pytest
import torch

import specops

BACKENDS = ["kernels", "reference"]
VOCAB = 8


def logits_with_argmax(argmax: list[list[int]]) -> torch.Tensor:
    """[B, K+1, VOCAB] logits whose row argmax is the given token."""
    x = torch.zeros(len(argmax), len(argmax[0]), VOCAB)
    x.scatter_(-1, torch.tensor(argmax)[..., None], 5.0)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("draft, lens, target_argmax, expected, accepted", [
    # all accepted -> bonus token from the last row
    ([[1, 2, 3]], [3], [[1, 2, 3, 4]], [[1, 2, 3, 4]], [3]),
    # first mismatch at slot 1 -> the target's token there
    ([[1, 2, 3]], [3], [[1, 5, 3, 4]], [[1, 5, -1, -1]], [1]),
    # mismatch at slot 0
    ([[7, 2, 3]], [3], [[1, 2, 3, 4]], [[1, -1, -1, -1]], [0]),
    # ragged: row 0 drafts 2 tokens (slot 2 ignored), row 1 none
    ([[1, 2, 0], [6, 6, 6]], [2, 0], [[1, 2, 3, 4], [5, 6, 6, 6]],
     [[1, 2, 3, -1], [5, -1, -1, -1]], [2, 0]),
])
def test_greedy_token_lists(backend, draft, lens, target_argmax, expected, accepted):
    logits = logits_with_argmax(target_argmax)
    draft_tokens = torch.tensor(draft)
    draft_lens = torch.tensor(lens, dtype=torch.int32)
    with specops.use_backend(backend):
        tokens, num_accepted = specops.chain_verify_greedy(logits, draft_tokens, draft_lens)
        # chain_verify on one-hot rows is exactly greedy, whatever the seed
        probs = specops.sampling_probs(logits, temperature=0.0)
        for seed in (0, 1, -5):
            seeds = torch.full((len(draft),), seed)
            sampled, sampled_accepted = specops.chain_verify(
                probs, draft_tokens, None, draft_lens, seeds=seeds,
                positions=torch.arange(len(draft)))
            assert sampled.tolist() == expected
            assert sampled_accepted.tolist() == accepted
    assert tokens.tolist() == expected
    assert num_accepted.tolist() == accepted


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_ties_take_the_first_maximal_index(backend):
    logits = torch.tensor([[[0.0, 3.0, 3.0], [1.0, 1.0, 1.0]]])
    with specops.use_backend(backend):
        assert specops.chain_verify_greedy(logits, torch.tensor([[2]]))[0].tolist() == [[1, -1]]
        assert specops.chain_verify_greedy(logits, torch.tensor([[1]]))[0].tolist() == [[1, 0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_draft_token_with_zero_target_probability_is_always_rejected(backend):
    target = torch.tensor([[[0.5, 0.0, 0.5], [0.2, 0.3, 0.5]]]).expand(64, 2, 3).contiguous()
    draft_probs = torch.tensor([[[0.0, 1.0, 0.0]]]).expand(64, 1, 3).contiguous()
    with specops.use_backend(backend):
        tokens, num_accepted = specops.chain_verify(
            target, torch.ones(64, 1, dtype=torch.long), draft_probs,
            seeds=torch.arange(64), positions=torch.zeros(64, dtype=torch.long))
    assert num_accepted.eq(0).all()
    # the residual max(0, p - q) = p here: tokens 0 and 2 only, both drawn some of the time
    assert set(tokens[:, 0].tolist()) == {0, 2}
    assert tokens[:, 1].eq(-1).all()
