"""Exported model folders in, drop-in folders out.

Hugging Face Optimum writes `model.onnx` beside `config.json` and the tokenizer files; sentence-transformers' ONNX
backend writes `onnx/model.onnx` beside the tokenizer, `modules.json` and the pooling config. `find` picks the model
in such a folder (MODEL_NAMES first, else the folder's only .onnx file), its tokenizer and its longest sequence;
`staged_folder` and `copy_others` write the output folder: the rewritten model under the same relative path and every
other file copied, in a temporary folder renamed into place only when the whole run succeeded, so the output loads
wherever the input loaded and a failed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from onnxlr.errors import OnnxlrError

MODEL_NAMES = ("model.onnx", "onnx/model.onnx")  # Optimum's layout, then sentence-transformers' ONNX backend's
TOKENIZER_FILE = "tokenizer.json"
UNBOUNDED_LENGTH = 1_000_000  # transformers writes model_max_length as a huge sentinel when a model has no limit


@dataclasses.dataclass(frozen=True)
class ModelFolder:
    """An exported model's folder: the model in it (relative to `root`), its tokenizer and its longest sequence
    (sentence-transformers' max_seq_length, else the tokenizer's model_max_length), when the folder says."""

    root: Path
    model: Path
    tokenizer: Path | None = None
    max_length: int | None = None

    @property
    def model_path(self) -> Path:
        return self.root / self.model

    def to_json(self) -> dict[str, Any]:
        return {"input": str(self.root), "model": self.model.as_posix(),
                "tokenizer": str(self.tokenizer) if self.tokenizer else None, "max_length": self.max_length}


def is_folder(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike)) and Path(source).is_dir()


def find(root: str | os.PathLike) -> ModelFolder:
    """The model, tokenizer and longest sequence of the exported folder `root`."""
    root = Path(root)
    models = sorted(path.relative_to(root) for path in root.rglob("*.onnx") if path.is_file())
    model = next((Path(name) for name in MODEL_NAMES if (root / name).is_file()), None)
    if model is None and len(models) == 1:
        model = models[0]
    if model is None:
        found = ", ".join(path.as_posix() for path in models[:8]) + (", ..." if len(models) > 8 else "")
        raise OnnxlrError(f"{root}: no .onnx model in this folder" if not models else
                          f"{root}: several models and none named model.onnx ({found}): give the one to optimize "
                          "as INPUT (a file)")
    return ModelFolder(root=root, model=model, tokenizer=_tokenizer(root, model),
                       max_length=_max_length(root, model))


def model_path(source: str | os.PathLike) -> str:
    """The model file a command reads: `source` itself, or the model inside an exported folder."""
    return str(find(source).model_path) if is_folder(source) else os.fspath(source)


def _tokenizer(root: Path, model: Path) -> Path | None:
    for folder in (root, (root / model).parent):
        if (folder / TOKENIZER_FILE).is_file():
            return folder / TOKENIZER_FILE
    return None


def _max_length(root: Path, model: Path) -> int | None:
    """sentence-transformers' max_seq_length (what its pipeline truncates to), else the tokenizer's
    model_max_length, when either is a real limit."""
    for folder in (root, (root / model).parent):
        for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json",
                                                                            "model_max_length")):
            value = _json_value(folder / name, key)
            if isinstance(value, int) and 0 < value < UNBOUNDED_LENGTH:
                return value
    return None


def _json_value(path: Path, key: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):  # absent or not a JSON object: the folder says nothing
        return None


def check_output_folder(output: str | os.PathLike, folder: ModelFolder) -> Path:
    """The output folder, refused when it is a file, holds files already, or overlaps the input folder."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise OnnxlrError(f"{output}: a file; the input is a model folder, so OUTPUT is the folder to write")
    if output.is_dir() and any(output.iterdir()):
        raise OnnxlrError(f"{output}: the folder is not empty; onnxlr writes a new folder (remove it or name another)")
    target, source = output.resolve(), folder.root.resolve()
    if target == source or target.is_relative_to(source) or source.is_relative_to(target):
        raise OnnxlrError(f"{output}: the output folder overlaps the input folder {folder.root}; write elsewhere "
                          "(the input is never modified)")
    return output


@contextlib.contextmanager
def staged_folder(output: Path) -> Iterator[Path]:
    """A temporary folder next to `output`, renamed to it when the block ends normally, removed when it raises."""
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = output.parent / f".{output.name}.onnxlr-{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        yield stage
        if output.is_dir():  # empty (check_output_folder): rename cannot replace a folder
            output.rmdir()
        stage.rename(output)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def copy_others(folder: ModelFolder, skip: Iterable[Path], stage: Path) -> list[str]:
    """Copy every file of the input folder but its model and `skip` (the model's external data) into `stage`, under
    the same relative paths; returns them."""
    skipped = {folder.model_path.resolve(), *(Path(path).resolve() for path in skip)}
    copied = []
    for path in sorted(folder.root.rglob("*")):
        if not path.is_file() or path.resolve() in skipped:
            continue
        relative = path.relative_to(folder.root)
        (stage / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, stage / relative)
        copied.append(relative.as_posix())
    return copied
