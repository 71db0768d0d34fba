"""The HPU graph adapter of :mod:`specops.graphs`, against a stand-in ``habana_frameworks.torch``.

No Gaudi hardware (and no ``habana_frameworks`` package) is available, so these tests check
only what specops does with the vendor API: which calls it makes, in which order, and that
``GraphedStep`` captures once per shape, copies new inputs into the static ones and returns
the static output. All tensors are CPU tensors; the stand-in graph's replay re-runs the
recorded step on the static inputs and writes into the captured output, as a real replay
would.
"""

import sys
import types
from contextlib import contextmanager

import pytest
import torch

import specops
import specops.draft_model
import specops.loop
from specops.graphs import GraphedStep, graph_backend
from loop_models import noisy_copy, tiny_model


class FakeHpu:
    """Stand-in for ``habana_frameworks.torch.hpu``: ``HPUGraph``, ``Stream``, ``stream``.
    ``events`` logs every call in order."""

    def __init__(self):
        self.events: list[str] = []
        self.capturing = None     # the graph between capture_begin and capture_end
        fake = self

        class HPUGraph:
            def __init__(self):
                self.steps = []   # (fn, inputs, output) recorded during capture

            def capture_begin(self):
                fake.events.append("capture_begin")
                fake.capturing = self

            def capture_end(self):
                fake.events.append("capture_end")
                fake.capturing = None

            def replay(self):
                fake.events.append("replay")
                for fn, inputs, output in self.steps:
                    output.copy_(fn(*inputs))

        class Stream:
            pass

        @contextmanager
        def stream(s):
            assert isinstance(s, Stream)
            fake.events.append("stream_enter")
            yield
            fake.events.append("stream_exit")

        self.HPUGraph, self.Stream, self.stream = HPUGraph, Stream, stream

    def recorded(self, fn):
        """``fn`` logged on every call and, while a graph captures, recorded into it."""
        def step(*inputs):
            out = fn(*inputs)
            self.events.append("fn")
            if self.capturing is not None:
                self.capturing.steps.append((fn, inputs, out))
            return out
        return step


@pytest.fixture
def hpu(monkeypatch):
    fake = FakeHpu()
    module = types.ModuleType("habana_frameworks.torch")
    module.hpu = fake
    monkeypatch.setitem(sys.modules, "habana_frameworks", types.ModuleType("habana_frameworks"))
    monkeypatch.setitem(sys.modules, "habana_frameworks.torch", module)
    return fake


def test_graph_backend_by_device():
    assert graph_backend(torch.device("cpu")) is None
    assert graph_backend("meta") is None
    assert graph_backend(torch.device("cuda")) == "cuda"
    assert graph_backend("cuda:1") == "cuda"
    assert graph_backend(torch.device("hpu")) == "hpu"
    assert graph_backend("hpu:0") == "hpu"


def test_no_graphs_on_cpu():
    with pytest.raises(ValueError, match="cpu"):
        GraphedStep(lambda x: x, device="cpu")


def test_hpu_without_package_names_it(monkeypatch):
    # None in sys.modules makes the import fail even where the package is installed
    monkeypatch.setitem(sys.modules, "habana_frameworks.torch", None)
    with pytest.raises(ImportError, match="habana_frameworks"):
        GraphedStep(lambda x: x, device="hpu")


def test_hpu_import_is_lazy(hpu):
    GraphedStep(lambda x: x, device="hpu")
    assert hpu.events == []                       # building a step captures nothing


def test_hpu_capture_once_per_shape_then_replay(hpu):
    cache = torch.zeros(4)                        # closed over, like the KV cache

    def scale_add(x, y):
        cache.add_(1)                             # a write the replay must repeat
        return x * 2 + y

    step = GraphedStep(hpu.recorded(scale_add), warmup=2, device="hpu")
    x, y = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])
    out = step(x, y)
    # two warm-up calls on the current stream, then capture on an HPU stream, then replay
    assert hpu.events == ["fn", "fn", "stream_enter", "capture_begin", "fn", "capture_end",
                          "stream_exit", "replay"]
    assert out.tolist() == [12.0, 24.0, 36.0]
    assert cache.tolist() == [4.0] * 4            # 2 warm-ups + capture + replay

    hpu.events.clear()
    x2, y2 = torch.tensor([5.0, 6.0, 7.0]), torch.tensor([1.0, 1.0, 1.0])
    out2 = step(x2, y2)
    assert hpu.events == ["replay"]               # same shape: no second capture
    assert out2 is out                            # the graph's own output tensor
    assert out2.tolist() == [11.0, 13.0, 15.0]
    assert cache.tolist() == [5.0] * 4

    # the new inputs were copied into the static inputs, which are not the callers' tensors
    (_, static_inputs, _), = step.graphs.values()
    assert static_inputs[0].tolist() == x2.tolist() and static_inputs[0] is not x2
    x2.fill_(100.0)                               # the caller's tensor is free after the call
    assert static_inputs[0].tolist() == [5.0, 6.0, 7.0]


def test_hpu_one_graph_per_shape_and_dtype(hpu):
    step = GraphedStep(hpu.recorded(lambda x: x + 1), warmup=0, device="hpu")
    a, b = torch.zeros(2), torch.zeros(5)
    c = torch.zeros(2, dtype=torch.float64)
    for t in (a, b, a, c, b, c):
        assert step(t).tolist() == (t + 1).tolist()
    assert hpu.events.count("capture_begin") == 3
    assert hpu.events.count("replay") == 6
    assert len(step.graphs) == 3


def test_loop_builds_no_graphs_on_cpu(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a graph was built on the CPU")

    monkeypatch.setattr(specops.loop, "GraphedStep", refuse)
    monkeypatch.setattr(specops.draft_model, "GraphedStep", refuse)
    target = tiny_model("qwen2", seed=3)
    draft = noisy_copy(target, noise=0.1)
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    runs = [specops.generate(target, ids, draft=draft, max_new_tokens=8, eos_token_id=[],
                             num_draft_tokens=3, cuda_graphs=graphs) for graphs in (False, True)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
