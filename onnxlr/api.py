"""The Python API: `onnxlr.optimize` (the whole `onnxlr optimize` job: onnxlr.job), `onnxlr.verify` (`onnxlr verify`)
and the factorization as onnx-ir passes (`FactorizationPass` and one per op family), which rewrite in place and verify nothing."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

from onnxlr import job as jobs
from onnxlr.errors import OnnxlrError
from onnxlr.factorize import cost
from onnxlr.factorize.pipeline import factorize_model
from onnxlr.model_io.io import convert
from onnxlr.settings import Progress, Settings


def optimize(model: Any, *, output: str | os.PathLike | None = None, verify: bool = True,
             progress: Progress | None = None, dry_run: bool = False, calibration: Any = None,
             calibration_samples: int | None = None, heldout: Any = None,
             input_shapes: Mapping[str, Sequence[int]] | None = None, speed_check: bool = False,
             memory_check: bool = True, inputs: str | os.PathLike | None = None, providers: Sequence[str] | None = None,
             seed: int = 0, samples: int = 8, batch_size: int = 16, atol: float | None = None,
             rtol: float | None = None, min_cosine: float | None = None, no_gate: bool = False,
             per_layer: bool = False, min_layer_cosine: float | None = None, keep_failed: bool = False,
             min_metric: Sequence[str] = (), labels: str | os.PathLike | None = None,
             pairs: str | os.PathLike | None = None, external_data: bool | None = None, tokenizer: str | os.PathLike | None = None,
             seq_len: int | None = None, text_field: str = "text", image_spec: str | None = None,
             **settings: Any) -> tuple[Any, dict]:
    """Factorize a model's MatMul/Gemm/Conv weights, verify and gate the result as `onnxlr optimize` does; returns
    (new model, report as JSON-ready dict).

    `model` is a path, an `onnx.ModelProto`, an `onnx_ir.Model` or an onnx-graphsurgeon `Graph`;
    the result is of the same kind (an `onnx_ir.Model` for a path). The input is never modified.
    Settings are the `onnxlr optimize` flags with underscores: rank_ratio, rank, energy,
    param_ratio, param_budget, mac_budget, target_cosine, target_error, rank_multiple, allow_no_gain,
    min_params, inputs_as_constants, include, exclude, ops, conv_scheme, compensate,
    svd ("auto", "exact", "randomized"), device ("cpu", "cuda"), jobs. `calibration` (an .npz, a folder of them, or an iterable of input
    dicts; at most `calibration_samples` samples) makes the factorization data-aware (whitened SVD;
    with param_budget or mac_budget, allocation by measured sensitivity); `heldout` (same kinds; default `inputs`) is
    what target_cosine / target_error are measured on. `calibration`, `heldout` and `inputs` may also be text (a .txt
    file, one sample a line, or .jsonl with `text_field`), tokenized with `tokenizer` (a tokenizer.json or its folder)
    to `seq_len` tokens (onnxlr.model_io.text), or a folder of images preprocessed as `image_spec` says
    (onnxlr.model_io.images). `input_shapes` ({input name: dims}, `--shape`) fixes
    dynamic input dims for the cost model, verification and objective="latency", which times every candidate pair
    against its original node (settings latency_budget, latency_provider, latency_threads, latency_table,
    latency_cache), then confirms the plan end to end (onnxlr.timing.confirm: layers that do not pay in the whole model are
    put back).

    Verification (`verify=False`: --no-verify) runs the result and the input on onnxruntime and compares their
    outputs, with the CLI's verification flags as keywords: inputs (an .npz; default synthesized), providers,
    seed, samples, batch_size, atol, rtol, min_cosine, min_metric ("NAME=VALUE" items), labels, pairs, no_gate,
    per_layer, min_layer_cosine. A failed gate raises
    `onnxlr.GateFailed` (its `report` holds the figures) unless `keep_failed`; the figures are the report's
    `verification`. `output` writes the model there atomically, as the CLI does (nothing written on failure;
    `external_data` as --external-data). `memory_check` (--no-memory-check: False) verifies in segments, or stops,
    when the models do not fit in memory. `speed_check` times the result against the input end to end (the
    report's `speed`; the CLI's default).
    """
    checks = jobs.VerifySettings(
        enabled=verify, inputs=inputs, providers=tuple(providers) if providers else None,
        input_shapes={name: tuple(dims) for name, dims in (input_shapes or {}).items()}, seed=seed, samples=samples, batch_size=batch_size, atol=atol, rtol=rtol,
        min_cosine=min_cosine, no_gate=no_gate, per_layer=per_layer, min_layer_cosine=min_layer_cosine,
        min_metric=tuple(min_metric), labels=labels, pairs=pairs,
        keep_failed=keep_failed)
    job = jobs.Job(source=model, settings=Settings.of(**settings), verify=checks,
                   output=jobs.OutputSettings(path=output, external_data=external_data), calibration=calibration,
                   calibration_samples=calibration_samples, heldout=heldout, dry_run=dry_run,
                   memory_check=memory_check, speed_check=speed_check, progress=progress,
                   text=jobs.TextOptions(tokenizer=tokenizer, seq_len=seq_len, text_field=text_field),
                   image_spec=image_spec)
    outcome = jobs.run(job)
    return convert(outcome.loaded.model, outcome.loaded.kind), outcome.report.to_json()



def verify(reference: str | os.PathLike, candidate: str | os.PathLike, *, inputs: str | os.PathLike | None = None,
           providers: Sequence[str] | None = None, input_shapes: Mapping[str, Sequence[int]] | None = None,
           seed: int = 0, samples: int = 8, batch_size: int = 16, atol: float | None = None, rtol: float | None = None,
           min_cosine: float | None = None, no_gate: bool = False, per_layer: bool = False,
           min_layer_cosine: float | None = None, min_metric: Sequence[str] = (),
           labels: str | os.PathLike | None = None, pairs: str | os.PathLike | None = None,
           tokenizer: str | os.PathLike | None = None, seq_len: int | None = None, text_field: str = "text",
           image_spec: str | None = None, memory_check: bool = True) -> dict:
    """`onnxlr verify`: run two models (ONNX files or exported model folders) on onnxruntime and compare their outputs;
    returns the figures as a JSON-ready dict, whose `passed` says whether every gate held (the CLI exits 1 when not).
    The keywords are the CLI's flags; `inputs` may be an .npz, text (with `tokenizer`, or the reference folder's) or
    a folder of images (`image_spec`)."""
    checks = jobs.VerifySettings(
        inputs=inputs, providers=tuple(providers) if providers else None,
        input_shapes={name: tuple(dims) for name, dims in (input_shapes or {}).items()}, seed=seed, samples=samples,
        batch_size=batch_size, atol=atol, rtol=rtol, min_cosine=min_cosine, no_gate=no_gate, per_layer=per_layer,
        min_layer_cosine=min_layer_cosine, min_metric=tuple(min_metric), labels=labels, pairs=pairs)
    text = jobs.TextOptions(tokenizer=tokenizer, seq_len=seq_len, text_field=text_field)
    return jobs.verify_files(reference, candidate, checks, text, image_spec, memory_check=memory_check).to_json()


class InvalidPassSettings(OnnxlrError, ir.passes.PreconditionError):
    """A FactorizationPass's settings are not valid: an OnnxlrError (its sentence names the keyword) that a
    PassManager sees as a failed precondition."""


class FactorizationPass(ir.passes.InPlacePass):
    """The pipeline as an onnx-ir pass: `FactorizationPass(rank_ratio=0.25)(ir_model)` rewrites in place.

    Settings are `optimize`'s keywords; `report` holds the last run's report. `apply` takes any
    model kind (a path, a ModelProto, a graphsurgeon Graph) and returns (model of that kind, report).

    Pre- and postconditions (onnx-ir's `requires` / `ensures`, run by the pass itself and by a PassManager): the
    settings are valid before anything is touched, and the rewritten model's weights take no more bytes than
    the input's (unless allow_no_gain).
    """

    ops: tuple[str, ...] | None = None  # subclasses for one op family set it

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        self.settings = {**settings, "ops": self.ops} if self.ops else settings
        self.report: dict | None = None
        self._bytes_before: int | None = None

    def requires(self, model: ir.Model) -> None:
        """The settings are valid and name no stage the pass cannot run (InvalidPassSettings: both an OnnxlrError
        that names the keyword and onnx-ir's PreconditionError); the weights' bytes are taken for `ensures`."""
        try:
            if Settings.of(**self.settings).quantize:
                raise OnnxlrError("{0} is a stage of onnxlr.optimize (it writes a new model); the pass rewrites in "
                                  "place", "quantize")
        except OnnxlrError as exc:
            raise InvalidPassSettings(exc.template, *exc.settings) from None
        self._bytes_before = cost.model_totals(model)["bytes"]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = factorize_model(model, Settings.of(**self.settings))
        self.report = result.report.to_json()
        return ir.passes.PassResult(model, modified=result.report.modified)

    def ensures(self, model: ir.Model) -> None:
        """A model the pass wrote is never larger than its input (the pipeline keeps it so; this says it holds)."""
        if self._bytes_before is None or self.settings.get("allow_no_gain"):
            return
        after = cost.model_totals(model)["bytes"]
        if after > self._bytes_before:
            raise ir.passes.PostconditionError(f"the rewritten model's weights take {after} bytes, more than the "
                                               f"input's {self._bytes_before}")

    def apply(self, model: Any, **checks: Any) -> tuple[Any, dict]:
        """onnxlr.optimize with these settings (verification keywords such as verify=False go in `checks`)."""
        return optimize(model, **self.settings, **checks)


class MatMulFactorization(FactorizationPass):
    ops = ("MatMul",)


class GemmFactorization(FactorizationPass):
    ops = ("Gemm",)


class ConvFactorization(FactorizationPass):
    ops = ("Conv",)
