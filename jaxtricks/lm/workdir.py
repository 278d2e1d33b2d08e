"""The workdir of a run: one run at a time (:class:`RunLock`), and writes that fail
(:class:`WriteFailed`).

The lock is a file, ``WORKDIR/run.lock``, holding the process id, the host and the start time of
the run that holds it. It is created atomically (a complete temporary file hard-linked to its name,
which fails when the name exists), so of two starts racing for one workdir exactly one wins. A lock
whose process is gone (same host, pid not running) is taken over with a message; a lock held from
another host is never taken over, since this host cannot tell whether that process still runs.
"""

from __future__ import annotations

import contextlib
import errno as errno_lib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

LOCK_NAME = "run.lock"
# Error numbers of a write that cannot succeed until the user does something (frees space,
# remounts): the run stops cleanly on these instead of dying with a traceback.
WRITE_ERRNOS = {errno_lib.ENOSPC, errno_lib.EROFS, errno_lib.EDQUOT, errno_lib.EFBIG,
                errno_lib.EIO}
_ERRNO_WORDS = {code: os.strerror(code) for code in WRITE_ERRNOS}


class WorkdirLocked(RuntimeError):
    """Another run holds the workdir's lock (train.py exits 2)."""


class WriteFailed(RuntimeError):
    """A write of the run failed (a full disk, a read-only filesystem, a quota); train.py exits 3.

    Attributes: ``path`` (what could not be written) and ``errno``.
    """

    def __init__(self, message: str, path: str | Path, errno: int):
        super().__init__(message)
        self.path, self.errno = Path(path), errno


def write_errno(error: BaseException) -> int | None:
    """The errno of a failed write in ``error``, its causes or its message (Orbax and TensorStore
    wrap the OSError or only quote its words); None when it is none of :data:`WRITE_ERRNOS`."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
            return error.errno
        text = str(error)
        for code, words in _ERRNO_WORDS.items():
            if words in text or re.search(rf"\b{errno_lib.errorcode[code]}\b", text):
                return code
        error = error.__cause__ or error.__context__
    return None


def write_failed(path: str | Path, code: int, *, needed: tuple[int, str] | None = None,
                 what: str = "") -> WriteFailed:
    """The :class:`WriteFailed` for ``path``: the errno's words and, for a full disk or quota,
    how much a checkpoint needs (``needed``: bytes, and what that figure is)."""
    message = f"cannot write {path}: {os.strerror(code)} ({errno_lib.errorcode.get(code, code)})"
    if what:
        message += f" while {what}"
    if code in (errno_lib.ENOSPC, errno_lib.EDQUOT) and needed:
        free = _free_bytes(path)
        message += (f"; a checkpoint needs about {needed[0] / 2**20:.1f} MiB ({needed[1]})"
                    + (f", {free / 2**20:.1f} MiB are free" if free is not None else ""))
    message += ("; free space (or fix the filesystem) and run the same command again: it resumes "
                "from the last complete checkpoint.")
    return WriteFailed(message, path, code)


def checkpoint_size(directory: Path) -> tuple[int, str] | None:
    """The disk space of the newest complete checkpoint in ``directory`` (``<step>/`` folders)
    and what that figure is; None when there is none."""
    steps = sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit() and p.is_dir()) \
        if directory.is_dir() else []
    if not steps:
        return None
    return folder_bytes(directory / str(steps[-1])), f"the size of checkpoint {steps[-1]}"


def _free_bytes(path: str | Path) -> int | None:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def folder_bytes(path: Path) -> int:
    """The disk space the files under ``path`` take (0 when it does not exist)."""
    if not path.is_dir():
        return 0
    files = [f.stat() for f in path.rglob("*") if f.is_file()]
    return sum(max(f.st_size, f.st_blocks * 512) for f in files)


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """``WORKDIR/run.lock``: taken by :meth:`acquire`, released by :meth:`release` (use it as a
    context manager). Raises :class:`WorkdirLocked` when another run holds it."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self.token = uuid.uuid4().hex
        self._held = False
        self._made_workdir = False

    def _content(self) -> dict:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "process_start": _process_start(pid),
                "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "token": self.token}

    def _link(self) -> bool:
        """Create the lock atomically, complete; False when it exists."""
        tmp = self.workdir / f".{LOCK_NAME}.{self.token}"
        try:
            with stop_on_write_error(self.path, what="taking the workdir's lock",
                                     checkpoints=self.workdir / "checkpoints"):
                tmp.write_text(json.dumps(self._content()) + "\n")
                os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def holder(self) -> dict | None:
        """The lock's content; None when there is no lock, {} when it cannot be read."""
        try:
            held = json.loads(self.path.read_text())
            return held if isinstance(held, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        if not self.workdir.exists():
            self.workdir.mkdir(parents=True)
            self._made_workdir = True
        for _ in range(200):
            if self._link():
                self._held = True
                return self
            held = self.holder()
            if held is None:  # released between our try and our read: try again
                continue
            if self._refuse_or_take_over(held):
                self._held = True
                return self
        raise WorkdirLocked(f"could not take the lock {self.path}: other starts keep taking it.")

    def _refuse_or_take_over(self, held: dict) -> bool:
        """Raise WorkdirLocked, or take a stale lock over: True when this start now holds it."""
        pid, host, since = held.get("pid"), held.get("host"), held.get("since", "an unknown time")
        who = f"process {pid} on host {host} since {since}"
        if not isinstance(pid, int) or not host:
            raise WorkdirLocked(
                f"workdir {self.workdir} is locked by {self.path}, which cannot be read; once you "
                f"are sure no run uses this workdir, remove it: rm {self.path}")
        if host != socket.gethostname():
            raise WorkdirLocked(
                f"workdir {self.workdir} is in use by {who} (lock {self.path}); it is never taken "
                f"over from another host. Once you are sure no run on {host} uses this workdir, "
                f"remove the lock: rm {self.path}")
        if _alive(pid, held.get("process_start")):
            raise WorkdirLocked(
                f"workdir {self.workdir} is in use by {who} (lock {self.path}); wait for that run "
                "to end or stop it, or pass another --workdir.")
        # Gone: take it over. One start at a time may (the one that creates the takeover guard),
        # and only while the lock is still the stale one it read, so two starts that both found
        # it stale cannot both win.
        guard = self.workdir / f".{LOCK_NAME}.takeover"
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > 30:  # left by a start killed meanwhile
                    guard.unlink()
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return False
        try:
            if self.holder() != held:  # changed meanwhile: look again
                return False
            self.path.unlink()
            print(f"taking over the lock of {who}: that process is no longer running "
                  f"({self.path})")
            return self._link()
        finally:
            guard.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if it is still ours (and the workdir when we made it and it is empty)."""
        if not self._held:
            return
        self._held = False
        held = self.holder()
        if held and held.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        if self._made_workdir:
            try:
                self.workdir.rmdir()  # only when nothing else was written
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def stop_on_write_error(path: str | Path, *, what: str = "", checkpoints: Path | None = None):
    """Turns an OSError of a failed write (:data:`WRITE_ERRNOS`) inside the block into
    :class:`WriteFailed` naming ``path`` (or the file the error names); for a full disk it says
    what the newest checkpoint in ``checkpoints`` takes."""
    try:
        yield
    except OSError as e:
        code = write_errno(e)
        if code is None:
            raise
        needed = checkpoint_size(checkpoints) if checkpoints is not None else None
        raise write_failed(e.filename or path, code, needed=needed, what=what) from None


class HeldStderr:
    """Holds what is written to file descriptor 2 (Python's and C++'s) inside the block in a
    temporary file, and writes it out at the end unless :meth:`discard` was called."""

    def __init__(self):
        self._keep = True

    def discard(self) -> None:
        self._keep = False

    def __enter__(self) -> HeldStderr:
        sys.stderr.flush()
        try:
            self._held = tempfile.TemporaryFile()
            self._saved = os.dup(2)
            os.dup2(self._held.fileno(), 2)
        except OSError:  # no room even for that: let it through
            self._saved = None
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is None:
            return
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        with self._held:
            if self._keep:
                self._held.seek(0)
                try:
                    sys.stderr.write(self._held.read().decode(errors="replace"))
                    sys.stderr.flush()
                except OSError:
                    pass


def silence_stderr() -> None:
    """Send what is still written to stderr to /dev/null: after a failed write has been reported,
    Orbax's threads may go on printing the same failure while Python shuts down."""
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
