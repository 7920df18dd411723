"""Fuzzed readers (issue 26): hypothesis feeds every reader random bytes, truncations, bit flips and overwritten
spans of a valid file that the test writes. A reader must give back what was written, or raise the project's data
error: a ValueError or OSError (DataError included) in one line that names the file. Never another exception, a hang
or a silently wrong example. Where a format has no checksum (JPEG data, .npy and .mat values, HDF5 chunks, JSON
numbers) a flipped value cannot be told from a real one; there the property is the shape and type of what comes back.

Budget: ``@fuzz(N)``, N examples per reader, derandomized (the same inputs on every run, no example database).
"""

import contextlib
import io
import json
import logging
import os
import signal
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mtl_keras import checkpointing, presets  # noqa: E402
from mtl_keras.config import TrainConfig, read_json  # noqa: E402
from mtl_keras.data import checks, cityscapes, folder, npy_release, nyuv2, prepared, synthetic  # noqa: E402
from mtl_keras.data.numpy_loader import FolderPyDataset  # noqa: E402
from mtl_keras.labels import NYUV2_40_TO_13  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
from miniature import write_nyuv2  # noqa: E402

WATCHDOG_S = 60  # a reader that has not returned by then hangs (each reads a file of a few KB)
# A deeper search by hand: MTL_KERAS_FUZZ_SCALE=K runs K times each budget with fresh random examples.
SCALE = float(os.environ.get("MTL_KERAS_FUZZ_SCALE") or 0)


def fuzz(max_examples):
    """The budget of one reader: ``max_examples`` derandomized examples (the same on every run), no deadline (the
    first call of a reader builds TensorFlow functions), no example database written into the checkout."""
    return settings(max_examples=int(max_examples * SCALE) if SCALE else max_examples, deadline=None,
                    derandomize=not SCALE, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------------------- corruptions
def _flip(data, index, bit):
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


def corruptions(valid, max_random=4096):
    """``(kind, bytes, first changed offset)`` from ``valid``: random bytes, a truncation, one flipped bit, or a span
    overwritten with random bytes."""
    n = len(valid)
    return st.one_of(
        st.binary(max_size=min(2 * n, max_random)).map(lambda b: ("random", b, 0)),
        st.integers(0, n - 1).map(lambda k: ("truncated", valid[:k], k)),
        st.tuples(st.integers(0, n - 1), st.integers(0, 7)).map(lambda t: ("flipped", _flip(valid, *t), t[0])),
        st.tuples(st.integers(0, n - 1), st.binary(min_size=1, max_size=16)).map(
            lambda t: ("overwritten", valid[:t[0]] + t[1] + valid[t[0] + len(t[1]):], t[0])),
    )


class Files(dict):
    """``{name: bytes}`` whose repr stays short in hypothesis' reports."""

    def __repr__(self):
        return f"<{len(self)} files: {', '.join(map(str, self))}>"


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


class Hang(Exception):
    pass


@contextlib.contextmanager
def watchdog(seconds=WATCHDOG_S):
    def on_alarm(signum, frame):
        raise Hang(f"the reader did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def read_or_error(reader, *paths):
    """``(value, None)`` when ``reader()`` returns, ``(None, error)`` when it raises the data error: a ValueError or
    OSError of one line naming one of ``paths``. Any other exception (or a hang) fails the test."""
    try:
        with watchdog():
            return reader(), None
    except (ValueError, OSError) as e:
        assert_data_error(e, *paths)
        return None, e


def assert_data_error(e, *paths):
    message = str(e).strip()
    assert any(os.fspath(p) in message for p in paths), f"{type(e).__name__} names none of {paths}: {message}"
    assert "\n" not in message, f"{type(e).__name__} is not one line: {message!r}"


# ----------------------------------------------------------------------------------------------------- PNG / JPEG
H, W = 10, 12
_RNG = np.random.default_rng(26)
IMAGE_BGR = _RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
LABEL_8 = _RNG.integers(0, 4, (H, W), dtype=np.uint8)
DISPARITY_16 = _RNG.integers(0, 60000, (H, W)).astype(np.uint16)


def _encode(ext, array, params=()):
    ok, buffer = cv2.imencode(ext, array, list(params))
    assert ok
    return buffer.tobytes()


PNG_IMAGE = _encode(".png", IMAGE_BGR)
PNG_LABEL = _encode(".png", LABEL_8)
PNG_DISPARITY = _encode(".png", DISPARITY_16)
JPEG_IMAGE = _encode(".jpg", IMAGE_BGR, (cv2.IMWRITE_JPEG_QUALITY, 95))


@fuzz(500)
@given(data=st.data())
def test_png_images_decode_exactly_or_fail_naming_the_file(data, tmp_path):
    """checks.png_info / imread_png (the numpy loader), folder.read_image, checks.decode_png_file (TensorFlow)."""
    kind, blob, _ = data.draw(corruptions(PNG_IMAGE), label="image.png")
    path = write(tmp_path / "image.png", blob)
    info, _ = read_or_error(lambda: checks.png_info(path), path)
    assert info is None or info == (W, H, 8, 2)
    for reader in (lambda: checks.imread_png(path, cv2.IMREAD_COLOR), lambda: folder.read_image(path)):
        image, _ = read_or_error(reader, path)
        assert image is None or np.array_equal(image, IMAGE_BGR), kind
    rgb, _ = read_or_error(lambda: checks.decode_png_file(path), path)
    assert rgb is None or np.array_equal(rgb, IMAGE_BGR[..., ::-1]), kind


@fuzz(400)
@given(data=st.data())
def test_label_and_16_bit_pngs_decode_exactly_or_fail_naming_the_file(data, tmp_path):
    """checks.check_png (header: bit depth, grey, size) and checks.imread_label, 8-bit labels and 16-bit disparity."""
    bit_depth = data.draw(st.sampled_from([8, 16]), label="bit depth")
    valid, array = (PNG_LABEL, LABEL_8) if bit_depth == 8 else (PNG_DISPARITY, DISPARITY_16)
    kind, blob, _ = data.draw(corruptions(valid), label="label.png")
    path = write(tmp_path / "label.png", blob)
    info, _ = read_or_error(lambda: checks.check_png(path, "label", bit_depth=bit_depth, grey=True, size=(W, H)),
                            path)
    assert info is None or info == (W, H, bit_depth, 0)
    label, _ = read_or_error(lambda: checks.imread_label(path, "label", bit_depth, size=(W, H)), path)
    assert label is None or (label.dtype == array.dtype and np.array_equal(label, array)), kind
    tf_label, _ = read_or_error(lambda: checks.decode_png_file(path, f"uint{bit_depth}"), path)
    assert tf_label is None or np.array_equal(tf_label[..., 0], array), kind


@fuzz(200)
@given(data=st.data())
def test_jpeg_images_are_refused_when_truncated(data, tmp_path):
    """folder.read_image and checks.check_headers on a folder dataset's JPEG image: libjpeg (OpenCV) decodes a
    truncated JPEG without an error; JPEG has no checksum, so a flipped bit inside the data decodes to other pixels."""
    kind, blob, _ = data.draw(corruptions(JPEG_IMAGE), label="image.jpg")
    path = write(tmp_path / "image.jpg", blob)
    image, _ = read_or_error(lambda: folder.read_image(path), path)
    if kind == "truncated":
        assert image is None, "a truncated JPEG was decoded"
    assert image is None or (image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3)
    listed, _ = read_or_error(lambda: checks.check_headers([{"image": path}], {}), path)
    if kind == "truncated":
        assert listed is None, "a truncated JPEG passed the header check"


# ---------------------------------------------------------------------------------------------------------- .npy
NPY_ARRAYS = {
    "image": _RNG.uniform(0.0, 1.0, (4, 5, 3)).astype(np.float32),
    "label": _RNG.integers(-1, 13, (4, 5)).astype(np.int64),
    "depth": _RNG.uniform(0.0, 10.0, (4, 5)).astype(np.float32),
}


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


NPY_FILES = {field: _npy_bytes(a) for field, a in NPY_ARRAYS.items()}
NPY_OFFSETS = {field: len(blob) - NPY_ARRAYS[field].nbytes for field, blob in NPY_FILES.items()}


def _write_npy_example(folder_path):
    paths = {}
    for field, blob in NPY_FILES.items():
        paths[field] = write(folder_path / f"{field}.npy", blob)
    return paths


def test_the_valid_npy_files_read_back(tmp_path):
    paths = _write_npy_example(tmp_path)
    out, errors = npy_release._check_npy_example(paths, 13)
    assert errors == [] and out["size"] == (5, 4)
    for field, path in paths.items():
        info = checks.npy_info(path)
        assert (info.shape, info.dtype, info.offset) == (NPY_ARRAYS[field].shape, NPY_ARRAYS[field].dtype,
                                                         NPY_OFFSETS[field])


@fuzz(400)
@given(data=st.data())
def test_npy_files_read_right_or_fail_naming_the_file(data, tmp_path):
    """checks.npy_info (the headers the tf.data loader reads up front), npy_release._field_columns and
    npy_release._check_npy_example (np.load and the value checks of --check) on a LibMTL-style .npy example."""
    field = data.draw(st.sampled_from(sorted(NPY_FILES)), label="field")
    kind, blob, first = data.draw(corruptions(NPY_FILES[field]), label=f"{field}.npy")
    paths = _write_npy_example(tmp_path)
    path = write(paths[field], blob)
    original = NPY_ARRAYS[field]
    info, header_error = read_or_error(lambda: checks.npy_info(path), path)
    if info is not None:  # a header can only be read as the written one (a flipped shape digit changes the size)
        assert (info.shape, info.dtype.itemsize, info.offset) == (original.shape, original.itemsize,
                                                                  NPY_OFFSETS[field]), kind
    columns, _ = read_or_error(lambda: npy_release._field_columns(field, [path])[0], path)
    assert columns is None or tuple(columns["shape"][0][:2]) == original.shape[:2]
    with watchdog():
        out, errors = npy_release._check_npy_example(paths, 13)
    for error_path, message in errors:
        assert error_path in message and "\n" not in message.strip(), message
    if header_error is not None:
        assert path in [p for p, _ in errors]
    if not errors:
        loaded = np.load(path, allow_pickle=False)
        assert loaded.shape == original.shape
        only_data_changed = kind in ("flipped", "overwritten") and first >= NPY_OFFSETS[field]
        assert only_data_changed or np.array_equal(loaded, original) or \
            loaded.dtype == original.dtype.newbyteorder(), f"{kind} at {first}: a wrong array passed"


# ---------------------------------------------------------------------------------------------------- NYUv2 .mat
NYU_N, NYU_H, NYU_W = 2, 4, 5
NYU_TRAIN, NYU_TEST = (0,), (1,)


def _nyu_arrays():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (NYU_N, NYU_H, NYU_W, 3), dtype=np.uint8)
    labels = rng.integers(0, 895, (NYU_N, NYU_H, NYU_W)).astype(np.uint16)
    depths = rng.uniform(0.5, 10.0, (NYU_N, NYU_H, NYU_W)).astype(np.float32)
    instances = rng.integers(0, 5, (NYU_N, NYU_H, NYU_W)).astype(np.uint8)
    return images, labels, depths, instances


@pytest.fixture(scope="module")
def nyu_files(tmp_path_factory):
    """The bytes of a miniature NYUv2 (the labeled v7.3 .mat, splits.mat and the two class maps)."""
    root = tmp_path_factory.mktemp("nyu")
    write_nyuv2(root, *_nyu_arrays(), train=list(NYU_TRAIN), test=list(NYU_TEST))
    files = Files()
    for name in nyuv2.NYUV2_FILES.values():
        with open(root / name, "rb") as f:
            files[name] = f.read()
    return files


def _expected_nyu_table():
    """The 13-class table of write_nyuv2's default maps, by hand: raw label r -> 40-class 1 + (r - 1) % 40 -> the
    standard 13-class map, 0-based; 0 (unlabeled) -> 255."""
    table = np.full(895, 255, np.uint8)
    for r in range(1, 895):
        table[r] = NYUV2_40_TO_13[(r - 1) % 40] - 1
    return table


def test_the_valid_nyuv2_files_read_back(tmp_path, nyu_files):
    for name, blob in nyu_files.items():
        write(tmp_path / name, blob)
    table, _ = nyuv2.nyuv2_label_table(tmp_path, 13)
    np.testing.assert_array_equal(table, _expected_nyu_table())
    splits = nyuv2.read_nyuv2_splits(tmp_path, NYU_N)
    assert list(splits["train"]) == list(NYU_TRAIN) and list(splits["val"]) == list(NYU_TEST)
    assert nyuv2.check_nyuv2_mat(tmp_path / nyuv2.NYUV2_FILES["mat"]) == (NYU_N, (NYU_H, NYU_W))


@fuzz(400)
@given(data=st.data())
def test_nyuv2_v5_mat_files_read_right_or_fail_naming_the_file(data, tmp_path, nyu_files):
    """nyuv2.nyuv2_label_table (classMapping40.mat, class13Mapping.mat) and read_nyuv2_splits (splits.mat): scipy's
    MATLAB v5 reader. Uncompressed v5 has no checksum: a flipped value inside the range passes."""
    name = data.draw(st.sampled_from(["classMapping40.mat", "class13Mapping.mat", "splits.mat"]), label="file")
    kind, blob, _ = data.draw(corruptions(nyu_files[name]), label=name)
    for other, valid in nyu_files.items():
        if other != nyuv2.NYUV2_FILES["mat"]:
            write(tmp_path / other, valid)
    path = write(tmp_path / name, blob)
    result, _ = read_or_error(lambda: nyuv2.nyuv2_label_table(tmp_path, 13), path)
    if result is not None:
        table, class40 = result
        assert table.shape == (895,) and table.dtype == np.uint8 and table[0] == 255
        assert set(np.unique(table)) <= set(range(13)) | {255}
        if kind in ("random", "truncated"):
            np.testing.assert_array_equal(table, _expected_nyu_table())
    splits, _ = read_or_error(lambda: nyuv2.read_nyuv2_splits(tmp_path, NYU_N), path)
    if splits is not None:
        train, val = set(splits["train"].tolist()), set(splits["val"].tolist())
        assert train and val and not train & val and train | val <= set(range(NYU_N))
        if kind in ("random", "truncated"):
            assert (sorted(train), sorted(val)) == (list(NYU_TRAIN), list(NYU_TEST))


@fuzz(400)
@given(data=st.data())
def test_nyuv2_labeled_hdf5_mat_reads_right_or_fails_naming_the_file(data, tmp_path, nyu_files):
    """nyuv2.check_nyuv2_mat (h5py: datasets, shapes, dtypes) and nyuv2._read_sample (what the tf.data map reads per
    image). HDF5 keeps no checksum of contiguous data: a flipped pixel is read as written."""
    name = nyuv2.NYUV2_FILES["mat"]
    kind, blob, _ = data.draw(corruptions(nyu_files[name], max_random=1024), label=name)
    path = write(tmp_path / name, blob)
    checked, _ = read_or_error(lambda: nyuv2.check_nyuv2_mat(path), path)
    if checked is None:
        return
    assert checked == (NYU_N, (NYU_H, NYU_W)), kind
    assert kind not in ("random", "truncated"), f"a {kind} HDF5 file passed"
    for i in range(NYU_N):
        sample, _ = read_or_error(lambda: nyuv2._read_sample(path, ("labels", "instances", "depths"), i), path)
        if sample is not None:  # the kinds check_nyuv2_mat accepts (a flipped sign bit in a datatype passes)
            assert [a.shape for a in sample] == [(NYU_H, NYU_W, 3)] + [(NYU_H, NYU_W)] * 3
            assert [a.dtype.kind for a in sample] in (["u", "u", "u", "f"], ["u", "i", "u", "f"],
                                                      ["u", "u", "i", "f"], ["u", "i", "i", "f"])


# ----------------------------------------------------------------------------------------------------------- JSON
CONFIG_JSON = TrainConfig(batch_size=2, tasks=("semantic", "depth")).to_json().encode()
CAMERA = {"extrinsic": {"baseline": 0.209313, "pitch": 0.0, "roll": 0.0, "yaw": 0.0, "x": 1.7, "y": 0.1, "z": 1.2},
          "intrinsic": {"fx": 2262.52, "fy": 2262.52, "u0": 1024.0, "v0": 512.0}}
CAMERA_JSON = json.dumps(CAMERA, indent=4).encode()
DEEP = b"[" * 100_000  # json's decoder recurses once per level: RecursionError unless handled


def _stdlib_json(blob):
    """What Python's json makes of ``blob`` (UTF-8), or None."""
    try:
        return json.loads(blob.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def _json_case(data, tmp_path, name, valid, example):
    """``(kind, blob, path)``: a corruption of ``valid`` drawn by hypothesis (or, with ``data`` None, the explicit
    ``example`` (kind, blob)), written to ``tmp_path / name``."""
    kind, blob = example if data is None else data.draw(corruptions(valid), label=name)[:2]
    return kind, blob, write(tmp_path / name, blob)


@fuzz(400)
@given(data=st.data())
@example(data=None)
def test_json_configs_parse_as_json_or_fail_naming_the_file(data, tmp_path):
    """config.read_json (run configs, benchmark protocols, preset files) on a TrainConfig's JSON."""
    kind, blob, path = _json_case(data, tmp_path, "config.json", CONFIG_JSON, ("deep", DEEP))
    value, error = read_or_error(lambda: read_json(path), path)
    assert error is not None or value == _stdlib_json(blob), kind


@fuzz(200)
@given(data=st.data())
@example(data=None)
def test_training_configs_are_a_config_or_a_value_error(data, tmp_path):
    """TrainConfig.from_dict(read_json(...)): experiment.load_run's and train.py --preset's reader."""
    _, _, path = _json_case(data, tmp_path, "config.json", CONFIG_JSON, ("list", b"[1, 2]"))
    value, error = read_or_error(lambda: read_json(path), path)
    if error is None:
        try:
            config = TrainConfig.from_dict(value)
        except ValueError:
            return
        assert isinstance(config, TrainConfig)


@fuzz(200)
@given(data=st.data())
@example(data=None)
def test_camera_json_gives_a_positive_baseline_fx_or_fails_naming_the_file(data, tmp_path):
    """cityscapes._read_baseline_fx (metric depth = baseline * fx / disparity)."""
    kind, _, path = _json_case(data, tmp_path, "camera.json", CAMERA_JSON, ("deep", DEEP))
    baseline_fx, _ = read_or_error(lambda: cityscapes._read_baseline_fx(path), path)
    assert baseline_fx is None or 0 < baseline_fx < float("inf")
    if kind in ("random", "truncated") and baseline_fx is not None:
        assert baseline_fx == pytest.approx(0.209313 * 2262.52)


FOLDER_CLASSES = {"classes": [{"name": "ground", "color": [128, 64, 128]}, {"name": "wall", "color": [70, 70, 70]},
                              {"name": "car", "color": [0, 0, 142], "instances": True}], "ignore_label": 255}
CLASSES_JSON = json.dumps(FOLDER_CLASSES).encode()
CLASSES_CSV = b"name,r,g,b,instances\nground,128,64,128,0\nwall,70,70,70,0\ncar,0,0,142,1\n"


@fuzz(400)
@given(data=st.data())
def test_folder_classes_files_read_right_or_fail_naming_the_file(data, tmp_path):
    """folder.read_classes: classes.json or classes.csv."""
    name = data.draw(st.sampled_from(["classes.json", "classes.csv"]), label="file")
    valid = CLASSES_JSON if name == "classes.json" else CLASSES_CSV
    kind, blob, _ = data.draw(corruptions(valid), label=name)
    root = tempfile.mkdtemp(dir=tmp_path)  # one folder per example: classes.json would shadow classes.csv
    path = write(os.path.join(root, name), blob)
    classes, _ = read_or_error(lambda: folder.read_classes(root), path)
    if classes is not None:
        assert all(isinstance(n, str) for n in classes.names) and classes.colors.shape == (len(classes.names), 3)
        assert len(classes.names) <= classes.ignore_label <= 255
        assert set(classes.instance_ids) <= set(range(len(classes.names)))
        if kind == "truncated":  # a truncated file reads as the whole one (a lost newline) or not at all
            assert classes.names[:3] == ("ground", "wall", "car") or name == "classes.csv"


PRESET_JSON = json.dumps({"name": "fuzz_preset", "architecture": "mt_unet", "arguments": {"tasks": ["semantic"]},
                          "tiny_arguments": {"base_filters": 4}, "training": {"dataset": "synthetic"},
                          "metrics": {"semantic_miou": 0.5}, "weights": None}, indent=2).encode()


@fuzz(400)
@given(data=st.data())
def test_named_preset_files_read_right_or_fail_naming_the_file(data, tmp_path, monkeypatch):
    """presets.get_preset and preset_summary (list_presets) on $MTL_KERAS_PRESETS/NAME.json."""
    kind, blob, _ = data.draw(corruptions(PRESET_JSON), label="fuzz_preset.json")
    monkeypatch.setenv(presets.PRESETS_ENV, str(tmp_path))
    path = write(tmp_path / "fuzz_preset.json", blob)
    preset, _ = read_or_error(lambda: presets.get_preset("fuzz_preset"), path)
    if preset is not None:
        assert preset["name"] == "fuzz_preset" and isinstance(preset["arguments"], dict)
        summary, _ = read_or_error(lambda: presets.preset_summary("fuzz_preset"), path)
        assert summary is None or summary["architecture"] == preset["architecture"]


PREPARED_MANIFEST = json.dumps({"version": 1, "dataset": "synthetic", "source": "/data/synthetic",
                                "image_size": [8, 16], "num_classes": 19, "tasks": ["semantic", "depth"],
                                "depth_target": "inverse", "depth_scales_with_zoom": True,
                                "splits": {"train": {"count": 2, "bytes": 100}}}, indent=2).encode()


@fuzz(200)
@given(data=st.data())
def test_prepared_manifest_reads_right_or_fails_naming_the_file(data, tmp_path):
    """prepared.read_manifest (a prepared set's prepared_manifest.json) and the synthetic set's manifest reader."""
    kind, blob, _ = data.draw(corruptions(PREPARED_MANIFEST), label=prepared.MANIFEST)
    path = write(tmp_path / prepared.MANIFEST, blob)
    manifest, _ = read_or_error(lambda: prepared.read_manifest(tmp_path), path)
    if manifest is not None:
        assert len(manifest["image_size"]) == 2 and isinstance(manifest["splits"], dict)
        assert set(manifest["tasks"]) <= {"semantic", "instance", "depth", "normals"}
    write(tmp_path / synthetic._MANIFEST, blob)
    with watchdog():
        synthetic_manifest = synthetic._read_manifest(str(tmp_path))  # None: unreadable, generated again
    assert synthetic_manifest is None or isinstance(synthetic_manifest.get("params"), dict)


# ------------------------------------------------------------------------------------------ preset folders, backups
def _tiny_model(seed, compiled=False):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden), name="tiny")
    if compiled:  # a trainer, as restore gets it (its optimizer built, as after a step: saved with its variables)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
        model.optimizer.build(model.trainable_variables)
    return model


PROBE = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32)


def _outputs(model):
    return keras.ops.convert_to_numpy(model(PROBE))


@pytest.fixture(scope="module")
def preset_files(tmp_path_factory):
    """The three files of a tiny model's preset folder (presets.save_to_preset) and the model's outputs."""
    model = _tiny_model(0)
    folder_path = presets.save_to_preset(model, str(tmp_path_factory.mktemp("preset") / "p"))
    files = Files()
    for name in (presets.CONFIG_FILE, presets.METADATA_FILE, presets.WEIGHTS_FILE):
        with open(os.path.join(folder_path, name), "rb") as f:
            files[name] = f.read()
    return files, _outputs(model)


@fuzz(300)
@given(data=st.data())
def test_preset_folders_load_the_saved_model_or_fail_naming_a_file(data, tmp_path, preset_files):
    """presets.from_preset / load_preset_dir: config.json, metadata.json (sha256 of the weights), model.weights.h5."""
    files, outputs = preset_files
    name = data.draw(st.sampled_from(sorted(files)), label="file")
    kind, blob, _ = data.draw(corruptions(files[name], max_random=2048), label=name)
    preset_dir = tmp_path / "p"
    preset_dir.mkdir(exist_ok=True)
    for other, valid in files.items():
        write(preset_dir / other, valid)
    write(preset_dir / name, blob)
    model, _ = read_or_error(lambda: presets.from_preset(str(preset_dir)), str(preset_dir))
    if model is not None:  # an intact model: a corrupt weights file never loads (its sha256 is checked first)
        assert name != presets.WEIGHTS_FILE, f"{kind} weights loaded"
        np.testing.assert_array_equal(_outputs(model), outputs)


@pytest.fixture(scope="module")
def backup_files(tmp_path_factory):
    """Two backups (epochs 1 and 2) of a tiny model as EpochBackup records them, their weights, and the weights of a
    fresh model."""
    folder_path = tmp_path_factory.mktemp("backup")
    weights, entries = {}, []  # epoch -> the model's weights
    for epoch in (1, 2):
        model = _tiny_model(epoch, compiled=True)
        name = f"epoch-{epoch:05d}.weights.h5"
        model.save_weights(str(folder_path / name))
        weights[epoch] = model.get_weights()
        entries.insert(0, {"epoch": epoch, "file": name, "sha256": presets.file_sha256(str(folder_path / name))})
    state = {"backups": entries, "history": {"epochs": 2, "epoch_logs": {"loss": [2.0, 1.0]},
                                             "weighting": {"step": [1, 2], "semantic": [0.5, 0.6]}}}
    files = Files({checkpointing.STATE_FILE: json.dumps(state, indent=2).encode()})
    for entry in entries:
        with open(folder_path / entry["file"], "rb") as f:
            files[entry["file"]] = f.read()
    weights[0] = _tiny_model(0, compiled=True).get_weights()
    return files, Files(weights)


def _same_weights(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


@contextlib.contextmanager
def _warnings():
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("mtl_keras")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@fuzz(100)
@given(data=st.data())
def test_backups_restore_an_intact_backup_or_none(data, tmp_path, backup_files):
    """checkpointing.read_state / restore / read_history on state.json and the .weights.h5 backups. A backup that
    fails its sha256 is skipped for the one before (the documented fallback); an unreadable state.json is ignored with
    a warning naming it (a fresh start). ``recorded``: a corrupt weights file whose sha256 state.json records (a
    write that went wrong before the sha256 was taken) must not crash restore; it may load partly (Keras skips a
    missing group with a warning), which is why every backup is checked against the sha256 taken after its write."""
    files, weights = backup_files
    target = data.draw(st.sampled_from(sorted(files) + ["recorded"]), label="file")
    name = "epoch-00002.weights.h5" if target == "recorded" else target
    kind, blob, _ = data.draw(corruptions(files[name], max_random=2048), label=name)
    backup_dir = tmp_path / "backup"
    backup_dir.mkdir(exist_ok=True)
    for other, valid in files.items():
        write(backup_dir / other, valid)
    write(backup_dir / name, blob)
    if target == "recorded":
        state = json.loads(files[checkpointing.STATE_FILE])
        state["backups"][0]["sha256"] = presets.file_sha256(str(backup_dir / name))
        write(backup_dir / checkpointing.STATE_FILE, json.dumps(state).encode())
    trainer = _tiny_model(0, compiled=True)
    with watchdog(), _warnings() as records:
        epochs = checkpointing.restore(trainer, str(backup_dir))
        history = checkpointing.read_history(str(backup_dir), epochs, 1)
    assert isinstance(history["epoch_logs"], dict)
    loaded = trainer.get_weights()
    if target == "epoch-00002.weights.h5":
        assert epochs == 1 and _same_weights(loaded, weights[1]), kind
    elif target == "epoch-00001.weights.h5":
        assert epochs == 2 and _same_weights(loaded, weights[2]), kind
    elif target == "recorded":
        assert epochs == 2 or (epochs == 1 and _same_weights(loaded, weights[1])), kind
    else:  # state.json: the epoch it records for the file it names, or a fresh start with a warning naming it
        if epochs == 0:
            assert _same_weights(loaded, weights[0])
            assert any(os.path.join(str(backup_dir), checkpointing.STATE_FILE) in r.getMessage() for r in records)
        else:
            match = [e for e in checkpointing.read_state(str(backup_dir))["backups"] if e["epoch"] == epochs]
            assert match and any(_same_weights(loaded, weights[int(e["file"][6:11])]) for e in match), kind


# ------------------------------------------------------------------------------------------------- folder dataset
def _folder_dataset(root):
    """One training example of a folder dataset (PNG image, semantic, instance and depth PNGs, classes.json)."""
    semantic = LABEL_8 % 3
    semantic[0, :3] = 255
    instance = np.where(semantic == 2, 7, 0).astype(np.uint16)
    files = {"classes.json": CLASSES_JSON, os.path.join("train", "images", "a.png"): PNG_IMAGE,
             os.path.join("train", "semantic", "a.png"): _encode(".png", semantic),
             os.path.join("train", "instance", "a.png"): _encode(".png", instance),
             os.path.join("train", "depth", "a.png"): PNG_DISPARITY}
    for name, blob in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        write(os.path.join(root, name), blob)
    return files


def _folder_loader(root):
    return FolderPyDataset(str(root), "train", image_size=(H, W), batch_size=1, shuffle=False, flip=False,
                           drop_remainder=False)


@pytest.fixture(scope="module")
def folder_example(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    _folder_dataset(root)
    assert folder.validate_split(str(root), "train").errors == []
    return _folder_loader(root).prepared(0)


@fuzz(200)
@given(data=st.data())
def test_folder_dataset_gives_the_example_or_names_the_file(data, tmp_path, folder_example):
    """folder.list_folder_files(check=True) (the header checks of the tf.data loader), folder.validate_split
    (prepare_data.py --check) and the TensorFlow-free loader (numpy_loader.FolderPyDataset)."""
    root = tmp_path / "folder"
    files = _folder_dataset(root)
    name = data.draw(st.sampled_from(sorted(files)), label="file")
    kind, blob, _ = data.draw(corruptions(files[name]), label=name)
    path = write(root / name, blob)
    # a corrupt PNG is named; a classes file that reads as other classes can make a label file wrong instead
    named = (path,) if name != "classes.json" else tuple(str(root / n) for n in files)
    read_or_error(lambda: folder.list_folder_files(str(root), "train", folder.TASKS, check=True), path)
    with watchdog():
        report = folder.validate_split(str(root), "train")
    for _, message in report.errors:
        assert "\n" not in message.strip() and any(p in message for p in named), message
    loader, _ = read_or_error(lambda: _folder_loader(root), *named)
    example_read = None if loader is None else read_or_error(lambda: loader.prepared(0), *named)[0]
    if example_read is None:  # what the loader refuses, --check reports
        assert report.errors, f"{kind} {name}: the loader failed but validate_split found nothing"
    else:
        assert report.errors == [], f"{kind} {name}: validate_split reports an error the loader does not meet"
        assert set(example_read) == set(folder_example)
        for key, value in folder_example.items():
            np.testing.assert_array_equal(example_read[key], value, err_msg=f"{kind} {name}: {key}")


@fuzz(200)
@given(data=st.data())
def test_the_tf_data_decode_of_a_folder_dataset_gives_the_example_or_fails(data, tmp_path, folder_example):
    """folder.folder_source: the header checks up front (a DataError naming the file), then the tf.data decode step
    (run eagerly on the one row): the example the numpy loader gives, or a TensorFlow error. Never other values:
    TensorFlow's PNG decoder checks every chunk's CRC. Its in-graph checks (IEND, bit depth, label values, sizes) name
    the file; an error of the decoder itself (a corrupt chunk past the header checks) does not."""
    import tensorflow as tf

    root = tmp_path / "folder"
    files = _folder_dataset(root)
    name = data.draw(st.sampled_from(sorted(n for n in files if n.endswith(".png"))), label="file")
    kind, blob, _ = data.draw(corruptions(files[name]), label=name)
    path = write(root / name, blob)
    source, _ = read_or_error(lambda: folder.folder_source(str(root), "train", image_size=(H, W)), path)
    if source is None:
        return
    row = {key: tf.constant(values[0]) for key, values in source.columns.items()}
    try:
        with watchdog():
            example_read = {k: v.numpy() for k, v in source.decode(row).items()}
    except tf.errors.InvalidArgumentError as e:
        if "assertion failed" in e.message:  # the in-graph checks name the file
            assert path in e.message, e.message
        return
    assert set(example_read) == set(folder_example)
    for key, value in folder_example.items():
        np.testing.assert_array_equal(example_read[key], value, err_msg=f"{kind} {name}: {key}")
