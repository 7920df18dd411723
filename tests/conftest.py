import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

MARKERS = {
    "tf_only": "needs the TensorFlow backend (tf.distribute, tf.data internals, SavedModel, TF-specific fast paths); "
               "skipped on the other backends",
    "slow": "takes more than about 5 seconds",
    "subprocess": "launches Python subprocesses",
    "matrix": "the architecture x weighting training matrix (tests/test_architectures.py); .ci/run runs it in a stage "
              "of its own, the README suite skips it unless MTL_KERAS_MATRIX=1",
    "cluster": "several cooperating training processes at once (TF workers, JAX processes, a benchmark grid) "
               "preempted, killed and restarted; each keeps both cores busy, so .ci/run runs them in a stage of their "
               "own and the README suite skips them unless MTL_KERAS_CLUSTER=1",
}


def pytest_configure(config):
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def pytest_collection_modifyitems(config, items):
    import keras

    for marker, variable, stage in (("matrix", "MTL_KERAS_MATRIX", "architecture"),
                                    ("cluster", "MTL_KERAS_CLUSTER", "cluster")):
        if not os.environ.get(variable):
            skip_stage = pytest.mark.skip(reason=f"{marker}: set {variable}=1 (.ci/run's {stage} stage)")
            for item in items:
                if marker in item.keywords:
                    item.add_marker(skip_stage)
    backend = keras.config.backend()
    if backend == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"tf_only: needs the TensorFlow backend (KERAS_BACKEND={backend})")
    for item in items:
        if "tf_only" in item.keywords:
            item.add_marker(skip)
