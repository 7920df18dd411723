import keras
import numpy as np
import pytest

import mtl_keras
from mtl_keras.models.mt_unet import MTUNet
from mtl_keras.training import MultiTaskTrainer
from mtl_keras.weighting import UncertaintyWeightingLayer

H, W = 32, 64
NUM_CLASSES = 5
SMALL = dict(num_classes=NUM_CLASSES, input_shape=(H, W, 3), base_filters=8)
ALL_TASKS = ("semantic", "instance", "depth")
# The paper's model (base_filters=64, three tasks, 19 classes); the count does not depend on the input size.
FULL_MODEL_PARAMS = 81_579_606


def small_model(tasks=ALL_TASKS, **kwargs):
    return mtl_keras.build_model("mt_unet", tasks=tasks, **{**SMALL, **kwargs})


def images(batch=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch, H, W, 3)).astype("float32")


def predict(model, x):
    return {k: keras.ops.convert_to_numpy(v) for k, v in model(x, training=False).items()}


@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("cross_talk", [True, False])
@pytest.mark.parametrize("tasks", [("semantic", "depth"), ALL_TASKS])
def test_outputs_named_by_task_at_input_size(tasks, attention, cross_talk):
    model = small_model(tasks, attention=attention, cross_talk=cross_talk)
    assert isinstance(model, MTUNet) and model.name == "mt_unet"
    out = predict(model, images())
    channels = {"semantic": NUM_CLASSES, "instance": 2, "depth": 1}
    assert sorted(out) == sorted(tasks)
    for task, value in out.items():
        assert value.shape == (2, H, W, channels[task]) and value.dtype == np.float32
        assert np.isfinite(value).all()


def test_registered_and_single_task_builds_without_cross_talk_effect():
    assert "mt_unet" in mtl_keras.list_models()
    with_ct = small_model(("depth",), cross_talk=True)
    without = small_model(("depth",), cross_talk=False)
    assert list(predict(with_ct, images())) == ["depth"]
    assert with_ct.count_params() == without.count_params()
    assert not any("cross" in layer.name for layer in with_ct.layers)


def test_input_size_must_be_divisible_by_16():
    with pytest.raises(ValueError, match="input_shape"):
        MTUNet(input_shape=(40, 64, 3), base_filters=8)
    with pytest.raises(ValueError, match="input_shape"):
        MTUNet(input_shape=(32, 72, 3), base_filters=8)


def test_config_round_trip_and_keras_save_load(tmp_path):
    model = small_model(("semantic", "depth"), attention=True, cross_talk=True, dropout=0.2)
    config = model.get_config()
    assert config["dropout"] == 0.2 and config["base_filters"] == 8 and config["cross_talk"] is True
    clone = MTUNet.from_config(config)
    assert clone.get_config() == config
    clone.set_weights(model.get_weights())
    x = images()
    expected = predict(model, x)
    for task, value in predict(clone, x).items():
        np.testing.assert_allclose(value, expected[task], rtol=1e-5, atol=1e-5)

    path = str(tmp_path / "mt_unet.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)  # default safe_mode=True
    assert isinstance(loaded, MTUNet) and loaded.get_config() == config
    for task, value in predict(loaded, x).items():
        np.testing.assert_allclose(value, expected[task], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cross_talk", [True, False])
def test_cross_talk_links_depth_decoder_into_semantic_output(cross_talk):
    model = small_model(("semantic", "depth"), cross_talk=cross_talk)
    x = images()
    before = predict(model, x)
    layer = model.get_layer("depth_decoder_block2_conv2_conv")
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    layer.kernel.assign(kernel + np.random.default_rng(1).normal(0, 1, kernel.shape).astype("float32"))
    after = predict(model, x)
    assert np.abs(after["depth"] - before["depth"]).max() > 1e-3  # the perturbation matters
    semantic_change = np.abs(after["semantic"] - before["semantic"]).max()
    if cross_talk:
        assert semantic_change > 1e-3
    else:
        assert semantic_change == 0.0


def test_switches_change_parameter_count():
    counts = {(a, c): small_model(("semantic", "depth"), attention=a, cross_talk=c).count_params()
              for a in (True, False) for c in (True, False)}
    assert counts[(True, True)] != counts[(True, False)]  # cross talk widens block 3's upsampling
    assert counts[(False, True)] != counts[(False, False)]
    assert counts[(False, True)] < counts[(True, True)]  # attention adds two convs per decoder block
    assert counts[(False, False)] < counts[(True, False)]


def learnable_dataset(n=4):
    """(images, targets) as numpy arrays: semantic label = whether a pixel is bright; inverse depth = a function of
    the row."""
    rng = np.random.default_rng(0)
    bright = rng.uniform(size=(n, H, W)) > 0.5
    x = np.where(bright[..., None], 220.0, 30.0) + rng.normal(0, 5, (n, H, W, 3))
    rows = np.broadcast_to(np.linspace(0.0, 1.0, H)[None, :, None, None], (n, H, W, 1))
    targets = {"semantic": bright.astype("int32"), "depth": rows.astype("float32"),
               "depth_mask": np.ones((n, H, W, 1), "float32")}
    return x.astype("float32"), targets


@pytest.mark.slow  # 20 s (TensorFlow) to 50 s (PyTorch) on 2 CPU cores
def test_short_training_lowers_task_losses():
    keras.utils.set_random_seed(0)
    tasks = ("semantic", "depth")
    model = mtl_keras.build_model("mt_unet", tasks=tasks, num_classes=2, input_shape=(H, W, 3), base_filters=8)
    trainer = MultiTaskTrainer(model, UncertaintyWeightingLayer(tasks))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, targets = learnable_dataset()
    # One batch of all 4 examples per epoch, in order (as the repeated tf.data pipeline this replaced gave).
    history = trainer.fit(x, targets, batch_size=4, epochs=15, shuffle=False, verbose=0).history
    for task in tasks:
        losses = history[f"{task}_loss"]
        assert np.isfinite(losses).all()
        assert losses[-1] < losses[0] and np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), (task, losses)


def test_full_size_parameter_count():
    model = mtl_keras.build_model("mt_unet", tasks=ALL_TASKS, num_classes=19, input_shape=(64, 128, 3))
    count = model.count_params()
    print(f"mt_unet (base_filters=64, 3 tasks, 19 classes): {count:,} parameters")
    assert count == FULL_MODEL_PARAMS
