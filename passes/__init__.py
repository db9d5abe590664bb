"""Factorization rules of onnxlr, one module per op family (installed as `onnxlr.passes`).

Each rule answers match / schemes / activation / rewrite for one op type (passes.base); the
onnx-ir pass that applies the rule set to a model is `onnxlr.api.FactorizationPass`.
"""

from .base import (
    REASON_CODES,
    Activation,
    Context,
    FactorizationRule,
    NameGenerator,
    Scheme,
    Skip,
    Target,
)
from .conv import ConvRule, ConvView
from .gather import GatherRule, GatherView
from .gemm import GemmRule, GemmView
from .matmul import MatMulRule, MatMulView
from .rnn import GRURule, LSTMRule, RecurrentRule, RecurrentView, RNNRule

# op_type -> rule class; the target finder asks each node's rule whether it is a target.
RULES: dict[str, type[FactorizationRule]] = {
    cls.op_type: cls for cls in (MatMulRule, GemmRule, ConvRule, LSTMRule, GRURule, RNNRule)
}

# Readers that are never targets on their own but join a shared weight's group (a tied embedding's
# Gather): op_type -> rule class.
READER_RULES: dict[str, type[FactorizationRule]] = {"Gather": GatherRule}

# Ops that are low-rank candidates in spirit but must be left alone: (reason code, sentence) for reports.
LEFT_ALONE = {
    "ConvTranspose": ("unsupported_op", "ConvTranspose is not factorized (yet)"),
    "QLinearMatMul": ("quantized_op", "quantized op: left as it is"),
    "QLinearConv": ("quantized_op", "quantized op: left as it is"),
    "MatMulInteger": ("quantized_op", "quantized op: left as it is"),
    "ConvInteger": ("quantized_op", "quantized op: left as it is"),
    "MatMulNBits": ("quantized_op", "quantized op: left as it is"),
}

__all__ = [
    "RULES", "READER_RULES", "LEFT_ALONE", "REASON_CODES", "Activation", "Context", "FactorizationRule", "NameGenerator", "Scheme",
    "Skip", "Target", "ConvRule", "GatherRule", "GatherView", "ConvView", "GemmRule", "GemmView", "MatMulRule", "MatMulView",
    "RecurrentRule", "RecurrentView", "LSTMRule", "GRURule", "RNNRule",
]
