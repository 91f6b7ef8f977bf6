"""The bank's page pool: where adapters' values live.

Each adapter occupies ``rank`` consecutive *pages* of ``in + out`` floats (its ``A^T``
then its ``B^T``, never padded to the largest rank) in one pool block. Blocks hold
``block_pages`` pages; an adapter larger than a block gets a block of its own (a
*dedicated* block, released with it). Allocation is first fit over the blocks' free runs,
else a new block: adding an adapter never copies the others.

Pages freed while a reader may still read them are *deferred*: they wait in ``pending``
with the generation of the snapshot that dropped them, and return to the free lists in
:meth:`PagePool.recycle` once no reader of an older snapshot remains. All of this is the
writers' state: it is touched only under the bank's writer lock. Readers see the blocks
through the tuple a snapshot holds.
"""

from __future__ import annotations

import numpy as np

from .._validate import nbytes

__all__ = ["PagePool"]


class PagePool:
    """Pool blocks of ``block_pages`` pages of ``page`` floats, allocated by
    ``allocate(size)`` (a 1-D float32 array on the bank's device).

    ``blocks``: per block id, the block (size 0: released, its id in ``spare_ids``);
    ``free``: per block, its free runs ``[first page, pages]`` sorted by page;
    ``dedicated``: per block, whether it holds one over-sized adapter; ``pending``:
    ``(generation, block, page, pages)`` of removed adapters not yet recycled.
    ``changed``: the blocks changed since :meth:`take_blocks` last said so."""

    def __init__(self, page, block_pages, allocate, *, blocks=(), free=(), dedicated=(), spare_ids=(), pending=()):
        self.page = page
        self.block_pages = block_pages
        self.allocate = allocate
        self.blocks = list(blocks)
        self.free = [list(runs) for runs in free]
        self.dedicated = list(dedicated)
        self.spare_ids = list(spare_ids)
        self.pending = list(pending)
        self.changed = False

    def state(self) -> dict:
        """The pool as plain values (the blocks themselves not copied)."""
        return {"blocks": list(self.blocks), "free": [[list(run) for run in runs] for runs in self.free],
                "dedicated": list(self.dedicated), "spare_ids": list(self.spare_ids), "pending": list(self.pending)}

    def take_blocks(self):
        """A tuple of the blocks if they changed since the last call, else None."""
        if not self.changed:
            return None
        self.changed = False
        return tuple(self.blocks)

    def pages(self, block, page, n):
        """The floats of pages ``page .. page + n - 1`` of ``block``."""
        return self.blocks[block][page * self.page:(page + n) * self.page]

    def alloc(self, n):
        """``(block, first page)`` of ``n`` free consecutive pages: first fit over the
        blocks' free runs, else a new block (a dedicated one when n > block_pages)."""
        if n <= self.block_pages:
            for bid, runs in enumerate(self.free):
                if self.dedicated[bid]:
                    continue
                for run in runs:
                    if run[1] >= n:
                        page = run[0]
                        run[0] += n
                        run[1] -= n
                        if run[1] == 0:
                            runs.remove(run)
                        return bid, page
        pages = max(n, self.block_pages)
        bid = self._new_block(pages, dedicated=n > self.block_pages)
        if pages > n:
            self.free[bid] = [[n, pages - n]]
        return bid, 0

    def reserve(self, pages, touch) -> None:
        """At least ``pages`` free pages in regular blocks, new blocks passed to
        ``touch`` (which maps their memory now)."""
        free = sum(run[1] for bid, runs in enumerate(self.free) if not self.dedicated[bid] for run in runs)
        while free < pages:
            bid = self._new_block(self.block_pages, dedicated=False)
            touch(self.blocks[bid])
            self.free[bid] = [[0, self.block_pages]]
            free += self.block_pages

    def _new_block(self, pages, dedicated):
        arr = self.allocate(pages * self.page)
        if self.spare_ids:
            bid = self.spare_ids.pop()
            self.blocks[bid] = arr
            self.free[bid] = []
            self.dedicated[bid] = dedicated
        else:
            bid = len(self.blocks)
            self.blocks.append(arr)
            self.free.append([])
            self.dedicated.append(dedicated)
        self.changed = True
        return bid

    def release(self, bid, page, n) -> None:
        """Pages back to the free runs of their block (a dedicated block is released).
        Only for pages no reader can still read."""
        if self.dedicated[bid]:
            self.blocks[bid] = np.empty(0, np.float32)
            self.free[bid] = []
            self.spare_ids.append(bid)
            self.changed = True
            return
        runs = self.free[bid]
        i = 0
        while i < len(runs) and runs[i][0] < page:
            i += 1
        runs.insert(i, [page, n])
        # coalesce with the neighbours
        if i + 1 < len(runs) and runs[i][0] + runs[i][1] == runs[i + 1][0]:
            runs[i][1] += runs[i + 1][1]
            del runs[i + 1]
        if i > 0 and runs[i - 1][0] + runs[i - 1][1] == runs[i][0]:
            runs[i - 1][1] += runs[i][1]
            del runs[i]

    def defer(self, gen, bid, page, n) -> None:
        """Pages dropped by the snapshot of generation ``gen``: recycled by :meth:`recycle`."""
        self.pending.append((gen, bid, page, n))

    def recycle(self, oldest, settle) -> None:
        """Release the deferred pages no reader can read any more: those dropped by a
        generation <= ``oldest`` (the oldest snapshot still read; None: every one).
        ``settle()`` runs first when there are any (on the GPU: kernels launched by
        earlier forwards must be done before their pages are written or freed)."""
        ready = [p for p in self.pending if oldest is None or p[0] <= oldest]
        if ready:
            self.pending = [p for p in self.pending if not (oldest is None or p[0] <= oldest)]
            settle()
            for _, bid, page, n in ready:
                self.release(bid, page, n)

    def nbytes(self) -> int:
        return sum(nbytes(b) for b in self.blocks)

    def count(self) -> int:
        """Allocated (not released) blocks."""
        return sum(1 for b in self.blocks if b.size)
