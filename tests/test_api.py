"""The public layer: registration (opcheck, compile, graphs), backends, checks, determinism."""

import doctest

import pytest
import torch

import specops
import specops.ops
from helpers import DEVICES, assert_equal_rows, random_chain_inputs

BACKENDS = ["kernels", "reference"]


def _chain_args(d):
    return (d["target_probs"], d["draft_tokens"], d["draft_probs"], d["draft_lens"], d["seeds"],
            d["positions"])


def _op_samples(device):
    g = torch.Generator().manual_seed(0)
    samples = []
    for with_q in (True, False):
        d = random_chain_inputs(3, 4, 50, g, with_draft_probs=with_q, device=device)
        samples.append((torch.ops.specops.chain_verify.default, _chain_args(d)))
    d = random_chain_inputs(3, 0, 7, g, device=device)
    samples.append((torch.ops.specops.chain_verify.default, _chain_args(d)))
    logits = torch.randn(3, 5, 40, device=device)
    tokens = torch.randint(0, 40, (3, 4), device=device)
    lens = torch.tensor([0, 2, 4], dtype=torch.int32, device=device)
    samples.append((torch.ops.specops.chain_verify_greedy.default,
                    (logits.bfloat16(), tokens, lens)))
    n = 4
    samples.append((torch.ops.specops.sampling_probs.default,
                    (torch.randn(n, 33, device=device),
                     torch.tensor([0.0, 0.5, 1.0, 2.0], device=device),
                     torch.tensor([0, 3, 0, 40], dtype=torch.int32, device=device),
                     torch.tensor([1.0, 0.9, 0.3, 1.0], device=device))))
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _op_samples(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    d = random_chain_inputs(4, 3, 64, torch.Generator().manual_seed(1), device=device)

    def step(target_probs, draft_tokens, draft_probs, draft_lens, seeds, positions):
        tokens, num_accepted = specops.chain_verify(target_probs, draft_tokens, draft_probs,
                                                    draft_lens, seeds=seeds, positions=positions)
        logits = target_probs.log()
        greedy, _ = specops.chain_verify_greedy(logits, draft_tokens, draft_lens)
        probs = specops.sampling_probs(logits[:, 0], temperature=0.7, top_k=5, top_p=0.9)
        return tokens, num_accepted, greedy, probs

    eager = step(*_chain_args(d))
    compiled = torch.compile(step, fullgraph=True)(*_chain_args(d))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_and_replay_with_new_inputs():
    g = torch.Generator().manual_seed(2)
    static = random_chain_inputs(8, 5, 1000, g, device="cuda")
    args = _chain_args(static)
    specops.chain_verify(*args[:4], seeds=args[4], positions=args[5])  # warm-up (Triton JIT)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_tokens, out_accepted = specops.chain_verify(*args[:4], seeds=args[4],
                                                        positions=args[5])
    for trial in range(3):
        fresh = random_chain_inputs(8, 5, 1000, g, device="cuda")
        for name, value in fresh.items():
            static[name].copy_(value)
        graph.replay()
        expected = specops.chain_verify(*_chain_args(fresh)[:4], seeds=fresh["seeds"],
                                        positions=fresh["positions"])
        assert_equal_rows(out_tokens, expected[0], f"replay {trial}")
        assert_equal_rows(out_accepted, expected[1], f"replay {trial}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_q", [True, False])
def test_batch_invariance_and_determinism(backend, with_q):
    g = torch.Generator().manual_seed(3)
    d = random_chain_inputs(16, 4, 300, g, with_draft_probs=with_q)
    with specops.use_backend(backend):
        tokens, accepted = specops.chain_verify(*_chain_args(d)[:4], seeds=d["seeds"],
                                                positions=d["positions"])
        again = specops.chain_verify(*_chain_args(d)[:4], seeds=d["seeds"],
                                     positions=d["positions"])
        assert_equal_rows(again[0], tokens, "repeat")
        # Shuffle the rows and replace half of them with other rows: the kept rows are unchanged.
        other = random_chain_inputs(16, 4, 300, g, with_draft_probs=with_q)
        perm = torch.randperm(16, generator=g)
        mixed = {k: (None if v is None else torch.cat([v[perm][:8], other[k][:8]]))
                 for k, v in d.items()}
        moved, moved_accepted = specops.chain_verify(*_chain_args(mixed)[:4],
                                                     seeds=mixed["seeds"],
                                                     positions=mixed["positions"])
    assert_equal_rows(moved[:8], tokens[perm][:8], "moved rows")
    assert_equal_rows(moved_accepted[:8], accepted[perm][:8], "moved rows")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree(backend):
    d = random_chain_inputs(32, 5, 1001, torch.Generator().manual_seed(4))
    with specops.use_backend(backend):
        result = specops.chain_verify(*_chain_args(d)[:4], seeds=d["seeds"],
                                      positions=d["positions"])
    expected = specops.reference.chain_verify_ref(*_chain_args(d))
    assert_equal_rows(result[0], expected[0], backend)


def test_ops_docstring_examples():
    results = doctest.testmod(specops.ops, extraglobs={"specops": specops, "torch": torch},
                              optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted >= 5
    assert results.failed == 0


def test_sampling_probs_parameter_shapes():
    logits = torch.randn(2, 3, 11)
    per_batch = specops.sampling_probs(logits, temperature=torch.tensor([0.0, 1.0]))
    per_token = specops.sampling_probs(logits, temperature=torch.tensor([[0.0] * 3, [1.0] * 3]))
    torch.testing.assert_close(per_batch, per_token)
    assert torch.equal(per_batch[0], torch.nn.functional.one_hot(logits[0].argmax(-1), 11).float())
    torch.testing.assert_close(per_batch[1], logits[1].softmax(-1))
    with pytest.raises(ValueError, match="temperature"):
        specops.sampling_probs(logits, temperature=torch.ones(4))
    with pytest.raises(TypeError, match="top_k"):
        specops.sampling_probs(logits, top_k=torch.ones(2))
    with pytest.raises(TypeError, match="top_p"):
        specops.sampling_probs(logits, top_p="0.9")


def test_extension_built_for_another_torch_is_refused(monkeypatch):
    from specops import _extension
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    with pytest.raises(ImportError, match="rebuild"):
        _extension.load_extension()


def test_settings_reject_unknown_names():
    with pytest.raises(ValueError, match="check level"):
        specops.set_checks("paranoid")
    with pytest.raises(ValueError, match="backend"):
        specops.set_backend("cuda")
    assert specops.get_checks() == "cheap" and specops.get_backend() == "kernels"
