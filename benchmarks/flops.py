"""Analytic FLOP counts of Keras models, per image, from the layers' shapes.

Convention (the one of fvcore / ptflops / most papers, times 2):

- A multiply-add is **2 FLOPs**. Convolutions (``Conv1D/2D/3D``, dilated ones included, ``Conv2DTranspose``,
  ``DepthwiseConv2D``, ``SeparableConv2D``) and ``Dense`` layers count ``2 * kh * kw * (cin / groups) * cout`` per
  output position (a transposed conv: per *input* position). A dilated conv costs the same as an undilated one of
  the same kernel size; "same" padding is counted as if the padded zeros were multiplied (as every library does).
  These are the **matmul FLOPs**: the work a GEMM-based kernel does and the part that can run at the machine's
  matmul rate.
- Everything else (bias adds, batch norm, activations, adds and multiplies of tensors, pooling, resizing,
  normalisation) is **elementwise**: counted separately, roughly (1 FLOP per output element and operation; batch
  norm at inference 2, in training about 8; bilinear resize 8 per output element; pooling ``k*k`` per output
  element), and small next to the matmul FLOPs of a conv net (a few per cent).
- **Training** (forward + backward) is taken as **3x the forward matmul FLOPs**: the backward pass of a conv or
  dense layer is two products of the forward's size (gradient w.r.t. the input and w.r.t. the weights). The first
  layer needs no input gradient, so the true count is slightly lower; the convention is the usual one.

``count_flops(model)`` walks the functional graph (nested functional models included) with the static shapes the
model was built for, so the model must have a fixed input height and width. ``profiler_flops`` asks TensorFlow's
graph profiler instead (``tf.compat.v1.profiler``, ``float_ops``) for a cross-check.
"""

from collections import OrderedDict

import keras

from mtl_keras.layers import AtrousConv2D

CONV_CLASSES = ("Conv1D", "Conv2D", "Conv3D", "AtrousConv2D", "Conv2DTranspose", "Conv1DTranspose",
                "Conv3DTranspose", "DepthwiseConv2D", "DepthwiseConv1D", "SeparableConv2D", "SeparableConv1D",
                "Dense")


def _prod(values):
    out = 1
    for v in values:
        out *= int(v)
    return out


def _shape(tensor):
    return tuple(tensor.shape)


def _per_image(shape):
    """Elements per image of an (N, ...) shape; unknown dims raise."""
    dims = shape[1:]
    if any(d is None for d in dims):
        raise ValueError(f"count_flops needs static shapes; got {shape}. Build the model with a fixed input size.")
    return _prod(dims)


def _taps_in_bounds(size_in, size_out, k, stride, dilation, padding):
    """Sum over output positions and kernel taps (one spatial axis) of the taps that land inside the input."""
    if padding == "valid":
        return size_out * k
    span = (k - 1) * dilation + 1
    pad_before = max((size_out - 1) * stride + span - size_in, 0) // 2
    total = 0
    for t in range(k):
        offset = t * dilation - pad_before
        # outputs o with 0 <= o * stride + offset <= size_in - 1
        lo = max(0, -(offset // stride))  # ceil(-offset / stride)
        hi = min(size_out - 1, (size_in - 1 - offset) // stride)
        total += max(hi - lo + 1, 0)
    return total


def _conv_macs(layer, in_shape, out_shape, effective=False):
    """Multiply-adds per image of a convolution layer (no bias). ``effective``: only the taps that land inside the
    input (not on "same" padding) - what a kernel that skips the padding, such as oneDNN's, computes."""
    cls = type(layer).__name__
    kernel = tuple(layer.kernel_size)
    k = _prod(kernel)
    channels_last = getattr(layer, "data_format", "channels_last") == "channels_last"
    cin = in_shape[-1] if channels_last else in_shape[1]
    out_spatial = out_shape[1:-1] if channels_last else out_shape[2:]
    in_spatial = in_shape[1:-1] if channels_last else in_shape[2:]
    positions_taps = k * _prod(out_spatial)  # (output position, tap) pairs
    if effective and "Transpose" not in cls and None not in tuple(in_spatial):
        strides = tuple(layer.strides)
        dilation = tuple(getattr(layer, "dilation_rate", (1,) * len(kernel)))
        positions_taps = _prod(_taps_in_bounds(i, o, kk, s, d, layer.padding)
                               for i, o, kk, s, d in zip(in_spatial, out_spatial, kernel, strides, dilation))
    if "Separable" in cls:
        mult = layer.depth_multiplier
        return positions_taps * cin * mult + cin * mult * layer.filters * _prod(out_spatial)
    if "Depthwise" in cls:
        return positions_taps * cin * layer.depth_multiplier
    if "Transpose" in cls:
        return k * cin * layer.filters * _prod(in_spatial)
    groups = getattr(layer, "groups", 1) or 1
    return positions_taps * (cin // groups) * layer.filters


def _dense_macs(layer, in_shape, out_shape):
    return in_shape[-1] * out_shape[-1] * _prod(out_shape[1:-1])


def _elementwise(layer, in_shapes, out_shape, training):
    cls = type(layer).__name__
    n = _per_image(out_shape)
    if cls in ("InputLayer", "Dropout", "ZeroPadding2D", "ZeroPadding1D", "Reshape", "Flatten", "Concatenate",
               "Cropping2D", "Permute", "SpatialDropout2D", "Identity"):
        return 0
    if isinstance(layer, keras.layers.BatchNormalization):
        return 8 * n if training else 2 * n
    if cls in ("Normalization", "LayerNormalization", "GroupNormalization"):
        return 2 * n if cls == "Normalization" else 8 * n
    if cls in ("MaxPooling2D", "AveragePooling2D", "MaxPooling1D", "AveragePooling1D"):
        return _prod(layer.pool_size) * n
    if cls in ("GlobalAveragePooling2D", "GlobalMaxPooling2D", "GlobalAveragePooling1D"):
        return _per_image(in_shapes[0])
    if cls in ("Add", "Multiply", "Subtract", "Average", "Maximum", "Minimum"):
        return (len(in_shapes) - 1) * n
    if cls in ("ResizeLike", "UpSampling2D", "Resizing"):
        return 8 * n  # bilinear: 4 taps, a multiply-add each
    return n  # activations and anything else: one operation per output element


def _walk(model, training, rows, prefix=""):
    nodes_by_depth = getattr(model, "_nodes_by_depth", None)
    if nodes_by_depth is None:
        raise TypeError(f"count_flops needs a functional Keras model; got {type(model).__name__}.")
    for depth in sorted(nodes_by_depth, reverse=True):  # inputs first
        for node in nodes_by_depth[depth]:
            layer = node.operation
            ins = [_shape(t) for t in node.arguments.keras_tensors]
            outs = [_shape(t) for t in node.outputs]
            name = prefix + layer.name
            cls = type(layer).__name__
            if hasattr(layer, "_nodes_by_depth") and layer is not model:
                _walk(_at_shapes(layer, ins), training, rows, prefix=name + "/")
                continue
            if not outs:
                continue
            out = outs[0]
            matmul = 0
            effective = 0
            other = 0
            if cls in CONV_CLASSES or (hasattr(layer, "kernel_size") and hasattr(layer, "filters")):
                if cls == "Dense":
                    matmul = effective = 2 * _dense_macs(layer, ins[0], out)
                else:
                    matmul = 2 * _conv_macs(layer, ins[0], out)
                    effective = 2 * _conv_macs(layer, ins[0], out, effective=True)
                if getattr(layer, "use_bias", False):
                    other = _per_image(out)
            elif ins:
                other = _elementwise(layer, ins, out, training)
            dilation = tuple(getattr(layer, "dilation_rate", (1,)) or (1,))
            rows.append({"layer": name, "class": cls, "output_shape": out, "matmul_flops": matmul,
                         "effective_flops": effective, "other_flops": other, "dilated": max(dilation) > 1})
    return rows


def _at_shapes(model, shapes):
    """``model`` itself when its inputs have the static ``shapes`` of the call, else a clone built on them: a nested
    model built for any size (e.g. a block shared by tasks) is counted at the size it is called with."""
    own = [_shape(t) for t in model.inputs]
    if all(None not in s[1:] for s in own) or any(None in s[1:] for s in shapes) or len(shapes) != len(own):
        return model
    inputs = [keras.Input(batch_shape=s) for s in shapes]
    return keras.models.clone_model(model, input_tensors=inputs[0] if len(inputs) == 1 else inputs)


def layer_flops(model, training=False):
    """One dict per layer call: ``layer``, ``class``, ``output_shape``, ``matmul_flops`` and ``other_flops`` (per
    image, forward) and ``dilated``; in graph order."""
    return _walk(model, training, [])


def count_flops(model, training=False):
    """Forward FLOPs per image of a functional Keras model (see the module docstring for the convention).

    Returns a dict: ``matmul`` (convs and dense layers, the nominal count), ``effective`` (the same without the
    taps that fall on "same" padding: what oneDNN computes; much lower for dilation rates near the feature map's
    size), ``dilated`` / ``dilated_effective`` (the part in dilated convs), ``other`` (elementwise), ``total``
    (= matmul + other), ``train_matmul`` / ``train_effective`` (3x: forward + backward) and ``by_class`` (nominal
    matmul FLOPs per layer class). ``training=True`` counts batch norm at its training cost.
    """
    rows = layer_flops(model, training=training)
    matmul = sum(r["matmul_flops"] for r in rows)
    other = sum(r["other_flops"] for r in rows)
    by_class = OrderedDict()
    for r in rows:
        if r["matmul_flops"]:
            by_class[r["class"]] = by_class.get(r["class"], 0) + r["matmul_flops"]
    effective = sum(r["effective_flops"] for r in rows)
    return {"matmul": matmul, "effective": effective,
            "dilated": sum(r["matmul_flops"] for r in rows if r["dilated"]),
            "dilated_effective": sum(r["effective_flops"] for r in rows if r["dilated"]), "other": other,
            "total": matmul + other, "train_matmul": 3 * matmul, "train_effective": 3 * effective,
            "by_class": dict(by_class)}


def profiler_flops(model, batch_size=1, full_kernels=True):
    """Forward FLOPs per image according to TensorFlow's graph profiler, for a cross-check of :func:`count_flops`.

    Traces ``model(x, training=False)`` with a fixed batch into a concrete function, freezes its variables and runs
    ``tf.compat.v1.profiler.profile(..., float_operation())`` on the graph. TensorFlow's registered statistics
    count a ``Conv2D`` as ``2 * kh * kw * cin * cout * Hout * Wout`` (dilated or not: the convention of
    :func:`count_flops`) and also count the elementwise ops that have a statistic (bias adds, the folded batch norm's
    multiplies and adds, pooling, ...); a ``Conv2DTranspose`` runs ``Conv2DBackpropInput``, counted as
    ``2 * kh * kw * cin * cout * Hin * Win``. Ops without a registered statistic count 0. TensorFlow backend only.

    ``AtrousConv2D`` leaves out, at static sizes, the kernel taps that only see padding (a rate-36 3x3 conv on a
    16x32 map runs as a 1x1 conv): with ``full_kernels`` (default) that is switched off while tracing, so the
    profiler counts the full kernels like :func:`count_flops`' nominal count (``AtrousConv2D.trim_padding_taps``
    off while tracing); ``full_kernels=False`` counts the graph as it runs.

    Returns ``{"total": per-image FLOPs of the whole graph, "by_op": {op type: per-image FLOPs}}``.
    """
    import tensorflow as tf
    from tensorflow.python.framework import ops as tf_ops
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    shape = (batch_size,) + tuple(model.inputs[0].shape[1:])
    fn = tf.function(lambda x: model(x, training=False))
    trim = AtrousConv2D.trim_padding_taps
    AtrousConv2D.trim_padding_taps = trim and not full_kernels
    try:
        concrete = fn.get_concrete_function(tf.TensorSpec(shape, tf.float32))
    finally:
        AtrousConv2D.trim_padding_taps = trim
    graph = convert_variables_to_constants_v2(concrete).graph
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    info = tf.compat.v1.profiler.profile(graph=graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op", options=opts)
    by_op = {}
    for op in graph.get_operations():
        try:
            value = tf_ops.get_stats_for_node_def(graph, op.node_def, "flops").value
        except (ValueError, KeyError, TypeError):
            continue
        if value:
            by_op[op.type] = by_op.get(op.type, 0) + int(value) / batch_size
    return {"total": info.total_float_ops / batch_size, "by_op": by_op}

