"""Text as calibration and held-out data: a .txt file (one sample a line) or a .jsonl file (one JSON object a line,
its text under `text_field`), tokenized with a Hugging Face `tokenizers` tokenizer.json into the model's inputs.

Inputs are filled by name: `input_ids`, `attention_mask`, `token_type_ids` and `position_ids` (any input whose name
ends with one of them); a model with another input cannot be fed text and says which. Every sample is padded or
truncated to one length: `seq_len`, else the model's fixed sequence length, else the longest sample up to
`max_length` (an exported folder's limit, onnxlr.model_io.folders), the model's position table or MAX_LENGTH.
`save` writes the arrays where the rest of onnxlr reads inputs (an .npz keyed by input name), `describe` says what
was built, and `carve` splits off held-out samples (text calibration with no held-out data: for verification and the
--target-* search).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxlr.errors import OnnxlrError

TEXT_SUFFIXES = (".txt", ".jsonl")
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
MAX_LENGTH = 512  # the longest sample taken when neither the model nor seq_len says
TOKENIZER_FILE = "tokenizer.json"
HELDOUT_SHARE = 0.2  # text calibration with no held-out data or --inputs: this much is carved for verification


@dataclasses.dataclass(frozen=True)
class TextOptions:
    """How text becomes inputs: the tokenizer (a tokenizer.json, or a folder holding one), the length of every
    sample (None: the model's, else the longest up to `max_length` or its position table) and the JSONL field."""

    tokenizer: str | os.PathLike | None = None
    seq_len: int | None = None
    text_field: str = "text"
    max_length: int | None = None  # the longest sequence the model's pipeline takes (an exported folder says)


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """The inputs built from a text file, and what the report says of them."""

    feeds: dict[str, np.ndarray]
    samples: int
    length: int
    truncated: int  # samples longer than `length`, cut
    source: str

    def describe(self) -> str:
        names = ", ".join(self.feeds)
        cut = f", {self.truncated} truncated" if self.truncated else ""
        return f"{self.source}: {self.samples} texts tokenized to {self.samples} x {self.length} ({names}){cut}"


def is_text(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and Path(path).suffix.lower() in TEXT_SUFFIXES


def read_texts(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    """The samples of a .txt (non-empty lines) or .jsonl (`text_field` of each object) file."""
    path = Path(path)
    expected = "text (a .txt holds one sample a line, a .jsonl one JSON object a line)"
    lines = [(number, line.strip()) for number, line in _lines(path, "text file", expected)]
    texts = [line for _, line in lines] if path.suffix.lower() == ".txt" else [
        _json_text(path, number, line, text_field) for number, line in lines]
    if not texts:
        raise OnnxlrError(f"{path}: no text samples (an empty file)")
    return texts


def _json_text(path: Path, number: int, line: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise OnnxlrError(f"{path}:{number}: not a JSON object ({exc.msg})") from exc
    value = record.get(field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise OnnxlrError(f"{path}:{number}: no text under {{0}} {field!r} (it has: {keys})", "text_field")
    return value


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A `tokenizers.Tokenizer` from a tokenizer.json, or from the folder that holds one."""
    from tokenizers import Tokenizer

    file = Path(path)
    if file.is_dir():
        file = file / TOKENIZER_FILE
    if not file.is_file():
        raise OnnxlrError(f"{file}: no tokenizer there ({{0}} takes a tokenizer.json or the folder that holds "
                          "one, as Hugging Face exports write it)", "tokenizer")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the tokenizers library's own error for a file it cannot parse
        raise OnnxlrError(f"{file}: not a tokenizers tokenizer.json ({str(exc).splitlines()[0][:200]})",
                          "tokenizer") from exc


def tokenize(model: ir.Model, texts: Sequence[str], tokenizer: Any, seq_len: int | None = None,
             source: str = "text", max_length: int | None = None) -> Tokenized:
    """The model's inputs for `texts` (see the module's docstring), checked against its signature and vocabulary."""
    from onnxlr.model_io.inputs import input_specs

    specs = input_specs(model)
    roles = _roles(specs)
    ids_spec = specs[roles["input_ids"]]
    vocabulary = tokenizer.get_vocab_size(with_added_tokens=True)
    if ids_spec.high is not None and vocabulary > ids_spec.high:
        raise OnnxlrError(f"the tokenizer's vocabulary ({vocabulary} tokens) is larger than the model's embedding "
                          f"table ({ids_spec.high} rows): it is not this model's tokenizer ({{0}})", "tokenizer")
    pad_id = _pad_id(tokenizer)  # read before the padding the file may configure is turned off
    tokenizer.no_truncation()
    tokenizer.no_padding()  # the samples' own lengths first
    natural = [len(encoding.ids) for encoding in tokenizer.encode_batch(list(texts))]
    length = _length(specs, roles, seq_len, max(natural), max_length)
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(length=length, pad_id=pad_id)
    encodings = tokenizer.encode_batch(list(texts))
    columns = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings],
               "token_type_ids": [e.type_ids for e in encodings],
               "position_ids": [list(range(length))] * len(encodings)}
    feeds = {name: np.asarray(columns[role], dtype=specs[name].dtype) for role, name in roles.items()}
    return Tokenized(feeds=feeds, samples=len(texts), length=length,
                     truncated=sum(count > length for count in natural), source=source)


def _roles(specs: Mapping[str, Any]) -> dict[str, str]:
    """Which input takes which tokenizer output, by name; every input must take one."""
    roles: dict[str, str] = {}
    unknown = []
    for name in specs:
        role = next((role for role in TOKEN_INPUTS if name == role or name.endswith(role)), None)
        if role is None or role in roles:
            unknown.append(name)
        else:
            roles[role] = name
    if "input_ids" not in roles or unknown:
        raise OnnxlrError("text can feed a model whose inputs are " + ", ".join(TOKEN_INPUTS) + " (by name); this "
                          f"one has {', '.join(specs)}: give .npz data instead")
    return roles


def _length(specs: Mapping[str, Any], roles: Mapping[str, str], seq_len: int | None, longest: int,
            max_length: int | None = None) -> int:
    """The sequence length: `seq_len`, the model's fixed one, or the longest sample up to `max_length` and the
    position table."""
    declared = specs[roles["input_ids"]].shape
    fixed = declared[1] if len(declared) > 1 and isinstance(declared[1], int) else None
    if seq_len is not None:
        if fixed is not None and seq_len != fixed:
            raise OnnxlrError(f"{{0}} {seq_len}: the model takes sequences of exactly {fixed} tokens", "seq_len")
        return seq_len
    if fixed is not None:
        return fixed
    positions = specs[roles["position_ids"]].high if "position_ids" in roles else None
    return max(1, min(longest, max_length or MAX_LENGTH, positions or MAX_LENGTH))


def _pad_id(tokenizer: Any) -> int:
    """The tokenizer's own padding id, else its [PAD] / <pad> token, else 0."""
    if tokenizer.padding is not None and tokenizer.padding.get("pad_id") is not None:
        return int(tokenizer.padding["pad_id"])
    for token in ("[PAD]", "<pad>", "<|pad|>"):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    return 0


def tokenized_file(path: str | os.PathLike, model: ir.Model, options: TextOptions) -> Tokenized:
    """The text file at `path` tokenized for `model`."""
    if options.tokenizer is None:
        raise OnnxlrError(f"{path}: text data needs its tokenizer: give {{0}} tokenizer.json (or the folder that "
                          "holds it)", "tokenizer")
    return tokenize(model, read_texts(path, options.text_field), load_tokenizer(options.tokenizer), options.seq_len,
                    source=Path(path).name, max_length=options.max_length)


PAIR_FIELDS = ("sentence1", "sentence2", "score")  # STS-B's names; a .tsv has them as its three columns


@dataclasses.dataclass(frozen=True)
class ScoredPairs:
    """Sentence pairs with a similarity score each, tokenized: the first sentences, then the second ones, in `feeds`
    (2 x pairs samples), and the scores."""

    feeds: dict[str, np.ndarray]
    scores: np.ndarray
    source: str

    def describe(self) -> str:
        return f"{self.source}: {len(self.scores)} scored pairs"


def read_pairs(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
    """Scored sentence pairs: a .tsv (sentence1, sentence2, score a line; a header line is skipped) or a .jsonl (one
    object a line with sentence1, sentence2 and score)."""
    path = Path(path)
    firsts: list[str] = []
    seconds: list[str] = []
    scores: list[float] = []
    for number, line in _lines(path):
        if path.suffix.lower() == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise OnnxlrError(f"{path}:{number}: not a JSON object ({exc.msg})") from exc
            fields: list[Any] = [record.get(key) if isinstance(record, dict) else None for key in PAIR_FIELDS]
        else:
            fields = line.split("\t")
            if len(fields) != 3:
                raise OnnxlrError(f"{path}:{number}: {len(fields)} tab-separated fields, not 3 (sentence1, sentence2, "
                                  "score)")
        first, second, score = fields
        try:
            value = float(score)
        except (TypeError, ValueError):
            if number == 1 and path.suffix.lower() != ".jsonl":
                continue  # a header
            raise OnnxlrError(f"{path}:{number}: the score {score!r} is not a number") from None
        if not isinstance(first, str) or not isinstance(second, str) or not first.strip() or not second.strip():
            raise OnnxlrError(f"{path}:{number}: needs two sentences and a score ({', '.join(PAIR_FIELDS)})")
        firsts.append(first.strip())
        seconds.append(second.strip())
        scores.append(value)
    if len(scores) < 3:
        raise OnnxlrError(f"{path}: {len(scores)} scored pairs; a rank correlation needs at least 3")
    return firsts, seconds, np.asarray(scores, np.float64)


def _lines(path: Path, what: str = "pairs file", expected: str = "scored pairs") -> list[tuple[int, str]]:
    """The non-blank lines of a UTF-8 text file, numbered from 1; an unreadable, binary or non-UTF-8 file is refused
    (`what` it is, and the `expected` content, name it)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise OnnxlrError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc
    if b"\x00" in raw:
        raise OnnxlrError(f"{path}: a binary file, not {expected}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OnnxlrError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    return [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def tokenized_pairs(path: str | os.PathLike, model: ir.Model, options: TextOptions) -> ScoredPairs:
    """The pairs file at `path` tokenized for `model`: both sentences of every pair at one length."""
    if options.tokenizer is None:
        raise OnnxlrError(f"{path}: scored pairs are text and need its tokenizer: give {{0}} tokenizer.json (or the "
                          "folder that holds it)", "tokenizer")
    firsts, seconds, scores = read_pairs(path)
    tokenized = tokenize(model, firsts + seconds, load_tokenizer(options.tokenizer), options.seq_len,
                         source=Path(path).name, max_length=options.max_length)
    return ScoredPairs(feeds=tokenized.feeds, scores=scores, source=Path(path).name)


def carve(tokenized: Tokenized, share: float = HELDOUT_SHARE,
          purpose: str = "the search and verification") -> tuple[Tokenized, Tokenized]:
    """(calibration, held-out): the last `share` of the samples (at least one, at most all but one) held out."""
    if tokenized.samples < 2:
        raise OnnxlrError(f"{tokenized.source}: one text cannot be split into calibration and held-out samples: "
                          "give more, or held-out {0}", "heldout")
    held = min(tokenized.samples - 1, max(1, round(tokenized.samples * share)))
    kept = tokenized.samples - held

    def part(rows: slice, samples: int, label: str) -> Tokenized:
        return dataclasses.replace(tokenized, feeds={name: array[rows] for name, array in tokenized.feeds.items()},
                                   samples=samples, truncated=0, source=f"{tokenized.source} ({label})")

    return (part(slice(0, kept), kept, f"the first {kept}, calibration"),
            part(slice(kept, None), held, f"the last {held}, held out for {purpose}"))


def save(feeds: Mapping[str, np.ndarray], folder: Path) -> Path:
    """Arrays by input name as an .npz in `folder` (what onnxlr reads as inputs)."""
    target = folder / f"data-{len(list(folder.iterdir()))}.npz"
    arrays: dict[str, Any] = dict(feeds)  # numpy's stub types savez's keywords as its allow_pickle
    np.savez(target, **arrays)
    return target
