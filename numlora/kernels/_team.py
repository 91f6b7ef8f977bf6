"""A parallel kernel whose calling thread never sleeps at the kernel's end.

numlora starts numba's OpenMP threads with the passive wait policy (``_jit._setup_threads``):
a thread with nothing left to do sleeps at once, so nothing of numba's spins while numpy's
BLAS works. The calling thread too: when it finishes its share of a kernel before the
worker (which woke 30-50 us after it on the 2-vCPU AMD EPYC VM), it sleeps in OpenMP's
end barrier, and the worker's wake-up puts it back on a core the scheduler picks, often
the worker's. The calling thread then changed cores in a third to a half of the calls
after a pause (the caller's Python state follows it from the other core's cache, and
``_steer`` moves the worker away again), measured on a bf16 GEMV at batch 1 (4096 x 4096):
0.45-0.55 ms a call right after a 0.12 s pause and a warm-up call, 0.28-0.35 ms back to back.

A *team* kernel gives each of numba's threads one slot (``prange(nslot)``, its share of the
tasks in :func:`slot_range`: the tasks and their operations are those of the plain
kernel, so the same bits), and ends each slot with :func:`slot_done`: the workers count
themselves in (an atomic add) and the calling thread (slot 0, OpenMP's master thread)
waits for them with a spin of at most :data:`SPIN_CYCLES` timestamp-counter cycles
before it reaches the barrier, arriving there last, so it never sleeps; the workers still
sleep as soon as they are done. ``_jit.kernel(team=True)`` appends the two arguments
(the counter, the slot count) at each call (1 slot for the serial build, which never
waits). Only SIMD kernels are team kernels (the intrinsics need the JIT).
"""

from __future__ import annotations

from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._jit import inline_helper

I64 = ir.IntType(64)

#: The calling thread's spin budget at a team kernel's end, in timestamp-counter cycles
#: (~0.1 ms at 3 GHz): past it, it waits in OpenMP's barrier as before.
SPIN_CYCLES = 300_000

_X86 = llvm_binding.get_process_triple().split("-")[0] in ("x86_64", "i386", "i686", "amd64")


@intrinsic
def count_in(typingctx, flags):
    """``flags[0] += 1`` as one atomic read-modify-write (sequentially consistent)."""
    sig = types.void(flags)

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        builder.atomic_rmw("add", a.data, ir.Constant(I64, 1), "seq_cst")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def claim(typingctx, counter):
    """``counter[0] += 1`` as one atomic read-modify-write, returning the value before: the
    next task of a kernel whose threads take tasks as they come (each task's operations
    fixed, so the results do not depend on who takes what)."""
    sig = types.int64(counter)

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.atomic_rmw("add", a.data, ir.Constant(I64, 1), "seq_cst")

    return sig, codegen


@intrinsic
def wait_for(typingctx, flags, want, cycles):
    """Spin (``pause`` on x86) while the atomic ``flags[0]`` is below ``want``, for at most
    ``cycles`` timestamp-counter cycles (``llvm.readcyclecounter``). Returns whether the
    count was reached."""
    sig = types.boolean(flags, want, cycles)

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        want_ = context.cast(builder, args[1], sig.args[1], types.int64)
        budget = context.cast(builder, args[2], sig.args[2], types.int64)
        clock = builder.module.declare_intrinsic("llvm.readcyclecounter", fnty=ir.FunctionType(I64, []))
        start = builder.call(clock, [])
        loop = builder.append_basic_block("team_wait")
        body = builder.append_basic_block("team_spin")
        done = builder.append_basic_block("team_done")
        builder.branch(loop)
        builder.position_at_end(loop)
        count = builder.load_atomic(a.data, "acquire", 8)
        reached = builder.icmp_signed(">=", count, want_)
        builder.cbranch(reached, done, body)
        builder.position_at_end(body)
        if _X86:  # the spin-wait hint, as LLVM's intrinsic (no inline assembly: no asm parser needed)
            builder.call(builder.module.declare_intrinsic("llvm.x86.sse2.pause", fnty=ir.FunctionType(ir.VoidType(),
                                                                                                      [])), [])
        elapsed = builder.sub(builder.call(clock, []), start)
        builder.cbranch(builder.icmp_signed("<", elapsed, budget), loop, done)
        builder.position_at_end(done)
        phi = builder.phi(ir.IntType(1))
        phi.add_incoming(ir.Constant(ir.IntType(1), 1), loop)
        phi.add_incoming(ir.Constant(ir.IntType(1), 0), body)
        return phi

    return sig, codegen


@inline_helper
def slot_range(slot, nslot, ntasks):
    """Tasks ``[lo, hi)`` of slot ``slot`` of ``nslot``: contiguous, sizes differing by at
    most one (the split of OpenMP's static schedule)."""
    return slot * ntasks // nslot, (slot + 1) * ntasks // nslot


@inline_helper
def slot_done(flags, slot, nslot):
    """The end of a slot: a worker counts itself in; the calling thread's slot (0) waits
    for the ``nslot - 1`` others (at most :data:`SPIN_CYCLES`)."""
    if slot == 0:
        if nslot > 1:
            wait_for(flags, nslot - 1, SPIN_CYCLES)
    else:
        count_in(flags)
