"""A cache of any dataset's prepared examples (``mtl_keras.data.pipeline``) at the training size, written once:
``{out}/prepared_manifest.json`` (dataset, image size, classes, tasks, depth unit, counts) and one zlib-compressed
``{out}/{split}/{i:06d}.zlib`` per example holding the raw bytes of its fields in turn. One file per example keeps a
full shuffle cheap (names are shuffled, not examples), lets tf.data workers decompress in parallel and shards by
file. Instance ids are renumbered 1..K per image (uint16); the rest is stored as decoded, so the cache gives exactly
the tensors of the source loader."""

from __future__ import annotations

import os
import time
import zlib

import numpy as np

from mtl_keras.atomic_files import write_json_atomically
from mtl_keras.config import read_json
from mtl_keras.data.checks import DataError, SplitReport, check_image_size, error_message
from mtl_keras.data.pipeline import Source
from mtl_keras.tasks import TASKS

MANIFEST = "prepared_manifest.json"
_VERSION = 1
# key -> (dtype in the cache, channels or None), from the task table
_FIELDS = {"image": ("uint8", 3), **{t.example_key: (t.cache_dtype, t.example_channels) for t in TASKS.values()}}
# fields whose example dtype differs from the cache's (instance ids: int32 in the example, uint16 in the cache)
_EXAMPLE_DTYPES = {t.example_key: t.example_dtype for t in TASKS.values() if t.example_dtype != t.cache_dtype}
# instance id fields: renumbered 1..K per image so that they fit the cache's dtype
_ID_FIELDS = tuple(t.example_key for t in TASKS.values() if t.target_rule == "centroid_vectors")


def _fields(tasks):
    return ["image"] + [t.example_key for t in TASKS.values() if t.name in tasks]


def _layout(keys, image_size):
    """``[(key, shape, bytes)]`` of the fields stored in a file, in turn."""
    shapes = [tuple(image_size) + ((_FIELDS[k][1],) if _FIELDS[k][1] else ()) for k in keys]
    return [(k, shape, int(np.prod(shape)) * np.dtype(_FIELDS[k][0]).itemsize) for k, shape in zip(keys, shapes)]


def write_prepared_sources(make_source, dataset, data_dir, out_dir, splits, image_size, num_classes, depth_target,
                           level=3, verbose=False):
    """Runs the decode step of ``make_source(split)`` once per split into ``out_dir``; returns the manifest, written
    last so that an interrupted run leaves no usable half cache."""
    import tensorflow as tf

    out_dir = os.fspath(out_dir)
    h, w = check_image_size(image_size)
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    manifest = {"version": _VERSION, "dataset": dataset, "source": os.path.abspath(os.fspath(data_dir)),
                "image_size": [h, w], "num_classes": int(num_classes), "tasks": [],
                "depth_target": depth_target, "depth_scales_with_zoom": True, "splits": {}}
    for split in splits:
        t0 = time.perf_counter()
        source = make_source(split)
        manifest["tasks"] = list(source.tasks)
        manifest["depth_scales_with_zoom"] = bool(source.depth_scales_with_zoom)
        keys = _fields(source.tasks)
        folder = os.path.join(out_dir, split)
        os.makedirs(folder, exist_ok=True)
        ds = tf.data.Dataset.from_tensor_slices(source.columns).map(source.decode,
                                                                    num_parallel_calls=tf.data.AUTOTUNE)
        count, nbytes = 0, 0
        for i, example in enumerate(ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()):
            parts = []
            for key in keys:
                value = example[key]
                if key in _ID_FIELDS:
                    # renumber 1..K (0 = no instance stays 0: it is the smallest id when present)
                    uniq, inverse = np.unique(value, return_inverse=True)
                    if len(uniq) > np.iinfo(_FIELDS[key][0]).max:
                        raise ValueError(f"{dataset} {split} example {i}: {len(uniq)} instances do not fit "
                                         f"{_FIELDS[key][0]}")
                    value = inverse.reshape(value.shape) + (0 if uniq[0] == 0 else 1)
                parts.append(np.ascontiguousarray(value, dtype=_FIELDS[key][0]).tobytes())
            blob = zlib.compress(b"".join(parts), level)
            with open(os.path.join(folder, f"{i:06d}.zlib"), "wb") as f:
                f.write(blob)
            count, nbytes = count + 1, nbytes + len(blob)
        for stale in sorted(os.listdir(folder)):  # files of a former, larger cache
            if stale.endswith(".zlib") and int(stale.split(".")[0]) >= count:
                os.remove(os.path.join(folder, stale))
        manifest["splits"][split] = {"count": count, "bytes": nbytes}
        if verbose:
            print(f"{dataset} {split}: {count} examples at {h}x{w} -> {folder} ({nbytes / 2**20:.1f} MiB) in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
    write_json_atomically(manifest_path, manifest, indent=2)
    return manifest


def read_manifest(data_dir):
    path = os.path.join(os.fspath(data_dir), MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: {data_dir} is not a prepared set (write one with "
                                f"python experiments/prepare_data.py --dataset NAME --data_dir RAW --output "
                                f"{data_dir})")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("version") != _VERSION:
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise ValueError(f"{path} has version {version!r}, expected {_VERSION}: prepare it again")
    _check_manifest(path, manifest)
    return manifest


def _check_manifest(path, m):
    """DataError naming the manifest unless it has the fields and types :func:`write_prepared_sources` writes (a
    corrupt value would otherwise fail later, far from the file)."""
    def is_int(v, low):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    problems = []
    if not (isinstance(m.get("image_size"), list) and len(m["image_size"]) == 2
            and all(is_int(v, 1) for v in m["image_size"])):
        problems.append("image_size: [height, width]")
    if not is_int(m.get("num_classes"), 1):
        problems.append("num_classes: a positive int")
    tasks = m.get("tasks")
    if not (isinstance(tasks, list) and tasks and all(isinstance(t, str) and t in TASKS for t in tasks)):
        problems.append(f"tasks: a list of {', '.join(TASKS)}")
    if not isinstance(m.get("depth_target"), str):
        problems.append("depth_target: a string")
    if not isinstance(m.get("depth_scales_with_zoom"), bool):
        problems.append("depth_scales_with_zoom: true or false")
    splits = m.get("splits")
    if not (isinstance(splits, dict) and all(isinstance(v, dict) and is_int(v.get("count"), 0)
                                             for v in splits.values())):
        problems.append("splits: {split: {\"count\": int}}")
    if problems:
        raise DataError(f"{path} is corrupt: expected {'; '.join(problems)} (prepare the set again)")


def _split_files(data_dir, manifest, split):
    if split not in manifest["splits"]:
        raise ValueError(f"the prepared set {data_dir} has the splits {', '.join(manifest['splits'])}, not "
                         f"{split!r}")
    count = manifest["splits"][split]["count"]
    if count == 0:
        raise ValueError(f"empty split {split!r} in the prepared set {data_dir}")
    files = [os.path.join(os.fspath(data_dir), split, f"{i:06d}.zlib") for i in range(count)]
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{missing[0]} is missing ({len(missing)} of {count} files of split {split!r}): the "
                                f"prepared set is incomplete; prepare it again")
    return files


def count(data_dir, split="train"):
    manifest = read_manifest(data_dir)
    return len(_split_files(data_dir, manifest, split))


def _decoder(keys, image_size):
    layout = _layout(keys, image_size)
    total = sum(size for _, _, size in layout)

    def decode(row):
        import tensorflow as tf

        raw = tf.io.decode_compressed(tf.io.read_file(row["path"]), compression_type="ZLIB")
        check = tf.debugging.Assert(tf.equal(tf.strings.length(raw), total), [
            "corrupt prepared file", row["path"], "holds", tf.strings.length(raw), "bytes; expected", total])
        with tf.control_dependencies([check]):
            raw = tf.identity(raw)
        out, offset = {}, 0
        for key, shape, size in layout:
            x = tf.io.decode_raw(tf.strings.substr(raw, offset, size), getattr(tf, _FIELDS[key][0]))
            x = tf.reshape(x, shape)
            out[key] = tf.cast(x, _EXAMPLE_DTYPES[key]) if key in _EXAMPLE_DTYPES else x
            offset += size
        return out

    return decode


def prepared_source(data_dir, split="train", image_size=None, num_classes=None, tasks=None, depth_target=None,
                    check_files=True) -> Source:
    """A split of a prepared set; ``image_size``, ``num_classes``, ``tasks`` and ``depth_target`` must be the cache's
    when given."""
    del check_files
    manifest = read_manifest(data_dir)
    size = tuple(manifest["image_size"])
    if image_size is not None and check_image_size(image_size) != size:
        raise ValueError(f"the prepared set {data_dir} is at {size[0]}x{size[1]}, not {tuple(image_size)}: train at "
                         f"--image_size {size[0]},{size[1]} or prepare the data again at that size")
    if num_classes is not None and int(num_classes) != manifest["num_classes"]:
        raise ValueError(f"the prepared set {data_dir} has {manifest['num_classes']} classes, not {num_classes}: "
                         f"pass --num_classes {manifest['num_classes']} or prepare the data again")
    if depth_target is not None and depth_target != manifest["depth_target"]:
        raise ValueError(f"the prepared set {data_dir} holds depth_target={manifest['depth_target']!r}, not "
                         f"{depth_target!r}")
    have = tuple(manifest["tasks"])
    tasks = have if tasks is None else tuple([tasks] if isinstance(tasks, str) else tasks)
    missing = [t for t in tasks if t not in have]
    if missing or not tasks:
        raise ValueError(f"the prepared set {data_dir} holds the tasks {', '.join(have)}, not {', '.join(missing)}"
                         f" (prepare it again with --tasks {','.join(dict.fromkeys(have + tuple(missing)))})")
    files = _split_files(data_dir, manifest, split)
    return Source(columns={"path": files}, decode=_decoder(_fields(have), size), num_examples=len(files),
                  tasks=tuple(t for t in TASKS if t in tasks), image_size=size,
                  depth_scales_with_zoom=bool(manifest["depth_scales_with_zoom"]))


def validate_split(data_dir, split, num_classes=None, tasks=None, workers=4, max_errors=20, depth_target=None):
    """The manifest and the size of every file after decompression (``--check``)."""
    report = SplitReport(split)
    try:
        manifest = read_manifest(data_dir)
        if split not in manifest["splits"]:
            report.missing = True
            return report
        files = _split_files(data_dir, manifest, split)
    except (OSError, ValueError) as e:
        report.errors.append((data_dir, error_message(e)))
        return report
    h, w = manifest["image_size"]
    expected = sum(size for _, _, size in _layout(_fields(manifest["tasks"]), (h, w)))
    report.examples = len(files)
    for path in files:
        report.add({"size": (w, h)})
        try:
            with open(path, "rb") as f:
                size = len(zlib.decompress(f.read()))
            if size != expected:
                report.errors.append((path, f"{path}: {size} bytes after decompression, expected {expected}"))
        except (OSError, zlib.error) as e:
            report.errors.append((path, f"{path}: cannot decompress ({e})"))
    return report
