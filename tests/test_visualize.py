import cv2
import numpy as np
import pytest

from mtl_keras.visualize import (CITYSCAPES_PALETTE, COLORBAR_BAR, COLORBAR_MARGIN, COLORBAR_WIDTH,
                                 LEGEND_LINE_HEIGHT, LEGEND_SWATCH, TITLE_HEIGHT, default_class_names,
                                 default_palette, depth_to_color, instance_vectors_to_color, plot_task_weights,
                                 save_prediction_panel, semantic_to_color, task_weights_figure)

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
    grid_h = 2 * (H + TITLE_HEIGHT)
    path = tmp_path / "sub" / "panel.png"
    save_prediction_panel(path, image, prediction, target)
    png = cv2.imread(str(path))
    # input, semantic, instance vectors, instances, depth; the colour bar; the legend under the grid
    assert png is not None and png.shape[1] >= 5 * W + COLORBAR_WIDTH
    assert png.shape[0] > grid_h and (png.shape[0] - grid_h) % LEGEND_LINE_HEIGHT == 0

    # Without clustering: no instances column.
    path_nc = tmp_path / "no_cluster.png"
    save_prediction_panel(path_nc, image, prediction, target, cluster=False)
    assert cv2.imread(str(path_nc)).shape[1] == png.shape[1] - W

    # Only depth, no target, batch axis of 1: input and depth, the colour bar, no legend.
    path2 = tmp_path / "depth_only.png"
    save_prediction_panel(path2, image[None], {"depth": prediction["depth"][None]})
    png = cv2.imread(str(path2))
    assert png.shape[0] == H + TITLE_HEIGHT and png.shape[1] >= 2 * W + COLORBAR_WIDTH

    # Semantic prediction with a custom palette, target with only semantic (instance column absent): no colour bar.
    path3 = tmp_path / "sem.png"
    save_prediction_panel(path3, image, {"semantic": prediction["semantic"][..., :3]},
                          {"semantic": rng.integers(0, 3, (H, W))}, palette=np.eye(3, dtype=np.uint8) * 255)
    png = cv2.imread(str(path3))
    assert png.shape[1] == 2 * W and png.shape[0] > grid_h and (png.shape[0] - grid_h) % LEGEND_LINE_HEIGHT == 0


def test_every_task_of_the_table_gets_a_tile_normals_and_a_new_row_too(tmp_path, monkeypatch):
    # The panel draws the tasks of mtl_keras.tasks.TASKS: normals by their colour rule, and a task added as a row
    # (an "edges" regression) as its value on a colour map.
    import dataclasses

    from mtl_keras import tasks
    from mtl_keras.visualize import normals_to_color

    monkeypatch.setitem(tasks.TASKS, "edges", dataclasses.replace(tasks.TASKS["depth"], name="edges",
                                                                  output_name="edges", display_name="edges"))
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, (H, W, 3)).astype(np.float32)
    normals = rng.normal(size=(H, W, 3)).astype(np.float32)
    save_prediction_panel(tmp_path / "input.png", image, {"edges": rng.uniform(0, 1, (H, W, 1)).astype(np.float32)})
    save_prediction_panel(tmp_path / "normals.png", image, {"normals": normals})
    with_edges, with_normals = _rgb_png(tmp_path / "input.png"), _rgb_png(tmp_path / "normals.png")
    assert with_edges.shape == with_normals.shape == (H + TITLE_HEIGHT, 2 * W, 3)  # the input and the task's tile
    np.testing.assert_array_equal(with_normals[TITLE_HEIGHT:, W:], normals_to_color(normals))


def _rgb_png(path):
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _count(region, colour):
    return int((region == np.asarray(colour, np.uint8)).all(axis=-1).sum())


def _first_column(region, colour):
    return int(np.nonzero((region == np.asarray(colour, np.uint8)).all(axis=-1).any(axis=0))[0][0])


# Non-grey colours: anti-aliased white text on black only makes greys, so these can only come from swatches.
LEGEND_PALETTE = np.array([(230, 20, 20), (20, 200, 40), (30, 60, 220), (240, 200, 10)], np.uint8)


def test_panel_legend_shows_exactly_the_present_classes(tmp_path):
    h, w = 32, 64
    image = np.full((h, w, 3), 90.0, np.float32)
    pred = np.zeros((h, w), np.int64)
    pred[:, w // 2:] = 2  # classes 0 and 2 predicted
    true = np.full((h, w), 3, np.int64)
    true[:4] = 255  # class 3 (and the ignore label) in the ground truth; class 1 nowhere
    grid_h = 2 * (h + TITLE_HEIGHT)

    def legend(names, path):
        save_prediction_panel(path, image, {"semantic": pred}, {"semantic": true}, palette=LEGEND_PALETTE,
                              class_names=names)
        png = _rgb_png(path)
        assert png.shape[1] == 2 * w  # input and semantic only
        return png[grid_h:]

    region = legend(["alpha", "beta", "gamma", "delta"], tmp_path / "a.png")
    assert region.shape[0] % LEGEND_LINE_HEIGHT == 0 and region.shape[0] >= LEGEND_LINE_HEIGHT
    inner = (LEGEND_SWATCH - 2) ** 2  # the swatch inside its 1-px frame
    for c in (0, 2, 3):
        assert _count(region, LEGEND_PALETTE[c]) == inner, c
    assert _count(region, LEGEND_PALETTE[1]) == 0
    # In class order: left to right on one line, or on a later line.
    firsts = []
    for c in (0, 2, 3):
        rows = np.nonzero((region == LEGEND_PALETTE[c]).all(axis=-1).any(axis=1))[0]
        firsts.append((int(rows[0]) // LEGEND_LINE_HEIGHT, _first_column(region, LEGEND_PALETTE[c])))
    assert firsts == sorted(firsts)

    # The names are drawn: a long name for class 0 pushes class 2's swatch to the right (or onto the next line).
    wide = legend(["a much longer name", "b", "c", "d"], tmp_path / "b.png")
    short = legend(["a", "b", "c", "d"], tmp_path / "c.png")
    assert short.shape[0] == LEGEND_LINE_HEIGHT  # three short entries fit on one 128-px line
    rows = np.nonzero((wide == LEGEND_PALETTE[2]).all(axis=-1).any(axis=1))[0]
    assert rows[0] >= LEGEND_LINE_HEIGHT or _first_column(wide, LEGEND_PALETTE[2]) > \
        _first_column(short, LEGEND_PALETTE[2]) + 60


def test_panel_legend_default_names_and_wrapping(tmp_path):
    names = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
             "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    assert default_class_names(19) == names
    assert default_class_names(7) == names[:7]
    assert default_class_names(21)[0] == "class 0" and default_class_names(21)[20] == "class 20"
    # All 19 classes in a 32x64 image: the legend wraps over several lines, every swatch drawn once, in the width.
    labels = np.arange(32 * 64).reshape(32, 64) % 19
    path = tmp_path / "all.png"
    save_prediction_panel(path, np.zeros((32, 64, 3)), {"semantic": labels})
    png = _rgb_png(path)
    region = png[32 + TITLE_HEIGHT:]
    assert png.shape[1] == 2 * 64 and region.shape[0] >= 3 * LEGEND_LINE_HEIGHT
    assert region.shape[0] % LEGEND_LINE_HEIGHT == 0
    for c in range(19):
        if len(set(CITYSCAPES_PALETTE[c])) > 1:  # the grey ones (building, pole) can also come from text
            assert _count(region, CITYSCAPES_PALETTE[c]) == (LEGEND_SWATCH - 2) ** 2, c


def _two_instances(h=32, w=64):
    """Two car rectangles on road, with centroid vectors that point exactly at their centroids."""
    rects = [(4, 14, 4, 20), (18, 30, 38, 60)]
    semantic = np.zeros((h, w), np.int64)
    ids = np.zeros((h, w), np.int64)
    for k, (y0, y1, x0, x1) in enumerate(rects):
        semantic[y0:y1, x0:x1] = 13  # car (an instance class of the 19 CityScapes classes)
        ids[y0:y1, x0:x1] = k + 1
    vectors = np.zeros((h, w, 2), np.float32)
    yy, xx = np.mgrid[:h, :w]
    for y0, y1, x0, x1 in rects:
        inside = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
        vectors[inside, 0] = (y0 + y1 - 1) / 2.0 - yy[inside]
        vectors[inside, 1] = (x0 + x1 - 1) / 2.0 - xx[inside]
    return rects, semantic, ids, vectors


def _instance_tile_colours(tile, rects):
    """Per rectangle its single interior colour (asserted uniform); the background outside them is checked too."""
    colours = []
    outside = np.ones(tile.shape[:2], bool)
    for y0, y1, x0, x1 in rects:
        interior = tile[y0 + 1:y1 - 1, x0 + 1:x1 - 1].reshape(-1, 3)
        uniq = np.unique(interior, axis=0)
        assert len(uniq) == 1, uniq
        colours.append(tuple(uniq[0]))
        outside[y0:y1, x0:x1] = False
    # The constant input (100) dimmed to 60 % everywhere else: no instance colour outside the objects.
    assert (tile[outside] == 60).all()
    return colours


def test_panel_pred_instances_tile_clusters_two_instances(tmp_path):
    h, w = 32, 64
    rects, semantic, ids, vectors = _two_instances(h, w)
    logits = np.eye(19, dtype=np.float32)[semantic] * 8.0
    mask = (ids > 0).astype(np.float32)[..., None]
    image = np.full((h, w, 3), 100.0, np.float32)
    path = tmp_path / "inst.png"
    save_prediction_panel(path, image, {"semantic": logits, "instance": vectors},
                          {"semantic": semantic, "instance": vectors, "instance_mask": mask})
    png = _rgb_png(path)
    # Documented layout: input, semantic, instance vectors, instances; tiles H x W under TITLE_HEIGHT strips.
    assert png.shape[1] == 4 * w
    pred_tile = png[TITLE_HEIGHT:TITLE_HEIGHT + h, 3 * w:4 * w]
    true_tile = png[2 * TITLE_HEIGHT + h:2 * (TITLE_HEIGHT + h), 3 * w:4 * w]
    pred_colours = _instance_tile_colours(pred_tile, rects)
    assert len(set(pred_colours)) == 2
    colours_in_tile = {tuple(c) for c in pred_tile.reshape(-1, 3)} - {(60, 60, 60), (255, 255, 255)}
    assert colours_in_tile == set(pred_colours)  # exactly two instance colours (plus background and outlines)
    # The true ids (recovered from the exact vectors) are drawn alike, each object in its predicted colour.
    assert _instance_tile_colours(true_tile, rects) == pred_colours

    # cluster=False: no instances column; precomputed ids bring it back without clustering.
    path2 = tmp_path / "off.png"
    save_prediction_panel(path2, image, {"semantic": logits, "instance": vectors}, cluster=False)
    assert _rgb_png(path2).shape[1] == 3 * w
    three = ids.copy()
    three[rects[1][0]:rects[1][1], 49:rects[1][3]] = 3
    path3 = tmp_path / "given.png"
    save_prediction_panel(path3, image, {"semantic": logits, "instance": vectors}, cluster=False, instance_ids=three)
    png = _rgb_png(path3)
    tile = png[TITLE_HEIGHT:TITLE_HEIGHT + h, 3 * w:4 * w]
    assert len({tuple(c) for c in tile.reshape(-1, 3)} - {(60, 60, 60), (255, 255, 255)}) == 3
    # The target without instance vectors: a grey placeholder for the true instances.
    path4 = tmp_path / "no_true.png"
    save_prediction_panel(path4, image, {"semantic": logits, "instance": vectors}, {"semantic": semantic})
    png = _rgb_png(path4)
    assert (png[2 * TITLE_HEIGHT + h:2 * (TITLE_HEIGHT + h), 3 * w:4 * w] == 40).all()


def test_panel_depth_colorbar_is_magma_from_zero_to_vmax(tmp_path):
    import matplotlib

    h, w = 32, 64
    depth = np.zeros((h, w, 1), np.float32)
    depth[:, : w // 2] = 4.0  # 99th percentile = 4 = vmax
    target = {"depth": depth, "depth_mask": np.ones((h, w, 1), np.float32)}
    path = tmp_path / "depth.png"
    save_prediction_panel(path, np.full((h, w, 3), 50.0), {"depth": depth * 0.5}, target)
    png = _rgb_png(path)
    assert png.shape[0] == 2 * (h + TITLE_HEIGHT)  # no semantics, no legend
    magma = matplotlib.colormaps["magma"]
    top = np.asarray(magma(1.0)[:3]) * 255.0
    bottom = np.asarray(magma(0.0)[:3]) * 255.0
    x = 2 * w + COLORBAR_MARGIN + COLORBAR_BAR // 2  # input and depth columns, then the bar
    bar = png[TITLE_HEIGHT:, x].astype(np.float64)
    np.testing.assert_allclose(bar[0], top, atol=1.0)
    np.testing.assert_allclose(bar[-1], bottom, atol=1.0)
    assert bar[0].sum() > bar[len(bar) // 2].sum() > bar[-1].sum()
    assert (png[:TITLE_HEIGHT, x] == 0).all()  # the bar starts under the title strip
    # Its ends are the colours of vmax and 0 in the true depth tile.
    true_tile = png[2 * TITLE_HEIGHT + h:, w:2 * w]
    np.testing.assert_array_equal(true_tile[5, 5], png[TITLE_HEIGHT, x])
    np.testing.assert_array_equal(true_tile[5, w - 5], png[-1, x])
    # Labels are written at the right of the bar, next to its top and bottom.
    labels = png[:, 2 * w + COLORBAR_MARGIN + COLORBAR_BAR + 2:]
    assert (labels[TITLE_HEIGHT:TITLE_HEIGHT + 14] > 128).any() and (labels[-14:] > 128).any()


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


def _bbox_overlap(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_task_weights_figure_two_axes_and_legend_outside(tmp_path):
    history = {"semantic_sigma2": [1.0, 0.5, 0.25, 0.2], "depth_sigma2": [2.0, 3.0, 4.0, 5.0],
               "semantic_weight": [0.5, 1.0, 2.0, 2.5], "depth_weight": [0.25, 0.17, 0.125, 0.1]}
    fig = task_weights_figure(history, title="uncertainty")
    assert len(fig.axes) == 2
    sigma_ax, weight_ax = fig.axes
    assert sigma_ax.get_yscale() == "log"
    # one colour per task, the same in both axes
    colours = [{line.get_label(): line.get_color() for line in ax.lines} for ax in (sigma_ax, weight_ax)]
    assert set(colours[0]) == set(colours[1]) == {"semantic", "depth"}
    assert colours[0] == colours[1] and colours[0]["semantic"] != colours[0]["depth"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert [t.get_text() for t in legend.get_texts()] == ["semantic", "depth"]
    for ax in fig.axes:
        assert not _bbox_overlap(box, ax.get_window_extent(renderer))
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1
    path = tmp_path / "w.png"
    plot_task_weights(history, path)
    png = cv2.imread(str(path))
    assert png is not None and png.shape[0] > 300

    # Only one kind of series: one axes, the legend outside it too.
    fig = task_weights_figure({k: v for k, v in history.items() if k.endswith("_weight")})
    assert len(fig.axes) == 1
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert not _bbox_overlap(fig.legends[0].get_window_extent(renderer), fig.axes[0].get_window_extent(renderer))


def test_task_weights_figure_plots_against_the_recorded_steps():
    # WeightingHistory records every 10th step: the x values are those steps, not the point indices 0, 1, 2.
    fig = task_weights_figure({"step": [10, 20, 30], "semantic_sigma2": [1.0, 0.5, 0.25],
                               "semantic_weight": [1.0, 2.0, 4.0]})
    for ax in fig.axes:
        assert list(ax.lines[0].get_xdata()) == [10, 20, 30]
    assert not any(line.get_label() == "step" for ax in fig.axes for line in ax.lines)
