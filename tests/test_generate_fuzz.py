"""Greedy exactness of ``specops.generate`` over randomly drawn configurations: drafter (draft
model chains, prompt lookup, hybrids, grown and static trees, plain), draft lengths fixed or
cost-aware, tree shapes (including grown trees keeping fewer nodes than a round feeds the
draft), batch sizes, ragged prompts padded left or right, ``max_new_tokens`` and EOS, with
and without the loop's graph path (through the traced stand-in of ``test_graphs_traced``).

The other loop tests check each feature on chosen cases; this one looks for the combinations
nobody chose. Every output must equal the target's own greedy ``generate`` or show a numerical
tie where it first differs."""

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import specops
import specops.graphs
from loop_models import EOS, assert_same_or_tie, hf_greedy, padded, prompts, tiny_pair
from test_graphs_traced import TracedGraphs

MODELS = {}


def pair(family: str, device: str = "cpu"):
    """The family's tiny target and noisy-copy draft on ``device`` (built on the CPU, whose
    random draws make the copy's noise, then moved)."""
    if (family, device) not in MODELS:
        MODELS[family, device] = tuple(model.to(device) for model in tiny_pair(family))
    return MODELS[family, device]


@st.composite
def configurations(draw):
    kind = draw(st.sampled_from(["chain", "lookup", "hybrid", "hybrid-compare", "grown",
                                 "static", "plain"]))
    options = {}
    if kind in ("chain", "lookup", "hybrid", "hybrid-compare"):
        options["num_draft_tokens"] = draw(st.sampled_from([None, 1, 2, 5, 9]))
        if options["num_draft_tokens"] is None:
            options["max_draft_tokens"] = draw(st.sampled_from([None, 0, 1, 3, 12]))
    if kind == "grown":
        depth, top_k = draw(st.integers(1, 5)), draw(st.integers(1, 5))
        pool = 1 + top_k + (depth - 1) * top_k ** 2
        options["tree"] = specops.DynamicTree(depth, top_k, draw(st.integers(2, min(pool, 40))),
                                              adaptive=draw(st.booleans()))
    if kind == "static":
        options["tree"] = specops.StaticTree(tuple(draw(st.lists(st.integers(1, 3),
                                                                 min_size=1, max_size=4))))
    return dict(family=draw(st.sampled_from(["qwen2", "llama"])), kind=kind,
                min_match=draw(st.integers(1, 3)),
                lookup_draft=draw(st.sampled_from([None, 1, 4, 40])),
                lens=draw(st.lists(st.integers(1, 12), min_size=1, max_size=3)),
                prompt_seed=draw(st.integers(0, 999)), new=draw(st.integers(1, 40)),
                eos=draw(st.sampled_from([None, EOS, 5])),
                side=draw(st.sampled_from(["left", "right"])), options=options)


def drafter(config: dict, draft_model):
    """The ``draft`` argument of a drawn configuration, around ``draft_model``."""
    lookup = (specops.PromptLookup() if config["lookup_draft"] is None
              else specops.PromptLookup(num_draft=config["lookup_draft"]))
    return {"chain": draft_model, "lookup": lookup, "grown": draft_model,
            "static": draft_model, "plain": None,
            "hybrid": specops.Hybrid(draft_model, min_match=config["min_match"]),
            "hybrid-compare": specops.Hybrid(draft_model, compare=True)}[config["kind"]]


def run(config: dict, graphs: bool = False, device: str = "cpu", **sampling):
    """``(target, rows, new tokens per row)`` of one drawn configuration; ``graphs``: the
    loop's graph path, through the traced stand-in on the CPU, CUDA graphs on CUDA."""
    target, draft_model = pair(config["family"], device)
    draft = drafter(config, draft_model)
    rows = prompts(target.config.vocab_size, config["lens"], seed=config["prompt_seed"])
    ids, mask = padded(rows, config["side"])
    ids, mask = ids.to(device), mask.to(device)
    eos = config["eos"]
    original = specops.graphs._BACKENDS.get("cpu")
    if graphs and device == "cpu":
        specops.graphs._BACKENDS["cpu"] = TracedGraphs
    try:
        out = specops.generate(target, ids, attention_mask=mask, draft=draft,
                               max_new_tokens=config["new"],
                               eos_token_id=eos if eos is not None else [],
                               cuda_graphs=graphs, **config["options"],
                               **sampling)
    finally:
        if original is None:
            specops.graphs._BACKENDS.pop("cpu", None)
        else:
            specops.graphs._BACKENDS["cpu"] = original
    width = ids.shape[1]
    return target, rows, [out.sequences[b, width:width + out.num_new_tokens[b]].tolist()
                          for b in range(len(rows))]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "traced-graphs"])
@settings(max_examples=25)
@given(config=configurations())
@example(config=dict(family="qwen2", kind="grown", min_match=2, lookup_draft=None, lens=[6, 3],
                     prompt_seed=1, new=30, eos=None, side="left",
                     options=dict(tree=specops.DynamicTree(5, 5, 3))))   # overflowed (687db31)
@example(config=dict(family="llama", kind="hybrid", min_match=1, lookup_draft=None,
                     lens=[3, 5, 5], prompt_seed=374, new=34, eos=None, side="left",
                     options=dict(num_draft_tokens=2)))   # a padded catch-up overflowed
def test_random_configurations_decode_as_the_target_does(graphs, config):
    target, rows, outputs = run(config, graphs)
    for b, (row, ours) in enumerate(zip(rows, outputs)):
        assert_same_or_tie(target, row, ours, hf_greedy(target, row, config["new"],
                                                         config["eos"]), f"{config} row {b}")


@settings(max_examples=20)
@given(config=configurations(), temperature=st.sampled_from([0.5, 1.0, 3.0]),
       seed=st.integers(0, 2 ** 40), cut=st.sampled_from(["top_k", "top_p"]))
def test_sampling_a_point_mass_decodes_as_the_target_does(config, temperature, seed, cut):
    """Sampling with ``top_k=1`` (or a ``top_p`` that keeps one token) leaves the target a
    point mass on its greedy token, so every sampled path (chain and tree verification with
    the draft's real distribution, sampled static-tree children, lookup's point masses) must
    emit the greedy tokens: a random configuration's output equals greedy decoding, or
    differs first at a numerical tie (where the warper keeps both tied tokens)."""
    sampling = dict(top_k=1) if cut == "top_k" else dict(top_p=1e-9)
    target, rows, outputs = run(config, temperature=temperature, seed=seed, **sampling)
    for b, (row, ours) in enumerate(zip(rows, outputs)):
        assert_same_or_tie(target, row, ours, hf_greedy(target, row, config["new"],
                                                         config["eos"]), f"{config} row {b}")
