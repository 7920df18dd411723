"""One writer per run folder (mtl_keras/run_lock.py): a second process is refused in one line naming the holder, a
lock left by a dead process on this host is taken over with a warning, one from another host never is, and the lock
is gone after the run, also after an exception."""

import contextlib
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading

import pytest

from mtl_keras.run_lock import LOCK_NAME, RunLock, RunLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "experiments", "train.py")
MODULE = os.path.join(REPO, "mtl_keras", "run_lock.py")
HOST = socket.gethostname()
HAS_PROC = os.path.exists(f"/proc/{os.getpid()}/stat")

# Another process holding the lock: run_lock.py loaded on its own (it needs only the standard library, and the
# package's __init__ would load TensorFlow for seconds). It holds the lock until its stdin closes.
HOLDER = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location('run_lock_holder', {MODULE!r})\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "with module.RunLock(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.read()\n"
)


@contextlib.contextmanager
def _held_by_another_process(folder):
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        yield process
    finally:
        process.stdin.close()
        process.wait(timeout=60)


def _write_lock(folder, **record):
    folder.mkdir(parents=True, exist_ok=True)
    data = json.dumps(dict(started="2026-01-02 03:04:05 UTC", command="python experiments/train.py", **record))
    (folder / LOCK_NAME).write_text(data)
    return data


def _lock_record(folder):
    return json.loads((folder / LOCK_NAME).read_text())


def test_a_second_lock_on_a_held_folder_is_refused_in_one_line_naming_the_holder(tmp_path):
    folder = tmp_path / "run"
    with RunLock(folder) as first:
        record = _lock_record(folder)
        assert record["pid"] == os.getpid() and record["host"] == HOST and "started" in record
        assert first.holder()["pid"] == os.getpid()
        before = (folder / LOCK_NAME).read_bytes()
        with pytest.raises(RunLockedError) as refused:
            RunLock(folder, name="--output_dir").acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(f"--output_dir {folder} is in use by another run: pid {os.getpid()} on host {HOST} "
                                  f"since {record['started']}"), message
        assert isinstance(refused.value, OSError)  # the entry points report OSError in one line with status 2
        assert refused.value.holder["pid"] == os.getpid()
        assert (folder / LOCK_NAME).read_bytes() == before  # the holder's lock is untouched


def test_release_removes_the_lock_and_the_folders_it_created(tmp_path):
    folder = tmp_path / "runs" / "one"
    lock = RunLock(folder)
    assert lock.holder() is None
    lock.acquire()
    assert (folder / LOCK_NAME).is_file() and lock.held
    lock.release()
    assert not lock.held
    assert not (tmp_path / "runs").exists()  # a run refused or failing early leaves no folder behind
    with RunLock(folder):
        (folder / "metrics.json").write_text("{}")  # the run's outputs
    assert os.listdir(folder) == ["metrics.json"]


def test_an_exception_inside_the_block_releases_the_lock(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(KeyError, match="boom"):
        with RunLock(folder):
            raise KeyError("boom")
    assert os.listdir(folder) == []
    with RunLock(folder):  # free again
        pass


@pytest.mark.subprocess
def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                              check=True, timeout=60)
    dead_pid = int(finished.stdout)
    folder = tmp_path / "run"
    _write_lock(folder, host=HOST, pid=dead_pid)
    with caplog.at_level(logging.WARNING, logger="mtl_keras"):
        with RunLock(folder):
            assert _lock_record(folder)["pid"] == os.getpid()
    assert f"pid {dead_pid} on host {HOST}" in caplog.text and "gone" in caplog.text
    assert not (folder / LOCK_NAME).exists() and os.listdir(folder) == []  # no stale copy left aside


@pytest.mark.skipif(not HAS_PROC, reason="process start times come from /proc (Linux)")
def test_a_lock_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path, caplog):
    # Our own pid is alive, but it was not this process that wrote the lock: its start time differs (pid reuse).
    folder = tmp_path / "run"
    _write_lock(folder, host=HOST, pid=os.getpid(), pid_start_ticks=1)
    with caplog.at_level(logging.WARNING, logger="mtl_keras"):
        with RunLock(folder):
            assert _lock_record(folder)["pid_start_ticks"] != 1
    assert "now another process" in caplog.text


@pytest.mark.skipif(not os.path.exists("/proc/sys/kernel/random/boot_id"), reason="Linux boot id")
def test_a_lock_from_before_this_host_restarted_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    _write_lock(folder, host=HOST, pid=os.getpid(), boot_id="00000000-0000-0000-0000-000000000000")
    with caplog.at_level(logging.WARNING, logger="mtl_keras"):
        with RunLock(folder):
            pass
    assert "restarted" in caplog.text


def test_a_lock_held_from_another_host_is_refused_and_never_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    # A pid that is alive here says nothing about the other host; one that is dead here neither.
    data = _write_lock(folder, host="node-17.cluster.example", pid=os.getpid())
    with caplog.at_level(logging.WARNING, logger="mtl_keras"):
        with pytest.raises(RunLockedError) as refused:
            RunLock(folder).acquire()
    message = str(refused.value)
    assert "\n" not in message
    assert f"pid {os.getpid()} on host node-17.cluster.example since 2026-01-02 03:04:05 UTC" in message
    assert f"delete {folder / LOCK_NAME}" in message  # how to free the folder when that host is gone
    assert (folder / LOCK_NAME).read_text() == data and caplog.text == ""


def test_an_unreadable_lock_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_bytes(b"\x00\xffnot a lock")
    with pytest.raises(RunLockedError, match=f"locked by {folder / LOCK_NAME}, which cannot be read"):
        RunLock(folder).acquire()
    assert (folder / LOCK_NAME).read_bytes() == b"\x00\xffnot a lock"


def test_a_full_disk_while_writing_the_lock_is_one_line_naming_the_lock_and_the_errno(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    folder = tmp_path / "runs" / "one"
    with pytest.raises(OSError) as failed:
        RunLock(folder, name="--output_dir").acquire()
    assert str(failed.value) == (f"--output_dir {folder}: cannot write its lock {folder / LOCK_NAME}: No space left on "
                                 f"device (ENOSPC).")
    assert failed.value.errno == errno.ENOSPC and not isinstance(failed.value, RunLockedError)
    assert os.listdir(tmp_path) == []  # neither the lock, its temporary file nor the folders it made are left


def test_a_folder_that_is_a_file_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    with pytest.raises(ValueError, match=f"^--output_dir {path} is a file; expected a folder"):
        RunLock(path, name="--output_dir").acquire()
    assert path.read_text() == "mine"


@pytest.mark.skipif(not HAS_PROC, reason="process start times come from /proc (Linux)")
def test_of_many_lockers_racing_over_a_stale_lock_exactly_one_wins(tmp_path):
    # Threads of one process: the winner's lock names a live pid (ours), so every other locker must be refused,
    # whichever moment it found the stale lock at.
    for round_ in range(5):
        folder = tmp_path / f"run{round_}"
        _write_lock(folder, host=HOST, pid=os.getpid(), pid_start_ticks=1, boot_id="0")
        barrier, won, refused = threading.Barrier(6), [], []

        def take():
            lock = RunLock(folder)
            barrier.wait()
            try:
                lock.acquire()
                won.append(lock)
            except RunLockedError:
                refused.append(lock)

        threads = [threading.Thread(target=take) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(won) == 1 and len(refused) == 5, (won, refused)
        assert _lock_record(folder)["pid_start_ticks"] != 1
        won[0].release()
        assert os.listdir(folder) == []


@pytest.mark.subprocess
def test_a_lock_held_by_another_process_is_refused_until_it_ends(tmp_path):
    folder = tmp_path / "run"
    with _held_by_another_process(folder) as holder:
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} on host {HOST} since"):
            RunLock(folder).acquire()
    assert holder.returncode == 0 and not (folder / LOCK_NAME).exists()  # released by a normal exit
    with RunLock(folder):
        pass


@pytest.mark.subprocess
def test_train_py_refuses_an_output_dir_in_use_in_one_line_with_status_2(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "MTL_KERAS_DEBUG"}
    with _held_by_another_process(out) as holder:
        before = (out / LOCK_NAME).read_bytes()
        result = subprocess.run([sys.executable, TRAIN, "--output_dir", str(out), "--steps", "1"], capture_output=True,
                                text=True, timeout=300, cwd=str(tmp_path), env=env)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, result.stderr[-2000:]
        assert lines[0].startswith(f"train.py: error: --output_dir {out} is in use by another run: pid {holder.pid} "
                                   f"on host {HOST} since "), lines
        assert len(lines) <= 2 and "Traceback" not in result.stderr, lines
        assert os.listdir(out) == [LOCK_NAME] and (out / LOCK_NAME).read_bytes() == before
        assert not (tmp_path / "data").exists()  # refused before the synthetic data were generated
