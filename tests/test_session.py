"""``SpeculativeGenerator.start``: a generation that the caller steps (an engine scheduling
steps itself). Stepping to the end gives what ``generate`` gives, token for token; each
step's return is what the rows emitted; ``stop`` ends one row and leaves the others as they
were; the stats count no time between steps; a generator with device graphs runs one session
at a time on its kept caches (through the traced stand-in of ``test_graphs_traced``); rows
stopped at random steps of random configurations leave the others exact."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specops
import specops.stats
from loop_models import METHODS, assert_same_or_tie, drafters, hf_greedy, padded, prompts, tiny_pair
from test_generate import recording_streamer
from test_generate_fuzz import configurations, drafter
from test_generate_fuzz import pair as fuzz_pair
from test_graphs_traced import TracedGraphs

NEW = 18


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("qwen2")


def batch(target, lens=(5, 1, 9), seed=0):
    rows = prompts(target.config.vocab_size, list(lens), seed=seed)
    return rows, *padded(rows, "left")


@pytest.mark.parametrize("method", METHODS)
def test_stepping_to_the_end_gives_what_generate_gives(pair, method):
    target, draft = pair
    rows, ids, mask = batch(target)
    options = dict(eos_token_id=[1], **drafters(draft)[method])
    expected = specops.SpeculativeGenerator(target, **options).generate(
        ids, mask, max_new_tokens=NEW)
    session = specops.SpeculativeGenerator(target, **options).start(ids, mask,
                                                                    max_new_tokens=NEW)
    stepped = [[] for _ in rows]
    steps = 0
    while not session.done:
        running = [not done for done in session.rows_done]
        new = session.step()
        steps += 1
        for b, tokens in enumerate(new):
            assert (len(tokens) >= 1) == running[b], (b, tokens)   # a running row moves
            stepped[b] += tokens
    out = session.output()
    assert torch.equal(out.sequences, expected.sequences)
    assert out.num_new_tokens == [len(tokens) for tokens in stepped]
    for b, tokens in enumerate(stepped):
        assert out.sequences[b, ids.shape[1]:ids.shape[1] + len(tokens)].tolist() == tokens
    assert out.stats.steps == steps
    assert session.step() == [[], [], []]                     # after the end: nothing more


def test_a_stopped_row_keeps_its_tokens_and_the_others_go_on(pair):
    target, draft = pair
    rows, ids, mask = batch(target)
    options = dict(draft=draft, num_draft_tokens=3, eos_token_id=[])
    expected = specops.generate(target, ids, attention_mask=mask, max_new_tokens=NEW,
                                **options)
    session = specops.SpeculativeGenerator(target, **options).start(ids, mask,
                                                                    max_new_tokens=NEW)
    first = session.step()
    session.stop(1)
    assert session.rows_done == [False, True, False]
    while not session.done:
        assert session.step()[1] == []
    out = session.output()
    width = ids.shape[1]
    assert out.num_new_tokens[1] == len(first[1]) < NEW
    assert out.sequences[1, width:width + len(first[1])].tolist() == first[1]
    for b in (0, 2):
        assert torch.equal(out.sequences[b], expected.sequences[b])
    with pytest.raises(IndexError, match="row 3 is outside this batch of 3"):
        session.stop(3)


def test_the_stats_count_no_time_between_steps(pair, monkeypatch):
    """The phase clock on a fake time that jumps 1000 s between steps (as an engine busy
    elsewhere would): the session's total stays below one jump."""
    target, draft = pair
    now = [0.0]

    class FakeTime:
        @staticmethod
        def perf_counter():
            now[0] += 1e-3                                     # every reading moves 1 ms
            return now[0]

    monkeypatch.setattr(specops.stats, "time", FakeTime)
    rows, ids, mask = batch(target)
    session = specops.SpeculativeGenerator(target, draft, num_draft_tokens=2).start(
        ids, mask, max_new_tokens=6)
    while not session.done:
        now[0] += 1000.0
        session.step()
    stats = session.output().stats
    assert 0 < stats.total_seconds < 1000.0, stats.total_seconds
    assert stats.total_seconds == pytest.approx(
        stats.prefill_seconds + stats.draft_seconds + stats.verify_seconds
        + stats.overhead_seconds + stats.warmup_seconds)


def test_a_hugging_face_streamer_ends_once_when_the_last_row_ends(pair):
    target, draft = pair
    ids = torch.tensor([prompts(64, [4], seed=2)[0]])
    generator = specops.SpeculativeGenerator(target, draft, num_draft_tokens=2)
    for max_new_tokens in (0, 5):
        streamer = recording_streamer()
        session = generator.start(ids, max_new_tokens=max_new_tokens, streamer=streamer)
        while not session.done:
            session.step()
        session.close()
        assert streamer.ends == 1
        assert sum(len(put[0]) for put in streamer.puts[1:]) == max_new_tokens
    streamer = recording_streamer()
    session = generator.start(ids, max_new_tokens=5, streamer=streamer)
    session.step()
    session.stop(0)                                            # the last row ends by stop()
    assert streamer.ends == 1


def test_graphs_serve_one_session_at_a_time(pair, monkeypatch):
    """The kept caches of a graphed generator: a second session of the same batch size while
    the first runs would replay into the first's caches, so it is refused; after ``close``
    it starts. A session of another batch size builds its own caches, and the first
    session still finishes with the tokens it would have had alone."""
    monkeypatch.setitem(specops.graphs._BACKENDS, "cpu", TracedGraphs)
    target, draft = pair
    rows, ids, mask = batch(target)
    options = dict(draft=draft, num_draft_tokens=3, eos_token_id=[])
    expected = specops.generate(target, ids, attention_mask=mask, max_new_tokens=NEW,
                                **options)
    generator = specops.SpeculativeGenerator(target, cuda_graphs=True, **options)
    first = generator.start(ids, mask, max_new_tokens=NEW)
    first.step()
    with pytest.raises(RuntimeError, match="close"):
        generator.start(ids, mask, max_new_tokens=NEW)
    other_rows, other_ids, other_mask = batch(target, lens=(3, 6), seed=4)
    other = generator.start(other_ids, other_mask, max_new_tokens=NEW)
    while not other.done:
        other.step()
        first.step()
    while not first.done:
        first.step()
    assert torch.equal(first.output().sequences, expected.sequences)
    assert torch.equal(other.output().sequences, specops.generate(
        target, other_ids, attention_mask=other_mask, max_new_tokens=NEW, **options).sequences)
    # the kept caches are now the two-row session's: a three-row one builds its own again,
    # and once a session is closed the next one of its size reuses its caches
    again = generator.start(ids, mask, max_new_tokens=NEW)
    again.step()
    again.close()
    assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW).sequences,
                       expected.sequences)


def test_a_step_that_raises_ends_the_session_and_keeps_its_tokens(pair, monkeypatch):
    """A drafter failing mid-call (here a proposer whose third call gives a bad id): the
    error reaches the caller, the session ends with the tokens of the steps before (which
    ``generate`` attaches to the error as ``partial_output``), and the graphed generator
    (whose kept caches the session held) runs the next call."""
    monkeypatch.setitem(specops.graphs._BACKENDS, "cpu", TracedGraphs)
    target, draft = pair
    rows, ids, mask = batch(target)
    calls = []

    class FailingLookup:
        def propose(self, rows, num_draft):
            calls.append(1)
            return [[999] if len(calls) == 3 else [] for _ in rows]

    generator = specops.SpeculativeGenerator(target, FailingLookup(), num_draft_tokens=2,
                                             cuda_graphs=True, eos_token_id=[])
    session = generator.start(ids, mask, max_new_tokens=NEW)
    emitted = [session.step(), session.step()]
    with pytest.raises(ValueError, match="FailingLookup.propose gave row 0"):
        session.step()
    assert session.done
    out = session.output()
    assert out.num_new_tokens == [len(a) + len(b) for a, b in zip(*emitted)]
    # generate() hands the tokens before the error over with it
    calls.clear()
    with pytest.raises(ValueError, match="FailingLookup.propose gave row 0") as error:
        generator.generate(ids, mask, max_new_tokens=NEW)
    assert torch.equal(error.value.partial_output.sequences, out.sequences)
    calls.extend([1] * 10)                         # no more failures
    expected = specops.generate(target, ids, attention_mask=mask, max_new_tokens=NEW,
                                eos_token_id=[])
    assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW).sequences,
                       expected.sequences)



@settings(max_examples=15, deadline=None)
@given(config=configurations(), stops=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 2)),
                                               max_size=3))
def test_stopping_rows_at_random_steps_leaves_the_others_exact(config, stops):
    """A random configuration (``test_generate_fuzz``), rows stopped at random steps (``(step,
    row)`` pairs): every row that was not stopped still decodes as the target's greedy
    ``generate``, and a stopped row holds a prefix of it."""
    target, draft_model = fuzz_pair(config["family"])
    rows = prompts(target.config.vocab_size, config["lens"], seed=config["prompt_seed"])
    ids, mask = padded(rows, config["side"])
    generator = specops.SpeculativeGenerator(target, drafter(config, draft_model),
                                             eos_token_id=[], **config["options"])
    session = generator.start(ids, mask, max_new_tokens=config["new"])
    stopped, step = set(), 0
    while not session.done:
        for when, row in stops:
            if when == step and row < len(rows):
                session.stop(row)
                stopped.add(row)
        session.step()
        step += 1
    out = session.output()
    for b, row in enumerate(rows):
        ours = out.sequences[b, ids.shape[1]:ids.shape[1] + out.num_new_tokens[b]].tolist()
        reference = hf_greedy(target, row, config["new"])
        if b in stopped:
            reference = reference[:len(ours)]
        else:
            assert len(ours) == config["new"], (config, stops, b)
        assert_same_or_tie(target, row, ours, reference, f"{config} stops {stops} row {b}")
