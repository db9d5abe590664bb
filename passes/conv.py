"""Conv (1-D, 2-D, 3-D; any strides, pads, auto_pad, dilations, groups) into two chained convs.

Schemes, each a different matrix view of the kernel W (Cout, Cin/g, k1, ..., kd), per group:
- output:  (Cout/g) x (Cin/g * K)   -> conv with the original kernel Cin -> g*r, then 1x1 g*r -> Cout.
- input:   (Cout/g * K) x (Cin/g)   -> 1x1 conv Cin -> g*r, then the original kernel g*r -> Cout.
- spatial: (Cin/g * kh) x (Cout/g * kw), 2-D only -> kh x 1 conv Cin -> g*r, then 1 x kw conv -> Cout.
(K = k1 * ... * kd.) The bias goes on the second conv. Padding commutes with a bias-free 1x1 conv,
so in the input scheme the second conv keeps the original pads; in the spatial scheme each conv
takes the pads, strides and dilations of its own axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from .base import (
    Activation,
    Context,
    FactorizationRule,
    NameGenerator,
    Scheme,
    Skip,
    Target,
    attribute,
    known_product,
    make_node,
    required_input,
    static_shape,
)
from .weights import constant_weight

SCHEMES = ("output", "input", "spatial")
# The attributes that decide which input patches the kernel sees (calibration reads them exactly).
PATCH_ATTRIBUTES = ("strides", "dilations", "pads", "auto_pad")


@dataclasses.dataclass(frozen=True)
class ConvView:
    """How a Conv reads its kernel: in `groups` groups (factorized per group, the same rank in each)."""

    groups: int


class ConvRule(FactorizationRule):
    op_type = "Conv"

    def match(self, node: ir.Node, context: Context) -> Target:
        found = constant_weight(node.inputs[1], inputs_as_constants=context.inputs_as_constants)
        if found.array is None:
            raise found.skip()
        kernel = found.array
        if kernel.ndim < 3:
            raise Skip("weight_rank", f"kernel has {kernel.ndim} dimensions")
        group = int(attribute(node, "group", 1))
        cout, cin_per_group = kernel.shape[0], kernel.shape[1]
        if group < 1 or cout % group:
            raise Skip("bad_group", f"group={group} does not divide the {cout} output channels")
        if group > 1 and cin_per_group == 1:
            raise Skip("depthwise", "depthwise conv (one input channel per group): nothing to factorize")
        assert found.dtype is not None and node.inputs[1] is not None  # the weight was found there
        return Target(node=node, weight=node.inputs[1], array=kernel, dtype=found.dtype, view=ConvView(group),
                      rule=self, context=context, sources=found.sources)

    def fixed_inputs(self, target: Target) -> list[ir.Value]:
        bias = target.node.inputs[2] if len(target.node.inputs) > 2 else None
        return [bias] if bias is not None else []

    def schemes(self, target: Target) -> list[Scheme]:
        kernel = target.array
        group = target.view.groups
        cout, cin_g = kernel.shape[:2]
        spatial = kernel.shape[2:]
        cin, cout_g, k = cin_g * group, cout // group, int(np.prod(spatial))
        node = target.node
        out_positions, in_positions = _positions(target)
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
        bias_params = cout if bias is not None else 0
        params_before = kernel.size + bias_params
        macs_before = out_positions * cout * cin_g * k
        grouped = kernel.reshape(group, cout_g, cin_g, k)
        common = {"params_before": params_before, "macs_before": macs_before, "fixed_params": bias_params}
        result = [
            # The only view whose first factor multiplies the patches: calibration can whiten it.
            Scheme(name="output", matrices=grouped.reshape(group, cout_g, cin_g * k),
                   params_per_rank=cin * k + cout, macs_per_rank=out_positions * (cin * k + cout),
                   whiten_side="cols", **common),
            Scheme(name="input", matrices=grouped.transpose(0, 1, 3, 2).reshape(group, cout_g * k, cin_g),
                   params_per_rank=cin + cout * k,
                   macs_per_rank=in_positions * cin + out_positions * cout * k, **common),
        ]
        if len(spatial) == 2:
            kh, kw = spatial
            matrices = kernel.reshape(group, cout_g, cin_g, kh, kw).transpose(0, 2, 3, 1, 4)
            mid_positions = _mid_positions(target)
            result.append(Scheme(
                name="spatial", matrices=matrices.reshape(group, cin_g * kh, cout_g * kw),
                params_per_rank=cin * kh + cout * kw,
                macs_per_rank=mid_positions * cin * kh + out_positions * cout * kw, **common))
        return result

    def activation(self, target: Target) -> Activation:
        node = target.node
        patches: dict[str, Any] = {"kernel_shape": list(target.array.shape[2:])}
        for name in PATCH_ATTRIBUTES:
            if name in node.attributes:
                value = node.attributes[name].value
                patches[name] = value.decode() if isinstance(value, bytes) else value
        return Activation(required_input(node, 0), "patches", groups=target.view.groups, patches=patches)

    def factor_tensors(self, target: Target, scheme: Scheme, a: np.ndarray, b: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Return (first conv's kernel, second conv's kernel) from the factor stacks."""
        kernel = target.array
        group = target.view.groups
        cout, cin_g = kernel.shape[:2]
        spatial = kernel.shape[2:]
        cout_g, rank, ones = cout // group, a.shape[2], (1,) * len(spatial)
        if scheme.name == "output":  # a: (g, cout_g, r), b: (g, r, cin_g*K)
            first = b.reshape(group * rank, cin_g, *spatial)
            second = a.reshape(cout, rank, *ones)
        elif scheme.name == "input":  # a: (g, cout_g*K, r), b: (g, r, cin_g)
            first = b.reshape(group * rank, cin_g, *ones)
            second = a.reshape(group, cout_g, -1, rank).transpose(0, 1, 3, 2).reshape(cout, rank, *spatial)
        else:  # spatial; a: (g, cin_g*kh, r), b: (g, r, cout_g*kw)
            kh, kw = spatial
            first = a.reshape(group, cin_g, kh, rank).transpose(0, 3, 1, 2).reshape(group * rank, cin_g, kh, 1)
            second = b.reshape(group, rank, cout_g, kw).transpose(0, 2, 1, 3).reshape(cout, rank, 1, kw)
        return np.ascontiguousarray(first), np.ascontiguousarray(second)

    def dense_weight(self, target: Target, scheme: Scheme, matrices: np.ndarray) -> np.ndarray:
        """Undo the reshapes and transposes of schemes(): a kernel (Cout, Cin/g, k1, ..., kd)."""
        shape = target.array.shape
        group = target.view.groups
        cout, cin_g, spatial = shape[0], shape[1], shape[2:]
        cout_g, k = cout // group, int(np.prod(spatial))
        if scheme.name == "output":
            kernel = matrices.reshape(group, cout_g, cin_g, k)
        elif scheme.name == "input":
            kernel = matrices.reshape(group, cout_g, k, cin_g).transpose(0, 1, 3, 2)
        else:  # spatial: (g, cin_g*kh, cout_g*kw)
            kh, kw = spatial
            kernel = matrices.reshape(group, cin_g, kh, cout_g, kw).transpose(0, 3, 1, 2, 4)
        return np.ascontiguousarray(kernel.reshape(shape))

    def rewrite(self, target: Target, scheme: Scheme, a: ir.Value, b: ir.Value, names: NameGenerator) -> list[ir.Node]:
        node = target.node
        base = node.name or "Conv"
        first_kernel, second_kernel = a, b  # factor_tensors already ordered them first, second
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        first_attrs, second_attrs = _split_attributes(node, scheme.name, target.array.shape[2:])
        first = make_node("Conv", [node.inputs[0], first_kernel], names(f"{base}_lr1"), names(f"{base}_lr_mid"),
                          first_attrs)
        second_inputs = [first.outputs[0], second_kernel] + ([bias] if bias is not None else [])
        second = make_node("Conv", second_inputs, names(f"{base}_lr2"), names(f"{base}_lr_out"), second_attrs)
        return [first, second]


def _split_attributes(node: ir.Node, scheme: str, spatial: tuple[int, ...]) -> tuple[dict, dict]:
    """Attributes of the (first, second) conv for a scheme; kernel_shape always explicit."""
    dims = len(spatial)
    group = int(attribute(node, "group", 1))
    strides = list(attribute(node, "strides", [1] * dims))
    dilations = list(attribute(node, "dilations", [1] * dims))
    pads = list(attribute(node, "pads", [0] * (2 * dims)))
    auto_pad = attribute(node, "auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    ones = [1] * dims
    original = {"kernel_shape": list(spatial), "strides": strides, "dilations": dilations, "group": group}
    original.update({"auto_pad": auto_pad} if auto_pad != "NOTSET" else {"pads": pads})
    pointwise = {"kernel_shape": ones, "group": group}
    if scheme == "output":
        return original, pointwise
    if scheme == "input":
        return pointwise, original
    kh, kw = spatial
    first = {"kernel_shape": [kh, 1], "strides": [strides[0], 1], "dilations": [dilations[0], 1], "group": group}
    second = {"kernel_shape": [1, kw], "strides": [1, strides[1]], "dilations": [1, dilations[1]], "group": group}
    if auto_pad != "NOTSET":
        first["auto_pad"] = second["auto_pad"] = auto_pad
    else:  # pads are [h_begin, w_begin, h_end, w_end]
        first["pads"] = [pads[0], 0, pads[2], 0]
        second["pads"] = [0, pads[1], 0, pads[3]]
    return first, second


def _positions(target: Target) -> tuple[int, int]:
    """(output positions, input positions) per image, batch included when known; 1 when unknown."""
    node = target.node
    out_shape = static_shape(target.shapes, node.outputs[0])
    in_shape = static_shape(target.shapes, node.inputs[0])
    out_positions = _batch_and_space(out_shape)
    in_positions = _batch_and_space(in_shape)
    if out_shape is None and in_shape is not None:
        out_positions = in_positions
    if in_shape is None:
        in_positions = out_positions
    return out_positions, in_positions


def _batch_and_space(shape: tuple | None) -> int:
    if shape is None or len(shape) < 3:
        return 1
    return known_product([shape[0], *shape[2:]])


def _mid_positions(target: Target) -> int:
    """Positions after the spatial scheme's first (kh x 1) conv: output height x input width."""
    out_shape = static_shape(target.shapes, target.node.outputs[0])
    in_shape = static_shape(target.shapes, target.node.inputs[0])
    if out_shape is None or in_shape is None or len(out_shape) != 4 or len(in_shape) != 4:
        return _positions(target)[0]
    return known_product([out_shape[0], out_shape[2], in_shape[3]])
