"""Backbones (named feature pyramids, split into stages) and heads on any backbone that fits them."""

import json
import os

import h5py
import keras
import numpy as np
import pytest

import mtl_keras
from mtl_keras import registry
from mtl_keras.models import DenseUNetEncoder, DilatedResNetBackbone, KendallMultiTaskModel, MTUNet
from mtl_keras.models.heads import task_output
from mtl_keras.models.task_model import MultiTaskModel
from mtl_keras.tasks import validate_tasks
from mtl_keras.training import MultiTaskTrainer
from mtl_keras.weighting import UncertaintyWeightingLayer
from tests.helpers import assert_keras_save_load, assert_model_config_round_trip, random_images, run_backbone_test


@pytest.mark.parametrize("output_stride,deep", [(8, 8), (16, 4), (32, 2)])
def test_dilated_resnet_pyramid(output_stride, deep, tmp_path):
    # 64x64 input: stem 7x7/2 -> 32, max-pool -> 16 (P2), conv3 -> 8; then stride 2 per stage until output_stride.
    backbone = DilatedResNetBackbone(depth=26, width=4, output_stride=output_stride)
    expected = {"P1": (32, 32, 4), "P2": (16, 16, 16), "P3": (8, 8, 32), "P4": (max(deep, 4), max(deep, 4), 64),
                "P5": (deep, deep, 128)}
    run_backbone_test(backbone, random_images(1, 64, 64), expected,
                      folder=str(tmp_path) if output_stride == 8 else None)


def test_dense_unet_encoder_pyramid(tmp_path):
    backbone = DenseUNetEncoder(base_filters=4)
    expected = {"P1": (32, 64, 4), "P2": (16, 32, 8), "P3": (8, 16, 16), "P4": (4, 8, 32), "P5": (2, 4, 32)}
    run_backbone_test(backbone, random_images(1, 32, 64), expected, folder=str(tmp_path))


@pytest.mark.parametrize("make", [lambda: DilatedResNetBackbone(depth=26, width=4, output_stride=8),
                                  lambda: DilatedResNetBackbone(depth=26, width=4, output_stride=16),
                                  lambda: DenseUNetEncoder(base_filters=4)], ids=["resnet_os8", "resnet_os16", "dense"])
def test_stem_and_stages_reproduce_the_pyramid(make):
    backbone = make()
    num_weights = len(backbone.weights)
    images = random_images(1, 32, 64)
    pyramid = backbone(images, training=False)
    assert backbone.stage_names == list(pyramid) == ["P1", "P2", "P3", "P4", "P5"]
    x = backbone.stem(images, training=False)
    for level, stage in zip(backbone.stage_names, backbone.stages):
        x = stage(x, training=False)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(x), keras.ops.convert_to_numpy(pyramid[level]),
                                      err_msg=level)
        assert tuple(x.shape[1:]) == (32 // backbone.pyramid_strides[level], 64 // backbone.pyramid_strides[level],
                                      backbone.pyramid_channels[level])
    # The stages are views on the backbone's layers: every weight in exactly one stage, none added.
    stage_weights = [id(w) for stage in backbone.stages for w in stage.weights]
    assert sorted(stage_weights) == sorted(id(w) for w in backbone.weights) and not backbone.stem.weights
    assert len(backbone.weights) == num_weights
    assert_model_config_round_trip(backbone, images)  # the stages' graph nodes leave the backbone's config as it was


@keras.saving.register_keras_serializable(package="mtl_keras_tests")
class CrossStitch(keras.layers.Layer):
    """Misra et al. (2016)'s cross-stitch unit: output i is sum_j alpha_ij input_j (alpha starts at 0.9 / 0.1)."""

    def build(self, input_shape):
        n = len(input_shape)
        start = np.full((n, n), 0.1 / max(n - 1, 1))
        np.fill_diagonal(start, 0.9)
        self.alpha = self.add_weight(shape=(n, n), initializer=keras.initializers.Constant(start), name="alpha")

    def call(self, inputs):
        alpha = keras.ops.cast(self.alpha, inputs[0].dtype)
        return [sum(alpha[i, j] * x for j, x in enumerate(inputs)) for i in range(len(inputs))]

    def compute_output_shape(self, input_shape):
        return list(input_shape)


@keras.saving.register_keras_serializable(package="mtl_keras_tests")
class CrossStitchNet(MultiTaskModel):
    """A new architecture on backbone stages, written as one file of mtl_keras/models/ would be: one dilated ResNet
    per task (copies of one config), a cross-stitch unit after every stage, the zoo's task outputs."""

    def __init__(self, tasks=("semantic", "depth"), num_classes=19, input_shape=(32, 32, 3), backbone_width=4,
                 output_stride=8, **kwargs):
        tasks = validate_tasks(tasks)
        # === Layers: the encoders ===
        first = DilatedResNetBackbone(depth=26, width=backbone_width, output_stride=output_stride,
                                      input_shape=tuple(input_shape), name=f"{tasks[0]}_encoder")
        encoders = [first] + [DilatedResNetBackbone.from_config({**first.get_config(), "name": f"{task}_encoder"})
                              for task in tasks[1:]]
        # === Functional graph ===
        image = keras.Input(tuple(input_shape), name="image")
        features = [encoder.stem(image) for encoder in encoders]
        for i, level in enumerate(first.stage_names):
            features = CrossStitch(name=f"cross_stitch_{level}")(
                [encoder.stages[i](x) for encoder, x in zip(encoders, features)])
        outputs = {task: task_output(x, task, num_classes, image, name=f"{task}_head")
                   for task, x in zip(tasks, features)}
        super().__init__(inputs=image, outputs=outputs, **kwargs)
        # === Config ===
        self._set_common(first, False, tasks, num_classes, size_multiple=1)
        self.backbone_width, self.output_stride = backbone_width, output_stride

    def get_config(self):
        return self._config(dict(backbone_width=self.backbone_width, output_stride=self.output_stride), {})


def test_an_architecture_on_backbone_stages_is_a_class_and_its_registration(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "_MODEL_ENTRY_POINTS", dict(registry._MODEL_ENTRY_POINTS))  # undone after the test

    @mtl_keras.register_model
    def cross_stitch_resnet26(tasks=("semantic", "depth"), num_classes=19, input_shape=(32, 32, 3), **overrides):
        return CrossStitchNet(tasks, num_classes, input_shape, name="cross_stitch_resnet26", **overrides)

    model = mtl_keras.build_model("cross_stitch_resnet26", num_classes=3, output_stride=16)
    images = random_images(2, 32, 32)
    out = model(images, training=False)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"semantic": (2, 32, 32, 3), "depth": (2, 32, 32, 1)}
    # Two full encoders (the copy has its own weights), five 2x2 cross-stitch units and the two 1x1 output convs.
    copies = [keras.ops.convert_to_numpy(model.get_layer(f"{task}_encoder_P5").weights[0]) for task in model.tasks]
    assert copies[0].shape == copies[1].shape and not np.array_equal(*copies)
    assert model.count_params() == 2 * model.backbone.count_params() + 5 * 4 + (128 * 3 + 3) + (128 + 1)
    assert_model_config_round_trip(model, images)
    assert_keras_save_load(model, images, str(tmp_path))

    trainer = MultiTaskTrainer(model, UncertaintyWeightingLayer(model.tasks))
    # Eager on TensorFlow: tracing this graph takes a minute of 2 cores, the eager step a second (JAX: jit is faster).
    trainer.compile(optimizer=keras.optimizers.Adam(1e-2), run_eagerly=keras.backend.backend() == "tensorflow")
    targets = {"semantic": np.random.default_rng(1).integers(0, 3, (2, 32, 32)).astype("int32"),
               "depth": np.random.default_rng(2).uniform(1, 5, (2, 32, 32, 1)).astype("float32")}
    before = keras.ops.convert_to_numpy(model.get_layer("cross_stitch_P1").alpha)
    history = trainer.fit(images, targets, batch_size=2, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    assert not np.allclose(keras.ops.convert_to_numpy(model.get_layer("cross_stitch_P1").alpha), before)


def test_backbone_layers_keep_keras_applications_names():
    names = {layer.name for layer in DilatedResNetBackbone(depth=50, width=4).layers}
    assert {"conv1_conv", "conv2_block3_out", "conv4_block6_3_bn", "conv5_block3_out"} <= names
    assert "conv4_block7_out" not in names  # ResNet-50 has 6 conv4 blocks


def test_kendall_head_on_the_dense_encoder(tmp_path):
    backbone = DenseUNetEncoder(base_filters=4, input_shape=(32, 64, 3))
    model = KendallMultiTaskModel(backbone=backbone, num_classes=5, aspp_channels=8, decoder_channels=8)
    images = random_images(2, 32, 64)
    out = model(images, training=False)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"semantic": (2, 32, 64, 5), "instance": (2, 32, 64, 2),
                                                           "depth": (2, 32, 64, 1)}
    assert model.get_config()["backbone"]["class_name"] == "DenseUNetEncoder"
    assert_model_config_round_trip(model, images)
    assert_keras_save_load(model, images, str(tmp_path))


@pytest.mark.parametrize("output_stride,num_blocks", [(8, 3), (32, 4)])
def test_mt_unet_decoders_on_a_dilated_resnet(output_stride, num_blocks, tmp_path):
    backbone = DilatedResNetBackbone(depth=26, width=4, output_stride=output_stride, input_shape=(64, 64, 3))
    model = MTUNet(backbone=backbone, tasks=("semantic", "depth"), num_classes=3, decoder_filters=[8] * num_blocks,
                   bottleneck_filters=8)
    names = {layer.name for layer in model.layers}
    # The decoder blocks follow the backbone's strides: one block per finer stride, cross talk into block 3.
    assert f"depth_decoder_block{num_blocks}_conv2_conv" in names and \
        f"depth_decoder_block{num_blocks + 1}_conv1_conv" not in names
    assert "semantic_decoder_block3_cross_concat" in names
    assert ("bottleneck_up" in names) == (output_stride == 32)  # OS 8: the deepest skip has the bottleneck's stride
    assert model.size_multiple == output_stride
    out = model(random_images(1, 64, 64), training=False)
    assert tuple(out["semantic"].shape) == (1, 64, 64, 3) and tuple(out["depth"].shape) == (1, 64, 64, 1)
    if output_stride == 8:
        assert_keras_save_load(model, random_images(1, 64, 64), str(tmp_path))


def test_mt_unet_refuses_sizes_its_backbone_cannot_take():
    with pytest.raises(ValueError, match="divisible by 8"):
        mtl_keras.build_model("mt_unet_dilated_resnet50", input_shape=(36, 64, 3), backbone_width=4,
                              decoder_filters=(8, 8, 8), bottleneck_filters=8)


def test_freezing_the_backbone_leaves_only_the_heads_trainable():
    model = mtl_keras.build_model("kendall_deeplabv3_resnet26_cpu", input_shape=(32, 64, 3), backbone_width=4,
                                  aspp_channels=8, decoder_channels=8)
    head_layers = [layer for layer in model.layers if layer.name.startswith(("aspp", "semantic", "instance", "depth"))]
    head_trainable = sum(int(np.prod(w.shape)) for layer in head_layers for w in layer.trainable_weights)
    model.backbone.trainable = False
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == head_trainable
    assert all(not layer.trainable for layer in model.layers if layer.name.startswith("conv"))


def test_weights_file_layout_is_flat(tmp_path):
    """A task model's weights file lists every layer under layers/ as before backbones existed (files written by
    earlier versions keep loading): no nested backbone group holds weights."""
    model = mtl_keras.build_model("mt_unet", input_shape=(32, 32, 3), base_filters=4)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    arrays = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.append(name) if isinstance(obj, h5py.Dataset) else None)
    assert arrays and all(name.startswith("layers/") and name.count("/") == 3 for name in arrays), arrays[:5]
    assert len(arrays) == len(model.weights)


def test_backbone_weights_of_the_wrong_kind_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        DilatedResNetBackbone(depth=50, backbone_weights=str(tmp_path / "missing.h5"))
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="ResNet-50 and ResNet-101 only"):
        DilatedResNetBackbone(depth=26, width=4, backbone_weights=str(tmp_path / "w.h5"))


@pytest.mark.slow
def test_backbone_starts_from_a_keras_applications_file(tmp_path):
    """ImageNet-format weights (here a random keras.applications.ResNet50 file) load layer by layer into the
    dilated backbone and into a task model built on it."""
    app = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(None, None, 3))
    path = str(tmp_path / "resnet50.weights.h5")
    app.save_weights(path)
    model = mtl_keras.build_model("mt_unet_dilated_resnet50", input_shape=(32, 64, 3), decoder_filters=(8, 8, 8),
                                  bottleneck_filters=8, backbone_weights=path)
    for name in ("conv2_block1_2_conv", "conv4_block6_3_conv", "conv5_block3_3_bn"):
        for ours, theirs in zip(model.get_layer(name).get_weights(), app.get_layer(name).get_weights()):
            np.testing.assert_array_equal(ours, theirs, err_msg=name)
    fresh = mtl_keras.build_model("mt_unet_dilated_resnet50", input_shape=(32, 64, 3), decoder_filters=(8, 8, 8),
                                  bottleneck_filters=8)
    assert not np.array_equal(fresh.get_layer("conv4_block6_3_conv").get_weights()[0],
                              app.get_layer("conv4_block6_3_conv").get_weights()[0])
    assert os.path.isfile(path)


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_run_started_with_backbone_weights_begins_from_them(tmp_path):
    """train.py --backbone_weights FILE: the encoder's convolutions start as the file's (a random-weight
    keras.applications.ResNet50 written here, in the format of the ImageNet release); a learning rate of 1e-9 keeps
    them there for the one step, so the trained model still holds them."""
    import subprocess
    import sys

    from tests.test_data_miniatures import write_cityscapes_miniature

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    app = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(None, None, 3))
    # The legacy HDF5 layout of the release file resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5.
    from keras.src.legacy.saving import legacy_h5_format

    path = str(tmp_path / "resnet50_notop.h5")
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, app)
    write_cityscapes_miniature(tmp_path / "cs")
    run = tmp_path / "run"
    cmd = [sys.executable, os.path.join(root, "experiments", "train.py"), "--model", "kendall_deeplabv3_resnet50",
           "--backbone_weights", path, "--dataset", "cityscapes", "--data_dir", str(tmp_path / "cs"),
           "--image_size", "32,64", "--batch_size", "2", "--steps", "1", "--learning_rate", "1e-9", "--noexport",
           "--val_batches", "1", "--output_dir", str(run)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = mtl_keras.load_model(str(run))
    for name in ("conv2_block1_2_conv", "conv3_block4_3_conv", "conv5_block3_1_conv"):
        for ours, theirs in zip(trained.get_layer(name).get_weights(), app.get_layer(name).get_weights()):
            np.testing.assert_allclose(ours, theirs, atol=1e-6, err_msg=name)
    assert json.loads((run / "config.json").read_text())["backbone_weights"] == path


@pytest.mark.slow
def test_mt_unet_decoders_on_the_dilated_resnet50_train_on_the_synthetic_set_and_export(tmp_path):
    import tensorflow as tf

    from mtl_keras.config import TrainConfig
    from mtl_keras.experiment import run_training

    out = tmp_path / "run"
    # MT-UNet's tasks (semantic + depth; the instance head and its export are tested on the Kendall models).
    config = TrainConfig(model="mt_unet_dilated_resnet50", data_dir=str(tmp_path / "synthetic"),
                         tasks=("semantic", "depth"), synthetic_num_train=4, synthetic_num_val=2, image_size=(32, 64),
                         batch_size=2, steps=2, num_sample_images=0, output_dir=str(out),
                         model_overrides=dict(backbone_width=8, decoder_filters=[16, 8, 8], bottleneck_filters=16))
    results = run_training(config, verbose=0)
    for task in ("semantic", "depth"):
        assert all(np.isfinite(results["train_history"][f"{task}_loss"])), task
    # The serving export pads 37x51 images to multiples of 8 (the dilated ResNet's output stride) and crops back.
    served = tf.saved_model.load(str(out / "export"))
    result = served.signatures["serve_uint8"](images=tf.zeros((1, 37, 51, 3), tf.uint8))
    assert sorted(result) == ["depth", "semantic_labels", "semantic_logits"]
    assert tuple(result["semantic_logits"].shape) == (1, 37, 51, 19) and tuple(result["depth"].shape) == (1, 37, 51, 1)
    info = json.loads((out / "export" / "assets.extra" / "export_info.json").read_text())
    assert info["size_multiple"] == 8
    assert isinstance(mtl_keras.from_preset(str(out / "preset")), MTUNet)
