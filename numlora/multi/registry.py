"""The bank's names and ids, published as immutable snapshots.

A :class:`Snapshot` is one consistent state of the bank: the per-id tables (pool block,
float offset, rank, scaling, live), the name -> id map and the pool blocks. Readers
(``forward``, ``lora_arrays``, ...) take the current one, register on it for the length of
the call (:meth:`Registry.enter` / :meth:`Registry.leave`) and resolve names and ids in it.
Writers (one at a time, under the bank's writer lock) never change a published snapshot:
they copy the small tables, change the copy and swap a new snapshot in
(:meth:`Registry.publish`). :meth:`Registry.oldest_reader` tells the page pool which freed
pages no reader can still read.
"""

from __future__ import annotations

import threading

import numpy as np

from .. import _validate as validate
from .._dispatch import is_device_array
from ..device import to_host
from ..errors import DTypeError, DuplicateLayerError, LayerNotFoundError, NonFiniteError, ShapeError

__all__ = ["TABLES", "TABLE_DTYPES", "Lease", "Registry", "Snapshot", "empty_tables"]

#: The per-adapter-id tables of a snapshot (numpy arrays indexed by id, grown together).
TABLES = ("ad_block", "ad_off", "ad_rank", "ad_scaling", "live")
TABLE_DTYPES = (np.int64, np.int64, np.int64, np.float32, bool)


def empty_tables(cap: int = 8) -> tuple:
    """The tables of a bank without adapters, room for ``cap`` ids."""
    return tuple(np.zeros(cap, dt) for dt in TABLE_DTYPES)


class Snapshot:
    """One consistent state of the bank, what a reader uses from start to end: the per-id
    tables, the name -> id map, the pool blocks; and the lookups of names and ids in it.
    Never changed once published: a writer makes a new one and swaps it in. Two fields
    change after publication: ``readers`` (the readers using it, under the registry's
    lock) and ``kblocks`` (``blocks`` as the CPU kernel takes them, made on first use by
    whichever reader needs it first; the same content whoever makes it)."""

    __slots__ = (
        "ad_block",
        "ad_off",
        "ad_rank",
        "ad_scaling",
        "blocks",
        "gen",
        "kblocks",
        "live",
        "names",
        "next_id",
        "readers",
    )

    def __init__(self, gen, blocks, kblocks, tables, next_id, names):
        self.gen = gen
        self.blocks = blocks      # tuple of 1-D float32 arrays (numpy or device; size 0: released)
        self.kblocks = kblocks
        self.ad_block, self.ad_off, self.ad_rank, self.ad_scaling, self.live = tables
        self.next_id = next_id
        self.names = names        # {name: id}
        self.readers = 0

    def tables(self):
        return self.ad_block, self.ad_off, self.ad_rank, self.ad_scaling, self.live

    # --- lookups ---------------------------------------------------------------------
    def index(self, name) -> int:
        """The id of adapter ``name``; LayerNotFoundError naming the known ones."""
        try:
            return self.names[name]
        except (KeyError, TypeError):
            names = self.names
            known = ", ".join(repr(n) for n in list(names)[:20]) or "none"
            more = f" (and {len(names) - 20} more)" if len(names) > 20 else ""
            raise LayerNotFoundError(f"adapter {name!r} is not in the bank; known adapters: {known}{more}") from None

    def ids(self, names) -> np.ndarray:
        """int64 ids of a sequence of names (None or -1: the base alone)."""
        out = np.empty(len(names), np.int64)
        for i, nm in enumerate(names):
            if nm is None or (isinstance(nm, (int, np.integer)) and not isinstance(nm, bool) and nm == -1):
                out[i] = -1
            elif isinstance(nm, str):
                out[i] = self.index(nm)
            else:
                raise DTypeError(f"expected adapter names (str) or None for the base alone, got "
                                 f"{type(nm).__name__} at row {i}")
        return out

    def rows(self, adapters, scale, n, one_d):
        """(ids (n,) int64, rowscale (n,) float32) of a forward's ``adapters`` and ``scale``
        (host values; device arrays are copied to the host: the grouping is planned there)."""
        if is_device_array(adapters):
            adapters = to_host(adapters)
        if one_d and (isinstance(adapters, (str, int, np.integer)) or adapters is None):
            adapters = [adapters]
        return self.row_ids(adapters, n), row_scales(scale, n, one_d)

    def row_ids(self, adapters, n):
        """int64 ids (n,) of a forward's ``adapters``, checked against this snapshot."""
        if isinstance(adapters, np.ndarray) and adapters.dtype.kind in "iu":
            ids = adapters
        else:
            want = (f"expected adapters with one entry per row of x (a sequence of {n} names, ids or None, or an "
                    f"int array of shape ({n},)), got ")
            if adapters is None or isinstance(adapters, (str, bytes)):
                what = "None" if adapters is None else f"a single {type(adapters).__name__}"
                raise DTypeError(want + what + ("; pass [None] * n for the base alone" if adapters is None else ""))
            try:
                seq = list(adapters)
            except TypeError:
                raise DTypeError(want + type(adapters).__name__) from None
            if all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in seq):
                vals = [int(a) for a in seq]  # exact: no uint64 2**64 - 1 wrapping to -1
                if vals and (min(vals) < -1 or max(vals) >= self.next_id):
                    raise self._bad_ids(vals)
                ids = np.array(vals, np.int64)
            else:
                ids = self.ids(seq)
        if ids.ndim != 1 or ids.shape[0] != n:
            raise ShapeError(f"expected one adapter per row of x: adapters of shape ({n},), got {ids.shape}")
        if n:
            # the range first, on the ids as given: an out-of-range id of any integer dtype
            # (uint64 2**64 - 1...) is refused before the conversion to int64 could wrap it
            lo, hi = int(ids.min()), int(ids.max())
            if lo < -1 or hi >= self.next_id:
                raise self._bad_ids(ids.tolist())
            ids = ids.astype(np.int64, copy=False)
            if not self.live[ids[ids >= 0]].all():
                raise self._bad_ids(ids.tolist())
            return ids
        return ids.astype(np.int64, copy=False)

    def _bad_ids(self, vals):
        bad = next(i for i in vals if i < -1 or i >= self.next_id or (i >= 0 and not self.live[i]))
        return LayerNotFoundError(f"adapter id {bad} is not in the bank (ids of live adapters: "
                                  f"{sorted(self.names.values())[:20]}, or -1 for the base alone)")


def row_scales(scale, n, one_d):
    """The (n,) float32 per-row multipliers of a forward's ``scale`` (None: ones), each
    finite in float32."""
    if scale is None:
        return np.ones(n, np.float32)
    if is_device_array(scale):
        scale = to_host(scale)
    if one_d and not isinstance(scale, np.ndarray) and np.ndim(scale) == 0:
        return np.full(1, validate.real_scalar("scale", scale), np.float32)
    sc = validate.float_array("scale", np.atleast_1d(scale) if one_d else scale, 1, allow_empty=True)
    validate.expect_shape("scale", sc, (n,))
    with np.errstate(over="ignore"):  # a float64 beyond float32's range: refused just below
        rowscale = np.ascontiguousarray(sc, np.float32)
    if not np.isfinite(rowscale).all():
        i = int(np.flatnonzero(~np.isfinite(rowscale))[0])
        raise NonFiniteError(f"scale must be finite in float32 (|scale| <= {validate.F32_MAX:.8g}), got "
                             f"{float(sc[i]):g} at row {i}")
    return rowscale


class Lease:
    """A reader registration on one snapshot (its pages are not recycled while the lease
    lives), released by :meth:`release` or when the object goes away. A pickled bank's
    state holds one, so that the pool blocks it refers to without copying keep their
    contents until the pickler has written them. Pickles as None."""

    __slots__ = ("_registry", "_snap")

    def __init__(self, registry, snap):
        self._registry, self._snap = registry, snap

    def release(self):
        snap, self._snap = self._snap, None
        if snap is not None:
            self._registry.leave(snap)

    __del__ = release

    def __reduce__(self):
        return (type(None), ())


class Registry:
    """The names, ids and snapshots of one bank. ``snap`` is the current snapshot;
    ``rlock`` guards the swap and the reader counts (short holds only). It is re-entrant
    because a :class:`Lease` dropped by the garbage collector leaves its snapshot from
    whatever code ran then, possibly code that holds the lock. Everything but
    :meth:`enter`, :meth:`leave` and the snapshot's lookups is for writers, which take
    turns on the bank's writer lock."""

    def __init__(self, blocks, tables, next_id, names, free_ids):
        self.rlock = threading.RLock()
        self.snap = Snapshot(0, tuple(blocks), None, tables, next_id, names)
        self.free_ids = free_ids  # ids of removed adapters, given out again
        self._retired = []        # replaced snapshots that had readers when replaced

    def enter(self) -> Snapshot:
        """The current snapshot, registered as read until :meth:`leave`."""
        with self.rlock:
            s = self.snap
            s.readers += 1
        return s

    def leave(self, s: Snapshot) -> None:
        with self.rlock:
            s.readers -= 1

    def lease(self) -> Lease:
        return Lease(self, self.enter())

    def publish(self, blocks=None, tables=None, names=None, next_id=None) -> int:
        """Swap in a snapshot with the given changes (``blocks``: a tuple of the pool's
        blocks when they changed); returns its generation."""
        old = self.snap
        new = Snapshot(old.gen + 1, old.blocks if blocks is None else blocks, old.kblocks if blocks is None else None,
                       old.tables() if tables is None else tables, old.next_id if next_id is None else next_id,
                       old.names if names is None else names)
        with self.rlock:
            self.snap = new
            if old.readers:
                self._retired = [s for s in self._retired if s.readers]
                self._retired.append(old)
        return new.gen

    def oldest_reader(self):
        """The generation of the oldest snapshot a reader still uses, None when no reader
        uses a replaced one: pages freed by the snapshot of generation g may be recycled
        when this is None or >= g."""
        with self.rlock:
            self._retired = [s for s in self._retired if s.readers]
            return min((s.gen for s in self._retired), default=None)

    def add(self, name, block, off, rank, scaling, blocks) -> int:
        """Publish adapter ``name`` (not in the bank yet; its pages written already) with
        the pool's ``blocks`` when they changed for it (None otherwise); returns its id."""
        snap = self.snap
        tables = tuple(t.copy() for t in snap.tables())
        next_id = snap.next_id
        if self.free_ids:
            k = self.free_ids.pop()
        else:
            k = next_id
            next_id += 1
            if k >= tables[0].size:
                cap = 2 * tables[0].size
                tables = tuple(np.concatenate([t, np.zeros(cap - t.size, t.dtype)]) for t in tables)
        ad_block, ad_off, ad_rank, ad_scaling, live = tables
        ad_block[k], ad_off[k], ad_rank[k], ad_scaling[k] = block, off, rank, scaling
        live[k] = True
        names = dict(snap.names)
        names[name] = k
        self.publish(blocks, tables, names, next_id)
        return k

    def remove(self, name):
        """Unpublish adapter ``name``: ``(generation, block, offset, rank)`` of the
        snapshot without it and of its pages, which readers of older snapshots may still
        read."""
        snap = self.snap
        k = snap.index(name)
        tables = tuple(t.copy() for t in snap.tables())
        ad_block, ad_off, ad_rank, _, live = tables
        where = int(ad_block[k]), int(ad_off[k]), int(ad_rank[k])
        live[k] = False
        ad_rank[k] = 0
        names = dict(snap.names)
        del names[name]
        gen = self.publish(tables=tables, names=names)
        self.free_ids.append(k)
        return (gen,) + where


def duplicate(name):
    return DuplicateLayerError(f"adapter {name!r} is already in the bank; remove it first to replace it")
