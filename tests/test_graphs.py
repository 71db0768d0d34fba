"""CUDA-graph replay of the loop's steps gives the same tokens as eager execution."""

import copy

import pytest
import torch
from hypothesis import given, settings

import specops
from loop_models import assert_same_or_tie, hf_greedy, prompts, tiny_pair
from test_generate_fuzz import configurations, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_pair():
    """The tiny target and its noisy-copy draft, built on the CPU and then moved: the copy's
    noise is a CPU draw, which cannot be added to CUDA weights."""
    target, draft = tiny_pair("qwen2")
    return target.cuda(), draft.cuda()


@pytest.mark.parametrize("options", [
    dict(num_draft_tokens=3),
    dict(num_draft_tokens=2, temperature=0.8, top_p=0.9, seed=5),
    dict(tree=specops.DynamicTree(depth=3, top_k=2, num_nodes=6)),
    dict(tree=specops.DynamicTree(depth=3, top_k=2, num_nodes=6, adaptive=False),
         temperature=0.7, seed=3),
    dict(tree=specops.StaticTree((2, 2)), temperature=1.0, seed=7),
    dict(tree=specops.StaticTree((3, 1), sampled=False)),
    dict(draft="hybrid", num_draft_tokens=4),
])
def test_graph_replay_equals_eager(options):
    """Same tokens with and without graphs. With graphs the draft's catch-up runs padded to
    a graphed width, so its matrix products have other shapes: equal logits are then not
    guaranteed bit for bit, but a changed draft token needs an exact tie (greedy) or a
    uniform within a rounding error of a boundary (sampling)."""
    target, draft = cuda_pair()
    if options.get("draft") == "hybrid":
        options = dict(options, draft=specops.Hybrid(draft, specops.PromptLookup(max_ngram=2)))
    else:
        options = dict(options, draft=draft)
    ids = torch.randint(2, 64, (3, 6), generator=torch.Generator().manual_seed(0)).cuda()
    ids[:, 3:] = ids[:, :3]          # a repeat, so that the hybrid's lookup finds matches
    runs = [specops.generate(target, ids, max_new_tokens=24, eos_token_id=[],
                             cuda_graphs=graphs, **options) for graphs in (False, True)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)


@settings(max_examples=10, deadline=None)
@given(config=configurations())
def test_random_configurations_replay_as_eager(config):
    """CUDA-graph replay gives eager decoding's tokens over hypothesis-drawn configurations
    (``test_generate_fuzz``: drafter, fixed or cost-aware lengths, tree shapes, batch,
    padding, ``max_new_tokens``, EOS), which the CPU checks through a traced stand-in only."""
    eager = run(config, graphs=False, device="cuda")[2]
    graphed = run(config, graphs=True, device="cuda")[2]
    assert graphed == eager, config


def test_graphs_capture_with_full_checks():
    """At check level "full" the eager calls read values on the host (a sync); the capture
    must run without them, or CUDA refuses the sync inside it."""
    target, draft = cuda_pair()
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(1)).cuda()
    before = specops.get_checks()
    specops.set_checks("full")
    try:
        runs = [specops.generate(target, ids, draft=draft, num_draft_tokens=3,
                                 max_new_tokens=16, eos_token_id=[], cuda_graphs=graphs)
                for graphs in (False, True)]
    finally:
        specops.set_checks(before)
    assert torch.equal(runs[0].sequences, runs[1].sequences)


@pytest.mark.parametrize("options", [dict(), dict(num_draft_tokens=3)])
def test_compiled_steps_in_graphs_keep_greedy_exact(options):
    """compile=True with cuda_graphs=True: the graphs capture TorchInductor's kernels; the
    output is still the target's own greedy output (compared on the CPU copy; a difference
    must be a numerical tie there)."""
    cpu_target, cpu_draft = tiny_pair("qwen2")
    target, draft = copy.deepcopy(cpu_target).cuda(), copy.deepcopy(cpu_draft).cuda()
    rows = prompts(cpu_target.config.vocab_size, [6, 6], seed=3)
    gen = specops.SpeculativeGenerator(target, draft if options else None, eos_token_id=[],
                                       cuda_graphs=True, compile=True, **options)
    for _ in range(2):   # the second call replays the kept graphs
        out = gen.generate(torch.tensor(rows).cuda(), max_new_tokens=16)
    for b, row in enumerate(rows):
        assert_same_or_tie(cpu_target, row, out.sequences[b, 6:].tolist(),
                           hf_greedy(cpu_target, row, 16), f"{options} row {b}")


def test_graphs_are_on_by_default_on_cuda():
    target, draft = cuda_pair()
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(2)).cuda()
    gen = specops.SpeculativeGenerator(target, draft, num_draft_tokens=2, eos_token_id=[])
    default = gen.generate(ids, max_new_tokens=12)
    assert isinstance(gen._graphed.chain_step, specops.graphs.GraphedStep)
    assert gen._graphed.chain_step.graphs and gen._graphed.draft._one_token.graphs
    eager = specops.generate(target, ids, draft=draft, num_draft_tokens=2, max_new_tokens=12,
                             eos_token_id=[], cuda_graphs=False)
    assert torch.equal(default.sequences, eager.sequences)
