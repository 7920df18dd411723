"""A full, read-only or size-limited disk while writing JSON, weights, a preset or the serving export: the write fails
with one line naming the path and the errno, the previous file or folder stays byte-identical and loadable, and no
temporary or staging file is left (mtl_keras.atomic_files).

The faults are real, made by the kernel: RLIMIT_FSIZE (every write past N bytes fails with EFBIG, for Python, HDF5
and TensorFlow alike), a small tmpfs filled to a few KiB (ENOSPC) and the same tmpfs remounted read-only (EROFS).
The tmpfs needs root (mount(2)); elsewhere those cases are skipped with the reason.
"""

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import pickle
import resource
import shutil
import signal
import sys

import keras
import numpy as np
import pytest

import mtl_keras
from mtl_keras import atomic_files, presets
from mtl_keras.atomic_files import DiskWriteError, atomic_directory, atomic_path, write_json_atomically

DISK_SIZE = "16m"
FREE_LEFT = 64 * 1024  # what a filled disk keeps free: every new write below is larger
FILE_SIZE_LIMIT = 32 * 1024  # RLIMIT_FSIZE: every write below goes past it
FAULTS = {"EFBIG": errno.EFBIG, "ENOSPC": errno.ENOSPC, "EROFS": errno.EROFS}


# ------------------------------------------------------------------------------------------------- the faults
@pytest.fixture
def file_size_limit():
    """``with limit(n):`` makes every write past ``n`` bytes of any file fail in the kernel with EFBIG (SIGXFSZ,
    which would kill the process, ignored); the limit and the handler are restored whatever happens (pytest-xdist
    workers go on with other tests)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    @contextlib.contextmanager
    def limit(nbytes):
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


class SmallDisk:
    """A tmpfs of DISK_SIZE mounted at ``root`` (mount(2) through libc: no subprocess)."""
    MS_RDONLY, MS_REMOUNT, MNT_DETACH = 1, 32, 2

    def __init__(self, root):
        self.root = str(root)
        self.libc = ctypes.CDLL(None, use_errno=True)

    def _mount(self, flags):
        if self.libc.mount(b"tmpfs", os.fsencode(self.root), b"tmpfs", flags, f"size={DISK_SIZE}".encode()) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), self.root)

    def mount(self):
        self._mount(0)

    def read_only(self):
        self._mount(self.MS_REMOUNT | self.MS_RDONLY)

    def fill(self, leave=FREE_LEFT):
        """Fills the disk with a file beside the folders under test, then frees ``leave`` bytes of it."""
        with open(os.path.join(self.root, "filler"), "wb", buffering=0) as f:  # unbuffered: close has nothing to write
            chunk = b"\xff" * (1 << 20)
            try:
                while True:
                    f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
            f.truncate(max(0, f.tell() - leave))

    def unmount(self):
        self.libc.umount2(os.fsencode(self.root), self.MNT_DETACH)  # lazy: an HDF5 handle left open cannot block it


@pytest.fixture
def small_disk(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("a tmpfs disk needs Linux")
    root = tmp_path / "disk"
    root.mkdir()
    disk = SmallDisk(root)
    try:
        disk.mount()
    except OSError as e:
        pytest.skip(f"cannot mount a tmpfs here (root with CAP_SYS_ADMIN needed): {e}")
    try:
        yield disk
    finally:
        disk.unmount()


class Fault:
    """Where the previous files go (``folder``) and ``with fault.injected():`` around the write that must fail."""

    def __init__(self, name, folder, injected):
        self.name, self.errno, self.folder, self.injected = name, FAULTS[name], str(folder), injected


@pytest.fixture(params=list(FAULTS))
def fault(request, tmp_path):
    if request.param == "EFBIG":
        limit = request.getfixturevalue("file_size_limit")
        folder = tmp_path / "out"
        folder.mkdir()
        yield Fault("EFBIG", folder, lambda: limit(FILE_SIZE_LIMIT))
        return
    disk = request.getfixturevalue("small_disk")
    folder = os.path.join(disk.root, "out")
    os.mkdir(folder)

    @contextlib.contextmanager
    def injected():
        disk.fill() if request.param == "ENOSPC" else disk.read_only()
        yield

    yield Fault(request.param, folder, injected)


# ------------------------------------------------------------------------------------------------- the checks
def tree_digest(folder):
    """{relative path: sha256} of every file under ``folder`` (and every folder, as None): what must not change."""
    digest = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            digest[os.path.relpath(os.path.join(root, name), folder)] = None
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                digest[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(f.read()).hexdigest()
    return digest


def check_error(error, path, fault):
    message = str(error)
    assert isinstance(error, DiskWriteError) and isinstance(error, OSError)
    assert "\n" not in message
    assert message.startswith(f"cannot write {path}"), message
    assert f"[Errno {fault.errno}]" in message and errno.errorcode[fault.errno] in message, message
    assert message.endswith(f"the previous {path} is kept"), message
    assert error.errno == fault.errno and error.filename == str(path)


def fail_write(fault, write):
    before = tree_digest(fault.folder)
    assert before  # something to keep
    with pytest.raises(DiskWriteError) as error, fault.injected():
        write()
    assert tree_digest(fault.folder) == before  # byte-identical, nothing added (no temporary, no staging folder)
    return error.value


# ----------------------------------------------------------------------------------------------------- JSON
def test_a_failed_json_write_keeps_the_previous_file(fault):
    path = os.path.join(fault.folder, "results.json")
    with open(path, "w") as f:
        f.write('{"previous": true}')
    big = {"values": list(range(100_000))}  # ~600 KB: past the size limit and the free space

    error = fail_write(fault, lambda: write_json_atomically(path, big))

    check_error(error, path, fault)
    with open(path) as f:
        assert json.load(f) == {"previous": True}


# -------------------------------------------------------------------------------------------------- weights
def _dense(units, seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(units)])  # 64 * 512 floats: 130 KB


def test_failed_weights_keep_the_previous_weights_file(fault):
    path = os.path.join(fault.folder, "model.weights.h5")
    previous = _dense(512, seed=1)
    previous.save_weights(path)
    expected = [w.copy() for w in previous.get_weights()]
    newer = _dense(512, seed=2)

    # save_weights_file, not atomic_path + model.save_weights: HDF5 meeting the fault itself segfaults on close
    error = fail_write(fault, lambda: presets.save_weights_file(newer, path))

    check_error(error, path, fault)
    reloaded = _dense(512, seed=3)
    reloaded.load_weights(path)
    for got, want in zip(reloaded.get_weights(), expected):
        np.testing.assert_array_equal(got, want)


def test_weights_written_in_memory_load_like_keras_own_file(tmp_path):
    model = _dense(8, seed=4)
    with atomic_path(tmp_path / "m.weights.h5") as tmp:
        assert tmp.endswith(".weights.h5") and os.path.dirname(tmp) == str(tmp_path)
        model.save_weights(tmp)  # Keras' own writer: the reference
    presets.save_weights_file(model, tmp_path / "ours.weights.h5")
    for name in ("m.weights.h5", "ours.weights.h5"):
        reloaded = _dense(8, seed=5)
        reloaded.load_weights(tmp_path / name)
        for got, want in zip(reloaded.get_weights(), model.get_weights()):
            np.testing.assert_array_equal(got, want)
    assert sorted(os.listdir(tmp_path)) == ["m.weights.h5", "ours.weights.h5"]


# --------------------------------------------------------------------------------------------------- preset
def _small_unet():
    return mtl_keras.build_model("mt_unet", input_shape=(32, 64, 3), base_filters=2)  # 250 KB of weights


def test_a_failed_preset_save_keeps_the_previous_preset(fault):
    model = _small_unet()
    preset_dir = os.path.join(fault.folder, "preset")
    model.save_to_preset(preset_dir, description="previous")
    expected = [w.copy() for w in model.get_weights()]
    model.set_weights([w + 1.0 for w in expected])

    error = fail_write(fault, lambda: model.save_to_preset(preset_dir, description="newer", overwrite=True))

    check_error(error, preset_dir, fault)
    loaded = mtl_keras.load_model(preset_dir)  # checks the weights' sha256 first
    for got, want in zip(loaded.get_weights(), expected):
        np.testing.assert_array_equal(got, want)
    with open(os.path.join(preset_dir, "metadata.json")) as f:
        assert json.load(f)["description"] == "previous"


# --------------------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def previous_export(tmp_path_factory):
    """A small model and its serving export, written once (copied into each test's folder)."""
    pytest.importorskip("tensorflow")
    from mtl_keras import export

    model = _small_unet()
    folder = str(tmp_path_factory.mktemp("export") / "export")
    export.export_saved_model(model, folder)
    return model, folder


@pytest.mark.tf_only
@pytest.mark.parametrize("fault", [pytest.param("EFBIG", marks=pytest.mark.slow), "ENOSPC",  # 3 to 5 s each: the
                                   pytest.param("EROFS", marks=pytest.mark.slow)], indirect=True)  # export traces
def test_a_failed_serving_export_keeps_the_previous_export_loadable(fault, previous_export):
    import tensorflow as tf

    from mtl_keras import export

    model, source = previous_export
    path = os.path.join(fault.folder, "export")
    shutil.copytree(source, path)

    error = fail_write(fault, lambda: export.export_saved_model(model, path))

    check_error(error, path, fault)
    served = tf.saved_model.load(path)
    assert {"serving_default", "serve", "serve_uint8"} <= set(served.signatures)
    outputs = served.signatures["serving_default"](images=tf.zeros([1, 32, 64, 3]))
    assert outputs["semantic_logits"].shape[1:3] == (32, 64)


@pytest.mark.tf_only
def test_the_export_never_replaces_a_folder_that_is_not_a_saved_model(previous_export, tmp_path):
    from mtl_keras import export

    model, _ = previous_export
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a SavedModel folder"):
        export.export_saved_model(model, str(tmp_path / "mine"))
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


# ------------------------------------------------------------------------------------------ the swap itself
def test_other_errors_propagate_unchanged_and_leave_nothing(tmp_path):
    (tmp_path / "a.json").write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_path(tmp_path / "a.json") as tmp:
            open(tmp, "w").write("half")
            1 / 0
    with pytest.raises(KeyError):
        with atomic_directory(tmp_path / "folder") as staging:
            open(os.path.join(staging, "x"), "w").write("half")
            raise KeyError("x")
    with pytest.raises(TypeError):  # not JSON: raised before anything is written
        write_json_atomically(tmp_path / "a.json", {"x": object()})
    assert sorted(os.listdir(tmp_path)) == ["a.json"] and (tmp_path / "a.json").read_text() == "old"


def test_a_write_to_a_new_path_says_nothing_was_there(tmp_path, file_size_limit):
    path = str(tmp_path / "new.json")
    with pytest.raises(DiskWriteError) as error, file_size_limit(FILE_SIZE_LIMIT):
        write_json_atomically(path, list(range(100_000)))
    assert str(error.value) == (f"cannot write {path}: [Errno 27] File too large (EFBIG); there was no file before "
                                f"and none is left")
    assert os.listdir(tmp_path) == []
    again = pickle.loads(pickle.dumps(error.value))
    assert (str(again), again.errno, again.filename) == (str(error.value), errno.EFBIG, path)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_a_folder_is_swapped_whole(tmp_path, monkeypatch, exchange):
    if not exchange:  # the portable swap (no renameat2: not Linux, or NFS)
        monkeypatch.setattr(atomic_files, "_RENAMEAT2", None)
    target = tmp_path / "folder"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as staging:
        with open(os.path.join(staging, "new.txt"), "w") as f:
            f.write("new")
    assert sorted(os.listdir(tmp_path)) == ["folder"] and os.listdir(target) == ["new.txt"]
    assert (target / "new.txt").read_text() == "new"


def test_a_crash_between_the_two_renames_is_recovered(tmp_path):
    # the state a crash leaves between "folder -> .folder.old" and "staging -> folder": the old one is complete
    old = tmp_path / ".folder.old"
    old.mkdir()
    (old / "weights").write_bytes(b"complete")
    assert atomic_files.recover_directory(tmp_path / "folder") == str(tmp_path / "folder")
    assert sorted(os.listdir(tmp_path)) == ["folder"] and (tmp_path / "folder" / "weights").read_bytes() == b"complete"
    # after the swap, before the old one was removed: the new one stays, the old one goes (on the next write)
    old.mkdir()
    (old / "weights").write_bytes(b"older")
    with atomic_directory(tmp_path / "folder") as staging:
        with open(os.path.join(staging, "weights"), "wb") as f:
            f.write(b"newest")
    assert sorted(os.listdir(tmp_path)) == ["folder"] and (tmp_path / "folder" / "weights").read_bytes() == b"newest"


# ------------------------------------------------------------------------------------- backups and checkpoints
def test_a_failed_backup_or_checkpoint_stops_the_run_and_keeps_the_previous_ones(fault):
    """The run's own writers (checkpointing.EpochBackup at an epoch's end and mid-epoch, checkpointing.LastWeights)
    under the fault: training stops with the one-line error, and what epoch 1 wrote still restores."""
    from mtl_keras import checkpointing
    from tests.test_fault_tolerance import dataset, tiny_trainer

    backup_dir = os.path.join(fault.folder, "backup")
    last = os.path.join(fault.folder, "last.weights.h5")
    trainer = tiny_trainer()
    trainer.fit(dataset().repeat(), epochs=1, steps_per_epoch=1, verbose=0,
                callbacks=[checkpointing.EpochBackup(backup_dir), checkpointing.LastWeights(last)])
    saved = [w.copy() for w in trainer.get_weights()]

    def epoch_2(callback):
        return lambda: trainer.fit(dataset().repeat(), epochs=2, initial_epoch=1, steps_per_epoch=1, verbose=0,
                                   callbacks=[callback])

    def check(error, path):  # a new file (the backups) or one replaced (the checkpoint)
        assert str(error).startswith(f"cannot write {os.path.abspath(path)}: [Errno {fault.errno}] "), str(error)
        assert "\n" not in str(error) and error.errno == fault.errno

    check(fail_write(fault, epoch_2(checkpointing.EpochBackup(backup_dir))),
          os.path.join(backup_dir, "epoch-00002.weights.h5"))
    check(fail_write(fault, epoch_2(checkpointing.LastWeights(last))), last)
    mid_epoch = checkpointing.EpochBackup(backup_dir)  # a preempted run's backup: the same writer
    mid_epoch.set_model(trainer)
    check(fail_write(fault, lambda: mid_epoch.write(1, step=1, metric_states=[])),
          os.path.join(backup_dir, "epoch-00001-step-000001.weights.h5"))

    restored = tiny_trainer()
    assert checkpointing.restore(restored, backup_dir) == 1
    reloaded = tiny_trainer()
    reloaded.load_weights(last)
    for model in (restored, reloaded):
        for got, want in zip(model.get_weights(), saved):
            np.testing.assert_array_equal(got, want)
