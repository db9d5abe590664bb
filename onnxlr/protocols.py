"""Typing Protocols for the objects stages hand each other: the calibration runner and the weight sink.

They say what a stage uses of the object, so its signature needs neither the concrete class nor its module:
- CalibrationRunner: what the pair kinds, sensitivity, compensation and the target search ask of
  onnxlr.calibrate.calibration.Runner (fetch activations with weights fed in their place, read a probe's vectors).
- WeightSink: where the rewrite streams each new weight, onnxlr.model_io.save.DataFile (the output's data file).

Nothing is imported at run time beyond typing: numpy and onnx_ir only for the checker.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np
    import onnx_ir as ir


class ProbeView(Protocol):
    """What a runner's users read of a probe (onnxlr.calibrate.calibration.Probe)."""

    @property
    def activation(self) -> str:
        """The name of the value the target's weight multiplies (an extra output of the probe model)."""
        ...


class CalibrationRunner(Protocol):
    """The probe model of onnxlr.calibrate.calibration.Runner: the original model with every probe's activation as an
    extra output and (with slots) each slot's weight as a feed."""

    @property
    def probes(self) -> Mapping[str, ProbeView]:
        """Probe by key (the target node's first output name)."""
        ...

    @property
    def slots(self) -> Sequence[object]:
        """The weights a run may replace, by feed index (`overrides` keys)."""
        ...

    @property
    def outputs(self) -> Sequence[str]:
        """The model's own output names."""
        ...

    def feed(self, owner: object) -> int | None:
        """The feed index of a weight group's weight (None when it has none: not calibrated)."""
        ...

    def run(self, batch: Mapping[str, np.ndarray], names: Iterable[str],
            overrides: Mapping[int, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Fetch `names` for one batch; `overrides` maps slot index -> the weight to use instead."""
        ...

    def keep(self, batch: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """The non-padding [batch, seq] positions, when the model has an attention mask input."""
        ...

    def vectors(self, key: str, outputs: Mapping[str, np.ndarray], keep: np.ndarray | None) -> np.ndarray:
        """The vectors of probe `key` in `outputs` (a `run`'s result), `keep` applied where the mask indexes it."""
        ...


class WeightSink(Protocol):
    """Where the rewrite writes each new weight as soon as it exists (onnxlr.model_io.save.DataFile)."""

    def append(self, tensor: ir.TensorProtocol) -> ir.TensorProtocol:
        """Store `tensor`; returns the tensor the model holds in its place (a reference to the stored copy)."""
        ...
