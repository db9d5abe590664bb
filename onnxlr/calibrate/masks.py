"""Which calibration activations an `attention_mask` input applies to: by provenance, never by shape.

Calibration leaves the padding rows of a [batch, seq, K] activation out of its statistics (the
model ignores them). Which activations the mask's positions index is decided once per probe, from
the graph: an encoder-decoder's decoder activations are [batch, decoder_seq, K], and a batch whose
two lengths happen to be equal must not lose real decoder rows to the encoder's padding. When the
graph cannot tell, the mask is not applied: padding rows only add noise to a Gram, a wrong mask
drops real rows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from onnxlr.model_io.inputs import input_specs
from onnxlr.model_io.shapes import named_dims

logger = logging.getLogger(__name__)

MASK_INPUT_NAME = "attention_mask"


class Probe(Protocol):
    """What this module reads of a calibration probe (onnxlr.calibrate.calibration.Probe)."""

    key: str  # the target's output name
    activation: str  # the value its weight multiplies
    layout: str  # "rows", "cols" or "patches": only "rows" activations are [batch, seq, K]


def masked_probes(model: ir.Model, found: Sequence[Probe]) -> frozenset[str]:
    """The keys of the "rows" probes whose [batch, seq] positions the 2-D `attention_mask` input indexes.

    Decided per probe from the graph, so never by a batch's shapes; the first rule that tells wins:
    1. Named dims (`_by_named_dims`): with the mask's sequence dim named, an activation [batch, S, K]
       is masked when S is that name, and not when S is a fixed size or another name a graph input
       declares (decoder_sequence; batch, for a time-major activation).
    2. Provenance (`_by_provenance`): from the token inputs each activation is computed from.
    When in doubt the mask is not applied: padding rows only add noise to G, a wrong mask drops real rows.
    """
    rows = [probe for probe in found if probe.layout == "rows"]
    if not rows:
        return frozenset()
    specs = input_specs(model)
    mask_seq = specs[MASK_INPUT_NAME].shape[1]
    told = _by_named_dims(model, rows, specs, mask_seq)
    told = {**_by_provenance(model, rows, specs, mask_seq), **told}
    masked = frozenset(key for key, applies in told.items() if applies)
    logger.info("%s applies to %d of %d row probes", MASK_INPUT_NAME, len(masked), len(rows))
    return masked


def _by_named_dims(model: ir.Model, rows: list[Probe], specs: Mapping[str, Any], mask_seq: Any) -> dict[str, bool]:
    """Rule 1: probe key -> masked or not, for the probes whose inferred dims tell."""
    if not isinstance(mask_seq, str):
        return {}  # a fixed (or unnamed) mask length: an equal size elsewhere proves nothing
    declared = {dim for spec in specs.values() for dim in spec.shape if isinstance(dim, str)}
    dims = named_dims(model)
    told = {}
    for probe in rows:
        shape = dims.get(probe.activation)
        if shape is None or len(shape) != 3:
            continue
        seq = shape[1]  # a name shape inference made up (unk__0) tells nothing
        if seq == mask_seq or isinstance(seq, int) or seq in declared:
            told[probe.key] = seq == mask_seq
    return told


def _by_provenance(model: ir.Model, rows: list[Probe], specs: Mapping[str, Any], mask_seq: Any) -> dict[str, bool]:
    """Rule 2: probe key -> masked or not, from the token inputs its activation is computed from.

    Token inputs: [batch, seq] integer ids and [batch, seq, hidden] float embeddings, other than the
    mask. One whose sequence dim differs from the mask's (another name, another size) holds other
    positions: an activation computed from it is not masked (the decoder's, which also reads the
    encoder). Else an activation computed from a token input that shares the mask's named sequence
    dim is masked. When the dims cannot tell (both fixed and equal, or unnamed), an activation
    computed from token inputs is masked only when they form one stream (each feeds the same
    probes, as BERT's input_ids and token_type_ids do): two streams (a static encoder-decoder)
    leave it unmasked, as does an activation computed from no token input.
    """
    tokens = {name: spec.shape[1] for name, spec in specs.items() if name != MASK_INPUT_NAME and _is_token_input(spec)}
    other = {name for name, seq in tokens.items() if None not in (seq, mask_seq) and seq != mask_seq}
    same = {name for name, seq in tokens.items() if isinstance(seq, str) and seq == mask_seq}
    origins = _sources(model, list(tokens), {probe.activation for probe in rows})
    origin = {probe.key: origins.get(probe.activation, frozenset()) for probe in rows}
    streams = {frozenset(key for key, names in origin.items() if name in names) for name in tokens.keys() - other}
    streams.discard(frozenset())  # an input no probe is computed from (an unused token_type_ids)
    return {key: bool(names) and not names & other and (bool(names & same) or len(streams) == 1)
            for key, names in origin.items()}


def _is_token_input(spec: Any) -> bool:
    """[batch, seq] integer ids or [batch, seq, hidden] float embeddings."""
    return ((np.issubdtype(spec.dtype, np.integer) and len(spec.shape) == 2)
            or (np.issubdtype(spec.dtype, np.floating) and len(spec.shape) == 3))


def _sources(model: ir.Model, inputs: list[str], wanted: set[str]) -> dict[str, frozenset[str]]:
    """For the main-graph values `wanted`: the graph inputs among `inputs` each is computed from.

    A node with subgraphs (If, Loop, Scan) reads whatever its subgraphs read from outside too.
    """
    bits: dict[str | None, int] = {name: 1 << index for index, name in enumerate(inputs)}
    for node in model.graph:  # topological order
        found = 0
        for name in [value.name for value in node.inputs if value is not None] + _subgraph_reads(node):
            found |= bits.get(name, 0)
        if found:
            bits.update((value.name, found) for value in node.outputs)
    return {name: frozenset(n for index, n in enumerate(inputs) if bits.get(name, 0) >> index & 1) for name in wanted}


def _subgraph_reads(node: ir.Node) -> list[str | None]:
    names: list[str | None] = []
    for attr in node.attributes.values():
        if not isinstance(attr, ir.Attr) or attr.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            continue
        for graph in [attr.value] if attr.type == ir.AttributeType.GRAPH else attr.value:
            names += [v.name for sub in ir.traversal.RecursiveGraphIterator(graph) for v in sub.inputs if v is not None]
    return names
