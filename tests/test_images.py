"""A folder of images as calibration and held-out data (onnxlr.model_io.images): Pillow decodes, the spec and the
model's input shape say how pixels become the input; what cannot be decoded or does not fit is refused, exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import init, make_model, onnxlr_cli, tensor_input
from onnx import helper
from PIL import Image

import onnxlr
from onnxlr.errors import OnnxlrError
from onnxlr.model_io import images


def conv_model(channels: int = 1, size: int = 8, layout: str = "NCHW") -> onnx.ModelProto:
    """image -> Conv 3x3 (16 filters) -> Relu -> flattened logits; NHWC inputs go through a Transpose first."""
    rng = np.random.default_rng(0)
    shape = ["n", channels, size, size] if layout == "NCHW" else ["n", size, size, channels]
    nodes = []
    source = "image"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]))
        source = "nchw"
    nodes += [helper.make_node("Conv", [source, "K"], ["c"], name="conv", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Flatten", ["r"], ["logits"])]
    return make_model(nodes, [tensor_input("image", shape)], [tensor_input("logits", ["n", 16 * size * size])],
                      [init("K", (rng.standard_normal((16, channels, 3, 3)) / 3).astype(np.float32))])


def write_gray(folder: Path, pixels: np.ndarray) -> Path:
    """8-bit grayscale PNGs of `pixels` (values in [0, 1]), named in sample order."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(pixels):
        Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L").save(folder / f"{index:04d}.png")
    return folder


def test_grayscale_pngs_come_back_as_the_arrays_they_were_written_from(tmp_path):
    pixels = np.random.default_rng(1).random((12, 8, 8)).astype(np.float32)
    folder = write_gray(tmp_path / "digits", pixels)
    decoded = images.decode_folder(folder, ir.serde.deserialize_model(conv_model()), images.parse_spec(None))
    array = decoded.feeds["image"]
    assert array.shape == (12, 1, 8, 8) and array.dtype == np.float32
    assert np.abs(array[:, 0] - pixels).max() <= 0.5 / 255 + 1e-6  # the 8-bit rounding of the PNGs, nothing else
    assert decoded.spec.order == "L" and decoded.spec.layout == "NCHW" and decoded.spec.size == (8, 8)
    assert "12 images -> image 12x1x8x8 (preset unit, L, NCHW)" in decoded.describe()


def test_presets_resize_crop_channel_order_and_layout(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 255, 51  # red 1.0, blue 0.2
    Image.fromarray(rgb).save(folder / "a.png")
    model = ir.serde.deserialize_model(conv_model(channels=3, size=32, layout="NHWC"))
    decoded = images.decode_folder(folder, model, images.parse_spec("preset=imagenet"))
    array = decoded.feeds["image"]
    assert array.shape == (1, 32, 32, 3) and decoded.spec.layout == "NHWC" and decoded.spec.resize == 37
    assert np.allclose(array[0, 0, 0], [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225], atol=1e-3)
    bgr = images.decode_folder(folder, model, images.parse_spec("preset=symmetric,order=BGR"))
    assert np.allclose(bgr.feeds["image"][0, 5, 5], [0.2 * 2 - 1, -1.0, 1.0], atol=1e-2)
    nchw = images.decode_folder(folder, ir.serde.deserialize_model(conv_model(channels=3, size=16)),
                                images.parse_spec("preset=raw,size=16x16"))
    assert nchw.feeds["image"].shape == (1, 3, 16, 16) and nchw.feeds["image"].max() == 255.0


def test_bad_images_and_specs_are_refused(tmp_path):
    folder = write_gray(tmp_path / "mixed", np.zeros((2, 8, 8), np.float32))
    (folder / "broken.png").write_bytes(b"not a png at all")
    model = ir.serde.deserialize_model(conv_model())
    with pytest.raises(OnnxlrError, match="broken.png: not an image Pillow can decode"):
        images.decode_folder(folder, model, images.parse_spec(None))
    for spec, message in (("preset=vgg", "preset must be one of"), ("size=0", "expected H x W"),
                          ("std=0.5/0", "must be positive"), ("gamma=2", "unknown key"), ("size", "not KEY=VALUE")):
        with pytest.raises(OnnxlrError, match=message):
            images.parse_spec(spec)
    good = write_gray(tmp_path / "good", np.zeros((2, 8, 8), np.float32))
    with pytest.raises(OnnxlrError, match="order=RGB gives 3 channel"):
        images.decode_folder(good, model, images.parse_spec("order=RGB"))
    dynamic = make_model([helper.make_node("Relu", ["image"], ["y"])], [tensor_input("image", ["n", 1, "h", "w"])],
                         [tensor_input("y", ["n", 1, "h", "w"])])
    with pytest.raises(OnnxlrError, match="no fixed height and width"):
        images.decode_folder(good, ir.serde.deserialize_model(dynamic), images.parse_spec(None))
    two = make_model([helper.make_node("Add", ["image", "bias"], ["y"])],
                     [tensor_input("image", ["n", 1, 8, 8]), tensor_input("bias", ["n", 1, 8, 8])],
                     [tensor_input("y", ["n", 1, 8, 8])])
    with pytest.raises(OnnxlrError, match="one 4-D float input; this one has image, bias"):
        images.decode_folder(good, ir.serde.deserialize_model(two), images.parse_spec(None))


def test_the_digits_cnn_calibrates_and_verifies_on_png_folders(tmp_path):
    """The digits reference's own images written as PNGs: calibration and verification read the folders."""
    import models

    folder = models.build("digits-cnn")
    calib, held = np.load(folder / "calib.npz")["input"][:128, 0], np.load(folder / "eval.npz")["input"][:64, 0]
    calib_dir, held_dir = write_gray(tmp_path / "calib", calib), write_gray(tmp_path / "heldout", held)
    _, report = onnxlr.optimize(str(folder / "model.onnx"), calibration=calib_dir, inputs=held_dir,
                                ops=("Conv", "Gemm"), min_params=4096, mac_budget=0.5)
    assert report["calibration"]["samples"] == 128
    assert [item["samples"] for item in report["data"]] == [128, 64]
    assert report["verification"]["samples"] == 64 and report["verification"]["passed"]
    source = tmp_path / "model.onnx"
    onnx.save(conv_model(), source)
    (held_dir / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    refused = onnxlr_cli("optimize", str(source), str(tmp_path / "out.onnx"), "--calibration", str(held_dir),
                         "--rank-ratio", "0.5")
    assert refused.returncode == 2 and "zz-broken.png: not an image" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "out.onnx").exists()


def test_labels_give_both_models_accuracy_and_can_gate_it(tmp_path):
    """The digits CNN on 64 held-out PNGs with their classes: the report has the original's and the written model's
    accuracy; --min-metric accuracy gates the written one's; labels that do not match the samples are refused."""
    import models

    folder = models.build("digits-cnn")
    held = np.load(folder / "eval.npz")
    held_dir = write_gray(tmp_path / "heldout", held["input"][:64, 0])
    np.save(tmp_path / "labels.npy", held["labels"][:64])
    (tmp_path / "labels.txt").write_text("\n".join(str(c) for c in held["labels"][:64]))
    common = dict(ops=("Conv", "Gemm"), min_params=4096, mac_budget=0.5, inputs=held_dir)
    _, report = onnxlr.optimize(str(folder / "model.onnx"), labels=tmp_path / "labels.npy", **common)
    (metrics,) = report["verification"]["providers"]["cpu"]["outputs"].values()
    truth = held["labels"][:64]
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    original = session.run(None, {session.get_inputs()[0].name: images.decode_folder(
        held_dir, ir.load(folder / "model.onnx"), images.parse_spec(None)).feeds["input"]})[0]
    assert metrics["reference_accuracy"] == pytest.approx(float(np.mean(original.argmax(1) == truth)))
    assert 0.8 < metrics["accuracy"] <= 1.0
    with pytest.raises(onnxlr.GateFailed, match="accuracy .* < --min-metric accuracy=1.01"):
        onnxlr.optimize(str(folder / "model.onnx"), labels=tmp_path / "labels.txt", min_metric=["accuracy=1.01"],
                        **common)
    np.save(tmp_path / "short.npy", truth[:10])
    with pytest.raises(OnnxlrError, match="labels holds 10 classes for 64 inputs samples"):
        onnxlr.optimize(str(folder / "model.onnx"), labels=tmp_path / "short.npy", **common)
    np.save(tmp_path / "floats.npy", truth.astype(np.float32))
    with pytest.raises(OnnxlrError, match="labels must be one integer a sample"):
        onnxlr.optimize(str(folder / "model.onnx"), labels=tmp_path / "floats.npy", **common)
