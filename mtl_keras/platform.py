"""What this machine and process can do, detected once. TensorFlow enables oneDNN by default only on AVX-512 VNNI /
AMX-class CPUs; elsewhere its Eigen kernels are slower and cannot differentiate dilated convolutions, so
``import mtl_keras`` asks for oneDNN when nobody chose, and where it is off anyway ``layers.AtrousConv2D`` takes a
slower, correct path (:func:`native_dilated_conv_gradients`)."""

import contextlib
import functools
import importlib.util
import json
import logging
import os
import sys
import tempfile

log = logging.getLogger("mtl_keras")

ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"


def request_onednn():
    """Sets ``TF_ENABLE_ONEDNN_OPTS=1`` when unset and TensorFlow (which reads it once, at import) is not loaded
    yet; returns whether it did."""
    if ONEDNN_ENV in os.environ or "tensorflow" in sys.modules:
        return False
    os.environ[ONEDNN_ENV] = "1"
    return True


def tensorflow_available():
    """True when TensorFlow can be imported (without importing it)."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"] is not None
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


@functools.lru_cache(maxsize=None)
def native_dilated_conv_gradients():
    """Whether TensorFlow can differentiate a dilated ``conv2d`` on the CPU in this process: both backprop kernels
    run once, eagerly (also inside a ``tf.function`` trace); when not, one warning says how to get the fast path."""
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
            log.warning("TensorFlow runs without its oneDNN kernels in this process (%s), and its CPU kernels have no "
                        "gradient for dilated convolutions: mtl_keras computes those gradients another way, correctly "
                        "but several times slower. For the fast path set TF_ENABLE_ONEDNN_OPTS=1 before Python starts "
                        "(or import mtl_keras before TensorFlow), or use KERAS_BACKEND=jax.", why)
            return False


# TensorFlow's C++ start-up lines, written before absl logging starts (so TF_CPP_MIN_LOG_LEVEL misses them): the
# oneDNN notice (twice), absl's preamble, the CPU-feature notice and, from the full `tensorflow` wheel (which the
# keras-hub extra brings) on a machine without a GPU, its CUDA probe notice. The README states the oneDNN choice.
TENSORFLOW_BANNERS = ("All log messages before absl::InitializeLog() is called",
                      "port.cc:153] oneDNN custom operations", "cpu_feature_guard.cc",
                      "To enable the following instructions:",
                      "Could not find cuda drivers on your machine, GPU will not be used")
NO_CUDA_DRIVER = TENSORFLOW_BANNERS[-1]
NO_CUDA_DRIVER_CUINIT = "failed call to cuInit"  # held back only with NO_CUDA_DRIVER (a GPU machine keeps it)


def _keras_backend_is_tensorflow():
    backend = os.environ.get("KERAS_BACKEND")
    if backend is None:
        config = os.path.join(os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras")),
                              "keras.json")
        try:
            with open(config) as f:
                backend = json.load(f).get("backend")
        except (OSError, ValueError, AttributeError):
            backend = None
    return (backend or "tensorflow") == "tensorflow"


def import_tensorflow_quietly():
    """Imports TensorFlow (when it is the Keras backend, installed, not loaded and ``TF_CPP_MIN_LOG_LEVEL`` is not 0)
    with stderr written back without :data:`TENSORFLOW_BANNERS`; returns whether it did."""
    if ("tensorflow" in sys.modules or not _keras_backend_is_tensorflow() or not tensorflow_available()
            or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") in ("", "0")):
        return False
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable file descriptor 2 (embedded interpreters)
        return False
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow

            # The full wheel probes CUDA when devices are first listed: done here, so that a machine without a
            # GPU driver gets its expected cuInit failure held back with the driver notice (a GPU machine keeps it).
            list_devices = getattr(getattr(tensorflow, "config", None), "list_physical_devices", None)
            if list_devices is not None:  # (the tests' stand-in module has no devices)
                list_devices("GPU")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
            banners = TENSORFLOW_BANNERS
            if any(NO_CUDA_DRIVER in line for line in lines):  # no GPU driver at all: cuInit's failure is expected
                banners += (NO_CUDA_DRIVER_CUINIT,)
            kept = [line for line in lines if not any(banner in line for banner in banners)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
    return True


@contextlib.contextmanager
def quiet_tensorflow_logs():
    """TensorFlow's and absl's loggers pass on warnings and errors only (an export logs a dozen INFO lines)."""
    loggers = [logging.getLogger(name) for name in ("tensorflow", "absl")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
