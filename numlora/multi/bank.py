"""Many adapters, one batch: a bank of LoRA adapters over one base weight (multi-tenant
serving, Punica / S-LoRA style) and its batched forward.

``y[i] = x[i] W^T + scale_i * scaling_k * (x[i] A_k^T) B_k^T`` with ``k = adapter[i]``
(``-1``: the base alone). See ``docs/multi.md`` for the design; in short:

- **Storage**: adapters live in float32 pool blocks, each adapter in ``rank`` consecutive
  *pages* of ``in + out`` floats (its ``A^T`` then its ``B^T``), never padded to the
  largest rank. Blocks hold ``block_pages`` pages (16 MiB by default); an adapter larger
  than a block gets a block of its own. ``add`` copies only the new adapter (first fit
  in the blocks' free lists, a new block when none fits: never a copy of the others);
  ``remove`` returns its pages to the free list.
- **Grouping**: the rows of a batch are sorted by adapter (stable), so each adapter's A
  and B are read once per batch whatever the row order (SGMV).
- **Row stability**: a row's output does not depend on the other rows of the batch or on
  their order. The low-rank part is a numba kernel with a fixed per-row summation order.
  The base product goes to BLAS in *calibrated* batch sizes: OpenBLAS picks different
  kernels for different batch sizes (GEMV for one row, small-matrix kernels for small
  products), so the bank pads each batch (or chunk of ``REF_ROWS`` rows) up to a bucket
  size ``1, 2, 4, ..., REF_ROWS`` that was checked, on first use, to give the same bits
  as a ``REF_ROWS``-row product for probe rows at other positions; a bucket that fails
  is never used (the next larger one is). ``row_stable=False`` skips all that and uses
  the fastest base path for the batch size (then a row may differ in the last bits
  between batch sizes).
- **Threads**: readers (``forward``, ...) work on an immutable *snapshot* (the per-id
  tables, the names, the tuple of blocks) that writers (``add``, ``remove``,
  ``reserve``, one at a time under a lock) replace whole, copy-on-write; a reader
  registers on its snapshot for the length of the call, and the pages of a removed
  adapter return to the free lists only when no reader of an older snapshot remains.
  So a kernel never reads a block that was freed, resized or refilled under it.
"""

from __future__ import annotations

import threading

import numpy as np

from .. import _validate as v
from .._validate import input_rows, low_rank_arrays, prepare_out, shares_memory
from ..device import is_device_array, to_host
from ..errors import ConfigError, DeviceError, DTypeError, FormatError, ShapeError
from .peft import named_folders, peft_layer
from .pool import PagePool, nbytes
from .product import BUCKETS, REF_ROWS, base_product
from .registry import TABLE_DTYPES, Registry, duplicate, empty_tables

__all__ = ["LoraBank", "multi_lora_forward", "BUCKETS", "REF_ROWS"]

#: Default bytes per pool block.
BLOCK_BYTES = 16 << 20


def _kernels():
    from ..kernels import multi

    return multi


class LoraBank:
    """One base weight and any number of named LoRA adapters, each with its own rank and
    scaling, served together: :meth:`forward` takes a batch whose rows each name their
    adapter.

    Parameters
    ----------
    base : (out, in) float32 / float64 array (kept as is when float32 C-contiguous, else
        converted to a float32 copy), or a 2-D :class:`~numlora.nf4.NF4Tensor`.
    bias : optional (out,) base bias, added to every row.
    block_pages : pages (rank rows, ``in + out`` floats each) per pool block; default
        ``16 MiB / (4 (in + out))``, at least 64.
    row_stable : True (default): a row's output is bit-identical whatever else is in the
        batch and however the batch is ordered (the base product runs in calibrated batch
        sizes, see the module docstring; costs up to ~3x at batch 1). False: the fastest
        base path for each batch size.
    nf4_path : for an NF4 base in row-stable mode, which one arithmetic serves every
        batch size: ``"tiles"`` (default: decoded tiles of W times the batch with BLAS;
        best from ~32 rows up) or ``"fused"`` (the fused NF4 kernel in chunks of
        ``numlora.nf4.FUSED_MAX_ROWS`` rows, never decoding W to memory: several times
        faster for batches of 1-16 rows, about twice slower at 256). Ignored otherwise.

    Notes
    -----
    Adapter ids are small integers, stable while the adapter lives; a removed adapter's
    id may be given to a later one.

    **Threads.** ``forward``, ``add``, ``remove``, ``reserve`` and the inspection methods
    may be called from any number of threads at once, without a lock of your own. Each
    reader (``forward``, ``lora_arrays``, ``index``, ...) works on one *snapshot* of the
    bank, taken when it starts: it sees every adapter added before and none added after,
    whatever the writers do meanwhile. A name or id that is not in the bank at that
    moment raises :class:`~numlora.errors.LayerNotFoundError` (nothing is written to
    ``out``); an adapter removed (or removed and added again under the same name) while
    a forward runs is computed with the values it had when the forward started. The
    pages of a removed adapter are recycled only once every reader that started before
    the removal has finished; until then an ``add`` takes other pages (or a new block).
    Writers take turns on one lock; readers never wait for a writer's copy. The cost
    to a forward is two very short lock holds (see benchmarks/bench_bank_safety.py).

    **Pickling.** A CPU bank pickles (names, ids, ranks, scalings, pool layout and
    values, base and bias) and loads as an equal bank whose forwards give the same bits;
    the pool blocks go into the pickle as plain numpy arrays, so protocol 5 with a
    ``buffer_callback`` writes them out of band without a copy (those buffers are views
    of the live pool: use them before changing the bank). Loading uses writable buffers
    in place and copies read-only ones once (later adds write into the blocks); loading
    in the same process from the live bank's own buffers would give two banks over one
    pool, so don't: ``copy.copy`` / ``copy.deepcopy`` give a bank with its own pool. A
    GPU bank refuses to pickle (:class:`~numlora.errors.DeviceError`): pickle
    ``bank.to("cpu")``.

    ``bank.to("cuda")`` gives a copy of the bank whose base, bias and pool live on the
    GPU (see :meth:`to` and docs/gpu.md).
    """

    _device = "cpu"

    def __init__(self, base, *, bias=None, block_pages=None, row_stable=True, nf4_path="tiles"):
        from ..nf4 import NF4Tensor

        if isinstance(base, NF4Tensor):
            if len(base.shape) != 2:
                raise ShapeError(f"expected a 2-D NF4 base weight, got shape {base.shape}")
            self._nf4 = base
            self._weight = None
            out_f, in_f = base.shape
        else:
            w = v.float_array("base", base, 2)
            self._weight = np.ascontiguousarray(w, np.float32)
            self._nf4 = None
            out_f, in_f = w.shape
        self._out_f, self._in_f = int(out_f), int(in_f)
        if bias is not None:
            bias = v.float_array("bias", bias, 1)
            v.expect_shape("bias", bias, (out_f,))
            bias = np.array(bias, np.float32)
        self._bias = bias
        page = self._in_f + self._out_f
        if block_pages is None:
            block_pages = min(1024, max(64, BLOCK_BYTES // (4 * page)))
        block_pages = v.int_scalar("block_pages", block_pages, minimum=1)
        if not isinstance(row_stable, (bool, np.bool_)):
            raise ConfigError(f"row_stable must be True or False, got {row_stable!r}")
        self._row_stable = bool(row_stable)
        if nf4_path not in ("tiles", "fused"):
            raise ConfigError(f"nf4_path must be 'tiles' or 'fused', got {nf4_path!r}")
        self._nf4_path = nf4_path
        self._init_state(block_pages=block_pages, blocks=[], free=[], dedicated=[], spare_ids=[], free_ids=[],
                         pending=[], tables=empty_tables(), next_id=0, names={})

    def _init_state(self, *, block_pages, blocks, free, dedicated, spare_ids, free_ids, pending, tables, next_id,
                    names):
        """The writer's state, the locks and the first snapshot (the constructor, to(),
        unpickling)."""
        self._base = (base_product(self._weight, self._nf4, self._row_stable, self._nf4_path)
                      if self._device == "cpu" else None)
        # writers' state (only touched under _wlock)
        self._pool = PagePool(self._in_f + self._out_f, block_pages, self._new_block, blocks=blocks, free=free,
                              dedicated=dedicated, spare_ids=spare_ids, pending=pending)
        self._registry = Registry(blocks, tables, next_id, names, free_ids)
        self._wlock = threading.Lock()   # writers take turns
        self._reclaim()

    def _reclaim(self) -> None:
        """Return the pages of removed adapters to the free lists once no reader that
        could still read them runs: pages freed by the snapshot of generation g wait
        while a reader holds a snapshot older than g. Writers only."""
        pool = self._pool
        if pool.pending:
            pool.recycle(self._registry.oldest_reader(), self._settle)
        blocks = pool.take_blocks()
        if blocks is not None:
            self._registry.publish(blocks)

    def _settle(self):
        if self._device == "cuda":
            # forwards launch their kernels without waiting (on whichever stream):
            # they must be done before their pages are written or freed
            from ..device import cuda_module

            cuda_module().synchronize()

    # --- facts -----------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self._in_f

    @property
    def out_features(self) -> int:
        return self._out_f

    @property
    def base(self):
        """The base weight: the float32 array or the NF4Tensor."""
        return self._weight if self._nf4 is None else self._nf4

    @property
    def row_stable(self) -> bool:
        return self._row_stable

    @property
    def names(self) -> list[str]:
        """Adapter names, in order of their ids."""
        names = self._registry.snap.names
        return sorted(names, key=names.__getitem__)

    def __len__(self) -> int:
        return len(self._registry.snap.names)

    def __contains__(self, name) -> bool:
        try:
            return name in self._registry.snap.names
        except TypeError:  # unhashable
            return False

    def __iter__(self):
        return iter(self.names)

    def index(self, name: str) -> int:
        """The id of adapter ``name`` (what :meth:`forward` takes per row)."""
        return self._registry.snap.index(name)

    def ids(self, names) -> np.ndarray:
        """int64 ids of a sequence of adapter names (None or -1: the base alone); keep it
        to call :meth:`forward` repeatedly without looking names up."""
        return self._registry.snap.ids(names)

    def rank(self, name: str) -> int:
        snap = self._registry.snap
        return int(snap.ad_rank[snap.index(name)])

    def scaling(self, name: str) -> float:
        snap = self._registry.snap
        return float(snap.ad_scaling[snap.index(name)])

    def lora_arrays(self, name: str):
        """(lora_a (r, in), lora_b (out, r)) copies of adapter ``name`` as stored (float32)."""
        snap = self._registry.enter()
        try:
            k = snap.index(name)
            r = int(snap.ad_rank[k])
            off = int(snap.ad_off[k])
            flat = snap.blocks[snap.ad_block[k]][off:off + r * (self._in_f + self._out_f)]
            if self._device == "cuda":  # device arrays, through the host (an inspection, not a hot path)
                from ..device import to_device

                flat = flat.copy_to_host()
                wrap = to_device
            else:
                wrap = np.asarray
            at = flat[:self._in_f * r].reshape(self._in_f, r)
            bt = flat[self._in_f * r:].reshape(r, self._out_f)
            # always copies (at rank 1 the transposes are contiguous views of the pool)
            return wrap(np.array(at.T, order="C")), wrap(np.array(bt.T, order="C"))
        finally:
            self._registry.leave(snap)

    def memory(self) -> dict:
        """Bytes: ``base`` (the base weight's storage), ``adapters`` (what the live
        adapters need: ``4 * rank * (in + out)`` each), ``pool`` (allocated pool blocks),
        ``free`` (``pool - adapters``: free pages in the blocks, including those of
        adapters removed while a forward still ran, recycled once it ends), ``padded``
        (what one tensor padded to the largest rank would take for the same adapters, for
        comparison), and ``blocks`` (number of allocated blocks)."""
        if self._nf4 is None:
            base = nbytes(self._weight)
        elif self._device == "cuda":
            base = nbytes(self._nf4.packed) + nbytes(self._nf4.scales)
        else:
            base = self._nf4.nbytes
        with self._wlock:
            snap = self._registry.snap
            blocks = list(self._pool.blocks)
        live = snap.live[: snap.next_id]
        ranks = snap.ad_rank[: snap.next_id][live]
        page_bytes = 4 * (self._in_f + self._out_f)
        used = int(ranks.sum()) * page_bytes
        pool = sum(nbytes(b) for b in blocks)
        padded = int(ranks.size * (ranks.max() if ranks.size else 0)) * page_bytes
        return {"base": base, "adapters": used, "pool": pool, "free": pool - used, "padded": padded,
                "blocks": sum(1 for b in blocks if b.size)}

    def __repr__(self) -> str:
        kind = "NF4" if self._nf4 is not None else "float32"
        where = ", device='cuda'" if self._device == "cuda" else ""
        return (f"LoraBank({kind} base {self._out_f} x {self._in_f}, {len(self)} adapters, "
                f"row_stable={self._row_stable}{where})")

    # --- add / remove ----------------------------------------------------------------
    def add(self, name: str, lora_a, lora_b, scaling=1.0) -> int:
        """Add adapter ``name``: ``lora_a`` (r, in), ``lora_b`` (out, r), float32 or
        float64 (stored as float32), any rank r >= 1, and its ``scaling`` (``alpha / r``,
        or ``alpha / sqrt(r)`` for rsLoRA; a real number finite in float32). Copies only
        this adapter into free pool pages (a new pool block when none fits). Returns its
        id. Forwards already running do not see it; those starting after it returns do."""
        if not isinstance(name, str):
            raise DTypeError(f"adapter name must be a str, got {type(name).__name__}")
        if not name:
            raise ConfigError("adapter name must be a non-empty str")
        if name in self._registry.snap.names:
            raise duplicate(name)
        on_gpu = is_device_array(lora_a) or is_device_array(lora_b)
        if on_gpu:
            if self._device != "cuda":
                raise DeviceError("this bank is on the CPU: expected lora_a and lora_b as host arrays, got a device "
                                  "array; copy them with numlora.to_host, or move the bank with bank.to('cuda')")
            from ..cuda import ops as C

            lora_a, lora_b, r = C._low_rank(lora_a, lora_b, self._out_f, self._in_f)
        else:
            lora_a, lora_b, r = low_rank_arrays(lora_a, lora_b, self._out_f, self._in_f)
            lora_a = np.ascontiguousarray(lora_a, np.float32)
            lora_b = np.ascontiguousarray(lora_b, np.float32)
        s = np.float32(v.real_scalar("scaling", scaling))
        with self._wlock:
            registry, pool = self._registry, self._pool
            if name in registry.snap.names:
                raise duplicate(name)
            self._reclaim()
            bid, page = pool.alloc(r)
            try:
                self._write(pool.pages(bid, page, r), lora_a, lora_b, on_gpu)
            except BaseException:
                pool.release(bid, page, r)  # no reader has seen these pages
                self._reclaim()
                raise
            return registry.add(name, bid, page * pool.page, r, s, pool.take_blocks())

    def _write(self, dst, lora_a, lora_b, on_gpu):
        """Pack A^T and B^T into the pool pages ``dst``."""
        if on_gpu:
            from ..cuda import kernels as K

            K.pack_adapter[max(1, -(-dst.size // K.THREADS)), K.THREADS](lora_a, lora_b, dst)
        elif self._device == "cuda":  # packed on the host, one copy of this adapter to the device
            tmp = np.empty(dst.size, np.float32)
            _kernels().pack_adapter(lora_a, lora_b, tmp)
            dst.copy_to_device(tmp)
        else:
            _kernels().pack_adapter(lora_a, lora_b, dst)

    def remove(self, name: str) -> None:
        """Remove adapter ``name``; its pages return to the pool's free list (a block
        given to one over-sized adapter is released) once no forward that started before
        the removal still runs. Other adapters keep their ids and storage."""
        with self._wlock:
            pool = self._pool
            gen, bid, off, r = self._registry.remove(name, pool.take_blocks())
            pool.defer(gen, bid, off // pool.page, r)
            self._reclaim()

    def reserve(self, pages: int) -> None:
        """Make sure the pool has at least ``pages`` free pages (rank rows) in regular
        blocks, allocating and touching new blocks now (a server's start-up), so that
        later adds of ranks <= ``block_pages`` write into memory that is already mapped:
        no page faults while serving. ``bank.reserve(sum of ranks)`` before the adds."""
        pages = v.int_scalar("pages", pages, minimum=0)
        with self._wlock:
            self._reclaim()
            self._pool.reserve(pages, self._touch)
            self._reclaim()

    def _new_block(self, size):
        """A new pool block of ``size`` floats on the bank's device."""
        if self._device == "cuda":
            from ..device import cuda_module

            return cuda_module().device_array(size, np.float32)
        return np.empty(size, np.float32)

    def _touch(self, block):
        if self._device == "cpu":  # touch the pages now (device memory is mapped when allocated)
            block.fill(0)

    @staticmethod
    def _kernel_blocks(snap):
        """The snapshot's blocks as a numba typed list (what the kernel takes), made once
        per snapshot whose blocks changed."""
        lst = snap.kblocks
        if lst is None:
            from numba import types
            from numba.typed import List

            lst = List.empty_list(types.float32[::1])
            for b in snap.blocks:
                lst.append(b)
            snap.kblocks = lst
        return lst

    # --- state: to(), pickling, copies -----------------------------------------------
    def _state(self) -> dict:
        """Everything that defines the bank, as plain values (the pool blocks and tables
        not copied). Under the writer lock."""
        snap = self._registry.snap
        return {"version": 1, "weight": self._weight, "nf4": self._nf4, "bias": self._bias,
                "in_f": self._in_f, "out_f": self._out_f, "block_pages": self._pool.block_pages,
                "row_stable": self._row_stable, "nf4_path": self._nf4_path,
                **self._pool.state(), "free_ids": list(self._registry.free_ids),
                "ad_page": snap.ad_off // self._pool.page,
                "tables": snap.tables(), "next_id": snap.next_id, "names": dict(snap.names)}

    def _load(self, st: dict, device: str) -> None:
        """Become the bank of state ``st`` (from :meth:`_state`) on ``device``; pages
        still waiting for readers of the old bank are free here."""
        self._weight, self._nf4, self._bias = st["weight"], st["nf4"], st["bias"]
        self._in_f, self._out_f = st["in_f"], st["out_f"]
        self._row_stable, self._nf4_path = st["row_stable"], st["nf4_path"]
        self._device = device
        self._init_state(block_pages=st["block_pages"], blocks=st["blocks"], free=st["free"],
                         dedicated=st["dedicated"], spare_ids=st["spare_ids"], free_ids=st["free_ids"],
                         pending=[(0,) + tuple(p[1:]) for p in st["pending"]], tables=tuple(st["tables"]),
                         next_id=st["next_id"], names=st["names"])

    def __getstate__(self):
        if self._device != "cpu":
            raise DeviceError("a LoraBank on the GPU cannot be pickled (device memory is not picklable): expected a "
                              "CPU bank, got device='cuda'; pickle bank.to('cpu') instead")
        with self._wlock:
            st = self._state()
            st["lease"] = self._registry.lease()
        return st

    def __setstate__(self, st):
        if not isinstance(st, dict) or st.get("version") != 1:
            raise FormatError(f"expected the state of a pickled LoraBank (version 1), got "
                              f"{type(st).__name__} {st.get('version') if isinstance(st, dict) else ''}".rstrip())
        st = dict(st)
        st.pop("lease", None)
        # blocks are written by later adds: make sure each is a writable float32 C array
        st["blocks"] = [b if (b.dtype == np.float32 and b.flags.c_contiguous and b.flags.writeable)
                        else np.array(b, np.float32) for b in st["blocks"]]
        st["tables"] = tuple(np.ascontiguousarray(t, dt) for t, dt in zip(st["tables"], TABLE_DTYPES))
        self._load(st, "cpu")

    def __copy__(self):
        """A bank with the same adapters in its own pool (a copy of the blocks): two
        banks never share pages."""
        st = self.__getstate__()
        lease = st.pop("lease")
        try:
            st["blocks"] = [b.copy() for b in st["blocks"]]
        finally:
            lease.release()
        new = object.__new__(type(self))
        new.__setstate__(st)
        return new

    # --- PEFT ------------------------------------------------------------------------
    def add_peft(self, name: str, folder, module: str | None = None) -> int:
        """Add the layer ``module`` of the PEFT adapter folder ``folder`` (read with
        :func:`numlora.load_peft_adapter`) as adapter ``name``; ``module`` may be omitted
        when the folder holds a single layer. DoRA and LoRA-bias layers are refused
        (the bank computes plain LoRA). Returns the id."""
        return self.add(name, *peft_layer(folder, module))

    @classmethod
    def from_peft(cls, base, folders, module: str | None = None, **kwargs) -> "LoraBank":
        """A bank over ``base`` with one adapter per PEFT folder: ``folders`` is a mapping
        ``{name: folder}`` or a sequence of folders (each named by its last path
        component). ``module``: the layer to take from each folder (see
        :meth:`add_peft`). Other keyword arguments go to the constructor."""
        bank = cls(base, **kwargs)
        for name, folder in named_folders(folders):
            bank.add_peft(name, folder, module)
        return bank

    # --- forward ---------------------------------------------------------------------
    def forward(self, x, adapters, scale=None, out=None):
        """``y[i] = x[i] W^T (+ bias) + scale[i] * scaling_k (x[i] A_k^T) B_k^T``, ``k`` the
        adapter of row i.

        Parameters
        ----------
        x : (in,) or (n, in) float32 / float64 (computed in float32)
        adapters : per row, an adapter name (str), or id (int, see :meth:`index` /
            :meth:`ids`), or None / -1 for the base alone; an int array (any integer
            dtype) is used as is. For a 1-D ``x``, one entry. Ids outside the bank
            (including values no int64 holds) raise LayerNotFoundError.
        scale : optional (n,) per-row multiplier of the adapter's scaling (a real number
            for a 1-D ``x``); every value must be finite in float32.
        out : optional C-contiguous float32 buffer of shape (out,) or (n, out). It may be
            ``x`` itself, or overlap ``x``, ``adapters`` or ``scale``; the result is the
            same as with a separate buffer (``x`` and ``scale`` are then read from a copy,
            ``adapters`` are read before anything is written). It may not overlap the
            bank's base weight (ShapeError: the forward would overwrite it).

        Returns
        -------
        out
            Rows sharing an adapter are grouped internally, so each adapter's A and B
            are read once per batch. On a GPU bank (:meth:`to`) ``x`` and ``out`` are
            device arrays and so is the result.

        Notes
        -----
        The names and ids are resolved in the snapshot of the bank taken when the call
        starts (see the class notes on threads): an adapter not in the bank then raises
        LayerNotFoundError before anything is written to ``out``; one removed or
        replaced while the call runs is computed with its values at the start.
        """
        if self._device == "cuda":
            return self._forward_gpu(x, adapters, scale, out)
        x = input_rows(x, self._in_f)
        one_d = x.ndim == 1
        n = 1 if one_d else x.shape[0]
        given = out
        registry = self._registry
        rlock = registry.rlock
        with rlock:  # registry.enter(), inline: this is the hot path
            snap = registry.snap
            snap.readers += 1
        try:
            ids, rowscale = snap.rows(adapters, scale, n, one_d)
            out = prepare_out(out, x, self._out_f, np.float32)
            if n == 0:
                return out
            x2 = np.ascontiguousarray(x.reshape(-1, self._in_f), np.float32)
            plan = self._plan(snap, ids)  # ids are not read after this: they may overlap out
            if given is not None:
                x2, rowscale = self._unaliased(out, x2, rowscale, scale)
            out2 = out.reshape(-1, self._out_f)
            self._base(x2, out2)
            self._add_low_rank(snap, plan, x2, rowscale, out2)
            if self._bias is not None:
                out2 += self._bias
            return out
        finally:
            with rlock:
                snap.readers -= 1

    __call__ = forward

    def _unaliased(self, out, x2, rowscale, scale):
        """``x2`` and ``rowscale``, copied where they share memory with the caller's
        ``out`` (written while they are read); refuses an ``out`` over the base weight."""
        w = self._weight
        if w is not None and shares_memory(out, w):
            raise ShapeError("out shares memory with the bank's base weight: the forward would overwrite the weight "
                             "while reading it; expected a separate out buffer")
        if np.may_share_memory(out, x2):
            x2 = x2.copy()
        if scale is not None and np.may_share_memory(out, rowscale):
            rowscale = rowscale.copy()
        return x2, rowscale

    @staticmethod
    def _plan(snap, ids):
        """The grouping of a batch's adapter rows (made before anything is written to
        ``out``, so ``ids`` may share memory with it): ``(order, seg_start, seg_adapter,
        u)`` or None when every row is the base alone. ``order[seg_start[g]:seg_start[g +
        1]]`` are the batch rows of adapter ``seg_adapter[g]``; ``u`` is the kernel's
        scratch, sized by the largest rank of the snapshot the kernel reads."""
        order = np.argsort(ids, kind="stable")
        sid = ids[order]
        first = int(np.searchsorted(sid, 0))
        if first == sid.size:
            return None
        order = order[first:]
        sid = sid[first:]
        cuts = np.flatnonzero(sid[1:] != sid[:-1]) + 1
        seg_start = np.empty(cuts.size + 2, np.int64)
        seg_start[0] = 0
        seg_start[1:-1] = cuts
        seg_start[-1] = sid.size
        seg_adapter = np.ascontiguousarray(sid[seg_start[:-1]])
        rmax = int(snap.ad_rank[seg_adapter].max())
        return order, seg_start, seg_adapter, np.empty((sid.size, rmax), np.float32)

    def _add_low_rank(self, snap, plan, x2, rowscale, out2):
        """out2 += the low-rank part of the rows of ``plan`` (see :meth:`_plan`)."""
        if plan is None:
            return
        order, seg_start, seg_adapter, u = plan
        # positions in u are relative to the grouped rows; the kernel reads x / rowscale /
        # out by batch row through `order`; every table and block comes from one snapshot
        _kernels().multi_lora_add_serial(x2, order, seg_start, seg_adapter, rowscale, self._kernel_blocks(snap),
                                         snap.ad_block, snap.ad_off, snap.ad_rank, snap.ad_scaling, u, out2)

    # --- the GPU ---------------------------------------------------------------------
    @property
    def device(self) -> str:
        """Where the base, bias and adapter pool live: ``"cpu"`` or ``"cuda"``."""
        return self._device

    def to(self, device: str) -> "LoraBank":
        """A copy of the bank with its base weight (dense or NF4), bias and adapter pool on
        ``device`` (``"cuda"`` or ``"cpu"``); ``self`` when it is there already. The bank it
        is called on is left as it was. Names, ids, ranks, scalings and the pool layout
        (blocks, pages, free runs) travel unchanged; the adapters' values come back from
        ``to("cpu")`` bit for bit. On the GPU, ``forward`` takes device ``x`` (and host or
        device ``adapters`` / ``scale``) and returns a device array; ``add`` takes host or
        device arrays. The copy is of one consistent state (writers wait meanwhile); the
        new bank has its own locks and follows the same thread rules. See docs/gpu.md."""
        from ..device import _move, to_device

        if not isinstance(device, str) or device not in ("cuda", "cpu"):
            raise ConfigError(f"device must be 'cuda' or 'cpu', got {device!r}")
        if device == self._device:
            return self
        if device == "cuda" and self._nf4 is not None and self._nf4.dtype != "float32":
            raise DTypeError(f"the GPU path is float32 only: the NF4 base decodes to {self._nf4.dtype}")
        with self._wlock:
            st = self._state()
            st["blocks"] = [_move(b, device) if b.size else np.empty(0, np.float32) for b in st["blocks"]]
        if st["weight"] is not None:
            st["weight"] = _move(st["weight"], device)
        if st["nf4"] is not None:
            st["nf4"] = to_device(st["nf4"]) if device == "cuda" else to_host(st["nf4"])
        if st["bias"] is not None:
            st["bias"] = _move(st["bias"], device)
        new = object.__new__(type(self))
        new._load(st, device)
        return new

    def _forward_gpu(self, x, adapters, scale, out):
        """The forward on the GPU: the base product (the tiled kernel; over NF4 the fused
        GEMV for one row when ``row_stable=False``) with the bias in its epilogue, then per
        pool block one shrink and one expand launch over the rows grouped by (block,
        adapter). The grouping is planned on the host from the row ids (small copies to
        the device), in one snapshot of the bank as on the CPU. An ``out`` overlapping
        ``x`` reads ``x`` from a device copy."""
        from ..cuda import ops as C

        if not is_device_array(x):
            raise DeviceError(f"this bank is on the GPU: expected x as a device array, got a host "
                              f"{type(x).__name__}; move it with numlora.to_device(x)")
        x, n = C._rows("x", x, self._in_f)
        registry = self._registry
        snap = registry.enter()
        try:
            ids, rowscale = snap.rows(adapters, scale, n, len(x.shape) == 1)
            out = C._out(out, x, self._out_f)
            if n == 0:
                return out
            if _device_overlap(out, x):
                from ..device import cuda_module

                xc = cuda_module().device_array(tuple(x.shape), np.float32)
                xc.copy_to_device(x)
                x = xc
            self._gpu_products(snap, x, ids, rowscale, out, n, C)
            return out
        finally:
            registry.leave(snap)

    def _gpu_products(self, snap, x, ids, rowscale, out, n, C):
        in_f, out_f = self._in_f, self._out_f
        if self._nf4 is None:
            C.matmul(C._flat(x), in_f, 1, n, out_f, in_f, C._flat(out), out_f, W=C._flat(self._weight), swo=in_f,
                     swk=1, bias=self._bias)
        else:
            C._nf4_forward(x, self._nf4, None, None, 0.0, self._bias, out, fused_gemv=not self._row_stable)
        rows = np.flatnonzero(ids >= 0)
        if rows.size == 0:
            return
        k = ids[rows]
        blk = snap.ad_block[k]
        order = np.lexsort((k, blk))  # by pool block, then adapter (each adapter's A, B read together)
        rows, k, blk = rows[order], k[order], blk[order]
        table = np.ascontiguousarray(np.stack([rows, snap.ad_off[k], snap.ad_rank[k]]), np.int64)
        rs = np.ascontiguousarray(snap.ad_scaling[k] * rowscale[rows], np.float32)
        cuts = np.flatnonzero(blk[1:] != blk[:-1]) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [rows.size]])
        runs = [(snap.blocks[int(blk[p0])], int(p0), int(p1), int(table[2, p0:p1].max()))
                for p0, p1 in zip(starts, ends)]
        C.multi_lora_add(x, out, table, rs, runs)


def _device_span(a):
    """(first byte, end byte) of a C-contiguous device array (a numba device array, an
    object with ``__cuda_array_interface__``, or the simulator's stand-in)."""
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is None:  # the CUDA simulator: a numpy array behind the device array
        cai = a.__array_interface__
    start = int(cai["data"][0])
    return start, start + int(np.prod(tuple(a.shape), dtype=np.int64)) * np.dtype(a.dtype).itemsize


def _device_overlap(a, b) -> bool:
    a0, a1 = _device_span(a)
    b0, b1 = _device_span(b)
    return a0 < b1 and b0 < a1 and a1 > a0 and b1 > b0


def multi_lora_forward(x, bank: LoraBank, adapters, scale=None, out=None):
    """Functional form of :meth:`LoraBank.forward`: ``y[i] = x[i] W^T + scale_i *
    scaling_k (x[i] A_k^T) B_k^T`` for the adapter ``k`` of each row (-1 / None: base
    alone)."""
    if not isinstance(bank, LoraBank):
        raise DTypeError(f"expected a LoraBank, got {type(bank).__name__}")
    return bank.forward(x, adapters, scale=scale, out=out)
