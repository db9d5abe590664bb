"""Where built models live, and how a build is skipped, written and published.

Each model gets its own folder ``<cache root>/<name>/`` holding its files and a ``manifest.json``.
A build writes into a temporary sibling folder and renames it into place at the end, so an
interrupted build never leaves a half-written folder that looks finished.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_ENV = "ONNXLR_MODEL_CACHE"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Builder:
    name: str
    module: str  # a module with a function(out_dir: Path) -> dict (extra manifest fields)
    # Bump when the module's output changes so cached copies get rebuilt. It lives here, not in the
    # module, so that the up-to-date check does not have to import torch or transformers.
    version: int
    description: str
    function: str = "build"


BUILDERS = {
    b.name: b
    for b in (
        Builder("digits-cnn", "models.digits_cnn", 1, "small CNN trained on sklearn digits (Conv, Gemm)"),
        Builder("minilm", "models.minilm", 1, "all-MiniLM-L6-v2 sentence encoder, stdlib-docstring text"),
        Builder("ocr-crnn", "models.ocr_crnn", 1, "conv-only CTC text-line OCR, rendered docstring words"),
        Builder("synthetic", "models.synthetic", 1, "random-weight MLP, transformer block, conv variants"),
        Builder("llm-1b", "models.llm", 1, "LLM-shaped random model, ~1.06B fp32 params (~4.2 GB)", "build_1b"),
        Builder("llm-8b", "models.llm", 1, "LLM-shaped random model, ~8.0B fp16 params (~16 GB)", "build_8b"),
        Builder("llm-8b-fp32", "models.llm", 1, "the llm-8b stack in fp32 (~32 GB)", "build_8b_fp32"),
    )
}
# What `build all` means: everything except the multi-GB llm models.
ALL = ("digits-cnn", "minilm", "ocr-crnn", "synthetic")


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """The folder that holds one sub-folder per model: argument, then $ONNXLR_MODEL_CACHE, then the repo."""
    if cache is not None:
        return Path(cache)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return REPO_ROOT / ".cache" / "models"


def model_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    return cache_root(cache) / name


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_up_to_date(folder: Path, name: str, version: int) -> bool:
    """True when the manifest matches this builder and every file it lists is there with its size."""
    manifest = read_manifest(folder)
    if not manifest or manifest.get("name") != name or manifest.get("builder_version") != version:
        return False
    files = manifest.get("files", {})
    return bool(files) and all(
        (folder / rel).is_file() and (folder / rel).stat().st_size == size for rel, size in files.items()
    )


def build(name: str, cache: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Build model ``name`` into its cache folder unless an up-to-date copy is there; return that folder."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(BUILDERS)}")
    version = BUILDERS[name].version
    target = model_dir(name, cache)
    if not force and is_up_to_date(target, name, version):
        print(f"{name}: up to date ({target})", flush=True)
        return target

    print(f"{name}: building into {target}", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = _fresh_dir(target.parent, f".{name}.tmp")
    try:
        builder = BUILDERS[name]
        info = getattr(importlib.import_module(builder.module), builder.function)(tmp)
        seconds = round(time.perf_counter() - start, 1)
        _write_manifest(tmp, name, version, seconds, info)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"{name}: done in {seconds:.1f}s", flush=True)
    return target


def _write_manifest(folder: Path, name: str, version: int, seconds: float, info: dict) -> None:
    files = {
        p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()
    }
    manifest = {"name": name, "builder_version": version, "build_seconds": seconds, "files": files, **info}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _replace_dir(new: Path, target: Path) -> None:
    """Swap ``new`` into ``target``; the old copy is moved aside first because rename needs a free name."""
    old = None
    if target.exists():
        old = _fresh_dir(target.parent, f".{target.name}.old")
        target.rename(old / "previous")
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fresh_dir(parent: Path, prefix: str) -> Path:
    # Not tempfile.mkdtemp: its 0700 mode would end up on the published model folder.
    folder = parent / f"{prefix}-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    return folder
