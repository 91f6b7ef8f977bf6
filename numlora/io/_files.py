"""Reading files that may be hostile: only regular files are opened (a FIFO or a device
named ``*.safetensors`` would block a reader forever or never end), every JSON document is
size-bounded and parsed without duplicate keys, and what a parser or the OS raises
becomes a :class:`~numlora.errors.FormatError` that names the file and what was wrong."""

from __future__ import annotations

import errno
import json
import os
import reprlib
import stat

from ..errors import FormatError

__all__ = ["brief", "describe_os_error", "open_regular", "parse_json", "read_json", "regular_file_error"]

MAX_JSON = 64 * 1024 * 1024  # adapter_config.json, an index, config.json: far larger than any real one

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlong = 40


def brief(value) -> str:
    """A short repr of a value read from a file (bounded in depth and length, so a hostile
    value cannot blow up an error message)."""
    return _repr.repr(value)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file_error(path, what: str = "file") -> FormatError | None:
    """None when ``path`` (symlinks followed) is a regular file; otherwise the
    FormatError saying what it is instead (missing, a folder, a FIFO, a device, ...)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return FormatError(f"no such {what}: {path}")
    except OSError as e:
        return FormatError(f"cannot read the {what} {path}: {describe_os_error(e)}")
    if not stat.S_ISREG(st.st_mode):
        return FormatError(f"expected the {what} {path} to be a regular file, got {_kind(st.st_mode)}")
    return None


def open_regular(path, what: str = "file"):
    """``path`` opened for binary reading, only if it is a regular file. Opened
    non-blocking and checked with ``fstat`` on the open descriptor, so a FIFO cannot block
    the open and a file swapped after a check cannot slip through."""
    path = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FormatError(f"no such {what}: {path}") from None
    except IsADirectoryError:
        raise FormatError(f"expected the {what} {path} to be a regular file, got a folder") from None
    except OSError as e:
        raise FormatError(f"cannot open the {what} {path}: {describe_os_error(e)}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FormatError(f"expected the {what} {path} to be a regular file, got {_kind(mode)}")
        if hasattr(os, "O_NONBLOCK") and hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _no_duplicates(source: str):
    def hook(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise FormatError(f"{source}: the key {brief(k)} appears twice in one JSON object; a duplicate key "
                                  f"is ambiguous (readers disagree on which one wins), so it is refused")
            out[k] = v
        return out

    return hook


def parse_json(raw: bytes, source: str):
    """``raw`` (UTF-8 JSON) parsed; duplicate keys, nesting deeper than the parser can
    follow, numbers too long to convert and bad UTF-8 raise FormatError naming ``source``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{source}: expected UTF-8 JSON, got undecodable bytes ({e})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates(source))
    except json.JSONDecodeError as e:
        raise FormatError(f"{source}: not valid JSON ({e})") from None
    except RecursionError:
        raise FormatError(f"{source}: JSON nested too deeply to read") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{source}: JSON value out of range ({e})") from None


def read_json(path, what: str = "JSON file", limit: int = MAX_JSON):
    """A JSON file parsed, read only if it is a regular file of at most ``limit`` bytes."""
    path = os.fspath(path)
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise FormatError(f"{path}: a {what} of {size} bytes exceeds the {limit}-byte limit")
        try:
            raw = f.read(limit + 1)
        except OSError as e:
            raise FormatError(f"cannot read the {what} {path}: {describe_os_error(e)}") from None
    if len(raw) > limit:
        raise FormatError(f"{path}: the {what} grew past the {limit}-byte limit while it was read")
    return parse_json(raw, path)


def describe_os_error(e: OSError) -> str:
    """``strerror (ENAME)`` of an OSError, with a hint for the common causes."""
    name = errno.errorcode.get(e.errno, "") if e.errno is not None else ""
    text = e.strerror or str(e)
    hint = {
        errno.ENOSPC: "; free some space or write elsewhere",
        errno.EDQUOT: "; free some space or write elsewhere",
        errno.EFBIG: "; the output exceeds the file-size limit (ulimit -f) or the file system's largest file",
        errno.EACCES: "; check the folder's permissions or write elsewhere",
        errno.EPERM: "; check the folder's permissions or write elsewhere",
        errno.EROFS: "; the file system is mounted read-only: write elsewhere",
        errno.ENOTDIR: "; a part of the path is a file, not a folder",
    }.get(e.errno, "")
    return f"{text}{f' ({name})' if name else ''}{hint}"
