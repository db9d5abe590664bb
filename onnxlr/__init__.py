"""onnxlr: low-rank factorization of ONNX models (MatMul, Gemm and Conv weights).

    import onnxlr
    new_model, report = onnxlr.optimize("model.onnx", rank_ratio=0.25)   # verified and gated, as the CLI
    onnxlr.save(new_model, "model-lr.onnx")

The flow: job runs one optimize job (load -> memory plan -> pipeline: targets -> plan -> rewrite -> quantize ->
staged write -> verify -> gate); cost / bench / edge measure, results / report / html report. settings and
policies declare the knobs, api is the Python entry point, passes/ holds one rule per op family.
"""

from __future__ import annotations

from onnxlr import passes as _passes
from onnxlr._version import __version__
from onnxlr.api import (
    ConvFactorization,
    FactorizationPass,
    GemmFactorization,
    MatMulFactorization,
    optimize,
    verify,
)
from onnxlr.errors import GateFailed, OnnxlrError
from onnxlr.factorize.pipeline import factorize_model
from onnxlr.factorize.results import LayerRow, Report
from onnxlr.job import Job, Outcome, OutputSettings, VerifySettings
from onnxlr.model_io.io import LoadedModel, convert, load
from onnxlr.model_io.save import save
from onnxlr.settings import Progress, Settings

# Deprecated location, kept for one release: `from onnxlr.passes import MatMulFactorization`.
# The passes package holds the rules and must not import the pipeline (that would be a cycle), so the
# pipeline's pass classes are attached to it here, where both are already imported.
for _pass in (MatMulFactorization, GemmFactorization, ConvFactorization):
    setattr(_passes, _pass.__name__, _pass)

__all__ = [
    "__version__", "optimize", "verify", "load", "save", "convert", "factorize_model", "Settings", "Progress", "LoadedModel",
    "Report", "LayerRow", "FactorizationPass", "MatMulFactorization", "GemmFactorization", "ConvFactorization",
    "OnnxlrError", "GateFailed", "Job", "Outcome", "OutputSettings", "VerifySettings",
]
