"""ONNX export of the serving function (``experiments/export.py --onnx``): tf2onnx on the frozen float32 graph of
``mtl_keras.export.serving_function`` (dense outputs, no instance ids)."""

import tensorflow as tf

from mtl_keras.export import INPUT_NAME, serving_function, serving_model


def export_onnx(model, path, opset=17):
    """Writes ``path`` (.onnx): the float32 serving function (dense outputs, no instance ids) through tf2onnx.

    Input ``images`` float32 ``[batch, height, width, 3]`` with dynamic batch, height and width.
    """
    try:
        import tf2onnx
    except Exception as e:  # noqa: BLE001 - ImportError, or tf2onnx failing against this TF / numpy
        raise RuntimeError(f"ONNX export needs tf2onnx (pip install tf2onnx onnxruntime); importing it failed: "
                           f"{type(e).__name__}: {e}") from e
    serving = serving_model(model)
    serve = serving_function(serving, instances=False)
    fn = tf.function(serve, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name=INPUT_NAME)],
                     autograph=False)
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    # Freeze first: tf2onnx.convert.from_function would turn captured constants (the normalisation's mean and
    # variance) into extra graph inputs.
    frozen = convert_variables_to_constants_v2(fn.get_concrete_function())
    input_names = [t.name for t in frozen.inputs if t.dtype != tf.resource]
    output_names = [t.name for t in frozen.outputs]
    keys = sorted(fn.get_concrete_function().structured_outputs)  # flattening order of the output dict
    try:
        model_proto, _ = tf2onnx.convert.from_graph_def(frozen.graph.as_graph_def(), input_names=input_names,
                                                        output_names=output_names, opset=opset)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"tf2onnx {tf2onnx.__version__} could not convert the model (TensorFlow "
                           f"{tf.__version__}): {type(e).__name__}: {e}") from e
    _rename_onnx_values(model_proto, {input_names[0]: INPUT_NAME, **dict(zip(output_names, keys))})
    _explicit_same_padding(model_proto)
    import onnx

    onnx.save(model_proto, path)
    return path


def _rename_onnx_values(model_proto, renames):
    """Renames graph inputs / outputs (and every node input / output that refers to them)."""
    graph = model_proto.graph
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in list(graph.input) + list(graph.output):
        value.name = renames.get(value.name, value.name)


def _explicit_same_padding(model_proto):
    """Stride-1 ``auto_pad=SAME_*`` convolutions get explicit ``pads``: onnxruntime rejects SAME with dilation.

    With stride 1 the SAME padding does not depend on the input size: ``d (k - 1)`` per axis, the odd one at the
    end (SAME_UPPER, TensorFlow's convention).
    """
    import onnx

    kernels = {t.name: list(t.dims) for t in model_proto.graph.initializer}
    for node in model_proto.graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: a for a in node.attribute}
        auto_pad = attrs.get("auto_pad")
        if auto_pad is None or auto_pad.s not in (b"SAME_UPPER", b"SAME_LOWER"):
            continue
        strides = list(attrs["strides"].ints) if "strides" in attrs else [1, 1]
        if any(s != 1 for s in strides):
            continue
        if "kernel_shape" in attrs:
            kernel = list(attrs["kernel_shape"].ints)
        elif node.input[1] in kernels:
            kernel = kernels[node.input[1]][2:]
        else:
            continue
        dilations = list(attrs["dilations"].ints) if "dilations" in attrs else [1] * len(kernel)
        total = [d * (k - 1) for d, k in zip(dilations, kernel)]
        if auto_pad.s == b"SAME_UPPER":
            begin = [t // 2 for t in total]
        else:
            begin = [t - t // 2 for t in total]
        pads = begin + [t - b for t, b in zip(total, begin)]
        node.attribute.remove(auto_pad)
        node.attribute.append(onnx.helper.make_attribute("pads", pads))
