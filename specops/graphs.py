"""Device-graph capture of the loop's fixed-shape steps: one graph per input shape (per draft
length, per tree size), captured on first use and replayed after, switching between them
without recapture.

The captured function must be sync-free with static shapes, as specops' forward
(:mod:`specops.models`) and ops are; tensors it closes over (the model's weights, the KV
cache) must stay alive and in place, which the loop guarantees for the length of one
``generate`` call. The output tensors are the graph's own: they are overwritten by the next
replay of the same graph, so the caller consumes them first. The specops value checks
(:func:`specops.set_checks`) are off while a graph captures, since they read values on the
host; the eager warm-up calls before it are checked.

Backends (:func:`graph_backend` picks one from the device; other devices, the CPU among
them, get no graphs):

- ``"cuda"``: ``torch.cuda.CUDAGraph``. Tested only where a CUDA GPU is present
  (``tests/test_graphs.py`` skips elsewhere; it passed on an H200, 2026-11-27). The loop
  uses them by default for a target on CUDA (``cuda_graphs=None``; ``False`` turns them
  off): on that H200 they made plain decoding 6.6x faster than eager, though specops'
  unfused forward replayed from graphs was still slower than Hugging Face's compiled one
  (BENCHMARKS.md, "GPU"). The loop's side of it (a capture per shape, static inputs,
  replays, the switching between draft lengths) runs on every machine against a stand-in
  backend that traces each step once and replays the trace (``tests/test_graphs_traced.py``).
- ``"hpu"``: Intel Gaudi's ``HPUGraph`` from ``habana_frameworks.torch``, imported only when
  an HPU step is built. A thin adapter that has **never run on Gaudi hardware**: it follows
  the vendor's documented capture/replay pattern and is exercised only against a stand-in
  module (``tests/test_graphs_hpu.py``).
"""

import importlib
from collections.abc import Callable

import torch
from torch import Tensor

from . import _checks


def graph_backend(device: torch.device | str) -> str | None:
    """The graph backend for ``device``: ``"cuda"``, ``"hpu"``, or None (no graphs: CPU and
    every other device). Says nothing of whether the HPU package imports; building a
    :class:`GraphedStep` for HPU checks that."""
    kind = torch.device(device).type
    return kind if kind in _BACKENDS else None


def rows_to_device(host: list[list[int]], device: torch.device) -> Tensor:
    """Rows of host integers (a graphed step's small inputs) as one int64 tensor on
    ``device``: one copy, from pinned memory on CUDA, so that it does not wait for the
    device."""
    pinned = torch.tensor(host, dtype=torch.int64, pin_memory=device.type == "cuda")
    return pinned.to(device, non_blocking=True)


class _CudaGraph:
    """A captured ``torch.cuda.CUDAGraph``, replayed with its own device current: a model on
    ``cuda:1`` while ``cuda:0`` is current would otherwise launch onto the wrong device's
    stream."""

    def __init__(self, graph: torch.cuda.CUDAGraph, device: torch.device):
        self.graph, self.device = graph, device

    def replay(self) -> None:
        with torch.cuda.device(self.device):
            self.graph.replay()


class _CudaGraphs:
    """Capture with ``torch.cuda.CUDAGraph``, on the device of the step's inputs."""

    def capture(self, fn: Callable[..., Tensor], static_inputs: list[Tensor],
                warmup: int) -> tuple[_CudaGraph, Tensor]:
        device = static_inputs[0].device
        # streams are per device: make the inputs' device current while creating them
        with torch.cuda.device(device):
            # warm-up on a side stream, as PyTorch's CUDA-graph notes ask: Triton compiles
            # and the caching allocator's first allocations stay out of the capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn(*static_inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # captured on that side stream (this device's), not torch.cuda.graph's shared
            # default, which is created once on whichever device was current at the time
            with torch.cuda.graph(graph, stream=side), _checks.graph_capture():
                static_output = fn(*static_inputs)
        return _CudaGraph(graph, device), static_output


class _HpuGraphs:
    """Capture with Intel Gaudi's ``ht.hpu.HPUGraph`` (``import habana_frameworks.torch as
    ht``), whose API mirrors CUDA's. Relied on, from "Run Inference Using HPU Graphs"
    (https://docs.habana.ai/en/latest/PyTorch/Inference_on_PyTorch/Inference_Using_HPU_Graphs.html):
    ``ht.hpu.HPUGraph()``, ``ht.hpu.Stream()``, capture between ``graph.capture_begin()`` and
    ``graph.capture_end()`` inside ``with ht.hpu.stream(stream)``, then ``graph.replay()``;
    static shapes and device-side inputs; no ``mark_step`` needed around graphs. Untested on
    hardware.
    """

    def __init__(self):
        try:
            self.ht = importlib.import_module("habana_frameworks.torch")
        except ImportError as err:
            raise ImportError(
                "HPU graphs need Intel Gaudi's habana_frameworks.torch package, which did not "
                f"import ({err}); install the Gaudi software stack or run without graphs "
                "(cuda_graphs=False)") from err

    def capture(self, fn: Callable[..., Tensor], static_inputs: list[Tensor],
                warmup: int) -> tuple[object, Tensor]:
        hpu = self.ht.hpu
        # warm-up on the current stream: the vendor's example has no side-stream warm-up,
        # and no HPU stream-synchronisation call is relied on that hardware never checked
        for _ in range(warmup):
            fn(*static_inputs)
        graph = hpu.HPUGraph()
        with hpu.stream(hpu.Stream()), _checks.graph_capture():
            graph.capture_begin()
            static_output = fn(*static_inputs)
            graph.capture_end()
        return graph, static_output


_BACKENDS = {"cuda": _CudaGraphs, "hpu": _HpuGraphs}


class GraphedStep:
    """``step(*tensors)`` through a device graph captured per shape and dtype of ``tensors``.

    Args:
        fn: ``fn(*tensors) -> Tensor`` or a tuple of tensors; every input that changes
            between calls must be one of ``tensors`` (they are copied into the graph's static
            inputs before a replay).
        warmup: eager calls before capture (Triton compiles, the caching allocator settles).
            They run ``fn`` on the real inputs, so ``fn``'s writes (KV cache slots) are the
            ones the replay then repeats.
        device: where ``fn`` runs; picks the backend (:func:`graph_backend`). A device with
            no backend is a ``ValueError``; an HPU device without ``habana_frameworks.torch``
            is an ``ImportError`` (never a silent eager fallback).
    """

    def __init__(self, fn: Callable[..., Tensor], warmup: int = 2,
                 device: torch.device | str = "cuda"):
        backend = graph_backend(device)
        if backend is None:
            raise ValueError(f"GraphedStep: no device graphs on {torch.device(device).type!r} "
                             "(CUDA and HPU only); call the function directly")
        self.fn = fn
        self.warmup = warmup
        self.backend = _BACKENDS[backend]()
        # per (shape, dtype) key: the graph, its static inputs and its output(s)
        self.graphs: dict[tuple, tuple[object, list[Tensor], Tensor | tuple[Tensor, ...]]] = {}

    def __call__(self, *tensors: Tensor) -> Tensor | tuple[Tensor, ...]:
        key = tuple((tuple(t.shape), t.dtype) for t in tensors)
        entry = self.graphs.get(key)
        if entry is None:
            static_inputs = [t.clone() for t in tensors]
            graph, static_output = self.backend.capture(self.fn, static_inputs, self.warmup)
            entry = self.graphs[key] = graph, static_inputs, static_output
        graph, static_inputs, static_output = entry
        for static, value in zip(static_inputs, tensors):
            static.copy_(value, non_blocking=True)
        graph.replay()
        return static_output
