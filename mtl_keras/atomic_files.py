"""Atomic writes: a file or folder is replaced whole or not at all, and a failed write is one line naming it.

Every writer of the package that replaces something a later run reads back (presets, the serving export, backups and
checkpoints, manifests, JSON results) writes through this module:

- :func:`atomic_path` yields a temporary path in the same folder that ends with the final name (Keras insists on
  ``.weights.h5`` / ``.keras`` suffixes); the block writes there with any library but HDF5 (see there), then the
  file is fsynced, renamed over the final path (``os.replace``: atomic on POSIX and Windows) and the folder fsynced.
  :func:`write_bytes_atomically`, :func:`write_text_atomically` and :func:`write_json_atomically` are the common
  cases.
- :func:`atomic_directory` yields a staging folder next to the final one; on success every file in it is fsynced and
  it is swapped in. On Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` (the final path always names a complete
  folder); elsewhere, or on a filesystem without it (NFS), the old folder is renamed to ``.NAME.old``, the staging
  folder to ``NAME``, then ``.NAME.old`` is removed. A crash between those two renames leaves no ``NAME`` but a
  complete ``.NAME.old``: :func:`recover_directory` (called by the next :func:`atomic_directory` on that path; a
  reader that finds ``NAME`` missing may call it too) renames it back.
- A write that fails (``OSError``, HDF5's errors through h5py, TensorFlow's file errors, which carry the errno only
  in their text) removes the temporary file or staging folder and raises :class:`DiskWriteError`, one line:
  ``cannot write PATH: [Errno 28] No space left on device (ENOSPC); the previous PATH is kept``. Other exceptions
  (a bug, a bad value) propagate unchanged, after the same clean-up.

Temporary names start with :data:`TEMP_PREFIX` (``.tmp-PID-RANDOM-NAME``): hidden, never the name a reader opens, so
nothing half-written is ever read back; only a process killed mid-write (SIGKILL, power loss) leaves one behind.

Foundation layer: the standard library only.
"""

import contextlib
import ctypes
import errno as errno_codes
import json
import os
import re
import secrets
import shutil
import sys

TEMP_PREFIX = ".tmp-"
_TEMPORARY_NAME = re.compile(re.escape(TEMP_PREFIX) + r"\d+-[0-9a-f]{8}-(.+)")

# The errnos a write fails with when the disk, quota or filesystem refuses it; TensorFlow's errors (and some of h5py's)
# carry them only as their strerror text.
_WRITE_ERRNOS = tuple(getattr(errno_codes, name) for name in ("ENOSPC", "EROFS", "EFBIG", "EDQUOT", "EIO", "EACCES",
                                                              "EPERM") if hasattr(errno_codes, name))
_ERRNO_TEXTS = {os.strerror(code).lower(): code for code in _WRITE_ERRNOS}
_ERRNO_IN_TEXT = re.compile(r"errno\s*=\s*(\d+)")  # h5py / HDF5: "... errno = 28, error message = ..."
_H5_FILE_IN_TEXT = re.compile(r"\b(?:file)?name = '([^']+)'")  # HDF5: "filename = '/x/y.h5'" / "name = '/x/y.h5'"


class DiskWriteError(OSError):
    """A write that the disk or filesystem refused (full, read-only, over a size limit or quota); nothing of it is
    left behind and the previous file or folder is kept. ``errno``: the cause (None where unknown); ``filename``:
    the final path that was to be written; ``strerror``: the cause in words."""

    def __init__(self, message, errno=None, filename=None, strerror=None):
        super().__init__(message)
        self.errno = errno
        self.filename = filename
        self.strerror = strerror

    def __str__(self):  # OSError's own would print "[Errno N] strerror: 'filename'"; the message says more
        return self.args[0]

    def __reduce__(self):  # pickles (multiprocessing, pytest-xdist) with its attributes
        return type(self), (self.args[0], self.errno, self.filename, self.strerror)


# ------------------------------------------------------------------------------------------------- what failed
def write_failure_errno(exc):
    """``(is_a_write_failure, errno or None)`` of an exception raised while writing: any ``OSError``; h5py's
    ``RuntimeError`` and TensorFlow's errors when their text carries an errno or a disk error's strerror."""
    text = str(exc)
    found = _ERRNO_IN_TEXT.search(text)
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if not isinstance(code, int) or code <= 0:
        code = int(found.group(1)) if found else None
    if code is None:
        lowered = text.lower()
        code = next((c for t, c in _ERRNO_TEXTS.items() if t in lowered), None)
    if isinstance(exc, OSError):
        return True, code
    module = type(exc).__module__ or ""
    if isinstance(exc, RuntimeError) or module.startswith(("tensorflow", "h5py")):
        return code is not None, code
    return False, None


def _failed_file(exc, temporary):
    """The path of the file that failed, if the exception names one: OSError.filename, HDF5's ``filename = '...'``,
    or a path under ``temporary`` in the text (TensorFlow: ``/x/variables/variables_temp/part-...; No space ...``)."""
    name = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    if isinstance(name, (str, bytes, os.PathLike)):
        return os.fsdecode(name)
    text = str(exc)
    match = _H5_FILE_IN_TEXT.search(text)
    if match:
        return match.group(1)
    match = re.search(re.escape(temporary) + r"[^\s;'\",)\]]*", text)
    return match.group(0) if match else None


def _describe(code, exc):
    if code:
        return f"[Errno {code}] {os.strerror(code)} ({errno_codes.errorcode.get(code, '?')})"
    if isinstance(exc, DiskWriteError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _kept(path, existed, kind):
    return f"the previous {path} is kept" if existed else f"there was no {kind} before and none is left"


def disk_write_error(exc, path, temporary, existed, kind="file"):
    """The :class:`DiskWriteError` for ``exc``, raised while writing ``temporary`` (the temporary file or staging
    folder) for ``path``; None if ``exc`` is not a write failure (a bug or a bad value: it propagates unchanged)."""
    is_write, code = write_failure_errno(exc)
    if not is_write:
        return None
    failed = _failed_file(exc, temporary)
    where, detail = path, ""
    if failed is not None:
        failed = os.path.abspath(failed)
        if failed.startswith(temporary + os.sep):  # a file inside the staging folder: named at its final place
            inside = os.path.relpath(failed, temporary)
            folder, name = os.path.split(inside)
            match = _TEMPORARY_NAME.fullmatch(name)  # the temporary file of an atomic_path in the staging folder
            where = os.path.join(path, folder, match.group(1) if match else name)
        elif failed != temporary:
            detail = f" ({failed})"
    return DiskWriteError(f"cannot write {where}: {_describe(code, exc)}{detail}; {_kept(path, existed, kind)}",
                          errno=code, filename=path, strerror=os.strerror(code) if code else _describe(code, exc))


def _temporary_name(path):
    folder, name = os.path.split(path)
    return os.path.join(folder, f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{name}")


def _remove(path):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    except OSError:  # already gone, or the filesystem refuses even this (read-only): nothing was written then
        pass


# ------------------------------------------------------------------------------------------------------- fsync
_UNSYNCABLE = {getattr(errno_codes, n) for n in ("EINVAL", "ENOTSUP", "EOPNOTSUPP", "EBADF", "EACCES", "EISDIR",
                                                 "EPERM") if hasattr(errno_codes, n)}


def _fsync(path, directory=False):
    """fsync ``path``; folders only where the OS can (not on Windows; some filesystems refuse: no stronger promise
    is available there)."""
    if directory and not hasattr(os, "O_DIRECTORY"):
        return
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if directory and e.errno in _UNSYNCABLE:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _UNSYNCABLE:
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder):
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync(os.path.join(root, name))
        _fsync(root, directory=True)


def _sync_folder_after_replace(folder, path):
    """fsync the folder of a rename that has happened: the new ``path`` is in place either way; a failure here only
    means it may not survive a power loss, which the message says."""
    try:
        _fsync(folder, directory=True)
    except OSError as e:
        raise DiskWriteError(f"cannot sync the folder of {path}: {_describe(e.errno, e)}; the new {path} is in place "
                             f"but may not survive a power loss", errno=e.errno, filename=path,
                             strerror=e.strerror) from e


# ------------------------------------------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside ``path`` ending with its name; the block writes the file there (``open``,
    ``model.save``, ``np.save``, ``savefig`` ...). On success it becomes ``path`` (fsync, rename, fsync the folder);
    on any exception it is removed, and a write failure is raised as :class:`DiskWriteError` (others unchanged).

    Not for HDF5 (``model.save_weights``): HDF5 that meets a full disk or a size limit segfaults when it closes the
    file (h5py 3.14 / HDF5 1.14.6), so no exception ever reaches this block; ``mtl_keras.presets.save_weights_file``
    builds the file in memory instead."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    existed = os.path.lexists(path)
    tmp = _temporary_name(path)
    try:
        yield tmp
    except BaseException as e:
        _remove(tmp)
        error = disk_write_error(e, path, tmp, existed) if isinstance(e, Exception) else None
        if error is None:
            raise
        raise error from e
    if not os.path.isfile(tmp):
        _remove(tmp)
        raise ValueError(f"atomic_path({path}): the block wrote no file at the temporary path it was given ({tmp})")
    try:
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise disk_write_error(e, path, tmp, existed) from e
    _sync_folder_after_replace(folder, path)


def write_bytes_atomically(path, data):
    """Writes ``data`` (bytes) to ``path`` whole or not at all (:func:`atomic_path`); returns ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
    return path


def write_text_atomically(path, text, encoding="utf-8"):
    """Writes ``text`` to ``path`` whole or not at all (:func:`atomic_path`); returns ``path``."""
    return write_bytes_atomically(path, text.encode(encoding))


def write_json_atomically(path, obj, **json_kwargs):
    """``json.dumps(obj, **json_kwargs)`` to ``path`` whole or not at all; a value JSON cannot hold raises
    ``TypeError``/``ValueError`` before anything is written. Returns ``path``."""
    return write_text_atomically(path, json.dumps(obj, **json_kwargs))


# ----------------------------------------------------------------------------------------------------- folders
def old_path(path):
    """Where the fallback swap of :func:`atomic_directory` parks the previous folder: ``.NAME.old`` beside it."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}.old")


def recover_directory(path):
    """Finishes a folder swap that a crash interrupted; returns ``path``. No ``path`` but a ``.NAME.old``: the crash
    came between the two renames, the old folder is the last complete one and is renamed back. Both: the crash came
    after the swap, ``.NAME.old`` is removed."""
    path = os.path.abspath(os.fspath(path))
    old = old_path(path)
    if os.path.isdir(old):
        if not os.path.lexists(path):
            os.replace(old, path)
        else:
            shutil.rmtree(old, ignore_errors=True)
    return path


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()


def _exchange(a, b):
    """Swaps the names ``a`` and ``b`` in one atomic step; False where the OS or filesystem cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno_codes.EINVAL, errno_codes.ENOSYS, getattr(errno_codes, "ENOTSUP", -1),
                getattr(errno_codes, "EOPNOTSUPP", -1)):
        return False
    raise OSError(code, os.strerror(code), b)


def _swap_in(staging, path):
    if not os.path.lexists(path):
        os.replace(staging, path)
        return
    if _exchange(staging, path):
        shutil.rmtree(staging, ignore_errors=True)  # now the previous folder
        return
    old = old_path(path)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    try:
        os.replace(staging, path)
    except OSError:
        os.replace(old, path)  # the previous folder back where it was
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path):
    """Yields an empty staging folder beside ``path``; the block writes the folder's files there. On success it
    replaces ``path`` (see the module docstring: the previous folder is removed only once the new one is in place);
    on any exception the staging folder is removed and a write failure raised as :class:`DiskWriteError` naming the
    file that failed (others unchanged). ``path``'s parent must exist; a file at ``path`` is an error."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    recover_directory(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a folder: it is not replaced by one")
    existed = os.path.isdir(path)
    staging = _temporary_name(path)
    try:
        os.mkdir(staging)
    except OSError as e:
        raise disk_write_error(e, path, staging, existed, "folder") from e
    try:
        yield staging
    except BaseException as e:
        _remove(staging)
        error = disk_write_error(e, path, staging, existed, "folder") if isinstance(e, Exception) else None
        if error is None:
            raise
        raise error from e
    try:
        _fsync_tree(staging)
        _swap_in(staging, path)
    except OSError as e:
        _remove(staging)
        raise disk_write_error(e, path, staging, existed, "folder") from e
    _sync_folder_after_replace(parent, path)
