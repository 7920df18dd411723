"""Joint augmentation (mtl_keras.data.augment): flips, random scales and crops of the image and every target."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from mtl_keras.data.augment import AugmentConfig, augment_example  # noqa: E402
from tests.test_data_miniatures import nearest_src  # noqa: E402

H, W = 6, 8


def _example(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(1, 255, (H, W, 3)).astype(np.float32)
    sem = rng.integers(0, 19, (H, W)).astype(np.int32)
    sem[0, 0] = 255
    inst = rng.normal(0, 3, (H, W, 2)).astype(np.float32)
    inst_mask = (rng.random((H, W, 1)) < 0.6).astype(np.float32)
    inst *= inst_mask
    # depth = a code of the source pixel (y * W + x + 1), so that every output pixel says where it came from
    code = (np.arange(H)[:, None] * W + np.arange(W)[None, :] + 1).astype(np.float32)[..., None]
    normals = rng.normal(size=(H, W, 3))
    normals = (normals / np.linalg.norm(normals, axis=-1, keepdims=True)).astype(np.float32)
    n_mask = np.ones((H, W, 1), np.float32)
    n_mask[2, 3] = 0
    targets = {"semantic": sem, "instance": inst, "instance_mask": inst_mask, "depth": code,
               "depth_mask": np.ones((H, W, 1), np.float32), "normals": normals, "normals_mask": n_mask}
    return image, targets


def _run(config, key, seed=3, example=None):
    image, targets = example or _example()
    out_image, out = augment_example(tf.constant(image), {k: tf.constant(v) for k, v in targets.items()}, seed,
                                     tf.constant(key, tf.int64), config)
    return out_image.numpy(), {k: v.numpy() for k, v in out.items()}




def _check_against_source(config, key, scale):
    """Value-by-value check of one augmented example against the base example it came from."""
    image, t = _example()
    out_image, out = _run(config, key)
    oh, ow = config.output_size((H, W))
    sh, sw = max(int(round(H * scale)), 1), max(int(round(W * scale)), 1)
    sy, sx = sh / H, sw / W
    code = out["depth"][..., 0]
    valid = out["depth_mask"][..., 0] > 0
    assert out_image.shape == (oh, ow, 3) and out["semantic"].shape == (oh, ow)
    # padding: ignore label, zero masks, zero image
    assert np.all(out["semantic"][~valid] == 255) and np.all(out_image[~valid] == 0)
    for m in ("instance_mask", "normals_mask"):
        assert np.all(out[m][~valid] == 0)
    assert np.all(code[~valid] == 0)
    # the valid pixels: a translated window of the nearest-neighbour scaled grid, possibly mirrored
    ys, xs = np.nonzero(valid)
    src = code[valid].astype(int) - 1
    src_y, src_x = src // W, src % W
    flipped = False
    if valid.sum() > 1 and len(np.unique(xs)) > 1:
        row = ys == ys[0]
        flipped = src_x[row][0] > src_x[row][-1]
    grid_y, grid_x = nearest_src(sh, H), nearest_src(sw, W)
    xs_unflipped = (ow - 1 - xs) if flipped else xs
    oy = [o for o in range(-oh, sh + 1) if np.array_equal(grid_y[np.clip(ys + o, 0, sh - 1)], src_y)
          and np.all((ys + o >= 0) & (ys + o < sh))]
    ox = [o for o in range(-ow, sw + 1) if np.array_equal(grid_x[np.clip(xs_unflipped + o, 0, sw - 1)], src_x)
          and np.all((xs_unflipped + o >= 0) & (xs_unflipped + o < sw))]
    assert oy and ox, "output is not a window of the scaled grid"
    # the window covers as much of the scaled image as fits (no needless padding)
    assert valid.sum() == min(oh, sh) * min(ow, sw)
    np.testing.assert_array_equal(out["semantic"][valid], t["semantic"][src_y, src_x])
    np.testing.assert_array_equal(out["instance_mask"][valid], t["instance_mask"][src_y, src_x])
    sign = -1.0 if flipped else 1.0
    np.testing.assert_allclose(out["instance"][valid][:, 0], t["instance"][src_y, src_x, 0] * sy, rtol=1e-6)
    np.testing.assert_allclose(out["instance"][valid][:, 1], sign * t["instance"][src_y, src_x, 1] * sx,
                               rtol=1e-6)
    expect_n = t["normals"][src_y, src_x] * np.array([sign, 1, 1], np.float32)
    np.testing.assert_allclose(out["normals"][valid], expect_n, rtol=1e-6)
    np.testing.assert_array_equal(out["normals_mask"][valid], t["normals_mask"][src_y, src_x])
    if scale == 1.0:  # a pure crop / pad: the image moves without resampling
        np.testing.assert_array_equal(out_image[valid], image[src_y, src_x])
    return flipped, (oy[0], ox[0])


def test_identity_config_returns_the_example_unchanged():
    image, t = _example()
    out_image, out = _run(AugmentConfig(), 0)
    np.testing.assert_array_equal(out_image, image)
    for k in t:
        np.testing.assert_array_equal(out[k], t[k])


def test_flip_mirrors_every_target_and_negates_dx_and_normal_x():
    cfg = AugmentConfig(flip=True)
    seen = set()
    image, t = _example()
    for key in range(12):
        out_image, out = _run(cfg, key)
        flipped = not np.array_equal(out_image, image)
        seen.add(flipped)
        f = (lambda a: a[:, ::-1]) if flipped else (lambda a: a)
        np.testing.assert_array_equal(out_image, f(image))
        np.testing.assert_array_equal(out["semantic"], f(t["semantic"]))
        np.testing.assert_array_equal(out["depth"], f(t["depth"]))
        for m in ("instance_mask", "depth_mask", "normals_mask"):
            np.testing.assert_array_equal(out[m], f(t[m]))
        sign = -1.0 if flipped else 1.0
        np.testing.assert_array_equal(out["instance"][..., 0], f(t["instance"])[..., 0])
        np.testing.assert_array_equal(out["instance"][..., 1], sign * f(t["instance"])[..., 1])
        np.testing.assert_array_equal(out["normals"][..., 0], sign * f(t["normals"])[..., 0])
        np.testing.assert_array_equal(out["normals"][..., 1:], f(t["normals"])[..., 1:])
    assert seen == {True, False}


@pytest.mark.parametrize("scale", [2.0, 0.5, 1.5, 0.75])
def test_fixed_scale_centre_crop(scale):
    cfg = AugmentConfig(scale_range=(scale, scale), random_crop=False, depth_scales_with_zoom=False)
    flipped, _ = _check_against_source(cfg, 0, scale)
    assert not flipped


@pytest.mark.parametrize("scale,crop", [(1.0, (9, 5)), (1.25, (4, 11)), (0.6, (6, 8)), (2.0, (3, 3))])
def test_random_scale_crop_and_flip_stay_consistent(scale, crop):
    cfg = AugmentConfig(flip=True, scale_range=(scale, scale), crop_size=crop, random_crop=True,
                        depth_scales_with_zoom=False)
    results = [_check_against_source(cfg, key, scale) for key in range(8)]
    assert {f for f, _ in results} == {True, False}
    if (round(H * scale), round(W * scale)) != crop:
        assert len({o for _, o in results}) > 1  # the window moves


def test_pad_by_ignore_label_when_the_crop_is_larger():
    # the Tiny-CityScapes setting: 6x8 images, 8x8 crops padded with the ignore label
    cfg = AugmentConfig(crop_size=(8, 8), random_crop=True, depth_scales_with_zoom=False)
    tops = set()
    for key in range(10):
        _, out = _run(cfg, key)
        valid_rows = np.nonzero(out["depth_mask"][:, 0, 0])[0]
        assert len(valid_rows) == H and np.all(np.diff(valid_rows) == 1)
        tops.add(int(valid_rows[0]))
        assert np.all(out["semantic"][out["depth_mask"][..., 0] == 0] == 255)
    assert len(tops) > 1 and tops <= {0, 1, 2}


def test_depth_scales_with_zoom_only_for_disparity():
    image, t = _example()
    t = dict(t, depth=np.full((H, W, 1), 3.0, np.float32))
    for zoom, expected in ((True, 3.0 * 12 / W), (False, 3.0)):
        cfg = AugmentConfig(scale_range=(1.5, 1.5), random_crop=False, depth_scales_with_zoom=zoom)
        _, out = _run(cfg, 0, example=(image, t))
        np.testing.assert_allclose(out["depth"], expected, rtol=1e-6)


def test_random_scale_draws_are_deterministic_and_cover_the_range():
    cfg = AugmentConfig(flip=True, scale_range=(0.5, 2.0), crop_size=(6, 8))
    sizes = set()
    for key in range(16):
        a_img, a = _run(cfg, key, seed=11)
        b_img, b = _run(cfg, key, seed=11)
        np.testing.assert_array_equal(a_img, b_img)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        sizes.add(int(a["depth_mask"].sum()))
    assert len(sizes) > 3  # different scales -> different amounts of padding
    c_img, _ = _run(cfg, 0, seed=12)
    assert not np.array_equal(c_img, _run(cfg, 0, seed=11)[0])


@pytest.mark.parametrize("bad", [(0.0, 1.0), (2.0, 1.0), (1.0,), "x", (1.0, 100.0)])
def test_invalid_scale_range(bad):
    with pytest.raises(ValueError, match="scale_range"):
        AugmentConfig(scale_range=bad)


@pytest.mark.parametrize("bad", [(0, 4), (4,), (2.5, 3), "ab"])
def test_invalid_crop_size(bad):
    with pytest.raises(ValueError, match="crop_size"):
        AugmentConfig(crop_size=bad)
