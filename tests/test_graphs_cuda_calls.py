"""The CUDA graph backend's calls into ``torch.cuda``, on any machine.

A recording stand-in replaces the few ``torch.cuda`` names the backend uses; every call is
first bound against the real function's signature, so a misspelt or removed argument fails
here. The test checks the order that PyTorch's CUDA-graph notes ask for and that the backend
keeps to the device of the step's inputs: warm-up on a side stream of that device, capture on
that same stream (not ``torch.cuda.graph``'s shared default stream, created once on whichever
device was current), and each replay with that device current. Whether CUDA then captures
correctly is for ``test_graphs.py`` on a GPU.
"""

import inspect
import types

import torch

from specops import graphs

REAL = {name: getattr(torch.cuda, name) for name in
        ("device", "Stream", "current_stream", "stream", "CUDAGraph", "graph")}


def bind(name: str, *args, **kwargs) -> None:
    inspect.signature(REAL[name]).bind(*args, **kwargs)


class FakeCuda:
    """Records ``(event, current device, current stream)``; the current device starts at 0."""

    def __init__(self):
        self.events: list[tuple[str, int, str]] = []
        self.device_now, self.stream_now = 0, "default-0"
        self.streams = 0

    def log(self, event: str) -> None:
        self.events.append((event, self.device_now, self.stream_now))

    def install(self, monkeypatch) -> None:
        fake = self

        class Context:
            def __init__(self, enter, leave):
                self.enter, self.leave = enter, leave

            def __enter__(self):
                self.saved = self.enter()

            def __exit__(self, *exc):
                self.leave(self.saved)

        def device(index):
            bind("device", index)

            def enter():
                saved, fake.device_now = fake.device_now, torch.device(index).index
                return saved
            return Context(enter, lambda saved: setattr(fake, "device_now", saved))

        class Stream:
            def __init__(self, *args, **kwargs):
                bind("Stream", *args, **kwargs)
                self.name = f"side-{fake.device_now}-{fake.streams}"
                fake.streams += 1
                fake.log(f"new {self.name}")

            def wait_stream(self, other):
                inspect.signature(REAL["Stream"].wait_stream).bind(self, other)
                fake.log(f"{self.name} waits for {other.name}")

        def current_stream(*args, **kwargs):
            bind("current_stream", *args, **kwargs)
            return types.SimpleNamespace(name=fake.stream_now, wait_stream=lambda other: fake.log(
                f"{fake.stream_now} waits for {other.name}"))

        def stream(s):
            bind("stream", s)

            def enter():
                saved, fake.stream_now = fake.stream_now, s.name
                return saved
            return Context(enter, lambda saved: setattr(fake, "stream_now", saved))

        class CUDAGraph:
            def __init__(self, *args, **kwargs):
                bind("CUDAGraph", *args, **kwargs)

            def replay(self):
                fake.log("replay")

        def graph(cuda_graph, *args, **kwargs):
            bind("graph", cuda_graph, *args, **kwargs)
            capture = kwargs.get("stream")

            def enter():
                saved = fake.stream_now
                fake.stream_now = capture.name if capture is not None else "shared-capture"
                fake.log("capture begins")
                return saved

            def leave(saved):
                fake.log("capture ends")
                fake.stream_now = saved
            return Context(enter, leave)

        for name, value in dict(device=device, Stream=Stream, current_stream=current_stream,
                                stream=stream, CUDAGraph=CUDAGraph, graph=graph).items():
            monkeypatch.setattr(torch.cuda, name, value)


def test_capture_and_replay_keep_to_the_inputs_device(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    step_input = types.SimpleNamespace(device=torch.device("cuda", 1))

    def step(x):
        fake.log("step")
        return "output"
    graph, output = graphs._CudaGraphs().capture(step, [step_input], warmup=2)
    assert output == "output"
    assert fake.device_now == 0 and fake.stream_now == "default-0"   # restored afterwards
    graph.replay()
    assert fake.events == [
        ("new side-1-0", 1, "default-0"),                 # the side stream, on device 1
        ("side-1-0 waits for default-0", 1, "default-0"),
        ("step", 1, "side-1-0"), ("step", 1, "side-1-0"),  # warm-up on the side stream
        ("default-0 waits for side-1-0", 1, "default-0"),
        ("capture begins", 1, "side-1-0"),                # captured on that same stream
        ("step", 1, "side-1-0"),
        ("capture ends", 1, "side-1-0"),
        ("replay", 1, "default-0"),                       # replayed with device 1 current
    ]
