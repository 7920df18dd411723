"""tf.distribute glue and its JAX / PyTorch counterpart (:class:`KerasPlacement`): strategies, cross-replica sums
(the identity with one replica or off TensorFlow), chief-only outputs, synchronised batch norm."""

import contextlib
import json
import os

import keras

from mtl_keras.config import CHOICES

STRATEGIES = CHOICES["strategy"]


def _tf():
    if keras.config.backend() != "tensorflow":
        return None
    import tensorflow as tf

    return tf


def _replica_context():
    tf = _tf()
    if tf is None or not tf.distribute.has_strategy():
        return None
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return None
    return ctx


def replicas_in_sync():
    """Number of replicas of the current replica context (1 outside tf.distribute or in cross-replica context)."""
    ctx = _replica_context()
    return 1 if ctx is None else ctx.num_replicas_in_sync


def _all_reduce(x, op):
    ctx = _replica_context()
    return x if ctx is None else ctx.all_reduce(getattr(_tf().distribute.ReduceOp, op), x)


def cross_replica_sum(x):
    return _all_reduce(x, "SUM")


def cross_replica_mean(x):
    return _all_reduce(x, "MEAN")


def configure_cpu_replicas(count):
    """Splits the CPU into ``count`` logical devices (replicas without a GPU); before TensorFlow's first op."""
    tf = _tf()
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current and len(current) == count:
        return
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)])


class KerasPlacement:
    """The JAX / PyTorch counterpart of a tf.distribute strategy: on several JAX devices a
    ``keras.distribution.DataParallel`` (one SPMD computation, so every mean is already global). ``scope()`` must
    cover model building *and* ``fit`` (:func:`fit_scope`)."""

    def __init__(self, keras_distribution=None, devices=1):
        self.keras_distribution = keras_distribution
        self.num_replicas_in_sync = int(devices)

    def scope(self):
        return self.keras_distribution.scope() if self.keras_distribution else contextlib.nullcontext()

    @property
    def name(self):
        return type(self.keras_distribution).__name__ if self.keras_distribution else "SingleDevice"


def _keras_placement(name, cpu_replicas):
    backend = keras.config.backend()
    if name == "multi_worker":
        raise ValueError(f"--strategy multi_worker needs the TensorFlow backend (KERAS_BACKEND={backend}); on JAX use "
                         f"--strategy mirrored over the local devices.")
    if backend != "jax":
        if name == "mirrored":
            raise ValueError(f"--strategy mirrored needs KERAS_BACKEND=tensorflow or jax (now {backend}).")
        return KerasPlacement()
    import jax

    devices = jax.devices()
    if cpu_replicas and cpu_replicas > 1 and len(devices) != cpu_replicas and devices[0].platform == "cpu":
        raise ValueError(f"--cpu_replicas {cpu_replicas} on JAX: start Python with "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={cpu_replicas} (JAX sees "
                         f"{len(devices)} CPU device(s); the count is fixed when JAX starts).")
    if name == "one_device" or len(devices) == 1 or (name == "auto" and devices[0].platform == "cpu"):
        return KerasPlacement()
    return KerasPlacement(keras.distribution.DataParallel(devices=devices), len(devices))


def fit_scope(strategy):
    """The Keras distribution on JAX; nothing on TF (Keras enters the tf.distribute strategy by itself in ``fit``)."""
    return strategy.scope() if isinstance(strategy, KerasPlacement) else contextlib.nullcontext()


def strategy_name(strategy):
    return strategy.name if isinstance(strategy, KerasPlacement) else type(strategy).__name__


def create_strategy(name="auto", cpu_replicas=0):
    """The tf.distribute strategy ``name`` (``TrainConfig.strategy``; ``mirrored`` without GPUs: over ``cpu_replicas``
    logical CPUs); on JAX data parallelism over every device, on PyTorch one device."""
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}. Valid: {', '.join(STRATEGIES)}.")
    tf = _tf()
    if tf is None:
        return _keras_placement(name, cpu_replicas)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy multi_worker needs the TF_CONFIG environment variable (cluster and task).")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if cpu_replicas and cpu_replicas > 1:
        configure_cpu_replicas(cpu_replicas)
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if gpus else "one_device"
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


def enable_determinism():
    """Deterministic TensorFlow kernels (same inputs, same bits)."""
    tf = _tf()
    if tf is not None:
        tf.config.experimental.enable_op_determinism()


def is_multi_worker(strategy):
    tf = _tf()
    return tf is not None and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def _tf_config():
    """The TF_CONFIG environment variable's cluster description; malformed JSON is a ValueError naming it."""
    text = os.environ.get("TF_CONFIG", "{}") or "{}"
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"The TF_CONFIG environment variable is not valid JSON ({e.msg} at character {e.pos}): "
                         f"{text[:200]!r}") from None
    if not isinstance(config, dict):
        raise ValueError(f"The TF_CONFIG environment variable must be a JSON object, got {text[:200]!r}")
    return config


def task_info():
    """(task type, task index, number of workers) from TF_CONFIG; a single process is the chief."""
    config = _tf_config()
    cluster = config.get("cluster", {})
    task = config.get("task", {})
    workers = sum(len(cluster.get(k, [])) for k in ("chief", "worker"))
    return task.get("type", "chief"), int(task.get("index", 0)), max(workers, 1)


def is_chief():
    """The process that writes checkpoints, logs and exports: the ``chief`` task, else worker 0."""
    task_type, index, _ = task_info()
    config = _tf_config()
    has_chief = bool(config.get("cluster", {}).get("chief"))
    return task_type == "chief" or (task_type == "worker" and index == 0 and not has_chief)


def set_synchronized_batchnorm(model, enabled=True):
    """Makes every BatchNormalization layer of ``model`` compute its statistics over all replicas; returns how many."""
    count = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = bool(enabled)
            count += 1
    return count
