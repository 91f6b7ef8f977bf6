"""Atomic file writes: a temporary file in the destination folder, then a rename.

An interrupted write leaves the destination as it was (absent or the old file) and no
temporary file behind. Temporary names say who wrote them:
``.numlora-<pid>-<host>-<random>.tmp`` (``<host>``: 8 hex digits of a hash of the host
name). A process killed outright (SIGKILL, a power cut) cannot remove its temporary file;
the next atomic write into the same folder removes the ones it can prove are stale:
written on this host by a process that no longer exists (:func:`remove_stale_temps`).

OS failures (disk full, no permission, a file-size limit) are raised as ``OSError`` whose
``filename`` is the destination, after the temporary file is removed. A job wraps its
writes in :func:`cleanup_scope`, so whatever point an exception (or an interrupt) strikes
at, every temporary file and folder it created is removed, and marks its final rename
with :func:`point_of_no_return`, which an interrupt does not cut in two.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import threading

__all__ = ["AtomicFile", "AtomicDir", "Transaction", "write_text_atomic", "write_bytes_atomic",
           "remove_stale_temps", "is_numlora_temp", "point_of_no_return", "past_point_of_no_return",
           "interrupts_deferred", "cleanup_scope", "Interrupted", "request_interrupt", "raise_interrupt",
           "check_interrupt", "reset_interrupts"]

_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_TEMP_RE = re.compile(r"^\.numlora-(?:old-)?(\d{1,10})-([0-9a-f]{8})-[0-9a-f]{8,32}\.tmp$")


def _temp_name(kind: str = "") -> str:
    return f".numlora-{kind}{os.getpid()}-{_HOST}-{secrets.token_hex(6)}.tmp"


def is_numlora_temp(name: str) -> bool:
    """True when ``name`` (a file name, no folder) is one of numlora's temporary names."""
    return _TEMP_RE.match(name) is not None


def _pid_is_dead(pid: int) -> bool:
    if not 0 < pid < 2 ** 31 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, owned by someone else
        return False
    return False


def remove_stale_temps(folder) -> list[str]:
    """Remove numlora temporary files and folders in ``folder`` (not below it) that were
    written on this host by a process that no longer exists; return their names. Anything
    else is left alone: other names, another host's files, files of a live process (a
    reused pid included). Errors are ignored (best effort)."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None or m.group(2) != _HOST or not _pid_is_dead(int(m.group(1))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
        except OSError:
            pass
    return removed


# --- interrupts --------------------------------------------------------------------------------
# numlora's CLI turns SIGINT / SIGTERM into KeyboardInterrupt (Interrupted) so that every
# abort path runs. An interrupt must not cut a job's final commit (the rename that makes
# its output visible) in two, nor stop a cleanup half way: the CLI's handlers raise only
# while interrupts_deferred() is False. An interrupt before the final commit removes
# everything; one during or after it lets the job finish with its output complete. An
# interrupt is also noted (request_interrupt), and jobs call check_interrupt() between
# tensors, so one that could not be raised where it struck still stops the job.
_state = {"final": False, "aborting": 0, "pending": None, "raised": False}
_local = threading.local()


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised (as a KeyboardInterrupt) so that every abort path runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def request_interrupt(signum: int) -> None:
    """Note that SIGINT / SIGTERM arrived: :func:`check_interrupt` raises it. The CLI's
    handler also raises at once; this note makes sure an exception lost on the way (one
    raised inside a finalizer is only printed, never propagated) still stops the job."""
    if _state["pending"] is None:
        _state["pending"] = signum


def raise_interrupt(signum: int) -> None:
    _state["raised"] = True
    raise Interrupted(signum)


def interrupt_raised() -> bool:
    return _state["raised"]


def check_interrupt() -> None:
    """Raise :class:`Interrupted` if an interrupt is pending and may abort the job now.
    Jobs call this between tensors and before their final commit."""
    if _state["pending"] is not None and not interrupts_deferred():
        raise_interrupt(_state["pending"])


@contextlib.contextmanager
def point_of_no_return():
    """Mark the final commit of a job: from here on an interrupt no longer aborts it. If
    the block raises, the mark is taken back (the job failed and will be cleaned up)."""
    check_interrupt()
    _state["final"] = True
    try:
        yield
    except BaseException:
        _state["final"] = False
        raise


@contextlib.contextmanager
def _aborting():
    _state["aborting"] += 1
    try:
        yield
    finally:
        _state["aborting"] -= 1


def interrupts_deferred() -> bool:
    """True while a job's final commit runs or has run, or while a cleanup runs."""
    return _state["final"] or _state["aborting"] > 0


def past_point_of_no_return() -> bool:
    return _state["final"]


def reset_interrupts() -> None:
    """Forget the final-commit mark and any pending interrupt (the CLI, between jobs)."""
    _state.update(final=False, pending=None, raised=False)


@contextlib.contextmanager
def cleanup_scope():
    """Abort every :class:`AtomicFile` / :class:`AtomicDir` this thread creates inside the
    block if the block raises, wherever the exception struck (even between a constructor
    and the ``with`` that would have aborted it)."""
    scopes = _local.__dict__.setdefault("scopes", [])
    mine = []
    scopes.append(mine)
    try:
        yield
    except BaseException:
        with _aborting():
            for t in reversed(mine):
                t.abort()
        raise
    finally:
        scopes.pop()


def _register(t) -> None:
    for scope in getattr(_local, "scopes", ()):
        scope.append(t)


def _os_error(e: OSError, path: str) -> OSError:
    """``e`` with ``path`` as its filename (same errno, so the same OSError subclass)."""
    if e.errno is None:
        return e
    new = OSError(e.errno, e.strerror or os.strerror(e.errno), path)
    new.__cause__ = e
    return new


class Transaction:
    """A ``with`` block that calls ``commit()`` when it ends normally and ``abort()`` when
    it ends with an exception (Ctrl-C included), or when ``commit()`` itself fails."""

    @contextlib.contextmanager
    def _aborting_on_error(self):
        """Abort if the block raises; an ``OSError`` comes out with the output path as its
        filename (same errno, so the same OSError subclass)."""
        try:
            yield
        except OSError as e:
            self.abort()
            raise _os_error(e, self.path) from None
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


#: Bytes an :class:`AtomicFile` writes between two requests to start their writeback.
WRITEBACK_STEP = 16 << 20

_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait
_sync_file_range = None  # resolved on first use: a ctypes function, or False where there is none


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + nbytes)`` of ``fd`` to disk now,
    without waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``): the disk works
    while the job computes the next tensor, and the final fsync finds little left to
    write. Advisory only: where the call does not exist or fails, nothing happens (the
    commit's fsync still makes the file durable)."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        if os.name == "posix":
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _sync_file_range = fn
            except (OSError, AttributeError):  # no libc symbol (macOS, musl builds without it)
                pass
    if _sync_file_range:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _open_temp(path: str) -> int:
    """Create ``path`` exclusively for writing; the one place a temporary file is created
    (tests replace it to inject faults)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)


class AtomicFile(Transaction):
    """A binary file that appears at ``path`` only on :meth:`commit` (fsync, rename).

    :meth:`abort` (or an exception inside ``with``) removes the temporary file. An
    ``OSError`` from any step is raised with ``path`` as its filename, after the
    temporary file is removed."""

    def __init__(self, path):
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        remove_stale_temps(folder)
        self._f = None
        self._done = False
        self._kicked = 0  # bytes up to which writeback was requested (see _start_writeback)
        self.tmp = os.path.join(folder, _temp_name())
        _register(self)  # before the file exists: an interrupt from here on is cleaned up
        for _ in range(100):
            try:
                fd = _open_temp(self.tmp)
                break
            except FileExistsError:
                self.tmp = os.path.join(folder, _temp_name())
                continue
            except OSError as e:
                self._done = True
                raise _os_error(e, self.path) from None
        else:  # pragma: no cover - 100 collisions of 48 random bits
            raise FileExistsError(errno.EEXIST, "no free temporary name", folder)
        try:
            self._f = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            self.abort()
            raise

    def _io(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            self.abort()
            raise _os_error(e, self.path) from None

    def write(self, data) -> int:
        n = self._io(self._f.write, data)
        end = self._f.tell()
        if end - self._kicked >= WRITEBACK_STEP:  # start the disk on what is written so far
            self._io(self._f.flush)
            _start_writeback(self._f.fileno(), self._kicked, end - self._kicked)
            self._kicked = end
        return n

    def seek(self, pos: int) -> int:
        return self._io(self._f.seek, pos)

    def tell(self) -> int:
        return self._f.tell()

    def commit(self) -> None:
        if self._done:
            return
        with self._aborting_on_error():
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.chmod(self.tmp, 0o644 & ~_umask())
            os.replace(self.tmp, self.path)
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        with _aborting():
            try:
                if self._f is not None:
                    try:
                        self._f.close()
                    except OSError:  # the buffered bytes cannot be written (disk full): drop them
                        pass
            finally:
                try:
                    os.unlink(self.tmp)
                except OSError:
                    pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path, data: bytes) -> None:
    with AtomicFile(path) as f:
        f.write(data)


def write_text_atomic(path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


class AtomicDir(Transaction):
    """A folder built under a temporary name beside ``path`` and renamed into place on
    :meth:`commit`. ``path`` must not exist, or be an empty folder, unless
    ``overwrite=True`` (then the old folder is replaced as a whole, after the new one is
    complete). On an exception inside ``with`` the temporary folder is removed, and so are
    parent folders this object created."""

    def __init__(self, path, overwrite: bool = False):
        from ..errors import FormatError

        self.path = os.path.abspath(os.fspath(path))
        if os.path.lexists(self.path):
            if not os.path.isdir(self.path):
                raise FormatError(f"output {path} exists and is not a folder")
            if os.listdir(self.path) and not overwrite:
                raise FormatError(f"output folder {path} exists and is not empty; choose a new path "
                                  f"or pass overwrite (--overwrite)")
        parent = os.path.dirname(self.path)
        self._made = []  # parent folders created here, deepest last
        probe = parent
        while not os.path.lexists(probe):
            self._made.append(probe)
            probe = os.path.dirname(probe)
        self._made.reverse()
        self._done = False
        self.tmp = None
        _register(self)
        with self._aborting_on_error():
            for d in self._made:
                os.mkdir(d)
            remove_stale_temps(parent)
            for _ in range(100):
                self.tmp = os.path.join(parent, _temp_name())
                try:
                    os.mkdir(self.tmp, 0o700)
                    break
                except FileExistsError:
                    continue

    def join(self, *names) -> str:
        return os.path.join(self.tmp, *names)

    def commit(self) -> None:
        if self._done:
            return
        parent = os.path.dirname(self.path)
        old = None
        with self._aborting_on_error():
            os.chmod(self.tmp, 0o755 & ~_umask())
            if os.path.lexists(self.path):
                old = os.path.join(parent, _temp_name("old-"))
                os.rename(self.path, old)
            try:
                os.rename(self.tmp, self.path)
            except BaseException:
                if old is not None:
                    os.rename(old, self.path)  # put the previous output back
                raise
        self._done = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        with _aborting():
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
            for d in reversed(self._made):
                try:
                    os.rmdir(d)
                except FileNotFoundError:  # interrupted before it was made
                    continue
                except OSError:  # not empty: someone else put something there
                    break
