"""The LoRA products and the backward core shared by the functional modules
(:mod:`numlora.ops`, :mod:`numlora.nf4`): the designated home of the training internals
(every module may import from here): the forward products, a forward's ``u_out=``, one
backward pipeline (:func:`lora_grads`) and the AdamW step's scalars. The products go to
BLAS through numpy, over validated 2-D arrays of one dtype, except the LoRA branch's
shrink ``x A^T`` (forward, and backward when it recomputes it) and expand of float32
batches of up to KERNEL_LORA_MAX_ROWS rows: numba's serial small-batch kernels, in the
order tests/reference.py writes out (``lora_shrink_f32_ref``, ``lora_expand_f32_ref``).
"""

from __future__ import annotations

import math

import numpy as np

from . import _scratch
from . import _validate as validate
from ._lazy import kernels
from .dropout import DropoutState
from .errors import ConfigError, DTypeError, ShapeError

#: Rows of the batch per chunk when adding ``u B^T`` (bounds the temporary to
#: ``ROW_CHUNK * out_features`` elements).
ROW_CHUNK = 256

#: ``np.dot`` without numpy's ``__array_function__`` dispatch (the same C function; the
#: pipelines here call it on ndarrays only), where numpy exposes it: a tenth of a
#: microsecond per product, which counts in a small layer's step of a dozen products.
_dot = getattr(np.dot, "_implementation", np.dot)


# --- forward products -------------------------------------------------------------------------

#: float32 batches of TRANSPOSED_MIN_ROWS .. TRANSPOSED_MAX_ROWS rows take the dense base
#: product as ``W @ x^T`` into a per-thread scratch buffer and a tiled transposing copy:
#: numpy's OpenBLAS runs that orientation with the batch as its small dimension. Measured
#: on AMD EPYC (AVX-512), 2 cores, products back to back (docs/performance.md): 4096 x
#: 4096 at 2 / 8 / 128 rows 7.28 / 7.57-7.96 / 26.7 ms as ``x @ W^T``, 3.82 / 5.65-6.30 /
#: 24.4-24.6 with the copy; 1024 x 1024 at 8 rows 0.35-0.40 against 0.19-0.20; level at
#: 256 rows, slower at 1024 (171 against 177 ms) and in float64 (kept ``x @ W^T``).
TRANSPOSED_MIN_ROWS = 2
TRANSPOSED_MAX_ROWS = 256


def transpose_copy(yt, out2):
    """out2 (n, out) = yt^T for yt (out, n) C-contiguous, by column tiles of out2 (each
    tile reads a few KiB of yt rows: the plain strided copy was 2x slower at 128 rows of
    4096, as fast at up to 16)."""
    o, n = yt.shape
    step = max(16, (8192 // n) // 16 * 16)
    for r0 in range(0, o, step):
        np.copyto(out2[:, r0:r0 + step], yt[r0:r0 + step].T)


def base_product(x2, weight, fan_in_fan_out, out2):
    """out2 = x2 W^T (or x2 W under fan_in_fan_out) through BLAS (float32 batches of
    TRANSPOSED_MIN_ROWS .. TRANSPOSED_MAX_ROWS rows as ``(W x2^T)^T``)."""
    n = x2.shape[0]
    if n == 0:
        return
    if not fan_in_fan_out and TRANSPOSED_MIN_ROWS <= n <= TRANSPOSED_MAX_ROWS and weight.dtype == np.float32:
        # whatever W's layout: OpenBLAS's Haswell kernels (AMD Zen 3) sum W x^T and x W^T
        # in other orders, so a Fortran-ordered W taking the other orientation got other bits
        yt = _scratch.scratch("dense.yt", weight.shape[0] * n, np.float32).reshape(weight.shape[0], n)
        _dot(weight, x2.T, out=yt)
        transpose_copy(yt, out2)
        return
    _dot(x2, weight if fan_in_fan_out else weight.T, out=out2)


#: float32 batches up to this many rows take the LoRA branch in numba's serial kernels
#: (the NF4 products' shrink and expand in registers) instead of two BLAS calls, a scaling
#: pass and an add: lora_forward 4096 x 4096 at batch 1 1.837 -> 1.793 ms, at 8 6.60 ->
#: 6.54 ms (AMD EPYC, medians after short pauses, the base product 1.64 / 9.57 ms).
KERNEL_LORA_MAX_ROWS = 16


def add_low_rank(x2, lora_a, lora_b, s, out2, u_out=None):
    """out2 += s * (x2 A^T) B^T, the scale folded into the (n, r) intermediate; ``u_out``
    (optional, (n, r)) receives ``x2 A^T`` unscaled (what a backward takes as ``u``).
    Returns the scaled intermediate ``s x2 A^T`` (the ``us`` of :func:`backward_core`;
    None for an empty batch).

    float32 batches of up to KERNEL_LORA_MAX_ROWS rows: numba's serial shrink and expand
    (``kernels.nf4.shrink``, ``kernels.compute.lora_expand_add``); otherwise BLAS. Never
    a numba-parallel kernel: right after the base GEMM it would fight OpenBLAS's
    still-spinning threads for the cores."""
    if x2.shape[0] == 0:
        return None
    u = shrink(x2, lora_a, s, u_out)
    if _kernel_rows(x2, lora_a) and lora_b.dtype == out2.dtype == np.float32:
        kernels("compute").lora_expand_add(u, lora_b, out2)
        return u
    expand_into(u, lora_b, out2)
    return u


def _kernel_rows(x2, lora_a) -> bool:
    """Whether the shrink of x2 (and the expand after it) runs in numba's serial kernels:
    float32, 1 to KERNEL_LORA_MAX_ROWS rows."""
    return 0 < x2.shape[0] <= KERNEL_LORA_MAX_ROWS and x2.dtype == lora_a.dtype == np.float32


def shrink(x2, lora_a, s, u_out=None):
    """``s x2 A^T`` (n, r), the scaled shrink of the LoRA branch, the same bits in the
    forward and in a backward that recomputes it; ``u_out`` (optional) receives ``x2 A^T``
    unscaled. float32 batches of up to KERNEL_LORA_MAX_ROWS rows through
    :func:`shrink_kernels`, others through BLAS."""
    if _kernel_rows(x2, lora_a):
        return shrink_kernels(x2, lora_a, s, u_out)
    u = _dot(x2, lora_a.T, out=u_out)
    return scale_intermediate(u, s, in_place=u_out is None)


def shrink_kernels(x2, lora_a, s, u_out=None):
    """:func:`shrink` of float32 arrays through numba's serial small-batch kernel
    (``kernels.nf4.shrink``, its canonical order) whatever the batch: with ``u_out`` the
    unscaled shrink goes there and the scale is applied to a copy (the same bits as the
    shrink with the scale). What the fused NF4 products take as their ``u``."""
    kn = kernels("nf4")
    f32 = np.float32
    if u_out is None:
        u = np.empty((x2.shape[0], lora_a.shape[0]), f32)
        kn.shrink(x2, lora_a, f32(s), u)
        return u
    kn.shrink(x2, lora_a, f32(1.0), u_out)
    return scale_intermediate(u_out, s)


def scale_intermediate(u, s, in_place=False):
    """``s u`` (into u when ``in_place``): the scaled shrink of the LoRA branch. With
    ``s == 0`` the adapter contributes nothing, also where ``x A^T`` overflowed to inf
    (``inf * 0`` would put NaN into the output and the gradients, where the exact result
    is the base product alone); every other value keeps its bits."""
    us = u if in_place else np.empty_like(u)
    np.multiply(u, u.dtype.type(s), out=us)
    if s == 0:
        np.nan_to_num(us, copy=False, nan=0.0)
    return us


def expand_into(us, lora_b, out2):
    """out2 += us B^T (us already scaled), in row chunks through the calling thread's
    scratch (a bounded temporary, not made fresh per call: at 128 rows of 1024 outputs a
    fresh 512 KiB product took 281 us in page faults against 67 us into a reused buffer,
    AMD EPYC VM)."""
    n = us.shape[0]
    if n == 0:
        return
    bt = lora_b.T
    rows = min(n, ROW_CHUNK)
    tmp = _scratch.scratch("lora.expand", rows * out2.shape[1], out2.dtype).reshape(rows, out2.shape[1])
    for r0 in range(0, n, ROW_CHUNK):
        r1 = min(n, r0 + ROW_CHUNK)
        t = tmp[: r1 - r0]
        _dot(us[r0:r1], bt, out=t)
        out2[r0:r1] += t


def dense_forward(x2, xl2, weight, a, b, s, bias, fan_in_fan_out, out2, u2=None):
    """The dense forward over validated 2-D arrays of one dtype (what
    :func:`numlora.ops.lora_forward` and :func:`~numlora.ops.linear_forward` run after
    their checks, and a dense layer's training forward over the arrays it owns):
    ``out2 = x2 W^T (+ s (xl2 A^T) B^T when a is not None) (+ bias)``, ``xl2 A^T`` into
    ``u2`` when given. ``out2`` must not share memory with the inputs. Returns ``s xl2
    A^T`` (what :func:`backward_core` takes as ``us``), or None (no LoRA branch, or an
    empty batch)."""
    base_product(x2, weight, fan_in_fan_out, out2)
    us = None if a is None else add_low_rank(xl2, a, b, s, out2, u2)
    if bias is not None:
        out2 += bias
    return us


def u_buffer(u_out, x, rank, dtype, arrays, what):
    """A forward's ``u_out=`` (None, or a C-contiguous array of ``dtype`` shaped (rank,) for
    a 1-D ``x``, else (n, rank)) as a 2-D view; one sharing memory with ``arrays`` (the
    inputs and ``out``, name -> array) is refused: it is written while they are read."""
    if u_out is None:
        return None
    shape = (rank,) if x.ndim == 1 else (x.shape[0], rank)
    validate.refuse_overlap("u_out", validate.out_array("u_out", u_out, shape, dtype), arrays, what)
    return u_out.reshape(-1, rank)


# --- backward ---------------------------------------------------------------------------------

def grad_buffer(name, g, shape, dtype):
    """A caller's accumulation buffer: ndarray of ``shape`` and ``dtype``, writable."""
    if g is None:
        return None
    if not isinstance(g, np.ndarray):
        raise DTypeError(f"{name} must be a numpy array, got {type(g).__name__}")
    if g.dtype != np.dtype(dtype):
        raise DTypeError(f"expected {name} with dtype {np.dtype(dtype)}, got {g.dtype}")
    validate.expect_shape(name, g, shape)
    if not g.flags.writeable:
        raise ShapeError(f"{name} is read-only; lora_backward accumulates into it")
    return g


def unalias_grads(grad_a, grad_b, inputs):
    """The backward's inputs (a tuple of arrays or None) with a private copy of each one
    that shares memory with ``grad_a`` or ``grad_b`` (the gradients are accumulated in
    place while the inputs are still read: ``grad_a=lora_a`` would otherwise change A
    before ``grad_x`` reads it). ``grad_a`` and ``grad_b`` overlapping each other is
    refused: the two sums would land on the same elements."""
    if grad_a is None and grad_b is None:
        return inputs
    shares = validate.shares_memory
    if shares(grad_a, grad_b):
        raise ShapeError("grad_a shares memory with grad_b: both are accumulated in place, so the two gradients "
                         "would be added into the same elements; pass separate arrays")
    return tuple(a.copy() if a is not None and (shares(grad_a, a) or shares(grad_b, a)) else a for a in inputs)


def _accumulate(dst, value):
    if dst is None:
        return value
    dst += value
    return dst


def backward_core(x2, xd2, a, b, s, g2, us, drop, grad_a, grad_b, need_grad_x, base_grad):
    """The LoRA backward over validated 2-D arrays of one dtype.

    x2 (n, in); xd2: the dropped input (x2 itself without dropout); a (r, in); b (out, r);
    g2 (n, out); us: s * xd2 A^T (n, r) or None (computed here); drop: None or the
    :class:`~numlora.dropout.DropoutMask` of the forward's dropout; base_grad(g2, dx)
    writes G W into dx. Returns (dx or None, grad_a, grad_b)."""
    n = x2.shape[0]
    dt = x2.dtype
    if us is None:
        us = shrink(xd2, a, s)
    hs = scale_intermediate(_dot(g2, b), s, in_place=True)  # (n, r)
    grad_b = _accumulate(grad_b, _dot(g2.T, us))  # s G^T U
    grad_a = _accumulate(grad_a, _dot(hs.T, xd2))  # s H^T x_drop
    if not need_grad_x:
        return None, grad_a, grad_b
    dx = np.empty((n, x2.shape[1]), dt)
    if n == 0:
        return dx, grad_a, grad_b
    base_grad(g2, dx)
    t = _dot(hs, a, out=_scratch.scratch("lora.hA", dx.size, dt).reshape(dx.shape))  # s H A
    if drop is None:
        dx += t
    else:
        drop.mul_add(t, dx)
    return dx, grad_a, grad_b


def lora_grads(x, a, b, s, grad_out, dtype, dropout, x_drop, u, grad_a, grad_b, need_grad_x, base, base_grad,
               refuse=None):
    """A public backward after its adapter checks and :func:`check_x_drop_alone`:
    ``(grad_x, grad_a, grad_b)``.

    a (r, in), b (out, r): the validated factors, in ``dtype``; ``base``: the dense weight
    ``base_grad(base, g2, dx)`` reads for G W (None when it reads no caller array), copied
    with the other inputs when a gradient buffer overlaps it; ``refuse(grad_a, grad_b)``:
    an optional last check of the buffers against what ``base_grad`` reads."""
    (rank, in_f), out_f = a.shape, b.shape[0]
    x2, xd2, g2, us, drop, one_d = backward_inputs(x, in_f, out_f, grad_out, dtype, dropout, x_drop, u, rank)
    if us is not None:
        us = us * dtype.type(s)
    grad_a = grad_buffer("grad_a", grad_a, a.shape, dtype)
    grad_b = grad_buffer("grad_b", grad_b, b.shape, dtype)
    x2, xd2, g2, us, a, b, base = unalias_grads(grad_a, grad_b, (x2, xd2, g2, us, a, b,
                                                                 base if need_grad_x else None))
    if refuse is not None:
        refuse(grad_a, grad_b)
    dx, grad_a, grad_b = backward_core(x2, xd2, a, b, s, g2, us, drop, grad_a, grad_b, need_grad_x,
                                       lambda g, d: base_grad(base, g, d))
    if dx is not None and one_d:
        dx = dx.reshape(in_f)
    return dx, grad_a, grad_b


def backward_inputs(x, in_f, out_f, grad_out, dtype, dropout, x_drop, u, rank):
    """Validate and convert the batch-shaped inputs of a backward; return
    (x2, xd2, g2, us_or_None, drop, one_d), ``drop`` the DropoutMask or None."""
    x = validate.input_rows(x, in_f)
    g = validate.input_rows(grad_out, out_f, "grad_out", "out_features")
    if g.shape[:-1] != x.shape[:-1]:
        want = (out_f,) if x.ndim == 1 else (x.shape[0], out_f)
        raise ShapeError(f"expected grad_out of shape {want} (one row per row of x), got {g.shape}")
    x2 = np.ascontiguousarray(x.reshape(-1, in_f), dtype)
    g2 = np.ascontiguousarray(g.reshape(-1, out_f), dtype)
    drop = None
    xd2 = x2
    state = DropoutState.from_arg(dropout)
    if state is not None:
        drop = state.mask(dtype)
        if x_drop is None:
            xd2 = np.empty_like(x2)
            drop.apply(x2, xd2)
    if x_drop is not None:
        xd = validate.lora_input(x_drop, x, in_f, "x_drop")
        xd2 = np.ascontiguousarray(xd.reshape(-1, in_f), dtype)
    us = None
    if u is not None:
        uu = validate.float_array("u", u, (1, 2), allow_empty=True)
        validate.expect_shape("u", uu, (rank,) if x.ndim == 1 else (x2.shape[0], rank))
        us = np.ascontiguousarray(uu.reshape(-1, rank), dtype)
    return x2, xd2, g2, us, drop, x.ndim == 1


def check_x_drop_alone(x_drop, dropout, need_grad_x):
    if x_drop is not None and dropout is None and need_grad_x:
        raise ConfigError("x_drop given without dropout=(p, seed): grad_x needs the dropout mask; pass the "
                          "DropoutState lora_dropout returned (or need_grad_x=False)")


# --- the optimizer step --------------------------------------------------------------------------

def decay_factor(lr, weight_decay):
    """The decoupled weight decay factor ``1 - lr * weight_decay``, refused when it is not
    finite in float32 (two finite scalars whose product overflows the compute type)."""
    decay = 1.0 - lr * weight_decay
    if not abs(decay) <= validate.F32_MAX:
        raise ConfigError(f"lr * weight_decay = {lr:g} * {weight_decay:g} overflows float32: the weight decay factor "
                          f"1 - lr * weight_decay would be {decay:g}; use a smaller lr or weight_decay")
    return decay


def adamw_scalars(lr, beta1, beta2, eps, weight_decay, step):
    """The scalars of one AdamW step at ``step`` (1-based), validated, as the kernels take
    them: ``(lr, beta1, beta2, eps, decay, bc1, bc2_sqrt)`` with ``decay = 1 - lr * wd``,
    ``bc1 = 1 - beta1**step`` and ``bc2_sqrt = sqrt(1 - beta2**step)``."""
    step = validate.int_scalar("step", step, minimum=1)
    lr, eps = validate.nonneg_scalar("lr", lr), validate.nonneg_scalar("eps", eps)
    weight_decay = validate.nonneg_scalar("weight_decay", weight_decay)
    beta1, beta2 = validate.unit_scalar("beta1", beta1), validate.unit_scalar("beta2", beta2)
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    return lr, beta1, beta2, eps, decay_factor(lr, weight_decay), bc1, bc2_sqrt
