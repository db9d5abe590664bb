"""--objective latency: candidates timed as micro-models, the planner keeping only pairs measured faster.

Planning decisions are tested with latency tables whose times are set by the test (the format `onnxlr bench
--export-latency-table` writes, with the keys it wrote): a plan must follow the times it is given, whatever this
machine's noise. Real timing is tested for what it must do whatever the times are: the micro-models run, the
cache is reused, the report's figures agree with the plan.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import onnxlr_cli, parse_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnxlr.passes import Context

import onnxlr
from onnxlr.errors import OnnxlrError
from onnxlr.factorize.targets import find_targets
from onnxlr.model_io.shapes import default_opset, infer_shapes
from onnxlr.settings import Settings
from onnxlr.timing import latency

ROWS = 64
BATCH = {"x0": (32, ROWS), "x1": (32, ROWS), "x2": (32, ROWS)}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test times into its own cache folder: nothing leaks between tests or into ~/.cache."""
    monkeypatch.setenv("ONNXLR_CACHE_DIR", str(tmp_path / "cache"))


def matmuls(count: int = 3, seed: int = 0) -> ir.Model:
    """layer{i}: y{i} = MatMul(x{i}, W{i}), x{i} (N, 64) with a dynamic N, W{i} 64x64 with a decaying spectrum."""
    rng = np.random.default_rng(seed)
    weights = {}
    for i in range(count):
        u, _ = np.linalg.qr(rng.standard_normal((ROWS, ROWS)))
        v, _ = np.linalg.qr(rng.standard_normal((ROWS, ROWS)))
        weights[f"W{i}"] = ((u * 0.9 ** np.arange(ROWS)) @ v.T).astype(np.float32)
    inputs = ", ".join(f"float[N,{ROWS}] x{i}" for i in range(count))
    outputs = ", ".join(f"float[N,{ROWS}] y{i}" for i in range(count))
    body = "\n".join(f"    [layer{i}] y{i} = MatMul(x{i}, W{i})" for i in range(count))
    return parse_text(f'<ir_version: 10, opset_import: ["" : 17]>\ng ({inputs}) => ({outputs}) {{\n{body}\n}}',
                      **weights)


def crafted_table(model: ir.Model, path, pair_time, shapes=BATCH) -> dict:
    """Export the model's table (real keys), then set every time: originals 1 ms, each pair pair_time(rank) ms.
    (The layers have the same shapes, so they share their keys and the crafted times.)"""
    latency.export_table(model, shapes, path)
    table = json.loads(path.read_text())
    for key in table["entries"]:
        table["entries"][key] = 1.0 if key.endswith("|original") else pair_time(int(key.rsplit("|r", 1)[1]))
    path.write_text(json.dumps(table))
    return table


def planned(model: ir.Model, shapes=BATCH, **settings) -> dict:
    _, report = onnxlr.optimize(model, input_shapes=shapes, **settings, verify=False)
    return report


def rows(report: dict) -> dict[str, dict]:
    return {row["name"]: row for row in report["layers"]}


# ----------------------------------------------------------------------------- ranks and ladders


def test_ladders_are_vector_multiples_below_break_even():
    groups = _groups(matmuls(1))
    (scheme,) = groups[0].schemes
    assert scheme.break_even_rank == 32
    assert latency.ladder_ranks(scheme) == [8, 16, 24]
    assert latency.ladder_ranks(scheme, rank_multiple=16) == [16]
    assert latency.table_ranks(scheme) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 24]
    assert latency.rounded_ranks(13, scheme) == [13, 16]  # 32 is break-even: not a candidate
    assert latency.rounded_ranks(40, scheme) == []


def _groups(model: ir.Model):
    context = Context(shapes=infer_shapes(model), opset=default_opset(model))
    return find_targets(model, Settings.of(), context).groups


# ----------------------------------------------------------------------------- plans follow the times


def test_a_pair_slower_than_its_original_is_never_planned(tmp_path):
    model = matmuls(1)
    crafted_table(model, tmp_path / "slow.json", lambda rank: 1.2)
    report = planned(model, rank_ratio=0.25, latency_table=str(tmp_path / "slow.json"))
    row = rows(report)["layer0"]
    assert row["status"] == "skipped" and row["reason_code"] == "not_faster"
    assert report["latency"]["timed_models"] == 0 and report["latency"]["source"].startswith("table")
    # Barely faster (within the 5% margin) is not faster either.
    crafted_table(model, tmp_path / "close.json", lambda rank: 0.97)
    assert rows(planned(model, rank_ratio=0.25, latency_table=str(tmp_path / "close.json")))["layer0"][
        "reason_code"] == "not_faster"


@pytest.mark.parametrize(("rounded_ms", "expected"), [(0.5, 16), (0.9, 13)])
def test_a_per_layer_rank_rounds_up_only_when_that_is_faster(tmp_path, rounded_ms, expected):
    model = matmuls(1)
    # --rank-ratio 0.2 gives rank 13; the table has no rank 13 (not a multiple of 8): time it here.
    table = crafted_table(model, tmp_path / "t.json", lambda rank: rounded_ms if rank == 16 else 0.8)
    key16 = next(k for k in table["entries"] if k.endswith("|r16"))
    table["entries"][key16.replace("|r16", "|r13")] = 0.7
    (tmp_path / "t.json").write_text(json.dumps(table))
    row = rows(planned(model, rank_ratio=0.2, latency_table=str(tmp_path / "t.json")))["layer0"]
    assert row["status"] == "factorized" and row["rank"] == expected
    assert row["pair_ms"] == pytest.approx(min(rounded_ms, 0.7)) and row["original_ms"] == 1.0


def test_a_param_budget_allocates_only_ranks_measured_faster(tmp_path):
    model = matmuls(3)
    crafted_table(model, tmp_path / "t.json", lambda rank: 0.5 if rank <= 8 else 1.5)
    report = planned(model, param_budget=0.9, latency_table=str(tmp_path / "t.json"))
    factorized = [row for row in report["layers"] if row["status"] == "factorized"]
    assert factorized and all(row["rank"] == 8 for row in factorized)  # 16 and 24 would fit the budget, but are slower
    assert report["totals"]["params_after"] <= 0.9 * report["totals"]["params_before"]


@pytest.mark.parametrize("budget", [0.5, 0.7, 0.9])
def test_a_latency_budget_keeps_the_measured_time_within_it(tmp_path, budget):
    model = matmuls(3)
    # Time grows with the rank; rank 24 is no faster than 16 (dropped from the ladder: 16 gives more for less).
    times = {8: 0.3, 16: 0.45, 24: 0.5}
    crafted_table(model, tmp_path / "t.json", lambda rank: times.get(rank, 0.25))
    report = planned(model, latency_budget=budget, latency_table=str(tmp_path / "t.json"))
    plan = report["latency"]
    assert report["settings"]["objective"] == "latency"
    assert plan["planned_ms"] <= budget * plan["targets_ms"] + 1e-9
    used = sum(row["pair_ms"] if row["status"] == "factorized" else row["original_ms"] for row in report["layers"])
    assert used == pytest.approx(plan["planned_ms"])
    assert all(row["rank"] in (8, 16, 24) for row in report["layers"] if row["status"] == "factorized")


def test_a_larger_latency_budget_keeps_more(tmp_path):
    model = matmuls(3)
    crafted_table(model, tmp_path / "t.json", lambda rank: 0.2 + rank / 40)
    kept = []
    for budget in (0.4, 0.6, 0.8):
        report = planned(model, latency_budget=budget, latency_table=str(tmp_path / "t.json"))
        kept.append(report["totals"]["params_after"])
    assert kept == sorted(kept) and kept[0] < kept[-1]


def test_a_latency_budget_below_the_fastest_plan_is_refused(tmp_path):
    model = matmuls(2)
    crafted_table(model, tmp_path / "t.json", lambda rank: 0.6)
    with pytest.raises(OnnxlrError, match="latency_budget 0.3 is too small: the lowest rank measured faster"):
        planned(model, latency_budget=0.3, latency_table=str(tmp_path / "t.json"))


def test_a_layer_missing_from_the_table_stays_dense(tmp_path):
    model = matmuls(1)
    table = crafted_table(model, tmp_path / "t.json", lambda rank: 0.5)
    table["entries"] = {}
    (tmp_path / "t.json").write_text(json.dumps(table))
    row = rows(planned(model, rank_ratio=0.25, latency_table=str(tmp_path / "t.json")))["layer0"]
    assert row["reason_code"] == "not_timed" and "not in the latency table" in row["reason"]


# ----------------------------------------------------------------------------- real timing


def test_every_planned_pair_was_measured_faster_and_the_totals_add_up():
    big = {name: (4096, ROWS) for name in BATCH}  # large enough that rank-16 pairs save a measurable time
    report = planned(matmuls(3), big, rank_ratio=0.25, objective="latency")
    plan = report["latency"]
    assert plan["source"] == "measured" and plan["timed_models"] > 0 and plan["timing_s"] > 0
    for row in report["layers"]:
        assert row["original_ms"] > 0
        if row["status"] == "factorized":
            assert row["pair_ms"] * (1 + latency.MARGIN) <= row["original_ms"]
        else:
            assert row["reason_code"] == "not_faster" and row["pair_ms"] is None
    saving = sum(row["original_ms"] - row["pair_ms"] for row in report["layers"] if row["status"] == "factorized")
    assert plan["planned_saving_ms"] == pytest.approx(saving, abs=1e-3)


def test_measurements_are_cached_per_device_and_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "probe_ms", lambda provider, threads, runs=20: 1.0)  # this machine's speed held
    model = matmuls(2)
    first = planned(model, rank_ratio=0.25, objective="latency")["latency"]
    assert first["timed_models"] > 0 and first["cache"] is not None
    cached = json.loads(open(first["cache"]).read())
    assert cached["context"]["provider"] == "cpu" and cached["context"]["threads"] == 1 and cached["entries"]
    again = planned(model, rank_ratio=0.25, objective="latency")["latency"]
    assert again["timed_models"] == 0 and again["reused_entries"] > 0
    # Another thread count is another device context: timed anew.
    assert planned(model, rank_ratio=0.25, objective="latency", latency_threads=2)["latency"]["timed_models"] > 0
    fresh = planned(model, rank_ratio=0.25, objective="latency", latency_cache=False)["latency"]
    assert fresh["timed_models"] > 0 and fresh["cache"] is None


CONV_CASES = [
    dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[3, 3], strides=[2, 2], dilations=[1, 1]),
    dict(kernel_shape=[3, 1], pads=[1, 0, 1, 0], dilations=[2, 1]),
    dict(kernel_shape=[3, 3], group=2, auto_pad="SAME_UPPER"),
]


@pytest.mark.parametrize("attributes", CONV_CASES)
def test_conv_micro_models_run_every_view(attributes):
    """The original micro-model computes what the node computes; every view's pair runs and keeps the output shape."""
    rng = np.random.default_rng(0)
    group = attributes.get("group", 1)
    kh, kw = attributes["kernel_shape"]
    weight = rng.standard_normal((16, 8 // group, kh, kw)).astype(np.float32)
    bias = rng.standard_normal(16).astype(np.float32)
    node = onnx.helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", **attributes)
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", 1, ["N", 8, 10, 10])],
                                   [onnx.helper.make_tensor_value_info("y", 1, None)],
                                   [onnx.numpy_helper.from_array(weight, "W"), onnx.numpy_helper.from_array(bias, "B")])
    model = ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    shapes = infer_shapes(model, {"x": (2, 8, 10, 10)})
    (group_,) = _groups_at(model, shapes)
    target = group_.lead
    import onnxruntime as ort

    original, feeds = latency.original_model(target, shapes)
    whole = ort.InferenceSession(ir.to_proto(model).SerializeToString()).run(None, {"x": feeds["x"]})[0]
    micro = ort.InferenceSession(original).run(None, feeds)[0]
    np.testing.assert_allclose(micro, whole, rtol=1e-5, atol=1e-5)
    for scheme in group_.schemes:
        for rank in latency.table_ranks(scheme)[:3]:
            pair, pair_feeds = latency.pair_model(target, scheme, rank, shapes)
            assert ort.InferenceSession(pair).run(None, pair_feeds)[0].shape == whole.shape


def _groups_at(model: ir.Model, shapes):
    return find_targets(model, Settings.of(), Context(shapes=shapes, opset=default_opset(model))).groups


# ----------------------------------------------------------------------------- settings, CLI, tables


def test_settings_for_latency():
    assert Settings.of(latency_budget=0.5).objective == "latency"
    assert Settings.of(latency_budget=0.5).budget == ("latency", 0.5)
    with pytest.raises(OnnxlrError, match="objective"):
        Settings.of(objective="speed")
    with pytest.raises(OnnxlrError, match="choose one rank policy"):
        Settings.of(latency_budget=0.5, param_budget=0.5)
    with pytest.raises(OnnxlrError, match="latency_provider"):
        Settings.of(objective="latency", latency_provider="tpu")
    # Later settings at their defaults are not recorded: a size run writes the same bytes as before.
    assert "objective" not in Settings.of().recorded() and Settings.of(objective="latency").recorded()["objective"]


def test_dynamic_dims_without_shapes_say_what_to_pass(tmp_path):
    source = tmp_path / "m.onnx"
    onnx.save(ir.to_proto(matmuls(1)), source)
    result = onnxlr_cli("optimize", str(source), str(tmp_path / "out.onnx"), "--objective", "latency")
    assert result.returncode == 2, result.stderr
    assert "--shape NAME:DIMS for the model's dynamic inputs (x0)" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_a_file_that_is_no_latency_table_is_refused(tmp_path):
    source = tmp_path / "m.onnx"
    onnx.save(ir.to_proto(matmuls(1)), source)
    (tmp_path / "t.json").write_text('{"entries": 3}')
    result = onnxlr_cli("optimize", str(source), str(tmp_path / "out.onnx"), "--latency-table",
                        str(tmp_path / "t.json"), "--shape", "x0:32x64")
    assert result.returncode == 2 and "not an onnxlr latency table" in result.stderr


def test_the_table_round_trip_through_the_cli(tmp_path):
    """bench --export-latency-table on one machine, optimize --latency-table on another: nothing timed there."""
    source = tmp_path / "m.onnx"
    onnx.save(ir.to_proto(matmuls(2)), source)
    big = ["--shape", "x0:4096x64", "--shape", "x1:4096x64"]  # rank 8 pairs then save a measurable time
    exported = onnxlr_cli("bench", str(source), *big, "--runs", "2",
                          "--export-latency-table", str(tmp_path / "device.json"), "--json", str(tmp_path / "b.json"))
    assert exported.returncode == 0, exported.stderr
    table = json.loads((tmp_path / "device.json").read_text())
    assert table["format"] == latency.TABLE_FORMAT and table["context"]["provider"] == "cpu"
    assert json.loads((tmp_path / "b.json").read_text())["latency_table"]["layers"] == 2
    result = onnxlr_cli("optimize", str(source), str(tmp_path / "out.onnx"), "--param-budget", "0.9",
                        "--latency-table", str(tmp_path / "device.json"), *big, "--report", str(tmp_path / "r.json"),
                        "--no-gate")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["latency"]["timed_models"] == 0 and "latency plan (table" in result.stdout
    for row in report["layers"]:
        if row["status"] == "factorized":
            assert row["pair_ms"] * (1 + latency.MARGIN) <= row["original_ms"]


def test_bench_profile_pairs_layers_whichever_model_is_rewritten(tmp_path):
    source = tmp_path / "m.onnx"
    onnx.save(ir.to_proto(matmuls(2)), source)
    rewritten, _ = onnxlr.optimize(str(source), rank_ratio=0.25, verify=False)
    ir.save(rewritten, tmp_path / "lr.onnx")
    for first, second in ((source, tmp_path / "lr.onnx"), (tmp_path / "lr.onnx", source)):
        result = onnxlr_cli("bench", str(first), "--compare", str(second), "--profile", "--runs", "2",
                            "--shape", "x0:32x64", "--shape", "x1:32x64", "--json", str(tmp_path / "p.json"))
        assert result.returncode == 0, result.stderr
        layers = json.loads((tmp_path / "p.json").read_text())["providers"]["cpu"]["profile"]["layers"]
        assert sorted(layer["name"] for layer in layers) == ["layer0", "layer1"]
        assert all(layer["original_us"] and layer["pair_us"] for layer in layers)


def test_bench_profile_lists_layers_narrowed_jointly(tmp_path):
    """A layer narrowed with its coupled partner keeps its node: its time is compared with the original's."""
    from onnxlr.timing import bench

    original = matmuls(2)
    narrowed = matmuls(2)
    narrowed.metadata_props["onnxlr.joint"] = json.dumps({"layer1": [32, 64]})  # as onnxlr records it
    ir.save(original, tmp_path / "m.onnx")
    ir.save(narrowed, tmp_path / "joint.onnx")
    feeds = {f"x{i}": np.ones((32, ROWS), np.float32) for i in range(2)}
    for first, second in (("m.onnx", "joint.onnx"), ("joint.onnx", "m.onnx")):
        profile = bench.profile_layers(str(tmp_path / first), str(tmp_path / second), feeds, runs=2)
        assert [(layer["name"], layer["kind"]) for layer in profile["layers"]] == [("layer1", "joint")]
        assert profile["layers"][0]["original_us"] > 0 and profile["layers"][0]["pair_us"] > 0


# ----------------------------------------------------------------------------- any times, any budget

SHAPES = ((64, 64), (64, 96), (96, 48))  # distinct shapes: each layer its own table entries


@pytest.fixture(scope="module")
def mixed_table(tmp_path_factory):
    """A model of three MatMuls of distinct shapes and its exported table (real keys; times set per example)."""
    rng = np.random.default_rng(1)
    weights = {f"W{i}": (rng.standard_normal(shape) * 0.9 ** np.arange(shape[1])).astype(np.float32)
               for i, shape in enumerate(SHAPES)}
    inputs = ", ".join(f"float[N,{rows}] x{i}" for i, (rows, _) in enumerate(SHAPES))
    outputs = ", ".join(f"float[N,{cols}] y{i}" for i, (_, cols) in enumerate(SHAPES))
    body = "\n".join(f"    [layer{i}] y{i} = MatMul(x{i}, W{i})" for i in range(len(SHAPES)))
    model = parse_text(f'<ir_version: 10, opset_import: ["" : 17]>\ng ({inputs}) => ({outputs}) {{\n{body}\n}}',
                       **weights)
    shapes = {f"x{i}": (32, rows) for i, (rows, _) in enumerate(SHAPES)}
    folder = tmp_path_factory.mktemp("mixed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONNXLR_CACHE_DIR", str(folder / "cache"))
        latency.export_table(model, shapes, folder / "table.json")
    return model, shapes, json.loads((folder / "table.json").read_text()), folder


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(times=st.lists(st.floats(0.05, 2.0), min_size=200, max_size=200),
       policy=st.sampled_from(["latency_budget", "param_budget", "mac_budget", "rank_ratio", "energy"]),
       fraction=st.floats(0.2, 1.0))
def test_any_times_give_a_plan_of_faster_pairs_within_the_budget(mixed_table, times, policy, fraction):
    model, shapes, table, folder = mixed_table
    crafted = dict(table, entries={key: times[index % len(times)] for index, key in enumerate(sorted(table["entries"]))})
    path = folder / "crafted.json"
    path.write_text(json.dumps(crafted))
    try:
        _, report = onnxlr.optimize(model, input_shapes=shapes, latency_table=str(path), **{policy: fraction}, verify=False)
    except OnnxlrError as exc:
        assert "too small" in str(exc) and policy.endswith("budget")
        return
    plan = report["latency"]
    for row in report["layers"]:
        if row["status"] == "factorized":
            assert row["pair_ms"] * (1 + latency.MARGIN) <= row["original_ms"]
            assert row["rank"] < row["break_even_rank"]
        else:
            assert row["reason_code"] in ("not_faster", "kept_dense_by_budget", "no_gain")
    if policy == "latency_budget":
        assert plan["planned_ms"] <= fraction * plan["targets_ms"] + 1e-9
    if policy == "param_budget":
        kept = sum(row["params_after"] for row in report["layers"])
        assert kept <= fraction * sum(row["params_before"] for row in report["layers"]) + 1e-9


@pytest.mark.parametrize(("probe_now", "retimed"), [(1.5, False), (0.6, False), (8.0, True), (0.125, True)])
def test_cached_times_taken_under_another_load_are_timed_again(monkeypatch, probe_now, retimed):
    """Each layer's cached times keep the probe's time taken with them; a probe now more than 2x off means they
    were taken while the machine ran at another speed, and the layer is timed again (its probe with it)."""
    model = matmuls(2)
    monkeypatch.setattr(latency, "probe_ms", lambda provider, threads, runs=20: 1.0)
    first = planned(model, rank_ratio=0.25, objective="latency")["latency"]
    cached = json.loads(open(first["cache"]).read())["entries"]
    probes = [key for key in cached if key.endswith("|probe")]
    assert probes and all(cached[key] == 1.0 for key in probes)  # one per layer shape timed
    monkeypatch.setattr(latency, "probe_ms", lambda provider, threads, runs=20: probe_now)
    again = planned(model, rank_ratio=0.25, objective="latency")["latency"]
    assert (again["timed_models"] > 0) == retimed and again["stale_layers_retimed"] == (len(probes) if retimed else 0)
    entries = json.loads(open(first["cache"]).read())["entries"]
    assert all(entries[key] == (probe_now if retimed else 1.0) for key in probes)


def test_the_probe_times_a_real_matmul():
    assert 0 < latency.probe_ms("cpu", 1, runs=3) < 1000
