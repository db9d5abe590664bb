"""Inputs: a model's input signature, input data from .npz files or Python, and synthesized inputs.

- `input_specs`: the inputs a caller must feed (dtype, shape, and for token ids the size of the
  embedding table they index, so synthesized ids stay in range);
- `load_inputs`: an .npz keyed by input name, samples along the first axis, checked against the specs;
- `synthesize_inputs`: random inputs from the specs (`--shape NAME:DIMS` fixes dynamic dims);
- `load_batches`: calibration or held-out data (an .npz, a folder of them, or dicts) as checked batches.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxlr.errors import OnnxlrError


def load_inputs(path: str | os.PathLike, input_specs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Arrays keyed by input name from an .npz file (samples along the first axis), checked against the model."""
    path = Path(path)
    if not path.is_file():
        raise OnnxlrError(f"{path}: no such input file (expected an .npz of arrays keyed by input name)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as exc:
        raise OnnxlrError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0][:200]})") from exc
    missing = [name for name in input_specs if name not in arrays]
    if missing:
        raise OnnxlrError(f"{path}: no array for model input(s) {', '.join(missing)} (has {', '.join(arrays)})")
    feeds = {}
    for name, spec in input_specs.items():
        array = arrays[name]
        if array.dtype != spec.dtype:
            raise OnnxlrError(f"{path}: input {name!r} is {array.dtype} but the model expects {spec.dtype}")
        if array.ndim != len(spec.shape):
            raise OnnxlrError(f"{path}: input {name!r} has {array.ndim} dimensions, the model expects {len(spec.shape)}")
        feeds[name] = array
    counts = {len(a) for a in feeds.values() if a.ndim}
    if len(counts) > 1:
        raise OnnxlrError(f"{path}: inputs have different sample counts {sorted(counts)}")
    return feeds


# A synthesized input larger than this is refused (a huge or hostile declared dim), not allocated.
MAX_SYNTHESIZED_BYTES = 2**31


@dataclasses.dataclass
class InputSpec:
    dtype: np.dtype
    shape: tuple  # ints or None/str for dynamic
    high: int | None = None  # exclusive upper bound for integer ids (from an embedding table)


def input_specs(model: ir.Model) -> dict[str, InputSpec]:
    """The graph inputs a caller must feed (initializers listed as inputs excluded)."""
    specs = {}
    for value in model.graph.inputs:
        if value.const_value is not None:
            continue
        if value.type is None or not hasattr(value.type, "dtype"):
            raise OnnxlrError(f"input {value.name!r} is not a tensor; onnxlr can only feed tensors")
        shape = tuple(d if isinstance(d, int) else None for d in (value.shape or []))
        specs[value.name] = InputSpec(dtype=np.dtype(value.type.dtype.numpy()), shape=shape,
                                      high=_embedding_rows(value))
    return specs


def _embedding_rows(value: ir.Value, depth: int = 0) -> int | None:
    """If the value (through casts/reshapes) indexes a constant Gather table, that table's size."""
    for node in value.consumers():
        if node.op_type == "Gather" and len(node.inputs) > 1 and node.inputs[1] is value:
            table = node.inputs[0]
            if table is not None and table.const_value is not None:
                axis = node.attributes.get("axis")
                return int(table.const_value.shape[axis.value if axis else 0])
        if node.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity") and depth < 4:
            found = _embedding_rows(node.outputs[0], depth + 1)
            if found:
                return found
    return None


def parse_shape_overrides(items: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """`--shape name:1x128` -> {"name": (1, 128)}."""
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            parsed = tuple(int(d) for d in dims.lower().split("x")) if sep and name else None
        except ValueError:
            parsed = None
        if not parsed or any(d < 0 for d in parsed):
            raise OnnxlrError(f"--shape {item!r}: expected NAME:DIMxDIM..., e.g. input_ids:1x128")
        shapes[name] = parsed
    return shapes


def synthesize_inputs(specs: Mapping[str, InputSpec], seed: int = 0, samples: int = 2,
                      shapes: Mapping[str, tuple[int, ...]] | None = None,
                      default_dim: int = 16) -> dict[str, np.ndarray]:
    """Random inputs from the model's signature: floats ~ N(0, 1), ids inside the embedding table,
    masks all ones, booleans random. Dynamic dims: the first is `samples`, the others `default_dim`."""
    rng = np.random.default_rng(seed)
    shapes = dict(shapes or {})
    unknown = [name for name in shapes if name not in specs]
    if unknown:
        raise OnnxlrError(f"--shape names unknown input(s) {', '.join(unknown)}; inputs are {', '.join(specs)}")
    feeds = {}
    for name, spec in specs.items():
        if name in shapes:
            shape = shapes[name]
            if len(shape) != len(spec.shape) or any(s is not None and s != d for s, d in zip(spec.shape, shape)):
                raise OnnxlrError(f"--shape {name}:{'x'.join(map(str, shape))} does not fit the input's shape {spec.shape}")
        else:
            shape = tuple(d if d is not None else (samples if i == 0 else default_dim) for i, d in enumerate(spec.shape))
        if any(d < 0 for d in shape):
            raise OnnxlrError(f"input {name!r} declares a negative dimension {spec.shape}: not a valid ONNX model")
        nbytes = math.prod(shape) * spec.dtype.itemsize
        if nbytes > MAX_SYNTHESIZED_BYTES:
            hint = f"--shape {name}:DIMS or " if None in spec.shape else ""
            raise OnnxlrError(f"input {name!r} of shape {'x'.join(map(str, shape))} would take {nbytes} bytes to "
                              f"synthesize; pass {hint}--inputs FILE.npz")
        feeds[name] = _random_array(name, spec, shape, rng)
    return feeds


def _random_array(name: str, spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    kind = spec.dtype.kind
    if kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    if kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if kind in "iu":
        lowered = name.lower()
        if "mask" in lowered:
            return np.ones(shape, dtype=spec.dtype)
        if "type" in lowered or "segment" in lowered:
            return np.zeros(shape, dtype=spec.dtype)
        high = spec.high or 2
        return rng.integers(0, high, shape).astype(spec.dtype)
    if kind in "OUS":  # strings: short random numerals
        return rng.integers(0, 100, shape).astype(str).astype(object)
    raise OnnxlrError(f"cannot synthesize input {name!r} of dtype {spec.dtype}; pass --inputs FILE.npz")


# ----------------------------------------------------------------------------- data in batches


def load_batches(model: ir.Model, data: Any, samples: int | None = None, batch_size: int = 16
                 ) -> list[dict[str, np.ndarray]]:
    """The calibration data as a list of batches (several passes read it), checked against the model."""
    if samples is not None and samples < 1:
        raise OnnxlrError(f"{{0}} must be a positive integer, got {samples!r}", "calibration_samples")
    batches = list(feed_batches(data, input_specs(model), batch_size, samples))
    if not batches:
        raise OnnxlrError("the calibration data holds no samples")
    return batches


def feed_batches(source: Any, specs: Mapping[str, Any], batch_size: int, samples: int | None
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Batches of input feeds from an .npz, a folder of .npz files or an iterable of dicts, up to `samples`."""
    left = samples
    for feeds in _feed_sets(source, specs):
        count = min((len(a) for a in feeds.values() if a.ndim), default=1)
        for start in range(0, count, batch_size):
            take = min(batch_size, count - start) if left is None else min(batch_size, count - start, left)
            if take <= 0:
                return
            yield {name: (a[start:start + take] if a.ndim else a) for name, a in feeds.items()}
            if left is not None:
                left -= take


def _feed_sets(source: Any, specs: Mapping[str, Any]) -> Iterator[dict[str, np.ndarray]]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.npz"))
            if not files:
                raise OnnxlrError(f"{path}: no .npz files in the calibration folder")
            for file in files:
                yield _finite(load_inputs(file, specs), str(file))
        else:
            yield _finite(load_inputs(path, specs), str(path))
        return
    if isinstance(source, Mapping):
        source = [source]
    for index, feeds in enumerate(source):
        where = f"calibration item {index}"
        yield _finite(_checked(feeds, specs, where), where)


def _finite(feeds: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Refuse NaN/Inf in calibration inputs: they would poison every second-moment statistic."""
    for name, array in feeds.items():
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise OnnxlrError(f"{where}: input {name!r} holds NaN or Inf values; calibration data must be finite")
    return feeds


def _checked(feeds: Any, specs: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
    if not isinstance(feeds, Mapping):
        raise OnnxlrError(f"{where}: expected a dict of arrays keyed by input name, got {type(feeds).__name__}")
    missing = [name for name in specs if name not in feeds]
    if missing:
        raise OnnxlrError(f"{where}: no array for model input(s) {', '.join(missing)}")
    checked = {}
    for name, spec in specs.items():
        array = np.asarray(feeds[name])
        if array.dtype != spec.dtype or array.ndim != len(spec.shape):
            raise OnnxlrError(f"{where}: input {name!r} is {array.dtype} with {array.ndim} dimensions, "
                              f"the model expects {spec.dtype} with {len(spec.shape)}")
        checked[name] = array
    return checked
