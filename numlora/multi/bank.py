"""LoraBank: one base weight and many named LoRA adapters, served in one batch; the
composition of the bank's pieces.

- :class:`~numlora.multi.pool.PagePool` (``_pool``): where the adapters' values live;
- :class:`~numlora.multi.registry.Registry` (``_registry``): names, ids, ranks, scalings,
  published to readers as immutable snapshots;
- a backend (``_backend``): :class:`~numlora.multi.cpu.CpuBank` or
  :class:`~numlora.multi.gpu.CudaBank`, chosen once (in the constructor and in
  :meth:`LoraBank.to`): the forward, and the pool's memory on its device.

Writers (``add``, ``remove``, ``reserve``) take turns on ``_wlock``; they change the pool
and publish a new snapshot. Readers take the registry's current snapshot and never wait
for a writer.
"""

from __future__ import annotations

import threading

import numpy as np

from .. import _validate as validate
from .._dispatch import check_device
from ..errors import ConfigError, DTypeError, FormatError, ShapeError
from ..nf4 import NF4Tensor
from .cpu import CpuBank
from .peft import named_folders, peft_layer
from .pool import PagePool
from .registry import TABLE_DTYPES, Registry, duplicate, empty_tables

__all__ = ["BLOCK_BYTES", "LoraBank", "multi_lora_forward"]

#: Default bytes per pool block.
BLOCK_BYTES = 16 << 20


def _cuda_backend(nf4):
    """The GPU backend's class (loading numlora.cuda: a DeviceError where there is no GPU)."""
    if nf4 is not None and nf4.dtype != "float32":
        raise DTypeError(f"the GPU path is float32 only: the NF4 base decodes to {nf4.dtype}")
    from .gpu import CudaBank

    return CudaBank


#: device -> the bank's backend class for it (given the NF4 base, or None)
_BACKENDS = {"cpu": lambda nf4: CpuBank, "cuda": _cuda_backend}


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
        ``16 MiB / (4 (in + out))`` pages, clamped to 64 .. 1024.
    row_stable : True (default): a row's output is bit-identical whatever else is in the
        batch and however the batch is ordered (the base product runs in calibrated batch
        sizes, see :mod:`numlora.multi.product`; slower at small batches). False: the
        fastest base path for each batch size.
    nf4_path : for an NF4 base in row-stable mode, which one arithmetic serves every
        batch size: ``"tiles"`` (default: W decoded a panel at a time and multiplied by
        the whole batch with numlora's own GEMM, or decoded tiles with BLAS where the
        panels do not apply; the faster one for large batches) or
        ``"fused"`` (the fused NF4 kernel in chunks
        of ``numlora.nf4.FUSED_MAX_ROWS`` rows, never decoding W to memory: the faster one
        for small batches; benchmarks/bench_bank_nf4_path.py compares them). Ignored
        otherwise.

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
    to a forward is two very short lock holds (benchmarks/bench_bank_safety.py).

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

    def __init__(self, base, *, bias=None, block_pages=None, row_stable=True, nf4_path="tiles"):
        if isinstance(base, NF4Tensor):
            if len(base.shape) != 2:
                raise ShapeError(f"expected a 2-D NF4 base weight, got shape {base.shape}")
            weight, nf4 = None, base
        else:
            w = validate.float_array("base", base, 2)
            weight, nf4 = np.ascontiguousarray(w, np.float32), None
        out_f, in_f = (int(d) for d in (base.shape if nf4 is not None else weight.shape))
        if bias is not None:
            bias = validate.float_array("bias", bias, 1)
            validate.expect_shape("bias", bias, (out_f,))
            bias = np.array(bias, np.float32)
        if block_pages is None:
            block_pages = min(1024, max(64, BLOCK_BYTES // (4 * (in_f + out_f))))
        block_pages = validate.int_scalar("block_pages", block_pages, minimum=1)
        if not isinstance(row_stable, (bool, np.bool_)):
            raise ConfigError(f"row_stable must be True or False, got {row_stable!r}")
        if nf4_path not in ("tiles", "fused"):
            raise ConfigError(f"nf4_path must be 'tiles' or 'fused', got {nf4_path!r}")
        self._load({"weight": weight, "nf4": nf4, "bias": bias, "in_f": in_f, "out_f": out_f,
                    "block_pages": block_pages, "row_stable": bool(row_stable), "nf4_path": nf4_path,
                    "blocks": [], "free": [], "dedicated": [], "spare_ids": [], "pending": [], "free_ids": [],
                    "tables": empty_tables(), "next_id": 0, "names": {}}, CpuBank)

    def _load(self, st: dict, backend) -> None:
        """Become the bank of state ``st`` (see :meth:`_state`) with the backend class
        ``backend``; pages still waiting for readers of an old bank are free here."""
        self._weight, self._nf4, self._bias = st["weight"], st["nf4"], st["bias"]
        self._in_f, self._out_f = st["in_f"], st["out_f"]
        self._row_stable, self._nf4_path = st["row_stable"], st["nf4_path"]
        self._backend = backend(self._weight, self._nf4, self._bias, self._row_stable, self._nf4_path)
        self._pool = PagePool(self._in_f + self._out_f, st["block_pages"], self._backend.new_block,
                              blocks=st["blocks"], free=st["free"], dedicated=st["dedicated"],
                              spare_ids=st["spare_ids"], pending=[(0,) + tuple(p[1:]) for p in st["pending"]])
        self._registry = Registry(st["blocks"], tuple(st["tables"]), st["next_id"], st["names"], st["free_ids"])
        self._wlock = threading.Lock()  # writers take turns
        self._reclaim()

    def _reclaim(self) -> None:
        """Return the pages of removed adapters that no reader can still read to the free
        lists, and publish the pool's blocks if they changed. Writers only."""
        pool = self._pool
        if pool.pending:
            pool.recycle(self._registry.oldest_reader(), self._backend.settle)
        blocks = pool.take_blocks()
        if blocks is not None:
            self._registry.publish(blocks)

    # --- facts -----------------------------------------------------------------------
    @property
    def device(self) -> str:
        """Where the base, bias and adapter pool live: ``"cpu"`` or ``"cuda"``."""
        return self._backend.device

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
        """(lora_a (r, in), lora_b (out, r)) copies of adapter ``name`` as stored (float32;
        device arrays on a GPU bank)."""
        registry, backend = self._registry, self._backend
        snap = registry.enter()
        try:
            k = snap.index(name)
            r = int(snap.ad_rank[k])
            off = int(snap.ad_off[k])
            flat = backend.host(snap.blocks[snap.ad_block[k]][off:off + r * (self._in_f + self._out_f)])
            at = flat[:self._in_f * r].reshape(self._in_f, r)
            bt = flat[self._in_f * r:].reshape(r, self._out_f)
            # always copies (at rank 1 the transposes are contiguous views of the pool)
            return backend.result(np.array(at.T, order="C")), backend.result(np.array(bt.T, order="C"))
        finally:
            registry.leave(snap)

    def memory(self) -> dict:
        """Bytes: ``base`` (the base weight's storage), ``adapters`` (what the live
        adapters need: ``4 * rank * (in + out)`` each), ``pool`` (allocated pool blocks),
        ``free`` (``pool - adapters``: free pages in the blocks, including those of
        adapters removed while a forward still ran, recycled once it ends), ``padded``
        (what one tensor padded to the largest rank would take for the same adapters, for
        comparison), and ``blocks`` (number of allocated blocks)."""
        with self._wlock:
            snap = self._registry.snap
            pool, blocks = self._pool.nbytes(), self._pool.count()
        live = snap.live[: snap.next_id]
        ranks = snap.ad_rank[: snap.next_id][live]
        page_bytes = 4 * (self._in_f + self._out_f)
        used = int(ranks.sum()) * page_bytes
        padded = int(ranks.size * (ranks.max() if ranks.size else 0)) * page_bytes
        return {"base": self._backend.base_nbytes(), "adapters": used, "pool": pool, "free": pool - used,
                "padded": padded, "blocks": blocks}

    def __sizeof__(self) -> int:
        """The bytes the bank holds (base weight and pool, :meth:`memory`) on top of the
        object, for ``sys.getsizeof`` and Dask's ``sizeof``."""
        m = self.memory()
        return object.__sizeof__(self) + m["base"] + m["pool"]

    def __repr__(self) -> str:
        kind = "NF4" if self._nf4 is not None else "float32"
        return (f"LoraBank({kind} base {self._out_f} x {self._in_f}, {len(self)} adapters, "
                f"row_stable={self._row_stable}{self._backend.repr_device})")

    # --- add / remove ----------------------------------------------------------------
    def add(self, name: str, lora_a, lora_b, scaling=1.0) -> int:
        """Add adapter ``name``: ``lora_a`` (r, in), ``lora_b`` (out, r), float32 or
        float64 (stored as float32), any rank r >= 1, and its ``scaling`` (``alpha / r``,
        or ``alpha / sqrt(r)`` for rsLoRA; a real number finite in float32). Copies only
        this adapter into free pool pages (a new pool block when none fits). Returns its
        id. Forwards already running do not see it; those starting after it returns do.
        On a GPU bank ``lora_a`` and ``lora_b`` may be host or device arrays."""
        if not isinstance(name, str):
            raise DTypeError(f"adapter name must be a str, got {type(name).__name__}")
        if not name:
            raise ConfigError("adapter name must be a non-empty str")
        registry, pool = self._registry, self._pool
        if name in registry.snap.names:
            raise duplicate(name)
        r, pack = self._backend.packer(lora_a, lora_b)
        s = np.float32(validate.real_scalar("scaling", scaling))
        with self._wlock:
            if name in registry.snap.names:
                raise duplicate(name)
            self._reclaim()
            bid, page = pool.alloc(r)
            try:
                pack(pool.pages(bid, page, r))
            except BaseException:
                pool.release(bid, page, r)  # no reader has seen these pages
                self._reclaim()
                raise
            return registry.add(name, bid, page * pool.page, r, s, pool.take_blocks())

    def remove(self, name: str) -> None:
        """Remove adapter ``name``; its pages return to the pool's free list (a block
        given to one over-sized adapter is released) once no forward that started before
        the removal still runs. Other adapters keep their ids and storage."""
        with self._wlock:
            pool = self._pool
            gen, bid, off, r = self._registry.remove(name)
            pool.defer(gen, bid, off // pool.page, r)
            self._reclaim()

    def reserve(self, pages: int) -> None:
        """Make sure the pool has at least ``pages`` free pages (rank rows) in regular
        blocks, allocating and touching new blocks now (a server's start-up), so that
        later adds of ranks <= ``block_pages`` write into memory that is already mapped:
        no page faults while serving. ``bank.reserve(sum of ranks)`` before the adds."""
        pages = validate.int_scalar("pages", pages, minimum=0)
        with self._wlock:
            self._reclaim()
            self._pool.reserve(pages, self._backend.touch)
            self._reclaim()

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
        return self._backend.forward(self._registry, x, adapters, scale, out)

    __call__ = forward

    # --- devices, pickling, copies ---------------------------------------------------
    def to(self, device: str) -> "LoraBank":
        """A copy of the bank with its base weight (dense or NF4), bias and adapter pool on
        ``device`` (``"cuda"`` or ``"cpu"``); ``self`` when it is there already. The bank it
        is called on is left as it was. Names, ids, ranks, scalings and the pool layout
        (blocks, pages, free runs) travel unchanged; the adapters' values come back from
        ``to("cpu")`` bit for bit. On the GPU, ``forward`` takes device ``x`` (and host or
        device ``adapters`` / ``scale``) and returns a device array; ``add`` takes host or
        device arrays. The copy is of one consistent state (writers wait meanwhile); the
        new bank has its own locks and follows the same thread rules. See docs/gpu.md."""
        if check_device(device) == self.device:
            return self
        backend = _BACKENDS[device](self._nf4)
        with self._wlock:
            st = self._state()
            st["blocks"] = [backend.adopt(b) if b.size else np.empty(0, np.float32) for b in st["blocks"]]
        for key in ("weight", "nf4", "bias"):
            if st[key] is not None:
                st[key] = backend.adopt(st[key])
        new = object.__new__(type(self))
        new._load(st, backend)
        return new

    def _state(self) -> dict:
        """Everything that defines the bank, as plain values (the pool blocks and tables
        not copied). Under the writer lock."""
        snap = self._registry.snap
        pool = self._pool
        return {"version": 1, "weight": self._weight, "nf4": self._nf4, "bias": self._bias,
                "in_f": self._in_f, "out_f": self._out_f, "block_pages": pool.block_pages,
                "row_stable": self._row_stable, "nf4_path": self._nf4_path, **pool.state(),
                "free_ids": list(self._registry.free_ids), "ad_page": snap.ad_off // pool.page,
                "tables": snap.tables(), "next_id": snap.next_id, "names": dict(snap.names)}

    def __getstate__(self):
        self._backend.check_pickle()
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
        self._load(st, CpuBank)

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


def multi_lora_forward(x, bank: LoraBank, adapters, scale=None, out=None):
    """Functional form of :meth:`LoraBank.forward`: ``y[i] = x[i] W^T + scale_i *
    scaling_k (x[i] A_k^T) B_k^T`` for the adapter ``k`` of each row (-1 / None: base
    alone)."""
    if not isinstance(bank, LoraBank):
        raise DTypeError(f"expected a LoraBank, got {type(bank).__name__}")
    return bank.forward(x, adapters, scale=scale, out=out)
