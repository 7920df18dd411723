import cv2
import numpy as np
import pytest

from mtl_keras.visualize import (CITYSCAPES_PALETTE, TITLE_HEIGHT, default_palette, depth_to_color,
                                 instance_vectors_to_color, plot_task_weights, save_prediction_panel,
                                 semantic_to_color)

H, W = 12, 16


def test_semantic_to_color_maps_palette_and_ignore():
    palette = np.array([[10, 20, 30], [200, 100, 0], [1, 2, 3]], np.uint8)
    labels = np.array([[0, 1, 2, 255], [2, 1, 0, 7]])
    rgb = semantic_to_color(labels, palette)
    assert rgb.shape == (2, 4, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 0], [10, 20, 30])
    np.testing.assert_array_equal(rgb[0, 1], [200, 100, 0])
    np.testing.assert_array_equal(rgb[1, 0], [1, 2, 3])
    np.testing.assert_array_equal(rgb[0, 3], [0, 0, 0])  # ignore -> black
    np.testing.assert_array_equal(rgb[1, 3], [0, 0, 0])  # out of palette -> black
    assert semantic_to_color(labels[..., None], palette).shape == (2, 4, 3)


def test_cityscapes_palette_matches_cityscapesscripts():
    labels_mod = pytest.importorskip("cityscapesscripts.helpers.labels")
    colours = {l.trainId: l.color for l in labels_mod.labels if 0 <= l.trainId < 19}
    np.testing.assert_array_equal(CITYSCAPES_PALETTE, np.array([colours[i] for i in range(19)], np.uint8))
    big = default_palette(40)
    assert big.shape == (40, 3) and big.dtype == np.uint8 and len({tuple(c) for c in big}) == 40


def test_depth_to_color_masks_and_scales():
    depth = np.linspace(0, 10, H * W).reshape(H, W, 1).astype(np.float32)
    mask = np.ones((H, W, 1), np.float32)
    mask[0, :3] = 0
    depth[1, 0] = np.nan
    rgb = depth_to_color(depth, mask=mask, vmax=10.0)
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    assert (rgb[0, :3] == 0).all() and (rgb[1, 0] == 0).all()
    # magma is monotonic in brightness: the largest value is brighter than a small valid one
    assert int(rgb[-1, -1].sum()) > int(rgb[2, 0].sum())
    assert depth_to_color(np.zeros((H, W))).shape == (H, W, 3)  # degenerate, all zero
    assert (depth_to_color(depth, mask=np.zeros((H, W))) == 0).all()


def test_instance_vectors_to_color_direction_and_magnitude():
    vectors = np.zeros((2, 3, 2), np.float32)
    vectors[0, 0] = (0.0, 5.0)   # pointing right
    vectors[0, 1] = (5.0, 0.0)   # pointing down
    vectors[0, 2] = (0.0, 1.0)   # right, small
    vectors[1, 0] = (0.0, 5.0)   # masked out
    mask = np.array([[1, 1, 1], [0, 1, 1]], np.float32)
    rgb = instance_vectors_to_color(vectors, mask=mask, max_magnitude=5.0)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert (rgb[1, 0] == 0).all()
    assert (rgb[1, 1] == 0).all()  # zero vector -> zero value
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    assert hsv[0, 0, 0] != hsv[0, 1, 0]  # different directions, different hues
    assert hsv[0, 0, 2] > hsv[0, 2, 2]  # larger magnitude, brighter
    np.testing.assert_array_equal(rgb[0, 0], [255, 0, 0])  # hue 0 (direction +x) at full magnitude is red


def test_save_prediction_panel_full_and_subsets(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (H, W, 3)).astype(np.float32)
    prediction = {
        "semantic": rng.normal(size=(H, W, 19)).astype(np.float32),
        "instance": rng.normal(size=(H, W, 2)).astype(np.float32),
        "depth": rng.uniform(0, 5, (H, W, 1)).astype(np.float32),
    }
    target = {
        "semantic": rng.integers(0, 19, (H, W)),
        "instance": rng.normal(size=(H, W, 2)).astype(np.float32),
        "instance_mask": np.ones((H, W, 1), np.float32),
        "depth": rng.uniform(0, 5, (H, W, 1)).astype(np.float32),
        "depth_mask": np.ones((H, W, 1), np.float32),
    }
    path = tmp_path / "sub" / "panel.png"
    save_prediction_panel(path, image, prediction, target)
    png = cv2.imread(str(path))
    assert png is not None and png.shape == (2 * (H + TITLE_HEIGHT), 4 * W, 3)

    # Only depth, no target, batch axis of 1.
    path2 = tmp_path / "depth_only.png"
    save_prediction_panel(path2, image[None], {"depth": prediction["depth"][None]})
    png = cv2.imread(str(path2))
    assert png.shape == (H + TITLE_HEIGHT, 2 * W, 3)

    # Semantic prediction with a custom palette, target with only semantic (instance column absent).
    path3 = tmp_path / "sem.png"
    save_prediction_panel(path3, image, {"semantic": prediction["semantic"][..., :3]},
                          {"semantic": rng.integers(0, 3, (H, W))}, palette=np.eye(3, dtype=np.uint8) * 255)
    assert cv2.imread(str(path3)).shape == (2 * (H + TITLE_HEIGHT), 2 * W, 3)


def test_plot_task_weights(tmp_path):
    path = tmp_path / "weights.png"
    plot_task_weights({"semantic_sigma2": [1.0, 0.5, 0.25], "depth_sigma2": [2.0, 3.0, 4.0]}, path,
                      title="sigma^2")
    img = cv2.imread(str(path))
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 100
    # single point and negative values (linear axis)
    plot_task_weights({"semantic_log_var": [-0.3]}, tmp_path / "one.png")
    assert cv2.imread(str(tmp_path / "one.png")) is not None
    with pytest.raises(ValueError):
        plot_task_weights({}, tmp_path / "none.png")
