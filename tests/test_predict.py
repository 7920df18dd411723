"""mtl_keras.predict: numpy images of any size -> per-image labels, instance ids, depth (every backend).

Tiny models; no TensorFlow-only call, so the file runs under KERAS_BACKEND=jax and torch too. Clustering of an
untrained model's vectors uses ``scale=1.0`` (the 128x256 lengths: few peaks, fast); the hand-set model below uses
the defaults.
"""

import glob

import keras
import numpy as np
import pytest

import mtl_keras
from mtl_keras.instances import cluster_instances, instance_vectors

KENDALL = dict(input_shape=(32, 64, 3), backbone_width=8, aspp_channels=16, decoder_channels=16)
MT_UNET = dict(tasks=("semantic", "instance", "depth"), input_shape=(32, 64, 3), base_filters=4)
ARCHITECTURES = {"kendall_deeplabv3_resnet26_cpu": KENDALL, "mt_unet": MT_UNET}
FAST_CLUSTERING = dict(scale=1.0)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def zoo_model(request):
    keras.utils.set_random_seed(0)
    model = mtl_keras.build_model(request.param, **ARCHITECTURES[request.param])
    # Untrained vectors are nearly constant (all votes in one cluster): the instance head is scaled so that they
    # spread over about 8 px, more than the clustering's lengths (its random initial weights differ by backend).
    vectors = model.predict_on_batch(two_sizes()[0][None].astype(np.float32))["instance"]
    factor = 8.0 / float(np.std(keras.ops.convert_to_numpy(vectors)))
    layer = model.get_layer("instance_decoder_logits")
    layer.set_weights([w * factor for w in layer.get_weights()])
    return request.param, model


def two_sizes(seed=0):
    """A uint8 image at the model's size and a float one of 40x72 (not a multiple of MT-UNet's 16)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 64, 3), dtype=np.uint8), rng.uniform(0, 255, (40, 72, 3))]


def reference_outputs(name, model, image):
    """The model's own outputs for ``image``, computed apart from predict: a model of the same architecture built
    for the (padded) size with the same weights, fed the image edge-padded bottom/right to a multiple of 16 for
    MT-UNet, outputs cropped back."""
    height, width = image.shape[:2]
    multiple = 16 if name == "mt_unet" else 1
    padded = np.pad(image.astype(np.float32), ((0, -height % multiple), (0, -width % multiple), (0, 0)), mode="edge")
    same_size = mtl_keras.build_model(name, **dict(ARCHITECTURES[name], input_shape=padded.shape))
    same_size.set_weights(model.get_weights())
    outputs = same_size(padded[None], training=False)
    return {t: keras.ops.convert_to_numpy(v)[0, :height, :width] for t, v in outputs.items()}


def first_appearance(ids):
    """Ids renumbered 1..N in raster order of first appearance (0 stays 0): compares partitions."""
    values, first = np.unique(ids, return_index=True)
    out = np.zeros_like(ids)
    for new_id, value in enumerate(v for v in values[np.argsort(first)] if v != 0):
        out[ids == value] = new_id + 1
    return out


# ------------------------------------------------------------------------------------------- zoo models, any size
def test_shapes_and_dtypes_for_images_of_two_sizes(zoo_model):
    _, model = zoo_model
    images = two_sizes()
    images.insert(1, images[0][::-1].copy())  # two images of one size share a batch (batch_size=2)
    results = mtl_keras.predict(model, images, batch_size=2, **FAST_CLUSTERING)
    assert isinstance(results, list) and len(results) == 3
    for image, result in zip(images, results):
        h, w = image.shape[:2]
        assert sorted(result) == ["depth", "instance", "instance_ids", "semantic"]
        assert result["semantic"].shape == (h, w) and result["semantic"].dtype == np.int32
        assert result["instance_ids"].shape == (h, w) and result["instance_ids"].dtype == np.int32
        assert result["instance"].shape == (h, w, 2) and result["instance"].dtype == np.float32
        assert result["depth"].shape == (h, w) and result["depth"].dtype == np.float32
        assert result["semantic"].min() >= 0 and result["semantic"].max() < 19
    single = mtl_keras.predict(model, images[2], instances=False)  # one (H, W, 3) image -> one dict
    assert isinstance(single, dict) and sorted(single) == ["depth", "instance", "semantic"]
    batch = mtl_keras.predict(model, np.stack([images[0], images[1]]), instances=False)  # (N, H, W, 3) -> list
    assert len(batch) == 2 and batch[1]["semantic"].shape == (32, 64)


def test_labels_and_depth_are_the_models_own_outputs_at_each_size(zoo_model):
    name, model = zoo_model
    images = two_sizes(seed=1)
    results = mtl_keras.predict(model, images, instances=False)
    for image, result in zip(images, results):
        ref = reference_outputs(name, model, image)
        logits = ref["semantic"]
        top2 = np.sort(logits, axis=-1)[..., -2:]
        clear = top2[..., 1] - top2[..., 0] > 1e-4  # argmax ties within float noise are left out
        assert clear.mean() > 0.9
        np.testing.assert_array_equal(result["semantic"][clear], np.argmax(logits, axis=-1)[clear])
        np.testing.assert_allclose(result["depth"], ref["depth"][..., 0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(result["instance"], ref["instance"], rtol=1e-4, atol=1e-4)


def test_instance_ids_are_those_of_cluster_instances(zoo_model):
    _, model = zoo_model
    image = two_sizes(seed=2)[0]  # the model's own size: the model itself runs, one image
    outputs = {t: keras.ops.convert_to_numpy(v)[0] for t, v in
               model.predict_on_batch(image[None].astype(np.float32)).items()}
    every_class = list(range(19))  # an untrained model predicts few instance-class pixels: cluster them all
    result = mtl_keras.predict(model, image, instance_classes=every_class, **FAST_CLUSTERING)
    expected = cluster_instances(outputs["semantic"], outputs["instance"], instance_classes=every_class,
                                 **FAST_CLUSTERING).ids
    assert len(np.unique(expected)) > 2  # a real partition, not all background
    np.testing.assert_array_equal(result["instance_ids"], expected)
    # Default classes: mtl_keras.labels.instance_train_ids(19).
    default = mtl_keras.predict(model, image, **FAST_CLUSTERING)
    np.testing.assert_array_equal(default["instance_ids"],
                                  cluster_instances(outputs["semantic"], outputs["instance"], **FAST_CLUSTERING).ids)


def test_the_any_size_copy_follows_the_models_weights():
    model = mtl_keras.build_model("kendall_deeplabv3_resnet26_cpu", tasks=("semantic",), **KENDALL)
    image = two_sizes()[1]  # 40x72: the rebuilt (None, None) copy runs
    before = mtl_keras.predict(model, image)["semantic"]
    layer = model.get_layer("semantic_decoder_logits")
    kernel, bias = layer.get_weights()
    bias[7] += 100.0  # class 7 wins everywhere
    layer.set_weights([kernel, bias])
    after = mtl_keras.predict(model, image)
    assert sorted(after) == ["semantic"]  # no instance task: no instance ids
    assert (after["semantic"] == 7).all() and not (before == 7).all()


# ---------------------------------------------------------------------------------- a model with hand-set outputs
def hand_set_model():
    """Any size; the image's channel 0 is the class (logits -(c0 - k)^2), channels 1, 2 the (dy, dx) vectors,
    depth = c0 / 2 + 1, normals = the image."""
    image = keras.Input((None, None, 3), name="image")
    classes = keras.ops.arange(19, dtype="float32")
    outputs = {
        "semantic": keras.layers.Lambda(lambda x: -keras.ops.square(x[..., :1] - classes), name="semantic")(image),
        "instance": keras.layers.Lambda(lambda x: x[..., 1:3], name="instance")(image),
        "depth": keras.layers.Lambda(lambda x: x[..., :1] / 2.0 + 1.0, name="depth")(image),
        "normals": keras.layers.Lambda(lambda x: x * 1.0, name="normals")(image),
    }
    return keras.Model(image, outputs, name="hand_set")


def hand_set_scene():
    """32x64: a person (train id 11) and two cars (13) on road (0), each pixel voting for its instance's centroid."""
    classes = np.zeros((32, 64), np.int32)
    cityscapes_ids = np.zeros((32, 64), np.int64)
    classes[4:12, 4:12], cityscapes_ids[4:12, 4:12] = 11, 24000   # person
    classes[16:28, 8:24], cityscapes_ids[16:28, 8:24] = 13, 26000  # left car
    classes[16:28, 40:56], cityscapes_ids[16:28, 40:56] = 13, 26001  # right car
    vectors, _ = instance_vectors(cityscapes_ids)
    return np.concatenate([classes[..., None].astype(np.float32), vectors], axis=-1)


def test_hand_set_outputs_give_the_hand_written_partition():
    image = hand_set_scene()
    expected = np.zeros((32, 64), np.int32)
    expected[4:12, 4:12] = 1      # the person: its class (11) comes before the cars'
    expected[16:28, 8:24] = 2     # one car
    expected[16:28, 40:56] = 3    # the other car (the two cars' ids may come in either order)
    results = mtl_keras.predict(hand_set_model(), np.stack([image, image[:, ::-1]]))
    result = results[0]
    assert sorted(result) == ["depth", "instance", "instance_ids", "normals", "semantic"]
    np.testing.assert_array_equal(result["semantic"], image[..., 0].astype(np.int32))
    np.testing.assert_allclose(result["depth"], image[..., 0] / 2 + 1)
    assert result["normals"].shape == (32, 64, 3)
    ids = result["instance_ids"]
    assert (ids[4:12, 4:12] == 1).all()
    assert {int(ids[16, 8]), int(ids[16, 40])} == {2, 3}
    np.testing.assert_array_equal(first_appearance(ids), expected)
    # The second image of the batch (mirrored classes): its own result, in order.
    np.testing.assert_array_equal(results[1]["semantic"], image[:, ::-1, 0].astype(np.int32))


def test_instances_false_and_models_without_the_instance_task():
    result = mtl_keras.predict(hand_set_model(), hand_set_scene(), instances=False)
    assert "instance_ids" not in result and result["instance"].shape == (32, 64, 2)


@pytest.mark.parametrize("images, got", [
    (np.zeros((32, 64), np.uint8), "array of shape (32, 64)"),
    (np.zeros((32, 64, 4), np.uint8), "array of shape (32, 64, 4)"),
    (np.zeros((2, 32, 64, 1), np.float32), "array of shape (2, 32, 64, 1)"),
    ([np.zeros((32, 64, 3)), np.zeros((16, 16))], "image 1 has shape (16, 16)"),
    (np.full((8, 8, 3), "x"), "dtype <U1"),
])
def test_bad_images_raise_one_clear_value_error(images, got):
    with pytest.raises(ValueError) as info:
        mtl_keras.predict(hand_set_model(), images)
    message = str(info.value)
    assert "(H, W, 3)" in message and "(N, H, W, 3)" in message and got in message


def test_bad_batch_size_and_unknown_instance_classes():
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        mtl_keras.predict(hand_set_model(), hand_set_scene(), batch_size=0)
    image = keras.Input((None, None, 3))
    five_classes = keras.Model(image, {"semantic": keras.layers.Conv2D(5, 1)(image),
                                       "instance": keras.layers.Conv2D(2, 1)(image)})
    with pytest.raises(ValueError, match="num_classes=5: pass instance_classes"):
        mtl_keras.predict(five_classes, hand_set_scene())
    result = mtl_keras.predict(five_classes, hand_set_scene(), instance_classes=[3, 4])
    assert result["instance_ids"].shape == (32, 64)


# ------------------------------------------------------------------------------- the served ids are predict's
def assert_served_ids_are_predicts(model, images, tmp_path, instance_classes=None):
    """The serving SavedModel (uint8 signature) and mtl_keras.predict give the same ``instance_ids`` on
    ``images``; returns the largest id."""
    tf = pytest.importorskip("tensorflow")
    from mtl_keras import export

    export.export_saved_model(model, str(tmp_path / "export"), instances=True, instance_classes=instance_classes)
    serve = tf.saved_model.load(str(tmp_path / "export")).signatures["serve_uint8"]
    predicted = mtl_keras.predict(model, list(images), instance_classes=instance_classes)
    for image, result in zip(images, predicted):
        served = serve(images=tf.constant(image[None]))["instance_ids"].numpy()[0]
        np.testing.assert_array_equal(served, result["instance_ids"])
    return max(int(result["instance_ids"].max()) for result in predicted)


@pytest.mark.slow  # about 40 s: an export with instance ids, and the clustering of a trained model's votes
@pytest.mark.tf_only
def test_served_instance_ids_equal_predicts_on_the_same_images(tmp_path):
    import cv2

    from mtl_keras.data import generate_synthetic_cityscapes

    generate_synthetic_cityscapes(str(tmp_path / "data"), num_train=0, num_val=3, height=128, width=256, seed=5)
    paths = sorted(glob.glob(str(tmp_path / "data" / "leftImg8bit" / "val" / "*" / "*.png")))
    scenes = [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in paths]
    # The published model trained on these scenes, at its own size and at another (the clustering's lengths are
    # those of the model's size for both).
    images = scenes + [cv2.resize(scenes[0], (200, 96), interpolation=cv2.INTER_AREA)]
    model = mtl_keras.from_preset("kendall_deeplabv3_resnet26_slim_synthetic")
    assert assert_served_ids_are_predicts(model, images, tmp_path) >= 3  # real partitions, several instances


@pytest.mark.slow  # about 20 s: an export with instance ids
@pytest.mark.tf_only
def test_served_instance_ids_equal_predicts_on_an_untrained_models_noisy_votes(tmp_path):
    # Noisy votes make many peaks per class: the max_instances cap, the suppression and the merging all act.
    keras.utils.set_random_seed(3)
    model = mtl_keras.build_model("kendall_deeplabv3_resnet26_cpu", **KENDALL)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 64, 3)).astype(np.uint8)
    assert assert_served_ids_are_predicts(model, images, tmp_path, instance_classes=list(range(19))) >= 3


# ---------------------------------------------------------------------------------- a task added to the table
def test_a_task_added_to_the_table_reaches_predict_and_the_serving_export(monkeypatch, tmp_path):
    # A new task is a row of mtl_keras.tasks.TASKS (plus its reader and metric): predict and the export read it.
    import dataclasses

    from mtl_keras import export, tasks

    edges = dataclasses.replace(tasks.TASKS["depth"], name="edges", output_name="edge_strength",
                                metrics=("edges_mean_error",), display_name="edges", default=False)
    monkeypatch.setitem(tasks.TASKS, "edges", edges)
    images = keras.Input((8, 8, 3))
    model = keras.Model(images, {"semantic": keras.layers.Conv2D(19, 1)(images),
                                 "edges": keras.layers.Conv2D(1, 1)(images)})
    image = np.random.default_rng(0).uniform(0, 255, (8, 8, 3)).astype(np.float32)
    result = mtl_keras.predict(model, image, instances=False)
    expected = keras.ops.convert_to_numpy(model(image[None])["edges"])[0, ..., 0]
    assert sorted(result) == ["edges", "semantic"]
    np.testing.assert_allclose(result["edges"], expected, rtol=1e-5, atol=1e-5)
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        info = export.export_saved_model(model, str(tmp_path / "export"))
        assert info["outputs"] == ["semantic_logits", "semantic_labels", "edge_strength"]
        served = tf.saved_model.load(str(tmp_path / "export")).signatures["serve"](images=tf.constant(image[None]))
        np.testing.assert_allclose(served["edge_strength"].numpy()[0, ..., 0], expected, rtol=1e-5, atol=1e-5)
