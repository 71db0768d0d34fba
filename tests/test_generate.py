"""The decoding loop, greedy: in fp32 ``specops.generate`` must reproduce the target's own
greedy ``generate`` token for token (a difference is allowed only at a numerical tie, which
the assertion then shows), for every drafter, batch 1 and ragged batches, EOS and
``max_new_tokens`` falling inside an accepted draft; plus stops, streaming and bad input."""

import numpy as np
import pytest
import torch

import specops
from specops.controller import CostModel, DraftLengthController, TreeSizeController
from loop_models import (EOS, METHODS, PAD, assert_same_or_tie, drafters, hf_greedy, noisy_copy,
                         padded, prompts, tiny_model, tiny_pair)

NEW = 20


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def pair(request):
    return tiny_pair(request.param)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_greedy_equals_target_generate(pair, method, side):
    target, draft = pair
    rows = prompts(target.config.vocab_size, [5, 1, 9])
    ids, mask = padded(rows, side)
    out = specops.generate(target, ids, attention_mask=mask, max_new_tokens=NEW,
                           eos_token_id=[], **drafters(draft)[method])
    assert out.sequences.shape == (3, ids.shape[1] + NEW)
    assert torch.equal(out.sequences[:, :ids.shape[1]], ids)
    for b, row in enumerate(rows):
        ours = out.sequences[b, ids.shape[1]:].tolist()
        assert_same_or_tie(target, row, ours, hf_greedy(target, row, NEW), f"{method} row {b}")
    if method in ("chain-3", "tree", "static-tree"):
        # the noisy draft agrees often: speculation really happened
        assert out.stats.mean_emitted_per_step > 1.2, out.stats.summary()


def test_batch_one_and_generator_reuse(pair):
    target, draft = pair
    row = prompts(target.config.vocab_size, [6], seed=1)[0]
    generator = specops.SpeculativeGenerator(target, draft, num_draft_tokens=4)
    first = generator.generate(torch.tensor([row]), max_new_tokens=NEW)
    second = generator.generate(torch.tensor([row]), max_new_tokens=NEW)
    assert torch.equal(first.sequences, second.sequences)
    assert_same_or_tie(target, row, first.sequences[0, 6:].tolist(),
                       hf_greedy(target, row, NEW, eos=EOS), "batch 1")


def test_eos_and_max_new_tokens_inside_an_accepted_draft():
    target = tiny_model("qwen2", seed=5)
    row = prompts(64, [4], seed=2)[0]
    reference = hf_greedy(target, row, 30)
    # a draft identical to the target accepts everything: EOS falls mid-chain
    eos = reference[6]
    expected = reference[:reference.index(eos) + 1]
    out = specops.generate(target, torch.tensor([row]), draft=target, num_draft_tokens=4,
                           max_new_tokens=30, eos_token_id=eos)
    assert out.num_new_tokens == [len(expected)]
    assert out.sequences[0, 4:4 + len(expected)].tolist() == expected
    assert (out.sequences[0, 4 + len(expected):] == PAD).all()
    assert out.stats.mean_emitted_per_step > 3
    for limit in (1, 7, 9):
        out = specops.generate(target, torch.tensor([row]), draft=target, num_draft_tokens=4,
                               max_new_tokens=limit, eos_token_id=[])
        assert out.sequences[0, 4:].tolist() == reference[:limit]


@pytest.mark.parametrize("form", ["int", "list", "tensor", "1-d tensor", "numpy"])
def test_eos_may_be_given_as_hugging_face_takes_it(form):
    """An EOS id as an int, a list, a 0-d or 1-d tensor or a numpy integer ends the row at the
    same token (a tensor kept as such never equalled a generated id: the row ran on)."""
    target = tiny_model("qwen2", seed=5)
    row = prompts(64, [4], seed=2)[0]
    reference = hf_greedy(target, row, 20)
    eos = reference[6]
    given = {"int": eos, "list": [eos], "tensor": torch.tensor(eos),
             "1-d tensor": torch.tensor([eos, 63]), "numpy": np.int64(eos)}[form]
    out = specops.generate(target, torch.tensor([row]), draft=target,
                           num_draft_tokens=np.int64(4), max_new_tokens=torch.tensor(20),
                           eos_token_id=given)   # (and numpy or tensor counts)
    assert out.num_new_tokens == [reference.index(eos) + 1]


def test_pad_token_id_fills_after_a_rows_end():
    """``pad_token_id`` (as Hugging Face's ``generate`` takes it) fills the tail of a row that
    ended before the longest one."""
    target = tiny_model("qwen2", seed=5)
    row = prompts(64, [4], seed=2)[0]
    reference = hf_greedy(target, row, 20)
    eos = reference[6]
    ended = reference.index(eos) + 1
    longer = prompts(64, [4], seed=3)[0]
    assert eos not in hf_greedy(target, longer, 20)         # this row runs to the end
    out = specops.generate(target, torch.tensor([row, longer]), max_new_tokens=20,
                           eos_token_id=[eos], pad_token_id=61,
                           use_cache=True)   # (accepted: what the loop does anyway)
    assert out.num_new_tokens == [ended, 20]
    assert (out.sequences[0, 4 + ended:] == 61).all()


def test_rows_end_independently():
    target = tiny_model("llama", seed=6)
    rows = prompts(64, [3, 7], seed=3)
    ref0 = hf_greedy(target, rows[0], 15)
    eos = ref0[4]
    ids, mask = padded(rows, "left")
    out = specops.generate(target, ids, attention_mask=mask, draft=target, num_draft_tokens=3,
                           max_new_tokens=15, eos_token_id=[eos, 63])
    for b, row in enumerate(rows):
        reference = hf_greedy(target, row, 15)
        cut = [i for i, t in enumerate(reference) if t in (eos, 63)]
        reference = reference[:cut[0] + 1] if cut else reference
        assert out.sequences[b, 7:7 + len(reference)].tolist() == reference
        assert out.num_new_tokens[b] == len(reference)


def test_draft_with_a_differently_sized_vocabulary():
    """Qwen2.5 7B+ pads its table to 152064 rows, the small models to 151936: same tokens."""
    target = tiny_model("qwen2", vocab=72, seed=7)
    row = prompts(64, [5], seed=4)[0]
    reference = hf_greedy(target, row, NEW)
    for vocab in (64, 80):
        draft = noisy_copy(target, noise=0.2, vocab=vocab)
        out = specops.generate(target, torch.tensor([row]), draft=draft, num_draft_tokens=3,
                               max_new_tokens=NEW, eos_token_id=[])
        assert_same_or_tie(target, row, out.sequences[0, 5:].tolist(), reference,
                           f"draft vocab {vocab}")


class CharTokenizer:
    """Token id i is the letter chr(97 + i % 26): enough to test stop strings."""

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.mark.parametrize("as_list", [True, False], ids=["list", "one-string"])
def test_stop_strings_and_streamer(as_list):
    """A stop string given alone (as Hugging Face takes it) is one string, not its
    characters: a two-letter stop must not end a row at its first letter."""
    target = tiny_model("qwen2", seed=8)
    row = prompts(64, [4], seed=5)[0]
    reference = hf_greedy(target, row, 30)
    text = CharTokenizer().decode(reference)
    stop = text[8:10]
    end = text.index(stop) + len(stop)          # the token completing the stop string
    streamed: list[int] = []
    out = specops.generate(target, torch.tensor([row]), draft=target, num_draft_tokens=4,
                           max_new_tokens=30, eos_token_id=[],
                           stop_strings=[stop] if as_list else stop,
                           tokenizer=CharTokenizer(),
                           streamer=lambda new: streamed.extend(new[0]))
    assert out.sequences[0, 4:4 + end].tolist() == reference[:end]
    assert out.num_new_tokens == [end]
    assert streamed == reference[:end]


def test_stats_are_consistent(pair):
    target, draft = pair
    out = specops.generate(target, torch.tensor([prompts(64, [6])[0]]), draft=draft,
                           num_draft_tokens=3, max_new_tokens=NEW, eos_token_id=[])
    stats = out.stats
    assert stats.new_tokens == NEW and stats.steps >= NEW / 4
    assert 1 <= stats.mean_emitted_per_step <= 4
    assert all(0 <= a <= 1 for a in stats.acceptance_per_position)
    assert sum(stats.draft_lengths.values()) == stats.steps
    assert stats.total_seconds >= stats.verify_seconds + stats.draft_seconds > 0
    assert set(stats.as_dict()) >= {"tokens_per_second", "acceptance_per_position"}
    assert "tok/s" in stats.summary()


def test_tree_stats_count_positions_down_to_each_trees_depth(pair):
    """A grown tree keeps its best nodes, which may not reach the tree's nominal depth: with
    one candidate per node and 3 nodes, every tree is a 2-token chain under the root, so no
    step can accept a third token and none is counted as tried."""
    target, draft = pair
    tree = specops.DynamicTree(depth=4, top_k=1, num_nodes=3, adaptive=False)
    out = specops.generate(target, torch.tensor(prompts(64, [6, 6])), draft=draft, tree=tree,
                           max_new_tokens=NEW, eos_token_id=[])
    stats = out.stats
    assert len(stats.tried) == 2 and stats.tried[0] >= stats.steps, stats.tried
    assert set(stats.draft_lengths) == {2}, stats.draft_lengths


@pytest.mark.parametrize("bad, error, words", [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.int64)), ValueError, "empty"),
    (dict(attention_mask=torch.tensor([[0, 0, 0]])), ValueError, "row 0"),
    (dict(input_ids=torch.tensor([[2, 3, 99]])), ValueError, "outside"),
    (dict(input_ids=torch.tensor([[2.0, 3.0, 4.0]])), TypeError, "input_ids"),
    (dict(max_new_tokens=300), ValueError, "max_position_embeddings"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=4.0), TypeError, "max_new_tokens must be an integer"),
    (dict(num_draft_tokens=2.5), TypeError, "num_draft_tokens must be an integer"),
    (dict(num_draft_tokens=65), ValueError, "num_draft_tokens must be in 0..64"),
    (dict(max_draft_tokens=-1), ValueError, "max_draft_tokens must be >= 0"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=-2), ValueError, "top_k"),
    (dict(seed=2 ** 63), ValueError, "seed"),
    (dict(seed=2 ** 63 - 1, input_ids=torch.tensor([[2, 3], [4, 5]])), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(repetition_penalty=1.2), TypeError, "repetition_penalty"),
    (dict(logprobs=True), TypeError, "not supported"),
    (dict(do_sample=True), TypeError, "temperature > 0 samples"),
    (dict(draft="lookup", tree=specops.DynamicTree()), ValueError, "tree"),
    (dict(draft="other-tokenizer"), ValueError, "tokenizer"),
    (dict(draft="meta"), ValueError, "device"),
    (dict(stop_strings=["end", ""]), ValueError, "non-empty strings"),
    (dict(stop_strings=[7]), ValueError, "non-empty strings"),
    (dict(eos_token_id=[1.5]), TypeError, "eos_token_id must be an id"),
    (dict(pad_token_id=1.5), TypeError, "pad_token_id must be an integer"),
    (dict(num_beam=2), TypeError, r"unknown options \(help\(specops.generate\)"),
    (dict(max_length=9), TypeError, "pass max_new_tokens"),
    (dict(use_cache=False), TypeError, "always uses its own KV cache"),
    (dict(eos_token_id="</s>"), TypeError, "eos_token_id must be an id"),
])
def test_bad_input_is_refused_clearly(bad, error, words):
    target = tiny_model("qwen2", seed=9)
    args = dict(input_ids=torch.tensor([[2, 3, 4]]), max_new_tokens=4)
    args.update(bad)
    if args.get("draft") == "lookup":
        args["draft"] = specops.PromptLookup()
    elif args.get("draft") == "other-tokenizer":
        other = tiny_model("llama", seed=1)
        other.config.eos_token_id = 7
        args["draft"] = other
    elif args.get("draft") == "meta":
        args["draft"] = tiny_model("qwen2", seed=1).to("meta")
    with pytest.raises(error, match=words):
        specops.generate(target, args.pop("input_ids"), **args)


@pytest.mark.parametrize("stop", ["\U00013000", "a\u00e9", "xyz"])
def test_a_stop_string_is_found_when_its_characters_take_a_token_per_byte(stop):
    """With a tokenizer of one token per byte (the worst case of byte-level BPE, for
    characters outside its merges) a stop string is found at the token that completes it,
    however many bytes its characters take (the 1-character U+13000 takes 4 tokens)."""
    from types import SimpleNamespace

    from specops.loop import _Run

    class ByteTokenizer:
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    before, after = list("some text ".encode()), list(" and more".encode())
    tokens = before + list(stop.encode()) + after
    run = SimpleNamespace(gen=SimpleNamespace(stop_strings=[stop], tokenizer=ByteTokenizer()),
                          rows=[[7, 8]], prompt_lens=[2])
    found = None
    for i, token in enumerate(tokens):
        run.rows[0].append(token)
        if _Run._stopped(run, 0):
            found = i
            break
    assert found == len(before) + len(stop.encode()) - 1, (stop, found)


def recording_streamer():
    """A ``transformers`` streamer that records what it is fed: ``puts`` (as lists) and the
    number of ``end()`` calls."""
    from transformers.generation.streamers import BaseStreamer

    class Recorder(BaseStreamer):
        def __init__(self):
            self.puts, self.ends = [], 0

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ends += 1
    return Recorder()


def test_a_hugging_face_streamer_is_fed_as_hugging_face_feeds_it():
    """A ``transformers`` streamer (``put``/``end``) gets the prompt, then the new tokens,
    then ``end()``: the same token stream as Hugging Face's greedy ``generate`` gives it."""
    target = tiny_model("qwen2", seed=5)
    ids = torch.tensor([prompts(64, [5], seed=6)[0]])
    ours, theirs = recording_streamer(), recording_streamer()
    out = specops.generate(target, ids, draft=noisy_copy(target, noise=0.1), num_draft_tokens=3,
                           max_new_tokens=9, eos_token_id=[], streamer=ours)
    target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, do_sample=False,
                    eos_token_id=None, pad_token_id=PAD, streamer=theirs)

    def flat(puts):
        return [t for value in puts for t in torch.tensor(value).flatten().tolist()]
    assert ours.puts[0] == ids.tolist() and ours.ends == 1 == theirs.ends
    assert flat(ours.puts) == flat(theirs.puts) == out.sequences[0].tolist()
    assert len(ours.puts) < len(theirs.puts)    # several tokens a step


def test_a_streamer_that_cannot_take_the_tokens_is_refused_before_any_work():
    target = tiny_model("qwen2", seed=5)
    recorder = recording_streamer()
    with pytest.raises(ValueError, match="one row"):
        specops.generate(target, torch.tensor([[2, 3], [4, 5]]), max_new_tokens=2,
                         streamer=recorder)
    assert recorder.puts == []
    with pytest.raises(TypeError, match="streamer must be"):
        specops.generate(target, torch.tensor([[2, 3]]), max_new_tokens=2, streamer=object())


class FixedProposer:
    """A custom drafter proposing ``proposal(rows)``."""

    def __init__(self, proposal):
        self.proposal = proposal

    def propose(self, rows, num_draft):
        return self.proposal(rows)


@pytest.mark.parametrize("proposal, words", [
    (lambda rows: [[70, 2]] * len(rows), r"gave row 0 tokens that are not ids in 0\.\.63"),
    (lambda rows: [[2, -1]] * len(rows), "gave row 0 tokens that are not ids"),
    (lambda rows: [["a"]] * len(rows), "gave row 0 tokens that are not ids"),
    (lambda rows: [[2.0]] * len(rows), "gave row 0 tokens that are not ids"),
    (lambda rows: [[2]], r"must return one list of tokens per row \(2\)"),
    (lambda rows: None, "must return one list of tokens per row"),
])
def test_a_custom_proposers_bad_tokens_are_refused_clearly(proposal, words):
    target = tiny_model("qwen2", seed=9)
    with pytest.raises(ValueError, match=words):
        specops.generate(target, torch.tensor([[2, 3, 4], [4, 3, 2]]), max_new_tokens=4,
                         draft=FixedProposer(proposal), num_draft_tokens=2)
    # good proposals of any int type run (a numpy id as a Python int)
    out = specops.generate(target, torch.tensor([[2, 3, 4], [4, 3, 2]]), max_new_tokens=4,
                           draft=FixedProposer(lambda rows: [[np.int64(5)], []]),
                           num_draft_tokens=2, eos_token_id=[])
    assert out.sequences.shape == (2, 7)


@pytest.mark.parametrize("min_match", [0, -1, 1.5])
def test_hybrid_refuses_a_bad_min_match(min_match):
    with pytest.raises(ValueError, match="min_match"):
        specops.Hybrid(tiny_model("qwen2", seed=1), min_match=min_match)


def test_mismatched_tokenizers_are_refused_with_advice():
    class Vocab:
        def __init__(self, words):
            self.words = words

        def get_vocab(self):
            return {w: i for i, w in enumerate(self.words)}

    target = tiny_model("qwen2", seed=9)
    with pytest.raises(ValueError, match="PromptLookup"):
        specops.SpeculativeGenerator(target, tiny_model("qwen2", seed=2),
                                     tokenizer=Vocab(["a", "b"]), draft_tokenizer=Vocab(["a", "c"]))


@pytest.mark.parametrize("verify, plain_steps", [({1: 1.0, 6: 6.0}, True),
                                                 ({1: 1.0, 6: 1.0}, False)])
def test_adaptive_tree_prunes_or_skips_trees_by_cost(pair, monkeypatch, verify, plain_steps):
    """Given costs (the online refinement from real timings is switched off): when each
    verified token costs as much as a plain step, the tree shrinks to its best node and
    plain decoding takes over; when verification is flat, every step verifies the whole
    tree. Either way the output is the target's greedy output."""
    from specops import loop
    monkeypatch.setattr(loop._Run, "_learn_cost", lambda *args: None)
    monkeypatch.setattr(loop._Run, "_learn_growth", lambda *args: None)
    target, draft = pair
    row = prompts(target.config.vocab_size, [6], seed=4)[0]
    gen = specops.SpeculativeGenerator(
        target, draft, tree=specops.DynamicTree(depth=3, top_k=2, num_nodes=6),
        eos_token_id=[])
    cost = CostModel(verify, 0.0)
    gen.costs[1] = {"tree": cost}
    gen.tree_controller = control = TreeSizeController(cost, 0.0, 6)
    out = gen.generate(torch.tensor([row]), max_new_tokens=NEW)
    assert_same_or_tie(target, row, out.sequences[0, 6:].tolist(), hf_greedy(target, row, NEW),
                       "adaptive tree")
    sizes = control.chosen_sizes
    if plain_steps:
        assert sizes[0] > 0 and max(sizes) == 1, sizes
    else:
        assert sizes[0] == 0 and set(sizes) == {5}, sizes
        assert out.stats.mean_emitted_per_step > 1.2, out.stats.summary()


@pytest.mark.parametrize("method", ["chain", "tree-plain", "tree"])
def test_step_timings_refine_the_controllers_cost_model(pair, monkeypatch, method):
    """On the CPU every step's timing refines the cost model of the controller that chose it:
    a chain step its controller's verify cost for that length, a grown tree its tree size's,
    a plain step of an adaptive tree ``verify(1)`` (plain decoding's rate). Warm-up costs of
    5 s, far above any real step here, must move."""
    from specops import loop
    monkeypatch.setattr(loop._Run, "_measure_verify",
                        lambda self, largest: {n: 5.0 for n in (1, 2, largest)})
    target, draft = pair
    row = torch.tensor([prompts(target.config.vocab_size, [6], seed=7)[0]])
    if method == "chain":
        gen = specops.SpeculativeGenerator(target, draft, max_draft_tokens=3, eos_token_id=[])
    else:
        gen = specops.SpeculativeGenerator(
            target, draft, tree=specops.DynamicTree(depth=2, top_k=2, num_nodes=4),
            eos_token_id=[])
        monkeypatch.setattr(TreeSizeController, "use_tree", lambda self: method == "tree")
    gen.generate(row, max_new_tokens=6)
    learnt = {n: s for n, s in gen.cost.verify_seconds.items() if s < 5.0}
    if method == "tree-plain":
        assert set(learnt) == {1}, gen.cost.verify_seconds
    elif method == "tree":
        assert learnt and min(learnt) > 1, gen.cost.verify_seconds
    else:
        assert learnt, gen.cost.verify_seconds


def test_warm_up_times_again_a_verify_reading_above_a_longer_ones(pair, monkeypatch):
    """Scripted warm-up readings (seconds of a forward over n tokens per row, in call order
    per n) for the sizes 1, 2, 9, 17: 2 and 9 read above 17 and are timed again, each
    keeping the lesser reading; 1 reads below everything longer and 17 is the longest, so
    they are timed once."""
    from specops import loop
    readings = {1: [1.0], 2: [3.0, 1.1], 9: [4.0, 5.0], 17: [2.0]}
    forwards, measured = [], []
    original_forward, original_time = loop._Run._chain_step_dummy, loop._Run._time
    original_measure = loop._Run._measure_verify

    def forward(self, n):
        forwards.append(n)
        return original_forward(self, n)

    def scripted(self, fn):     # warm-up verify forwards read from the script
        before = len(forwards)
        seconds = original_time(self, fn)
        return readings[forwards[-1]].pop(0) if len(forwards) > before else seconds

    def measure(self, largest):
        measured.append(original_measure(self, 17))
        return dict(measured[-1])

    monkeypatch.setattr(loop._Run, "_chain_step_dummy", forward)
    monkeypatch.setattr(loop._Run, "_time", scripted)
    monkeypatch.setattr(loop._Run, "_time_warm", lambda self, fn, cpu_calls=1: self._time(fn))
    monkeypatch.setattr(loop._Run, "_measure_verify", measure)
    target, _ = pair
    row = torch.tensor([prompts(target.config.vocab_size, [6], seed=7)[0]])
    gen = specops.SpeculativeGenerator(target, specops.PromptLookup(), eos_token_id=[])
    gen.generate(row, max_new_tokens=4)
    assert forwards == [1, 2, 9, 17, 9, 2], forwards
    assert measured == [{1: 1.0, 2: 1.1, 9: 4.0, 17: 2.0}], measured


@pytest.mark.parametrize("tree", [None, specops.DynamicTree(depth=2, top_k=2, num_nodes=4)])
def test_drafting_cost_is_not_learnt_from_a_catch_up_after_plain_steps(pair, monkeypatch, tree):
    """The first drafting step after plain steps feeds the draft every token it missed; that
    one-off cost is not learnt as the cost of a drafting step (it would keep the controller
    decoding plainly). Scripted choices: draft, 4 plain steps, then draft on."""
    from specops import loop
    script = iter([True] + [False] * 4)
    learnt = []
    if tree is None:
        def choose(self):
            return 3 if next(script, True) else 0
        monkeypatch.setattr(DraftLengthController, "choose", choose)
        original = CostModel.learn_draft
        monkeypatch.setattr(CostModel, "learn_draft",
                            lambda self, g, t: (learnt.append(g), original(self, g, t)))
    else:
        monkeypatch.setattr(TreeSizeController, "use_tree", lambda self: next(script, True))
        monkeypatch.setattr(loop._Run, "_learn_growth", lambda self, t: learnt.append(t))
    target, draft = pair
    row = torch.tensor([prompts(target.config.vocab_size, [6], seed=9)[0]])
    gen = specops.SpeculativeGenerator(target, draft, tree=tree, max_draft_tokens=3,
                                       eos_token_id=[])
    out = gen.generate(row, max_new_tokens=40)
    drafting_steps = out.stats.steps - out.stats.draft_lengths[0]
    assert drafting_steps >= 3, out.stats.summary()
    assert len(learnt) == drafting_steps - 1       # all but the one after the plain steps


@pytest.mark.parametrize("tree", [None, specops.DynamicTree(depth=2, top_k=2, num_nodes=4)])
def test_each_batch_size_has_its_own_cost_model(pair, monkeypatch, tree):
    """A verify pass over 3 rows costs more than over 1: the generator measures each batch
    size once, switches the controllers' cost model with the batch size and keeps the
    acceptance estimates."""
    from specops import loop
    measured = []
    original = loop._Run._measure_verify

    def counting(self, largest):
        measured.append(self.batch)
        return original(self, largest)

    monkeypatch.setattr(loop._Run, "_measure_verify", counting)
    target, draft = pair
    rows = prompts(target.config.vocab_size, [6, 4, 5], seed=8)
    gen = specops.SpeculativeGenerator(target, draft, tree=tree, max_draft_tokens=3,
                                       eos_token_id=[])
    kind = "model" if tree is None else "tree"
    gen.generate(torch.tensor(rows[:1]), max_new_tokens=6)
    one = gen.costs[1][kind]
    control = gen.controller if tree is None else gen.tree_controller
    ids, mask = padded(rows, "left")
    gen.generate(ids, attention_mask=mask, max_new_tokens=6)
    three = gen.costs[3][kind]
    assert three is not one and three.verify_seconds is not one.verify_seconds
    assert gen.cost is three and control.cost is three
    assert (gen.controller if tree is None else gen.tree_controller) is control
    gen.generate(torch.tensor(rows[:1]), max_new_tokens=6)
    assert gen.cost is one and control.cost is one
    assert measured == [1, 3]                      # batch 1 again: not measured again
    if tree is not None:
        assert control.growth_seconds == one.draft_fixed_seconds


def test_generate_measures_costs_once_per_target_drafter_and_options(monkeypatch):
    """``specops.generate`` builds a generator per call but measures the verify costs only at
    the first call with a given target, draft model object, proposer class and cost-relevant
    options; each call's controllers start with fresh acceptance estimates, and the kept
    costs go with the target."""
    import gc
    import weakref

    from specops import loop
    measured, controllers = [], []
    original_measure, original_init = loop._Run._measure_verify, DraftLengthController.__init__

    def counting(self, largest):
        measured.append((type(self.gen.lookup).__name__, self.draft is not None, largest))
        return original_measure(self, largest)

    def created(self, *args, **kwargs):
        controllers.append(self)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(loop._Run, "_measure_verify", counting)
    monkeypatch.setattr(DraftLengthController, "__init__", created)
    target, draft = tiny_pair("qwen2")
    row = torch.tensor([prompts(target.config.vocab_size, [6], seed=9)[0]])

    held = {"target": target}       # dropped at the end, so that the target can go

    def run(drafter, **options):
        specops.generate(held["target"], row, draft=drafter, max_new_tokens=4, eos_token_id=[],
                         **options)

    run(specops.PromptLookup())
    run(specops.PromptLookup())                       # a new proposer of the same class
    assert measured == [("PromptLookup", False, 33)] and len(controllers) == 2
    assert controllers[0] is not controllers[1] and controllers[0].cost is controllers[1].cost
    run(draft)
    run(draft)
    run(draft, max_draft_tokens=3)                    # other sizes to measure
    run(draft, temperature=0.5)                       # a sampled step costs more
    run(noisy_copy(target, noise=0.1))                # another draft model
    assert measured[1:] == [("NoneType", True, 9), ("NoneType", True, 4),
                            ("NoneType", True, 9), ("NoneType", True, 9)], measured
    assert len(loop._KEPT_COSTS[target]) == 5
    gone = weakref.ref(target)
    held.clear()
    del target, draft
    gc.collect()
    assert gone() is None                       # the kept costs do not hold the target


def test_the_cost_warm_up_is_timed_apart_at_the_first_call_only(pair):
    """``stats.warmup_seconds``: the controller's measurement at a generator's first call
    (per batch size), 0 at the next; the phases add up to the call's time."""
    target, draft = pair
    row = torch.tensor([prompts(target.config.vocab_size, [6], seed=5)[0]])
    gen = specops.SpeculativeGenerator(target, draft, max_draft_tokens=3, eos_token_id=[])
    first, second = (gen.generate(row, max_new_tokens=6).stats for _ in range(2))
    assert first.warmup_seconds > 0 and second.warmup_seconds == 0
    for stats in (first, second):
        phases = (stats.prefill_seconds, stats.draft_seconds, stats.verify_seconds,
                  stats.overhead_seconds, stats.warmup_seconds)
        assert sum(phases) == pytest.approx(stats.total_seconds)
    assert "warmup_seconds" in first.as_dict() and "warm-up" in first.summary()


@pytest.mark.parametrize("tree", [
    specops.DynamicTree(depth=4, top_k=8, num_nodes=8, adaptive=False),
    specops.DynamicTree(depth=6, top_k=6, num_nodes=4, adaptive=False),
    specops.DynamicTree(depth=5, top_k=5, num_nodes=3)])
def test_a_small_grown_tree_runs_to_the_end_of_the_cache(tree):
    """A grown tree keeping fewer nodes than its last round feeds the draft ((depth - 1) *
    top_k tokens) still has room in the draft's cache at the last steps (it overflowed
    there: a ValueError from kv_write, an unchecked write past the cache on a GPU)."""
    target = tiny_model("qwen2", seed=3)
    row = prompts(64, [6], seed=1)[0]
    out = specops.generate(target, torch.tensor([row]), draft=noisy_copy(target, noise=0.1),
                           tree=tree, max_new_tokens=30, eos_token_id=[])
    assert_same_or_tie(target, row, out.sequences[0, len(row):].tolist(),
                       hf_greedy(target, row, 30), str(tree))


def test_reset_estimates_keeps_the_cost_model(pair):
    target, draft = pair
    row = torch.tensor([prompts(target.config.vocab_size, [6], seed=5)[0]])
    chain = specops.SpeculativeGenerator(target, draft, max_draft_tokens=3)
    chain.generate(row, max_new_tokens=8)
    chain.controller.update(3, [0, 1])          # (tiny models often decode plainly: no data)
    cost, learnt = chain.cost, chain.controller.acceptance()
    chain.reset_estimates()
    assert chain.cost is cost and chain.controller.cost is cost
    fresh = chain.controller.acceptance()
    assert np.allclose(fresh, 0.7) and not np.allclose(learnt, fresh)
    tree = specops.SpeculativeGenerator(target, draft,
                                        tree=specops.DynamicTree(depth=2, top_k=2, num_nodes=4))
    tree.generate(row, max_new_tokens=8)
    growth = tree.tree_controller.growth_seconds
    assert tree.tree_controller.calibration != 1.0
    tree.reset_estimates()
    assert tree.tree_controller.calibration == 1.0
    assert tree.tree_controller.growth_seconds == growth and tree.tree_controller.cost is tree.cost


def test_default_longest_drafts(pair):
    """Lookup steps may draft up to PromptLookup.num_draft (32), draft-model steps up to 8;
    max_draft_tokens or num_draft_tokens set both."""
    target, draft = pair
    make = specops.SpeculativeGenerator
    assert make(target, specops.PromptLookup()).max_draft == {"lookup": 32}
    assert make(target, specops.PromptLookup(num_draft=12)).max_draft == {"lookup": 12}
    assert make(target, draft).max_draft == {"model": 8}
    assert make(target, specops.Hybrid(draft)).max_draft == {"model": 8, "lookup": 32}
    assert make(target, specops.Hybrid(draft), max_draft_tokens=5).max_draft == \
        {"model": 5, "lookup": 5}
    assert make(target, specops.PromptLookup(), num_draft_tokens=3).max_draft == {"lookup": 3}
    assert make(target, None).max_draft == {}


def test_verify_cost_is_measured_along_a_long_draft_range(pair):
    """A 32-token lookup range measures the verify pass at 1, 2, 9, 17 and 33 tokens (not
    one straight line from 2 to 33)."""
    target, _ = pair
    row = torch.tensor([prompts(target.config.vocab_size, [6], seed=6)[0]])
    gen = specops.SpeculativeGenerator(target, specops.PromptLookup(), eos_token_id=[])
    gen.generate(row, max_new_tokens=4)
    assert {1, 2, 9, 17, 33} <= set(gen.cost.verify_seconds), gen.cost.verify_seconds


class _FixedProposer:
    """Proposes the root repeated ``num_draft`` times for every row, or nothing."""

    def __init__(self, proposes: bool, num_draft: int = 12):
        self.proposes, self.num_draft = proposes, num_draft

    def propose(self, rows, num_draft):
        return [[row[-1]] * num_draft if self.proposes else [] for row in rows]


class _KnowingProposer:
    """Proposes ``num_draft`` tokens of a known continuation of the prompt (the target's
    greedy one), or the same tokens shifted by one id: always right or always wrong."""

    def __init__(self, prompt: list[int], continuation: list[int], right: bool, vocab: int,
                 num_draft: int = 12):
        self.prompt, self.continuation, self.right = prompt, continuation, right
        self.vocab, self.num_draft = vocab, num_draft

    def propose(self, rows, num_draft):
        out = []
        for row in rows:
            ahead = self.continuation[len(row) - len(self.prompt):][:num_draft]
            out.append(ahead if self.right else [(t + 1) % self.vocab for t in ahead])
        return out


def _scripted_hybrid(pair, monkeypatch, lookup_right: bool, compare: bool):
    """A Hybrid over a :class:`_KnowingProposer` with given cost models that steps do not
    refine (flat verify costs, 0.1 s per draft-model token, free lookups): the generator,
    the target, the prompt and the target's greedy continuation of 60 tokens."""
    from specops import loop
    monkeypatch.setattr(loop._Run, "_learn_cost", lambda self, *args: None)
    target, draft = pair
    vocab = target.config.vocab_size
    row = prompts(vocab, [6], seed=7)[0]
    reference = hf_greedy(target, row, 60)
    gen = specops.SpeculativeGenerator(
        target, specops.Hybrid(draft, _KnowingProposer(row, reference, lookup_right, vocab),
                               min_match=1, compare=compare), eos_token_id=[])
    verify = {1: 1.0, 2: 1.0, 9: 1.0, 13: 1.0}
    gen.costs[1] = {"model": CostModel(dict(verify), 0.1), "lookup": CostModel(dict(verify), 0.0)}
    return gen, target, row, reference


@pytest.mark.parametrize("lookup_right", [True, False])
def test_hybrid_uses_a_match_only_where_it_pays(pair, monkeypatch, lookup_right):
    """``Hybrid(compare=True)`` with given cost models (:func:`_scripted_hybrid`): a lookup
    that is always right beats the draft model at every step; one that is always wrong loses
    to it after a few steps (its acceptance estimate falls from the 0.7 prior) and is then
    tried only as a probe every 16th step where it matched (the two pairs' drafts accept at
    different rates, so where the switch comes differs). With ``compare=False`` (default)
    every step takes the match. Output: the target's greedy one."""
    for compare in (True, False):
        gen, target, row, reference = _scripted_hybrid(pair, monkeypatch, lookup_right, compare)
        out = gen.generate(torch.tensor([row]), max_new_tokens=len(reference))
        assert_same_or_tie(target, row, out.sequences[0, 6:].tolist(), reference, "hybrid")
        kinds = out.stats.step_kinds
        if lookup_right or not compare:
            assert kinds["lookup"] >= out.stats.steps - 1, kinds   # the last may be cut short
            assert gen.lookup_prober.count == 0
        else:
            probes = gen.lookup_prober.count
            assert out.stats.steps >= 20 and probes >= 1, (out.stats.summary(), kinds)
            # each wrong lookup step lowers its estimate: ~2.8 / (4 + k) for position 1 after
            # k of them, below what the draft model's steps make within a few
            assert kinds["lookup"] - probes <= 8 and kinds["model"] >= 3 * kinds["lookup"], kinds


@pytest.mark.parametrize("prefill_seconds", [0.0, 1e6])
def test_hybrid_comparison_charges_the_draft_models_prefill(pair, monkeypatch, prefill_seconds):
    """Before its first step the draft model is not prefilled: ``compare=True`` charges that
    prefill to it. Priced at nothing, an always-wrong lookup loses to the draft model within
    a few steps (as in the test above); priced above what the lookup could lose by the end,
    every step takes the lookup (the 16-step probe aside) and the draft never runs."""
    from specops import loop
    monkeypatch.setattr(loop._Run, "_draft_prefill_guess", lambda self: prefill_seconds)
    gen, target, row, reference = _scripted_hybrid(pair, monkeypatch, False, compare=True)
    out = gen.generate(torch.tensor([row]), max_new_tokens=len(reference))
    assert_same_or_tie(target, row, out.sequences[0, 6:].tolist(), reference, "hybrid")
    kinds = out.stats.step_kinds
    if prefill_seconds:
        # (the last steps may find no continuation left to propose, and decode plainly)
        assert kinds["model"] == 0 and kinds["lookup"] >= out.stats.steps - 2, kinds
    else:
        assert kinds["model"] >= 3 * kinds["lookup"], kinds


def test_hybrid_lookup_learns_from_the_matches_it_did_not_use(pair, monkeypatch):
    """A lookup that is always right but starts with low estimates (ten failed 8-token
    steps) loses the comparison at first; its unused matches agree with the tokens the draft
    model's steps emit, which raises its estimates until it wins, long before a probe (the
    16th losing match) would have tried it."""
    gen, target, row, reference = _scripted_hybrid(pair, monkeypatch, True, compare=True)
    gen.controllers = {kind: DraftLengthController(gen.costs[1][kind], most)
                       for kind, most in gen.max_draft.items()}
    for _ in range(10):
        gen.controllers["lookup"].update(8, [0])
    out = gen.generate(torch.tensor([row]), max_new_tokens=len(reference))
    assert_same_or_tie(target, row, out.sequences[0, 6:].tolist(), reference, "hybrid")
    kinds = out.stats.step_kinds
    assert 1 <= kinds["model"] < kinds["lookup"], kinds
    assert gen.lookup_prober.count == 0, kinds


@pytest.mark.parametrize("matches", [True, False])
def test_hybrid_gives_each_kind_of_step_its_own_controller(pair, matches, monkeypatch):
    """A hybrid step where every row has a lookup match is chosen by the lookup controller
    (its own longest draft, no draft-model cost), any other by the draft model's; the two
    share the measured verify costs, the draft model is prefilled only once a step needs it,
    and the output stays the target's greedy one."""
    target, draft = pair
    row = prompts(target.config.vocab_size, [6], seed=7)[0]
    from specops.draft_model import DraftRunner
    prefills = []
    real_prefill = DraftRunner.prefill
    monkeypatch.setattr(DraftRunner, "prefill",
                        lambda runner, rows: prefills.append(rows) or real_prefill(runner, rows))
    gen = specops.SpeculativeGenerator(
        target, specops.Hybrid(draft, _FixedProposer(matches), min_match=1), eos_token_id=[])
    out = gen.generate(torch.tensor([row]), max_new_tokens=NEW)
    assert_same_or_tie(target, row, out.sequences[0, 6:].tolist(), hf_greedy(target, row, NEW),
                       "hybrid")
    assert set(out.stats.step_kinds) - {"plain"} == {"lookup" if matches else "model"}
    model, lookup = gen.controllers["model"], gen.controllers["lookup"]
    assert (model.max_draft, lookup.max_draft) == (8, 12)
    assert lookup.cost.verify_seconds is model.cost.verify_seconds
    assert model.cost is gen.cost and lookup.cost is not gen.cost
    busy, idle = (lookup, model) if matches else (model, lookup)
    assert sum(busy.chosen_lengths.values()) == out.stats.steps and not idle.chosen_lengths
    assert len(prefills) == (0 if matches else 1), len(prefills)
    if matches:   # no draft-model step ran: the lookup steps' draft cost is the proposer's
        assert lookup.cost.draft_step_seconds < gen.cost.draft_step_seconds
