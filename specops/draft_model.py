"""The draft model's side of the decoding loop: its own static KV cache, catch-up, chain
drafting and EAGLE-2 tree growth.

The loop keeps every row's committed tokens on the host (``rows[b]``, prompt + generated,
the last one being the *root*, the last committed token). The draft cache holds the first
``cached[b]`` of them. Rather than predicting how many entries survive each step, the
runner *catches up* when it next runs: it feeds ``rows[b][cached[b]:]`` (the root and
anything accepted since) as one block of shape ``(B, max backlog)``: a row with a shorter
backlog starts earlier and feeds some of its cached tokens again (the same keys/values at
the same slots), so that every row's writes end at its own length (only a row shorter than
the block is padded after its tokens, with junk entries that nothing attends to and the next
write overwrites). This one mechanism covers a chain's bonus token after a full acceptance,
a tree's accepted path (the tree's own draft entries are not in path order, so they are
simply dropped) and steps where the hybrid drafter skipped the model.

With device graphs a drafting phase is one host-to-device copy and a few graph replays: the
catch-up feed is widened to one of :data:`FEED_WIDTHS` (more cached tokens fed again, pads
after a row shorter than the width) and replayed from a graph per width, together with
what follows it: a chain's first pick, or a whole tree's growth (every round of
:meth:`grow_tree`, every level of :meth:`static_tree`). Longer catch-ups (after a run of
plain or prompt-lookup steps) run eagerly: rare, and a graph per length would never be
replayed.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from .graphs import GraphedStep, rows_to_device
from .models import CausalLM
from .tree_ops import tree_metadata
from .trees import grow_tree


def fit_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """Draft logits over the target's vocabulary: rows the draft lacks get ``-inf`` (never
    drafted), rows the target lacks are dropped (so the draft never proposes them and its
    distribution is renormalised over the target's tokens, which keeps verification exact).

    Models of one tokenizer often differ only in padding rows of the embedding (Qwen2.5 7B+:
    152064, the small ones 151936)."""
    have = logits.shape[-1]
    if have == vocab_size:
        return logits
    if have > vocab_size:
        return logits[..., :vocab_size]
    pad = logits.new_full((*logits.shape[:-1], vocab_size - have), float("-inf"))
    return torch.cat([logits, pad], -1)


# The widths a graphed catch-up feed is padded to, one graph each. Steady drafting feeds at
# most 2 tokens a row (a chain's last draft and bonus token) or depth + 1 (a tree's accepted
# path and bonus token).
FEED_WIDTHS = (1, 2, 4, 8, 16, 32)

# A draft step's record (:meth:`DraftRunner.draft_chain`) holds the token as a float32,
# exact for ids below 2**24: one tensor, so that one graph's output carries token and probs.
MAX_RECORD_VOCAB = 2 ** 24

# The pick: (logits (B, V), Philox positions (B,) int64, seeds (B,) int64) -> (tokens (B,)
# int64, probs (B, V) float32 or None).
Pick = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor | None]]

# A static tree's children: (logits (B, F, V), level, lens (B,) int32, seeds (B,) int64) ->
# (tokens (B, F, k) int64, probs (B, F, V) float32 or None); see DraftRunner.
Children = Callable[[Tensor, int, Tensor, Tensor], tuple[Tensor, Tensor | None]]


class DraftRunner:
    """Runs a draft model for the loop (see the module docstring).

    Args:
        model: the wrapped draft model.
        batch_size, capacity: of its static cache (``capacity`` >= the longest row plus the
            largest draft or tree the loop asks for).
        vocab_size: the target's vocabulary size (logits are fitted to it).
        pick: ``pick(logits, positions, seeds) -> (tokens, probs)``, how a chain's draft
            token is chosen from the fitted logits (Shape ``(B, V)``): an argmax (``probs``
            None) or a draw from the warped distribution (``probs`` Shape ``(B, V)``,
            float32) with Philox keyed by ``seeds`` and the drawn token's absolute
            ``positions`` (both Shape ``(B,)``, int64). Sync-free: with ``graphs`` it runs
            inside the graphed steps, its Python values (temperature, ...) frozen.
        graphs: replay the one-token step (forward and pick), the catch-up feed with what
            follows it (a chain's first pick, a tree's growth) from device graphs, CUDA or
            HPU, on the model's device (:mod:`specops.graphs`).
        compiled: ``(model.compiled(), model.compiled(any_length=True))`` or None: the
            one-token step runs through the first (``torch.compile``; with ``graphs``, the
            graph captures it), the prefill and catch-up feeds through the second. The
            caller makes them, so that their compiled code outlives this runner (the loop
            keeps them on its generator across calls).
        children: for :meth:`static_tree`, ``children(logits, level, lens, seeds) ->
            (tokens, probs)``: the children of every node of one level, from the draft's
            fitted logits after each, Shape ``(B, F, V)``; ``lens`` Shape ``(B,)``, int32,
            each row's cached length with its root (the root's position + 1); ``seeds``
            Shape ``(B,)``, int64. Returns tokens ``(B, F, k)`` int64 and, for sampled
            children, the distributions they were drawn from ``(B, F, V)`` float32 (None
            for top-k). Sync-free, like ``pick``.
    """

    def __init__(self, model: CausalLM, batch_size: int, capacity: int, vocab_size: int,
                 pick: Pick, graphs: bool = False,
                 compiled: tuple[Callable, Callable] | None = None,
                 children: Children | None = None):
        if vocab_size > MAX_RECORD_VOCAB:
            raise ValueError(f"DraftRunner: vocab_size {vocab_size} above {MAX_RECORD_VOCAB} "
                             "(a draft step carries its token as a float32)")
        self.model = model
        self.cache = model.new_cache(batch_size, capacity)
        self.capacity = capacity
        self.vocab_size = vocab_size
        self.cached = [0] * batch_size
        self.device = model.device
        self.graphs = graphs
        self.children = children
        # A committed token the draft's table lacks (possible only when the target's table
        # is larger) is fed as the draft's last id: its guesses after it are worse, but
        # verification keeps the output exact.
        self.max_token = model.vocab_size - 1
        cache = self.cache
        step, self._feed_model = compiled if compiled is not None else (model, model)

        def first_pick(logits: Tensor, keys: Tensor) -> Tensor:
            token, probs = pick(logits, keys[:, 1], keys[:, 2])
            token = token.float()[:, None]
            return token if probs is None else torch.cat([probs.float(), token], 1)

        def one_token(token: Tensor, keys: Tensor) -> Tensor:
            positions = keys[:, :1].contiguous()
            logits = step(token.long()[:, None], cache, positions[:, 0].int(), positions)
            return first_pick(fit_vocab(logits[:, 0], vocab_size), keys)

        def chain_start(head: Tensor, feed: Tensor) -> tuple[Tensor, Tensor]:
            # the catch-up feed, then the first draft's pick; head: (B, 4), the first columns
            # of draft_chain's host inputs (seed, root length, fed length, forced count).
            # Draft slot 0's keys: the position its predecessor (the root) is fed at, its own
            # position (Philox) and the row's seed; slot j's are these plus (j, j, 0).
            keys = torch.stack([head[:, 2] - 1, head[:, 1], head[:, 0]], -1)
            return first_pick(self._feed_on_device(feed), keys), keys

        # the autoregressive one-token step (forward and pick), the same shapes every time:
        # graphed on CUDA/HPU, as are the catch-up-led steps (per width, see _run)
        self._one_token = GraphedStep(one_token, device=self.device) if graphs else one_token
        self._chain_start = chain_start
        self._graphed: dict[tuple, GraphedStep] = {}   # _run's graphs, per kind of step
        self._plans: dict[tuple[int, ...], _StaticPlan] = {}
        self._slot_steps: dict[int, Tensor] = {}   # draft_chain's key offsets, per length

    def reset(self) -> None:
        """Forgets every row (a new call reusing this runner and its graphs): the cache's
        old entries lie past each row's length, never attended, and are overwritten."""
        self.cached = [0] * len(self.cached)

    def _lens(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.int32, device=self.device)

    def _feed_width(self, new: list[list[int]]) -> int:
        """The width of a catch-up feed of ``new``: with graphs, the least of
        :data:`FEED_WIDTHS` that holds every row's new tokens and leaves every row's writes
        inside the cache, else the longest row's count (eager)."""
        need = max(len(n) for n in new)
        if self.graphs:
            room = self.capacity - max(self.cached)
            for width in FEED_WIDTHS:
                if need <= width <= room:
                    return width
        return need

    def _run(self, kind: tuple, fn: Callable, width: int, *inputs: Tensor):
        """``fn(*inputs)`` for a step led by a catch-up feed of ``width``: with graphs and a
        width of :data:`FEED_WIDTHS`, replayed from a graph kept per ``kind`` (which names
        everything ``fn`` holds fixed) and input shapes; otherwise eagerly."""
        if not (self.graphs and width in FEED_WIDTHS):
            return fn(*inputs)
        graphed = self._graphed.get(kind)
        if graphed is None:
            graphed = self._graphed[kind] = GraphedStep(fn, device=self.device)
        return graphed(*inputs)

    def _feed_columns(self, rows: list[list[int]], width: int) -> list[list[int]]:
        """Per row the host inputs (:meth:`_feed_on_device`) of a feed of its tokens past
        ``cached[b]``, ``width`` (at least the longest such backlog) tokens wide: the slot
        it starts at, the index of its last token in the feed, then the tokens. A row whose
        backlog is shorter than ``width`` starts earlier and feeds its cached tokens again
        before it (the same keys and values at the same slots), so that every row's writes
        end at its own length, inside the cache however long another row's backlog (a
        right-padded block wrote past a short backlog's row, beyond the cache's end when
        another row had a long backlog near the end of a call); only a row shorter than
        ``width`` is padded with 0 after its tokens."""
        columns = []
        for row in rows:
            start = max(0, len(row) - width)
            tokens = row[start:]
            columns.append([start, max(len(tokens), 1) - 1]
                           + [min(t, self.max_token) for t in tokens]
                           + [0] * (width - len(tokens)))
        return columns

    def _feed_on_device(self, feed: Tensor, prefill: bool = False) -> Tensor:
        """Feeds each row's tokens from the slot its column starts at; ``feed``: Shape
        ``(B, 2 + W)``, int64, the rows of :meth:`_feed_columns` on the device. Returns each
        row's logits after its last new token, fitted to the target vocabulary: Shape
        ``(B, V)``, float32. Leaves ``cached`` to the caller."""
        lens, last, tokens = feed[:, 0], feed[:, 1:2].contiguous(), feed[:, 2:].contiguous()
        positions = lens[:, None] + torch.arange(tokens.shape[1], device=self.device)
        logits = self._feed_model(tokens, self.cache, lens.int(), positions,
                                  logits_index=last, prefill=prefill)
        return fit_vocab(logits[:, 0], self.vocab_size)

    @staticmethod
    def _fed_lens(feed: Tensor) -> Tensor:
        """Each row's cached length after the feed ``feed`` (its cached length plus its new
        tokens, of which there is at least one): Shape ``(B,)``, int32."""
        return (feed[:, 0] + feed[:, 1] + 1).int()

    def prefill(self, rows: list[list[int]]) -> None:
        """Caches every row but its root (the last token), like the target."""
        width = max(len(r) for r in rows) - 1
        if width > 0:
            self._feed([r[:-1] for r in rows], prefill=True)

    def _feed(self, rows: list[list[int]], prefill: bool = False) -> Tensor:
        """Feeds each row's tokens past ``cached[b]`` (at slots ``cached[b]...``); returns
        each row's logits after its last token, fitted to the target vocabulary. Shape
        ``(B, V)``, float32."""
        width = max(len(r) - c for r, c in zip(rows, self.cached))
        feed = rows_to_device(self._feed_columns(rows, width), self.device)
        logits = self._feed_on_device(feed, prefill)
        self.cached = [len(r) for r in rows]
        return logits

    def draft_chain(self, rows: list[list[int]], num_draft: int, seeds: list[int],
                    forced: list[list[int]] | None = None) -> tuple[Tensor, Tensor | None]:
        """Drafts ``num_draft`` (>= 1) tokens per row autoregressively, each picked by the
        runner's ``pick`` with row ``b``'s seed ``seeds[b]`` at the token's absolute position
        (``len(rows[b]) + j`` for draft slot ``j``).

        With graphs the host work is one copy to the device at the start (the catch-up's
        tokens and lengths, the seeds, ``forced``) and no read: the catch-up feed and its
        pick replay one graph (per feed width), each further token's forward and pick
        another (the token and its positions stay on the device).

        ``forced[b]`` (at most ``num_draft`` tokens) replaces row ``b``'s first drafts, as
        point masses in ``draft_probs``: a :class:`Hybrid`'s lookup tokens (the model still
        drafts the row; the loop keeps only its root cached).

        Returns ``draft_tokens (B, num_draft)`` int64 and ``draft_probs (B, num_draft, V)``
        float32 (None when ``pick`` gives None). Afterwards the cache holds the root and the
        first ``num_draft - 1`` drafts; the loop then sets ``cached`` to what was accepted.
        """
        batch = len(rows)
        forced = forced or [[] for _ in rows]
        new = [r[c:] for r, c in zip(rows, self.cached)]
        width = self._feed_width(new)
        host = [[seed, len(row), c + len(n), len(f)] + f + [0] * (num_draft - len(f)) + feed
                for seed, row, c, n, f, feed in zip(seeds, rows, self.cached, new, forced,
                                                    self._feed_columns(rows, width))]
        inputs = rows_to_device(host, self.device)        # the draft phase's one copy
        # one graph per feed width, whatever the draft length: the forced tokens stay out
        first, slot0 = self._run(("chain",), self._chain_start, width, inputs[:, :4],
                                 inputs[:, 4 + num_draft:])
        steps = self._slot_steps.get(num_draft)
        if steps is None:                   # (num_draft, 3): (j, j, 0) for slot j
            slots = torch.arange(num_draft, device=self.device)
            steps = torch.stack([slots, slots, torch.zeros_like(slots)], -1)
            self._slot_steps[num_draft] = steps
        keys = slot0[:, None] + steps                      # (B, num_draft, 3): every slot's
        self.cached = [c + len(n) + num_draft - 1 for c, n in zip(self.cached, new)]
        # each replay overwrites the graph's output: every slot's record is copied out
        records = first.new_empty(batch, num_draft, first.shape[1])
        records[:, 0] = first
        for j in range(1, num_draft):
            records[:, j] = self._one_token(records[:, j - 1, -1], keys[:, j])
        tokens = records[..., -1].long()
        probs = records[..., :-1].contiguous() if records.shape[-1] > 1 else None
        if any(forced):
            num_forced, forced_t = inputs[:, 3], inputs[:, 4:4 + num_draft]
            take = torch.arange(num_draft, device=self.device) < num_forced[:, None]
            tokens = torch.where(take, forced_t, tokens)
            if probs is not None:
                point = torch.zeros_like(probs).scatter_(-1, forced_t[..., None], 1.0)
                probs = torch.where(take[..., None], point, probs)
        return tokens, probs

    def time_one_token(self) -> None:
        """One one-token step (forward and pick) on dummy tokens, through the same (graphed,
        compiled) step the chain replays, for the loop's cost warm-up: it writes junk past
        each row's length (never attended, overwritten later) and leaves ``cached`` as it
        was."""
        lens = self._lens(self.cached).long()
        keys = torch.stack([lens, lens + 1, torch.zeros_like(lens)], -1)
        self._one_token(torch.zeros(len(self.cached), device=self.device), keys)

    def rewind(self, root_lens: list[int]) -> None:
        """Keeps the cache up to each row's root (after a tree step or an overridden draft)."""
        self.cached = [min(c, n) for c, n in zip(self.cached, root_lens)]

    def _tree_inputs(self, rows: list[list[int]], seeds: list[int] | None
                     ) -> tuple[Tensor, int]:
        """A tree growth's host inputs in one copy: per row its root, its seed (when
        ``seeds``), then its catch-up feed (:meth:`_feed_columns`), and the feed's width.
        Afterwards ``cached`` holds every row through its root (the tree's own entries are
        dropped)."""
        new = [r[c:] for r, c in zip(rows, self.cached)]
        width = self._feed_width(new)
        seed_columns = [[seed] for seed in seeds] if seeds is not None else [[] for _ in rows]
        host = [[row[-1]] + seed + feed for row, seed, feed
                in zip(rows, seed_columns, self._feed_columns(rows, width))]
        inputs = rows_to_device(host, self.device)
        self.cached = [len(r) for r in rows]
        return inputs, width

    def grow_tree(self, rows: list[list[int]], depth: int, top_k: int, num_nodes: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """An EAGLE-2 dynamic tree from the draft's top-k (:func:`specops.grow_tree`).

        Each round re-feeds every tree token grown so far with the tree mask (the cache can
        only hold a prefix that all nodes see, so non-ancestors from earlier rounds must be
        new tokens, masked): ``depth * top_k`` tokens in the last round, cheap for a
        memory-bound draft. With graphs the catch-up and every round replay one graph.
        Returns ``tree_tokens (B, num_nodes)`` int64, ``parents (B, num_nodes)`` int32 and
        ``scores (B, num_nodes)`` float32 (each node's cumulative draft log-prob, root 0);
        the cache keeps the prefix up to the root.
        """
        inputs, width = self._tree_inputs(rows, None)

        def grow(inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            roots, feed = inputs[:, 0], inputs[:, 1:]
            root_logits = self._feed_on_device(feed)
            lens = self._fed_lens(feed)                    # root included
            seq_tokens: list[Tensor] = []
            seq_parents: list[Tensor] = []

            def draft_step(tokens: Tensor, parent_index: Tensor, level: int) -> Tensor:
                if level == 0:
                    return root_logits.float().log_softmax(-1)[:, None]
                seq_tokens.append(tokens)
                seq_parents.append(parent_index)
                all_tokens = torch.cat(seq_tokens, 1)
                batch, grown = all_tokens.shape
                root = torch.full((batch, 1), -1, dtype=torch.int32, device=tokens.device)
                parents = torch.cat([root] + [p.int() for p in seq_parents], 1)
                mask, node_depth = tree_metadata(parents)
                positions = lens.long()[:, None] - 1 + node_depth[:, 1:].long()
                frontier = torch.arange(grown - tokens.shape[1], grown, device=tokens.device)
                logits = self.model(all_tokens, self.cache, lens, positions, mask[:, 1:, 1:],
                                    logits_index=frontier.expand(batch, -1))
                return fit_vocab(logits, self.vocab_size).float().log_softmax(-1)

            tree_tokens, parents, _, scores = grow_tree(draft_step, roots, depth, top_k,
                                                        num_nodes)
            return tree_tokens, parents, scores
        return self._run(("grow", depth, top_k, num_nodes), grow, width, inputs)

    def static_tree(self, rows: list[list[int]], branching: tuple[int, ...],
                    seeds: list[int]) -> tuple[Tensor, Tensor, Tensor | None]:
        """A full tree with ``branching[d]`` children per node at depth ``d``, nodes in
        breadth-first order (siblings adjacent, in the order the runner's ``children``
        returns them). As in :meth:`grow_tree`, each level re-feeds the tree grown so far
        with its mask, and with graphs the catch-up and every level replay one graph.

        Returns ``tree_tokens (B, T)`` int64, ``parents (B, T)`` int32 and ``draft_probs
        (B, T, V)`` (row ``i`` = the distribution node ``i`` was drawn from, i.e. its
        parent's; row 0 unused) or None.
        """
        if self.children is None:
            raise ValueError("DraftRunner.static_tree: the runner was built without children")
        plan = self._plans.get(branching)
        if plan is None:                    # device constants, made before any capture
            plan = self._plans[branching] = _StaticPlan(branching, self.device)
        children = self.children
        inputs, width = self._tree_inputs(rows, seeds)

        def grow(inputs: Tensor) -> tuple[Tensor, ...]:
            roots, row_seeds, feed = inputs[:, 0], inputs[:, 1], inputs[:, 2:]
            batch = inputs.shape[0]
            logits = self._feed_on_device(feed)[:, None]
            lens = self._fed_lens(feed)                    # root included
            levels: list[Tensor] = []
            probs: list[Tensor] = []
            for level, fanout in enumerate(branching):
                tokens, level_probs = children(logits, level, lens, row_seeds)
                levels.append(tokens.reshape(batch, -1))
                if level_probs is not None:   # each child's row: its parent's distribution
                    # (expand, not repeat_interleave: no host-side size for a graph to sync on)
                    nodes, vocab = level_probs.shape[1:]
                    probs.append(level_probs[:, :, None].expand(-1, -1, fanout, -1)
                                 .reshape(batch, nodes * fanout, vocab))
                if level + 1 == len(branching):
                    break
                parents, frontier = plan.levels[level]
                mask, depth = tree_metadata(parents.expand(batch, -1))
                positions = lens.long()[:, None] - 1 + depth[:, 1:].long()
                logits = fit_vocab(self.model(torch.cat(levels, 1), self.cache, lens,
                                              positions, mask[:, 1:, 1:],
                                              logits_index=frontier.expand(batch, -1)),
                                   self.vocab_size)
            tree_tokens = torch.cat([roots[:, None]] + levels, 1)
            parents = plan.parents.expand(batch, -1).contiguous()
            if not probs:
                return tree_tokens, parents
            return tree_tokens, parents, torch.cat([torch.zeros_like(probs[0][:, :1])] + probs,
                                                   1)
        out = self._run(("static", branching), grow, width, inputs)
        return out if len(out) == 3 else (*out, None)


class _StaticPlan:
    """A static tree's shape as device constants, made once (a graph capture cannot copy host
    data to the device): ``parents`` Shape ``(1, T)`` int32 (breadth-first, siblings
    adjacent), and per level but the last the parents of the tree grown through it, Shape
    ``(1, 1 + n)``, and the indices among its non-root nodes of that level's nodes (whose
    logits give the next level's children), int64."""

    def __init__(self, branching: tuple[int, ...], device: torch.device):
        node_parents, level_nodes = [-1], [0]
        self.levels: list[tuple[Tensor, Tensor]] = []
        for level, width in enumerate(branching):
            first = len(node_parents)
            node_parents += [parent for parent in level_nodes for _ in range(width)]
            level_nodes = list(range(first, len(node_parents)))
            if level + 1 < len(branching):
                self.levels.append((
                    torch.tensor([node_parents], dtype=torch.int32, device=device),
                    torch.tensor(level_nodes, dtype=torch.int64, device=device) - 1))
        self.parents = torch.tensor([node_parents], dtype=torch.int32, device=device)
