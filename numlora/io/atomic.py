"""Atomic file writes: a temporary file in the destination folder, then a rename.

An interrupted write leaves the destination as it was (absent or the old file) and no
temporary file behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile

__all__ = ["AtomicFile", "AtomicDir", "Transaction", "write_text_atomic", "write_bytes_atomic"]


class Transaction:
    """A ``with`` block that calls ``commit()`` when it ends normally and ``abort()`` when
    it ends with an exception (Ctrl-C included)."""

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class AtomicFile(Transaction):
    """A binary file that appears at ``path`` only on :meth:`commit` (fsync, rename).

    :meth:`abort` (or an exception inside ``with``) removes the temporary file."""

    def __init__(self, path):
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp = tempfile.mkstemp(prefix=".numlora-", suffix=".tmp", dir=folder)
        self._f = os.fdopen(fd, "wb")
        self._done = False

    def write(self, data) -> int:
        return self._f.write(data)

    def seek(self, pos: int) -> int:
        return self._f.seek(pos)

    def tell(self) -> int:
        return self._f.tell()

    def commit(self) -> None:
        if self._done:
            return
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
        try:
            self._f.close()
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
    complete). On an exception inside ``with`` the temporary folder is removed."""

    def __init__(self, path, overwrite: bool = False):
        from ..errors import FormatError

        self.path = os.path.abspath(os.fspath(path))
        if os.path.exists(self.path):
            if not os.path.isdir(self.path):
                raise FormatError(f"output {path} exists and is not a folder")
            if os.listdir(self.path) and not overwrite:
                raise FormatError(f"output folder {path} exists and is not empty; choose a new path "
                                  f"or pass overwrite (--overwrite)")
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=".numlora-", suffix=".tmp", dir=parent)
        self._done = False

    def join(self, *names) -> str:
        return os.path.join(self.tmp, *names)

    def commit(self) -> None:
        if self._done:
            return
        os.chmod(self.tmp, 0o755 & ~_umask())
        old = None
        if os.path.exists(self.path):
            old = tempfile.mkdtemp(prefix=".numlora-old-", dir=os.path.dirname(self.path))
            os.rmdir(old)
            os.rename(self.path, old)
        os.rename(self.tmp, self.path)
        self._done = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        shutil.rmtree(self.tmp, ignore_errors=True)

