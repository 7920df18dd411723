"""Whole-folder validation of a dataset (``experiments/prepare_data.py --check``).

Unlike the loaders, which stop at the first broken file, :func:`validate_dataset` looks at every file of every
split, decodes it fully and collects each problem with the file it is in, then summarises the splits (examples,
sizes, labelled / valid pixels, instances). Checks per format:

* CityScapes raw: pairing of images and label files, complete PNGs that decode (truncated or corrupt files),
  8-bit labelIds and 16-bit instanceIds / disparity, sizes equal to the image's, labelIds in cityscapesscripts'
  table, instanceIds consistent with labelIds, readable camera JSON; a test split whose labels are all void (or
  absent) is reported as "labels withheld" (as in the official release), not as an error.
* NYUv2 ``.mat``: the datasets of the ``.mat``, ``splits.mat``, the class maps, labels within 0..894, depth.
* ``.npy`` release: pairing, headers, value ranges of every array (as the loader checks them).
* prepared set: the manifest and every file's size.
"""

from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mtl_keras.data.checks import DataError

__all__ = ["SplitReport", "validate_dataset", "format_report", "DEFAULT_SPLITS"]

DEFAULT_SPLITS = {"cityscapes": ("train", "val", "test"), "synthetic": ("train", "val"),
                  "nyuv2": ("train", "val"), "cityscapes_npy": ("train", "val"), "nyuv2_npy": ("train", "val"),
                  "prepared": ("train", "val")}


@dataclasses.dataclass
class SplitReport:
    split: str
    examples: int = 0
    sizes: dict = dataclasses.field(default_factory=dict)  # "WxH" -> count
    labelled: float = float("nan")  # fraction of pixels with a (non-ignored) label
    depth_valid: float = float("nan")  # fraction of pixels with valid depth
    instances: int = 0
    errors: list = dataclasses.field(default_factory=list)  # (path, message)
    notes: list = dataclasses.field(default_factory=list)
    missing: bool = False  # the split does not exist (not an error for optional splits)

    def add_size(self, width, height):
        key = f"{width}x{height}"
        self.sizes[key] = self.sizes.get(key, 0) + 1


class _Stats:
    def __init__(self):
        self.pixels = self.labelled = self.depth_pixels = self.depth_valid = self.instances = 0

    def finish(self, report):
        if self.pixels:
            report.labelled = self.labelled / self.pixels if self.labelled >= 0 else float("nan")
        if self.depth_pixels:
            report.depth_valid = self.depth_valid / self.depth_pixels
        report.instances = self.instances


def _error_message(e):
    if isinstance(e, DataError):
        return str(e)
    return f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------------------------
# CityScapes raw
# ----------------------------------------------------------------------------------------------------------------


def _check_cityscapes_entry(entry, num_classes):
    """Decodes every file of one sample; returns (stats dict, [(path, message)])."""
    from mtl_keras.data.checks import check_png, decode_png_file
    from mtl_keras.labels import known_label_mask, label_lookup_table

    errors, out = [], {"pixels": 0, "labelled": 0, "depth_pixels": 0, "depth_valid": 0, "instances": 0,
                       "void": None, "size": None}
    try:
        info = check_png(entry["image"], "image")
        decode_png_file(entry["image"])
        size = (info.width, info.height)
        out["size"] = size
    except (DataError, OSError) as e:
        return out, [(entry["image"], _error_message(e))]
    known = known_label_mask()
    lab = None
    for key, what, depth in (("label_ids", "labelIds", 8), ("instance_ids", "instanceIds", 16),
                             ("disparity", "disparity", 16)):
        if key not in entry:
            continue
        path = entry[key]
        try:
            check_png(path, what, bit_depth=depth, grey=True, size=size)
            arr = decode_png_file(path, "uint8" if depth == 8 else "uint16")[..., 0].astype(np.int64)
        except (DataError, OSError) as e:
            errors.append((path, _error_message(e)))
            continue
        if key == "label_ids":
            bad = np.unique(arr[~known[np.minimum(arr, 255)]])
            if bad.size:
                errors.append((path, f"{path}: labelId(s) {bad.tolist()} are not in cityscapesscripts' label table "
                                     f"(expected ids 0..33)"))
                continue
            lab = arr
            train = label_lookup_table(num_classes)[arr]
            out["pixels"] += arr.size
            out["labelled"] += int((train != 255).sum())
            out["void"] = bool(np.all(train == 255))
        elif key == "instance_ids":
            is_inst = arr >= 1000
            plain = np.where(is_inst, arr // 1000, arr)
            bad = np.unique(plain[(plain > 255) | ~known[np.minimum(plain, 255)]])
            if bad.size:
                errors.append((path, f"{path}: instanceIds hold labelId(s) {bad.tolist()} that are not in the "
                                     f"table (expected labelId * 1000 + k on instances, labelId elsewhere)"))
                continue
            out["instances"] += len(np.unique(arr[is_inst]))
            if lab is not None and lab.shape == arr.shape and np.any(plain != lab):
                errors.append((path, f"{path}: instanceIds disagree with {entry['label_ids']} at "
                                     f"{int((plain != lab).sum())} pixel(s) (expected labelId = instanceId // 1000 "
                                     f"on instances)"))
        else:
            out["depth_pixels"] += arr.size
            out["depth_valid"] += int((arr > 0).sum())
    if "camera" in entry:
        from mtl_keras.data.cityscapes import _read_baseline_fx

        try:
            _read_baseline_fx(entry["camera"])
        except ValueError as e:
            errors.append((entry["camera"], str(e)))
    return out, errors


def _validate_cityscapes(data_dir, split, num_classes, tasks, workers, max_errors, cameras_needed=True):
    from mtl_keras.data.cityscapes import _TASK_FILES, FILE_TYPES, list_cityscapes_files
    from mtl_keras.tasks import TASKS

    report = SplitReport(split)
    if not os.path.isdir(os.path.join(data_dir, FILE_TYPES["image"][0], split)):
        report.missing = True
        return report
    # the reader's files of each task (cityscapes._TASK_FILES), plus the labelIds that instanceIds are checked
    # against and the camera files of the disparity (read for --depth_target metric)
    require = ["image"] + [k for t in TASKS if t in tasks for k in _TASK_FILES.get(t, ())]
    if "instance_ids" in require and "label_ids" not in require:
        require.insert(require.index("instance_ids"), "label_ids")
    if "disparity" in require:
        require.insert(require.index("disparity") + 1, "camera")
    optional = ("label_ids", "instance_ids", "disparity", "camera") if split == "test" else ("camera",)
    problems = []  # every missing or orphan file of the split, not only the first
    try:
        files = list_cityscapes_files(data_dir, split, require=require, optional=optional, problems=problems)
    except (OSError, ValueError) as e:
        report.errors.append((os.path.join(data_dir, FILE_TYPES["image"][0], split), _error_message(e)))
        return report
    report.errors.extend(problems)
    if not files:
        return report
    absent = [k for k in require if k not in files[0]]
    if absent:
        report.notes.append("no " + ", ".join(os.path.join(FILE_TYPES[k][0], split) for k in absent)
                            + (" (CityScapes withholds test labels)" if split == "test" else ""))
    report.examples = len(files)
    stats, void, camera_notes = _Stats(), [], []
    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        for entry, (out, errors) in zip(files, pool.map(lambda e: _check_cityscapes_entry(e, num_classes), files)):
            if out["size"]:
                report.add_size(*out["size"])
            for k in ("pixels", "labelled", "depth_pixels", "depth_valid", "instances"):
                setattr(stats, k, getattr(stats, k) + out[k])
            void.append(out["void"])
            if not cameras_needed:  # unread by training: noted, not an error
                camera_notes += [m for p, m in errors if p == entry.get("camera")]
                errors = [(p, m) for p, m in errors if p != entry.get("camera")]
            report.errors.extend(errors)
            if len(report.errors) >= max_errors:
                report.notes.append(f"stopped after {max_errors} errors")
                break
    stats.finish(report)
    if camera_notes:
        report.notes.append(f"{len(camera_notes)} unreadable camera file(s), e.g. {camera_notes[0]}; training reads "
                            f"them only for --depth_target metric")
    if "label_ids" in files[0] and void and all(v is True for v in void):
        note = "all labels are void (ignored everywhere)"
        report.notes.append(note + (": the official test split withholds its labels" if split == "test" else
                                    ": this split cannot train or score semantics"))
    return report


# ----------------------------------------------------------------------------------------------------------------
# .npy release
# ----------------------------------------------------------------------------------------------------------------


def _check_npy_example(paths, num_classes):
    from mtl_keras.data.checks import npy_info

    errors, out = [], {"pixels": 0, "labelled": 0, "depth_pixels": 0, "depth_valid": 0, "size": None}
    arrays = {}
    for field, path in paths.items():
        try:
            npy_info(path)
            arrays[field] = np.load(path, allow_pickle=False)
        except (DataError, OSError, ValueError) as e:
            errors.append((path, _error_message(e)))
    if "image" in arrays:
        img = arrays["image"]
        if img.ndim != 3 or img.shape[2] != 3:
            errors.append((paths["image"], f"{paths['image']}: expected an image array HxWx3, got {img.shape}"))
        else:
            out["size"] = (img.shape[1], img.shape[0])
            lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
            ok = (-1e-3 <= lo and hi <= 1 + 1e-3) if img.dtype.kind == "f" else (lo >= 0 and hi <= 255)
            if img.dtype.kind == "f" and not np.all(np.isfinite(img)):  # the loader refuses these too
                errors.append((paths["image"], f"{paths['image']}: {int((~np.isfinite(img)).sum())} non-finite "
                                               f"image value(s) (NaN or inf)"))
            elif not ok:
                errors.append((paths["image"], f"{paths['image']}: image values {lo:g}..{hi:g} outside "
                                               f"{'[0, 1]' if img.dtype.kind == 'f' else '0..255'}"))
    size = out["size"]
    for field in ("label", "depth", "normal"):
        if field not in arrays:
            continue
        a, path = arrays[field], paths[field]
        if size and a.shape[:2] != (size[1], size[0]):
            errors.append((path, f"{path}: {field} is {a.shape[0]}x{a.shape[1]} but its image is "
                                 f"{size[1]}x{size[0]}"))
            continue
        if field == "label":
            a = a.astype(np.float64)
            ignore = (a == -1) | (a == 255)
            ok = ignore | ((a >= 0) & (a <= num_classes - 1) & (a == np.round(a)))
            if not ok.all():
                errors.append((path, f"{path}: label values {np.unique(a[~ok])[:10].tolist()} are not -1 (ignore) or "
                                     f"whole numbers in 0..{num_classes - 1}"))
            out["pixels"] += a.size
            out["labelled"] += int((~ignore & ok).sum())
        elif field == "depth":
            if np.any(a < 0):
                errors.append((path, f"{path}: negative depth values (min {float(np.nanmin(a)):g})"))
            out["depth_pixels"] += a.size
            out["depth_valid"] += int((np.isfinite(a) & (a > 0)).sum())
        elif np.any(np.abs(np.nan_to_num(a)) > 1 + 1e-3):
            errors.append((path, f"{path}: normal values outside [-1, 1]"))
    return out, errors


def _validate_npy(name, data_dir, split, num_classes, tasks, workers, max_errors):
    from mtl_keras.data.npy_release import _FIELD_OF_TASK, NPY_RELEASES, list_npy_release

    report = SplitReport(split)
    release = NPY_RELEASES[name]
    folder = os.path.join(data_dir, release.splits.get(split, split))
    if not os.path.isdir(folder):
        report.missing = True
        return report
    fields = ["image"] + [_FIELD_OF_TASK[t] for t in tasks]
    try:
        listing = list_npy_release(name, data_dir, split, fields, num_classes)
    except (OSError, ValueError) as e:
        report.errors.append((folder, _error_message(e)))
        return report
    rows = [{f: listing[f][i] for f in listing} for i in range(len(listing["image"]))]
    report.examples = len(rows)
    stats = _Stats()
    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        for out, errors in pool.map(lambda r: _check_npy_example(r, num_classes), rows):
            if out["size"]:
                report.add_size(*out["size"])
            for k in ("pixels", "labelled", "depth_pixels", "depth_valid"):
                setattr(stats, k, getattr(stats, k) + out[k])
            report.errors.extend(errors)
            if len(report.errors) >= max_errors:
                report.notes.append(f"stopped after {max_errors} errors")
                break
    stats.finish(report)
    return report


# ----------------------------------------------------------------------------------------------------------------
# NYUv2 .mat
# ----------------------------------------------------------------------------------------------------------------


def _validate_nyuv2(data_dir, split, num_classes, tasks, max_errors):
    import h5py

    from mtl_keras.data.nyuv2 import _NEEDS, _path, check_nyuv2_mat, nyuv2_label_table, read_nyuv2_splits

    report = SplitReport(split)
    mat = _path(data_dir, "mat")
    try:
        table, _ = nyuv2_label_table(data_dir, num_classes)
        n, (h, w) = check_nyuv2_mat(mat, tasks)
        indices = read_nyuv2_splits(data_dir, n)["train" if split == "train" else "val"]
    except (OSError, ValueError) as e:
        report.errors.append((mat, _error_message(e)))
        return report
    report.examples = int(indices.size)
    needed = {d for t in tasks for d in _NEEDS.get(t, ())}  # the .mat datasets the reader reads for the tasks
    stats = _Stats()
    with h5py.File(mat, "r") as f:
        for i in indices:
            report.add_size(w, h)
            if "labels" in f and "labels" in needed:
                lab = f["labels"][i]
                if lab.max() >= len(table):
                    report.errors.append((mat, f"{mat}: labels of image {i + 1} (1-based) hold id {int(lab.max())} "
                                               f"outside 0..894"))
                else:
                    stats.pixels += lab.size
                    stats.labelled += int((table[lab] != 255).sum())
            if "depths" in f and "depths" in needed:
                d = f["depths"][i]
                stats.depth_pixels += d.size
                stats.depth_valid += int((np.isfinite(d) & (d > 0)).sum())
            if len(report.errors) >= max_errors:
                break
    stats.finish(report)
    return report


def _validate_prepared(data_dir, split):
    from mtl_keras.data.prepared import _fields, _split_files, read_manifest

    report = SplitReport(split)
    try:
        manifest = read_manifest(data_dir)
        if split not in manifest["splits"]:
            report.missing = True
            return report
        files = _split_files(data_dir, manifest, split)
    except (OSError, ValueError) as e:
        report.errors.append((data_dir, _error_message(e)))
        return report
    import zlib

    from mtl_keras.data.prepared import _FIELDS, _field_shape

    h, w = manifest["image_size"]
    expected = sum(int(np.prod(_field_shape(k, (h, w)))) * np.dtype(_FIELDS[k][0]).itemsize
                   for k in _fields(manifest["tasks"]))
    report.examples = len(files)
    for path in files:
        report.add_size(w, h)
        try:
            with open(path, "rb") as f:
                size = len(zlib.decompress(f.read()))
            if size != expected:
                report.errors.append((path, f"{path}: {size} bytes after decompression, expected {expected}"))
        except (OSError, zlib.error) as e:
            report.errors.append((path, f"{path}: cannot decompress ({e})"))
    return report


def validate_dataset(name, data_dir, splits=None, num_classes=None, tasks=None, workers=4, max_errors=20,
                     depth_target=None):
    """``[SplitReport, ...]`` for ``splits`` (default: all of the format's) of dataset ``name`` in ``data_dir``.

    ``depth_target``: what training will read. CityScapes camera files are only read for ``"metric"`` depth; for
    the default (inverse depth from the disparity) an unreadable camera file is a note, not an error."""
    from mtl_keras.data.datasets import dataset_entry

    entry = dataset_entry(name)
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir} is not a folder (expected the root of the {name} dataset)")
    splits = tuple(splits or DEFAULT_SPLITS[name])
    num_classes = entry.num_classes[0] if num_classes is None else int(num_classes)
    if name != "prepared" and num_classes not in entry.num_classes:
        raise ValueError(f"num_classes must be one of {entry.num_classes} for {name}, got {num_classes}")
    tasks = tuple(entry.tasks if tasks is None else tasks)
    reports = []
    for split in splits:
        if name in ("cityscapes", "synthetic"):
            r = _validate_cityscapes(data_dir, split, num_classes, tasks, workers, max_errors,
                                     cameras_needed=depth_target == "metric")
        elif name in ("cityscapes_npy", "nyuv2_npy"):
            r = _validate_npy(name, data_dir, split, num_classes, tasks, workers, max_errors)
        elif name == "nyuv2":
            r = _validate_nyuv2(data_dir, split, num_classes, tasks, max_errors)
        else:
            r = _validate_prepared(data_dir, split)
        if not r.missing and r.examples == 0 and not r.errors:
            r.errors.append((data_dir, f"empty split {split!r}"))
        reports.append(r)
    required = [r for r in reports if r.split in ("train", "val")]
    for r in required:
        if r.missing:
            r.errors.append((data_dir, f"split {r.split!r} is missing (expected by training)"))
    return reports


def format_report(name, data_dir, reports, max_listed=20):
    """The summary printed by ``prepare_data.py --check``."""
    lines = [f"{name} at {data_dir}", "",
             "| split | examples | sizes (WxH) | labelled px | valid depth px | instances | errors |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in reports:
        if r.missing and not r.errors:
            lines.append(f"| {r.split} | - | (absent) | | | | 0 |")
            continue
        sizes = ", ".join(f"{k} x{v}" for k, v in sorted(r.sizes.items(), key=lambda kv: -kv[1])[:3])
        pct = (lambda v: "-" if v != v else f"{100 * v:.1f}%")
        lines.append(f"| {r.split} | {r.examples} | {sizes or '-'} | {pct(r.labelled)} | {pct(r.depth_valid)} | "
                     f"{r.instances or '-'} | {len(r.errors)} |")
    for r in reports:
        for note in r.notes:
            lines.append(f"note ({r.split}): {note}")
    errors = [(r.split, p, m) for r in reports for p, m in r.errors]
    if errors:
        lines.append("")
        lines.append(f"{len(errors)} problem(s):")
        for split, _, message in errors[:max_listed]:
            lines.append(f"  [{split}] {message}")
        if len(errors) > max_listed:
            lines.append(f"  ... and {len(errors) - max_listed} more")
    else:
        lines.append("")
        lines.append("OK: no problem found.")
    return "\n".join(lines)


def report_json(reports):
    return json.dumps([dataclasses.asdict(r) for r in reports], indent=1, default=str)
