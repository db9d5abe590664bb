"""Know the memory before spending it: available memory, the activation estimate, and the CLI's pre-flight stop."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import onnxlr_cli, parse_text

from onnxlr.errors import OnnxlrError
from onnxlr.model_io.shapes import infer_shapes
from onnxlr.verification import memory


def test_available_takes_the_smaller_of_meminfo_and_the_cgroup(tmp_path, monkeypatch):
    monkeypatch.delenv(memory.MEMORY_LIMIT_ENV, raising=False)
    (tmp_path / "meminfo").write_text("MemTotal:  24000000 kB\nMemAvailable:  20000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert memory.available(tmp_path / "meminfo", cgroup) == memory.Available(20000000 * 1024, "MemAvailable")
    (cgroup / "memory.max").write_text("8000000000\n")
    (cgroup / "memory.current").write_text("1000000000\n")
    assert memory.available(tmp_path / "meminfo", cgroup) == memory.Available(7000000000, "cgroup limit")
    (cgroup / "memory.max").write_text("max\n")  # no limit: MemAvailable decides
    assert memory.available(tmp_path / "meminfo", cgroup).source == "MemAvailable"
    assert memory.available(tmp_path / "nothing", tmp_path / "nothing") is None
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "16GiB")
    assert memory.available(tmp_path / "meminfo", cgroup) == memory.Available(16 << 30, "$ONNXLR_MEMORY_LIMIT")


@pytest.mark.parametrize(("text", "count"), [("8000", 8000), ("8GB", 8 * 10**9), ("1.5GiB", 3 << 29),
                                             ("512MiB", 512 << 20), ("2kB", 2000)])
def test_sizes(text, count):
    assert memory.parse_size(text) == count


def test_a_bad_size_is_a_readable_error():
    with pytest.raises(OnnxlrError, match="not a size"):
        memory.parse_size("lots")


def chain(hidden: int = 64) -> ir.Model:
    """x (4, 16) -> MatMul W1 (16 x hidden) -> Relu -> MatMul W2 (hidden x 16) -> y."""
    rng = np.random.default_rng(0)
    text = '''<ir_version: 10, opset_import: ["" : 17]>
    g (float[4,16] x) => (float[4,16] y) {
        h = MatMul(x, W1)
        r = Relu(h)
        y = MatMul(r, W2)
    }'''
    return parse_text(text, W1=rng.standard_normal((16, hidden)).astype(np.float32),
                      W2=rng.standard_normal((hidden, 16)).astype(np.float32))


def test_peak_activations_count_what_is_live_at_once():
    model = chain()
    shapes = infer_shapes(model)
    # At the Relu: its input h (4x64) and its output r (4x64) are live; x was freed after the first MatMul.
    assert memory.peak_activation_bytes(model, shapes) == 2 * 4 * 64 * 4
    # Wider inner layers need more.
    assert memory.peak_activation_bytes(chain(256), infer_shapes(chain(256))) == 2 * 4 * 256 * 4


def test_check_passes_what_fits_and_stops_what_does_not():
    roomy = memory.Available(10**10, "test")
    memory.check("verification", 10**6, 10**5, "advice", roomy)
    with pytest.raises(OnnxlrError, match=r"verification would need about .* but 1.0 MB is available \(test\): "
                                          r"advice; --no-memory-check runs it anyway"):
        memory.check("verification", 10**6, 10**5, "advice", memory.Available(10**6, "test"))


def test_segments_follow_the_memory_available_up_to_a_cap():
    free = memory.Available(300 << 20, "test")
    budget = memory.segment_budget(10 << 20, free)
    assert budget is not None and memory.session_bytes(budget, 10 << 20) <= free.bytes < memory.session_bytes(
        budget + (2 << 20), 10 << 20)
    assert memory.segment_budget(0, memory.Available(20 << 30, "test")) == memory.MAX_SEGMENT_BYTES
    assert memory.segment_budget(0, memory.Available(200 << 20, "test")) is None  # under MIN_SEGMENT_BYTES


def test_optimize_stops_before_the_rewrite_when_verification_cannot_fit(tmp_path, monkeypatch):
    source = tmp_path / "m.onnx"
    onnx.save(ir.to_proto(chain(256)), source)
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "1MB")  # what a small container would report
    result = onnxlr_cli("optimize", str(source), str(tmp_path / "out.onnx"), "--no-gate")
    assert result.returncode == 2, result.stderr
    assert "verification would need about" in result.stderr and "--no-verify" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out.onnx").exists()
    assert onnxlr_cli("optimize", str(source), str(tmp_path / "out.onnx"), "--no-verify").returncode == 0
    assert onnxlr_cli("optimize", str(source), str(tmp_path / "out2.onnx"), "--no-gate",
                      "--no-memory-check").returncode == 0
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "8GB")
    assert onnxlr_cli("optimize", str(source), str(tmp_path / "out3.onnx"), "--no-gate").returncode == 0
