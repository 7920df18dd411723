"""One harness for every sharing scheme of the zoo (keras-hub's ``run_vision_backbone_test`` in spirit): each
architecture builds on the zoo's dilated ResNet and on keras-hub backbones, trains on the synthetic scenes with a
loss weighting and a gradient weighting, and comes back from ``.keras``, a preset folder and the serving export in a
fresh process. The architecture files' own tests check their structure and parameter counts."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import mtl_keras
from mtl_keras import presets
from mtl_keras.data.numpy_loader import CityscapesPyDataset
from mtl_keras.data.synthetic import generate_synthetic_cityscapes
from mtl_keras.training import MultiTaskTrainer
from mtl_keras.weighting import build_weighting
from tests.helpers import random_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = keras.config.backend()
# The sharing schemes of LibMTL and of Vandenhende et al.'s survey (the papers' own models have their own tests).
ARCHITECTURES = [name for name in ("hps", "cross_stitch", "mtan", "mmoe", "cgc", "ple", "dselect_k", "ltb",
                                   "nddr_cnn", "pad_net", "mti_net") if name in mtl_keras.list_models()]
TINY = (32, 64)


def tiny(name, **overrides):
    return presets.build_from_preset(name, tiny=True, **overrides)


def test_every_scheme_of_the_field_is_registered():
    assert ARCHITECTURES == ["hps", "cross_stitch", "mtan", "mmoe", "cgc", "ple", "dselect_k", "ltb", "nddr_cnn",
                             "pad_net", "mti_net"]


# ------------------------------------------------------------------------------------------------------ backbones
def _hub_backbones():
    keras_hub = pytest.importorskip("keras_hub")
    resnet = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 8, 8, 8],
        stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(*TINY, 3))
    # DenseNet: a second family (MiT needs square images, its attention reshapes N tokens to sqrt(N)^2; keras-hub's
    # EfficientNetBackbone config drops num_features, so the copies some schemes make of it do not rebuild)
    densenet = keras_hub.models.DenseNetBackbone(stackwise_num_repeats=[1, 1, 1, 1], growth_rate=2)
    return {"keras_hub_resnet": resnet, "keras_hub_densenet": densenet}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_scheme_builds_on_the_dilated_resnet_and_on_keras_hub_backbones(name):
    images = random_images(2, *TINY)
    expected = {"semantic": (2, *TINY, 19), "instance": (2, *TINY, 2), "depth": (2, *TINY, 1)}
    model = tiny(name)
    assert type(model.backbone).__name__ == "DilatedResNetBackbone"
    assert {k: tuple(v.shape) for k, v in model(images, training=False).items()} == expected
    for label, backbone in _hub_backbones().items():
        model = tiny(name, backbone=backbone)
        out = model(images, training=False)
        assert {k: tuple(v.shape) for k, v in out.items()} == expected, label
        assert all(np.isfinite(keras.ops.convert_to_numpy(v)).all() for v in out.values()), label


# ------------------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def synthetic_batches(tmp_path_factory):
    root = generate_synthetic_cityscapes(str(tmp_path_factory.mktemp("synthetic")), num_train=4, num_val=1,
                                         height=64, width=128)
    data = CityscapesPyDataset(root, "train", image_size=TINY, batch_size=4, shuffle=False, flip=False)
    images, targets = data[0]
    return images, targets


def _task_losses(trainer, images, targets):
    # Training mode (batch statistics): the objective the steps lower; 20 steps barely move the moving averages.
    outputs = trainer.inference_model(images, training=True)
    return {t: float(keras.ops.convert_to_numpy(trainer.task_loss(t, targets, outputs))) for t in trainer.tasks}


WEIGHTINGS = ["uncertainty"] + (["pcgrad"] if BACKEND in ("tensorflow", "jax") else [])  # gradient methods: TF, JAX


@pytest.mark.slow
@pytest.mark.matrix
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_scheme_trains_twenty_steps_lowering_every_task_loss(name, weighting, synthetic_batches):
    """20 steps on one batch of synthetic scenes: every task's loss ends below where it began."""
    images, targets = synthetic_batches
    keras.utils.set_random_seed(0)
    model = tiny(name)
    trainer = MultiTaskTrainer(model, build_weighting(weighting, model.tasks))
    trainer.compile(optimizer=keras.optimizers.Adam(3e-3), run_eagerly=BACKEND == "tensorflow")
    for callback in getattr(model, "training_callbacks", lambda epochs: [])(20):
        callback.set_model(trainer)
        callback.on_epoch_begin(10)  # past LTB's warm-up: the branches are sampled
    before = _task_losses(trainer, images, targets)
    repeated = (np.concatenate([images] * 20), {t: np.concatenate([v] * 20) for t, v in targets.items()})
    history = trainer.fit(*repeated, batch_size=len(images), epochs=1, shuffle=False, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    after = _task_losses(trainer, images, targets)
    assert all(after[t] < before[t] for t in trainer.tasks), (before, after)


# ------------------------------------------------------------------------------------------- in a fresh process
# `.keras` files and preset folders of every registered model are loaded in a fresh process by
# tests/test_zoo.py::test_every_registered_model_round_trips_through_a_keras_file_in_a_new_process and
# tests/test_model_presets.py::test_every_architecture_round_trips_through_a_preset_folder_in_a_fresh_process; the
# serving export of the schemes is loaded in one here (tests/test_export.py exports the other models in-process).
SERVE_IN_A_FRESH_PROCESS = """
import sys
import numpy as np, tensorflow as tf
folder, names = sys.argv[1], sys.argv[2:]
for name in names:
    images = np.load(f"{folder}/{name}.images.npy")
    served = tf.saved_model.load(f"{folder}/{name}.export").signatures["serving_default"](images=tf.constant(images))
    np.savez(f"{folder}/{name}.served.npz", semantic=served["semantic_logits"].numpy(),
             instance=served["instance_vectors"].numpy(), depth=served["depth"].numpy())
    odd = tf.random.uniform((1, images.shape[1] + 5, images.shape[2] - 3, 3), 0, 255, seed=1)
    shapes = {k: v.shape[1:3] for k, v in tf.saved_model.load(f"{folder}/{name}.export").signatures[
        "serving_default"](images=odd).items()}
    assert all(s == odd.shape[1:3] for s in shapes.values()), (name, shapes)
"""


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.tf_only
def test_each_scheme_serves_its_outputs_from_an_export_loaded_in_a_fresh_process(tmp_path):
    from mtl_keras import export

    expected = {}
    for name in ARCHITECTURES:
        model = tiny(name)
        rng = np.random.default_rng(0)  # trained-looking weights, moving statistics included
        model.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) ** 2 for w in model.get_weights()])
        images = random_images(2, *TINY, seed=1)
        np.save(tmp_path / f"{name}.images.npy", images)
        expected[name] = {k: keras.ops.convert_to_numpy(v) for k, v in model(images, training=False).items()}
        export.export_saved_model(model, str(tmp_path / f"{name}.export"))
    proc = subprocess.run([sys.executable, "-c", SERVE_IN_A_FRESH_PROCESS, str(tmp_path), *expected], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, outputs in expected.items():
        served = dict(np.load(tmp_path / f"{name}.served.npz"))
        assert sorted(served) == sorted(outputs), name
        for task, value in served.items():
            np.testing.assert_allclose(value, outputs[task], atol=2e-4, rtol=1e-4, err_msg=f"{name} {task}")


def test_kendall_s_head_per_task_on_a_scheme():
    """head="aspp": each task gets Kendall et al.'s ASPP (1x1, three atrous 3x3 and image pooling: 5 x 8 = 40
    channels) and light decoder instead of LibMTL's DeepLab head."""
    model = tiny("mmoe", head="aspp")
    names = {layer.name for layer in model.layers}
    assert {"semantic_head_aspp_concat", "depth_decoder_conv", "instance_decoder_logits"} <= names
    assert not any("aspp_project" in n for n in names)  # the DeepLab head's projection is not there
    assert model.get_layer("semantic_head_aspp_concat").output.shape[-1] == 5 * 8
    out = model(random_images(1, *TINY), training=False)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"semantic": (1, *TINY, 19), "instance": (1, *TINY, 2),
                                                           "depth": (1, *TINY, 1)}
    assert type(model).from_config(model.get_config()).get_config()["head"] == "aspp"
