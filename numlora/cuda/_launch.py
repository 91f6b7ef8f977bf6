"""What the GPU implementations share: device-input validation, scratch and constant
device arrays, and the launches of the two generic kernels (the LoRA shrink and the tiled
matmul). The designated internal module of :mod:`numlora.cuda` (``cuda/ops.py`` and
``cuda/bank.py`` import from here).

Names: :func:`numba_cuda` (numba.cuda, checked), :func:`const`, :func:`scratch`, :func:`grid`;
:func:`dev`, :func:`flat`, :func:`rows`, :func:`same_rows`, :func:`output`,
:func:`low_rank`, :func:`bias_arg`, :func:`tensor` (validation of device inputs: each refuses
a host array, naming it); :func:`block_shift`, :func:`shrink`, :func:`fill_zero`,
:func:`matmul` (launches).
"""

from __future__ import annotations

import threading

import numpy as np

from .. import _validate as validate
from .._tables import NF4_CODE
from ..device import DeviceNF4Tensor, as_cuda, cuda_module, is_device_array
from ..errors import DeviceError, DTypeError, ShapeError
from . import kernels

_consts: dict = {}


def numba_cuda():
    return cuda_module()


def const(name):
    """Small device arrays reused by every call (the NF4 table, 1-element dummies)."""
    a = _consts.get(name)
    if a is None:
        cuda = numba_cuda()
        if name == "code":
            a = cuda.to_device(np.ascontiguousarray(NF4_CODE))
        elif name == "f32":
            a = cuda.to_device(np.zeros(1, np.float32))
        elif name == "u8":
            a = cuda.to_device(np.zeros(1, np.uint8))
        _consts[name] = a
    return a


_local = threading.local()


def scratch(tag, shape):
    """A float32 device array of ``shape`` for a temporary that never leaves the call (the
    LoRA ``s x A^T``, the backward's ``s G B``, ...): one buffer per tag and host thread,
    grown when too small, reused by the next call instead of a new allocation each time.
    Safe because every kernel of a thread runs on that thread's default stream, in order:
    the next call's writes come after this call's reads."""
    n = 1
    for d in shape:
        n *= int(d)
    bufs = getattr(_local, "scratch", None)
    if bufs is None:
        bufs = _local.scratch = {}
    buf = bufs.get(tag)
    if buf is None or buf.size < n:
        buf = bufs[tag] = numba_cuda().device_array(max(n, 2 * (buf.size if buf is not None else 0), 256), np.float32)
    return buf[:n].reshape(tuple(int(d) for d in shape))


def grid(n, threads):
    return max(1, -(-n // threads))


# --- validation of device inputs -----------------------------------------------------------

def dev(name, a, ndims=None, *, dtype=np.float32, allow_empty=False):
    """A C-contiguous numba device array of ``dtype``; refuses host arrays (mixing host
    and GPU inputs would copy silently) with one clear error."""
    if a is None:
        raise DTypeError(f"{name} must be an array, got None")
    if not is_device_array(a):
        raise DeviceError(f"expected {name} on the GPU like the other inputs, got a host "
                          f"{type(a).__name__}; move it with numlora.to_device({name})")
    a = as_cuda(a)
    if np.dtype(a.dtype) != np.dtype(dtype):
        raise DTypeError(f"expected {name} with dtype {np.dtype(dtype)} on the GPU, got {np.dtype(a.dtype)}")
    if ndims is not None:
        allowed = (ndims,) if isinstance(ndims, int) else tuple(ndims)
        if len(a.shape) not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ShapeError(f"expected {name} to be {want}, got shape {tuple(a.shape)}")
    if a.size == 0 and not allow_empty:
        raise ShapeError(f"expected a non-empty {name}, got shape {tuple(a.shape)}")
    if a.size and not a.is_c_contiguous():
        raise ShapeError(f"expected {name} to be C-contiguous on the GPU")
    return a


def flat(a):
    return a.reshape(a.size)


def rows(name, x, width, what="in_features"):
    x = dev(name, x, (1, 2), allow_empty=True)
    if tuple(x.shape)[-1] != width:
        want = (width,) if len(x.shape) == 1 else (x.shape[0], width)
        raise ShapeError(f"expected {name} of shape {want} ({what} = {width}), got {tuple(x.shape)}")
    n = 1 if len(x.shape) == 1 else x.shape[0]
    return x, n


def same_rows(name, a, x):
    """``a`` (a device array of x's shape), or x itself when a is None."""
    if a is None:
        return x
    a = dev(name, a, len(x.shape), allow_empty=True)
    validate.expect_shape(name, a, tuple(x.shape))
    return a


def output(out, x, width):
    shape = (width,) if len(x.shape) == 1 else (x.shape[0], width)
    if out is None:
        return numba_cuda().device_array(shape, np.float32)
    out = dev("out", out, len(shape), allow_empty=True)
    validate.expect_shape("out", out, shape)
    return out


def keep_u(u_out, x, xl, n, in_f, lora_a, r):
    """A forward's ``u_out=``: ``x_lora A^T`` (unscaled) into the device array ``u_out``
    ((r,) or (n, r), float32); nothing when it is None."""
    if u_out is None:
        return
    u_out = dev("u_out", u_out, len(x.shape), allow_empty=True)
    validate.expect_shape("u_out", u_out, (r,) if len(x.shape) == 1 else (n, r))
    if n:
        shrink(flat(xl), in_f, 1, in_f, flat(lora_a), in_f, 1, 1.0, u_out.reshape(n, r))


def low_rank(lora_a, lora_b, out_f, in_f):
    lora_a = dev("lora_a", lora_a, 2)
    r = lora_a.shape[0]
    validate.expect_shape("lora_a", lora_a, (r, in_f))
    lora_b = dev("lora_b", lora_b, 2)
    validate.expect_shape("lora_b", lora_b, (out_f, r))
    return lora_a, lora_b, r


def bias_arg(bias, out_f):
    if bias is None:
        return const("f32"), False
    b = dev("bias", bias, 1)
    validate.expect_shape("bias", b, (out_f,))
    return b, True


def tensor(t):
    if not isinstance(t, DeviceNF4Tensor):
        raise DeviceError(f"expected the NF4 weight on the GPU (numlora.to_device(t)) like the other inputs, "
                          f"got {type(t).__name__}")
    if len(t.shape) != 2:
        raise ShapeError(f"expected a 2-D NF4 weight, got shape {t.shape}")
    return t


# --- launch helpers -------------------------------------------------------------------------

def block_shift(blocksize, n):
    """The ``bshift`` kernel argument: log2(blocksize) for a power of two (index >> bshift),
    -1 when every index fits in 32 bits (a 32-bit division), else -2 (64-bit)."""
    bs = int(blocksize)
    if bs & (bs - 1) == 0:
        return bs.bit_length() - 1
    return -1 if n < 2**32 else -2


def shrink(X, sxi, sxj, K, Y, syt, syj, scale, u):
    """u[i, t] = scale * sum_{j < K} X(i, j) Y(t, j) (flat operands, element strides)."""
    if u.size == 0:
        return
    if K == 0:
        fill_zero(u)
        return
    kernels.make_lora_shrink()[u.size, kernels.SHRINK_THREADS](X, sxi, sxj, K, Y, syt, syj, np.float32(scale), u)


def fill_zero(a):
    """Zero the device array ``a`` in place."""
    if a.size:
        as_cuda(a).copy_to_device(np.zeros(tuple(a.shape), np.dtype(a.dtype)))


def matmul(X, sxi, sxk, M, N, K, C, ldc, *, W=None, swo=0, swk=0, t=None, alpha=1.0, U=None, sui=0, sut=0,
           Bm=None, sbo=0, sbt=0, R=0, bias=None, accumulate=False):
    """C[i, o] = alpha sum_k X(i, k) W(o, k) + sum_t U(i, t) Bm(o, t) + bias (+ C):
    the tiled kernel, dense W or the NF4 tensor ``t`` (flat element index o*swo + k*swk)."""
    if M == 0 or N == 0:
        return
    tile = kernels.gemm_tile(M)
    bm, bn, _, tm, tn = tile
    nt = (bm // tm) * (bn // tn)
    f32, u8 = const("f32"), const("u8")
    if t is not None:
        kern = kernels.make_gemm(True, tile, sxk == 1, swk == 1)
        args = (f32, swo, swk, t.packed, t.scales, t.blocksize, block_shift(t.blocksize, t.numel), const("code"))
    else:
        kern = kernels.make_gemm(False, tile, sxk == 1, swk == 1)
        args = (W, swo, swk, u8, f32, 1, 0, f32)
    kern[(grid(N, bn), grid(M, bm)), nt](
        X, sxi, sxk, *args, M, N, K, np.float32(alpha),
        f32 if U is None else U, sui, sut, f32 if Bm is None else Bm, sbo, sbt, R,
        f32 if bias is None else bias, bias is not None, C, ldc, bool(accumulate))
