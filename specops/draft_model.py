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


class DraftRunner:
    """Runs a draft model for the loop (see the module docstring).

    Args:
        model: the wrapped draft model.
        batch_size, capacity: of its static cache (``capacity`` >= the longest row plus the
            largest draft or tree the loop asks for).
        vocab_size: the target's vocabulary size (logits are fitted to it).
        graphs: replay the one-token step from a device graph, CUDA or HPU, on the
            model's device (:mod:`specops.graphs`).
        compiled: ``(model.compiled(), model.compiled(any_length=True))`` or None: the
            one-token step runs through the first (``torch.compile``; with ``graphs``, the
            graph captures it), the prefill and catch-up feeds through the second. The
            caller makes them, so that their compiled code outlives this runner (the loop
            keeps them on its generator across calls).
    """

    def __init__(self, model: CausalLM, batch_size: int, capacity: int, vocab_size: int,
                 graphs: bool = False, compiled: tuple[Callable, Callable] | None = None):
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

        def one_token(token, lens, positions):
            return step(token, cache, lens, positions)

        # the autoregressive one-token step, the same shape every time: graphed on CUDA/HPU
        self._one_token = GraphedStep(one_token, device=self.device) if graphs else one_token

    def reset(self) -> None:
        """Forgets every row (a new call reusing this runner and its graphs): the cache's
        old entries lie past each row's length, never attended, and are overwritten."""
        self.cached = [0] * len(self.cached)

    def _lens(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.int32, device=self.device)

    def prefill(self, rows: list[list[int]]) -> None:
        """Caches every row but its root (the last token), like the target."""
        width = max(len(r) for r in rows) - 1
        if width > 0:
            self._feed([r[:-1] for r in rows], prefill=True)

    def _feed(self, new: list[list[int]], prefill: bool = False) -> Tensor:
        """Feeds ``new[b]`` at slots ``cached[b]...``; returns each row's logits after its
        last new token, fitted to the target vocabulary. Shape ``(B, V)``, float32."""
        width = max(len(n) for n in new)
        tokens = torch.zeros(len(new), width, dtype=torch.int64)
        for b, n in enumerate(new):
            tokens[b, :len(n)] = torch.tensor(n, dtype=torch.int64)
        tokens.clamp_(max=self.max_token)
        lens = self._lens(self.cached)
        positions = lens.long()[:, None] + torch.arange(width, device=self.device)
        last = torch.tensor([max(len(n), 1) - 1 for n in new], device=self.device)
        logits = self._feed_model(tokens.to(self.device), self.cache, lens, positions,
                                  logits_index=last[:, None], prefill=prefill)
        self.cached = [c + len(n) for c, n in zip(self.cached, new)]
        return fit_vocab(logits[:, 0], self.vocab_size)

    def catch_up(self, rows: list[list[int]]) -> Tensor:
        """Feeds every row's uncached tokens (at least its root); returns the draft's logits
        for the token after the root, shape ``(B, V)``."""
        return self._feed([r[c:] for r, c in zip(rows, self.cached)])

    def draft_chain(self, rows: list[list[int]], num_draft: int,
                    pick: Callable[[Tensor, int], tuple[Tensor, Tensor | None]]
                    ) -> tuple[Tensor, Tensor | None]:
        """Drafts ``num_draft`` tokens per row autoregressively.

        ``pick(logits, j)`` turns the logits for draft slot ``j`` (shape ``(B, V)``) into
        ``(tokens (B,) int64, probs (B, V) float32 or None)``: an argmax (greedy) or a draw
        from the warped distribution.

        Returns ``draft_tokens (B, num_draft)`` and ``draft_probs (B, num_draft, V)`` (None
        when ``pick`` returns None). Afterwards the cache holds the root and the first
        ``num_draft - 1`` drafts; the loop then sets ``cached`` to what was accepted.
        """
        logits = self.catch_up(rows)
        tokens, probs = [], []
        for j in range(num_draft):
            token, prob = pick(logits, j)
            tokens.append(token)
            probs.append(prob)
            if j + 1 < num_draft:
                logits = self._feed_tokens(token)
        draft = torch.stack(tokens, 1)
        return draft, (None if probs[0] is None else torch.stack(probs, 1))

    def time_one_token(self) -> None:
        """One one-token step on dummy tokens, through the same (graphed, compiled) step the
        chain uses, for the loop's cost warm-up: it writes junk past each row's length
        (never attended, overwritten later) and leaves ``cached`` as it was."""
        lens = self._lens(self.cached)
        token = torch.zeros(len(self.cached), 1, dtype=torch.int64, device=self.device)
        self._one_token(token, lens, lens.long()[:, None])

    def _feed_tokens(self, token: Tensor) -> Tensor:
        lens = self._lens(self.cached)
        logits = self._one_token(token[:, None], lens, lens.long()[:, None])
        self.cached = [c + 1 for c in self.cached]
        return fit_vocab(logits[:, 0], self.vocab_size)

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
