"""The C++ CPU kernels (csrc/*_cpu.cpp) against the pure-PyTorch reference (specops/reference).

Equality on hypothesis-drawn shapes (vocabularies at the kernels' chunk edges), ragged draft
lengths, one-hot rows, q(x) = 0, bad values with checks off; then the input checks of the
contract's "Bad input" at each check level.
"""

import os

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import specops
import specops._C  # noqa: F401  (registers the kernels, also before specops/__init__.py exists)
from specops.reference import chain_verify_greedy_ref, chain_verify_ref, sampling_probs_ref

from helpers import check_level

OPS = torch.ops.specops
CHUNK = 8192  # kVocabChunk in csrc/vocab_chunks.h: rows are summed and searched in these chunks
EDGE_VOCABS = [1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 32000, 151936]
LOGIT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT64 = st.integers(-2**63, 2**63 - 1)


def assert_rows_equal(actual: torch.Tensor, expected: torch.Tensor, what: str, **context) -> None:
    """Exact equality; on failure prints the first mismatching rows and their context."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if torch.equal(actual, expected):
        return
    bad = (actual != expected).reshape(actual.shape[0], -1).any(-1).nonzero().flatten()
    lines = []
    for r in bad[:5].tolist():
        extra = ", ".join(f"{k}={v[r].tolist()}" for k, v in context.items() if v is not None)
        lines.append(f"  row {r}: got {actual[r].tolist()}, "
                     f"expected {expected[r].tolist()} ({extra})")
    header = f"{what}: {len(bad)} of {actual.shape[0]} rows differ"
    raise AssertionError("\n".join([header] + lines))


def assert_chain_equal(actual, expected, inputs) -> None:
    context = dict(draft_lens=inputs["draft_lens"], draft_tokens=inputs["draft_tokens"])
    assert_rows_equal(actual[1], expected[1], "num_accepted", **context)
    assert_rows_equal(actual[0], expected[0], "tokens", **context)


# ---------------------------------------------------------------------------------------------
# Inputs


@st.composite
def vocab_batch_slots(draw, max_batch=8, max_slots=8):
    """(V, B, K): vocabularies at chunk edges; small B and K where V is large (time budget)."""
    vocab = draw(st.sampled_from(EDGE_VOCABS))
    big = vocab > 10000
    batch = draw(st.integers(1, 2 if big else max_batch))
    num_slots = draw(st.integers(0, 4 if big else max_slots))
    return vocab, batch, num_slots


def ragged_lens(draw, batch, num_slots):
    """draft_lens in 0..K, with 0 and K drawn often."""
    choices = st.one_of(st.just(0), st.just(num_slots), st.integers(0, num_slots))
    return torch.tensor(draw(st.lists(choices, min_size=batch, max_size=batch)), dtype=torch.int32)


@st.composite
def chain_inputs(draw):
    vocab, batch, num_slots = draw(vocab_batch_slots())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    sharpness = draw(st.sampled_from([0.0, 1.0, 4.0, 12.0]))

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    # Rows need not sum to 1 (contract): scale each by a factor in [0.5, 2).
    target = (torch.randn(batch, num_slots + 1, vocab, generator=g) * sharpness).softmax(-1)
    target = target * (0.5 + 1.5 * rand(batch, num_slots + 1, 1))
    hot = torch.randint(0, vocab, (batch, num_slots + 1), generator=g)
    one_hot = torch.nn.functional.one_hot(hot, vocab).float()
    target = torch.where((rand(batch, num_slots + 1) < 0.25)[..., None], one_hot, target)

    # Draft tokens: the target's argmax (usually accepted) or a random token (usually rejected).
    best = target[:, :num_slots].argmax(-1)
    random_tokens = torch.randint(0, vocab, (batch, num_slots), generator=g)
    tokens = torch.where(rand(batch, num_slots) < 0.6, best, random_tokens)
    # p(x) = 0 at some draft tokens: always rejected.
    p_at_x = target[:, :num_slots].gather(-1, tokens[..., None])
    zero_p = (rand(batch, num_slots) < 0.1)[..., None]
    target[:, :num_slots].scatter_(-1, tokens[..., None], torch.where(zero_p, 0.0, p_at_x))

    draft = None
    if draw(st.booleans()):
        draft = (torch.randn(batch, num_slots, vocab, generator=g) * sharpness).softmax(-1)
        # q(x) = 0 at some draft tokens: accepted iff p(x) > 0, whatever u.
        q_at_x = draft.gather(-1, tokens[..., None])
        zero_q = (rand(batch, num_slots) < 0.15)[..., None]
        draft.scatter_(-1, tokens[..., None], torch.where(zero_q, 0.0, q_at_x))

    lens = ragged_lens(draw, batch, num_slots)
    # Slots past a row's length may hold anything; -1 is what engines pass.
    past = torch.arange(num_slots) >= lens[:, None].long()
    tokens = torch.where(past & (rand(batch, num_slots) < 0.5), -1, tokens)
    seeds = torch.tensor(draw(st.lists(INT64, min_size=batch, max_size=batch)))
    positions = torch.tensor(draw(st.lists(st.integers(0, 2**62), min_size=batch, max_size=batch)))
    return dict(target_probs=target, draft_tokens=tokens, draft_probs=draft, draft_lens=lens,
                seeds=seeds, positions=positions)


def run_chain(inputs):
    args = [inputs[k] for k in ("target_probs", "draft_tokens", "draft_probs", "draft_lens",
                                "seeds", "positions")]
    return OPS.chain_verify(*args), chain_verify_ref(*args)


@st.composite
def greedy_inputs(draw):
    vocab, batch, num_slots = draw(vocab_batch_slots())
    dtype = draw(st.sampled_from(LOGIT_DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if draw(st.booleans()):  # small integers: ties everywhere, the first maximal index wins
        logits = torch.randint(-2, 3, (batch, num_slots + 1, vocab), generator=g).to(dtype)
    else:
        logits = (torch.randn(batch, num_slots + 1, vocab, generator=g) * 3).to(dtype)
    rows = logits[:, :num_slots].float()
    first_max = rows.argmax(-1)
    last_max = vocab - 1 - rows.flip(-1).argmax(-1)  # differs from first_max on a tie
    pick = torch.rand(batch, num_slots, generator=g)
    random_tokens = torch.randint(0, vocab, (batch, num_slots), generator=g)
    tokens = torch.where(pick < 0.6, first_max, torch.where(pick < 0.8, last_max, random_tokens))
    lens = ragged_lens(draw, batch, num_slots)
    return dict(target_logits=logits, draft_tokens=tokens, draft_lens=lens)


def run_greedy(inputs):
    args = [inputs[k] for k in ("target_logits", "draft_tokens", "draft_lens")]
    return OPS.chain_verify_greedy(*args), chain_verify_greedy_ref(*args)


@st.composite
def sampling_inputs(draw):
    vocab = draw(st.sampled_from(EDGE_VOCABS))
    rows = draw(st.integers(1, 1 if vocab > 10000 else 6))
    dtype = draw(st.sampled_from(LOGIT_DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0, 10.0]))
    logits = torch.randn(rows, vocab, generator=g) * scale
    if draw(st.booleans()):
        logits = logits.round()  # ties: top-k keeps them all, top-p orders them by token id
    def per_row(values):
        return draw(st.lists(values, min_size=rows, max_size=rows))

    temperature = per_row(st.sampled_from([0.0, 0.5, 1.0, 1.7]))
    top_k = per_row(st.sampled_from([0, 1, 2, 50, vocab - 1, vocab, vocab + 5]))
    top_p = per_row(st.sampled_from([1.0, 0.0, 0.37, 0.9, 0.999]) | st.floats(0, 1, width=32))
    return dict(logits=logits.to(dtype), temperature=torch.tensor(temperature),
                top_k=torch.tensor(top_k, dtype=torch.int32), top_p=torch.tensor(top_p))


def run_sampling(inputs):
    args = [inputs[k] for k in ("logits", "temperature", "top_k", "top_p")]
    return OPS.sampling_probs(*args), sampling_probs_ref(*args)


def assert_probs_close(actual, expected, inputs) -> None:
    context = {k: inputs[k] for k in ("temperature", "top_k", "top_p")}
    # Top-p membership exactly (the kernel uses the reference's softmax), values within 1e-6.
    assert_rows_equal(actual > 0, expected > 0, "support", **context)
    bad = ~torch.isclose(actual, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    if bad.any():
        r = int(bad.any(-1).nonzero()[0])
        i = bad[r].nonzero().flatten()[:5]
        raise AssertionError(f"row {r} ({ {k: v[r].item() for k, v in context.items()} }): "
                             f"indices {i.tolist()} got {actual[r, i].tolist()} "
                             f"expected {expected[r, i].tolist()}")


# ---------------------------------------------------------------------------------------------
# Equality with the reference


@settings(max_examples=150)
@given(chain_inputs())
def test_chain_verify_matches_reference(inputs):
    actual, expected = run_chain(inputs)
    event(f"V={inputs['target_probs'].shape[-1]}")
    event("draft_probs" if inputs["draft_probs"] is not None else "no draft_probs")
    lens, n = inputs["draft_lens"], expected[1]
    event("a bonus token" if bool((n == lens).any()) else "no bonus token")
    event("a rejection" if bool((n < lens).any()) else "no rejection")
    assert_chain_equal(actual, expected, inputs)


@settings(max_examples=150)
@given(greedy_inputs())
def test_chain_verify_greedy_matches_reference(inputs):
    actual, expected = run_greedy(inputs)
    event(f"V={inputs['target_logits'].shape[-1]}, {inputs['target_logits'].dtype}")
    event("an acceptance" if bool((expected[1] > 0).any()) else "no acceptance")
    assert_chain_equal(actual, expected, inputs)


@settings(max_examples=100)
@given(sampling_inputs())
def test_sampling_probs_matches_reference(inputs):
    actual, expected = run_sampling(inputs)
    event(f"V={inputs['logits'].shape[-1]}")
    top_p_rows = (inputs["top_p"] < 1) & (inputs["temperature"] > 0)
    event("top-p rows" if bool(top_p_rows.any()) else "no top-p rows")
    assert actual.dtype == torch.float32
    assert_probs_close(actual, expected, inputs)


def test_chain_cases_reach_every_outcome():
    """The generator above must produce rejections, bonus tokens and partial runs, or the
    equality test would only ever compare one path."""
    outcomes = set()
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        target = (torch.randn(4, 5, 50, generator=g) * 4).softmax(-1)
        tokens = torch.where(torch.rand(4, 4, generator=g) < 0.7, target[:, :4].argmax(-1), 7)
        lens = torch.full((4,), 4, dtype=torch.int32)
        inputs = dict(target_probs=target, draft_tokens=tokens, draft_probs=None, draft_lens=lens,
                      seeds=torch.arange(4) + seed, positions=torch.zeros(4, dtype=torch.int64))
        (out, n), expected = run_chain(inputs)
        assert_chain_equal((out, n), expected, inputs)
        outcomes.update("bonus" if int(k) == 4 else "none" if int(k) == 0 else "partial" for k in n)
    assert outcomes == {"bonus", "none", "partial"}


def test_greedy_literal_example():
    # Target argmax [1, 5, 3, 4]: draft 1 accepted, draft 2 rejected, 5 emitted.
    logits = torch.full((1, 4, 8), -1.0)
    for j, best in enumerate([1, 5, 3, 4]):
        logits[0, j, best] = 2.0
    logits[0, 0, 6] = 2.0  # a tie after the first maximal index does not count
    lens = torch.tensor([3], dtype=torch.int32)
    out = OPS.chain_verify_greedy(logits, torch.tensor([[1, 2, 3]]), lens)
    assert out[0].tolist() == [[1, 5, -1, -1]] and out[1].tolist() == [1]


def test_one_hot_target_is_greedy():
    # Temperature-0 targets: accept while the draft is the hot token, then emit the hot token.
    hot = torch.tensor([[3, 1, 4, 1, 5]])
    target = torch.nn.functional.one_hot(hot, 8).float()
    drafts = torch.tensor([[3, 1, 2, 1]])
    for draft_probs in (None, torch.full((1, 4, 8), 1 / 8)):
        lens = torch.tensor([4], dtype=torch.int32)
        tokens, n = OPS.chain_verify(target, drafts, draft_probs, lens,
                                     seeds=torch.tensor([-5]), positions=torch.tensor([2**33]))
        assert tokens.tolist() == [[3, 1, 4, -1, -1]] and n.tolist() == [2]


def test_strided_inputs_match_reference():
    # Views (a slice of the K+1 rows, a non-contiguous batch) are read through their strides.
    g = torch.Generator().manual_seed(0)
    big = (torch.randn(6, 9, CHUNK + 1, generator=g) * 3).softmax(-1)
    target, draft = big[::2, :4], big[1::2, 4:7]
    tokens = target[:, :3].argmax(-1)
    tokens[:, 1] = 0
    inputs = dict(target_probs=target, draft_tokens=tokens, draft_probs=draft,
                  draft_lens=torch.tensor([3, 2, 0], dtype=torch.int32),
                  seeds=torch.tensor([1, 2, 3]), positions=torch.tensor([10, 20, 30]))
    assert not target.is_contiguous()
    assert_chain_equal(*run_chain(inputs), inputs)
    greedy = dict(target_logits=target.log().to(torch.bfloat16), draft_tokens=tokens,
                  draft_lens=inputs["draft_lens"])
    assert_chain_equal(*run_greedy(greedy), greedy)


def test_empty_batch():
    empty = torch.zeros(0, dtype=torch.int64)
    tokens, n = OPS.chain_verify(torch.rand(0, 3, 5), torch.zeros(0, 2, dtype=torch.int64), None,
                                 torch.zeros(0, dtype=torch.int32), empty, empty)
    assert tokens.shape == (0, 3) and n.shape == (0,)


# ---------------------------------------------------------------------------------------------
# Input checks (contract, "Bad input")


def chain_args(batch=2, num_slots=3, vocab=16, with_draft_probs=True):
    g = torch.Generator().manual_seed(1)
    return dict(
        target_probs=torch.rand(batch, num_slots + 1, vocab, generator=g),
        draft_tokens=torch.randint(0, vocab, (batch, num_slots), generator=g),
        draft_probs=torch.rand(batch, num_slots, vocab, generator=g) if with_draft_probs else None,
        draft_lens=torch.full((batch,), num_slots, dtype=torch.int32),
        seeds=torch.arange(batch), positions=torch.arange(batch) * 10)


def greedy_args(batch=2, num_slots=3, vocab=16):
    args = chain_args(batch, num_slots, vocab)
    return dict(target_logits=args["target_probs"], draft_tokens=args["draft_tokens"],
                draft_lens=args["draft_lens"])


def sampling_args(rows=2, vocab=16):
    return dict(logits=torch.randn(rows, vocab), temperature=torch.ones(rows),
                top_k=torch.zeros(rows, dtype=torch.int32), top_p=torch.ones(rows))


def call(op_name, args):
    return getattr(OPS, op_name)(**args)


WRONG_DTYPES = [
    ("chain_verify", chain_args, "target_probs", torch.float64),
    ("chain_verify", chain_args, "draft_tokens", torch.int32),
    ("chain_verify", chain_args, "draft_probs", torch.bfloat16),
    ("chain_verify", chain_args, "draft_lens", torch.int64),
    ("chain_verify", chain_args, "seeds", torch.int32),
    ("chain_verify", chain_args, "positions", torch.float32),
    ("chain_verify_greedy", greedy_args, "target_logits", torch.float64),
    ("chain_verify_greedy", greedy_args, "draft_tokens", torch.int32),
    ("chain_verify_greedy", greedy_args, "draft_lens", torch.int64),
    ("sampling_probs", sampling_args, "logits", torch.int64),
    ("sampling_probs", sampling_args, "temperature", torch.float64),
    ("sampling_probs", sampling_args, "top_k", torch.int64),
    ("sampling_probs", sampling_args, "top_p", torch.float16),
]


@pytest.mark.parametrize("op_name, make_args, name, dtype", WRONG_DTYPES)
def test_wrong_dtype_is_type_error(op_name, make_args, name, dtype):
    args = make_args()
    args[name] = args[name].to(dtype)
    with check_level(0), pytest.raises(TypeError, match=rf"^{op_name}: {name} "):
        call(op_name, args)


WRONG_SHAPES = [
    ("chain_verify", chain_args, "target_probs", lambda t: t[0]),
    ("chain_verify", chain_args, "target_probs", lambda t: t[:, :0]),
    ("chain_verify", chain_args, "target_probs", lambda t: t[..., :0]),
    ("chain_verify", chain_args, "draft_tokens", lambda t: t[:1]),
    ("chain_verify", chain_args, "draft_tokens", lambda t: t[:, :2]),
    ("chain_verify", chain_args, "draft_probs", lambda t: t[..., :15]),
    ("chain_verify", chain_args, "draft_probs", lambda t: t[:, :2]),
    ("chain_verify", chain_args, "draft_lens", lambda t: t[:1]),
    ("chain_verify", chain_args, "seeds", lambda t: t[None]),
    ("chain_verify", chain_args, "positions", lambda t: t[:1]),
    ("chain_verify_greedy", greedy_args, "target_logits", lambda t: t[0]),
    ("chain_verify_greedy", greedy_args, "draft_tokens", lambda t: t[:, :1]),
    ("chain_verify_greedy", greedy_args, "draft_lens", lambda t: t[None]),
    ("sampling_probs", sampling_args, "logits", lambda t: t[None]),
    ("sampling_probs", sampling_args, "logits", lambda t: t[:, :0]),
    ("sampling_probs", sampling_args, "temperature", lambda t: t[:1]),
    ("sampling_probs", sampling_args, "top_k", lambda t: t[None]),
    ("sampling_probs", sampling_args, "top_p", lambda t: t[:1]),
]


@pytest.mark.parametrize("op_name, make_args, name, reshape", WRONG_SHAPES)
def test_wrong_shape_is_value_error(op_name, make_args, name, reshape):
    args = make_args()
    args[name] = reshape(args[name])
    with check_level(0), pytest.raises(ValueError, match=rf"^{op_name}: {name}[ .\[]"):
        call(op_name, args)


def _set(name, index, value):
    def change(args):
        args[name][index] = value
    return change


BAD_VALUES = [  # caught at the default (cheap) level
    ("chain_verify", chain_args, "draft_lens", _set("draft_lens", 0, 4)),
    ("chain_verify", chain_args, "draft_lens", _set("draft_lens", 1, -1)),
    ("chain_verify", chain_args, "draft_tokens", _set("draft_tokens", (1, 2), 16)),
    ("chain_verify", chain_args, "draft_tokens", _set("draft_tokens", (0, 0), -1)),
    ("chain_verify", chain_args, "positions", _set("positions", 1, -3)),
    ("chain_verify_greedy", greedy_args, "draft_lens", _set("draft_lens", 0, 9)),
    ("chain_verify_greedy", greedy_args, "draft_tokens", _set("draft_tokens", (0, 1), 2**40)),
    ("sampling_probs", sampling_args, "temperature", _set("temperature", 0, -0.5)),
    ("sampling_probs", sampling_args, "temperature", _set("temperature", 1, float("nan"))),
    ("sampling_probs", sampling_args, "temperature", _set("temperature", 1, float("inf"))),
    ("sampling_probs", sampling_args, "top_k", _set("top_k", 0, -1)),
    ("sampling_probs", sampling_args, "top_p", _set("top_p", 0, 1.5)),
    ("sampling_probs", sampling_args, "top_p", _set("top_p", 1, float("nan"))),
]


@pytest.mark.parametrize("op_name, make_args, name, change", BAD_VALUES)
def test_bad_values_are_value_errors_at_default_level(op_name, make_args, name, change):
    args = make_args()
    call(op_name, args)  # the unchanged arguments pass
    change(args)
    with pytest.raises(ValueError, match=rf"^{op_name}: {name}\["):
        call(op_name, args)
    with check_level(0):
        call(op_name, args)  # off: no check, and no crash


def test_slots_past_draft_lens_are_not_checked():
    args = chain_args()
    args["draft_lens"][0] = 1
    args["draft_tokens"][0, 1:] = torch.tensor([-1, 10**9])
    call("chain_verify", args)
    greedy = greedy_args()
    greedy["draft_lens"][1] = 0
    greedy["draft_tokens"][1] = -1
    call("chain_verify_greedy", greedy)


BAD_ROWS = [  # (argument, row, bad value at index 3): found only by full checks
    ("target_probs", 0, float("nan")),
    ("target_probs", 3, -0.5),  # row K = draft_lens: the bonus row
    ("target_probs", 1, float("inf")),
    ("target_probs", 2, 0.0),  # 0.0: the whole row is zeroed
    ("draft_probs", 2, float("nan")),
    ("draft_probs", 0, 0.0),
]


def _spoil(args, name, row, value):
    if value == 0.0:
        args[name][1, row] = 0.0
    else:
        args[name][1, row, 3] = value


@pytest.mark.parametrize("name, row, value", BAD_ROWS)
def test_bad_probability_rows_only_at_full_level(name, row, value):
    args = chain_args()
    _spoil(args, name, row, value)
    call("chain_verify", args)  # cheap: not checked
    with check_level(2), pytest.raises(ValueError, match=rf"^chain_verify: {name}\[1, {row}\]"):
        call("chain_verify", args)


def test_full_checks_skip_rows_past_draft_lens():
    args = chain_args()
    args["draft_lens"][1] = 1
    args["target_probs"][1, 2:] = float("nan")  # rows 2, 3 > draft_lens: never read
    args["draft_probs"][1, 1:] = -1.0
    with check_level(2):
        call("chain_verify", args)
    args["target_probs"][1, 1, 0] = float("nan")  # row 1 = draft_lens: checked
    with check_level(2), pytest.raises(ValueError, match=r"target_probs\[1, 1\]"):
        call("chain_verify", args)


def test_full_checks_greedy_and_sampling():
    greedy = greedy_args()
    greedy["target_logits"][0, 3, 5] = float("nan")
    call("chain_verify_greedy", greedy)
    message = r"^chain_verify_greedy: target_logits\[0, 3\]"
    with check_level(2), pytest.raises(ValueError, match=message):
        call("chain_verify_greedy", greedy)
    for value, row in ((float("nan"), 0), (float("inf"), 1), (None, 1)):
        args = sampling_args()
        if value is None:
            args["logits"][row] = float("-inf")
        else:
            args["logits"][row, 2] = value
        call("sampling_probs", args)
        with check_level(2), pytest.raises(ValueError, match=rf"^sampling_probs: logits\[{row}\]"):
            call("sampling_probs", args)


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_checks_off_bad_rows_give_the_reference_tokens(with_draft_probs):
    """Off: NaN, inf, negative and all-zero rows, lengths out of range, token ids out of range
    and negative positions give in-bounds tokens, the reference's."""
    g = torch.Generator().manual_seed(3)
    batch, num_slots, vocab = 8, 3, CHUNK + 1
    target = torch.rand(batch, num_slots + 1, vocab, generator=g)
    tokens = target[:, :num_slots].argmax(-1)
    target[0, 0] = float("nan")
    target[1, 0] = 0.0
    target[2, 0, ::3] = -1.0
    target[2, 0, tokens[2, 0]] = float("inf")
    target[3] = 0.0
    target[4, 0] = -target[4, 0]
    tokens[5] = torch.tensor([2**62, -5, vocab])
    tokens[6, 0] = vocab
    draft = torch.rand(batch, num_slots, vocab, generator=g) if with_draft_probs else None
    inputs = dict(target_probs=target, draft_tokens=tokens, draft_probs=draft,
                  draft_lens=torch.tensor([3, 3, 3, 3, 3, 3, 9, -2], dtype=torch.int32),
                  seeds=torch.arange(batch) - 4, positions=torch.tensor([0, 1, 2, 3, 4, -7, 6, -1]))
    if with_draft_probs:
        inputs["draft_probs"][7, 0] = float("nan")
    with check_level(0):
        actual, expected = run_chain(inputs)
    assert_chain_equal(actual, expected, inputs)
    emitted = actual[0].gather(1, actual[1].long()[:, None])
    assert ((emitted >= 0) & (emitted < vocab)).all()
    assert actual[1].tolist()[3] == 0 and actual[0][3, 0] == 0  # no mass anywhere: token 0


def test_checks_off_greedy_and_sampling_match_reference():
    greedy = greedy_args(batch=3, vocab=CHUNK + 3)
    greedy["target_logits"][0, 0, 100] = float("nan")  # NaN is the maximum (torch.argmax)
    greedy["target_logits"][1, :, CHUNK + 2] = float("nan")
    greedy["draft_lens"] = torch.tensor([7, -1, 2], dtype=torch.int32)
    greedy["draft_tokens"][2] = torch.tensor([CHUNK + 2, -3, 2**50])
    with check_level(0):
        actual, expected = run_greedy(greedy)
    assert_chain_equal(actual, expected, greedy)
    assert actual[0][0, 0] == 100 and actual[0][1, 0] == CHUNK + 2

    args = sampling_args(rows=4)
    args["logits"][0, 3] = float("nan")
    args["logits"][1, 3] = float("inf")
    args["logits"][2] = float("-inf")
    args["temperature"] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    args["logits"][3, 7] = float("nan")
    args["top_k"] = torch.tensor([2, 0, 3, -4], dtype=torch.int32)
    args["top_p"] = torch.tensor([0.5, float("nan"), 2.0, 0.5])
    with check_level(0):
        actual, expected = run_sampling(args)
    torch.testing.assert_close(actual, expected, equal_nan=True)
    assert actual[3].argmax() == 7


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a CPU with at least 2 cores")
def test_kernels_run_on_torch_threads():
    """The CPU kernels' parallel loops are compiled into specops._C; built without OpenMP they
    would silently run on one thread (as they once did). They must follow torch's setting."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert specops._C.parallel_threads() == 2
        torch.set_num_threads(1)
        assert specops._C.parallel_threads() == 1
    finally:
        torch.set_num_threads(before)
