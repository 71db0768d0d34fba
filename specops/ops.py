"""The public ops (contract: specops-contract.md). Each dispatches to ``torch.ops.specops.*``
(C++ on the CPU, Triton on CUDA) or, when selected with :func:`set_backend`, to the
pure-PyTorch reference in :mod:`specops.reference`.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from . import _checks
from .reference import chain_verify_greedy_ref, chain_verify_ref, sampling_probs_ref

BACKENDS = ("kernels", "reference")
_backend = "kernels"


def get_backend() -> str:
    """``"kernels"`` (default: C++ on CPU, Triton on CUDA) or ``"reference"``."""
    return _backend


def set_backend(name: str) -> None:
    """Selects the implementation behind every op, for debugging.

    ``"reference"`` runs the readable pure-PyTorch specification (slow, same results);
    ``"kernels"`` runs the registered ``torch.ops.specops`` kernels. Also settable with the
    environment variable ``SPECOPS_BACKEND``.
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "kernels" and not hasattr(torch.ops.specops, "chain_verify"):
        raise RuntimeError("specops: the C++ extension is not loaded, only the reference "
                           "backend is available")
    _backend = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with specops.use_backend("reference"): ...`` runs the block on that backend."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def set_checks(level: str) -> None:
    """Input checking: ``"off"``, ``"cheap"`` (default) or ``"full"``.

    ``"cheap"`` checks token ids, lengths and positions on the CPU (``O(B*K)``); ``"full"``
    also checks probability rows (NaN, inf, negative, zero sum) and is the only level that
    checks values on a GPU (it syncs). Dtype, shape and device are checked at every level.
    With ``"off"``, bad values give the in-bounds outcomes documented on each op. Also
    settable with the environment variable ``SPECOPS_CHECKS``. A device-graph capture
    (:mod:`specops.graphs`) runs without value checks at every level.
    """
    _checks.set_level(level)
    from . import _C
    _C.set_check_level(_checks.LEVELS.index(level))


def get_checks() -> str:
    return _checks.check_level()


def sampling_probs(logits: Tensor, temperature: Tensor | float | None = None,
                   top_k: Tensor | int | None = None,
                   top_p: Tensor | float | None = None) -> Tensor:
    """Sampling distribution per row: temperature, then top-k, then top-p, then softmax.

    Equals Hugging Face transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
    ``TopPLogitsWarper`` and a softmax on logits without ties. Temperature 0 is greedy: a
    one-hot row at the first maximal logit (transformers rejects 0; specops defines it).

    Args:
        logits: Shape ``(..., vocab_size)``, float32, bfloat16 or float16.
        temperature: float32 per row, shaped like the leading dims ``(...)`` or ``(batch,)``
            (broadcast over the remaining leading dims), or a Python number. ``None`` = 1.
        top_k: int32, same shapes. Keeps every token whose logit is ``>=`` the k-th largest
            (ties can keep more than k). ``0`` or ``None`` = off.
        top_p: float32 in ``[0, 1]``, same shapes. Keeps the smallest set of most probable
            tokens whose mass reaches ``top_p`` (equal probabilities: lower token id first),
            always at least one token. ``1`` or ``None`` = off.

    Returns:
        float32 probabilities, shape ``(..., vocab_size)``.

    Bad values with checks off: NaN or +inf logits give NaN rows; those rows draw token 0 in
    the verify ops.

    >>> logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    >>> specops.sampling_probs(logits, temperature=0.0)
    tensor([[0., 1., 0., 0.]])
    >>> specops.sampling_probs(logits, temperature=1.0, top_k=2)
    tensor([[0.0000, 0.7311, 0.2689, 0.0000]])
    """
    _checks.check_tensor("sampling_probs", "logits", logits, _checks.FLOAT_LOGITS, logits.dim())
    if logits.dim() < 1:
        raise ValueError("sampling_probs: logits must have at least 1 dim (vocab_size)")
    leading, vocab = logits.shape[:-1], logits.shape[-1]
    params = [_row_param("temperature", temperature, 1.0, torch.float32, leading, logits.device),
              _row_param("top_k", top_k, 0, torch.int32, leading, logits.device),
              _row_param("top_p", top_p, 1.0, torch.float32, leading, logits.device)]
    flat = logits.reshape(-1, vocab)
    flat_params = [p.reshape(-1) for p in params]
    _checks.sampling_probs_meta(flat, *flat_params)
    if _backend == "reference":
        if _checks.values_checked(flat.device):
            _checks.sampling_probs_values(flat, *flat_params)
        probs = sampling_probs_ref(flat, *flat_params)
    else:
        probs = torch.ops.specops.sampling_probs(flat, *flat_params)
    return probs.reshape(logits.shape)


def _row_param(name: str, value, default, dtype: torch.dtype, leading: torch.Size,
               device: torch.device) -> Tensor:
    """A per-row parameter as a contiguous tensor shaped ``leading``."""
    if value is None:
        value = default
    if not isinstance(value, Tensor):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"sampling_probs: {name} must be a number or a tensor, "
                            f"got {type(value).__name__}")
        return torch.full(leading, value, dtype=dtype, device=device)
    if value.dtype != dtype:
        raise TypeError(f"sampling_probs: {name} must be {str(dtype).removeprefix('torch.')}, "
                        f"got {str(value.dtype).removeprefix('torch.')}")
    if value.device != device:
        raise ValueError(f"sampling_probs: {name} is on {value.device}, expected {device} "
                         f"like logits")
    if value.dim() == 1 and len(leading) > 1 and value.shape[0] == leading[0]:
        value = value.reshape((leading[0],) + (1,) * (len(leading) - 1))
    try:
        return value.expand(leading).contiguous()
    except RuntimeError:
        raise ValueError(f"sampling_probs: {name} must be shaped like the leading dims "
                         f"{tuple(leading)} or (batch,), got {tuple(value.shape)}") from None


def chain_verify(target_probs: Tensor, draft_tokens: Tensor, draft_probs: Tensor | None = None,
                 draft_lens: Tensor | None = None, *, seeds: Tensor,
                 positions: Tensor) -> tuple[Tensor, Tensor]:
    """Lossless speculative sampling of one draft chain per row (Leviathan et al., 2023,
    https://arxiv.org/abs/2211.17192; Chen et al., 2023, https://arxiv.org/abs/2302.01318).

    Draft token ``x`` at slot ``j`` is *accepted* iff ``u * q(x) < p(x)``. At the first
    rejected slot the output token is drawn from the residual ``max(0, p - q)``; if all
    ``draft_lens[b]`` drafts are accepted, a *bonus* token is drawn from row ``draft_lens[b]``.
    Repeating this step samples exactly the target's autoregressive distribution. Every
    random number is Philox4x32-10 keyed by the row's seed at the token's absolute position,
    so a row's result depends on that row alone and repeats on every call.

    Args:
        target_probs: Shape ``(batch_size, num_draft + 1, vocab_size)``, float32. Row ``j`` is
            the target's next-token distribution after the root and the first ``j`` drafts.
        draft_tokens: Shape ``(batch_size, num_draft)``, int64. Slots at or past
            ``draft_lens`` are ignored (they may hold ``-1``).
        draft_probs: Shape ``(batch_size, num_draft, vocab_size)``, float32: the distribution
            each draft token was sampled from. ``None`` for a deterministic drafter (greedy
            draft model, prompt lookup): ``q`` is one-hot at the draft token.
        draft_lens: Shape ``(batch_size,)``, int32 in ``0..num_draft``. ``None`` = all.
        seeds: Shape ``(batch_size,)``, int64, the rows' random seeds.
        positions: Shape ``(batch_size,)``, int64, the absolute position of the root (the
            last committed token); draft slot ``j`` sits at ``positions + 1 + j``.

    Returns:
        tokens: Shape ``(batch_size, num_draft + 1)``, int64: the accepted drafts, then the
            drawn token, then ``-1``. ``num_accepted + 1`` tokens are emitted per row.
        num_accepted: Shape ``(batch_size,)``, int32 in ``0..draft_lens``.

    Rows are read as given (a softmax output sums to 1 up to rounding): the accept test uses
    ``p(x)`` and ``q(x)`` unnormalised and draws normalise the row they draw from. With checks
    off: a draft token outside ``0..V-1`` is rejected; NaN, inf and negative entries count
    as 0 in a draw; a row with no positive mass draws token 0.

    >>> probs = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    >>> specops.chain_verify(probs, torch.tensor([[1, 0]]), seeds=torch.tensor([0]),
    ...                      positions=torch.tensor([7]))
    (tensor([[ 1,  2, -1]]), tensor([1], dtype=torch.int32))
    """
    _checks.check_tensor("chain_verify", "draft_tokens", draft_tokens, (torch.int64,), 2)
    draft_lens = _full_lens(draft_lens, draft_tokens)
    args = (target_probs, draft_tokens, draft_probs, draft_lens, seeds, positions)
    _checks.chain_verify_meta(*args)
    if _backend == "reference":
        if _checks.values_checked(target_probs.device):
            _checks.chain_verify_values(target_probs, draft_tokens, draft_probs, draft_lens,
                                        positions)
        return chain_verify_ref(*args)
    return torch.ops.specops.chain_verify(*args)


def chain_verify_greedy(target_logits: Tensor, draft_tokens: Tensor,
                        draft_lens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Greedy verification on raw logits: accept while the draft equals the row's argmax.

    The argmax is the first maximal index (a NaN counts as the maximum, like
    ``torch.argmax``). Gives the same outputs as :func:`chain_verify` on one-hot rows, without
    a softmax.

    Args:
        target_logits: Shape ``(batch_size, num_draft + 1, vocab_size)``, float32, bfloat16
            or float16.
        draft_tokens: Shape ``(batch_size, num_draft)``, int64.
        draft_lens: Shape ``(batch_size,)``, int32 in ``0..num_draft``. ``None`` = all.

    Returns:
        tokens: Shape ``(batch_size, num_draft + 1)``, int64 (accepted drafts, the target's
            argmax after them, then ``-1``); num_accepted: Shape ``(batch_size,)``, int32.

    >>> logits = torch.tensor([[[0.0, 5.0, 1.0], [0.0, 1.0, 5.0], [5.0, 0.0, 1.0]]])
    >>> specops.chain_verify_greedy(logits, torch.tensor([[1, 0]]))
    (tensor([[ 1,  2, -1]]), tensor([1], dtype=torch.int32))
    """
    _checks.check_tensor("chain_verify_greedy", "draft_tokens", draft_tokens, (torch.int64,), 2)
    draft_lens = _full_lens(draft_lens, draft_tokens)
    args = (target_logits, draft_tokens, draft_lens)
    _checks.chain_verify_greedy_meta(*args)
    if _backend == "reference":
        if _checks.values_checked(target_logits.device):
            _checks.chain_verify_greedy_values(*args)
        return chain_verify_greedy_ref(*args)
    return torch.ops.specops.chain_verify_greedy(*args)


def _full_lens(draft_lens: Tensor | None, draft_tokens: Tensor) -> Tensor:
    if draft_lens is not None:
        return draft_lens
    batch, num_slots = draft_tokens.shape
    return torch.full((batch,), num_slots, dtype=torch.int32, device=draft_tokens.device)
