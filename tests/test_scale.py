"""Scale features (issue 8): randomized vs exact SVD, streamed external data, --jobs determinism, --device.

Matrices with known spectra are built as U diag(s) V^T from random orthonormal U and V, so the exact
answer is known without LAPACK. The models are small (a few MB) but large enough that `--svd auto`
takes the randomized path for some layers and the exact one for others.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import ONNXLR, init, make_model, tensor_input
from onnx import helper, numpy_helper

import onnxlr
from onnxlr.errors import OnnxlrError
from onnxlr.factorize import lowrank, parallel
from onnxlr.model_io.save import DATA_ALIGNMENT
from onnxlr.settings import LATER_DEFAULTS


def known_spectrum(m: int, n: int, s: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return (u * s) @ v.T


SPECTRA = {  # name: (singular values for k, how much larger than optimal the residual may be)
    "geometric": (lambda k: 0.95 ** np.arange(k), 0.005),
    "power-law": (lambda k: (1.0 + np.arange(k)) ** -1.0, 0.03),  # slow decay: the hard case
    "low-rank-plus-noise": (lambda k: np.r_[np.linspace(10, 5, 40), np.full(k - 40, 0.01)], 0.001),
}


# ----------------------------------------------------------------------------- randomized vs exact


def traced_peak(call) -> int:
    """Bytes numpy allocated at most during `call` (tracemalloc counts numpy's arrays)."""
    import tracemalloc

    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_randomized_svd_memory_is_one_copy_and_two_sketches():
    # What --jobs schedules against: on an 8B model's lm_head (4096 x 32000 fp16) one more sketch-sized (n x k)
    # array is 144 MB. The float32 copy of the fp16 weight, and at most about two n x k arrays at once.
    m, n, rank = 2048, 16384, 128
    weight = np.random.default_rng(0).standard_normal((1, m, n), dtype=np.float32).astype(np.float16)
    sketch = rank + lowrank.oversampling(rank)
    peak = traced_peak(lambda: lowrank.randomized_svd(weight, rank))
    assert (peak - 4 * m * n) / (4 * sketch * n) < 3  # was 4.3: the test matrix and vt's scaling kept alive


@pytest.mark.parametrize(("m", "n", "rank", "bound"), [(2048, 16384, 128, 1.5), (8192, 2560, 640, 2.3)])
def test_whitening_by_samples_builds_its_target_in_one_copy(m, n, rank, bound):
    # R W is built in the weight's working copy a block of rows at a time, not beside it (wide: was 2.04 copies),
    # and that copy is gone before the un-whitening's K x rank float64 arrays (tall: 2.9 when a view kept it).
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((1, m, n), dtype=np.float32).astype(np.float16)
    samples = lowrank.SampleGram([rng.standard_normal((64, m)).astype(np.float16)])
    peak = traced_peak(lambda: lowrank.whitened_svd(weight, samples, rank=rank, solver=lowrank.Solver("auto")))
    assert peak / (4 * m * n) < bound


@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_randomized_agrees_with_the_known_spectrum(spectrum):
    m, n, rank = 600, 900, 64
    make, excess = SPECTRA[spectrum]
    s = make(m)
    weight = known_spectrum(m, n, s).astype(np.float32)[None]
    result = lowrank.randomized_svd(weight, rank)
    assert result.solver == "randomized" and result.s.shape == (1, rank)
    # The leading half of the singular values is accurate to float32 work; the last ones before the
    # cut converge slowest where the spectrum decays slowly.
    np.testing.assert_allclose(result.s[0, : rank // 2], s[: rank // 2], rtol=1e-3)
    np.testing.assert_allclose(result.s[0], s[:rank], rtol=0.05 if spectrum == "power-law" else 1e-3)
    # The energy bookkeeping is exact: the total is the whole matrix's, not the sketch's.
    np.testing.assert_allclose(result.total_energy, np.sum(s**2), rtol=1e-5)
    # The rank-r product is close to the best rank-r approximation, and the check measures by how much.
    a, b = result.factors(rank)
    best = known_spectrum(m, n, np.r_[s[:rank], np.zeros(m - rank)])
    error = np.linalg.norm(a[0] @ b[0] - weight[0]) ** 2
    optimal = np.linalg.norm(best - weight[0]) ** 2
    floor = lowrank.RESIDUAL_FLOOR * np.sum(s**2)
    assert error <= optimal * (1 + excess) + floor
    measured = lowrank.tail_excess(weight, result, rank)
    assert measured < excess
    np.testing.assert_allclose(max(error, floor) / max(optimal, floor) - 1, measured, atol=2e-3)


def test_auto_keeps_randomized_when_the_tail_check_passes():
    weight = known_spectrum(600, 900, SPECTRA["geometric"][0](600)).astype(np.float32)[None]
    result = lowrank.decompose(weight, 64, lowrank.Solver(svd="auto"))
    assert result.solver == "randomized"
    assert result.tail_excess is not None and result.tail_excess < lowrank.MAX_TAIL_EXCESS


def test_auto_falls_back_to_exact_when_the_tail_check_fails():
    """A Gaussian matrix has a flat spectrum, the randomized SVD's worst case: the check catches it."""
    weight = np.random.default_rng(3).standard_normal((1, 512, 768)).astype(np.float32)
    randomized = lowrank.randomized_svd(weight, 64)
    assert lowrank.tail_excess(weight, randomized, 64) > lowrank.MAX_TAIL_EXCESS
    result = lowrank.decompose(weight, 64, lowrank.Solver(svd="auto"))
    assert result.solver == "exact (fallback)"
    exact = lowrank.svd(weight)
    np.testing.assert_allclose(result.s, exact.s)
    # Asked for explicitly, the randomized result is kept, with its measured excess.
    forced = lowrank.decompose(weight, 64, lowrank.Solver(svd="randomized"))
    assert forced.solver == "randomized" and forced.tail_excess > lowrank.MAX_TAIL_EXCESS


@pytest.mark.parametrize(("shape", "rank", "method", "expected"), [
    ((1, 600, 900), 64, "auto", "randomized"),
    ((1, 600, 900), 600, "auto", "exact"),        # full rank stays exact (exactness tests rely on it)
    ((1, 600, 900), 300, "auto", "exact"),        # rank not small against the matrix
    ((1, 300, 900), 16, "auto", "exact"),         # small matrix: LAPACK
    ((1, 300, 900), 16, "randomized", "randomized"),
    ((1, 300, 900), 295, "randomized", "exact"),  # the sketch would be the whole matrix
    ((1, 600, 900), None, "randomized", "exact"),  # the policy needs the whole spectrum
    ((1, 600, 900), 64, "exact", "exact"),
])
def test_solver_choice(shape, rank, method, expected):
    assert lowrank.choose_solver(shape, rank, method) == expected


def test_randomized_is_deterministic_and_works_per_group():
    stack = np.stack([known_spectrum(520, 700, 0.9 ** np.arange(520), seed=i) for i in range(3)]).astype(np.float32)
    first = lowrank.randomized_svd(stack, 32)
    second = lowrank.randomized_svd(stack.copy(), 32)
    assert first.u.tobytes() == second.u.tobytes() and first.vt.tobytes() == second.vt.tobytes()
    for group in range(3):
        np.testing.assert_allclose(first.s[group], 0.9 ** np.arange(32), rtol=1e-3)


def test_torch_backend_agrees_with_numpy():
    """The --device cuda code path, run by torch on the CPU (no GPU needed to check its algebra)."""
    pytest.importorskip("torch")
    weight = known_spectrum(520, 700, 0.9 ** np.arange(520)).astype(np.float32)[None]
    with_torch = lowrank._randomized_one(lowrank._TorchOps("cpu"), weight[0], 32, 48, 0, 2)
    with_numpy = lowrank.randomized_svd(weight, 32)
    np.testing.assert_allclose(with_torch[1], with_numpy.s[0], rtol=1e-4)
    np.testing.assert_allclose(with_torch[0] * with_torch[1] @ with_torch[2],
                               with_numpy.u[0] * with_numpy.s[0] @ with_numpy.vt[0], atol=1e-4)
    exact = lowrank._exact_torch(weight, "cpu")
    np.testing.assert_allclose(exact.s, lowrank.svd(weight).s, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- models


def _scale_model(path: Path) -> Path:
    """x (batch, 512) -> three MatMuls and a Gemm; weights with decaying and with flat spectra.

    At --rank-ratio 0.25 under --svd auto: `decaying` (512x1024) is randomized and checked, `flat`
    (1024x512) falls back to exact, `large` (512x2304, above the check size) is randomized unchecked
    and `small` (Gemm 64x512) is exact.
    """
    rng = np.random.default_rng(0)
    decaying = known_spectrum(512, 1024, 0.97 ** np.arange(512), seed=1).astype(np.float32)
    flat = (rng.standard_normal((1024, 512)) / 32).astype(np.float32)
    large = known_spectrum(512, 2304, 1.0 / (1.0 + np.arange(512)), seed=2).astype(np.float32)
    small = (rng.standard_normal((64, 2304)) / 48).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "decaying"], ["h1"], name="decaying"),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "flat"], ["h2"], name="flat"),
             helper.make_node("MatMul", ["h2", "large"], ["h3"], name="large"),
             helper.make_node("Gemm", ["h3", "small", "bias"], ["y"], name="small", transB=1)]
    inits = [init("decaying", decaying), init("flat", flat), init("large", large), init("small", small),
             init("bias", rng.standard_normal(64).astype(np.float32))]
    model = make_model(nodes, [tensor_input("x", ["batch", 512])], [tensor_input("y", ["batch", 64])], inits)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def scale_model(tmp_path_factory) -> Path:
    return _scale_model(tmp_path_factory.mktemp("scale") / "model.onnx")


def _start(args: list, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([*ONNXLR, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _finish(process: subprocess.Popen) -> str:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return stderr


def _external_entries(path: Path) -> dict[str, dict[str, str]]:
    proto = onnx.load(str(path), load_external_data=False)
    return {t.name: {e.key: e.value for e in t.external_data} for t in proto.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}


def _outputs(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(9).standard_normal((4, 512)).astype(np.float32)
    return session.run(None, {"x": x})[0]


# ----------------------------------------------------------------------------- streamed external data


def test_model_above_the_threshold_is_streamed_to_external_data_and_reloads_identically(scale_model, tmp_path):
    streamed, single = tmp_path / "ext" / "o.onnx", tmp_path / "one" / "o.onnx"
    common = ["--rank-ratio", "0.25", "--exclude", "small", "-q"]
    runs = [_start(["optimize", scale_model, streamed, "--external-data-threshold", "1MB",
                    "--report", tmp_path / "ext.json", *common]),
            _start(["optimize", scale_model, single, "--report", tmp_path / "one.json", *common])]
    for process in runs:
        _finish(process)
    # Above the threshold: external data; below it (the default 2 GB): one file.
    assert sorted(p.name for p in streamed.parent.iterdir()) == ["o.onnx", "o.onnx.data"]
    assert sorted(p.name for p in single.parent.iterdir()) == ["o.onnx"]
    onnx.checker.check_model(str(streamed), full_check=True)
    entries = _external_entries(streamed)
    assert {e["location"] for e in entries.values()} == {"o.onnx.data"}
    # Streaming: the factors were written while the graph was rewritten, before the tensors left
    # as they were (the excluded Gemm weight), and every tensor starts on a page boundary.
    offsets = {name: int(e.get("offset", 0)) for name, e in entries.items()}
    factors = [o for name, o in offsets.items() if "_lr_" in name]
    assert len(factors) == 6 and max(factors) < offsets["small"]
    assert all(offset % DATA_ALIGNMENT == 0 for offset in offsets.values())
    # It reloads to the same graph and the same tensors as the single-file output.
    ext_proto, one_proto = onnx.load(str(streamed)), onnx.load(str(single))
    assert [n.SerializeToString() for n in ext_proto.graph.node] == [n.SerializeToString() for n in one_proto.graph.node]
    ext_tensors = {t.name: numpy_helper.to_array(t) for t in ext_proto.graph.initializer}
    one_tensors = {t.name: numpy_helper.to_array(t) for t in one_proto.graph.initializer}
    assert ext_tensors.keys() == one_tensors.keys()
    for name, array in one_tensors.items():
        assert ext_tensors[name].tobytes() == array.tobytes(), name
    np.testing.assert_array_equal(_outputs(streamed), _outputs(single))
    # Verification ran on the staged files, before they were moved into place.
    assert json.loads((tmp_path / "ext.json").read_text())["verification"]["passed"]


def test_api_keeps_settings_names_and_reports_the_solver(scale_model):
    model, report = onnxlr.optimize(scale_model, rank_ratio=0.25, svd="auto", device="cpu", jobs=2, verify=False)
    solvers = {layer["name"]: layer["svd"] for layer in report["layers"]}
    assert solvers == {"decaying": "randomized", "flat": "exact (fallback)", "large": "randomized", "small": "exact"}
    by_name = {layer["name"]: layer for layer in report["layers"]}
    assert by_name["decaying"]["svd_tail_excess"] < lowrank.MAX_TAIL_EXCESS
    assert by_name["large"]["svd_tail_excess"] is None  # above the size the exact check is done for
    assert report["settings"]["svd"] == "auto" and report["settings"]["jobs"] == 2
    _, exact_report = onnxlr.optimize(scale_model, rank_ratio=0.25, svd="exact", verify=False)
    assert {layer["svd"] for layer in exact_report["layers"]} == {"exact"}
    # The model records every setting but --jobs (and settings added later, while at their default).
    recorded = {k: v for k, v in report["settings"].items() if k != "jobs" and k not in LATER_DEFAULTS}
    assert recorded["ops"] == ["MatMul", "Gemm", "Conv", "LSTM", "GRU", "RNN"]
    recorded["ops"] = ["MatMul", "Gemm", "Conv"]  # the default ops, recorded without those added later
    assert model.metadata_props["onnxlr.settings"] == json.dumps(recorded, sort_keys=True)


@pytest.mark.parametrize(("settings", "message"), [
    ({"svd": "fast"}, "svd must be one of"),
    ({"device": "tpu"}, "device must be one of"),
    ({"jobs": 0}, "jobs must be a positive integer"),
])
def test_api_refuses_bad_values(scale_model, settings, message):
    with pytest.raises(OnnxlrError, match=message):
        onnxlr.optimize(scale_model, **settings, verify=False)


# ----------------------------------------------------------------------------- --jobs determinism


def test_jobs_give_byte_identical_output(scale_model, tmp_path):
    runs = []
    for jobs in (1, 3):
        out = tmp_path / f"jobs{jobs}"
        runs.append((out, _start(["optimize", scale_model, out / "o.onnx", "--external-data", "--jobs", jobs,
                                  "--rank-ratio", "0.25", "--report", out / "report.json", "-q", "--no-verify"],
                                 env={"PYTHONHASHSEED": str(jobs)})))
    for _, process in runs:
        _finish(process)
    (one, _), (three, _) = runs
    for name in ("o.onnx", "o.onnx.data"):
        assert (one / name).read_bytes() == (three / name).read_bytes(), name
    reports = [json.loads((out / "report.json").read_text()) for out in (one, three)]
    assert reports[0]["layers"] == reports[1]["layers"]
    assert {layer["svd"] for layer in reports[0]["layers"]} == {"randomized", "exact (fallback)", "exact"}


def _overlaps(costs: list[int]) -> int:
    """How many pairs of items ran at the same time, two jobs under ordered_map's default budget."""
    spans: list[tuple[float, float]] = []

    def work(index: int) -> int:
        start = time.perf_counter()
        time.sleep(0.2)
        spans.append((start, time.perf_counter()))
        return index

    results = parallel.ordered_map(work, range(len(costs)), jobs=2, cost=lambda i: costs[i])
    assert list(results) == list(range(len(costs)))
    return sum(1 for i, (a, b) in enumerate(spans) for c, d in spans[i + 1:] if a < d and c < b)


def test_jobs_budget_follows_the_memory_available(monkeypatch):
    # Two 600 MB working sets (an 8B model's MLP SVDs) run at once where a quarter of the memory holds both
    # (the budget: 640 MB per job, at most a quarter of the memory) ...
    monkeypatch.setenv("ONNXLR_MEMORY_LIMIT", "8GB")
    assert parallel.working_set_budget(2) == 2 * parallel.JOB_BUDGET_BYTES and parallel.working_set_budget(8) == 2 * 10**9
    assert _overlaps([600 << 20] * 2) == 1
    # ... one at a time where it does not (never below the 512 MB floor, so a large item still runs) ...
    monkeypatch.setenv("ONNXLR_MEMORY_LIMIT", "1GB")
    assert parallel.working_set_budget(2) == parallel.DEFAULT_BUDGET_BYTES
    assert _overlaps([600 << 20] * 2) == 0
    # ... and small items two at a time either way.
    assert _overlaps([100 << 20] * 2) == 1


def test_short_items_run_beside_a_long_one_and_come_back_in_order(monkeypatch):
    # An 8B block: a long MLP SVD, then the next block's short q/k/v: the other thread takes them while the long
    # one runs (each waits for its turn), instead of one of two cores sitting idle.
    monkeypatch.setenv("ONNXLR_MEMORY_LIMIT", "8GB")
    durations = [0.8, 0.1, 0.1, 0.1]
    spans: dict[int, tuple[float, float]] = {}

    def work(index: int) -> int:
        start = time.perf_counter()
        time.sleep(durations[index])
        spans[index] = (start, time.perf_counter())
        return index

    assert list(parallel.ordered_map(work, range(4), jobs=2, cost=lambda i: 100 << 20)) == [0, 1, 2, 3]
    assert all(spans[i][1] < spans[0][1] for i in (1, 2, 3)), spans


# ----------------------------------------------------------------------------- bad values on the CLI


def test_help_lists_the_scale_flags():
    result = subprocess.run([*ONNXLR, "optimize", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--svd", "--device", "--jobs", "--external-data-threshold"):
        assert flag in result.stdout, flag


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.parametrize("args", [["--svd", "fast"], ["--jobs", "0"], ["--external-data-threshold", "lots"],
                                  pytest.param(["--device", "cuda"], marks=pytest.mark.skipif(
                                      _has_cuda(), reason="a CUDA GPU is present"))])
def test_cli_bad_values_exit_2_without_traceback_or_output(scale_model, tmp_path, args):
    out = tmp_path / "out" / "o.onnx"
    result = subprocess.run([*ONNXLR, "optimize", str(scale_model), str(out), *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    if args[0] == "--device":
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxlr: error: --device cuda"), result.stderr
