"""One writer per run folder: a lock file ``FOLDER/run.lock`` (JSON: host, pid, start time, command line) that a run
holds from before it reads the folder until it ends. A second process is refused in one line naming the holder; a
lock left by a process that died on this host is taken over with a warning; a lock held from another host is never
taken over (this host cannot tell whether that process lives). Standard library only.

    with RunLock(output_dir, name="--output_dir"):
        ...  # the run; the lock file is gone after the block, also when it raised

How the lock is made atomic, also on NFS (where ``O_EXCL`` was long unreliable): the record is written to a file of
this process's own, then ``os.link``-ed to the lock's name; exactly one link to a name can succeed. A stale lock is
removed only under a claim file named after its bytes (made the same way), after checking that the lock still holds
those bytes; then the takers race to link their own as above. So of any number of processes finding the same stale
lock exactly one wins, and a live lock is never removed.
"""

import datetime
import errno
import hashlib
import json
import logging
import os
import shlex
import socket
import sys
import time
import uuid

log = logging.getLogger("mtl_keras")

LOCK_NAME = "run.lock"
_PATIENCE_S = 10.0  # a lock that appears, vanishes or is being taken over while we look: look again, this long


class RunLockedError(OSError):
    """The folder's lock is held by another process (an OSError: the entry points report it in one line, status 2).
    ``holder``: the lock's record (see :meth:`RunLock.holder`), None when unknown."""

    def __init__(self, message, holder=None):
        super().__init__(message)
        self.holder = holder


class RunLock:
    """The lock of ``folder`` (created with its missing parents when absent; those are removed again on release when
    still empty, so that a run refused or failing early leaves no trace). ``name``: how messages call the folder, e.g.
    ``"--output_dir"``. A context manager; not re-entrant (a second lock on a held folder is refused, also in the
    same process)."""

    def __init__(self, folder, name=None):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self._label = f"{name} {self.folder}" if name else self.folder
        self._record = None  # the bytes we wrote while we hold the lock
        self._created_folders = []

    # ------------------------------------------------------------------ public

    def acquire(self):
        """Takes the lock or raises :class:`RunLockedError` naming the holder (ValueError when the folder is a file)."""
        if self._record is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock.")
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise ValueError(f"{self._label} is a file; expected a folder for the run (new or to resume).")
        self._created_folders = _make_folders(self.folder)
        try:
            self._acquire()
        except RunLockedError:
            self._remove_created_folders()
            raise
        except OSError as e:  # a read-only or full folder: one line naming the folder, the lock and the errno
            self._remove_created_folders()
            code = errno.errorcode.get(e.errno, e.errno)
            error = OSError(f"{self._label}: cannot write its lock {self.path}: {e.strerror or e} ({code}).")
            error.errno = e.errno
            raise error from e
        except BaseException:
            self._remove_created_folders()
            raise
        return self

    def release(self):
        """Removes the lock file when it is still ours (a lock taken over meanwhile is left to its new holder)."""
        if self._record is None:
            return
        record, self._record = self._record, None
        try:
            with open(self.path, "rb") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current == record:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        else:  # someone removed or replaced it while we ran: theirs now, not ours to delete
            log.warning("The lock %s was removed or replaced while this run held it; leaving it as it is.", self.path)
        self._remove_created_folders()

    def holder(self):
        """The lock's record (a dict: host, pid, started, command, ...) or None when the folder is not locked; a
        damaged lock file gives ``{"unreadable": reason}``."""
        try:
            with open(self.path, "rb") as f:
                return _parse(f.read())
        except FileNotFoundError:
            return None

    @property
    def held(self):
        return self._record is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()
        return False

    # ----------------------------------------------------------------- private

    def _acquire(self):
        record = _encode(_own_record())
        deadline = time.monotonic() + _PATIENCE_S
        while time.monotonic() < deadline:
            if _link_new(self.path, record):
                self._record = record
                return
            try:
                with open(self.path, "rb") as f:
                    seen = f.read()
            except FileNotFoundError:
                continue  # released between our link and our read: try again
            info = _parse(seen)
            state, reason = _holder_state(info)
            if state != "dead":
                raise RunLockedError(self._refusal(info, state, reason), holder=info)
            if _remove_if_unchanged(self.path, seen, record):
                log.warning("%s: removed the lock %s left by a run that is gone (%s; %s); taking the folder over.",
                            self._label, self.path, _describe(info), reason)
            else:  # another process is removing the same stale lock right now: look again in a moment
                time.sleep(0.01)
            # The stale lock is gone (we or another process removed it): link ours again; one of the racers wins.
        raise RunLockedError(f"{self._label}: its lock {self.path} kept changing for {_PATIENCE_S:.0f} s while taking "
                             f"it; other processes are starting on this folder at the same time, or a "
                             f"{os.path.basename(self.path)}.claim-* file there cannot be read.")

    def _refusal(self, info, state, reason):
        if "unreadable" in info:
            return (f"{self._label} is locked by {self.path}, which cannot be read ({info['unreadable']}); if no run "
                    f"is using this folder, delete that file and start again.")
        holder = f"{_describe(info)} ({_shorten(info.get('command', '?'))})"
        if state == "elsewhere":
            return (f"{self._label} is in use by another run: {holder}; this host cannot check it ({reason}): if that "
                    f"run has ended (its host is gone or it was killed), delete {self.path} and start again.")
        return (f"{self._label} is in use by another run: {holder}; wait for it to end or stop it, or choose "
                f"another folder.")

    def _remove_created_folders(self):
        # Deepest first; a folder something was written to meanwhile (the run's outputs) stays.
        for folder in reversed(self._created_folders):
            try:
                os.rmdir(folder)
            except OSError:
                break
        self._created_folders = []


# ---------------------------------------------------------------------- helpers


def _make_folders(folder):
    """Creates ``folder`` and its missing parents; returns those this call created, outermost first."""
    missing, path = [], os.path.abspath(folder)
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    created = []
    for path in reversed(missing):
        try:
            os.mkdir(path)
            created.append(path)
        except FileExistsError:
            if not os.path.isdir(path):
                raise
    return created


def _link_new(path, record):
    """Creates ``path`` holding ``record`` atomically: a private file linked to the name. Returns False when the name
    exists (the link's own answer, or on NFS a lost reply: then our file's link count tells whether it was ours)."""
    private = f"{path}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            os.write(fd, record)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(private, path)
            return True
        except FileExistsError:
            return os.stat(private).st_nlink == 2  # NFS: the link was made, its reply was lost and retried
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
        # A filesystem without hard links (some FUSE / SMB mounts): O_EXCL on the lock's name itself.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, record)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    finally:
        _unlink_quietly(private)


def _remove_if_unchanged(path, stale, record, depth=0):
    """Deletes ``path`` when it still holds the ``stale`` bytes; returns whether this call did. Guarded by a claim
    file named after those bytes (made like the lock): while we hold it no other process can remove or replace that
    lock, so a fresh lock linked meanwhile is never deleted by mistake. A claim left by a taker that died is itself
    removed the same way (a claim on the claim)."""
    claim = f"{path}.claim-{hashlib.sha256(stale).hexdigest()[:16]}"
    if _link_new(claim, record):
        try:
            try:
                with open(path, "rb") as f:
                    if f.read() != stale:
                        return False  # already replaced by a live lock
            except FileNotFoundError:
                return False
            os.unlink(path)
            return True
        finally:
            _unlink_quietly(claim)
    try:
        with open(claim, "rb") as f:
            claimed = f.read()
    except FileNotFoundError:
        return False  # the other taker is done
    if depth < 3 and _holder_state(_parse(claimed))[0] == "dead":
        _remove_if_unchanged(claim, claimed, record, depth + 1)
    return False


def _own_record():
    now = datetime.datetime.now(datetime.timezone.utc)
    record = dict(host=socket.gethostname(), pid=os.getpid(), started=now.strftime("%Y-%m-%d %H:%M:%S UTC"),
                  started_unix=now.timestamp(), token=uuid.uuid4().hex,  # no two records are the same bytes
                  command=" ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    # Linux: what tells a live holder from a pid reused after its death, a reboot, or another pid namespace.
    ticks, boot, namespace = _process_start_ticks(os.getpid()), _boot_id(), _pid_namespace()
    if ticks is not None:
        record["pid_start_ticks"] = ticks
    if boot:
        record["boot_id"] = boot
    if namespace:
        record["pid_namespace"] = namespace
    return record


def _encode(record):
    return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()


def _parse(data):
    try:
        info = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError) as e:
        return {"unreadable": f"not JSON: {e}"}
    if not isinstance(info, dict) or not isinstance(info.get("host"), str) or type(info.get("pid")) is not int:
        return {"unreadable": "no host and pid in it"}
    return info


def _holder_state(info):
    """("alive" | "dead" | "elsewhere" | "unknown", why): whether the lock's holder still runs, as far as this host
    can tell. Only "dead" is taken over."""
    if "unreadable" in info:
        return "unknown", info["unreadable"]
    if info["host"] != socket.gethostname():
        return "elsewhere", "another host"
    boot = _boot_id()
    if boot and info.get("boot_id") and info["boot_id"] != boot:
        return "dead", "this host has restarted since"
    namespace = _pid_namespace()
    if namespace and info.get("pid_namespace") and info["pid_namespace"] != namespace:
        return "elsewhere", "another pid namespace (container) on this host"
    pid = info["pid"]
    if pid <= 0:
        return "unknown", f"pid {pid}"
    if os.name == "nt":  # os.kill(pid, 0) on Windows terminates the process: no probe, assume it lives
        return "alive", "cannot check processes on Windows"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead", f"no process {pid}"
    except PermissionError:
        pass  # exists, owned by another user
    except OSError as e:
        return "unknown", f"cannot check pid {pid}: {e}"
    ticks = _process_start_ticks(pid)
    if ticks is not None and info.get("pid_start_ticks") is not None and ticks != info["pid_start_ticks"]:
        return "dead", f"pid {pid} is now another process (started later)"
    return "alive", f"pid {pid} runs"


def _process_start_ticks(pid):
    """The process's start time in clock ticks after boot (/proc/PID/stat field 22); None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
        # Field 2, the command name, is in parentheses and may itself hold spaces and parentheses.
        return int(text.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_namespace():
    try:
        return os.readlink("/proc/self/ns/pid")
    except (OSError, AttributeError):
        return None


def _describe(info):
    if "unreadable" in info:
        return f"an unreadable lock ({info['unreadable']})"
    return f"pid {info['pid']} on host {info['host']} since {info.get('started', 'an unknown time')}"


def _shorten(text, limit=160):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
