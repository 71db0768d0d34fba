"""The loop's device-graph path on the CPU, through a stand-in backend that behaves like a
CUDA graph where it matters to the loop.

Real CUDA graphs are tested only on a GPU (``test_graphs.py``). This stand-in lets every
machine run the loop's graph path (``GraphedStep``: a capture per shape, static inputs,
replays, the switching between draft lengths and tree sizes) end to end. At capture it traces
the step once with ``make_fx`` and from then on replays the trace, so, as in a CUDA graph:

- Python values are fixed at capture: a step that reads a Python value which later changes,
  or a tensor's value on the host (``.item()``, ``bool(t)``: a sync a capture forbids), fails
  here (the value is frozen, or the trace raises);
- a replay reads only the static inputs and the tensors the step closes over (weights, KV
  cache) in place, and its output overwrites the previous replay's.

What it cannot show: CUDA streams, the caching allocator's private pool, Triton kernels under
capture. The CUDA test covers those where a GPU is present.
"""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import specops
import specops.graphs
from specops import _checks
from specops.draft_model import FEED_WIDTHS, DraftRunner
from specops.graphs import GraphedStep
from loop_models import METHODS, assert_same_or_tie, drafters, hf_greedy, padded, prompts, tiny_pair

NEW = 20


class TracedReplay:
    """A captured step: the trace, its static inputs, and the output each replay overwrites."""

    def __init__(self, backend, trace, static_inputs, static_output):
        self.backend, self.trace = backend, trace
        self.static_inputs, self.static_output = static_inputs, static_output

    def replay(self):
        self.backend.replays += 1
        outputs = self.trace(*self.static_inputs)
        if isinstance(outputs, torch.Tensor):
            outputs, static = (outputs,), (self.static_output,)
        else:                                       # a step of several output tensors
            static = self.static_output
        for out, value in zip(static, outputs):
            out.copy_(value)


class TracedGraphs:
    """Graph backend for the CPU in these tests (``specops.graphs._BACKENDS["cpu"]``)."""

    instances: list["TracedGraphs"] = []       # every backend built, for the tests to count

    def __init__(self):
        self.captures = self.replays = 0
        TracedGraphs.instances.append(self)

    def capture(self, fn, static_inputs, warmup):
        for _ in range(warmup):
            fn(*static_inputs)
        with _checks.graph_capture():
            # the lambda: make_fx traces every parameter, and a step may have defaults
            trace = make_fx(lambda *tensors: fn(*tensors))(*static_inputs)
        self.captures += 1
        static_output = trace(*static_inputs)
        return TracedReplay(self, trace, static_inputs, static_output), static_output


@pytest.fixture
def cpu_graphs(monkeypatch):
    """The stand-in as the CPU's graph backend; returns the list of backends built."""
    monkeypatch.setitem(specops.graphs._BACKENDS, "cpu", TracedGraphs)
    monkeypatch.setattr(TracedGraphs, "instances", [])
    return TracedGraphs.instances


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def pair(request):
    return tiny_pair(request.param)


@pytest.mark.parametrize("method", METHODS)
def test_greedy_through_graphs_equals_target_generate(pair, cpu_graphs, method):
    target, draft = pair
    rows = prompts(target.config.vocab_size, [5, 1, 9])
    ids, mask = padded(rows, "left")
    out = specops.generate(target, ids, attention_mask=mask, max_new_tokens=NEW,
                           eos_token_id=[], cuda_graphs=True, **drafters(draft)[method])
    for b, row in enumerate(rows):
        assert_same_or_tie(target, row, out.sequences[b, 9:].tolist(),
                           hf_greedy(target, row, NEW), f"{method} row {b}")
    # the graph path really ran: every step shape captured once, then replayed
    captures = sum(g.captures for g in cpu_graphs)
    replays = sum(g.replays for g in cpu_graphs)
    assert captures > 0 and replays > captures, (captures, replays)


@pytest.mark.parametrize("options", [
    dict(num_draft_tokens=3),
    dict(num_draft_tokens=2, temperature=0.8, top_p=0.9, seed=5),
    dict(num_draft_tokens=4, temperature=1.0, top_k=10, seed=2),
    dict(tree=specops.DynamicTree(depth=3, top_k=2, num_nodes=6, adaptive=False),
         temperature=0.7, seed=3),
    dict(tree=specops.StaticTree((2, 2)), temperature=1.0, seed=7),
    dict(tree=specops.StaticTree((3, 1), sampled=False), temperature=0.9, seed=4),
])
def test_sampling_through_graphs_equals_eager(pair, cpu_graphs, options):
    """Fixed draft lengths, so both runs take the same steps: same tokens, bit for bit."""
    target, draft = pair
    ids, mask = padded(prompts(target.config.vocab_size, [5, 1, 9]), "left")
    runs = [specops.generate(target, ids, attention_mask=mask, draft=draft, max_new_tokens=NEW,
                             eos_token_id=[], cuda_graphs=graphs, **options)
            for graphs in (False, True)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert sum(g.replays for g in cpu_graphs) > 0


def test_stand_in_freezes_python_values(cpu_graphs):
    """The stand-in can fail a step that a device graph would break: a Python value read at
    capture stays what it was, and a host read of a tensor value cannot be traced."""
    offset = [1.0]

    def step(x):
        return x + offset[0]

    graphed = GraphedStep(step, warmup=1, device="cpu")
    x = torch.zeros(2)
    assert graphed(x).tolist() == [1.0, 1.0]
    offset[0] = 5.0
    assert graphed(x).tolist() == [1.0, 1.0]          # eager would give 5
    synced = GraphedStep(lambda t: t * float(t.sum()), warmup=0, device="cpu")
    with pytest.raises(RuntimeError, match="data-dependent|tracing tensor"):
        synced(torch.ones(2))


def test_value_checks_are_off_only_during_capture(cpu_graphs):
    """Value checks read tensors on the host, which a capture cannot: they are suspended
    while a graph captures, and back on for the eager calls around it."""
    seen = []

    def step(x):
        seen.append(_checks.values_checked(x.device))
        return x * 2

    GraphedStep(step, warmup=2, device="cpu")(torch.ones(1))
    assert seen == [True, True, False]               # two warm-up calls, then the capture
    assert _checks.values_checked(torch.device("cpu"))


def test_replay_output_is_overwritten(cpu_graphs):
    """As with a CUDA graph, the step's output is one tensor, overwritten by every replay."""
    graphed = GraphedStep(lambda x: x * 2, warmup=0, device="cpu")
    first = graphed(torch.tensor([1.0]))
    second = graphed(torch.tensor([3.0]))
    assert second is first and first.tolist() == [6.0]


@pytest.mark.parametrize("options", [
    dict(num_draft_tokens=3),
    dict(tree=specops.StaticTree((2, 2)), temperature=1.0, seed=7),
])
def test_a_generator_keeps_its_graphs_between_calls(pair, cpu_graphs, options):
    """A reused generator keeps its graphed steps: a second call of the same batch size that
    needs no more room replays them on the first call's caches (whose old entries lie past
    every row's length), capturing only step shapes it had not met (a draft cut shorter
    near the end), and gives the same tokens as eager decoding; a call needing more room,
    or another batch size, builds new ones; release_graphs frees them."""
    target, draft = pair
    vocab = target.config.vocab_size
    gen = specops.SpeculativeGenerator(target, draft, eos_token_id=[], cuda_graphs=True,
                                       **options)
    eager = specops.SpeculativeGenerator(target, draft, eos_token_id=[], **options)

    def both(lengths, new, seed):
        """(graphed steps built so far, captures so far) after one call of each generator."""
        ids, mask = padded(prompts(vocab, lengths, seed=seed), "left")
        runs = [g.generate(ids, mask, max_new_tokens=new) for g in (gen, eager)]
        assert torch.equal(runs[0].sequences, runs[1].sequences), (lengths, new)
        return len(cpu_graphs), sum(g.captures for g in cpu_graphs)

    steps, captures = both([5, 1, 9], NEW, seed=1)
    kept = gen._graphed
    # the target's chain step, its tree forward (with a tree), the draft's one-token step
    # and its chain's first pick
    assert steps == (4 if "tree" in options else 3) and captures > 0
    again = both([7, 3, 2], NEW, seed=2)
    assert again[0] == steps and again[1] - captures < captures and gen._graphed is kept
    assert both([4, 9, 6], NEW - 5, seed=3)[0] == steps and gen._graphed is kept
    assert both([9, 9, 30], NEW, seed=4)[0] == 2 * steps      # more room: new caches
    assert gen._graphed is not kept
    assert both([5, 2], NEW, seed=5)[0] == 3 * steps          # another batch size
    gen.release_graphs()
    assert gen._graphed is None and eager._graphed is None   # without graphs nothing is kept


def test_warm_up_costs_are_measured_through_the_graphed_steps(pair, cpu_graphs):
    """The cost-aware warm-up times the steps the loop runs: with graphs, the chain steps
    (forward and verify) of the sizes it measures (1, 2 and max_draft + 1 tokens) are
    captured and the draft's one-token step too.
    Timing the eager forward instead priced a GPU step at its kernel launches (39-60 ms for a
    one-token forward on an H200, against 6.2 ms for a whole graphed decoding step)."""
    target, draft = pair
    gen = specops.SpeculativeGenerator(target, draft, eos_token_id=[], cuda_graphs=True,
                                       max_draft_tokens=4)
    ids, mask = padded(prompts(target.config.vocab_size, [5, 9]), "left")
    gen.generate(ids, mask, max_new_tokens=2)
    # a chain step's graphs are keyed by (inputs, drafts) shapes: drafts are (B, size - 1)
    verify_sizes = {key[1][0][1] + 1 for key in gen._graphed.chain_step.graphs}
    assert {1, 2, 5} <= verify_sizes, verify_sizes
    assert gen._graphed.draft._one_token.graphs


def test_graphs_default_to_cuda_only(pair, cpu_graphs):
    """cuda_graphs=None (the default) means CUDA graphs for a target on CUDA and nothing
    elsewhere: here the CPU has a (stand-in) graph backend, and it stays unused."""
    target, draft = pair
    gen = specops.SpeculativeGenerator(target, draft, num_draft_tokens=2, eos_token_id=[])
    assert gen.cuda_graphs is None
    ids, mask = padded(prompts(target.config.vocab_size, [5, 9]), "left")
    gen.generate(ids, mask, max_new_tokens=4)
    assert cpu_graphs == [] and gen._graphed is None


class HostTraffic:
    """What one loop step does on the host, per loop phase ("draft", "verify"): tensors made
    from host data (on a GPU each is a host-to-device copy), reads of tensor values on the
    host (each a device-to-host copy and a sync), calls of the verify ops (which belong in
    the graph) and runs of a model's forward from Python (which a replayed step does not
    make). Counted only inside the step method ``step`` of ``_Run``."""

    READS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__")
    MADE = ("tensor", "as_tensor", "from_numpy")
    VERIFY = ("chain_verify", "chain_verify_greedy", "sampling_probs")
    # the tree step's device work, as the loop module calls it
    TREE = ("tree_metadata", "tree_verify", "tree_verify_greedy", "kv_commit")

    def __init__(self, monkeypatch):
        self.on, self.phase = False, None
        self.counts: dict[tuple[str, str], int] = {}
        for name in self.READS:
            monkeypatch.setattr(torch.Tensor, name,
                                self.counted("read", getattr(torch.Tensor, name)))
        for name in self.MADE:
            monkeypatch.setattr(torch, name, self.counted("made", getattr(torch, name)))
        for name in self.VERIFY:
            monkeypatch.setattr(specops.ops, name, self.counted("verify op",
                                                                getattr(specops.ops, name)))
        for name in self.TREE:
            monkeypatch.setattr(specops.loop, name, self.counted("verify op",
                                                                 getattr(specops.loop, name)))
        lm = specops.models.SpecopsCausalLM
        monkeypatch.setattr(lm, "_forward", self.counted("forward", lm._forward))
        switch = specops.stats.PhaseClock.switch

        def recorded_switch(clock, phase):
            self.phase = phase
            return switch(clock, phase)
        monkeypatch.setattr(specops.stats.PhaseClock, "switch", recorded_switch)

    def counted(self, kind, fn):
        def wrapper(*args, **kwargs):
            if self.on:
                key = (self.phase, kind)
                self.counts[key] = self.counts.get(key, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    def steady_steps(self, monkeypatch, cpu_graphs, step: str) -> list[dict]:
        """Counts every call of ``_Run.<step>``; returns (filled as the loop runs) the counts
        of the steps that captured no graph: a shape's first step runs eagerly (its
        warm-up calls), and so does a catch-up longer than the graphed widths."""
        original = getattr(specops.loop._Run, step)
        steady = []

        def counted_step(run, *args, **kwargs):
            captures = sum(g.captures for g in cpu_graphs)
            self.counts, self.on = {}, True
            try:
                emitted = original(run, *args, **kwargs)
            finally:
                self.on = False
            if sum(g.captures for g in cpu_graphs) == captures:
                steady.append(self.counts)
            return emitted
        monkeypatch.setattr(specops.loop._Run, step, counted_step)
        return steady


@pytest.mark.parametrize("options", [
    dict(),
    dict(temperature=0.8, top_p=0.9, seed=5),
    dict(draft=specops.PromptLookup(max_ngram=2), num_draft_tokens=4),
    dict(draft=specops.PromptLookup(max_ngram=2), num_draft_tokens=4, temperature=1.0, seed=2),
    dict(draft="model", num_draft_tokens=3),
    dict(draft="model", num_draft_tokens=2, temperature=1.0, top_k=10, seed=3),
    dict(draft="hybrid", num_draft_tokens=3),
    dict(draft="hybrid", num_draft_tokens=4, temperature=0.8, top_p=0.9, seed=4),
])
def test_a_replayed_chain_step_moves_its_inputs_once_and_reads_once(pair, cpu_graphs,
                                                                    monkeypatch, options):
    """A graphed chain step sends its small integer inputs (cached lengths, roots, draft
    lengths, seeds, lookup tokens) to the device in one copy and reads its result back once,
    and the verify op (with the warp when sampling) runs inside the graph: a replayed step
    calls none of them from Python. Without a draft model the drafting phase touches no
    tensor at all; with one it sends its inputs (the catch-up's tokens and lengths, seeds,
    a hybrid's lookup tokens) in one copy, reads nothing back, and the catch-up feed with
    the first pick, then each further draft token's forward and pick (argmax, or the warp
    and a Philox draw), replay graphs: no model forward runs from Python in either phase.
    Steps that captured a graph (a shape's first) are not counted: their warm-up calls run
    the step eagerly. Value checks are off, as on a GPU at the default level (on the CPU
    eager calls' checks read lengths on the host)."""
    target, draft = pair
    monkeypatch.setattr(specops._checks, "values_checked", lambda device: False)
    if options.get("draft") == "model":
        options = dict(options, draft=draft)
    if options.get("draft") == "hybrid":
        options = dict(options, draft=specops.Hybrid(draft, specops.PromptLookup(max_ngram=2)))
    with_model = isinstance(options.get("draft"), (torch.nn.Module, specops.Hybrid))
    traffic = HostTraffic(monkeypatch)
    steady = traffic.steady_steps(monkeypatch, cpu_graphs, "_chain_step")
    rows = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 3, 9, 3, 9, 3, 9]]     # lookup finds matches
    ids, mask = padded(rows, "left")
    specops.generate(target, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[],
                     cuda_graphs=True, **options)
    assert len(steady) >= 3, steady
    for counts in steady:
        assert counts.get(("verify", "made"), 0) <= 1, counts
        assert counts.get(("verify", "read"), 0) == 1, counts
        assert ("verify", "verify op") not in counts, counts
        if not with_model:
            assert set(counts) <= {("verify", "made"), ("verify", "read")}, counts
        assert counts.get(("draft", "made"), 0) <= 1, counts
        assert ("draft", "read") not in counts and ("draft", "verify op") not in counts, counts
        assert ("draft", "forward") not in counts and ("verify", "forward") not in counts, \
            counts
    if with_model:               # some counted steps ran the draft model
        assert any(("draft", "made") in counts for counts in steady), steady


@pytest.mark.parametrize("tree, options", [
    (specops.DynamicTree(depth=3, top_k=2, num_nodes=6), dict()),
    (specops.DynamicTree(depth=3, top_k=2, num_nodes=6, adaptive=False),
     dict(temperature=0.7, seed=3)),
    (specops.StaticTree((2, 2)), dict()),
    (specops.StaticTree((2, 2)), dict(temperature=1.0, top_p=0.9, seed=7)),
    (specops.StaticTree((3, 1), sampled=False), dict(temperature=0.9, seed=4)),
])
def test_a_replayed_tree_step_moves_its_inputs_once_and_reads_once(pair, cpu_graphs,
                                                                   monkeypatch, tree, options):
    """A graphed tree step's drafting phase sends its inputs (each row's root, seed and
    catch-up tokens) to the device in one copy and grows the whole tree (the catch-up, then
    every round or level of the draft model) in one replay; an adaptive tree reads the
    grown tree's scores once to size it, any other reads nothing. Its verify phase sends the
    cached lengths and seeds in one copy and reads the result once: the mask, the target's
    forward, the verify op and the KV commit run inside the graph, none from Python. Steps
    that captured a graph are not counted (see the chain test)."""
    target, draft = pair
    monkeypatch.setattr(specops._checks, "values_checked", lambda device: False)
    # the tiny random pair rarely agrees, so an adaptive tree would decode plainly
    monkeypatch.setattr(specops.controller.TreeSizeController, "use_tree", lambda self: True)
    traffic = HostTraffic(monkeypatch)
    steady = traffic.steady_steps(monkeypatch, cpu_graphs, "_tree_step")
    ids, mask = padded(prompts(target.config.vocab_size, [5, 1, 9]), "left")
    specops.generate(target, ids, attention_mask=mask, draft=draft, tree=tree,
                     max_new_tokens=NEW, eos_token_id=[], cuda_graphs=True, **options)
    adaptive = isinstance(tree, specops.DynamicTree) and tree.adaptive
    assert len(steady) >= 3, steady
    for counts in steady:
        assert counts.get(("draft", "made")) == 1, counts
        assert counts.get(("draft", "read"), 0) == (1 if adaptive else 0), counts
        assert counts.get(("verify", "made")) == 1, counts
        assert counts.get(("verify", "read")) == 1, counts
        assert not {("draft", "forward"), ("verify", "forward"), ("draft", "verify op"),
                    ("verify", "verify op")} & set(counts), counts


@pytest.mark.parametrize("graphs", [False, True])
def test_catch_up_feed_width(pair, cpu_graphs, graphs):
    """With graphs a catch-up feed is padded to the least graphed width that holds every
    row's new tokens and keeps every row's writes inside the cache, and runs eagerly at its
    own width when none does (longer than the widths, or no room left); without graphs it is
    never padded."""
    _, draft = pair
    runner = DraftRunner(specops.models.causal_lm(draft), 2, 40, draft.config.vocab_size,
                         specops.loop._pick_draft((0.0, 0, 1.0)), graphs=graphs)
    assert FEED_WIDTHS == tuple(sorted(FEED_WIDTHS)) and FEED_WIDTHS[0] == 1
    cases = [([3, 10], [3, 1], 4), ([3, 10], [1, 1], 1), ([3, 10], [5, 2], 8),
             ([3, 37], [3, 1], 3),          # row 1 has 3 slots left: 3 wide, eagerly
             ([0, 0], [33, 1], 33)]         # wider than every graphed width
    for cached, need, padded_width in cases:
        runner.cached = cached
        new = [[7] * n for n in need]
        assert runner._feed_width(new) == (padded_width if graphs else max(need)), cached


def test_a_chain_draft_replays_one_catch_up_graph_per_feed_width(pair, cpu_graphs):
    """The catch-up feed and first pick of a chain draft are graphed per feed width, not per
    draft length (the draft slots' keys are added after the replay): drafting 1, 3 and 2
    tokens after the same catch-up replays one graph, and drafts what eager drafting does."""
    _, draft = pair
    lm = specops.models.causal_lm(draft)
    rows = [[3, 9, 4, 7, 1], [8, 2, 6]]
    runners = [DraftRunner(lm, 2, 32, draft.config.vocab_size,
                           specops.loop._pick_draft((0.0, 0, 1.0)), graphs=graphs)
               for graphs in (True, False)]
    for runner in runners:
        runner.prefill(rows)
    for num_draft in (1, 3, 2):
        drafted = []
        for runner in runners:
            runner.cached = [len(r) - 1 for r in rows]       # back to each row's root
            drafted.append(runner.draft_chain(rows, num_draft, [0, 1])[0])
        assert drafted[0].shape == (2, num_draft) and torch.equal(*drafted), num_draft
    (start,) = [step for kind, step in runners[0]._graphed.items() if kind == ("chain",)]
    assert len(start.graphs) == 1
