"""What this machine and process can do, detected once: oneDNN, TensorFlow's dilated-convolution kernels, backends.

TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX-512 VNNI / AMX-class features; elsewhere
(every AVX2-only x86 CPU, e.g. AMD EPYC before Zen 4) it runs Eigen kernels, which are slower and have no
gradient for dilated convolutions ("Current CPU implementations do not yet support dilation rates larger than 1").
``import mtl_keras`` therefore asks for oneDNN (``TF_ENABLE_ONEDNN_OPTS=1``) when the user has not chosen and
TensorFlow is not loaded yet. Where it is off anyway (the user's choice, TensorFlow imported before mtl_keras,
another platform), :func:`native_dilated_conv_gradients` finds out by running the kernel once, and
``mtl_keras.layers.AtrousConv2D`` takes a slower path that trains correctly, with one warning.

No TensorFlow import happens here unless TensorFlow is the Keras backend (or is already loaded).
"""

import functools
import logging
import os
import sys

log = logging.getLogger("mtl_keras")

ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"


def request_onednn():
    """Turns TensorFlow's oneDNN kernels on for this process when nobody chose and TensorFlow is not loaded yet.

    Returns True when this call set the variable. Has no effect once TensorFlow is imported (it reads the variable
    once, at import).
    """
    if ONEDNN_ENV in os.environ or "tensorflow" in sys.modules:
        return False
    os.environ[ONEDNN_ENV] = "1"
    return True


def tensorflow_available():
    """True when TensorFlow can be imported (without importing it)."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"] is not None
    import importlib.util

    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def onednn_enabled():
    """Whether TensorFlow's oneDNN kernels are on in this process (imports TensorFlow)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return False
    return bool(_pywrap_util_port.IsMklEnabled())


_FALLBACK_WARNING = (
    "TensorFlow runs without its oneDNN kernels in this process (%s), and its CPU kernels have no gradient for "
    "dilated convolutions: mtl_keras computes those gradients another way, correctly but several times slower. "
    "For the fast path set TF_ENABLE_ONEDNN_OPTS=1 before Python starts (or import mtl_keras before TensorFlow), "
    "or use KERAS_BACKEND=jax.")


@functools.lru_cache(maxsize=None)
def native_dilated_conv_gradients():
    """Whether TensorFlow can differentiate a dilated ``conv2d`` on the CPU in this process, probed once.

    Runs ``Conv2DBackpropFilter`` and ``Conv2DBackpropInput`` with dilation 2 on a 1x5x5x1 input, eagerly (also when
    first asked inside a ``tf.function`` trace). Logs one warning, saying how to get the fast path, when not.
    """
    import tensorflow as tf

    with tf.init_scope(), tf.device("/cpu:0"):
        x = tf.ones([1, 5, 5, 1])
        grad = tf.ones([1, 5, 5, 1])
        try:
            tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=[3, 3, 1, 1], out_backprop=grad,
                                            strides=[1, 1, 1, 1], padding="SAME", dilations=[1, 2, 2, 1])
            tf.raw_ops.Conv2DBackpropInput(input_sizes=[1, 5, 5, 1], filter=tf.ones([3, 3, 1, 1]), out_backprop=grad,
                                           strides=[1, 1, 1, 1], padding="SAME", dilations=[1, 2, 2, 1])
            return True
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
            setting = os.environ.get(ONEDNN_ENV)
            why = (f"{ONEDNN_ENV}={setting}" if setting is not None and setting != "1"
                   else "TensorFlow was imported before mtl_keras, or this CPU lacks oneDNN support")
            log.warning(_FALLBACK_WARNING, why)
            return False


# TensorFlow's C++ start-up lines, written to the process's stderr before absl logging is initialised, so
# TF_CPP_MIN_LOG_LEVEL does not hold them back: the oneDNN notice (once per TensorFlow shared library, so twice), the
# absl preamble before each, and the CPU-feature notice. mtl_keras states the oneDNN choice in the README.
TENSORFLOW_BANNERS = ("All log messages before absl::InitializeLog() is called", "port.cc:153] oneDNN custom operations",
                      "cpu_feature_guard.cc", "To enable the following instructions:")


def _keras_backend_is_tensorflow():
    backend = os.environ.get("KERAS_BACKEND")
    if backend is None:
        config = os.path.join(os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras")),
                              "keras.json")
        try:
            import json

            with open(config) as f:
                backend = json.load(f).get("backend")
        except (OSError, ValueError, AttributeError):
            backend = None
    return (backend or "tensorflow") == "tensorflow"


def import_tensorflow_quietly():
    """Imports TensorFlow, when it is the Keras backend and not loaded yet, without its start-up banners.

    While TensorFlow loads, file descriptor 2 points at a temporary file; afterwards every line except
    :data:`TENSORFLOW_BANNERS` is written back to stderr, so errors and other messages are kept. Does nothing when
    ``TF_CPP_MIN_LOG_LEVEL`` is 0 (the user asked for TensorFlow's informational messages), when TensorFlow is not
    installed or already imported, or on another backend. Returns True when it imported TensorFlow.
    """
    if ("tensorflow" in sys.modules or not _keras_backend_is_tensorflow() or not tensorflow_available()
            or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") in ("", "0")):
        return False
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable file descriptor 2 (embedded interpreters)
        return False
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not any(banner in line for banner in TENSORFLOW_BANNERS)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
    return True


class quiet_tensorflow_logs:
    """While active, TensorFlow's Python loggers pass on warnings and errors only: a SavedModel export otherwise logs,
    at INFO, a renamed-input notice per signature, the saver's shard timings, "Assets written" (twice, through
    absl's handler too) and the fingerprint file."""

    def __enter__(self):
        self._loggers = [logging.getLogger(name) for name in ("tensorflow", "absl")]
        self._levels = [logger.level for logger in self._loggers]
        for logger in self._loggers:
            logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
        return self

    def __exit__(self, *exc):
        for logger, level in zip(self._loggers, self._levels):
            logger.setLevel(level)
        return False
