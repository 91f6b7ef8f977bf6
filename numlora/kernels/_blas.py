"""OpenBLAS's idle workers put to sleep for numlora's large parallel kernels.

After a BLAS call OpenBLAS's worker threads spin, waiting for more work, for
``thread_timeout`` CPU cycles (2^28 by default, ~0.1 s) before they sleep. The
scipy-openblas build numpy ships does not yield the core while spinning, so a numba worker
woken on that core got next to nothing: a 10 ms kernel took 20 ms, one thread's time.

numlora used to stop the workers (``blas_thread_shutdown_``, what OpenBLAS runs before a
``fork``) and let the next BLAS call start them again. Measured on the 2-vCPU VM: started
by that call after the program had paused, the new worker could not run, and the product
waited for it (a numpy product right after a QLoRA forward took 13.8-16.1 ms, median,
instead of 1.75-1.9; docs/performance.md, "OpenBLAS's workers put to sleep, not stopped").

So instead, for the length of the kernel, this module shortens the spin: each worker reads
``thread_timeout`` (a static of OpenBLAS's ``blas_server.c``) at every turn of its wait, so
with a spin of 16 cycles a spinning worker goes to sleep on its condition variable at once,
and the old value is written back as the kernel returns. The workers stay alive where
they are; the next BLAS call wakes them as it would after any pause (OpenBLAS signals a
sleeping worker), and they then spin as long as before. Two numlora kernels in two threads
share one shortening (counted under a lock), so the value written back is always the
library's own.

The variable is found by name in the library file's ELF symbol table (``.symtab``; the
wheels' OpenBLAS keeps it): its address is the library's load address (an exported
function's address minus that function's value in the same table) plus the variable's
value. It is used only when it is a 4-byte object holding a power of two between 2^4 and
2^30 (the range OpenBLAS itself allows), and when two exported functions
(``blas_thread_shutdown_``, ``blas_thread_init``) give the same load address; otherwise
that library is left alone. Linux only (the libraries are found in ``/proc/self/maps``).
"""

from __future__ import annotations

import os
import struct
import sys
import threading

import numpy as np

#: The spin, in CPU cycles, while a numlora kernel runs (OpenBLAS's own minimum).
SHORT_SPIN = 16
#: Exported functions whose addresses locate the library in memory (both must agree).
_ANCHORS = ("blas_thread_shutdown_", "blas_thread_init")
_VARIABLE = "thread_timeout"


def elf_symbols(path: str, names) -> dict:
    """``{name: (value, size, type)}`` of the given names in the ``.symtab`` of a 64-bit
    little-endian ELF file (absent names, or a file without one, give fewer entries)."""
    want = {n.encode() for n in names}
    found = {}
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:6] != b"\x7fELF\x02\x01":
            return found
        shoff, = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
        if shentsize != 64 or not shnum:
            return found
        f.seek(shoff)
        sections = [struct.unpack_from("<IIQQQQIIQQ", f.read(64)) for _ in range(shnum)]
        for sh in sections:
            if sh[1] != 2 or sh[9] != 24 or sh[6] >= shnum:  # SHT_SYMTAB, Elf64_Sym entries
                continue
            strtab = sections[sh[6]]
            f.seek(strtab[4])
            strings = f.read(strtab[5])
            offsets = {}
            for name in want:
                at = strings.find(b"\0" + name + b"\0")
                while at >= 0:
                    offsets[at + 1] = name
                    at = strings.find(b"\0" + name + b"\0", at + 1)
            if not offsets:
                continue
            f.seek(sh[4])
            sym = np.frombuffer(f.read(sh[5]), dtype=np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"),
                                                                  ("shndx", "<u2"), ("value", "<u8"),
                                                                  ("size", "<u8")]))
            for i in np.flatnonzero(np.isin(sym["name"], np.fromiter(offsets, np.uint32))):
                s = sym[i]
                name = offsets[int(s["name"])].decode()
                if s["shndx"] and name not in found:  # defined here
                    found[name] = (int(s["value"]), int(s["size"]), int(s["info"]) & 0xF)
    return found


def _timeout_of(path: str):
    """The ``thread_timeout`` of the OpenBLAS library at ``path`` as a ``ctypes.c_uint``
    over its memory, or None (no such symbol, or a value OpenBLAS would not hold)."""
    import ctypes

    try:
        syms = elf_symbols(path, _ANCHORS + (_VARIABLE,))
        lib = ctypes.CDLL(path)
        bases = {ctypes.cast(getattr(lib, a), ctypes.c_void_p).value - syms[a][0] for a in _ANCHORS}
    except (OSError, AttributeError, ValueError, KeyError, TypeError, struct.error):
        return None
    if _VARIABLE not in syms or len(bases) != 1:  # the table must place both functions where they are
        return None
    value, size, kind = syms[_VARIABLE]
    if size != 4 or kind != 1:  # a 4-byte STT_OBJECT
        return None
    cell = ctypes.c_uint.from_address(bases.pop() + value)
    v = cell.value
    if not (16 <= v <= 1 << 30 and v & (v - 1) == 0):
        return None
    return cell


class Dozer:
    """The spin timeouts of the process's OpenBLAS libraries, and how many kernels have
    them shortened now (one instance: :data:`DOZER`)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cells = None  # {path: c_uint or None}, looked up on first use
        self._modules = -1  # len(sys.modules) when the libraries were looked up
        self._saved = []  # [(c_uint, its value before the shortening)] while depth > 0
        #: Parks pending (every thread's): the spin is short while this is above 0.
        self.depth = 0

    def cells(self) -> list:
        """The timeout cells of every OpenBLAS library mapped now (looked up again after
        new imports; a library whose variable was not found is not looked at twice)."""
        if self._cells is None or self._modules != len(sys.modules):
            known = self._cells or {}
            self._cells = {p: known[p] if p in known else _timeout_of(p) for p in sorted(_openblas_paths())}
            self._modules = len(sys.modules)
        return [c for c in self._cells.values() if c is not None]

    def doze(self) -> bool:
        """Shorten every library's spin (the first of nested calls); True if any is."""
        with self._lock:
            if self.depth == 0:
                self._saved = [(c, c.value) for c in self.cells()]
                if not self._saved:
                    return False
                for cell, _ in self._saved:
                    cell.value = SHORT_SPIN
            self.depth += 1
            return True

    def wake(self) -> None:
        """Undo one :meth:`doze`: the last one writes every library's value back."""
        with self._lock:
            if self.depth == 0:
                return
            self.depth -= 1
            if self.depth == 0:
                for cell, own in self._saved:
                    cell.value = own
                self._saved = []


def mapped_files() -> set | None:
    """The paths of the files mapped into this process (Linux; None where that cannot be
    read). ``_jit`` looks for libgomp with it too."""
    try:
        with open("/proc/self/maps") as f:
            rows = (line.split(maxsplit=5) for line in f)
            return {r[5].strip() for r in rows if len(r) == 6}  # anonymous mappings have no path
    except OSError:
        return None


def _openblas_paths() -> set:
    """The OpenBLAS libraries mapped into this process (Linux; none elsewhere)."""
    return {p for p in mapped_files() or () if "openblas" in os.path.basename(p).lower() and ".so" in p}


#: The process's dozer.
DOZER = Dozer()
