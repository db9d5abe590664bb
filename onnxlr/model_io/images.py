"""A folder of images as calibration and held-out data: decoded with Pillow and preprocessed as the model was trained.

The spec (`--image-spec`, comma-separated KEY=VALUE) says how: `preset` (unit: pixels / 255, the default;
symmetric: [-1, 1]; imagenet: the torchvision recipe, resize the shorter side to size / 0.875, center crop, ImageNet
mean and std; raw: 0-255), then any of `size=HxW` (or one number), `resize=N` (the shorter side, before a center
crop to `size`), `mean=a/b/c`, `std=a/b/c`, `order=RGB|BGR|L` and `layout=NCHW|NHWC`. The model's one image input
fills in what the spec leaves out: its fixed height and width, its channels (1: L, 3: RGB), its layout (channels at
dim 1 or last) and dtype. Files are read in name order; ones Pillow cannot decode are refused, named.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxlr.errors import OnnxlrError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875  # imagenet preset: the crop is this share of the resized shorter side
PRESETS: dict[str, dict[str, Any]] = {
    "unit": {"scale": 1 / 255},
    "symmetric": {"scale": 1 / 255, "mean": (0.5,), "std": (0.5,)},
    "imagenet": {"scale": 1 / 255, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop": True},
    "raw": {"scale": 1.0},
}


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """How an image becomes the model's input (module docstring); None: the model or the preset says."""

    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    size: tuple[int, int] | None = None
    resize: int | None = None
    crop: bool = False  # imagenet: resize the shorter side to size / 0.875, then center crop
    order: str | None = None
    layout: str | None = None
    preset: str = "unit"


def parse_spec(text: str | None) -> ImageSpec:
    """`--image-spec` text as an ImageSpec; a bad key or value is an error naming the flag."""
    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise OnnxlrError(f"{{0}}: {item!r} is not KEY=VALUE", "image_spec")
        pairs.append((key.strip(), value.strip()))
    preset = next((value for key, value in pairs if key == "preset"), "unit")
    if preset not in PRESETS:
        raise OnnxlrError(f"{{0}}: preset must be one of {', '.join(PRESETS)}, got {preset!r}", "image_spec")
    fields: dict[str, Any] = {"preset": preset, **PRESETS[preset]}
    for key, value in pairs:
        try:
            fields.update(_field(key, value))
        except ValueError as exc:
            raise OnnxlrError(f"{{0}}: {key}={value}: {exc}", "image_spec") from exc
    return ImageSpec(**fields)


def _field(key: str, value: str) -> dict[str, Any]:
    numbers = lambda: tuple(float(part) for part in value.split("/"))  # noqa: E731
    if key == "preset":
        return {}
    if key == "size":
        dims = [int(part) for part in value.lower().split("x")]
        if len(dims) not in (1, 2) or min(dims) < 1:
            raise ValueError("expected H x W, e.g. 224x224, or one number")
        return {"size": (dims[0], dims[-1])}
    if key == "resize":
        if int(value) < 1:
            raise ValueError("expected a positive number of pixels")
        return {"resize": int(value), "crop": True}
    if key in ("mean", "std"):
        parsed = numbers()
        if key == "std" and min(parsed) <= 0:
            raise ValueError("a standard deviation must be positive")
        return {key: parsed}
    if key == "scale":
        return {"scale": float(value.split("/")[0]) / (float(value.split("/")[1]) if "/" in value else 1.0)}
    if key == "order" and value.upper() in ("RGB", "BGR", "L"):
        return {"order": value.upper()}
    if key == "layout" and value.upper() in ("NCHW", "NHWC"):
        return {"layout": value.upper()}
    raise ValueError("unknown key or value (keys: preset, size, resize, mean, std, scale, order=RGB|BGR|L, "
                     "layout=NCHW|NHWC)")


def is_image_folder(path: Any) -> bool:
    """A folder that holds images (and no .npz files, which would make it a folder of arrays)."""
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_dir():
        return False
    files = list(Path(path).iterdir())
    return any(f.suffix.lower() in IMAGE_SUFFIXES for f in files) and not any(f.suffix == ".npz" for f in files)


@dataclasses.dataclass(frozen=True)
class Decoded:
    """The input built from an image folder, and what the report says of it."""

    feeds: dict[str, np.ndarray]
    samples: int
    source: str
    shape: tuple[int, ...]
    spec: ImageSpec

    def describe(self) -> str:
        name, = self.feeds
        return (f"{self.source}: {self.samples} images -> {name} {'x'.join(map(str, self.shape))} "
                f"(preset {self.spec.preset}, {self.spec.order}, {self.spec.layout})")


def decode_folder(folder: str | os.PathLike, model: ir.Model, spec: ImageSpec) -> Decoded:
    """Every image of `folder`, in name order, as the model's one image input."""
    from onnxlr.model_io.inputs import input_specs

    specs = input_specs(model)
    name, resolved = _resolved(specs, spec)
    files = sorted(f for f in Path(folder).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise OnnxlrError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    arrays = np.stack([_preprocessed(file, resolved) for file in files]).astype(specs[name].dtype)
    return Decoded(feeds={name: arrays}, samples=len(files), source=Path(folder).name, shape=tuple(arrays.shape),
                   spec=resolved)


def _resolved(specs: Mapping[str, Any], spec: ImageSpec) -> tuple[str, ImageSpec]:
    """The model's image input, and the spec with what it left out filled in from that input."""
    images = [name for name, s in specs.items() if len(s.shape) == 4 and s.dtype.kind == "f"]
    if len(specs) != 1 or len(images) != 1:
        raise OnnxlrError(f"an image folder feeds a model with one 4-D float input; this one has {', '.join(specs)}: "
                          "give .npz data instead")
    name = images[0]
    dims = specs[name].shape
    layout = spec.layout or ("NHWC" if dims[3] in (1, 3) and dims[1] not in (1, 3) else "NCHW")
    channels, height, width = (dims[1], dims[2], dims[3]) if layout == "NCHW" else (dims[3], dims[1], dims[2])
    order = spec.order or ("L" if channels == 1 else "RGB")
    if isinstance(channels, int) and channels != (1 if order == "L" else 3):
        raise OnnxlrError(f"{{0}}: order={order} gives {1 if order == 'L' else 3} channel(s), the model's input "
                          f"{name!r} takes {channels}", "image_spec")
    size = spec.size or ((height, width) if isinstance(height, int) and isinstance(width, int) else None)
    if size is None:
        raise OnnxlrError(f"the model's input {name!r} has no fixed height and width: give {{0}} size=HxW",
                          "image_spec")
    resize = spec.resize or (round(min(size) / CROP_FRACTION) if spec.crop else None)
    return name, dataclasses.replace(spec, layout=layout, order=order, size=size, resize=resize)


def _preprocessed(file: Path, spec: ImageSpec) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as opened:
            image = opened.convert(spec.order if spec.order == "L" else "RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise OnnxlrError(f"{file}: not an image Pillow can decode ({exc})") from exc
    height, width = spec.size or image.size[::-1]
    if spec.resize:  # shorter side to `resize`, then the center height x width
        ratio = spec.resize / min(image.size)
        image = image.resize((max(width, round(image.size[0] * ratio)), max(height, round(image.size[1] * ratio))),
                             Image.Resampling.BILINEAR)
        left, top = (image.size[0] - width) // 2, (image.size[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
    elif image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) * np.float32(spec.scale)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    if spec.order == "BGR":
        pixels = pixels[..., ::-1]
    normalized = (pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return normalized if spec.layout == "NHWC" else np.transpose(normalized, (2, 0, 1))
