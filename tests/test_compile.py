"""``SpeculativeGenerator(compile=True)``: the target's verify steps and the draft's one-token
step run through ``torch.compile`` (TorchInductor on the CPU here); greedy output stays the
target's own greedy output (or a shown numerical tie), and the compiled steps really ran."""

import pytest
import torch

import specops
from loop_models import assert_same_or_tie, drafters, hf_greedy, padded, prompts, tiny_pair
from specops.models import SpecopsCausalLM

NEW = 12


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("qwen2")


@pytest.fixture
def compiled_calls(monkeypatch):
    """The token shapes of every call of the step functions SpecopsCausalLM.compiled returns
    (its any-length ones, for prefills and catch-up feeds, go to ``calls.any_length``)."""
    class Calls(list):
        any_length: list

    calls = Calls()
    calls.any_length = []
    original = SpecopsCausalLM.compiled

    def counting(self, *, any_length=False, **options):
        step = original(self, any_length=any_length, **options)

        def run(tokens, *args, **kwargs):
            (calls.any_length if any_length else calls).append(tuple(tokens.shape))
            return step(tokens, *args, **kwargs)
        return run

    monkeypatch.setattr(SpecopsCausalLM, "compiled", counting)
    return calls


@pytest.mark.parametrize("method", ["plain", "chain-3", "tree", "hybrid"])
def test_compiled_greedy_equals_target_generate(pair, compiled_calls, method):
    target, draft = pair
    rows = prompts(target.config.vocab_size, [5, 1, 9])
    ids, mask = padded(rows, "right")
    gen = specops.SpeculativeGenerator(target, eos_token_id=[], compile=True,
                                       **drafters(draft)[method])
    out = gen.generate(ids, mask, max_new_tokens=NEW)
    for b, row in enumerate(rows):
        assert_same_or_tie(target, row, out.sequences[b, 9:9 + NEW].tolist(),
                           hf_greedy(target, row, NEW), f"{method} row {b}")
    # every decoding step went through a compiled step (plus the draft's one-token steps),
    # the prefill (every prompt but its last token) through the any-length one
    assert len(compiled_calls) >= out.stats.steps, (compiled_calls, out.stats.steps)
    assert compiled_calls.any_length[0] == (3, 8), compiled_calls.any_length
    if method == "chain-3":   # the draft model's one-token step is compiled too
        assert (3, 1) in compiled_calls and (3, 4) in compiled_calls, compiled_calls


def test_compiled_cost_aware_chain(pair, compiled_calls):
    """The cost warm-up times the compiled steps, after a call that compiles each size."""
    target, draft = pair
    rows = prompts(target.config.vocab_size, [6, 3])
    ids, mask = padded(rows, "left")
    gen = specops.SpeculativeGenerator(target, draft, eos_token_id=[], compile=True,
                                       max_draft_tokens=3)
    out = gen.generate(ids, mask, max_new_tokens=NEW)
    for b, row in enumerate(rows):
        assert_same_or_tie(target, row, out.sequences[b, 6:6 + NEW].tolist(),
                           hf_greedy(target, row, NEW), f"row {b}")
    model_cost = gen.costs[2]["model"]
    # warm-up sizes 1, 2 and max_draft + 1, each called at least twice (compile, then timed)
    for n in (1, 2, 4):
        assert compiled_calls.count((2, n)) >= 2, compiled_calls
        assert 0 < model_cost.verify_seconds[n] < 1.0, model_cost.verify_seconds


def test_compile_is_off_by_default_and_ignored_for_hf_forward(pair, compiled_calls):
    target, _ = pair
    ids = torch.tensor([[3, 4, 5]])
    specops.SpeculativeGenerator(target, eos_token_id=[]).generate(ids, max_new_tokens=3)
    lm = specops.models.causal_lm(target, hf_forward=True)
    specops.SpeculativeGenerator(lm, eos_token_id=[], compile=True).generate(
        ids, max_new_tokens=3)
    assert compiled_calls == [] and compiled_calls.any_length == []


def test_compiled_prefill_past_the_kernels_rows(pair, compiled_calls):
    """A float32 prompt longer than specops.linear_ops.MAX_ROWS rows goes to oneDNN's linear
    when eager; compiled (dynamic shapes) it must not: TorchInductor's lowering of that op
    asserted on a 173-token prompt at the Qwen2.5-1.5B shape."""
    from specops.linear_ops import MAX_ROWS
    target, _ = pair
    rows = prompts(target.config.vocab_size, [MAX_ROWS[torch.float32] + 9])
    ids = torch.tensor(rows)
    gen = specops.SpeculativeGenerator(target, eos_token_id=[], compile=True)
    out = gen.generate(ids, max_new_tokens=4)
    assert_same_or_tie(target, rows[0], out.sequences[0, ids.shape[1]:].tolist(),
                       hf_greedy(target, rows[0], 4), "long prompt")
    assert compiled_calls.any_length == [(1, MAX_ROWS[torch.float32] + 8)]


def test_a_larger_cache_does_not_compile_again(pair):
    """A call needing more room builds a larger cache; its capacity is marked dynamic, so
    the compiled steps serve it without compiling again."""
    from torch._dynamo.utils import counters
    target, _ = pair
    ids = torch.tensor(prompts(target.config.vocab_size, [7]))
    gen = specops.SpeculativeGenerator(target, eos_token_id=[], compile=True)
    gen.generate(ids, max_new_tokens=3)   # compiles the prefill and the one-token step
    before = counters["stats"]["unique_graphs"]
    out = gen.generate(ids, max_new_tokens=20)
    assert counters["stats"]["unique_graphs"] == before
    assert_same_or_tie(target, ids[0].tolist(), out.sequences[0, 7:].tolist(),
                       hf_greedy(target, ids[0].tolist(), 20), "larger cache")


def test_compiled_versions_do_not_pile_up_across_models(pair):
    """torch.compile keeps at most recompile_limit versions per code object and fullgraph
    fails past it: every compiled() call compiles its own copy of the forward, so models and
    generators built one after another never reach it (a full test run did)."""
    from loop_models import tiny_model
    target, draft = pair
    ids = torch.tensor(prompts(target.config.vocab_size, [5]))
    models = [target, draft, tiny_model("llama", seed=4)]
    with torch._dynamo.config.patch(recompile_limit=1):
        for model in models:   # other weights, other family: other guards
            lm = specops.models.causal_lm(model)
            cache, lens = lm.new_cache(1, 16), torch.tensor([5], dtype=torch.int32)
            args = (ids[:, :1], cache, lens, torch.tensor([[5]]))
            torch.testing.assert_close(lm.compiled()(*args), lm(*args), rtol=1e-5, atol=1e-5)
