"""Draft-length controller on given cost models (no timing): formula, choices, probing, decay."""

import math

import numpy as np
import pytest

from specops.controller import CostModel, DraftLengthController, expected_tokens

BATCH = 4
# Memory-bound verification: scoring 9 tokens per row costs little more than scoring one; a
# draft step costs a tenth of a verify step.
DRAFT = CostModel({1: 1.0, 9: 1.1}, draft_step_seconds=0.1)
# a_1 where drafting 1 token pays as well as plain decoding: (1 + a_1) / (1 + 0.1 + 0.0125) = 1
BREAK_EVEN = 0.1125


def run(ctrl: DraftLengthController, steps: int, accepts) -> list[int]:
    """Choose and update ``steps`` times; ``accepts(g)`` gives the rows' accepted counts."""
    chosen = []
    for _ in range(steps):
        g = ctrl.choose()
        ctrl.update(g, accepts(g))
        chosen.append(g)
    return chosen


def always(g):
    return [g] * BATCH


def never(g):
    return [0] * BATCH


@pytest.mark.parametrize("acceptance, num_draft, expected", [
    ([1.0, 0.5], 2, 2.5),           # 1 + 1 + 1 * 0.5
    ([1.0, 0.5], 1, 2.0),
    ([1.0, 0.5], 0, 1.0),           # plain decoding
    ([0.5, 0.5, 0.5], 3, 1.875),    # 1 + .5 + .25 + .125
    ([0.0, 1.0, 1.0], 3, 1.0),      # nothing after a certain rejection counts
    ([0.8, 0.5, 0.25], 3, 2.3),     # 1 + .8 + .4 + .1
])
def test_expected_tokens_formula(acceptance, num_draft, expected):
    assert expected_tokens(acceptance, num_draft) == pytest.approx(expected)


def test_update_counts_tried_and_accepted_per_position():
    # no decay, a tiny prior: the estimates are the plain ratios
    ctrl = DraftLengthController(DRAFT, 3, prior_weight=1e-9, decay=1.0)
    # rows accept 0, 1, 3, 3 of 3: position 1 tried by 4, accepted by 3; position 2 tried by 3,
    # accepted by 2; position 3 tried by 2, accepted by 2
    ctrl.update(3, np.array([0, 1, 3, 3]))
    np.testing.assert_allclose(ctrl.acceptance(), [3 / 4, 2 / 3, 2 / 2])
    assert ctrl.expected_tokens(3) == pytest.approx(1 + 3 / 4 + 1 / 2 + 1 / 2)
    # a shorter step leaves positions past it alone
    ctrl.update(1, [0, 0, 0, 0])
    np.testing.assert_allclose(ctrl.acceptance(), [3 / 8, 2 / 3, 1.0])
    # a step that drafted nothing, or has no rows, carries no data
    ctrl.update(0, [0, 0])
    ctrl.update(2, [])
    np.testing.assert_allclose(ctrl.acceptance(), [3 / 8, 2 / 3, 1.0])
    # ... so it does not decay the counts either (decay counts observations, not steps)
    forgetful = DraftLengthController(DRAFT, 1, prior_weight=1.0, prior_acceptance=0.0,
                                      decay=0.5)
    forgetful.update(1, [1])
    assert forgetful.acceptance()[0] == pytest.approx(1 / 2)
    forgetful.update(0, [0])
    assert forgetful.acceptance()[0] == pytest.approx(1 / 2)
    forgetful.update(1, [1])  # (0.5 + 1) / (0.5 + 1 + 1)
    assert forgetful.acceptance()[0] == pytest.approx(1.5 / 2.5)


def test_unseen_positions_start_at_the_prior():
    ctrl = DraftLengthController(DRAFT, 4, prior_acceptance=0.6)
    np.testing.assert_allclose(ctrl.acceptance(), [0.6] * 4)
    assert ctrl.expected_rate(2) == pytest.approx((1 + 0.6 + 0.36) / (2 * 0.1 + 1.025))


def test_always_accepting_cheap_draft_chooses_the_longest():
    ctrl = DraftLengthController(DRAFT, 8)
    chosen = run(ctrl, 50, always)
    assert chosen[-10:] == [8] * 10
    assert ctrl.acceptance().min() > 0.95


def test_never_accepting_falls_back_to_plain_decoding_and_probes_on_schedule():
    probe_every = 5
    ctrl = DraftLengthController(DRAFT, 8, probe_every=probe_every)
    chosen = run(ctrl, 10, never)
    assert chosen[-1] == 0 and chosen[0] > 0
    first_zero = chosen.index(0)
    assert first_zero <= 8  # a_1 starts at the prior 0.7
    # from the first 0 on: probe_every - 1 plain steps, then a probe of the shortest length
    chosen += run(ctrl, 40, never)
    period = [0] * (probe_every - 1) + [1]
    tail = chosen[first_zero:first_zero + 40]
    assert tail == period * 8
    assert ctrl.num_probes == chosen.count(1) - chosen[:first_zero].count(1)
    assert sum(ctrl.chosen_lengths.values()) == len(chosen)
    assert ctrl.chosen_lengths[0] == chosen.count(0)


def test_probe_is_the_best_positive_candidate():
    ctrl = DraftLengthController(DRAFT, 8, candidates=[0, 3, 6], probe_every=2)
    chosen = run(ctrl, 40, never)
    assert set(chosen) <= {0, 3, 6}
    assert chosen[-4:] == [0, 3, 0, 3]      # never accepted: the shorter draft is better


def test_probe_measures_long_drafts_when_short_ones_do_not_pay():
    """fp32 on a CPU: verifying 2 tokens costs about as much as 9. A 1-token draft never
    pays there, an 8-token one does; the probe must try the long one to learn that."""
    cost = CostModel({1: 1.0, 2: 2.0, 9: 2.3}, draft_step_seconds=0.1)
    ctrl = DraftLengthController(cost, 8, prior_acceptance=0.5, probe_every=3)
    assert ctrl.choose() == 0
    assert ctrl.choose() == 0
    probe = ctrl.choose()       # rates under the prior: g=1 0.71, g=3 0.79 (best), g=8 0.64
    assert probe == 3, probe
    for _ in range(5):          # the draft really is good
        ctrl.update(probe, [probe])
    assert ctrl.choose() >= 3


def test_best_is_the_choice_without_probing_and_can_be_capped():
    """``best(longest)``: the best length no longer than ``longest`` and its expected rate;
    it neither probes nor counts. Free drafts, acceptance 0.5 everywhere: rates
    ``(2 - 0.5**g) / verify(g + 1)``, with verify 1.0 up to 3 tokens and 2.0 from 9."""
    cost = CostModel({1: 1.0, 3: 1.0, 9: 2.0}, draft_step_seconds=0.0)
    ctrl = DraftLengthController(cost, 8, prior_acceptance=0.5)
    assert ctrl.best() == (2, pytest.approx(1.75))
    assert ctrl.best(longest=1) == (1, pytest.approx(1.5))
    assert ctrl.best(longest=0) == (0, pytest.approx(1.0))
    assert not ctrl.chosen_lengths and ctrl.num_probes == 0
    never_pays = DraftLengthController(cost, 8, prior_acceptance=0.0, probe_every=1)
    assert never_pays.best() == (0, pytest.approx(1.0))
    assert never_pays.num_probes == 0 and never_pays.choose() > 0   # choose probes


def test_no_positive_candidate_means_no_probe():
    ctrl = DraftLengthController(DRAFT, 0, probe_every=1)
    assert run(ctrl, 5, never) == [0] * 5
    assert ctrl.num_probes == 0


def test_expensive_draft_with_moderate_acceptance_chooses_plain_decoding():
    # a draft step costs as much as a verify step: no acceptance below 1 pays for it
    cost = CostModel({1: 1.0, 9: 1.0}, draft_step_seconds=1.0)
    ctrl = DraftLengthController(cost, 8, decay=1.0)
    for _ in range(20):  # conditional acceptance about 0.6 at positions 1..4 (60/100, 36/60, ...)
        ctrl.update(4, [0] * 40 + [1] * 24 + [2] * 14 + [3] * 9 + [4] * 13)
    assert ctrl.acceptance()[0] == pytest.approx(0.6, abs=0.01)
    assert ctrl.choose() == 0
    # the same acceptance with a free draft is worth drafting
    ctrl.set_cost(CostModel({1: 1.0, 9: 1.0}, draft_step_seconds=0.0))
    assert ctrl.choose() > 0


@pytest.mark.parametrize("decay", [0.98, 0.9])
def test_follows_a_regime_change_at_the_rate_decay_sets(decay):
    ctrl = DraftLengthController(DRAFT, 8, decay=decay, probe_every=4)
    assert run(ctrl, 300, always)[-1] == 8
    # Position 1 is tried by every row, so after 300 always-accepting steps it holds about
    # S = BATCH / (1 - decay) tries, all accepted, and after k never-accepting steps
    # a_1 = (S decay**k + w p) / (S + w). Drafting stops paying when (1 + a_1) / step_seconds(1)
    # falls below 1 / step_seconds(0), i.e. at a_1 = 0.1125 with this cost model.
    s, w, p = BATCH / (1 - decay), ctrl.prior_weight, ctrl.prior_acceptance
    switch = math.log((BREAK_EVEN * (s + w) - w * p) / s) / math.log(decay)
    chosen = run(ctrl, 200, never)
    assert abs(chosen.index(0) - switch) <= 1, (chosen.index(0), switch)
    # and the probes find out when acceptance comes back
    assert run(ctrl, 60, always)[-10:] == [8] * 10


def test_without_decay_old_data_is_never_forgotten():
    # the control for the test above: with decay 0.98 plain decoding starts after 114 steps
    ctrl = DraftLengthController(DRAFT, 8, decay=1.0)
    run(ctrl, 300, always)
    assert 0 not in run(ctrl, 200, never)


@pytest.mark.parametrize("num_tokens, seconds", [
    (1, 1.0), (2, 1.5), (3, 2.0),   # measured at 1 and 3: linear between
    (4, 2.25), (5, 2.5),            # measured at 5
    (7, 3.0), (9, 3.5),             # above: the line through the last two, (3, 2.0), (5, 2.5)
])
def test_verify_seconds_interpolation(num_tokens, seconds):
    cost = CostModel({1: 1.0, 3: 2.0, 5: 2.5}, draft_step_seconds=0.0)
    assert cost.verify(num_tokens) == pytest.approx(seconds)


def test_verify_seconds_edges_and_step_seconds():
    cost = CostModel({2: 1.0, 4: 2.0}, draft_step_seconds=0.25, overhead_seconds=0.1)
    assert cost.verify(1) == 1.0  # below the smallest measurement: flat
    assert cost.verify(6) == pytest.approx(3.0)
    assert cost.step_seconds(0) == pytest.approx(1.0 + 0.1)
    assert cost.step_seconds(2) == pytest.approx(2 * 0.25 + 1.5 + 0.1)
    assert CostModel({1: 2.0}, 0.0).verify(7) == 2.0  # one measurement: flat
    # a noisy decrease at the end is not extrapolated into ever cheaper steps
    assert CostModel({1: 1.0, 2: 0.9}, 0.0).verify(10) == pytest.approx(0.9)


def test_verify_seconds_never_fall_with_more_tokens():
    """A size costs at most what a larger one measured: one high reading (say, a length tried
    once while the machine was busy) cannot price the lengths around it out."""
    cost = CostModel({1: 1.0, 2: 1.1, 4: 9.0, 5: 1.3}, draft_step_seconds=0.0)
    assert cost.verify(4) == pytest.approx(1.3)
    assert cost.verify(3) == pytest.approx(1.2)          # between 2 (1.1) and 4 (now 1.3)
    assert cost.verify(1) == pytest.approx(1.0)          # lower readings stand
    assert cost.verify_seconds[4] == 9.0                 # the data are kept as measured
    # at full acceptance, 3 draft tokens (4 scored) are the best choice, not 1
    assert DraftLengthController(cost, 3, prior_acceptance=1.0).best()[0] == 3


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_draft=-1), "max_draft"),
    (dict(decay=0.0), "decay"),
    (dict(decay=1.5), "decay"),
    (dict(candidates=[0, 9]), "candidates"),
    (dict(candidates=[]), "candidates"),
    (dict(prior_acceptance=1.2), "prior_acceptance"),
    (dict(prior_weight=0.0), "prior_weight"),
    (dict(probe_every=0), "probe_every"),
])
def test_bad_controller_arguments(kwargs, name):
    kwargs = dict(dict(cost=DRAFT, max_draft=4), **kwargs)
    with pytest.raises(ValueError, match=name):
        DraftLengthController(**kwargs)


def test_bad_update_arguments():
    ctrl = DraftLengthController(DRAFT, 4)
    with pytest.raises(ValueError, match="num_accepted"):
        ctrl.update(2, [0, 3])
    with pytest.raises(ValueError, match="num_accepted"):
        ctrl.update(2, [-1])
    with pytest.raises(ValueError, match="num_accepted"):
        ctrl.update(2, [[0, 1]])
    with pytest.raises(TypeError, match="num_accepted"):
        ctrl.update(2, [0.5])
    with pytest.raises(ValueError, match="num_draft"):
        ctrl.update(5, [0])
    with pytest.raises(ValueError, match="num_draft"):
        ctrl.expected_tokens(-1)


@pytest.mark.parametrize("kwargs, name", [
    (dict(verify_seconds={}), "verify_seconds"),
    (dict(verify_seconds={0: 1.0}), "verify_seconds"),
    (dict(verify_seconds={1: 0.0}), "verify_seconds"),
    (dict(draft_step_seconds=-1.0), "draft_step_seconds"),
    (dict(overhead_seconds=-1.0), "overhead_seconds"),
    (dict(draft_fixed_seconds=-1.0), "draft_fixed_seconds"),
])
def test_bad_cost_arguments(kwargs, name):
    kwargs = dict(dict(verify_seconds={1: 1.0}, draft_step_seconds=0.0), **kwargs)
    with pytest.raises(ValueError, match=name):
        CostModel(**kwargs)
    with pytest.raises(ValueError, match="num_draft"):
        CostModel({1: 1.0}, 0.0).step_seconds(-1)


def test_fixed_drafting_cost_is_paid_once_per_drafting_step():
    cost = CostModel({1: 1.0, 3: 2.0}, draft_step_seconds=0.25, draft_fixed_seconds=0.5,
                     overhead_seconds=0.1)
    assert cost.step_seconds(0) == pytest.approx(1.0 + 0.1)             # no drafting
    assert cost.step_seconds(2) == pytest.approx(0.5 + 2 * 0.25 + 2.0 + 0.1)
    # a fixed part makes a 1-token draft cost more per token than a long one: at full
    # acceptance the controller drafts the longest
    flat = CostModel({1: 1.0, 9: 1.0}, draft_step_seconds=0.05, draft_fixed_seconds=0.5)
    ctrl = DraftLengthController(flat, 8, prior_acceptance=1.0)
    assert ctrl.choose() == 8


def test_learn_verify_is_a_moving_average():
    cost = CostModel({1: 1.0}, 0.0)
    cost.learn_verify(1, 2.0)
    cost.learn_verify(4, 3.0)                      # a new length: taken as it is
    assert cost.verify_seconds == pytest.approx({1: 0.8 * 1.0 + 0.2 * 2.0, 4: 3.0})


def test_learn_draft_keeps_the_measured_per_token_cost_while_the_length_is_constant():
    """One-token steps that cost 0.1 s, with a measured per-token cost of 0.04 s: the data
    cannot separate the parts, so the per-token cost stays 0.04 and 0.06 is fixed (charging
    every token 0.1 would price an 8-token draft at 0.8 s instead of 0.38)."""
    cost = CostModel({1: 1.0}, draft_step_seconds=0.04)
    for _ in range(30):
        cost.learn_draft(1, 0.1)
    assert cost.draft_step_seconds == pytest.approx(0.04)
    assert cost.draft_fixed_seconds == pytest.approx(0.06)
    assert cost.draft_seconds(8) == pytest.approx(0.06 + 8 * 0.04)


def test_learn_draft_fits_fixed_and_per_token_costs_from_varied_lengths():
    """Steps of 1..6 tokens costing 0.03 + 0.06 g: the fit finds both parts although the
    warm-up measured 0.04 per token (the prior weighs 4 steps against about 20 discounted
    ones spread over 6 lengths)."""
    cost = CostModel({1: 1.0}, draft_step_seconds=0.04)
    for _ in range(20):
        for g in range(1, 7):
            cost.learn_draft(g, 0.03 + 0.06 * g)
    assert cost.draft_step_seconds == pytest.approx(0.06, abs=0.003)
    assert cost.draft_fixed_seconds == pytest.approx(0.03, abs=0.01)


def test_learn_draft_never_goes_negative():
    cost = CostModel({1: 1.0}, draft_step_seconds=0.05)
    for _ in range(20):
        for g in (2, 6):
            cost.learn_draft(g, 0.1 * g - 0.1)     # a negative intercept: through the origin
    assert cost.draft_fixed_seconds == 0.0
    assert cost.draft_step_seconds > 0.05
    with pytest.raises(ValueError, match="num_draft"):
        cost.learn_draft(0, 0.1)


def test_untried_positions_inherit_the_last_measured_rate():
    """Only lengths the controller chose get measured; positions past them start at the rate
    measured just before them, so a draft that is good at 2 gets tried at more than 2."""
    cost = CostModel({1: 1.0, 2: 1.0, 9: 1.6}, draft_step_seconds=0.25)
    ctrl = DraftLengthController(cost, 8, prior_acceptance=0.5)
    for _ in range(20):
        ctrl.update(2, [2])
    a = ctrl.acceptance()
    assert a[0] > 0.9 and a[1] > 0.9
    assert np.all(a[2:] > 0.85), a          # inherited, not the 0.5 prior
    assert ctrl.choose() > 2


# --------------------------------------------------------------------------- tree size
def test_tree_size_maximises_calibrated_tokens_per_second():
    from specops.controller import TreeSizeController
    # verify 1.0 s + 0.1 s per extra token; growing the tree 0.2 s
    ctrl = TreeSizeController(CostModel({1: 1.0, 4: 1.3}, 0.0), 0.2, max_nodes=4, decay=1.0)
    # n=1: 1.9 / 1.3 = 1.46; n=2: 2.4 / 1.4 = 1.71; n=3: 2.5 / 1.5 = 1.67
    assert ctrl.choose_size(np.array([[0.9, 0.5, 0.1]])) == 2
    assert ctrl.tree_rate() == pytest.approx(2.4 / 1.4)
    # a draft half as reliable as its probabilities say (c = (1 + 0) / (1 + 1), the prior
    # counting once): n=1: 1.45 / 1.3 = 1.12, n=2: 1.7 / 1.4 = 1.21, n=3: 1.75 / 1.5 = 1.17
    ctrl.update(predicted=1.0, accepted=0.0)
    assert ctrl.calibration == pytest.approx(0.5)
    assert ctrl.tree_rate() == pytest.approx((1 + 0.5 * 1.4) / 1.4)
    assert ctrl.choose_size(np.array([[0.9, 0.5, 0.1]])) == 2
    # expensive verification keeps only the best node; flat verification keeps them all
    steep = TreeSizeController(CostModel({1: 1.0, 4: 4.0}, 0.0), 0.2, max_nodes=4)
    assert steep.choose_size(np.array([[0.9, 0.5, 0.4]])) == 1
    flat = TreeSizeController(CostModel({1: 1.0, 16: 1.05}, 0.0), 0.2, max_nodes=16)
    assert flat.choose_size(np.full((3, 15), 0.6)) == 15
    assert flat.chosen_sizes == {15: 1}


def test_tree_size_falls_back_to_plain_decoding_and_probes():
    from specops.controller import TreeSizeController
    ctrl = TreeSizeController(CostModel({1: 1.0, 8: 1.2}, 0.0), 0.5, max_nodes=8,
                              probe_every=4)
    probs = np.full((2, 7), 0.5)
    assert ctrl.use_tree()                             # nothing measured: try a tree
    grown = 0
    for _ in range(40):                                # the target never agrees
        if ctrl.use_tree():
            grown += 1
            ctrl.choose_size(probs)
            ctrl.update(predicted=probs.sum(), accepted=0.0)
    assert ctrl.calibration < 0.05
    assert ctrl.tree_rate() < ctrl.plain_rate()
    assert ctrl.chosen_sizes[0] >= 28 and ctrl.num_probes >= 7      # plain, probing every 4th
    assert grown == 40 - ctrl.chosen_sizes[0]
    for _ in range(30):                                # now it always agrees
        if ctrl.use_tree():
            ctrl.choose_size(probs)
            ctrl.update(predicted=1.0, accepted=3.0)
    assert ctrl.calibration > 1.5
    plain_before = ctrl.chosen_sizes[0]
    assert all(ctrl.use_tree() for _ in range(10)) and ctrl.chosen_sizes[0] == plain_before


def test_tree_size_controller_rejects_bad_arguments():
    from specops.controller import TreeSizeController
    cost = CostModel({1: 1.0}, 0.0)
    for kwargs, message in ((dict(max_nodes=1), "max_nodes"),
                            (dict(growth_seconds=-1.0), "growth_seconds"),
                            (dict(decay=0.0), "decay"), (dict(probe_every=0), "probe_every")):
        args = dict(cost=cost, growth_seconds=0.1, max_nodes=4) | kwargs
        with pytest.raises(ValueError, match=message):
            TreeSizeController(**args)
    ctrl = TreeSizeController(cost, 0.1, 4)
    with pytest.raises(ValueError, match=r"shape \(rows, 3\)"):
        ctrl.choose_size(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=">= 0"):
        ctrl.update(-1.0, 0.0)
