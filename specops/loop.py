"""The decoding loop (contract, "Decoding loop"): ``specops.generate``, the reusable
:class:`SpeculativeGenerator` and its :class:`GenerationSession`, stepped by the caller.

One *step* per iteration: the drafter proposes a chain (or a tree) after each row's *root*,
the last committed token; the target scores the root and the proposals in one forward pass;
the specops verify op keeps exactly the target's distribution; the caches roll back what was
rejected. The target runs through specops' own forward (:mod:`specops.models`) with a static
KV cache indexed by position: rolling back a chain is just a length, a tree commits its
accepted path with :func:`specops.kv_commit`.

Rows are compacted on entry: ``attention_mask`` (left or right padding) picks each row's
tokens, which then sit at slots ``0..len-1`` of their cache row, so pads are never attended
and position equals slot. The loop reads each step's emitted tokens back to the host once
(to stop on EOS, stop strings and ``max_new_tokens``, to stream, and for prompt lookup);
everything inside a step is sync-free device work.
"""

import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from . import ops
from .controller import (PROBE_EVERY, CostModel, DraftLengthController, Prober,
                         TreeSizeController)
from .draft_model import Children, DraftRunner, fit_vocab
from .graphs import GraphedStep, graph_backend, rows_to_device
from .kv_ops import kv_commit
from .models import CausalLM, causal_lm
from .prompt_lookup import PromptLookup
from .reference.draw import draw, sanitize
from .reference.random import uniform
from .stats import GenerationStats, PhaseClock
from .tree_ops import tree_metadata, tree_verify, tree_verify_greedy
from .trees import keep_best_nodes

# The longest draft of a draft model's steps when the caller sets none: each drafted token
# costs a draft-model step, so long drafts rarely pay (the controller chooses 0..8).
MODEL_MAX_DRAFT = 8

# Philox purpose of the draft model's own draws. Purposes 0 and 1 belong to the verify ops
# (contract); a third purpose keeps the draft's randomness independent of theirs.
PURPOSE_DRAFT = 2

# Options Hugging Face's generate has and this loop does not: refused, never ignored.
UNSUPPORTED = ("logprobs", "output_scores", "output_logits", "return_dict_in_generate",
               "repetition_penalty", "no_repeat_ngram_size", "num_beams", "num_return_sequences",
               "do_sample", "min_new_tokens", "min_length", "length_penalty", "bad_words_ids",
               "logits_processor", "stopping_criteria", "typical_p", "min_p",
               "presence_penalty", "frequency_penalty", "guidance_scale", "max_length",
               "generation_config", "use_cache")


@runtime_checkable
class Proposer(Protocol):
    """A draftless drafter: anything with this method (:class:`PromptLookup` is one).

    ``propose(rows, num_draft)`` gets every row's committed tokens (prompt + generated, the
    last one is the root) and returns, per row, at most ``num_draft`` proposed next tokens
    (``[]`` for none). Proposals are verified as deterministic drafts (``draft_probs=None``),
    which keeps the output exact however they were chosen. The loop times the call and
    feeds that cost to the draft-length controller. A result that is not one list of token
    ids (ints in the target's vocabulary) per row ends the call with a ValueError.
    """

    def propose(self, rows: list[list[int]], num_draft: int) -> list[list[int]]: ...


@dataclass(frozen=True)
class DynamicTree:
    """EAGLE-2 dynamic draft trees (:func:`specops.grow_tree`): ``depth`` rounds of expansion
    by the draft model's ``top_k``, keeping the ``num_nodes`` best nodes (root included).
    Children are deterministic (top-k), verified with ``draft_probs=None``: lossless at any
    temperature.

    ``adaptive=True`` (default): cost-aware size. Each step verifies only the best ``n`` of
    the grown nodes (:func:`specops.keep_best_nodes`), ``n`` chosen from the measured verify
    cost and the draft's path probabilities calibrated by the acceptance seen so far, and
    decodes plainly, without growing a tree, while that promises more tokens per second
    (:class:`specops.controller.TreeSizeController`). It reads the tree's scores on the host
    once per step. ``False``: every step verifies all ``num_nodes``."""

    depth: int = 4
    top_k: int = 4
    num_nodes: int = 16
    adaptive: bool = True

    def __post_init__(self):
        if self.depth < 1 or self.top_k < 1:
            raise ValueError(f"DynamicTree: depth and top_k must be >= 1, got {self}")
        pool = 1 + self.top_k + (self.depth - 1) * self.top_k ** 2
        if not 2 <= self.num_nodes <= pool:
            raise ValueError(f"DynamicTree: num_nodes must be in 2..{pool} (the pool of "
                             f"depth={self.depth}, top_k={self.top_k}), got {self.num_nodes}")


@dataclass(frozen=True)
class StaticTree:
    """A fixed tree shape: every node at depth ``d`` gets ``branching[d]`` children from the
    draft model, e.g. ``(3, 2, 1)`` = 3 + 6 + 6 nodes under the root.

    ``sampled=None`` (default): children are drawn independently (with replacement) from
    the draft's warped distribution when sampling (verified with their real ``q``) and are
    its top-k when greedy; ``False`` always takes the top-k (deterministic children,
    verified with ``draft_probs=None``: lossless too). ``True`` needs ``temperature > 0``.
    """

    branching: tuple[int, ...] = (2, 2, 1)
    sampled: bool | None = None

    def __post_init__(self):
        if not self.branching or any(int(k) != k or k < 1 for k in self.branching):
            raise ValueError(f"StaticTree: branching must be positive ints, got "
                             f"{self.branching}")
        object.__setattr__(self, "branching", tuple(int(k) for k in self.branching))

    @property
    def depth(self) -> int:
        return len(self.branching)

    @property
    def num_nodes(self) -> int:
        total, width = 1, 1
        for k in self.branching:
            width *= k
            total += width
        return total


class Hybrid:
    """Prompt lookup where it finds a match, the draft model elsewhere.

    A row *matches* when the lookup proposes at least ``min_match`` tokens for it. Matching
    rows take the lookup's tokens and the others the draft model's; a step where every row
    matches skips the draft model.

    With ``compare=True`` a match is taken only where it pays: the step compares the two
    drafters' expected tokens per second, each from its own controller (acceptance per
    position learnt from its own steps, the draft model's drafting cost, the target's verify
    cost, the lookup's proposal no longer than the longest match), and if the draft model's
    is higher every row takes the draft model's tokens. The lookup's estimates also learn
    from the matches it did not use, by how far each agrees with the tokens the step
    emitted, so that they follow the text (code that starts repeating its prompt); a lookup
    that matches but does not pay is still used once per ``PROBE_EVERY`` (16) such steps
    (:class:`specops.controller.Prober`). Matches on prose are common and often wrong (a
    number, a name), which is where the comparison helps; where a good lookup starts with a
    few wrong matches (code) it loses steps to the draft model until its estimates recover.
    Before the draft model's first step (a :class:`Hybrid` prefills it only then), the
    comparison also charges the draft model that prefill (guessed from the target's),
    against the time both drafters would take to the longest row's end.
    Measured on the Qwen2.5-Coder pair (CPU, 12 prompts in 4 categories, one repetition;
    BENCHMARKS.md): between 0.89x and 1.32x the default's tokens/s per prompt, 1.03x
    geometric mean (before the prefill was charged: 0.82-1.40x, 1.03x; 0.99x in the run
    before), winning on math, even on code, so it is not the default.

    Args:
        draft_model: The draft model (a Hugging Face causal LM sharing the target's
            tokenizer).
        lookup: The proposer; default :class:`PromptLookup()`.
        min_match: The shortest proposal that counts as a match, ``>= 1``.
        compare: Take a match only where its expected rate is at least the draft model's
            (above). Needs the cost-aware draft length: with a fixed ``num_draft_tokens``
            there are no estimates, and every match is taken.
    """

    def __init__(self, draft_model: torch.nn.Module, lookup: Proposer | None = None,
                 min_match: int = 2, compare: bool = False):
        if int(min_match) != min_match or min_match < 1:
            raise ValueError(f"Hybrid: min_match must be an integer >= 1, got {min_match}")
        self.draft_model = draft_model
        self.lookup = lookup or PromptLookup()
        self.min_match = int(min_match)
        self.compare = bool(compare)


@dataclass
class GenerationOutput:
    """``sequences``: Shape ``(batch_size, prompt + max new)``, int64: ``input_ids`` as given,
    then each row's new tokens, then ``pad_token_id`` after the row's end (as Hugging Face's
    ``generate`` returns them for left padding). ``num_new_tokens``: new tokens per row."""

    sequences: Tensor
    num_new_tokens: list[int]
    stats: GenerationStats


class GenerationSession:
    """A generation that the caller steps, for engines that schedule steps themselves:
    :meth:`SpeculativeGenerator.start` prefills and returns one. Every :meth:`step` runs one
    draft -> verify -> accept step over the rows still running and returns each row's new
    tokens, so an engine can stream them, check its own stop conditions, or end a row it no
    longer needs with :meth:`stop` (a cancelled request: the row keeps what it has and costs
    nothing more than its share of the batch's step shapes). :meth:`output` is the
    :class:`GenerationOutput` so far, at any time. The stats count the session's own time
    only: the clock stops between steps.

    A generator with device graphs keeps one set of caches for its graphs, so it runs one
    session at a time: starting another one with the same batch size while this one has
    rows running raises ``RuntimeError``; :meth:`close` ends every row first.
    """

    def __init__(self, run: "_Run", input_ids: Tensor, end: Callable[[], None] | None):
        self._run, self._input_ids, self._end = run, input_ids, end
        self._ended()                                   # max_new_tokens=0: nothing to step

    @property
    def done(self) -> bool:
        """Whether every row has ended (EOS, a stop string, ``max_new_tokens`` or
        :meth:`stop`)."""
        return all(self._run.done)

    @property
    def rows_done(self) -> list[bool]:
        """Per row, whether it has ended."""
        return list(self._run.done)

    @torch.no_grad()
    def step(self) -> list[list[int]]:
        """One step; per row the tokens it emitted (``[]`` for a row that had ended). After
        ``done``, every row's list is empty. A step that raises (a bad proposal, an
        interrupt) ends the session: its caches may be half updated; :meth:`output` still
        has every token emitted before it."""
        try:
            new = self._run.step()
        except BaseException:
            self.close()
            raise
        self._ended()
        return new

    def stop(self, row: int) -> None:
        """Ends row ``row`` now: it keeps the tokens it has, the other rows go on."""
        if not -self._run.batch <= row < self._run.batch:
            raise IndexError(f"row {row} is outside this batch of {self._run.batch}")
        self._run.done[row] = True
        self._ended()

    def close(self) -> None:
        """Ends every row (the generator may then start another session)."""
        for row in range(self._run.batch):
            self._run.done[row] = True
        self._ended()

    def output(self) -> GenerationOutput:
        """``sequences`` and stats so far (as :meth:`SpeculativeGenerator.generate` returns
        them at the end)."""
        return self._run.output(self._input_ids)

    def _ended(self) -> None:
        """Ends a Hugging Face streamer once, when the last row ends."""
        if self.done and self._end is not None:
            end, self._end = self._end, None
            end()


def _special_ids(config) -> tuple:
    return tuple(getattr(config, name, None) for name in ("bos_token_id", "eos_token_id"))


class SpeculativeGenerator:
    """Speculative generation with a Hugging Face causal LM as target, reusable across calls
    (the warm-up cost measurement and the controller's acceptance estimates carry over).
    :meth:`generate` runs a call to its end; :meth:`start` returns a
    :class:`GenerationSession` that the caller steps.

    Args:
        target: a transformers decoder-only causal LM (any dtype; ``model.eval()``), or a
            wrapper from :func:`specops.models.causal_lm`. Llama, Qwen2 and Mistral run
            through specops' compact forward, others through Hugging Face's own (eager,
            never graphed; :mod:`specops.models`).
        draft: None (plain decoding in the specops loop), a transformers causal LM sharing
            the target's tokenizer, a :class:`PromptLookup` (or any :class:`Proposer`) or a
            :class:`Hybrid`.
        num_draft_tokens: draft length per step; None = chosen per step by the cost-aware
            :class:`specops.controller.DraftLengthController` in ``0..max_draft_tokens``.
        max_draft_tokens: the longest draft the controller may choose; None = the
            drafter's own: ``PromptLookup.num_draft`` for lookup steps (32 by default: a
            copied span costs no draft step, so only the verify pass limits it; 8 for a
            :class:`Proposer` without ``num_draft``), 8 for the draft model's steps (each
            token costs a draft step). A :class:`Hybrid` keeps one
            controller for each kind of step (lookup steps, where every row has a match, and
            draft-model steps), each with its own acceptance estimates and draft cost.
        tree: None (chains), a :class:`DynamicTree` or a :class:`StaticTree` (both need a
            draft model).
        temperature, top_k, top_p: as Hugging Face's warpers; ``temperature=0`` is greedy.
        seed: row ``b`` uses seed ``seed + b`` (Philox, contract "randomness"). At a fixed
            draft length (or a tree that is not adaptive) a row's tokens are those it gets
            alone with ``seed + b``, whatever the other rows' progress, up to floating-point
            differences between a batched and a one-row forward; the cost-aware choices and
            a :class:`Hybrid`'s choice of drafter look at the whole batch, so with them a
            row's tokens (equally distributed) can differ.
        eos_token_id: an id or a list of ids ending a row (default: the target's config); a
            tensor of ids works too.
        stop_strings: a string, or strings, ending a row once its new text contains one (needs
            ``tokenizer``); the token completing it is kept.
        tokenizer, draft_tokenizer: when both are given, their vocabularies must match.
        pad_token_id: fills ``sequences`` after a row's end.
        cuda_graphs: replay the target's verify step (a chain step's forward and verify op
            in one graph, with one copy of its inputs to the device and one read back; a
            tree step's forward) and the draft's one-token step from device graphs captured
            once per shape (:mod:`specops.graphs`): CUDA graphs on CUDA, and HPU graphs
            through ``habana_frameworks.torch`` on Intel Gaudi (untested on hardware);
            ignored on CPU. ``None`` (the default): on for a target
            on CUDA, off elsewhere (HPU graphs only when asked for, being untested). On an
            H200 (2026-11-27) the graph tests passed and plain decoding at the Qwen2.5-1.5B
            shape ran 6.6x faster with graphs than eagerly (160.5 against 24.1 tokens/s;
            eager, each of specops' many small kernels pays its launch), so CUDA users get
            them unless they pass ``False``. The graphs replay into KV caches at fixed
            addresses, so the generator keeps the last call's caches and graphs and the next
            call with the same batch size and no more room needed (prompt +
            ``max_new_tokens``) reuses them without capturing again; another call replaces
            them (one set is kept, as a cache for a large batch can take gigabytes).
            :meth:`release_graphs` frees them. :func:`specops.generate` builds a new
            generator each call, so it captures every time: reuse a generator to capture
            once.
        compile: run the target's verify steps and the draft model's one-token step through
            ``torch.compile`` (TorchInductor fuses the elementwise kernels that specops'
            eager forward launches one by one; :meth:`SpecopsCausalLM.compiled`); with
            ``cuda_graphs`` the graphs capture the compiled kernels. Prefills (and the
            draft's catch-up feeds) compile once with dynamic shapes for every length
            (:meth:`SpecopsCausalLM.compiled` with ``any_length``); a draft model's tree
            growth stays eager. Each step shape compiles at its first use (seconds to a
            minute each), so reuse the generator. Off by default: the one GPU run so far (an
            H200) measured specops' eager forward replayed from graphs at 0.62x Hugging
            Face's compiled ``generate``, which is what this is meant to close; the compiled
            path is tested for exactness on the CPU and not yet measured on a GPU. On the
            CPU it does not pay (``bench/compile_cpu.py``, Qwen2.5-Coder-1.5B float32, 48
            tokens: 14.0-14.2 s against 13.0 s eager, after a 95 s first call; the same
            tokens). Ignored for models without specops' forward (:mod:`specops.models`).

    Attributes:
        costs: ``{batch size: {kind: CostModel}}``, the cost models of the cost-aware choices,
            measured at the first call with each batch size and refined by every step on the
            CPU; kinds ``"model"`` (draft-model steps), ``"lookup"`` (prompt-lookup steps,
            sharing the model steps' verify costs) and ``"tree"`` (adaptive trees; its
            ``draft_fixed_seconds`` is the growth of one tree).
        cost: The last call's main cost model (the tree's, the draft model's, else prompt
            lookup's); None before a cost-aware call.
        controllers: ``{kind: DraftLengthController}``; their acceptance estimates carry over
            between calls and batch sizes, their cost model follows the batch size.
        tree_controller: The :class:`~specops.controller.TreeSizeController` of adaptive trees.
    """

    def __init__(self, target: torch.nn.Module, draft=None, *, num_draft_tokens: int | None = None,
                 max_draft_tokens: int | None = None,
                 tree: DynamicTree | StaticTree | None = None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 eos_token_id: int | Sequence[int] | None = None,
                 stop_strings: str | Sequence[str] | None = None, tokenizer=None,
                 draft_tokenizer=None, pad_token_id: int | None = None,
                 cuda_graphs: bool | None = None,
                 compile: bool = False):
        self.target = causal_lm(target)
        self.lookup: Proposer | None = None
        self.draft: CausalLM | None = None
        self.min_match = 1
        self.compare_drafters = False   # Hybrid(compare=True)
        if isinstance(draft, Hybrid):
            self.lookup, self.min_match = draft.lookup, draft.min_match
            self.compare_drafters = draft.compare
            draft = draft.draft_model
        if isinstance(draft, Proposer) and not isinstance(draft, torch.nn.Module):
            self.lookup, draft = draft, None
        if draft is not None:
            self.draft = self._check_draft(self.target, draft, tokenizer, draft_tokenizer)
        if tree is not None and not isinstance(tree, (DynamicTree, StaticTree)):
            raise TypeError(f"tree must be None, specops.DynamicTree or specops.StaticTree, got "
                            f"{type(tree).__name__}")
        if isinstance(tree, StaticTree) and tree.sampled and temperature == 0:
            raise ValueError("StaticTree(sampled=True) needs temperature > 0")
        if tree is not None and (self.draft is None or self.lookup is not None):
            raise ValueError("tree mode needs a draft model (not prompt lookup or hybrid)")
        if temperature < 0 or temperature != temperature or temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if int(top_k) != top_k or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {top_k}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if max_draft_tokens is not None:
            max_draft_tokens = _integer("max_draft_tokens", max_draft_tokens, 0)
        if num_draft_tokens is not None:
            num_draft_tokens = _integer("num_draft_tokens", num_draft_tokens, 0, 64)
        if isinstance(stop_strings, str):            # one string, as Hugging Face takes it
            stop_strings = [stop_strings]
        stop_strings = list(stop_strings or [])
        if not all(isinstance(s, str) and s for s in stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings (an empty one would end "
                             f"every row at its first token), got {stop_strings!r}")
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need the tokenizer (tokenizer=...)")
        self.tree = tree
        self.num_draft_tokens = num_draft_tokens
        fixed = num_draft_tokens if num_draft_tokens is not None else max_draft_tokens
        # the longest draft per kind of step: "model" (draft model) and "lookup" (proposer)
        self.max_draft = {}
        if self.draft is not None:
            self.max_draft["model"] = fixed if fixed is not None else MODEL_MAX_DRAFT
        if self.lookup is not None:
            self.max_draft["lookup"] = (fixed if fixed is not None else
                                        getattr(self.lookup, "num_draft", MODEL_MAX_DRAFT))
        self.max_draft_tokens = max(self.max_draft.values(), default=fixed or 0)
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.seed = _check_seed(seed)
        config = target.config
        self.eos = _token_ids("eos_token_id", eos_token_id if eos_token_id is not None
                              else config.eos_token_id)
        self.stop_strings = stop_strings
        self.tokenizer = tokenizer
        if pad_token_id is not None:             # the caller's is checked, the config's taken
            pad_token_id = _integer("pad_token_id", pad_token_id, -2 ** 63, 2 ** 63 - 1)
        else:
            pad_token_id = getattr(config, "pad_token_id", None)
        self.pad_token_id = pad_token_id if pad_token_id is not None else min(self.eos, default=0)
        self.controllers: dict[str, DraftLengthController] = {}
        self.tree_controller: TreeSizeController | None = None
        self.lookup_prober = Prober(PROBE_EVERY)    # Hybrid(compare=True): a match not paying
        # batch size -> kind of step ("model", "lookup", "tree") -> its cost model: a verify
        # pass over B rows costs more than over one, so each batch size is measured apart
        self.costs: dict[int, dict[str, CostModel]] = {}
        self.cost: CostModel | None = None
        self.cuda_graphs = None if cuda_graphs is None else bool(cuda_graphs)
        self.compile = bool(compile)
        self._compiled: dict[int, tuple[Callable, Callable]] = {}   # _compiled_forwards
        self._graphed: _GraphedCaches | None = None

    def _compiled_forwards(self, model) -> tuple[Callable, Callable] | None:
        """With ``compile``, ``model``'s compiled one-step and any-length forwards
        (:meth:`SpecopsCausalLM.compiled`), made once and kept: their compiled code serves
        every later call; None without ``compile`` or for a model without specops'
        forward."""
        if not (self.compile and model.graph_safe):
            return None
        key = id(model)
        if key not in self._compiled:
            self._compiled[key] = model.compiled(), model.compiled(any_length=True)
        return self._compiled[key]

    def release_graphs(self) -> None:
        """Frees the KV caches and device graphs kept from the last call with ``cuda_graphs``
        (the next such call captures again)."""
        self._graphed = None

    def _caches(self, batch: int, capacity: int, graphs: bool) -> "_GraphedCaches":
        """A call's caches and steps: with ``graphs``, the kept ones when they fit (same
        batch size, at least ``capacity``; their draft runner reset), else new ones, kept
        for the next call; without, new ones every call."""
        kept = self._graphed
        if (graphs and kept is not None and kept.batch == batch and kept.capacity >= capacity
                and kept.sampling == self._sampling()):
            user = kept.user()
            if user is not None and not all(user.done):
                raise RuntimeError(
                    "this generator's device graphs replay into caches that a session with "
                    "rows still running uses: step it to the end or close() it first (or "
                    "use another SpeculativeGenerator)")
            if kept.draft is not None:
                kept.draft.reset()
            return kept
        self._graphed = None                      # free the old caches before allocating
        caches = _GraphedCaches.build(self, batch, capacity, graphs)
        if graphs:
            self._graphed = caches
        return caches

    def _sampling(self) -> tuple[float, int, float]:
        """``(temperature, top_k, top_p)``, which a graphed chain step holds fixed."""
        return self.temperature, self.top_k, self.top_p

    def reset_estimates(self) -> None:
        """Forgets what the controllers learnt about acceptance (the draft-length estimates,
        the tree calibration), keeping the measured cost model: for a new kind of request,
        or a benchmark that gives every call the same start."""
        self.controllers = {kind: DraftLengthController(control.cost, self.max_draft[kind])
                            for kind, control in self.controllers.items()}
        self.lookup_prober = Prober(self.lookup_prober.every)
        if self.tree_controller is not None:
            self.tree_controller = TreeSizeController(
                self.cost, self.tree_controller.growth_seconds, self.tree.num_nodes)

    @property
    def controller(self) -> DraftLengthController | None:
        """The draft-length controller of the draft model's steps, or of prompt lookup's
        when there is no draft model; None before the first call or with fixed lengths."""
        return self.controllers.get("model", self.controllers.get("lookup"))

    @staticmethod
    def _check_draft(target, draft, tokenizer, draft_tokenizer) -> CausalLM:
        advice = ("pick a draft of the same model family (same tokenizer), or use "
                  "specops.PromptLookup(), which needs no model")
        if tokenizer is not None and draft_tokenizer is not None:
            if tokenizer.get_vocab() != draft_tokenizer.get_vocab():
                raise ValueError(f"the draft's tokenizer differs from the target's: {advice}")
        if _special_ids(target.config) != _special_ids(draft.config):
            raise ValueError(f"the draft's special tokens (bos, eos) = "
                             f"{_special_ids(draft.config)} differ from the target's "
                             f"{_special_ids(target.config)}, so their tokenizers differ: "
                             f"{advice}")
        draft = causal_lm(draft)
        if target.device != draft.device:
            raise ValueError(f"the draft model is on {draft.device} and the target on "
                             f"{target.device}: move both to one device")
        return draft

    # ----------------------------------------------------------------------------- entry
    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                 max_new_tokens: int, streamer: Callable[[list[list[int]]], None] | None = None,
                 **unsupported) -> GenerationOutput:
        """Generates up to ``max_new_tokens`` per row; see :func:`specops.generate`."""
        session = self.start(input_ids, attention_mask, max_new_tokens=max_new_tokens,
                             streamer=streamer, **unsupported)
        try:
            while not session.done:
                session.step()
        except BaseException as error:   # an interrupt or a failing drafter: keep the tokens
            error.partial_output = session.output()
            raise
        return session.output()

    @torch.no_grad()
    def start(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
              max_new_tokens: int, streamer: Callable[[list[list[int]]], None] | None = None,
              **unsupported) -> "GenerationSession":
        """Prefills ``input_ids`` and returns a :class:`GenerationSession` that the caller
        steps (an engine that schedules steps itself); :meth:`generate` is ``start`` then
        ``step`` until ``done``. Arguments as :meth:`generate`."""
        _refuse(unsupported)
        rows = self._rows(input_ids, attention_mask)
        max_new_tokens = _integer("max_new_tokens", max_new_tokens, 0)
        limit = getattr(self.target.config, "max_position_embeddings", None)
        longest = max(len(r) for r in rows)
        if limit is not None and longest + max_new_tokens > limit:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds the target's max_position_embeddings ({limit})")
        if _check_seed(self.seed) + len(rows) - 1 >= 2 ** 63:   # (self.seed may be set later)
            raise ValueError(f"seed {self.seed} + row index must fit in int64: row b uses seed "
                             f"+ b, and this batch has {len(rows)} rows")
        callback, end = _stream_to(streamer, input_ids)
        run = _Run(self, rows, max_new_tokens, callback)
        try:
            run.start()
        except BaseException:   # a failed prefill leaves no session running on the caches
            run.done = [True] * run.batch
            raise
        return GenerationSession(run, input_ids, end)

    def _rows(self, input_ids: Tensor, attention_mask: Tensor | None) -> list[list[int]]:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
                torch.int64, torch.int32):
            raise TypeError("input_ids must be a 2-D int64 tensor (batch_size, prompt_len)")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"input_ids {tuple(input_ids.shape)}")
        ids = input_ids.tolist()
        keep = (attention_mask.bool().tolist() if attention_mask is not None
                else [[True] * len(r) for r in ids])
        rows = [[t for t, k in zip(r, m) if k] for r, m in zip(ids, keep)]
        vocab = self.target.vocab_size
        for b, row in enumerate(rows):
            if not row:
                raise ValueError(f"row {b} of input_ids has no token (attention_mask all 0)")
            if min(row) < 0 or max(row) >= vocab:
                raise ValueError(f"row {b} of input_ids holds a token id outside 0..{vocab - 1}")
        return rows


def _stream_to(streamer, input_ids: Tensor) -> tuple[Callable | None, Callable | None]:
    """``(callback, end)`` for a ``generate`` call's ``streamer``: a callable is the
    callback itself (each step's new tokens per row); a Hugging Face streamer (an object with
    ``put`` and ``end``, such as ``transformers.TextStreamer``) is fed as Hugging Face's
    ``generate`` feeds it (``put`` of the prompt, ``input_ids`` as given, then of each step's
    new tokens, shape ``(1, n)``, then ``end()``), batch 1 only, as those streamers take."""
    if streamer is None or callable(streamer):
        return streamer, None
    if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise TypeError(f"streamer must be a callable (it gets each row's new tokens after "
                        f"every step) or a Hugging Face streamer with put() and end(), got "
                        f"{type(streamer).__name__}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"a Hugging Face streamer ({type(streamer).__name__}) takes one row, "
                         f"this batch has {input_ids.shape[0]}: pass a callable streamer, which "
                         f"gets every row's new tokens")
    streamer.put(input_ids.cpu())

    def put(new_per_row: list[list[int]]) -> None:
        if new_per_row[0]:
            streamer.put(torch.tensor([new_per_row[0]], dtype=torch.int64))
    return put, streamer.end


def _integer(name: str, value, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``low..high`` (no upper bound: None): a TypeError for what is
    not an integer (a float, a bool; numpy integers and 0-d integer tensors are), a ValueError
    outside the range."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _token_ids(name: str, ids) -> set[int]:
    """``ids`` (None, an int, a list or tuple of ints, or a tensor or array of them, as Hugging
    Face takes ``eos_token_id``) as a set of ints. A tensor is read as its values: kept as
    tensors, its ids would never equal a generated token and the rows would not end."""
    if hasattr(ids, "tolist"):                          # torch and numpy tensors and scalars
        ids = ids.tolist()
    values = list(ids) if isinstance(ids, (list, tuple, set, frozenset)) else (
        [] if ids is None else [ids])
    for value in values:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"{name} must be an id or a list of ids (ints), got {ids!r}")
    return {int(value) for value in values}


def _check_seed(seed) -> int:
    """``seed`` as an int64 (the verify ops' Philox key is its low and high 32 bits)."""
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if not -2 ** 63 <= int(seed) < 2 ** 63:
        raise ValueError(f"seed must fit in int64 (-2**63 .. 2**63 - 1), got {seed}")
    return int(seed)


# What to pass instead, for Hugging Face options that have a specops spelling.
_INSTEAD = {"do_sample": "temperature > 0 samples, temperature=0 is greedy",
            "min_new_tokens": "no minimum length is implemented",
            "min_length": "no minimum length is implemented",
            "num_return_sequences": "repeat a row in input_ids, with seeds seed + b",
            "max_length": "pass max_new_tokens (max_length counts the prompt too)",
            "generation_config": "pass its fields (max_new_tokens, temperature, top_k, ...) "
                                 "as arguments",
            "use_cache": "the loop always uses its own KV cache (use_cache=True is accepted)"}


def _refuse(unsupported: dict) -> None:
    if unsupported.get("use_cache") is True:     # what the loop does anyway: accepted
        unsupported = {name: v for name, v in unsupported.items() if name != "use_cache"}
    if unsupported:
        names = ", ".join(sorted(unsupported))
        known = [n for n in unsupported if n in UNSUPPORTED]
        why = ("not supported by the specops loop" if known else
               "unknown options (help(specops.generate) lists them)")
        hints = "; ".join(f"{n}: {_INSTEAD[n]}" for n in sorted(unsupported) if n in _INSTEAD)
        raise TypeError(f"generate: {why}: {names}" + (f" ({hints})" if hints else ""))


def _chain_verify_step(forward: Callable[..., Tensor], cache: object,
                       sampling: tuple[float, int, float]) -> Callable[..., Tensor]:
    """The device work of a chain step, sync-free so that one device graph holds all of it:
    the target's forward over each row's root and drafts, then the verify op (greedy:
    :func:`specops.chain_verify_greedy` on the logits; sampling: :func:`specops.sampling_probs`
    with ``sampling = (temperature, top_k, top_p)``, then :func:`specops.chain_verify`).

    ``step(inputs, drafts, draft_probs=None) -> Tensor``:

    - ``inputs``: Shape ``(batch_size, 4)``, int64: per row the target's cached length (the
      root's position), the draft length, the seed and the root (:meth:`_Run._chain_inputs`).
    - ``drafts``: Shape ``(batch_size, num_draft)``, int64 (slots past a row's draft length
      are ignored).
    - ``draft_probs``: Shape ``(batch_size, num_draft, vocab_size)``, float32: the draft
      model's sampling distributions; absent for deterministic drafts.

    Returns Shape ``(batch_size, num_draft + 2)``, int64: the verify op's tokens (accepted
    drafts, the drawn or argmax token, then ``-1``), then ``num_accepted``: one tensor, so
    that the host reads the step back once.
    """
    temperature, top_k, top_p = sampling

    def step(inputs: Tensor, drafts: Tensor, draft_probs: Tensor | None = None) -> Tensor:
        cached, draft_lens, seeds, roots = inputs.t().contiguous()
        tokens = torch.cat([roots[:, None], drafts], 1)
        positions = cached[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
        logits = forward(tokens, cache, cached.int(), positions, None)
        if temperature == 0:
            out, num_accepted = ops.chain_verify_greedy(logits, drafts, draft_lens.int())
        else:
            probs = ops.sampling_probs(logits, temperature, top_k, top_p)
            out, num_accepted = ops.chain_verify(probs, drafts, draft_probs, draft_lens.int(),
                                                 seeds=seeds, positions=cached)
        return torch.cat([out, num_accepted[:, None].long()], 1)
    return step


def _pick_draft(sampling: tuple[float, int, float]
                ) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor | None]]:
    """The draft model's pick for a chain (:class:`DraftRunner`'s ``pick``), sync-free so that
    the graphed one-token step holds it: ``pick(logits, positions, seeds) -> (tokens,
    probs)``, the argmax when greedy, else a Philox draw (purpose ``PURPOSE_DRAFT``, keyed by
    the row's seed and the drawn token's absolute position) from the warped draft
    distribution (:func:`specops.sampling_probs` with ``sampling = (temperature, top_k,
    top_p)``; its probabilities go to the verify op).

    - ``logits``: Shape ``(batch_size, vocab_size)``, the draft's, fitted to the target's
      vocabulary.
    - ``positions``, ``seeds``: Shape ``(batch_size,)``, int64.

    Returns tokens Shape ``(batch_size,)``, int64, and probs Shape ``(batch_size,
    vocab_size)``, float32 (None when greedy)."""
    temperature, top_k, top_p = sampling

    def pick(logits: Tensor, positions: Tensor, seeds: Tensor) -> tuple[Tensor, Tensor | None]:
        if temperature == 0:
            return logits.argmax(-1), None
        probs = ops.sampling_probs(logits, temperature, top_k, top_p)
        u = uniform(seeds, positions, 0, PURPOSE_DRAFT)
        return draw(sanitize(probs), u), probs
    return pick


def _tree_verify_step(forward: Callable[..., Tensor], cache: object,
                      sampling: tuple[float, int, float]) -> Callable[..., Tensor]:
    """The device work of a tree step, sync-free so that one device graph holds all of it:
    the tree's mask and depths (:func:`specops.tree_metadata`), the target's forward over
    the tree, the verify op (greedy: :func:`specops.tree_verify_greedy`; sampling:
    :func:`specops.sampling_probs` with ``sampling = (temperature, top_k, top_p)``, then
    :func:`specops.tree_verify`) and the commit of the accepted path's keys and values
    (:func:`specops.kv_commit`).

    ``step(inputs, tree_tokens, parents, draft_probs=None) -> Tensor``:

    - ``inputs``: Shape ``(batch_size, 2)``, int64: per row the target's cached length (the
      root's position) and the seed.
    - ``tree_tokens``, ``parents``, ``draft_probs``: as :func:`specops.tree_verify` takes
      them (``draft_probs`` absent for deterministic children).

    Returns Shape ``(batch_size, T + 2)``, int64: the verify op's ``out`` (the accepted
    path's tokens, the drawn or argmax token, then ``-1``), ``num_accepted`` and the tree's
    depth, one tensor so that the host reads the step back once.
    """
    temperature, top_k, top_p = sampling

    def step(inputs: Tensor, tree_tokens: Tensor, parents: Tensor,
             draft_probs: Tensor | None = None) -> Tensor:
        lens, seeds = inputs.t().contiguous()
        mask, depth = tree_metadata(parents)
        positions = lens[:, None] + depth.long()
        logits = forward(tree_tokens, cache, lens.int(), positions, mask)
        if temperature == 0:
            out, path, num_accepted = tree_verify_greedy(logits, tree_tokens, parents)
        else:
            probs = ops.sampling_probs(logits, temperature, top_k, top_p)
            out, path, num_accepted = tree_verify(probs, tree_tokens, parents,
                                                  draft_probs=draft_probs, seeds=seeds,
                                                  positions=lens)
        kv_commit(cache.tensors(), lens.int(), path, num_accepted)
        return torch.cat([out, num_accepted[:, None].long(),
                          depth.max(1).values[:, None].long()], 1)
    return step


def _static_children(sampling: tuple[float, int, float], tree: StaticTree) -> Children:
    """A :class:`StaticTree`'s children for :meth:`DraftRunner.static_tree`, sync-free so
    that a graphed growth holds it: ``children(logits, level, lens, seeds)`` with the draft's
    logits after every node of one level ``(B, F, V)``, returns their ``branching[level]``
    children ``(B, F, k)``: the top-k when greedy or ``sampled=False``, else independent
    Philox draws (purpose ``PURPOSE_DRAFT``, keyed by the row's seed, the children's
    absolute position ``lens + level`` (``lens``: the cached length with the root) and the
    child's rank) from the warped draft distribution, which comes back too ``(B, F, V)``."""
    temperature, top_k, top_p = sampling

    def children(logits: Tensor, level: int, lens: Tensor, seeds: Tensor
                 ) -> tuple[Tensor, Tensor | None]:
        width = tree.branching[level]
        if temperature == 0 or tree.sampled is False:
            return logits.topk(width, dim=-1).indices, None
        probs = ops.sampling_probs(logits, temperature, top_k, top_p)       # (B, F, V)
        batch, frontier, vocab = probs.shape
        flat = sanitize(probs).reshape(-1, vocab)
        positions = (lens.long() + level)[:, None].expand(-1, frontier)
        draws = [draw(flat, uniform(seeds[:, None], positions, rank, PURPOSE_DRAFT)
                      .reshape(-1)).reshape(batch, frontier) for rank in range(width)]
        return torch.stack(draws, -1), probs
    return children


@dataclass
class _GraphedCaches:
    """A call's KV caches and the steps that run on them: the target's chain step (forward
    and verify, :func:`_chain_verify_step`), its tree step (with a tree: forward, verify and
    commit, :func:`_tree_verify_step`) and the draft model's runner, graphed when ``graphs``
    (see ``cuda_graphs`` of :class:`SpeculativeGenerator`, which keeps these across calls
    then, for the same ``sampling``). Hugging Face's eager forward (the fallback for other
    architectures) is never graphed."""

    batch: int
    capacity: int
    cache: object
    sampling: tuple[float, int, float]        # (temperature, top_k, top_p) of the steps
    chain_step: Callable[..., Tensor]
    tree_step: Callable[..., Tensor] | None
    draft: DraftRunner | None
    prefill_forward: Callable[..., Tensor]    # the target, compiled for any length or not
    user: Callable[[], object] = lambda: None  # the _Run using them (a weak reference)

    @classmethod
    def build(cls, gen: SpeculativeGenerator, batch: int, capacity: int,
              graphs: bool) -> "_GraphedCaches":
        target = gen.target
        cache = target.new_cache(batch, capacity)
        sampling = gen._sampling()
        children = (_static_children(sampling, gen.tree)
                    if isinstance(gen.tree, StaticTree) else None)
        draft = (DraftRunner(gen.draft, batch, capacity, target.vocab_size,
                             _pick_draft(sampling), graphs=graphs and gen.draft.graph_safe,
                             compiled=gen._compiled_forwards(gen.draft), children=children)
                 if gen.draft is not None else None)
        forward, prefill = gen._compiled_forwards(target) or (target, target)
        chain_step = _chain_verify_step(forward, cache, sampling)
        tree_step = (_tree_verify_step(forward, cache, sampling)
                     if gen.tree is not None else None)
        if graphs and target.graph_safe:
            chain_step = GraphedStep(chain_step, device=target.device)
            if tree_step is not None:
                tree_step = GraphedStep(tree_step, device=target.device)
        return cls(batch, capacity, cache, sampling, chain_step, tree_step, draft, prefill)


class _Run:
    """The state of one ``generate`` call."""

    def __init__(self, gen: SpeculativeGenerator, rows: list[list[int]], max_new_tokens: int,
                 streamer):
        self.gen, self.rows, self.streamer = gen, rows, streamer
        self.batch = len(rows)
        self.prompt_lens = [len(r) for r in rows]
        self.budget = max_new_tokens
        self.done = [max_new_tokens == 0] * self.batch
        self.device = gen.target.device
        tree = gen.tree
        # slots a step may write past a row's length: a chain's root and drafts, a tree's
        # nodes; a grown tree's last round re-feeds the draft (depth - 1) * top_k tokens
        # (DraftRunner.grow_tree), more than num_nodes when few of the grown nodes are kept
        lookahead = (tree.num_nodes if tree else gen.max_draft_tokens + 1) + 1
        if isinstance(tree, DynamicTree):
            lookahead = max(lookahead, (tree.depth - 1) * tree.top_k + 1)
        capacity = max(self.prompt_lens) + max_new_tokens + lookahead
        graphs = (self.device.type == "cuda" if gen.cuda_graphs is None else
                  gen.cuda_graphs and graph_backend(self.device) is not None)
        caches = gen._caches(self.batch, capacity, graphs)
        caches.user = weakref.ref(self)
        self.capacity, self.cache = caches.capacity, caches.cache
        self.chain_step, self.tree_verify_step = caches.chain_step, caches.tree_step
        self.draft = caches.draft
        self.prefill_forward = caches.prefill_forward
        self.row_seeds = [gen.seed + b for b in range(self.batch)]   # Philox seed per row
        self.stats = GenerationStats()
        self.controllers: dict[str, DraftLengthController] = {}   # set up by loop()
        self.clock = PhaseClock(self.device)

    # ------------------------------------------------------------------------- helpers
    def _lens(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.int32, device=self.device)

    def _chain_inputs(self, draft_lens: list[int], lookup: list[list[int]] | None = None
                      ) -> Tensor:
        """A chain step's small integer inputs, built on the host and moved to the device in
        one copy (from pinned memory on CUDA, so that it does not wait for the device): Shape
        ``(batch_size, 4 + L)``, int64, per row the target's cached length (the root's
        position; the root itself is not cached yet), ``draft_lens``, the row's seed and its
        root, then its ``lookup`` tokens padded with 0 to the longest, ``L`` (``L = 0``
        without ``lookup``)."""
        lookup = lookup or [[] for _ in self.rows]
        width = max(len(tokens) for tokens in lookup)
        return rows_to_device([[len(row) - 1, n, seed, row[-1]] + tokens
                               + [0] * (width - len(tokens))
                               for row, n, seed, tokens in zip(self.rows, draft_lens,
                                                               self.row_seeds, lookup)],
                              self.device)

    # ------------------------------------------------------------------------- loop
    def start(self) -> None:
        """The prefill, and the controllers' set-up (a warm-up measurement at a generator's
        first cost-aware call). The clock stops between :meth:`step` calls: the caller's
        time in between is not the loop's."""
        gen = self.gen
        self.clock.switch("prefill")
        self._prefill()
        self.clock.switch("overhead")
        if gen.num_draft_tokens is None and gen.tree is None and (self.draft or gen.lookup):
            self._setup_controller()
        if isinstance(gen.tree, DynamicTree) and gen.tree.adaptive:
            self._setup_tree_controller()
        self.clock.switch(None)

    def step(self) -> list[list[int]]:
        """One step over the rows still running; each row's new tokens (``[]`` for rows that
        had ended)."""
        if all(self.done):
            return [[] for _ in range(self.batch)]
        self.clock.switch("overhead")
        self.root_lens = [len(r) for r in self.rows]
        emitted = self._tree_step() if self.gen.tree is not None else self._chain_step()
        self.clock.switch("overhead")
        new = self._emit(emitted)
        self.clock.switch(None)
        return new

    def _times(self) -> None:
        """The time split of ``stats`` from the clock, so far."""
        totals = self.clock.totals()
        stats = self.stats
        stats.prefill_seconds = totals.get("prefill", 0.0)
        stats.draft_seconds = totals.get("draft", 0.0)
        stats.verify_seconds = totals.get("verify", 0.0)
        stats.overhead_seconds = totals.get("overhead", 0.0)
        stats.warmup_seconds = totals.get("warmup", 0.0)
        stats.total_seconds = sum(totals.values())

    def _prefill(self) -> None:
        started = time.perf_counter()
        width = max(self.prompt_lens) - 1
        if width > 0:
            tokens = torch.zeros(self.batch, width, dtype=torch.int64)
            for b, row in enumerate(self.rows):
                tokens[b, :len(row) - 1] = torch.tensor(row[:-1])
            zeros = self._lens([0] * self.batch)
            positions = torch.arange(width, device=self.device).expand(self.batch, -1)
            self.prefill_forward(tokens.to(self.device), self.cache, zeros, positions,
                                 logits_index=torch.zeros(self.batch, 1, dtype=torch.int64,
                                                          device=self.device), prefill=True)
        # host time: the prefill itself on the CPU, its launches on a GPU (_draft_prefill_guess)
        self.prefill_seconds = time.perf_counter() - started
        self.draft_prefilled = False
        if self.draft is not None and self.gen.lookup is None:
            self._prefill_draft()

    def _prefill_draft(self) -> None:
        """The draft model's prefill (every row but its root). A :class:`Hybrid` runs it at
        its first draft-model step instead, since prompt lookup may serve every step (code
        that repeats its prompt); it is timed as prefill either way."""
        self.clock.switch("prefill")
        self.draft.prefill(self.rows)
        self.draft_prefilled = True

    def _remaining(self, b: int) -> int:
        return self.budget - (len(self.rows[b]) - self.prompt_lens[b])

    def _plan(self) -> tuple[str | None, int, list[list[int]], list[list[int]]]:
        """This step's kind ("lookup": every active row has a lookup match of at least
        ``min_match`` tokens that is used (:class:`Hybrid`), or there is no draft model;
        "model": the draft model runs; None: no drafter), its draft length (the kind's
        controller's choice or the fixed length, cut to the rows' budgets), each row's
        lookup proposal at the lookup's longest length (``[]`` without prompt lookup or
        where the lookup is not used), and the matches not used (``[]`` elsewhere)."""
        gen, batch = self.gen, self.batch
        active = [b for b in range(batch) if not self.done[b]]
        looked = (self._checked(gen.lookup.propose(self.rows, gen.max_draft["lookup"]))
                  if gen.lookup is not None else [[] for _ in range(batch)])
        matched = [b for b in active if len(looked[b]) >= gen.min_match]
        unused = [[] for _ in range(batch)]
        if self.draft is not None and matched and not self._lookup_pays(looked, matched):
            unused = [looked[b] if b in matched else [] for b in range(batch)]
            looked, matched = [[] for _ in range(batch)], []
        if self.draft is not None and len(matched) < len(active):
            kind = "model"
        else:
            kind = "lookup" if gen.lookup is not None else None
        if kind is None:
            length = 0
        elif kind in self.controllers:
            length = self.controllers[kind].choose()
        else:
            length = gen.num_draft_tokens or 0
        # drafting past every active row's budget only wastes work
        room = max(self._remaining(b) for b in active) - 1
        return kind, max(0, min(length, room)), looked, unused

    def _checked(self, proposals) -> list[list[int]]:
        """A proposer's output (:class:`Proposer`) as lists of ints, or a ValueError that says
        what is wrong with it: a row per batch row, ids in the target's vocabulary (a
        custom proposer's bad id would otherwise fail deep in the target's embedding)."""
        vocab = self.gen.target.vocab_size
        name = type(self.gen.lookup).__name__
        if not isinstance(proposals, (list, tuple)) or len(proposals) != self.batch:
            raise ValueError(f"{name}.propose must return one list of tokens per row "
                             f"({self.batch}), got {proposals!r:.200}")
        if type(self.gen.lookup) is PromptLookup:   # copies of the rows' own tokens
            return proposals
        checked = []
        for b, proposal in enumerate(proposals):
            ints = isinstance(proposal, (list, tuple)) and all(
                hasattr(t, "__index__") and not isinstance(t, bool) for t in proposal)
            if not ints or any(not 0 <= int(t) < vocab for t in proposal):
                raise ValueError(f"{name}.propose gave row {b} tokens that are not ids in "
                                 f"0..{vocab - 1}: {proposal!r:.200}")
            checked.append([int(t) for t in proposal])
        return checked

    def _lookup_pays(self, looked: list[list[int]], matched: list[int]) -> bool:
        """A :class:`Hybrid`'s choice (its docstring): whether this step uses the lookup's
        matches, by expected tokens per second of each drafter's best length, or a probe."""
        gen = self.gen
        if not gen.compare_drafters or not {"lookup", "model"} <= self.controllers.keys():
            return True
        longest = max(len(looked[b]) for b in matched)
        lookup_rate = self.controllers["lookup"].best(longest)[1]
        model_rate = self.controllers["model"].best()[1]
        lookup_better = lookup_rate >= model_rate
        if not self.draft_prefilled and 0 < lookup_rate < model_rate:
            # the draft model's first step pays its prefill first: compare the time to the
            # end of the longest row, that prefill included
            left = max(self._remaining(b) for b in range(self.batch) if not self.done[b])
            lookup_better = left / lookup_rate <= self._draft_prefill_guess() + left / model_rate
        return gen.lookup_prober.due(not lookup_better) or lookup_better

    def _draft_prefill_guess(self) -> float:
        """Seconds the draft model's prefill will take: the target's (host-timed) scaled by
        the draft's cost per token against the target's one-token forward. With the bundled
        pair on the 2-core CPU that decode ratio (about 0.23) overestimates the prefills'
        (0.16: 0.41 against 2.62 s for a 172-token prompt, measured 2026-11-27), which errs
        towards the lookup; on a GPU the host time is the prefill's launches, and the guess
        is small."""
        cost = self.controllers["model"].cost
        return self.prefill_seconds * cost.draft_step_seconds / cost.verify(1)

    def _setup_controller(self) -> None:
        """Cost models from a short warm-up at the generator's first call with this batch size
        (the target's forward for a few token counts up to ``max_draft + 1``, one draft
        step), refined online from every step's timing; the controllers themselves persist
        on the generator, acceptance estimates included, and take this batch size's cost
        models. Lookup steps share the target's verify costs and draft at no model cost."""
        gen = self.gen
        costs = gen.costs.get(self.batch)
        if costs is None:
            self.clock.switch("warmup")
            verify = self._measure_verify(gen.max_draft_tokens + 1)
            costs = {}
            if self.draft is not None:
                # the per-token cost the online fit starts from (CostModel.learn_draft): a
                # cheap forward, so the least of three calls on the CPU too; through the
                # step the chain runs (graphed and compiled when those are on)
                draft_cost = self._time_warm(self.draft.time_one_token, cpu_calls=3)
                costs["model"] = CostModel(verify_seconds=verify, draft_step_seconds=draft_cost)
            if gen.lookup is not None:
                costs["lookup"] = CostModel(verify_seconds=verify, draft_step_seconds=0.0)
            gen.costs[self.batch] = costs
            self.clock.switch("overhead")
        if not gen.controllers:
            gen.controllers = {kind: DraftLengthController(costs[kind], most)
                               for kind, most in gen.max_draft.items()}
        for kind, control in gen.controllers.items():
            control.set_cost(costs[kind])
        gen.cost = costs.get("model", costs.get("lookup"))
        self.controllers = gen.controllers

    tree_controller: TreeSizeController | None = None

    def _setup_tree_controller(self) -> None:
        """As :meth:`_setup_controller`, for adaptive trees: the target's forward for 1, 2 and
        ``num_nodes`` tokens and one tree growth, measured once per batch size. The growth
        caches each root in the draft; it is rewound to where prefill left it, so that the
        first step feeds the root again (a step must feed at least one token)."""
        gen, tree = self.gen, self.gen.tree
        costs = gen.costs.get(self.batch)
        if costs is None:
            self.clock.switch("warmup")
            verify = self._measure_verify(tree.num_nodes)

            def grow():
                self.draft.grow_tree(self.rows, tree.depth, tree.top_k, tree.num_nodes)
                self.draft.rewind([len(r) - 1 for r in self.rows])
            growth = self._time_warm(grow)
            costs = gen.costs[self.batch] = {"tree": CostModel(
                verify_seconds=verify, draft_step_seconds=0.0, draft_fixed_seconds=growth)}
            self.clock.switch("overhead")
        cost = gen.cost = costs["tree"]
        if gen.tree_controller is None:
            gen.tree_controller = TreeSizeController(cost, cost.draft_fixed_seconds,
                                                     tree.num_nodes)
        gen.tree_controller.cost = cost                 # its growth cost comes with it
        self.tree_controller = gen.tree_controller

    def _measure_verify(self, largest: int) -> dict[int, float]:
        """A chain step (the target's forward and the verify op) for 1, 2, 9, 17, 33, ...
        (below ``largest``) and ``largest`` tokens per row, in seconds: fp32 CPU matmuls
        jump from 1 row to 2, then grow slowly while the kernel streams the weight, faster
        once a GEMM takes over (past ``specops.linear_ops.MAX_ROWS`` rows, all batch rows
        together), so a long range is not one straight line.

        Scoring more tokens per row never costs less, so a reading above that of a larger
        size is noise (a timer only ever adds): that size is timed once more and keeps the
        lesser reading. One high reading would otherwise price the draft lengths around it
        out until a probe re-measures them (every ``probe_every`` plain steps)."""
        sizes = {1, 2, largest} | {2 ** k + 1 for k in range(3, largest.bit_length())
                                   if 2 ** k + 1 < largest}

        def measure(n: int) -> float:
            return self._time_warm(lambda: self._chain_step_dummy(n))
        seconds = {n: measure(n) for n in sorted(sizes)}
        cheapest_above = float("inf")
        for n in sorted(sizes, reverse=True):
            if seconds[n] > cheapest_above:
                seconds[n] = min(seconds[n], measure(n))
            cheapest_above = min(cheapest_above, seconds[n])
        return seconds

    def _time_warm(self, fn, cpu_calls: int = 1) -> float:
        """Seconds of ``fn()``: on a GPU the faster of two calls (the first compiles
        kernels, or captures a graph); on a CPU the fastest of ``cpu_calls`` (by default one:
        a target forward costs up to a second there, and every step refines the estimate
        afterwards), one more with ``compile`` (the first call compiles)."""
        calls = cpu_calls if self.device.type == "cpu" else 2
        if self.device.type == "cpu" and self.gen.compile:
            calls += 1      # a size's first compiled call compiles: seconds, not its cost
        return min(self._time(fn) for _ in range(calls))

    def _chain_step_dummy(self, n: int) -> None:
        # The chain step the loop runs, host inputs to result read back, on n - 1 zero drafts
        # per row: it writes junk past each row's root (never attended, overwritten by the
        # next step). With graphs its first call of a size captures and _time_warm times the
        # replay (an eager forward on a GPU costs its kernel launches, several times a replay:
        # on the 2026-11-27 H200 run a one-token forward took 39-60 ms eager, a whole plain
        # decoding step 6.2 ms with graphs). The verify op, in the same graph, is paid by
        # every step, so the costs include it, as the steps' own timings (_learn_cost) do.
        inputs = self._chain_inputs([n - 1] * self.batch, [[0] * (n - 1)] * self.batch)
        self.chain_step(inputs[:, :4], inputs[:, 4:]).tolist()

    def _time(self, fn) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    # ------------------------------------------------------------------------- chain step
    def _propose(self, kind: str | None, num_draft: int, looked: list[list[int]]
                 ) -> tuple[Tensor | None, Tensor | None, list[int], list[bool]]:
        """Draft tokens ``(B, num_draft)`` on the device, their probabilities (None:
        deterministic), each row's draft length, and which rows took the draft model's tokens.
        When the draft model does not run the tokens are None: the lookup's (each row's
        first ``draft length`` tokens of ``looked``) go to the device with the step's other
        inputs. ``kind`` and ``looked`` as :meth:`_plan` returns them."""
        gen, batch = self.gen, self.batch
        looked = [proposal[:num_draft] for proposal in looked]
        use_model = [kind == "model" and num_draft > 0 and not self.done[b]
                     and len(looked[b]) < gen.min_match for b in range(batch)]
        # a row drafts at most one token fewer than its own budget has left, so that the
        # token ending its budget is the step's sampled one, as when the row runs alone: its
        # tokens do not depend on how far the batch's other rows are (batch invariance at a
        # fixed draft length; num_draft is already cut to the furthest row's budget)
        room = [0 if self.done[b] else self._remaining(b) - 1 for b in range(batch)]
        lens = [min(num_draft if use_model[b] else len(looked[b]), room[b])
                for b in range(batch)]
        if not any(use_model):
            return None, None, lens, use_model
        # rows that use their lookup tokens take them in place of the model's, as point
        # masses (deterministic drafts); they go to the device with the draft's inputs
        forced = [[] if used else proposal for used, proposal in zip(use_model, looked)]
        tokens, probs = self.draft.draft_chain(self.rows, num_draft, self.row_seeds, forced)
        return tokens, probs, lens, use_model

    def _chain_step(self, plain: bool = False) -> list[list[int]]:
        """One chain step (``plain``: a plain decoding step, nothing drafted)."""
        self.clock.switch("draft")
        started = time.perf_counter()
        kind, num_draft, looked, unused = ((None, 0, [[]] * self.batch, [[]] * self.batch)
                                           if plain else self._plan())
        if kind == "model" and num_draft > 0 and not self.draft_prefilled:
            self._prefill_draft()
            self.clock.switch("draft")
            started = time.perf_counter()
        steady = self._draft_behind() <= 2
        drafts, probs, draft_lens, use_model = self._propose(kind, num_draft, looked)
        drafted = time.perf_counter()
        self.clock.switch("verify")
        if drafts is None:                  # only lookup tokens (or none): verify what exists
            num_draft = max(draft_lens)
            inputs = self._chain_inputs(draft_lens, [p[:n] for p, n in zip(looked, draft_lens)])
            inputs, drafts = inputs[:, :4], inputs[:, 4:]
        else:
            inputs = self._chain_inputs(draft_lens)
        step_inputs = (inputs, drafts) if probs is None else (inputs, drafts, probs)
        result = self.chain_step(*step_inputs).tolist()  # the step's one read back to the host
        accepted = [r[-1] for r in result]
        self._learn_cost(self._step_cost(kind), num_draft,
                         drafted - started if steady else None, time.perf_counter() - drafted)
        if any(use_model):
            # the draft cache holds the root and its own first num_draft - 1 drafts: the
            # accepted ones stay; rows that verified lookup tokens keep only the root
            self.draft.cached = [n + (min(a, num_draft - 1) if used else 0) for n, a, used
                                 in zip(self.root_lens, accepted, use_model)]
        emitted = [r[:a + 1] for r, a in zip(result, accepted)]
        self._record(num_draft, draft_lens, accepted, kind, use_model)
        self._learn_unused_lookup(unused, emitted)
        return emitted

    def _learn_unused_lookup(self, unused: list[list[int]], emitted: list[list[int]]) -> None:
        """A :class:`Hybrid`'s lookup learns from the matches it did not use: how far each
        agrees with the tokens the step emitted is how far it would have been accepted,
        observed up to the emitted length (greedy: exactly; sampling: each agreement has
        the target's probability of the proposed token, the acceptance probability of a
        deterministic draft). Without this, a lookup that lost the comparison once would
        keep its low estimates until a probe, even where the text starts copying its
        prompt."""
        control = self.controllers.get("lookup")
        if control is None:
            return
        by_length: dict[int, list[int]] = {}       # observed length -> agreements
        for b, proposal in enumerate(unused):
            observed = min(len(proposal), len(emitted[b]))
            if observed and not self.done[b]:
                agree = 0
                while agree < observed and proposal[agree] == emitted[b][agree]:
                    agree += 1
                by_length.setdefault(observed, []).append(agree)
        for observed, agreements in by_length.items():
            control.update(observed, agreements)

    def _learn_cost(self, cost: CostModel | None, num_draft: int, draft_seconds: float | None,
                    verify_seconds: float) -> None:
        """Refines ``cost`` (a controller's cost model; None: no controller) from one step's
        timing: its verify cost at ``num_draft + 1`` tokens per row and, unless
        ``draft_seconds`` is None (tree steps learn their growth apart), its drafting cost
        (:meth:`CostModel.learn_verify`, :meth:`CostModel.learn_draft`). Only on the CPU,
        where reading the clock needs no device synchronisation; on a GPU the warm-up
        measurement stands."""
        if cost is None or self.device.type != "cpu":
            return
        cost.learn_verify(num_draft + 1, verify_seconds)
        if num_draft > 0 and draft_seconds is not None:
            cost.learn_draft(num_draft, draft_seconds)

    def _draft_behind(self) -> int:
        """The most tokens an active row's draft cache lacks (the root included): the length
        of the catch-up forward that starts the next drafting step, 0 without a draft model.
        In steady drafting it is at most 2 for a chain (the last draft and the bonus token)
        and ``depth + 1`` for a tree (the accepted path and the bonus token); after plain or
        prompt-lookup steps it is longer. Such a step's drafting time is not learnt: the
        controllers' cost models are per step of steady drafting, and charging every step
        the one-off catch-up would keep the controller decoding plainly, which makes the next
        catch-up longer still."""
        if self.draft is None or not self.draft_prefilled:
            return 0
        return max((len(self.rows[b]) - self.draft.cached[b] for b in range(self.batch)
                    if not self.done[b]), default=0)

    def _step_cost(self, kind: str | None) -> CostModel | None:
        """The cost model a chain step of ``kind`` refines: its kind's controller's; for a
        plain step of an adaptive tree (kind None), the tree controller's, whose plain-decoding
        rate rests on ``verify(1)``."""
        if kind in self.controllers:
            return self.controllers[kind].cost
        return self.tree_controller.cost if self.tree_controller is not None else None

    def _learn_growth(self, seconds: float) -> None:
        """Refines the tree controller's growth cost (moving average), on the CPU only, as
        :meth:`_learn_cost`."""
        if self.device.type == "cpu":
            control = self.tree_controller
            control.growth_seconds = 0.8 * control.growth_seconds + 0.2 * seconds

    def _record(self, num_draft: int, draft_lens: list[int], accepted: list[int],
                kind: str | None = None, use_model: list[bool] | None = None) -> None:
        """Statistics of one step, and the acceptance of the kind's controller from its rows
        that drafted the full length (of a draft-model step, only rows that took the draft
        model's tokens: ``use_model``)."""
        active = [b for b in range(self.batch) if not self.done[b]]
        stats = self.stats
        stats.steps += 1
        stats.draft_lengths[num_draft] += 1
        stats.step_kinds[kind if num_draft and kind else "plain"] += 1
        stats.record_acceptance([draft_lens[b] for b in active], [accepted[b] for b in active])
        control = self.controllers.get(kind)
        if control is not None:
            full = [accepted[b] for b in active if draft_lens[b] == num_draft
                    and (kind != "model" or use_model is None or use_model[b])]
            if num_draft > 0 and full:
                control.update(num_draft, full)

    # ------------------------------------------------------------------------- tree step
    def _tree_step(self) -> list[list[int]]:
        """One tree step. With graphs the drafting phase is one copy to the device and one
        graph replay (the catch-up and the whole growth), plus, for an adaptive tree, one
        read of the scores to size it; the verify phase one copy, one replay (mask, forward,
        verify, commit) and one read."""
        tree, control = self.gen.tree, self.tree_controller
        if control is not None and not control.use_tree():
            return self._chain_step(plain=True)                      # plain decoding pays more now
        self.clock.switch("draft")
        started = time.perf_counter()
        steady = self._draft_behind() <= tree.depth + 1
        draft_probs = None
        if isinstance(tree, StaticTree):
            tree_tokens, parents, draft_probs = self.draft.static_tree(
                self.rows, tree.branching, self.row_seeds)
        else:
            tree_tokens, parents, scores = self.draft.grow_tree(self.rows, tree.depth,
                                                                tree.top_k, tree.num_nodes)
        if control is not None:
            if steady:
                self._learn_growth(time.perf_counter() - started)
            active = [b for b in range(self.batch) if not self.done[b]]
            probs = scores[:, 1:].exp().sort(dim=1, descending=True).values[active]
            probs = probs.numpy(force=True)                         # the draft phase's read
            size = control.choose_size(probs)
            predicted = float(probs[:, :size].sum())
            if size + 1 < tree.num_nodes:
                tree_tokens, parents, _ = keep_best_nodes(tree_tokens, parents, scores, size + 1)
        self.clock.switch("verify")
        verify_started = time.perf_counter()
        inputs = rows_to_device([[n - 1, seed] for n, seed in zip(self.root_lens,
                                                                  self.row_seeds)], self.device)
        step_inputs = (inputs, tree_tokens, parents)
        if draft_probs is not None:
            step_inputs += (draft_probs,)
        result = self.tree_verify_step(*step_inputs).tolist()   # the step's one read back
        accepted = [r[-2] for r in result]
        if control is not None:
            control.update(predicted, float(sum(accepted[b] for b in active)))
            self._learn_cost(control.cost, tree_tokens.shape[1] - 1, None,
                             time.perf_counter() - verify_started)
        # each row's tree depth is the most it could accept: a grown tree keeps its best
        # nodes, which may not reach tree.depth (a flat draft distribution grows wide), and a
        # pruned one may be shallower still
        depths = [r[-1] for r in result]
        self._record(max(depths), depths, accepted, "tree")
        return [r[:a + 1] for r, a in zip(result, accepted)]

    # ------------------------------------------------------------------------- output
    def _emit(self, emitted: list[list[int]]) -> list[list[int]]:
        gen, stats = self.gen, self.stats
        new_per_row: list[list[int]] = [[] for _ in range(self.batch)]
        for b, tokens in enumerate(emitted):
            if self.done[b]:
                continue
            stats.row_steps += 1
            stats.emitted += len(tokens)
            for token in tokens:
                self.rows[b].append(token)
                new_per_row[b].append(token)
                if token in gen.eos or self._remaining(b) <= 0 or self._stopped(b):
                    self.done[b] = True
                    break
            stats.new_tokens += len(new_per_row[b])
        if self.streamer is not None:
            self.streamer(new_per_row)
        return new_per_row

    def _stopped(self, b: int) -> bool:
        if not self.gen.stop_strings:
            return False
        new = self.rows[b][self.prompt_lens[b]:]
        # a stop string of n UTF-8 bytes spans at most n tokens (a byte-level token holds at
        # least one byte; a character outside a tokenizer's merges takes one token per
        # byte, up to 4), plus one partial token on each side
        longest = max(len(s.encode("utf-8")) for s in self.gen.stop_strings)
        text = self.gen.tokenizer.decode(new[-(longest + 2):])
        return any(s in text for s in self.gen.stop_strings)

    def output(self, input_ids: Tensor) -> GenerationOutput:
        self._times()
        new = [r[p:] for r, p in zip(self.rows, self.prompt_lens)]
        width = max(len(n) for n in new)
        tail = torch.full((self.batch, width), self.gen.pad_token_id, dtype=torch.int64)
        for b, n in enumerate(new):
            tail[b, :len(n)] = torch.tensor(n, dtype=torch.int64)
        sequences = torch.cat([input_ids.long().cpu(), tail], 1).to(input_ids.device)
        return GenerationOutput(sequences, [len(n) for n in new], self.stats)


def generate(target: torch.nn.Module, input_ids: Tensor, *, draft=None,
             attention_mask: Tensor | None = None, max_new_tokens: int,
             num_draft_tokens: int | None = None, tree: DynamicTree | StaticTree | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_token_id: int | Sequence[int] | None = None,
             stop_strings: str | Sequence[str] | None = None, tokenizer=None,
             pad_token_id: int | None = None,
             streamer: Callable[[list[list[int]]], None] | None = None,
             max_draft_tokens: int | None = None, cuda_graphs: bool | None = None,
             compile: bool = False, **unsupported) -> GenerationOutput:
    """Speculative generation: the target's output distribution, faster.

    Args:
        target: a transformers causal LM (see :class:`SpeculativeGenerator`).
        input_ids: Shape ``(batch_size, prompt_len)``, int64; with ``attention_mask``
            (same shape, 1 = token) rows may be left or right padded.
        draft: None (plain decoding), a draft model sharing the target's tokenizer,
            :class:`PromptLookup` or :class:`Hybrid`.
        max_new_tokens: most new tokens per row.
        num_draft_tokens: fixed draft length, or None for the cost-aware controller.
        max_draft_tokens: the controller's longest draft (see :class:`SpeculativeGenerator`).
        tree: a :class:`DynamicTree` or :class:`StaticTree` for tree drafting.
        temperature, top_k, top_p, seed: sampling (``temperature=0``: greedy). Row ``b``
            uses seed ``seed + b``.
        eos_token_id, stop_strings, tokenizer: where rows end.
        pad_token_id: fills ``sequences`` after a row's end (default: the target's config's,
            else the smallest EOS id, else 0).
        streamer: called after every step with each row's new tokens (``list[list[int]]``);
            or, for batch 1, a Hugging Face streamer (``put``/``end``, e.g.
            ``transformers.TextStreamer``), fed the prompt, then each step's tokens, as
            Hugging Face's ``generate`` feeds it.
        cuda_graphs: see :class:`SpeculativeGenerator` (None: on for CUDA; HPU through
            ``habana_frameworks`` when True, untested on hardware; ignored on CPU).
        compile: see :class:`SpeculativeGenerator`. Each call builds a new generator, so
            its steps may compile again: reuse a :class:`SpeculativeGenerator`.

    Returns:
        :class:`GenerationOutput`. Options of Hugging Face's ``generate`` that this loop
        does not implement raise ``TypeError`` rather than being ignored. Bad input is
        refused before any work; an error raised once steps have run (a custom drafter's,
        ``KeyboardInterrupt``) carries the tokens emitted until then as its
        ``partial_output`` (a :class:`GenerationOutput`).

    Each call builds a new :class:`SpeculativeGenerator`: acceptance estimates start afresh,
    and device graphs and compiled steps are made again (a reused generator keeps them). The
    cost-aware draft length's warm-up measurement is made once: later calls with the same
    target, the same draft model object (or a proposer of the same class) and the same
    options that change a step's cost (draft lengths, tree, sampling, graphs, compile,
    devices, dtypes, torch's thread count) reuse those cost models and keep refining them.
    They are held with a weak reference to ``target`` and go with it.
    """
    _refuse(unsupported)
    generator = SpeculativeGenerator(
        target, draft, num_draft_tokens=num_draft_tokens, max_draft_tokens=max_draft_tokens,
        tree=tree, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        eos_token_id=eos_token_id, stop_strings=stop_strings, tokenizer=tokenizer,
        pad_token_id=pad_token_id, cuda_graphs=cuda_graphs, compile=compile)
    generator.costs = _kept_costs(target, draft, generator)
    return generator.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens,
                              streamer=streamer)


# The cost models that specops.generate measured, per target (held weakly: they go with it),
# then per drafter and the options that change what a step costs: later calls skip the
# warm-up measurement (on the 2-core CPU, Qwen2.5-Coder-1.5B float32, a HumanEval prompt, 96
# new tokens: 2.0-2.2 s a call with prompt lookup, 0.8-1.0 s with the 0.5B bf16 draft model,
# against 6.2 and 10.3-10.6 s for the generation itself; bench/warmup_cpu.py, BENCHMARKS.md).
_KEPT_COSTS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def _kept_costs(target, draft, gen: SpeculativeGenerator) -> dict[int, dict[str, CostModel]]:
    """``gen.costs`` for :func:`generate`: the dict that an earlier call with the same target,
    drafter (the same draft model object; any proposer of the same class) and cost-relevant
    options filled, else a new one kept for the next such call. Only the measured costs
    carry over (and the online refinements of them): each call's controllers start with fresh
    acceptance estimates, as a new :class:`SpeculativeGenerator`'s do."""
    model = draft.draft_model if isinstance(draft, Hybrid) else draft
    model = model if isinstance(model, torch.nn.Module) else None
    key = (id(model), type(gen.lookup).__name__, tuple(sorted(gen.max_draft.items())),
           repr(gen.tree), gen._sampling(), gen.compile, gen.cuda_graphs,
           str(gen.target.device), gen.target.dtype, torch.get_num_threads(),
           None if gen.draft is None else (str(gen.draft.device), gen.draft.dtype))
    try:
        per_target = _KEPT_COSTS.setdefault(target, {})
    except TypeError:                   # a target that takes no weak reference: not kept
        return {}
    kept = per_target.get(key)
    if kept is None or kept[0]() is not model:   # a freed draft's id may come back
        kept = per_target[key] = ((weakref.ref(model) if model is not None else lambda: None),
                                  {})
    return kept[1]


# keep fit_vocab importable from here for engines that draft themselves
__all__ = ["generate", "SpeculativeGenerator", "GenerationOutput", "DynamicTree", "StaticTree",
           "Hybrid",
           "PromptLookup", "Proposer", "fit_vocab"]
