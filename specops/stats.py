"""What a generation run reports: acceptance, emitted tokens per step, chosen draft lengths and
where the time went. Collected on the host from values the loop already reads back each step,
so gathering them adds no device synchronisation."""

import time
from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class GenerationStats:
    """Statistics of one ``generate`` call.

    Words: a *step* is one draft-verify-accept round; a row *emits* its accepted draft tokens
    plus one token drawn by the target (the bonus or recovered token) per step;
    ``acceptance_per_position[i]`` is the share of drafts at position ``i + 1`` that were
    accepted among rows whose drafts reached that position (every earlier one accepted).
    For a tree, a row's draft length is its tree's depth in that step (the depth of its
    deepest node, which a grown or pruned tree may keep short of the nominal depth), and
    ``draft_lengths`` counts steps by their deepest row's.
    """

    steps: int = 0
    new_tokens: int = 0                      # emitted tokens kept, all rows
    emitted: int = 0                         # emitted tokens of active rows, before truncation
    row_steps: int = 0                       # (row, step) pairs with the row still active
    draft_lengths: Counter = field(default_factory=Counter)
    # steps per drafter: "model" (the draft model ran; with a Hybrid, rows may have taken
    # lookup tokens), "lookup", "tree", "plain" (nothing drafted)
    step_kinds: Counter = field(default_factory=Counter)
    tried: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    overhead_seconds: float = 0.0
    # the cost-aware controller's warm-up measurement (target forwards of a few sizes, a
    # draft step), made at a generator's first call with a batch size: 0 at later calls
    warmup_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def mean_emitted_per_step(self) -> float:
        """Mean tokens emitted per row and step (tau); 1.0 for plain decoding."""
        return self.emitted / self.row_steps if self.row_steps else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        # positions no row reached (tried 0) are left out: they would read as 0% acceptance
        return [a / t for a, t in zip(self.accepted, self.tried) if t]

    @property
    def tokens_per_second(self) -> float:
        """New tokens of all rows per second of the whole call (prefill included)."""
        return self.new_tokens / self.total_seconds if self.total_seconds else 0.0

    def record_acceptance(self, draft_lens: list[int], num_accepted: list[int]) -> None:
        for length, accepted in zip(draft_lens, num_accepted):
            if len(self.tried) < length:
                grow = length - len(self.tried)
                self.tried += [0] * grow
                self.accepted += [0] * grow
            for i in range(min(accepted + 1, length)):
                self.tried[i] += 1
                self.accepted[i] += int(i < accepted)

    def as_dict(self) -> dict:
        """A JSON-able dict of every statistic."""
        return dict(steps=self.steps, new_tokens=self.new_tokens,
                    tokens_per_second=self.tokens_per_second,
                    mean_emitted_per_step=self.mean_emitted_per_step,
                    acceptance_per_position=self.acceptance_per_position,
                    draft_lengths={int(k): v for k, v in sorted(self.draft_lengths.items())},
                    step_kinds=dict(sorted(self.step_kinds.items())),
                    prefill_seconds=self.prefill_seconds, draft_seconds=self.draft_seconds,
                    verify_seconds=self.verify_seconds, overhead_seconds=self.overhead_seconds,
                    warmup_seconds=self.warmup_seconds, total_seconds=self.total_seconds)

    def summary(self) -> str:
        """One line of text."""
        acceptance = " ".join(f"{a:.2f}" for a in self.acceptance_per_position) or "-"
        lengths = " ".join(f"{k}:{v}" for k, v in sorted(self.draft_lengths.items()))
        total = self.total_seconds or 1.0
        return (f"{self.new_tokens} tokens in {self.total_seconds:.2f} s "
                f"({self.tokens_per_second:.2f} tok/s), {self.steps} steps, "
                f"{self.mean_emitted_per_step:.2f} tokens/step, acceptance by position "
                f"[{acceptance}], draft lengths {{{lengths}}}, time: prefill "
                f"{self.prefill_seconds / total:.0%} draft {self.draft_seconds / total:.0%} "
                f"verify {self.verify_seconds / total:.0%} other "
                f"{self.overhead_seconds / total:.0%} warm-up {self.warmup_seconds / total:.0%}")


class PhaseClock:
    """Wall time per phase. On CUDA the phases are timed with events read once at the end, so
    timing adds no synchronisation inside the loop; on the CPU with ``perf_counter``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, object, object]] = []
        self._phase: str | None = None
        self._start: object = None

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def switch(self, phase: str | None) -> None:
        """Ends the current phase and starts ``phase`` (None: stop)."""
        now = self._now()
        if self._phase is not None:
            self.spans.append((self._phase, self._start, now))
        self._phase, self._start = phase, now

    def totals(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for phase, start, end in self.spans:
            seconds = (start.elapsed_time(end) / 1e3 if self.cuda else end - start)
            out[phase] = out.get(phase, 0.0) + seconds
        return out
