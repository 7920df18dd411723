"""Small layers shared by the architectures. ``keras.ops`` only, so they run on any backend."""

import keras
import numpy as np
from keras import ops

from mtl_keras import platform

IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)  # in 0..255 pixel units
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)


@keras.saving.register_keras_serializable(package="mtl_keras")
class ResizeLike(keras.layers.Layer):
    """Resizes ``inputs[0]`` to the spatial size of ``inputs[1]`` (NHWC), read at run time (any image size)."""

    def __init__(self, interpolation="bilinear", **kwargs):
        super().__init__(**kwargs)
        self.interpolation = interpolation

    def call(self, inputs):
        x, reference = inputs
        if keras.config.backend() == "tensorflow" and keras.backend.standardize_dtype(x.dtype) == "float64":
            # tf.image.resize computes in float32 whatever the input: float64 takes the exact matrices
            return bilinear_resize_by_matrices(x, ops.shape(reference)[1:3])
        if keras.config.backend() == "tensorflow":
            # Keras' own op, called directly: ``ops.image.resize`` checks ``size[0] <= 0`` in Python, which fails
            # on the symbolic sizes that ``model.export`` traces
            import tensorflow as tf  # backend fast path only

            return tf.image.resize(x, tf.shape(reference)[1:3], method=self.interpolation)
        size = ops.shape(reference)[1:3]
        return ops.image.resize(x, size, interpolation=self.interpolation, data_format="channels_last")

    def compute_output_shape(self, input_shapes):
        x_shape, ref_shape = input_shapes
        return (x_shape[0], ref_shape[1], ref_shape[2], x_shape[3])

    def get_config(self):
        return {**super().get_config(), "interpolation": self.interpolation}


def _bilinear_matrix(out_size, in_size, dtype):
    """(out_size, in_size) bilinear weights, half-pixel centres clamped at the edges (``tf.image.resize``'s and
    torch's ``align_corners=False`` convention, upsampling)."""
    out_f, in_f = ops.cast(out_size, "float64"), ops.cast(in_size, "float64")
    source = (ops.cast(ops.arange(out_size), "float64") + 0.5) * (in_f / out_f) - 0.5
    source = ops.clip(source, 0.0, in_f - 1.0)
    distance = ops.abs(ops.expand_dims(source, 1) - ops.expand_dims(ops.cast(ops.arange(in_size), "float64"), 0))
    return ops.cast(ops.maximum(1.0 - distance, 0.0), dtype)


def bilinear_resize_by_matrices(x, size):
    """Bilinear upsampling of NHWC ``x`` to ``size`` as two matrix products, in ``x``'s dtype."""
    rows = _bilinear_matrix(size[0], ops.shape(x)[1], x.dtype)
    columns = _bilinear_matrix(size[1], ops.shape(x)[2], x.dtype)
    x = ops.einsum("hH,bHWc->bhWc", rows, x)
    return ops.einsum("wW,bhWc->bhwc", columns, x)


@keras.saving.register_keras_serializable(package="mtl_keras")
class Normalization(keras.layers.Normalization):
    """``keras.layers.Normalization`` exact in float64 on every backend (Keras' torch backend rounds its zero-variance
    guard to float32; the given variances are positive). Keeps Keras' class name (weight-file keys)."""

    def call(self, inputs):
        if self.invert or self.mean is None:
            return super().call(inputs)
        inputs = ops.convert_to_tensor(inputs, dtype=self.compute_dtype)
        mean = ops.cast(self.convert_weight(self.mean), inputs.dtype)
        std = ops.sqrt(ops.cast(self.convert_weight(self.variance), inputs.dtype))
        return (inputs - mean) / std


@keras.saving.register_keras_serializable(package="mtl_keras")
class GlobalAveragePooling2D(keras.layers.GlobalAveragePooling2D):
    """``keras.layers.GlobalAveragePooling2D`` as a sum over the pixels divided by their number: Keras' torch backend
    computes ``ops.mean`` of float64 tensors in float32 precision. Keeps Keras' class name (weight-file keys)."""

    def call(self, inputs):
        axes = [1, 2] if self.data_format == "channels_last" else [2, 3]
        count = ops.cast(ops.shape(inputs)[axes[0]] * ops.shape(inputs)[axes[1]], inputs.dtype)
        return ops.sum(inputs, axis=axes, keepdims=self.keepdims) / count


def image_normalization(name="image_normalization"):
    """Maps RGB images in 0..255 to ImageNet-standardised values (torchvision's), inside the model: exports take raw
    images."""
    # float64 arrays, not lists: the torch backend would round a list to float32 in float64 models
    return Normalization(
        axis=-1, mean=np.asarray(IMAGENET_MEAN_RGB, "float64"),
        variance=np.square(np.asarray(IMAGENET_STD_RGB, "float64")), name=name)


@keras.saving.register_keras_serializable(package="mtl_keras")
class AtrousConv2D(keras.layers.Conv2D):
    """``keras.layers.Conv2D`` whose dilated convolutions take TensorFlow's native ``tf.nn.conv2d`` kernel.

    Keras' TF backend lowers a dilation to space-to-batch, 5x (rate 2) to 40x (rate 36) slower on CPU. TensorFlow's
    CPU kernels have the dilated backward pass for float32 with oneDNN only (see ``mtl_keras.platform``); without it
    :func:`dilated_conv2d_tap_gradients` supplies the gradients. Same weights and config as Conv2D.
    """

    def _native_dilation_available(self):
        if keras.config.backend() != "tensorflow" or max(self.dilation_rate) == 1:
            return False
        if tuple(self.strides) != (1, 1) or self.data_format != "channels_last":
            return False
        if self.compute_dtype == "float32":
            return True
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))

    @staticmethod
    def _native_dilated_gradients():
        """TensorFlow differentiates dilated convs natively: on GPU (cuDNN), and on CPU with oneDNN (probed once)."""
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU")) or platform.native_dilated_conv_gradients()

    # False runs the full kernels (benchmarks/flops.py counts nominal FLOPs that way)
    trim_padding_taps = True

    def convolution_op(self, inputs, kernel):
        if self._native_dilation_available():
            import tensorflow as tf  # backend fast path only

            taps, dilations = self._taps_inside_input(inputs, kernel)
            if max(dilations) == 1 or self._native_dilated_gradients():
                return tf.nn.conv2d(inputs, taps, strides=1, padding=self.padding.upper(), dilations=dilations)
            if self.padding == "same" and all(int(k) % 2 == 1 for k in taps.shape[:2]):
                # Eigen CPU kernels (oneDNN off): native forward pass, gradients written out.
                return dilated_conv2d_tap_gradients(inputs, taps, dilations)
        return super().convolution_op(inputs, kernel)

    def _taps_inside_input(self, inputs, kernel):
        """The kernel without the taps that only see "same" padding (a map smaller than the rate: the ASPP's rates 24
        and 36 on 16x32), and its dilations: the same output and gradients, but oneDNN's dilated filter-gradient
        kernel computes padding taps too (a training step of the slim model: 12% less CPU time)."""
        dilations = list(self.dilation_rate)
        if self.padding != "same" or not self.trim_padding_taps:
            return kernel, dilations
        for axis in (0, 1):
            size, k, rate = inputs.shape[1 + axis], self.kernel_size[axis], dilations[axis]
            if size is None or k % 2 == 0 or rate == 1:
                continue
            half = min(k // 2, (size - 1) // rate)  # taps (either side of the centre) that reach the input
            if half < k // 2:
                keep = slice(k // 2 - half, k // 2 + half + 1)
                kernel = kernel[keep] if axis == 0 else kernel[:, keep]
                dilations[axis] = rate if half else 1
        return kernel, dilations


def dilated_conv2d_tap_gradients(inputs, kernel, dilations):
    """A "SAME", stride-1, odd-kernel dilated ``tf.nn.conv2d`` with its gradients written out, for TensorFlow's CPU
    kernels without oneDNN (no dilated backward ops): the input gradient is the same convolution with the kernel
    flipped and transposed; the filter gradient one matrix product per tap, ``dK[i, j] = X_ij^T dY``."""
    import tensorflow as tf  # TF-only path

    rate_h, rate_w = (int(r) for r in dilations)
    k_h, k_w = (int(k) for k in kernel.shape[:2])
    pad_h, pad_w = (k_h - 1) * rate_h // 2, (k_w - 1) * rate_w // 2

    @tf.custom_gradient
    def conv(x, k):
        y = tf.nn.conv2d(x, k, strides=1, padding="SAME", dilations=[rate_h, rate_w])

        def grad(dy):
            k_transposed = tf.transpose(tf.reverse(k, axis=[0, 1]), [0, 1, 3, 2])
            dx = tf.nn.conv2d(dy, k_transposed, strides=1, padding="SAME", dilations=[rate_h, rate_w])
            shape = tf.shape(x)
            height, width, c_in = shape[1], shape[2], shape[3]
            padded = tf.pad(x, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]])
            dy_flat = tf.reshape(dy, [-1, tf.shape(dy)[3]])
            rows = []
            for i in range(k_h):
                taps = []
                for j in range(k_w):
                    shifted = padded[:, i * rate_h:i * rate_h + height, j * rate_w:j * rate_w + width, :]
                    taps.append(tf.matmul(tf.reshape(shifted, [-1, c_in]), dy_flat, transpose_a=True))
                rows.append(tf.stack(taps))
            return dx, tf.stack(rows)

        return y, grad

    # A tensor, not the variable: custom_gradient would otherwise want the variables' gradients from grad too.
    return conv(inputs, tf.convert_to_tensor(kernel))


@keras.saving.register_keras_serializable(package="mtl_keras")
class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` that runs TensorFlow's fused kernel for 4-D channels-last float32 inputs.

    Keras' ``ops.moments`` batch norm is about 20% of a dilated ResNet's training step on CPU (see
    ``benchmarks/README.md``); ``FusedBatchNormV3`` is one kernel each way, and Grappler folds it into the convolution
    in inference. Same variables and update rule (the unbiased batch variance is rescaled to Keras' biased one);
    keeps Keras' class name, so weight files load either way. TensorFlow raises an epsilon below 1.001e-5 to 1.001e-5.
    """

    # False runs Keras' own code (``benchmarks/run_all.py --keras_batchnorm``)
    use_fused_kernel = True

    def _fused_available(self, inputs, mask):
        if (not self.use_fused_kernel or keras.config.backend() != "tensorflow" or mask is not None or self.renorm
                or self.synchronized):
            return False
        if len(inputs.shape) != 4 or self.axis not in (-1, 3) or inputs.shape[-1] is None:
            return False
        return keras.backend.standardize_dtype(inputs.dtype) == "float32" and self.compute_dtype == "float32"

    def _exact_float64(self, inputs, mask):
        return (mask is None and not self.renorm and keras.backend.standardize_dtype(inputs.dtype) == "float64"
                and self.compute_dtype == "float64")

    def _call_float64(self, inputs, training):
        """Keras' batch norm written out: the JAX and torch backends' ``rsqrt`` is accurate to ~1e-7 even in float64."""
        if training and self.trainable:
            mean, variance = self._moments(inputs, None)
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            mean, variance = self.moving_mean, self.moving_variance
        shape = [1] * len(inputs.shape)
        shape[self.axis] = inputs.shape[self.axis]
        scale = 1.0 / ops.sqrt(variance + self.epsilon)
        if self.scale:
            scale = scale * self.gamma
        outputs = (inputs - ops.reshape(mean, shape)) * ops.reshape(scale, shape)
        return outputs + ops.reshape(self.beta, shape) if self.center else outputs

    def call(self, inputs, training=None, mask=None):
        if not self._fused_available(inputs, mask):
            if self._exact_float64(inputs, mask):
                return self._call_float64(inputs, training)
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf  # backend fast path only

        channels = inputs.shape[-1]
        gamma = tf.convert_to_tensor(self.gamma) if self.scale else tf.ones([channels])
        beta = tf.convert_to_tensor(self.beta) if self.center else tf.zeros([channels])
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, epsilon=self.epsilon, is_training=True)
            count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:3]), "float32")
            variance = variance * (count - 1.0) / tf.maximum(count, 1.0)  # unbiased -> biased, as Keras averages
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
            return outputs
        outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, beta, mean=tf.convert_to_tensor(self.moving_mean),
            variance=tf.convert_to_tensor(self.moving_variance), epsilon=self.epsilon, is_training=False)
        return outputs


def conv_bn_relu(x, filters, kernel_size, dilation_rate=1, name=None, use_bias=False):
    """Conv -> BN -> ReLU, the unit of ASPP branches and task decoders."""
    x = AtrousConv2D(filters, kernel_size, padding="same", dilation_rate=dilation_rate, use_bias=use_bias,
                     name=f"{name}_conv")(x)
    x = BatchNormalization(epsilon=1e-5, name=f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x)
