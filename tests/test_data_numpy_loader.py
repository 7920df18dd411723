"""The TensorFlow-free CityScapes loader (``mtl_keras.data.numpy_loader``): the batches contract, equality with the
tf.data loader, values computed by hand, flips, shuffling, the endless stream of ``steps_per_epoch``, evaluation, and
a run in a process where ``import tensorflow`` fails."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mtl_keras.data import DataError, generate_synthetic_cityscapes, label_lookup_table
from tests.test_data_miniatures import write_cityscapes_sample
from mtl_keras.data.numpy_loader import CityscapesPyDataset, load_cityscapes_numpy, nearest_indices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 48, 96  # the synthetic set's native size
T19 = label_lookup_table(19)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic_cityscapes(tmp_path_factory.mktemp("synth_np"), num_train=4, num_val=2, height=H,
                                         width=W, seed=0)


def _collect(ds):
    images, targets = [], {}
    for image, t in ds:
        images.append(np.asarray(image))
        for k, v in t.items():
            targets.setdefault(k, []).append(np.asarray(v))
    return np.concatenate(images), {k: np.concatenate(v) for k, v in targets.items()}


# ---------------------------------------------------------------------------------------------------------------
# (a) the contract
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tasks, keys", [
    (("semantic", "instance", "depth"), ["semantic", "instance", "instance_mask", "depth", "depth_mask"]),
    ("depth", ["depth", "depth_mask"]),
    ("semantic,instance", ["semantic", "instance", "instance_mask"]),
])
def test_batches_contract(synth, tasks, keys):
    ds = load_cityscapes_numpy(synth, "train", image_size=(32, 64), batch_size=3, tasks=tasks, drop_remainder=False)
    assert len(ds) == 2 and ds.num_batches == 2
    batches = list(ds)  # plain iteration: terminates after len(ds) batches
    assert len(batches) == 2
    for (images, targets), b in zip(batches, (3, 1)):
        assert images.dtype == np.float32 and images.shape == (b, 32, 64, 3)
        assert 0 <= images.min() and images.max() <= 255 and images.max() > 1
        assert list(targets) == keys
        shapes = {"semantic": (b, 32, 64), "instance": (b, 32, 64, 2)}
        for k, v in targets.items():
            assert v.shape == shapes.get(k, (b, 32, 64, 1)), k
            assert v.dtype == (np.int32 if k == "semantic" else np.float32), k
        for k in ("instance_mask", "depth_mask"):
            if k in targets:
                assert set(np.unique(targets[k])) <= {0.0, 1.0}
        if "semantic" in targets:
            assert set(np.unique(targets["semantic"])) <= set(range(19)) | {255}
        if "instance" in targets:
            assert not targets["instance"][targets["instance_mask"][..., 0] == 0].any()
            assert targets["instance_mask"].any()
        if "depth" in targets:
            assert not targets["depth"][targets["depth_mask"] == 0].any()
            assert targets["depth_mask"].any() and not targets["depth_mask"].all()  # the sky is invalid
    # train defaults: shuffle, flip, drop the partial batch
    train = CityscapesPyDataset(synth, "train", image_size=(32, 64), batch_size=3, tasks=tasks)
    assert (train.shuffle, train.flip, train.drop_remainder, len(train)) == (True, True, True, 1)
    val = CityscapesPyDataset(synth, "val", image_size=(32, 64), batch_size=3, tasks=tasks)
    assert (val.shuffle, val.flip, val.drop_remainder, len(val)) == (False, False, False, 1)
    with pytest.raises(IndexError):
        val[1]


# ---------------------------------------------------------------------------------------------------------------
# (b) the same batches as the tf.data loader
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [(H, W), (32, 64), (24, 48), (20, 36)])
def test_equals_tf_data_loader(synth, image_size):
    pytest.importorskip("tensorflow")
    from mtl_keras.data import load_cityscapes

    kw = dict(image_size=image_size, batch_size=3, shuffle=False, flip=False, drop_remainder=False)
    tf_images, tf_t = _collect(load_cityscapes(synth, "train", **kw))
    images, t = _collect(CityscapesPyDataset(synth, "train", **kw))
    assert list(t) == list(tf_t)
    # Images: exactly equal. The loader re-implements TF's antialiased triangle resize (same float32 weights, same
    # summation order, round half to even), measured bit-exact (float output, before rounding) on every size ratio
    # tried, down to 2048 -> 300. cv2's INTER_AREA / INTER_LINEAR would differ by up to 12 / 28 grey levels.
    np.testing.assert_array_equal(images, tf_images)
    for k in ("semantic", "instance_mask", "depth_mask"):
        assert t[k].dtype == tf_t[k].dtype
        np.testing.assert_array_equal(t[k], tf_t[k], err_msg=k)
    for k in ("instance", "depth"):
        assert t[k].dtype == tf_t[k].dtype
        np.testing.assert_allclose(t[k], tf_t[k], rtol=0, atol=1e-5, err_msg=k)


def test_nearest_indices_are_tfs():
    """Half-pixel centres, as tf.image.resize(method="nearest"), independently of TF: 2x down picks the odd
    pixels, 3x the middle ones, 1.5x the pattern 0, 2, 3, 5."""
    np.testing.assert_array_equal(nearest_indices(4, 8), [1, 3, 5, 7])
    np.testing.assert_array_equal(nearest_indices(3, 9), [1, 4, 7])
    np.testing.assert_array_equal(nearest_indices(4, 6), [0, 2, 3, 5])
    np.testing.assert_array_equal(nearest_indices(5, 5), np.arange(5))
    np.testing.assert_array_equal(nearest_indices(4, 2), [0, 0, 1, 1])


# ---------------------------------------------------------------------------------------------------------------
# (c) values computed by hand
# ---------------------------------------------------------------------------------------------------------------


def _hand_sample(root):
    """8x12 sample: sky / road / sidewalk, one car instance (rows 2-3, cols 4-7: centroid (2.5, 5.5)) plus a
    cargroup pixel (labelId 26 without instance), disparity 2 px (p = 513) below the horizon, invalid in the sky."""
    h, w = 8, 12
    image = np.zeros((h, w, 3), np.uint8)
    image[:, 1::2] = (80, 160, 240)  # odd columns coloured: a hand-computable 2x downscale
    lab = np.full((h, w), 23, np.uint8)  # sky
    lab[4:] = 7  # road
    lab[4:, :3] = 8  # sidewalk
    lab[0, 0] = 0  # unlabeled
    lab[2:4, 4:8] = 26  # car
    inst = lab.astype(np.uint16)
    inst[2:4, 4:8] = 26001
    lab[7, 11] = 26  # cargroup pixel: car class, no instance
    inst[7, 11] = 26
    disp = np.zeros((h, w), np.uint16)
    disp[2:] = 513
    write_cityscapes_sample(root, "val", "handcity", 0, image, lab, inst, disp)
    return image, lab, inst, disp


def test_values_by_hand(tmp_path):
    image, lab, inst, disp = _hand_sample(tmp_path)
    ds = CityscapesPyDataset(tmp_path, "val", image_size=(8, 12), batch_size=1)
    images, t = ds[0]
    np.testing.assert_array_equal(images[0], image.astype(np.float32))  # native size: untouched
    sem = t["semantic"][0]
    assert sem[0, 0] == 255 and sem[1, 5] == 10 and sem[5, 6] == 0 and sem[5, 1] == 1  # void, sky, road, sidewalk
    assert sem[2, 4] == 13 and sem[7, 11] == 13  # car: trainId 13, instance or not
    vec, mask = t["instance"][0], t["instance_mask"][0, ..., 0]
    np.testing.assert_array_equal(mask, inst >= 1000)  # the cargroup pixel is no instance
    np.testing.assert_allclose(vec[2, 4], [2.5 - 2, 5.5 - 4])
    np.testing.assert_allclose(vec[3, 7], [2.5 - 3, 5.5 - 7])
    assert not vec[mask == 0].any()
    np.testing.assert_array_equal(t["depth_mask"][0, ..., 0], disp > 0)
    np.testing.assert_allclose(t["depth"][0, ..., 0], np.where(disp > 0, 2.0, 0.0))  # (513 - 1) / 256

    # mirrored: every map reversed left-right, dx negated
    fimage, ft = ds.example(0, flip=True)
    np.testing.assert_array_equal(fimage, image[:, ::-1].astype(np.float32))
    np.testing.assert_array_equal(ft["semantic"], t["semantic"][0][:, ::-1])
    np.testing.assert_allclose(ft["instance"][2, 11 - 4], [0.5, -1.5])
    np.testing.assert_allclose(ft["instance"], vec[:, ::-1] * np.array([1.0, -1.0], np.float32), atol=1e-6)
    np.testing.assert_array_equal(ft["depth"], t["depth"][0][:, ::-1])

    # half size: the triangle filter at 2x down weighs the inputs 2x-1 .. 2x+2 by 1/8, 3/8, 3/8, 1/8 (half the
    # colour inside), renormalised at the borders (first output: 3/7 of column 1, last: 1/7 + 3/7 of columns 9, 11)
    small = CityscapesPyDataset(tmp_path, "val", image_size=(4, 6), batch_size=1)
    images, t = small[0]
    colour = np.array([80, 160, 240], np.float64)
    expected = [colour * 3 / 7] + [colour * 0.5] * 4 + [colour * 4 / 7]
    np.testing.assert_array_equal(images[0], np.broadcast_to(np.rint(np.array(expected)), (4, 6, 3)))
    # labels: nearest at half-pixel centres = the odd rows and columns
    np.testing.assert_array_equal(t["semantic"][0], T19[lab[1::2, 1::2]])
    # inverse depth in px at the training width: 2 px at width 12 -> 1 px at width 6
    np.testing.assert_allclose(t["depth"][0, ..., 0], np.where(disp[1::2, 1::2] > 0, 1.0, 0.0))
    # the car (rows 3, cols 5 and 7 of the original) -> rows 1, cols 2-3; centroid (1, 2.5)
    np.testing.assert_allclose(t["instance"][0, 1, 2], [0.0, 0.5])
    np.testing.assert_allclose(t["instance"][0, 1, 3], [0.0, -0.5])


# ---------------------------------------------------------------------------------------------------------------
# (d) shuffling and flips: stateless in (seed, epoch, index)
# ---------------------------------------------------------------------------------------------------------------


def test_shuffle_per_epoch_is_stateless(synth):
    kw = dict(image_size=(16, 32), batch_size=2, tasks="semantic", flip=False)
    ds = CityscapesPyDataset(synth, "train", **kw)
    orders = [tuple(ds.order(e)) for e in range(6)]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)  # each epoch a permutation
    assert len(set(orders)) > 2  # differs between epochs
    np.testing.assert_array_equal(ds.order(3), np.random.default_rng([0, 3]).permutation(4))
    assert [tuple(CityscapesPyDataset(synth, "train", seed=7, **kw).order(e)) for e in range(6)] != orders

    # the batches follow ds.epoch, which on_epoch_end advances; same (seed, epoch) -> same batches
    served = []
    for _ in range(3):
        served.append([k for i in range(len(ds)) for _, k in ds.batch_elements(i)])
        ds.on_epoch_end()
    assert served == [list(o) for o in orders[:3]]
    other = CityscapesPyDataset(synth, "train", initial_epoch=2, **kw)
    assert other.epoch == 2
    ds.epoch = 2
    for (a_images, a_t), (b_images, b_t) in zip(ds, other):
        np.testing.assert_array_equal(a_images, b_images)
        np.testing.assert_array_equal(a_t["semantic"], b_t["semantic"])
    unshuffled = CityscapesPyDataset(synth, "train", shuffle=False, **kw)
    np.testing.assert_array_equal(unshuffled.order(5), np.arange(4))


def test_flips_are_stateless_and_applied(synth):
    ds = CityscapesPyDataset(synth, "train", image_size=(16, 32), batch_size=4, shuffle=False, flip=True,
                             tasks="instance")
    draws = [ds.flipped(e, k) for e in range(50) for k in range(4)]
    assert 0.35 < np.mean(draws) < 0.65
    assert draws == [CityscapesPyDataset(synth, "train", image_size=(16, 32), batch_size=4, flip=True,
                                         tasks="instance").flipped(e, k) for e in range(50) for k in range(4)]
    epoch = next(e for e in range(50) if len({ds.flipped(e, k) for k in range(4)}) == 2)  # some flipped, some not
    ds.epoch = epoch
    images, t = ds[0]
    for k in range(4):
        plain_image, plain = ds.example(k, flip=False)
        if ds.flipped(epoch, k):
            np.testing.assert_array_equal(images[k], plain_image[:, ::-1])
            np.testing.assert_allclose(t["instance"][k], plain["instance"][:, ::-1] * np.float32([1, -1]),
                                       atol=1e-5)
        else:
            np.testing.assert_array_equal(images[k], plain_image)
            np.testing.assert_array_equal(t["instance"][k], plain["instance"])


def test_steps_per_epoch_serves_an_endless_stream_of_passes(synth):
    ds = CityscapesPyDataset(synth, "train", image_size=(16, 32), batch_size=3, tasks="depth", steps_per_epoch=5)
    assert len(ds) == 5 and ds.num_batches == 5
    stream = []
    for _ in range(3):
        elements = [ds.batch_elements(i) for i in range(len(ds))]
        assert all(len(b) == 3 for b in elements)  # every batch full, across pass boundaries
        stream += [e for b in elements for e in b]
        ds.on_epoch_end()
    assert len(stream) == 3 * 5 * 3
    for q, (p, k) in enumerate(stream):  # element q = example order(q // 4)[q % 4] of pass q // 4
        assert p == q // 4 and k == ds.order(p)[q % 4]
    assert len(list(ds)) == 5
    images, t = ds[4]
    assert images.shape == (3, 16, 32, 3) and t["depth"].shape == (3, 16, 32, 1)


# ---------------------------------------------------------------------------------------------------------------
# evaluation, errors
# ---------------------------------------------------------------------------------------------------------------


def test_evaluate_model_iterates_the_dataset(synth):
    from mtl_keras.evaluation import evaluate_model

    ds = CityscapesPyDataset(synth, "val", image_size=(16, 32), batch_size=1)
    table = {images[0].tobytes(): {k: v[0] for k, v in t.items()} for images, t in ds}

    class Oracle:  # predicts the targets: perfect scores
        def predict_on_batch(self, images):
            found = [table[im.tobytes()] for im in np.asarray(images)]
            return {k: np.stack([f[k] for f in found]) for k in ("semantic", "instance", "depth")}

    result = evaluate_model(Oracle(), ds, 19, tasks=["semantic", "instance", "depth"])
    assert result["num_images"] == 2
    assert result["semantic_miou"] == 1.0 and result["instance_mean_error_px"] == 0.0
    assert result["depth_mean_error_px"] == 0.0


def test_errors(synth, tmp_path):
    with pytest.raises(ValueError, match="metric.*load_cityscapes"):
        CityscapesPyDataset(synth, "val", depth_target="metric")
    with pytest.raises(ValueError, match="tasks"):
        CityscapesPyDataset(synth, "val", tasks=("normals",))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        CityscapesPyDataset(synth, "train", batch_size=8)
    with pytest.raises(FileNotFoundError, match="missing folder .*leftImg8bit.test"):
        CityscapesPyDataset(synth, "test")
    _hand_sample(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "disparity")
    with pytest.raises(FileNotFoundError, match=r"missing folder .*disparity.val") as e:
        CityscapesPyDataset(tmp_path, "val")
    assert "\n" not in str(e.value)
    CityscapesPyDataset(tmp_path, "val", tasks="semantic")  # depth not requested: no disparity needed
    path = os.path.join(tmp_path, "gtFine", "val", "handcity", "handcity_000000_000019_gtFine_labelIds.png")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-20])
    with pytest.raises(DataError, match="truncated"):
        CityscapesPyDataset(tmp_path, "val", tasks="semantic")
    ds = CityscapesPyDataset(tmp_path, "val", tasks="semantic", check_files=False)
    with pytest.raises(DataError, match="truncated"):
        ds[0]


# ---------------------------------------------------------------------------------------------------------------
# (e) without TensorFlow
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.subprocess
def test_works_without_tensorflow(synth):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["tensorflow"] = None  # any `import tensorflow` now raises ImportError
        import numpy as np
        import keras
        from mtl_keras.data.numpy_loader import CityscapesPyDataset
        assert keras.backend.backend() == "jax"
        ds = CityscapesPyDataset({os.fspath(synth)!r}, "train", image_size=(16, 32), batch_size=2)
        images, targets = ds[0]
        assert images.shape == (2, 16, 32, 3) and targets["semantic"].shape == (2, 16, 32)
        inp = keras.Input((16, 32, 3))
        out = {{"semantic": keras.layers.Conv2D(19, 1, name="semantic")(inp)}}
        model = keras.Model(inp, out)
        model.compile("sgd", loss={{"semantic": keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=255)}})
        train = CityscapesPyDataset({os.fspath(synth)!r}, "train", image_size=(16, 32), batch_size=2, tasks="semantic")
        history = model.fit(train, epochs=1, shuffle=False, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        assert sys.modules["tensorflow"] is None
        print("OK", sorted(targets))
    """)
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK ['depth', 'depth_mask', 'instance', 'instance_mask', 'semantic']" in proc.stdout
