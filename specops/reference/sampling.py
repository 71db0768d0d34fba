"""Reference ``sampling_probs``: temperature, top-k, top-p, softmax (contract, "Sampling distributions")."""

import torch
from torch import Tensor


def sampling_probs_ref(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Per-row sampling distribution, as Hugging Face's warpers + softmax compute it.

    Args:
        logits: [N, V] float32/bf16/fp16.
        temperature: [N] float32, ``0`` = greedy (one-hot at the first maximal logit).
        top_k: [N] int32, ``0`` = off. Keeps every logit ``>=`` the k-th largest.
        top_p: [N] float32, ``>= 1`` = off. Keeps the smallest most-probable set whose mass
            reaches ``top_p`` (equal probabilities ordered by lower token id first), at least
            one token.

    Returns:
        [N, V] float32 probabilities.
    """
    n, vocab = logits.shape
    x = logits.float()
    greedy = temperature == 0
    x = x / torch.where(greedy, 1.0, temperature)[:, None]

    k = top_k.long().clamp(0, vocab)
    kth_largest = x.sort(-1, descending=True).values.gather(-1, (k - 1).clamp(min=0)[:, None])
    x = torch.where((k[:, None] > 0) & (x < kth_largest), float("-inf"), x)

    probs = x.softmax(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    sorted64 = sorted_probs.double()
    mass_before = sorted64.cumsum(-1) - sorted64
    drop_sorted = mass_before >= top_p.double()[:, None]
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    x = torch.where((top_p < 1)[:, None] & drop, float("-inf"), x)

    probs = x.softmax(-1)
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), vocab).float()
    return torch.where(greedy[:, None], one_hot, probs)
