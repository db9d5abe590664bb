"""Graph passes of onnxlr, one module per op family (installed as `onnxlr.passes`)."""

from .base import Context, FactorizationPass, Scheme, Skip, Target
from .conv import ConvFactorization
from .gemm import GemmFactorization
from .matmul import MatMulFactorization

# op_type -> pass class; the pipeline asks each node's pass whether it is a target.
PASSES: dict[str, type[FactorizationPass]] = {
    cls.op_type: cls for cls in (MatMulFactorization, GemmFactorization, ConvFactorization)
}

# Ops that are low-rank candidates in spirit but must be left alone; listed in reports with the reason.
LEFT_ALONE = {
    "ConvTranspose": "ConvTranspose is not factorized (yet)",
    "QLinearMatMul": "quantized op: left as it is",
    "QLinearConv": "quantized op: left as it is",
    "MatMulInteger": "quantized op: left as it is",
    "ConvInteger": "quantized op: left as it is",
    "MatMulNBits": "quantized op: left as it is",
}

__all__ = [
    "PASSES", "LEFT_ALONE", "Context", "FactorizationPass", "Scheme", "Skip", "Target",
    "ConvFactorization", "GemmFactorization", "MatMulFactorization",
]
