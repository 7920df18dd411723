import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

MARKERS = {
    "tf_only": "needs the TensorFlow backend (tf.distribute, tf.data internals, SavedModel, TF-specific fast paths); "
               "skipped on the other backends",
    "slow": "takes more than about 20 seconds",
    "subprocess": "launches Python subprocesses",
}


def pytest_configure(config):
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def pytest_collection_modifyitems(config, items):
    import keras

    backend = keras.config.backend()
    if backend == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"tf_only: needs the TensorFlow backend (KERAS_BACKEND={backend})")
    for item in items:
        if "tf_only" in item.keywords:
            item.add_marker(skip)
