"""What every reader checks with: PNG and ``.npy`` headers (a few dozen bytes per file, so a whole split is checked
before training), the pairing of images with their files, argument checks, and the ``--check`` report of a split.
Every error names the file and says what was expected."""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import struct
import tokenize
import zlib
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from mtl_keras.tasks import TASK_NAMES, TASKS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_COLOR_TYPES = {0: "grey", 2: "RGB", 3: "palette", 4: "grey+alpha", 6: "RGBA"}


class DataError(ValueError):
    """A data file that does not hold what its format defines (the message names the file)."""


class PngInfo(collections.namedtuple("PngInfo", "width height bit_depth color_type")):
    __slots__ = ()

    def describe(self):
        return f"{self.bit_depth}-bit {_COLOR_TYPES.get(self.color_type, f'type-{self.color_type}')} " \
               f"{self.width}x{self.height}"


NpyInfo = collections.namedtuple("NpyInfo", "shape dtype fortran_order offset")


def _truncated_png(path, size):
    return DataError(f"{path} is a truncated or corrupt PNG: it does not end with the IEND chunk ({size} bytes; "
                     f"re-extract or re-download it)")


def png_info(path) -> PngInfo:
    """The PNG signature, IHDR and final IEND chunk of ``path`` (45 bytes); DataError if not a PNG or truncated."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(33)
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size >= 12:
            f.seek(size - 12)
        tail = f.read(12)
    if len(head) < 33 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DataError(f"{path} is not a PNG file (expected the PNG signature and an IHDR chunk; the file has "
                        f"{size} bytes)")
    # the IHDR's own CRC (in the 33 bytes read): a flipped bit in the size, depth or colour type would otherwise pass
    if head[8:12] != b"\x00\x00\x00\x0d" or zlib.crc32(head[12:29]) != struct.unpack(">I", head[29:33])[0]:
        raise DataError(f"{path} is a corrupt PNG: its IHDR chunk (size, bit depth, colour type) fails its CRC "
                        f"(re-extract or re-download it)")
    width, height, bit_depth, color_type = struct.unpack(">IIBB", head[16:26])
    if tail != PNG_IEND:
        raise _truncated_png(path, size)
    return PngInfo(width, height, bit_depth, color_type)


JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"


def check_jpeg_end(path, data=None):
    """DataError unless the JPEG ``path`` (or its bytes ``data``) starts with SOI and ends with the EOI marker
    (trailing zero padding allowed): libjpeg, and so OpenCV, decodes a truncated JPEG without an error, greying out
    the missing part."""
    path = os.fspath(path)
    if data is None:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(size - 64, 0))
            tail = f.read()
    else:
        head, tail, size = data[:2], data[-64:], len(data)
    if head != JPEG_SOI:
        raise DataError(f"{path} is not a JPEG file (expected the JPEG SOI marker FFD8; the file has {size} bytes)")
    if not tail.rstrip(b"\x00").endswith(JPEG_EOI):
        raise DataError(f"{path} is a truncated or corrupt JPEG: it does not end with the EOI marker FFD9 ({size} "
                        f"bytes; re-export or re-download it)")


def check_png(path, what, bit_depth=None, grey=False, size=None) -> PngInfo:
    """:func:`png_info` plus the expectations of the format: ``bit_depth`` (8 or 16), single channel (``grey``)
    and ``size`` ((width, height), e.g. that of the image the file belongs to)."""
    info = png_info(path)
    if bit_depth is not None and info.bit_depth != bit_depth:
        hint = ""
        if bit_depth == 16:
            hint = (" (an 8-bit copy truncates the values: CityScapes stores disparity and instanceIds as 16-bit "
                    "PNGs; tensorflow-datasets and some converters decode them as 8-bit)")
        raise DataError(f"{path}: expected a {bit_depth}-bit {what} PNG, got a {info.describe()} PNG{hint}")
    if grey and info.color_type != 0:
        raise DataError(f"{path}: expected a single-channel (grey) {what} PNG, got a {info.describe()} PNG "
                        f"(a colour rendering such as *_gtFine_color.png is not a label map)")
    if size is not None and (info.width, info.height) != tuple(size):
        raise DataError(f"{path}: {what} is {info.width}x{info.height} but its image is {size[0]}x{size[1]}")
    return info


def check_headers(files, expect):
    """Reads the header of every PNG of ``files`` (complete, grey with ``expect[key] = (what, bit depth)``, the size of
    the image when it is a PNG); DataError naming the first bad file. Returns ``{(width, height): count}`` of the
    PNG images."""
    sizes = collections.Counter()
    for entry in files:
        size = None
        if entry["image"].lower().endswith(".png"):
            info = check_png(entry["image"], "image")
            sizes[size := (info.width, info.height)] += 1
        elif entry["image"].lower().endswith((".jpg", ".jpeg")):
            check_jpeg_end(entry["image"])
        for key, (what, depth) in expect.items():
            if key in entry:
                check_png(entry[key], what, bit_depth=depth, grey=True, size=size)
    return dict(sizes)


def decode_png_file(path, dtype="uint8"):
    """Decodes a PNG with TensorFlow, as the pipeline does; :class:`DataError` naming the file on failure."""
    import tensorflow as tf

    try:
        return tf.io.decode_png(tf.io.read_file(os.fspath(path)), dtype=getattr(tf, dtype)).numpy()
    except tf.errors.OpError as e:
        raise DataError(f"{path}: cannot decode the PNG ({e.message.strip().splitlines()[0]}); the file is "
                        f"corrupt: re-extract or re-download it") from None


def imread_png(path, flags=cv2.IMREAD_UNCHANGED):
    """A whole PNG decoded with OpenCV (no TensorFlow); DataError naming the file when truncated or corrupt."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 45 or data[-12:] != PNG_IEND:
        raise _truncated_png(path, len(data))
    array = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if array is None:
        raise DataError(f"{path}: OpenCV cannot decode the PNG; the file is corrupt: re-extract or re-download it")
    return array


def imread_label(path, what, bit_depth, size=None):
    """A single-channel ``bit_depth``-bit label PNG (:func:`imread_png`) of ``size`` (width, height) if given."""
    array = imread_png(path)
    if array.dtype != (np.uint8 if bit_depth == 8 else np.uint16) or array.ndim != 2:
        raise DataError(f"{path}: expected a single-channel {bit_depth}-bit {what} PNG, got {array.dtype} with shape "
                        f"{array.shape}")
    if size is not None and array.shape[::-1] != tuple(size):
        raise DataError(f"{path}: {what} is {array.shape[1]}x{array.shape[0]} but its image is {size[0]}x{size[1]}")
    return array


def npy_info(path) -> NpyInfo:
    """The header of a numeric ``.npy`` file, checked against the file size (DataError if truncated)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except (ValueError, OSError, SyntaxError, TypeError, RecursionError, tokenize.TokenError) as e:
            # the header is a Python literal: numpy parses it with ast, then (for Python 2 headers) tokenize
            raise DataError(f"{path} is not a readable .npy file ({' '.join(str(e).split())[:200]})") from None
        offset = f.tell()
        f.seek(0, os.SEEK_END)
        size = f.tell()
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf":
        raise DataError(f"{path}: expected a numeric (bool, int or float) array, got dtype {dtype}")
    if any(d < 0 for d in shape):
        raise DataError(f"{path} is corrupt: its header says shape {shape}")
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: a corrupt header's huge shape cannot overflow
    if size < offset + nbytes:
        raise DataError(f"{path} is truncated: its header says {shape} {dtype} ({nbytes} bytes of data) but the "
                        f"file has {size - offset} bytes after the header")
    if size > offset + nbytes:  # np.save writes exactly the data: a corrupt shape or offset would read a wrong array
        raise DataError(f"{path} is corrupt: its header says {shape} {dtype} ({nbytes} bytes of data) but the file "
                        f"has {size - offset} bytes after the header")
    return NpyInfo(tuple(shape), dtype, bool(fortran), int(offset))


ALL_TASKS = TASK_NAMES


def check_image_size(image_size, name="image_size"):
    try:
        h, w = (int(v) for v in image_size)
        ok = h > 0 and w > 0 and all(float(v) == int(v) for v in image_size)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be (height, width) with positive ints, got {image_size!r}")
    return h, w


def check_tasks(tasks, available, dataset):
    """``tasks`` as a tuple; ValueError naming the dataset when a task is unknown or not in the data."""
    if isinstance(tasks, str):
        tasks = tuple(t.strip() for t in tasks.split(",") if t.strip())
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {available} for {dataset}, got {tasks!r}")
    missing = [t for t in tasks if t not in available]
    if missing:
        example = ",".join(t for t in tasks if t in available) or available[0]
        raise ValueError(f"{dataset} has no {', '.join(missing)} targets: its tasks are {', '.join(available)} "
                         f"(got tasks={tasks!r}; e.g. --tasks {example})")
    return tasks


def check_num_classes(num_classes, valid, dataset):
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or int(num_classes) not in valid:
        raise ValueError(f"num_classes must be one of {tuple(valid)} for {dataset}, got num_classes={num_classes!r}")
    return int(num_classes)


def _problem(problems, path, message):
    if problems is None:
        raise FileNotFoundError(message)
    problems.append((path, message))


def pair_files(images, found, expected, expected_image, problems=None):
    """The keys of ``images`` (``{key: image path}``) that have a file in every ``found[field]`` (``{key: path}``),
    sorted. An image without its file (``expected(field, key)``) or a file without its image
    (``expected_image(key)``) raises FileNotFoundError naming both, or is collected in ``problems`` as
    ``(path, message)``."""
    incomplete = set()
    for field, files in found.items():
        for key in sorted(set(images) - set(files)):
            path = expected(field, key)
            _problem(problems, path, f"{path}: missing {field} file (image {images[key]} has no {field} file)")
            incomplete.add(key)
        for key in sorted(set(files) - set(images)):
            _problem(problems, files[key], f"{files[key]}: {field} file without an image (it has no image at "
                                           f"{expected_image(key)})")
    return sorted(set(images) - incomplete)


@dataclasses.dataclass
class SplitReport:
    """What ``validate_split`` found in one split (``prepare_data.py --check``)."""

    split: str
    examples: int = 0
    sizes: dict = dataclasses.field(default_factory=collections.Counter)  # "WxH" -> count
    pixels: int = 0
    labelled_pixels: int = 0  # pixels with a (non-ignored) label
    depth_pixels: int = 0
    valid_depth_pixels: int = 0
    instances: int = 0
    errors: list = dataclasses.field(default_factory=list)  # (path, message)
    notes: list = dataclasses.field(default_factory=list)
    missing: bool = False  # the split does not exist (not an error for optional splits)

    def add(self, counts):
        """Adds one example's ``counts``: ``size`` (w, h) and any of the counters above."""
        for key, value in counts.items():
            if key == "size":
                if value:
                    self.sizes["{}x{}".format(*value)] += 1
            elif hasattr(self, key):
                setattr(self, key, getattr(self, key) + value)


def error_message(e):
    return str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"


def check_rows(report, rows, check, workers=4, max_errors=20):
    """Runs ``check(row) -> (counts, [(path, message)])`` on every row in threads into ``report``, up to
    ``max_errors``; returns the counts of each row examined."""
    report.examples = len(rows)
    seen = []
    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        for counts, errors in pool.map(check, rows):
            report.add(counts)
            report.errors.extend(errors)
            seen.append(counts)
            if len(report.errors) >= max_errors:
                report.notes.append(f"stopped after {max_errors} errors")
                break
    return seen
