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
    if name == "multi_worker" and backend != "jax":
        raise ValueError(f"--strategy multi_worker needs KERAS_BACKEND=tensorflow or jax (now {backend}).")
    if backend != "jax":
        if name == "mirrored":
            raise ValueError(f"--strategy mirrored needs KERAS_BACKEND=tensorflow or jax (now {backend}).")
        return KerasPlacement()
    import jax

    if name == "multi_worker":
        _initialize_jax_processes()
    devices = jax.devices()  # after initialisation: every process's devices, ordered by process
    if cpu_replicas and cpu_replicas > 1 and len(devices) != cpu_replicas and devices[0].platform == "cpu":
        raise ValueError(f"--cpu_replicas {cpu_replicas} on JAX: start Python with "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={cpu_replicas} (JAX sees "
                         f"{len(devices)} CPU device(s); the count is fixed when JAX starts).")
    if name == "multi_worker":
        # Keras shards each global tf.data batch over the processes (DataParallel.distribute_dataset): process p
        # reads the p-th contiguous slice, which lands on its devices, the p-th block of this mesh.
        return KerasPlacement(keras.distribution.DataParallel(devices=devices), len(devices))
    if name == "one_device" or len(devices) == 1 or (name == "auto" and devices[0].platform == "cpu"):
        return KerasPlacement()
    return KerasPlacement(keras.distribution.DataParallel(devices=devices), len(devices))


# --strategy multi_worker on JAX: one process per host (or per accelerator), started by a launcher that tells each
# process the cluster in environment variables, read in this order:
# - TF_CONFIG, exactly as for TensorFlow's MultiWorkerMirroredStrategy (one launcher serves both backends): the
#   processes are the cluster's "chief" then "worker" tasks in order, process 0 (the chief, or worker 0) is JAX's
#   coordinator and listens on its TF_CONFIG address; the other addresses are not used (gloo picks its own ports).
# - Keras' own KERAS_DISTRIBUTION_JOB_ADDRESSES (the coordinator's host:port first), KERAS_DISTRIBUTION_NUM_PROCESSES
#   and KERAS_DISTRIBUTION_PROCESS_ID (keras.distribution.initialize reads them).
# SLURM's variables are not detected: which process is the chief must be known before JAX starts (the chief locks the
# output folder first), so a SLURM script sets the Keras variables from SLURM_PROCID / SLURM_NTASKS.
KERAS_CLUSTER_VARIABLES = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                           "KERAS_DISTRIBUTION_PROCESS_ID")


def _env_int(name):
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"The {name} environment variable must be an integer, got {text!r}.") from None


def _jax_cluster():
    """(coordinator address, number of processes, this process's index) from TF_CONFIG or Keras' variables; None
    when neither describes a cluster."""
    if os.environ.get("TF_CONFIG"):
        config = _tf_config()
        cluster, task = config.get("cluster", {}), config.get("task", {})
        chiefs, workers = list(cluster.get("chief", [])), list(cluster.get("worker", []))
        if not chiefs + workers:
            return None
        task_type, index = task.get("type", "chief"), int(task.get("index", 0))
        if task_type not in ("chief", "worker"):
            raise ValueError(f"TF_CONFIG task type {task_type!r}: --strategy multi_worker on JAX runs chief and worker "
                             f"tasks only.")
        process_id = index if task_type == "chief" else len(chiefs) + index
        if not 0 <= process_id < len(chiefs + workers):
            raise ValueError(f"TF_CONFIG task {task_type} {index} is not in its cluster ({len(chiefs)} chief(s), "
                             f"{len(workers)} worker(s)).")
        return (chiefs + workers)[0], len(chiefs + workers), process_id
    present = [name for name in KERAS_CLUSTER_VARIABLES if os.environ.get(name)]
    if not present:
        return None
    if len(present) < len(KERAS_CLUSTER_VARIABLES):
        missing = sorted(set(KERAS_CLUSTER_VARIABLES) - set(present))
        raise ValueError(f"{', '.join(present)} set but not {', '.join(missing)}: --strategy multi_worker on JAX "
                         f"needs all three.")
    num_processes, process_id = (_env_int(name) for name in KERAS_CLUSTER_VARIABLES[1:])
    if not 0 <= process_id < num_processes:
        raise ValueError(f"KERAS_DISTRIBUTION_PROCESS_ID {process_id} is not in 0..{num_processes - 1} "
                         f"(KERAS_DISTRIBUTION_NUM_PROCESSES).")
    return os.environ["KERAS_DISTRIBUTION_JOB_ADDRESSES"].split(",")[0], num_processes, process_id


def _initialize_jax_processes():
    """Joins this process to the JAX cluster (once, before JAX's first computation): ``keras.distribution.initialize``
    then ``jax.devices()`` lists every process's devices and each jitted step runs on all of them together."""
    import jax

    if jax.distributed.is_initialized():
        return
    cluster = _jax_cluster()
    if cluster is None:
        raise ValueError("--strategy multi_worker on JAX needs the cluster in TF_CONFIG (as on TensorFlow) or in "
                         f"{', '.join(KERAS_CLUSTER_VARIABLES)}.")
    try:  # Keras shards the global batches with tf.data (DataParallel.distribute_dataset), its only sharded reader
        import tensorflow  # noqa: F401
    except ImportError:
        raise ValueError("--strategy multi_worker on JAX reads the data with tf.data: install tensorflow.") from None
    # Cross-process collectives on CPU (the reduction of the gradients) need an implementation; gloo is JAX's
    # default since 0.5, older versions have none. A value set by the user (mpi) stays.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    coordinator, num_processes, process_id = cluster
    try:
        keras.distribution.initialize(coordinator, num_processes, process_id)
    except RuntimeError as e:  # e.g. JAX already ran a computation in this process: too late to join a cluster
        raise RuntimeError(f"--strategy multi_worker on JAX: cannot join the cluster at {coordinator} as process "
                           f"{process_id} of {num_processes}: {e}") from e


def _jax_process():
    """(process index, number of processes) on JAX: JAX's own once initialised, else the cluster the environment
    describes (the folder lock is taken before JAX starts); None off JAX or without a cluster."""
    if keras.config.backend() != "jax":
        return None
    import jax

    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    cluster = _jax_cluster()
    return None if cluster is None else (cluster[2], cluster[1])


def is_multi_process(strategy):
    """Whether ``strategy`` is a JAX ``DataParallel`` spanning several processes (``--strategy multi_worker``)."""
    keras_distribution = getattr(strategy, "keras_distribution", None)
    return keras_distribution is not None and keras_distribution.num_processes > 1


_CALLBACK_HOOKS = tuple(f"on_{stage}_{edge}" for stage in ("train", "test", "predict", "epoch", "batch", "train_batch",
                                                          "test_batch", "predict_batch") for edge in ("begin", "end"))


class _OutsideDistribution(keras.callbacks.Callback):
    """Runs ``callback``'s hooks with no Keras distribution in effect (see :func:`callbacks_outside_distribution`)."""

    def __init__(self, callback):
        super().__init__()
        self.callback = callback
        for hook in _CALLBACK_HOOKS:
            setattr(self, hook, self._outside(getattr(callback, hook)))

    @staticmethod
    def _outside(method):
        def call(*args, **kwargs):
            previous = keras.distribution.distribution()
            keras.distribution.set_distribution(None)
            try:
                return method(*args, **kwargs)
            finally:
                keras.distribution.set_distribution(previous)

        return call

    def set_model(self, model):
        super().set_model(model)
        self.callback.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.callback.set_params(params)


def callbacks_outside_distribution(strategy, callbacks):
    """``callbacks``, made to run outside the Keras distribution when ``strategy`` spans several JAX processes.

    There, creating a Keras variable under the distribution is a collective (JAX checks that every process passes the
    same value), so a callback that creates one on the chief only would stall or garble the processes' next
    collective: Keras' ``save_weights`` builds a reference ``Optimizer(1.0)`` at every save (keras/src/saving/
    saving_lib.py ``get_attr_skipset``; its cache never hits), and only the chief saves ``checkpoints/``. Variables that
    already exist keep their own layout: assigning them stays a collective that every process runs."""
    if not is_multi_process(strategy):
        return list(callbacks)
    return [_OutsideDistribution(callback) for callback in callbacks]


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
    """(task type, task index, number of workers) from TF_CONFIG; a single process is the chief. On JAX
    ("worker", process index, number of processes) of its cluster (see ``KERAS_CLUSTER_VARIABLES``)."""
    process = _jax_process()
    if process is not None:
        return "worker", process[0], process[1]
    config = _tf_config()
    cluster = config.get("cluster", {})
    task = config.get("task", {})
    workers = sum(len(cluster.get(k, [])) for k in ("chief", "worker"))
    return task.get("type", "chief"), int(task.get("index", 0)), max(workers, 1)


def is_chief():
    """The process that writes checkpoints, logs and exports: the ``chief`` task, else worker 0; JAX's process 0."""
    process = _jax_process()
    if process is not None:
        return process[0] == 0
    task_type, index, _ = task_info()
    config = _tf_config()
    has_chief = bool(config.get("cluster", {}).get("chief"))
    return task_type == "chief" or (task_type == "worker" and index == 0 and not has_chief)


def set_synchronized_batchnorm(model, enabled=True):
    """Makes every BatchNormalization layer of ``model`` compute its statistics over all replicas; returns how many.
    Off TensorFlow nothing to do (0): a JAX ``DataParallel`` step is one computation over the global batch, whose
    batch statistics already span every replica (Keras refuses ``synchronized=True`` there); PyTorch has one."""
    if _tf() is None:
        return 0
    count = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = bool(enabled)
            count += 1
    return count
