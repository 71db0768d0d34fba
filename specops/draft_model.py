"""The draft model's side of the decoding loop: its own static KV cache, catch-up, chain
drafting and EAGLE-2 tree growth.

The loop keeps every row's committed tokens on the host (``rows[b]``, prompt + generated,
the last one being the *root*, the last committed token). The draft cache holds the first
``cached[b]`` of them. Rather than predicting how many entries survive each step, the
runner *catches up* when it next runs: it feeds ``rows[b][cached[b]:]`` (the root and
anything accepted since) as one right-padded block of shape ``(B, max backlog)``. Pad
entries write junk keys/values past a row's length, which nothing attends to and the next
write overwrites. This one mechanism covers a chain's bonus token after a full acceptance,
a tree's accepted path (the tree's own draft entries are not in path order, so they are
simply dropped) and steps where the hybrid drafter skipped the model.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from .graphs import GraphedStep
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


# A draft step's record (:meth:`DraftRunner.draft_chain`) holds the token as a float32,
# exact for ids below 2**24: one tensor, so that one graph's output carries token and probs.
MAX_RECORD_VOCAB = 2 ** 24

# The pick: (logits (B, V), Philox positions (B,) int64, seeds (B,) int64) -> (tokens (B,)
# int64, probs (B, V) float32 or None).
Pick = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor | None]]


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
            inside the graphed one-token step, its Python values (temperature, ...) frozen.
        graphs: replay the one-token step (forward and pick) and the chain's first pick
            from device graphs, CUDA or HPU, on the model's device (:mod:`specops.graphs`).
        compiled: ``(model.compiled(), model.compiled(any_length=True))`` or None: the
            one-token step runs through the first (``torch.compile``; with ``graphs``, the
            graph captures it), the prefill and catch-up feeds through the second. The
            caller makes them, so that their compiled code outlives this runner (the loop
            keeps them on its generator across calls).
    """

    def __init__(self, model: CausalLM, batch_size: int, capacity: int, vocab_size: int,
                 pick: Pick, graphs: bool = False,
                 compiled: tuple[Callable, Callable] | None = None):
        if vocab_size > MAX_RECORD_VOCAB:
            raise ValueError(f"DraftRunner: vocab_size {vocab_size} above {MAX_RECORD_VOCAB} "
                             "(a draft step carries its token as a float32)")
        self.model = model
        self.cache = model.new_cache(batch_size, capacity)
        self.vocab_size = vocab_size
        self.cached = [0] * batch_size
        self.device = model.device
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

        # the autoregressive one-token step (forward and pick), the same shapes every time,
        # and the pick after the catch-up: graphed on CUDA/HPU
        self._one_token = GraphedStep(one_token, device=self.device) if graphs else one_token
        self._first_pick = (GraphedStep(first_pick, device=self.device) if graphs
                            else first_pick)

    def reset(self) -> None:
        """Forgets every row (a new call reusing this runner and its graphs): the cache's
        old entries lie past each row's length, never attended, and are overwritten."""
        self.cached = [0] * len(self.cached)

    def _lens(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.int32, device=self.device)

    def _to_device(self, host: list[list[int]]) -> Tensor:
        """Rows of host integers as one int64 device tensor: one copy, from pinned memory on
        CUDA (so that it does not wait for the device)."""
        pinned = torch.tensor(host, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        return pinned.to(self.device, non_blocking=True)

    def _feed_columns(self, new: list[list[int]]) -> list[list[int]]:
        """Per row the feed's host inputs (:meth:`_feed_on_device`): its cached length, the
        index of its last new token, then the new tokens, padded with 0 to the longest."""
        width = max(len(n) for n in new)
        return [[c, max(len(n), 1) - 1] + [min(t, self.max_token) for t in n]
                + [0] * (width - len(n)) for c, n in zip(self.cached, new)]

    def _feed_on_device(self, feed: Tensor, prefill: bool = False) -> Tensor:
        """Feeds each row's new tokens at slots ``cached[b]...``; ``feed``: Shape ``(B, 2 +
        W)``, int64, the rows of :meth:`_feed_columns` on the device. Returns each row's
        logits after its last new token, fitted to the target vocabulary: Shape ``(B, V)``,
        float32. Leaves ``cached`` to the caller."""
        lens, last, tokens = feed[:, 0], feed[:, 1:2].contiguous(), feed[:, 2:].contiguous()
        positions = lens[:, None] + torch.arange(tokens.shape[1], device=self.device)
        logits = self._feed_model(tokens, self.cache, lens.int(), positions,
                                  logits_index=last, prefill=prefill)
        return fit_vocab(logits[:, 0], self.vocab_size)

    def prefill(self, rows: list[list[int]]) -> None:
        """Caches every row but its root (the last token), like the target."""
        width = max(len(r) for r in rows) - 1
        if width > 0:
            self._feed([r[:-1] for r in rows], prefill=True)

    def _feed(self, new: list[list[int]], prefill: bool = False) -> Tensor:
        """Feeds ``new[b]`` at slots ``cached[b]...``; returns each row's logits after its
        last new token, fitted to the target vocabulary. Shape ``(B, V)``, float32."""
        logits = self._feed_on_device(self._to_device(self._feed_columns(new)), prefill)
        self.cached = [c + len(n) for c, n in zip(self.cached, new)]
        return logits

    def catch_up(self, rows: list[list[int]]) -> Tensor:
        """Feeds every row's uncached tokens (at least its root); returns the draft's logits
        for the token after the root, shape ``(B, V)``."""
        return self._feed([r[c:] for r, c in zip(rows, self.cached)])

    def draft_chain(self, rows: list[list[int]], num_draft: int, seeds: list[int],
                    forced: list[list[int]] | None = None) -> tuple[Tensor, Tensor | None]:
        """Drafts ``num_draft`` (>= 1) tokens per row autoregressively, each picked by the
        runner's ``pick`` with row ``b``'s seed ``seeds[b]`` at the token's absolute position
        (``len(rows[b]) + j`` for draft slot ``j``).

        With graphs the host work is one copy to the device at the start (the catch-up's
        tokens and lengths, the seeds, ``forced``) and no read: the catch-up feed runs
        eagerly, then its pick and each further token's forward and pick replay a graph
        (the token and its positions stay on the device).

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
        host = [[seed, len(row), c + len(n), len(f)] + f + [0] * (num_draft - len(f)) + feed
                for seed, row, c, n, f, feed in zip(seeds, rows, self.cached, new, forced,
                                                    self._feed_columns(new))]
        inputs = self._to_device(host)                    # the draft phase's one copy
        seeds_t, root_lens, fed_lens, num_forced = inputs[:, :4].t()
        forced_t, feed = inputs[:, 4:4 + num_draft], inputs[:, 4 + num_draft:]
        logits = self._feed_on_device(feed)
        self.cached = [c + len(n) + num_draft - 1 for c, n in zip(self.cached, new)]
        # slot j's keys: the position its predecessor is fed at (the cache's length after
        # the catch-up, plus j - 1), its own position (Philox) and the row's seed
        slots = torch.arange(num_draft, device=self.device)
        keys = torch.stack([fed_lens[:, None] + slots - 1, root_lens[:, None] + slots,
                            seeds_t[:, None].expand(-1, num_draft)], -1)
        first = self._first_pick(logits, keys[:, 0])
        # each replay overwrites the graph's output: every slot's record is copied out
        records = first.new_empty(batch, num_draft, first.shape[1])
        records[:, 0] = first
        for j in range(1, num_draft):
            records[:, j] = self._one_token(records[:, j - 1, -1], keys[:, j])
        tokens = records[..., -1].long()
        probs = records[..., :-1].contiguous() if records.shape[-1] > 1 else None
        if any(forced):
            take = slots < num_forced[:, None]                         # (B, num_draft)
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

    def grow_tree(self, rows: list[list[int]], depth: int, top_k: int, num_nodes: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """An EAGLE-2 dynamic tree from the draft's top-k (:func:`specops.grow_tree`).

        Each round re-feeds every tree token grown so far with the tree mask (the cache can
        only hold a prefix that all nodes see, so non-ancestors from earlier rounds must be
        new tokens, masked): ``depth * top_k`` tokens in the last round, cheap for a
        memory-bound draft. Returns ``tree_tokens (B, num_nodes)`` int64,
        ``parents (B, num_nodes)`` int32 and ``scores (B, num_nodes)`` float32 (each node's
        cumulative draft log-prob, root 0); the cache keeps the prefix up to the root.
        """
        root_lens = [len(r) for r in rows]
        root_logits = self.catch_up(rows)
        lens = self._lens(self.cached)                     # root included
        seq_tokens: list[Tensor] = []
        seq_parents: list[Tensor] = []

        def draft_step(tokens: Tensor, parent_index: Tensor, level: int) -> Tensor:
            if level == 0:
                return root_logits.float().log_softmax(-1)[:, None]
            seq_tokens.append(tokens)
            seq_parents.append(parent_index)
            all_tokens = torch.cat(seq_tokens, 1)
            batch, width = all_tokens.shape
            root = torch.full((batch, 1), -1, dtype=torch.int32, device=tokens.device)
            parents = torch.cat([root] + [p.int() for p in seq_parents], 1)
            mask, node_depth = tree_metadata(parents)
            positions = lens.long()[:, None] - 1 + node_depth[:, 1:].long()
            frontier = torch.arange(width - tokens.shape[1], width, device=tokens.device)
            logits = self.model(all_tokens, self.cache, lens, positions, mask[:, 1:, 1:],
                                logits_index=frontier.expand(batch, -1))
            return fit_vocab(logits, self.vocab_size).float().log_softmax(-1)

        root_tokens = torch.tensor([r[-1] for r in rows], dtype=torch.int64, device=self.device)
        tree_tokens, parents, _, scores = grow_tree(draft_step, root_tokens, depth, top_k,
                                                    num_nodes)
        self.rewind(root_lens)
        return tree_tokens, parents, scores

    def static_tree(self, rows: list[list[int]], branching: tuple[int, ...],
                    children: Callable[[Tensor, int], tuple[Tensor, Tensor | None]]
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """A full tree with ``branching[d]`` children per node at depth ``d``, nodes in
        breadth-first order (siblings adjacent, in the order ``children`` returns them).

        ``children(logits, level)`` gets the draft's logits after each node of one level,
        shape ``(B, F, V)``, and returns their children ``(B, F, k)`` int64 and, for sampled
        children, the distributions they were drawn from ``(B, F, V)`` (None for top-k).
        As in :meth:`grow_tree`, each level re-feeds the tree grown so far with its mask.

        Returns ``tree_tokens (B, T)`` int64, ``parents (B, T)`` int32 and ``draft_probs
        (B, T, V)`` (row ``i`` = the distribution node ``i`` was drawn from, i.e. its
        parent's; row 0 unused) or None.
        """
        batch = len(rows)
        root_lens = [len(r) for r in rows]
        logits = self.catch_up(rows)[:, None]
        lens = self._lens(self.cached)                     # root included
        node_parents, level_nodes = [-1], [0]
        levels: list[Tensor] = []
        probs: list[Tensor] = []
        for level, width in enumerate(branching):
            tokens, level_probs = children(logits, level)
            levels.append(tokens.reshape(batch, -1))
            if level_probs is not None:
                probs.append(level_probs.repeat_interleave(width, dim=1))
            first = len(node_parents)
            node_parents += [parent for parent in level_nodes for _ in range(width)]
            level_nodes = list(range(first, len(node_parents)))
            if level + 1 == len(branching):
                break
            parents = torch.tensor(node_parents, dtype=torch.int32,
                                   device=self.device).expand(batch, -1)
            mask, depth = tree_metadata(parents)
            positions = lens.long()[:, None] - 1 + depth[:, 1:].long()
            frontier = torch.tensor(level_nodes, device=self.device) - 1
            logits = fit_vocab(self.model(torch.cat(levels, 1), self.cache, lens, positions,
                                          mask[:, 1:, 1:],
                                          logits_index=frontier.expand(batch, -1)),
                               self.vocab_size)
        self.rewind(root_lens)
        roots = torch.tensor([r[-1] for r in rows], dtype=torch.int64, device=self.device)
        tree_tokens = torch.cat([roots[:, None]] + levels, 1)
        parents = torch.tensor(node_parents, dtype=torch.int32, device=self.device)
        draft_probs = None
        if probs:
            draft_probs = torch.cat([torch.zeros_like(probs[0][:, :1])] + probs, 1)
        return tree_tokens, parents.expand(batch, -1).contiguous(), draft_probs
