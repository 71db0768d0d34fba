"""CUDA-graph capture of the loop's fixed-shape steps: one graph per input shape (per draft
length, per tree size), captured on first use and replayed after, switching between them
without recapture.

The captured function must be sync-free with static shapes, as specops' forward
(:mod:`specops.models`) and ops are; tensors it closes over (the model's weights, the KV
cache) must stay alive and in place, which the loop guarantees for the length of one
``generate`` call. The output tensors are the graph's own: they are overwritten by the next
replay of the same graph, so the caller consumes them first.

Status: written for CUDA and tested only where a CUDA GPU is present (``tests/test_graphs.py``
skips elsewhere); no GPU was available while it was developed, so the loop leaves it off by
default (``SpeculativeGenerator(..., cuda_graphs=True)`` turns it on).
"""

from collections.abc import Callable

import torch
from torch import Tensor


class GraphedStep:
    """``step(*tensors)`` through a CUDA graph captured per shape and dtype of ``tensors``.

    Args:
        fn: ``fn(*tensors) -> Tensor``; every input that changes between calls must be one
            of ``tensors`` (they are copied into the graph's static inputs before a replay).
        warmup: eager calls on a side stream before capture (Triton compiles, the caching
            allocator settles). They run ``fn`` on the real inputs, so ``fn``'s writes (KV
            cache slots) are the ones the replay then repeats.
    """

    def __init__(self, fn: Callable[..., Tensor], warmup: int = 2):
        self.fn = fn
        self.warmup = warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor]] = {}

    def __call__(self, *tensors: Tensor) -> Tensor:
        key = tuple((tuple(t.shape), t.dtype) for t in tensors)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(tensors)
            self.graphs[key] = entry
        graph, static_inputs, static_output = entry
        for static, value in zip(static_inputs, tensors):
            static.copy_(value, non_blocking=True)
        graph.replay()
        return static_output

    def _capture(self, tensors: tuple[Tensor, ...]):
        static_inputs = [t.clone() for t in tensors]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.fn(*static_inputs)
        return graph, static_inputs, static_output
