"""onnxlr: low-rank factorization of ONNX models (MatMul, Gemm and Conv weights).

    import onnxlr
    new_model, report = onnxlr.optimize("model.onnx", rank_ratio=0.25)
    onnxlr.save(new_model, "model-lr.onnx")
"""

from __future__ import annotations

import os
from typing import Any

import onnx_ir as ir

from onnxlr._version import __version__
from onnxlr.errors import GateFailed, OnnxlrError
from onnxlr.factorize import Progress, Settings, factorize_model
from onnxlr.io import LoadedModel, convert, load, save


def optimize(model: Any, *, progress: Progress | None = None, dry_run: bool = False,
             calibration: Any = None, calibration_samples: int | None = None, heldout: Any = None,
             **settings: Any) -> tuple[Any, dict]:
    """Factorize a model's MatMul/Gemm/Conv weights; returns (new model, report).

    `model` is a path, an `onnx.ModelProto`, an `onnx_ir.Model` or an onnx-graphsurgeon `Graph`;
    the result is of the same kind (an `onnx_ir.Model` for a path). The input is never modified.
    Settings are the `onnxlr optimize` flags with underscores: rank_ratio, rank, energy,
    param_ratio, param_budget, mac_budget, target_cosine, target_error, rank_multiple, allow_no_gain, min_params, include,
    exclude, ops, conv_scheme, compensate, svd ("auto", "exact", "randomized"), device ("cpu",
    "cuda"), jobs. `calibration` (an .npz, a folder of them, or an iterable
    of input dicts; at most `calibration_samples` samples) makes the factorization data-aware
    (whitened SVD; with param_budget or mac_budget, allocation by measured sensitivity); `heldout` (same kinds)
    is what target_cosine / target_error are measured on.
    """
    config = Settings(**settings)
    loaded = load(model)
    data = None
    if calibration is not None:
        from onnxlr.calibration import load_batches
        from onnxlr.datafit import CalibrationData

        # onnxruntime runs the original: its file (external data beside it) or a serialized copy.
        source = model if isinstance(model, (str, os.PathLike)) else ir.to_proto(loaded.model).SerializeToString()
        data = CalibrationData(source=source, batches=load_batches(loaded.model, calibration, calibration_samples),
                               heldout=load_batches(loaded.model, heldout) if heldout is not None else None)
    elif heldout is not None:
        raise OnnxlrError("heldout samples are only used with calibration data (target_cosine)")
    report = factorize_model(loaded.model, config, progress=progress, dry_run=dry_run, calibration_data=data)
    return convert(loaded.model, loaded.kind), report


__all__ = ["__version__", "optimize", "load", "save", "Settings", "LoadedModel", "OnnxlrError", "GateFailed"]
