"""Cost-aware draft length: pick the number of draft tokens per step that maximises tokens/s.

With draft length ``g``, one step emits per row, in expectation,
``1 + sum_{j=1..g} prod_{i<=j} a_i`` tokens (Leviathan et al., 2023,
https://arxiv.org/abs/2211.17192, with per-position rates), where ``a_i`` is the conditional
acceptance of draft position ``i``: the probability it is accepted given positions ``< i``
were. The step costs ``draft_fixed_seconds + g * draft_step_seconds + verify_seconds(g + 1)
+ overhead_seconds`` (:class:`CostModel`); ``g = 0`` is plain decoding, one token for
``verify_seconds(1) + overhead_seconds``. The controller estimates
``a`` online and picks ``g`` with the best ratio.
"""

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class CostModel:
    """Seconds per decoding step as a function of the draft length.

    A step drafting ``g > 0`` tokens costs ``draft_fixed_seconds + g * draft_step_seconds``
    of drafting (the fixed part: the draft model catching up on the tokens the last step
    emitted, one forward over two tokens per row after a full acceptance; on the CPU that
    forward can cost nearly twice a one-token one) plus ``verify_seconds(g + 1)`` plus
    ``overhead_seconds``; ``g = 0`` (plain decoding) costs ``verify_seconds(1) +
    overhead_seconds``.

    Args:
        verify_seconds: Measured target cost of one step that scores ``n`` tokens per row,
            keyed by ``n >= 1``, values ``> 0``. Scoring more tokens never costs less and a
            timer only ever adds, so each ``n`` is taken to cost at most the least that any
            larger ``n`` measured: one high reading (a step the machine interrupted, often a
            length tried once) would otherwise price the lengths around it out until they are
            tried again, which the controller then avoids doing. Between measured ``n`` it is
            interpolated linearly; above the largest it extends the line through the last two;
            below the smallest (and everywhere, with one measurement) it is flat.
        draft_step_seconds: One more draft token, ``>= 0`` (0 for prompt lookup).
        overhead_seconds: A fixed per-step cost (sampling, bookkeeping), ``>= 0``.
        draft_fixed_seconds: The fixed part of a drafting step, ``>= 0``.

    :meth:`learn_verify` and :meth:`learn_draft` refine the model from timed steps.
    """

    verify_seconds: dict[int, float]
    draft_step_seconds: float
    overhead_seconds: float = 0.0
    draft_fixed_seconds: float = 0.0
    # learn_draft's discounted sums over (g, seconds): weight, g, g^2, seconds, g * seconds
    _draft_sums: np.ndarray = field(default_factory=lambda: np.zeros(5), init=False,
                                    repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.verify_seconds:
            raise ValueError("CostModel: verify_seconds must have at least one measurement")
        if any(n < 1 or s <= 0 for n, s in self.verify_seconds.items()):
            raise ValueError("CostModel: verify_seconds needs keys n >= 1 and values > 0, "
                             f"got {self.verify_seconds}")
        for name in ("draft_step_seconds", "overhead_seconds", "draft_fixed_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"CostModel: {name} must be >= 0, got {getattr(self, name)}")
        self._prior_step = self.draft_step_seconds

    def verify(self, num_tokens: int) -> float:
        """Interpolated target cost of a step that scores ``num_tokens`` tokens per row."""
        ns = sorted(self.verify_seconds)
        # more tokens never cost less: each size at most what any larger one measured
        secs = np.minimum.accumulate([self.verify_seconds[n] for n in reversed(ns)])[::-1]
        if num_tokens <= ns[-1] or len(ns) == 1:
            return float(np.interp(num_tokens, ns, secs))  # flat outside [ns[0], ns[-1]]
        slope = (secs[-1] - secs[-2]) / (ns[-1] - ns[-2])  # >= 0: secs never decrease
        return float(secs[-1] + slope * (num_tokens - ns[-1]))

    def draft_seconds(self, num_draft: int) -> float:
        """Seconds of drafting ``num_draft >= 0`` tokens per row (0 for none)."""
        if num_draft == 0:
            return 0.0
        return self.draft_fixed_seconds + num_draft * self.draft_step_seconds

    def step_seconds(self, num_draft: int) -> float:
        """Seconds of one step that drafts ``num_draft >= 0`` tokens per row and verifies them."""
        if num_draft < 0:
            raise ValueError(f"CostModel.step_seconds: num_draft must be >= 0, got {num_draft}")
        return self.draft_seconds(num_draft) + self.verify(num_draft + 1) + self.overhead_seconds

    def learn_verify(self, num_tokens: int, seconds: float) -> None:
        """One timed verify pass over ``num_tokens`` tokens per row: a moving average (weight
        0.2) of that length's cost; the first time for a length, the value itself."""
        old = self.verify_seconds.get(num_tokens)
        self.verify_seconds[num_tokens] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def learn_draft(self, num_draft: int, seconds: float, decay: float = 0.95,
                    prior_weight: float = 4.0) -> None:
        """One timed drafting step of ``num_draft >= 1`` tokens per row: refits
        ``draft_fixed_seconds`` and ``draft_step_seconds`` to the steps seen so far.

        Least squares of ``seconds ~ fixed + num_draft * step``, each older step discounted
        by ``decay``, with the per-token cost pulled toward its value at construction (the
        warm-up measurement) by ``prior_weight`` pseudo-steps: while every step drafts the
        same length the data say nothing about the per-token cost, and the fit keeps the
        measured one and puts the rest into the fixed part, instead of charging each token
        the fixed part again (which priced long drafts as if every token cost a whole short
        step, so the controller drafted too little). Both parts stay ``>= 0``.
        """
        if num_draft < 1:
            raise ValueError(f"CostModel.learn_draft: num_draft must be >= 1, got {num_draft}")
        sums = self._draft_sums
        sums *= decay
        sums += (1.0, num_draft, num_draft ** 2, seconds, num_draft * seconds)
        weight, g, gg, t, gt = sums
        prior = self._prior_step
        # normal equations of sum w (t - fixed - step g)^2 + prior_weight (step - prior)^2
        det = weight * (gg + prior_weight) - g * g
        step = (weight * (gt + prior_weight * prior) - g * t) / det
        fixed = (t - step * g) / weight
        if fixed < 0:       # refit through the origin
            fixed, step = 0.0, (gt + prior_weight * prior) / (gg + prior_weight)
        self.draft_fixed_seconds, self.draft_step_seconds = float(fixed), float(max(0.0, step))


def expected_tokens(acceptance: Sequence[float] | np.ndarray, num_draft: int) -> float:
    """Expected tokens one step emits per row: ``1 + sum_{j<=num_draft} prod_{i<=j} a_i``.

    Args:
        acceptance: Shape ``(>= num_draft,)``, float in ``[0, 1]``: conditional acceptance
            ``a_1, a_2, ...`` of draft positions ``1, 2, ...``.
        num_draft: The draft length ``g >= 0``.

    >>> expected_tokens([1.0, 0.5], 2)
    2.5
    """
    a = np.asarray(acceptance, dtype=np.float64)[:num_draft]
    return 1.0 + float(np.cumprod(a).sum())


def _check_decay_and_probe(name: str, decay: float, probe_every: int) -> None:
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"{name}: decay must be in (0, 1], got {decay}")
    if probe_every < 1:
        raise ValueError(f"{name}: probe_every must be >= 1, got {probe_every}")


# Default of every probing rule (both controllers, Hybrid(compare=True)): the choice without
# data is overridden once per this many consecutive steps.
PROBE_EVERY = 16


class Prober:
    """The probing rule of both controllers (and of :class:`specops.Hybrid`'s choice of
    drafter): counts consecutive steps where the choice without data (plain decoding, the
    draft model over a lookup) was the best and says when to try the other anyway (every
    ``every``-th of them), so that its estimates do not freeze."""

    def __init__(self, every: int):
        self.every = every
        self.run = 0        # consecutive steps where plain decoding was best
        self.count = 0      # probes so far

    def due(self, plain_best: bool) -> bool:
        if not plain_best:
            self.run = 0
            return False
        self.run += 1
        if self.run < self.every:
            return False
        self.run = 0
        self.count += 1
        return True


class DraftLengthController:
    """Chooses each step's draft length from online acceptance estimates and a cost model.

    Estimates: per position ``i``, discounted counts of rows that *tried* it (accepted all of
    positions ``< i``) and rows that *accepted* it; every :meth:`update` first multiplies all
    counts by ``decay``, so data ``k`` updates old weighs ``decay**k`` and the controller
    follows a change of regime. A Beta-like prior adds ``prior_weight`` pseudo-tries, so
    ``a_i = (accepted_i + w p_i) / (tried_i + w)`` with ``p_1 = prior_acceptance`` and
    ``p_i = a_{i-1}``: unseen positions start at the rate measured before them, and positions no
    longer tried drift back to it as their counts decay.

    Probing: choosing 0 (plain decoding) yields no acceptance data, so an estimate that once
    fell below break-even would never recover. While 0 is the best choice, every
    ``probe_every``-th consecutive call of :meth:`choose` returns the best candidate ``> 0``
    under the current estimates instead; its :meth:`update` then refreshes them. Probing the
    best positive length rather than the shortest matters when verifying 2 tokens costs
    nearly as much as verifying 9 (fp32 matmuls on CPUs): a 1-token probe can look unprofitable
    while a long draft is, and it would never measure the later positions. Call
    :meth:`choose` once per step.

    Args:
        cost: The :class:`CostModel`; :meth:`set_cost` replaces it (e.g. after re-measuring).
        max_draft: The longest draft, ``>= 0``.
        candidates: The lengths :meth:`choose` picks from, each in ``0..max_draft``; ``None`` =
            all of ``0..max_draft``.
        prior_acceptance: ``p`` in ``[0, 1]``.
        prior_weight: ``w > 0``, in rows.
        decay: In ``(0, 1]``; 1 never forgets.
        probe_every: ``>= 1``; see Probing.

    Attributes:
        chosen_lengths: ``{length: times chosen}``, probes included.
        num_probes: How many choices were probes.
    """

    def __init__(self, cost: CostModel, max_draft: int, *, candidates: Sequence[int] | None = None,
                 prior_acceptance: float = 0.7, prior_weight: float = 4.0, decay: float = 0.98,
                 probe_every: int = PROBE_EVERY):
        name = "DraftLengthController"
        if max_draft < 0:
            raise ValueError(f"{name}: max_draft must be >= 0, got {max_draft}")
        candidates = list(range(max_draft + 1)) if candidates is None else sorted(set(candidates))
        if not candidates or candidates[0] < 0 or candidates[-1] > max_draft:
            raise ValueError(f"{name}: candidates must be a non-empty subset of 0..{max_draft}, "
                             f"got {candidates}")
        if not 0.0 <= prior_acceptance <= 1.0:
            raise ValueError(f"{name}: prior_acceptance must be in [0, 1], got {prior_acceptance}")
        if not prior_weight > 0:
            raise ValueError(f"{name}: prior_weight must be > 0, got {prior_weight}")
        _check_decay_and_probe(name, decay, probe_every)
        self.cost = cost
        self.max_draft = max_draft
        self.candidates = candidates
        self.prior_acceptance = prior_acceptance
        self.prior_weight = prior_weight
        self.decay = decay
        self.probe_every = probe_every
        self._tried = np.zeros(max_draft)
        self._accepted = np.zeros(max_draft)
        self._prober = Prober(probe_every)
        self.chosen_lengths: Counter[int] = Counter()

    @property
    def num_probes(self) -> int:
        return self._prober.count

    def set_cost(self, cost: CostModel) -> None:
        self.cost = cost

    def acceptance(self) -> np.ndarray:
        """Shape ``(max_draft,)``, float64: current estimates of ``a_1..a_max_draft``.

        Position 1's prior is ``prior_acceptance``; position ``i``'s prior is the estimate of
        position ``i - 1``. Acceptance changes slowly along a draft, so positions never
        tried (the controller only learns up to the lengths it chooses) inherit the last
        measured rate instead of a fixed guess that could keep long drafts from ever being
        tried."""
        w = self.prior_weight
        estimates = np.empty(self.max_draft)
        prior = self.prior_acceptance
        for i in range(self.max_draft):
            prior = estimates[i] = (self._accepted[i] + w * prior) / (self._tried[i] + w)
        return estimates

    def _check_num_draft(self, op: str, num_draft: int) -> None:
        if not 0 <= num_draft <= self.max_draft:
            raise ValueError(f"DraftLengthController.{op}: num_draft must be in "
                             f"0..{self.max_draft}, got {num_draft}")

    def expected_tokens(self, num_draft: int) -> float:
        """Expected tokens per row of one step drafting ``num_draft`` tokens (module formula)."""
        self._check_num_draft("expected_tokens", num_draft)
        return expected_tokens(self.acceptance(), num_draft)

    def expected_rate(self, num_draft: int) -> float:
        """Expected tokens per second per row when drafting ``num_draft`` tokens."""
        return self.expected_tokens(num_draft) / self.cost.step_seconds(num_draft)

    def best(self, longest: int | None = None) -> tuple[int, float]:
        """The candidate with the best expected rate, no longer than ``longest`` (None: any),
        and that rate; ties go to the shorter length. No probing, nothing recorded: for
        comparing drafters before choosing one (:class:`specops.Hybrid`)."""
        lengths = [g for g in self.candidates if longest is None or g <= longest] or [0]
        rates = [self.expected_rate(g) for g in lengths]
        i = int(np.argmax(rates))                        # argmax takes the first maximum
        return lengths[i], rates[i]

    def choose(self) -> int:
        """The draft length for the next step: the best candidate, or a probe (class docstring).

        Ties go to the shorter length, which costs less if the estimates are off.
        """
        choice = self.best()[0]
        positive = [g for g in self.candidates if g > 0]
        if self._prober.due(choice == 0 and bool(positive)):
            choice = max(positive, key=self.expected_rate)  # first maximum: shortest
        self.chosen_lengths[choice] += 1
        return choice

    def update(self, num_draft: int, num_accepted: Sequence[int] | np.ndarray) -> None:
        """Record one step: ``num_accepted[b]`` of the ``num_draft`` drafted tokens of row ``b``.

        Position ``i`` (1-based) is tried by rows with ``num_accepted >= i - 1`` and accepted by
        rows with ``num_accepted >= i``. A step with ``num_draft == 0`` or no rows carries no
        data and changes nothing (not even the decay).

        Args:
            num_draft: The draft length of the step, in ``0..max_draft``.
            num_accepted: Shape ``(batch_size,)``, integers in ``0..num_draft``: the accepted
                draft tokens per row (rows that drafted). A list, numpy array or CPU tensor.
        """
        self._check_num_draft("update", num_draft)
        counts = np.asarray(num_accepted)
        if counts.ndim != 1:
            raise ValueError("DraftLengthController.update: num_accepted must be 1-D, "
                             f"got shape {counts.shape}")
        if counts.size and not np.issubdtype(counts.dtype, np.integer):
            raise TypeError("DraftLengthController.update: num_accepted must be integers, "
                            f"got {counts.dtype}")
        if counts.size and (counts.min() < 0 or counts.max() > num_draft):
            raise ValueError(f"DraftLengthController.update: num_accepted must be in "
                             f"0..num_draft ({num_draft}), got {counts.tolist()}")
        if num_draft == 0 or counts.size == 0:
            return
        # at_least[k] = rows that accepted >= k tokens, k = 0..num_draft
        at_least = np.cumsum(np.bincount(counts, minlength=num_draft + 1)[::-1])[::-1]
        self._tried *= self.decay
        self._accepted *= self.decay
        self._tried[:num_draft] += at_least[:-1]
        self._accepted[:num_draft] += at_least[1:]


class TreeSizeController:
    """Cost-aware size of EAGLE-2 dynamic trees: how many of the grown tree's best nodes to
    verify, and whether to grow a tree at all.

    A node's chance of lying on the target's accepted path is estimated by its path
    probability under the draft (``exp`` of :func:`specops.grow_tree`'s score) times a
    calibration factor ``c``, learned online as the ratio of accepted tokens to the predicted
    ones (discounted sums with ``decay``, starting from ``c = 1``). Keeping the ``n`` best
    non-root nodes (an ancestor-closed subtree: scores never increase along a path) then
    emits ``1 + c * sum of their path probabilities`` tokens per row in expectation, for
    ``growth_seconds + verify_seconds(n + 1) + overhead`` seconds. :meth:`choose_size` takes
    the ``n`` with the best ratio summed over rows.

    Growing a tree costs its ``depth`` draft passes whatever is verified after, so
    :meth:`use_tree` first compares the rate the last tree steps predicted (after
    calibration) with plain decoding's ``1 / (verify_seconds(1) + overhead)``; while plain
    decoding is better, every ``probe_every``-th call grows a tree anyway, which refreshes
    the estimates (the probing rule of :class:`DraftLengthController`).

    Args:
        cost: Its ``verify_seconds`` are the target's; its ``draft_fixed_seconds`` holds
            :attr:`growth_seconds` (a tree step's drafting cost), so that swapping the cost
            model swaps both; ``draft_step_seconds`` is unused here.
        growth_seconds: Seconds to grow one tree (all ``depth`` draft passes), ``>= 0``;
            written into ``cost``; :attr:`growth_seconds` may be refined later.
        max_nodes: The grown tree's nodes, root included, ``>= 2``.
        decay: In ``(0, 1]``, per :meth:`update`.
        probe_every: ``>= 1``.

    Attributes:
        calibration: The current ``c``.
        chosen_sizes: ``{non-root nodes verified: times}``; 0 counts plain steps.
        num_probes: Trees grown while plain decoding looked better.
    """

    def __init__(self, cost: CostModel, growth_seconds: float, max_nodes: int, *,
                 decay: float = 0.9, probe_every: int = PROBE_EVERY):
        name = "TreeSizeController"
        if max_nodes < 2:
            raise ValueError(f"{name}: max_nodes must be >= 2, got {max_nodes}")
        if growth_seconds < 0:
            raise ValueError(f"{name}: growth_seconds must be >= 0, got {growth_seconds}")
        _check_decay_and_probe(name, decay, probe_every)
        self.cost = cost
        self.growth_seconds = growth_seconds
        self.max_nodes = max_nodes
        self.decay = decay
        self.probe_every = probe_every
        self._accepted = 1.0        # discounted sums; their ratio is the calibration
        self._predicted = 1.0
        # the last tree step's best choice: (rows, sum of path probs, seconds); None = no
        # tree step yet, so the first step grows one
        self._last: tuple[int, float, float] | None = None
        self._prober = Prober(probe_every)
        self.chosen_sizes: Counter[int] = Counter()

    @property
    def num_probes(self) -> int:
        return self._prober.count

    @property
    def growth_seconds(self) -> float:
        """Seconds to grow one tree: the cost model's ``draft_fixed_seconds``."""
        return self.cost.draft_fixed_seconds

    @growth_seconds.setter
    def growth_seconds(self, seconds: float) -> None:
        self.cost.draft_fixed_seconds = float(seconds)

    @property
    def calibration(self) -> float:
        return self._accepted / self._predicted

    def plain_rate(self) -> float:
        """Tokens per second per row of plain decoding."""
        return 1.0 / (self.cost.verify(1) + self.cost.overhead_seconds)

    def tree_rate(self) -> float | None:
        """Tokens per second per row the last tree step's choice promises under the current
        calibration; None before any tree step."""
        if self._last is None:
            return None
        rows, probs, seconds = self._last
        return (rows + self.calibration * probs) / seconds / rows

    def use_tree(self) -> bool:
        """Whether this step grows a tree (see the class docstring); else it decodes plainly."""
        rate = self.tree_rate()
        plain_best = rate is not None and rate < self.plain_rate()
        if self._prober.due(plain_best) or not plain_best:
            return True
        self.chosen_sizes[0] += 1
        return False

    def choose_size(self, path_probs: np.ndarray) -> int:
        """Non-root nodes to verify, in ``1..max_nodes - 1``.

        Args:
            path_probs: Shape ``(rows, max_nodes - 1)``, float in ``[0, 1]``: each active
                row's non-root node path probabilities under the draft, sorted descending.
        """
        probs = np.asarray(path_probs, dtype=np.float64)
        if probs.ndim != 2 or probs.shape[1] != self.max_nodes - 1:
            raise ValueError(f"TreeSizeController.choose_size: path_probs must have shape "
                             f"(rows, {self.max_nodes - 1}), got {probs.shape}")
        sizes = np.arange(1, self.max_nodes)
        tokens = probs.shape[0] + self.calibration * np.cumsum(probs.sum(0))   # all rows
        seconds = np.array([self.growth_seconds + self.cost.verify(n + 1)
                            + self.cost.overhead_seconds for n in sizes])
        best = int(np.argmax(tokens / seconds))          # first maximum: the smaller tree
        if probs.shape[0]:
            self._last = (probs.shape[0], float(probs[:, :best + 1].sum()), float(seconds[best]))
        self.chosen_sizes[int(sizes[best])] += 1
        return int(sizes[best])

    def update(self, predicted: float, accepted: float) -> None:
        """Record one tree step: ``predicted`` = the sum over rows of the verified nodes' path
        probabilities (before calibration), ``accepted`` = the sum over rows of the accepted
        draft tokens. Both ``>= 0``."""
        if predicted < 0 or accepted < 0:
            raise ValueError(f"TreeSizeController.update: predicted and accepted must be "
                             f">= 0, got {predicted}, {accepted}")
        self._accepted = self.decay * self._accepted + accepted
        self._predicted = self.decay * self._predicted + predicted
