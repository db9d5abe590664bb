"""Inputs: a model's input signature, input data from .npz files or Python, and synthesized inputs.

- `input_specs`: the inputs a caller must feed (dtype, shape, and for token ids the size of the
  embedding table they index, so synthesized ids stay in range);
- `load_inputs`: an .npz keyed by input name, samples along the first axis, checked against the specs;
- `resolve_shapes`: concrete shapes for the specs (`--shape NAME:DIMS` first, named dims shared across
  inputs, dims the graph implies, the rest from a small per-class ladder, see `LADDERS`);
- `synthesize_inputs`: random inputs of those shapes (onnxlr.model_io.synthesis picks the ladder step the model runs);
- `load_batches`: calibration or held-out data (an .npz, a folder of them, or dicts) as checked batches.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

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
    shape: tuple  # per dim: an int (fixed), a str (a named dynamic dim, shared across inputs) or None (dynamic)
    high: int | None = None  # exclusive upper bound for integer ids (from an embedding table)
    implied: dict[int, int] = dataclasses.field(default_factory=dict)  # dynamic dim -> the size a weight needs


def input_specs(model: ir.Model) -> dict[str, InputSpec]:
    """The graph inputs a caller must feed (initializers listed as inputs excluded)."""
    specs: dict[str, InputSpec] = {}
    for value in model.graph.inputs:
        if value.const_value is not None:
            continue
        if value.type is None or not hasattr(value.type, "dtype"):
            raise OnnxlrError(f"input {value.name!r} is not a tensor; onnxlr can only feed tensors")
        shape = tuple(_declared_dim(d) for d in (value.shape or []))
        name = cast(str, value.name)  # ONNX names every graph input
        specs[name] = InputSpec(dtype=np.dtype(value.type.dtype.numpy()), shape=shape,
                                high=_embedding_rows(value), implied=_implied_dims(value, shape))
    return specs


def _declared_dim(dim: Any) -> int | str | None:
    # A negative dim (-1, as some exporters write "any") is dynamic, like an unnamed symbolic dim.
    if isinstance(dim, int):
        return dim if dim >= 0 else None
    return getattr(dim, "value", None) or None


def _implied_dims(value: ir.Value, shape: tuple) -> dict[int, int]:
    """Dynamic dims a constant weight fixes: a MatMul/Gemm's contracted dim, a Conv's input channels."""
    implied: dict[int, int] = {}
    rank = len(shape)
    for node in value.consumers():
        if not node.inputs or node.inputs[0] is not value or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        weight = node.inputs[1].const_value
        if weight is None or not weight.shape or not all(isinstance(d, int) for d in weight.shape):
            continue
        dims = cast("tuple[int, ...]", tuple(weight.shape))  # all ints (checked above)
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        if node.op_type == "MatMul" and rank >= 1:
            implied[rank - 1] = dims[-2] if len(dims) >= 2 else dims[0]
        elif node.op_type == "Gemm" and rank == 2 and len(dims) == 2:
            implied[0 if attrs.get("transA") else 1] = dims[1] if attrs.get("transB") else dims[0]
        elif node.op_type == "Conv" and rank >= 3 and len(dims) >= 2:
            implied[1] = dims[1] * int(attrs.get("group") or 1)
        elif node.op_type == "ConvTranspose" and rank >= 3:
            implied[1] = dims[0]
    return {index: size for index, size in implied.items() if shape[index] is None or isinstance(shape[index], str)}


def _embedding_rows(value: ir.Value, depth: int = 0) -> int | None:
    """If the value (through casts/reshapes) indexes a constant Gather table, that table's size."""
    for node in value.consumers():
        if node.op_type == "Gather" and len(node.inputs) > 1 and node.inputs[1] is value:
            table = node.inputs[0]
            if table is not None and table.const_value is not None:
                axis = node.attributes.get("axis")
                return int(cast(int, table.const_value.shape[axis.value if axis else 0]))  # a constant's dims are ints
        if node.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity") and depth < 4:
            found = _embedding_rows(node.outputs[0], depth + 1)
            if found:
                return found
    return None


def batch_shapes(path: str, model: ir.Model, batch_size: int) -> dict[str, tuple[int, ...]]:
    """The shapes of one batch of an inputs .npz (its first `batch_size` samples): what a run feeds the model."""
    arrays = load_inputs(path, input_specs(model))
    return {name: (min(a.shape[0], batch_size), *a.shape[1:]) if a.ndim else () for name, a in arrays.items()}


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


# Candidate sizes per class of dynamic dim, tried in order (onnxlr.model_io.synthesis) until the model runs;
# step 0 is the default. Short ladders: each step costs one run of the reference on one sample.
LADDERS: dict[str, tuple[int, ...]] = {
    "spatial": (32, 64, 224, 320, 640),  # image height/width: 32 suits stride-32 backbones
    "sequence": (16, 128, 512, 16000),  # time/sequence axes (float: audio samples, frames, embeddings)
    "tokens": (16, 128, 512),  # integer sequences (token ids): position tables rarely exceed 512
    "channels": (3, 16, 64),  # a dynamic channel dim of an image (NCHW)
    "other": (16, 32, 64, 128),
}
LADDER_STEPS = max(len(ladder) for ladder in LADDERS.values())
_SPATIAL_WORDS = {"height", "width", "h", "w"}
_SEQUENCE_WORDS = {"seq", "sequence", "len", "length", "time", "frames", "samples", "tokens", "steps", "t"}
_BATCH_WORDS = {"batch", "n", "b", "bs"}


def dim_class(spec: InputSpec, index: int) -> str:
    """"batch" (filled with the sample count) or a LADDERS key, from the dim's name, position and the input's rank."""
    name = spec.shape[index]
    words = set(re.split(r"[^a-z]+", name.lower())) if isinstance(name, str) else set()
    rank = len(spec.shape)
    sequence = "tokens" if spec.dtype.kind in "iub" else "sequence"
    if index == 0 or words & _BATCH_WORDS:
        return "batch"
    if words & _SPATIAL_WORDS:
        return "spatial"
    if words & _SEQUENCE_WORDS:
        return sequence
    if rank >= 4:
        return "channels" if index == 1 else "spatial"
    return sequence if rank in (2, 3) else "other"


def resolve_shapes(specs: Mapping[str, InputSpec], samples: int, shapes: Mapping[str, tuple[int, ...]] | None = None,
                   step: int = 0) -> dict[str, tuple[int, ...]]:
    """A concrete shape per input: --shape overrides as given; a named dim takes one value in every input
    (from an override, a weight that implies it, else its class); batch dims `samples`, the rest their
    class's ladder at `step` (its last size past the end)."""
    shapes = dict(shapes or {})
    unknown = [name for name in shapes if name not in specs]
    if unknown:
        raise OnnxlrError(f"--shape names unknown input(s) {', '.join(unknown)}; inputs are {', '.join(specs)}")
    named: dict[str, int] = {}
    for name, shape in shapes.items():
        spec = specs[name]
        if len(shape) != len(spec.shape) or any(isinstance(d, int) and d != s for d, s in zip(spec.shape, shape)):
            raise OnnxlrError(f"--shape {name}:{'x'.join(map(str, shape))} does not fit the input's shape "
                              f"{_shape_text(spec.shape)}")
        named.update((d, s) for d, s in zip(spec.shape, shape) if isinstance(d, str) and d not in named)
    for spec in specs.values():
        named.update((spec.shape[i], s) for i, s in spec.implied.items()
                     if isinstance(spec.shape[i], str) and spec.shape[i] not in named)
    classes = _named_classes(specs)
    resolved = {}
    for name, spec in specs.items():
        if name in shapes:
            resolved[name] = tuple(shapes[name])
            continue
        dims = []
        for index, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                size = dim
            elif dim in named:
                size = named[dim]
            elif index in spec.implied:
                size = spec.implied[index]
            else:
                kind = classes.get(dim) or dim_class(spec, index)
                size = samples if kind == "batch" else LADDERS[kind][min(step, len(LADDERS[kind]) - 1)]
                if dim is not None:
                    named[dim] = size
            dims.append(size)
        resolved[name] = tuple(dims)
    return _with_cache_lengths(specs, resolved, shapes)


def token_input(specs: Mapping[str, InputSpec], role: str) -> str | None:
    """The 2-D input named like `role` (input_ids, attention_mask, position_ids: a name ending with it), if any."""
    return next((name for name, spec in specs.items() if name.endswith(role) and len(spec.shape) == 2), None)


def cache_inputs(specs: Mapping[str, InputSpec]) -> list[str]:
    """A decoder's KV-cache inputs (past_key_values.N.key, past.N.value, ...): 4-D floats named like a past."""
    return [name for name, spec in specs.items()
            if spec.dtype.kind == "f" and len(spec.shape) == 4 and "past" in name.lower()]


def _with_cache_lengths(specs: Mapping[str, InputSpec], resolved: dict[str, tuple[int, ...]],
                        shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A decoder with a KV cache: its attention mask covers the cached tokens and the new ones (past + sequence),
    unless --shape gave it or the mask shares the ids' sequence dim."""
    ids, mask, past = token_input(specs, "input_ids"), token_input(specs, "attention_mask"), cache_inputs(specs)
    if ids is None or mask is None or not past or mask in shapes or isinstance(specs[mask].shape[1], int):
        return resolved
    if specs[mask].shape[1] is not None and specs[mask].shape[1] == specs[ids].shape[1]:
        return resolved
    cached = resolved[past[0]][2]  # (batch, heads, past, head size), as transformers and Optimum export it
    resolved[mask] = (resolved[mask][0], cached + resolved[ids][1])
    return resolved


def _named_classes(specs: Mapping[str, InputSpec]) -> dict[str, str]:
    """One class per dim name: "batch" when any input has it first, else its first occurrence's class."""
    classes: dict[str, str] = {}
    for spec in specs.values():
        for index, dim in enumerate(spec.shape):
            if isinstance(dim, str) and (dim not in classes or dim_class(spec, index) == "batch"):
                classes[dim] = dim_class(spec, index)
    return classes


def _shape_text(shape: tuple) -> str:
    return "x".join("?" if d is None else str(d) for d in shape) or "scalar"


def synthesize_inputs(specs: Mapping[str, InputSpec], seed: int = 0, samples: int = 2,
                      shapes: Mapping[str, tuple[int, ...]] | None = None, step: int = 0) -> dict[str, np.ndarray]:
    """Random inputs from the model's signature: floats ~ N(0, 1), ids inside the embedding table,
    masks all ones, position ids counting from the end of a KV cache (else 0), booleans random, scalars a fixed
    sensible value. Shapes: `resolve_shapes` (a cached decoder's mask covers past + new tokens)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape in resolve_shapes(specs, samples, shapes, step).items():
        spec = specs[name]
        nbytes = math.prod(shape) * spec.dtype.itemsize
        if nbytes > MAX_SYNTHESIZED_BYTES:
            hint = f"--shape {name}:DIMS or " if not all(isinstance(d, int) for d in spec.shape) else ""
            raise OnnxlrError(f"input {name!r} of shape {'x'.join(map(str, shape))} would take {nbytes} bytes to "
                              f"synthesize; pass {hint}--inputs FILE.npz")
        feeds[name] = _random_array(name, spec, shape, rng)
    return _with_positions(specs, feeds)


def _with_positions(specs: Mapping[str, InputSpec], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Position ids (samples x tokens) count the new tokens from the end of the cache: past, past + 1, ... (from 0
    without a cache), as a generation loop feeds them."""
    mask = next((array for name, array in feeds.items() if name.endswith("attention_mask") and array.ndim == 2), None)
    for name, array in feeds.items():
        if name.endswith("position_ids") and array.ndim == 2 and specs[name].dtype.kind in "iu":
            tokens = array.shape[1]
            start = mask.shape[1] - tokens if mask is not None and mask.shape[1] >= tokens else 0
            feeds[name] = np.broadcast_to(np.arange(start, start + tokens), array.shape).astype(array.dtype)
    return feeds


def synthesized_bytes(specs: Mapping[str, InputSpec], shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shape) * specs[name].dtype.itemsize for name, shape in shapes.items())


def _looks_like_rate(name: str) -> bool:
    return bool(re.search(r"(^|[^a-z])sr($|[^a-z])|rate", name.lower()))


def _random_array(name: str, spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    kind = spec.dtype.kind
    if kind in "iu" and _looks_like_rate(name):  # a sample rate: the rate speech models expect
        return np.full(shape, 16000, dtype=spec.dtype)
    if not shape and kind in "fiub":  # a scalar (a flag, a count, a scale): 1 is valid far more often than noise
        return np.ones((), dtype=spec.dtype)
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


def load_labels(path: str | os.PathLike) -> np.ndarray:
    """One integer class a sample: an .npy, an .npz (its 'labels' array, or its only one) or a .txt (one a line)."""
    path = Path(path)
    try:
        if path.suffix == ".txt":
            array = np.array([int(line) for line in path.read_text().split()], dtype=np.int64)
        elif path.suffix == ".npz":
            with np.load(path) as data:
                names = ["labels"] if "labels" in data.files else data.files
                if len(names) != 1:
                    raise ValueError(f"holds {', '.join(data.files)}: name the classes 'labels'")
                array = np.asarray(data[names[0]])
        else:
            array = np.load(path)
    except (OSError, ValueError) as exc:
        raise OnnxlrError(f"{path}: not a file of integer labels ({exc})", "labels") from exc
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise OnnxlrError(f"{path}: labels must be one integer a sample, got {array.dtype} with shape {array.shape}",
                          "labels")
    return array.astype(np.int64)


CALLABLE = re.compile(r"^(?P<module>[A-Za-z_][\w.]*):(?P<function>[A-Za-z_]\w*)$")


def is_callable_source(source: Any) -> bool:
    """`module:function` (not an existing path): a Python callable that yields input dicts."""
    return isinstance(source, str) and CALLABLE.match(source) is not None and not Path(source).exists()


def callable_source(source: str) -> list[Any]:
    """The input dicts `module:function()` yields (the module imported from the current folder first, then
    sys.path), all of them: calibration reads its data several times."""
    import importlib
    import sys

    from onnxlr.model_io.io import first_line

    match = CALLABLE.match(source)
    assert match is not None  # is_callable_source said so
    module_name, function_name = match["module"], match["function"]
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any error while importing it
        raise OnnxlrError(f"{source}: cannot import {module_name} ({type(exc).__name__}: {first_line(exc)})") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise OnnxlrError(f"{source}: {module_name} has no function {function_name}")
    try:
        produced = function()
        items = [produced] if isinstance(produced, Mapping) else list(produced)
    except Exception as exc:  # the user's code: any error while it yields its data
        raise OnnxlrError(f"{source}: the function failed ({type(exc).__name__}: {first_line(exc)})") from exc
    if not items:
        raise OnnxlrError(f"{source}: the function yielded no input dicts")
    return items


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
