"""The functional API on GPU arrays: validate, allocate on the device, launch.

The public functions of :mod:`numlora.ops`, :mod:`numlora.nf4` and :mod:`numlora.rng`
route here when given device arrays (numba device arrays, or anything with
``__cuda_array_interface__``: CuPy arrays, PyTorch CUDA tensors, used zero-copy).
Results are numba device arrays. float32 only on the GPU. Every call launches its
kernels on the default stream and returns without waiting, except where a result must
be checked on the host (NaN / inf in :func:`quantize_nf4`) or is a host value (the RNG
state).
"""

from __future__ import annotations

import numpy as np

from .. import _nf4_products as products
from .. import _validate as validate
from .._backward import adamw_scalars, check_x_drop_alone
from .._dispatch import register
from .._tables import CODE8
from ..device import DeviceNF4Tensor, as_cuda
from ..dropout import DropoutState
from ..errors import ConfigError, DeviceError, DTypeError, ShapeError
from ..io.bnb import DQ_GROUP
from . import kernels
from ._launch import (
    bias_arg,
    block_shift,
    const,
    dev,
    fill_zero,
    flat,
    grid,
    keep_u,
    low_rank,
    matmul,
    numba_cuda,
    output,
    rows,
    same_rows,
    scratch,
    shrink,
    tensor,
)

# --- dense LoRA ---------------------------------------------------------------------------------

def _weight(weight, fan_in_fan_out):
    weight = dev("weight", weight, 2)
    in_f, out_f = tuple(weight.shape) if fan_in_fan_out else tuple(weight.shape)[::-1]
    # W(o, k) as flat strides
    sw = (1, out_f) if fan_in_fan_out else (in_f, 1)
    return weight, out_f, in_f, sw


@register("cuda")
def lora_forward(x, weight, lora_a, lora_b, scaling, bias=None, out=None, *, fan_in_fan_out=False, x_lora=None,
                 u_out=None):
    """GPU :func:`numlora.ops.lora_forward`: the LoRA shrink ``s x A^T`` (one reduction
    kernel), then one tiled kernel for ``x W^T`` with ``u B^T`` and the bias added in its
    epilogue (never ``B @ A``, no (n, out) temporary). ``x_lora``: the LoRA branch's
    input when it differs from x (the dropped input of a training forward); ``u_out``:
    receives ``x_lora A^T`` unscaled (one more shrink)."""
    weight, out_f, in_f, sw = _weight(weight, fan_in_fan_out)
    lora = low_rank(lora_a, lora_b, out_f, in_f)
    s = validate.real_scalar("scaling", scaling)
    return _forward(x, out_f, in_f, lora, s, bias, out, x_lora, u_out, weight=weight, sw=sw)


def _forward(x, out_f, in_f, lora, s, bias, out, x_lora=None, u_out=None, *, weight=None, sw=None, t=None):
    """``out = x W^T (+ s (x_lora A^T) B^T) (+ bias)`` on the GPU, ``W`` the dense ``weight``
    (``W(o, k)`` at flat ``o * sw[0] + k * sw[1]``) or the DeviceNF4Tensor ``t`` (one row:
    the fused GEMV where it applies, else the tiled kernel); ``lora``: the checked
    ``(A, B, r)`` or None; ``x_lora A^T`` into ``u_out`` when given."""
    x, n = rows("x", x, in_f)
    xl = same_rows("x_lora", x_lora, x)
    b, use_bias = bias_arg(bias, out_f)
    out = output(out, x, out_f)
    if lora is not None:
        lora_a, lora_b, r = lora
        keep_u(u_out, x, xl, n, in_f, lora_a, r)
    if n == 0:
        return out
    xf, low = flat(x), {}
    if lora is not None:
        us = scratch("us", (n, r))
        shrink(flat(xl), in_f, 1, in_f, flat(lora_a), in_f, 1, s, us)
        low = dict(U=flat(us), sui=r, sut=1, Bm=flat(lora_b), sbo=r, sbt=1, R=r)
    if t is not None and gemv_ok(t, n):
        if lora is None:
            cuda = numba_cuda()
            us, lora_b = cuda.device_array((n, 0), np.float32), cuda.device_array((out_f, 0), np.float32)
        T, R = kernels.GEMV_THREADS, kernels.GEMV_ROWS
        kernels.make_nf4_gemv()[grid(out_f, R), T](t.packed.view(np.uint32), t.scales, t.blocksize,
                                                   block_shift(t.blocksize, t.numel), const("code"), xf, us, lora_b,
                                                   b, use_bias, flat(out))
        return out
    base = dict(t=t, swo=in_f, swk=1) if t is not None else dict(W=flat(weight), swo=sw[0], swk=sw[1])
    matmul(xf, in_f, 1, n, out_f, in_f, flat(out), out_f, **base, **low, bias=b if use_bias else None)
    return out


@register("cuda")
def linear_forward(x, weight, bias=None, out=None, *, fan_in_fan_out=False):
    """GPU :func:`numlora.ops.linear_forward` (``x W^T + b``)."""
    weight, out_f, in_f, sw = _weight(weight, fan_in_fan_out)
    return _forward(x, out_f, in_f, None, 0.0, bias, out, weight=weight, sw=sw)


@register("cuda")
def merge_lora(weight, lora_a, lora_b, scaling, fan_in_fan_out=False, *, record=False, _sign=1.0):
    """GPU :func:`numlora.ops.merge_lora` (plain merge, in place). The bit-exact tracked
    merge (``record=True``) is CPU only."""
    if record:
        raise ConfigError("record=True (the bit-exact tracked merge) is CPU only; on the GPU merge plainly "
                          "(record=False), or merge on the host with numlora.to_host(weight)")
    s = validate.real_scalar("scaling", scaling)
    weight, out_f, in_f, _ = _weight(weight, fan_in_fan_out)
    lora_a, lora_b, _ = low_rank(lora_a, lora_b, out_f, in_f)
    p, q = (lora_a.T, lora_b.T) if fan_in_fan_out else (lora_b, lora_a)
    kernels.merge_plain[grid(weight.size, kernels.THREADS), kernels.THREADS](weight, p, q, np.float32(_sign * s))
    return None


@register("cuda")
def unmerge_lora(weight, lora_a, lora_b, scaling, fan_in_fan_out=False, *, record=None):
    """GPU :func:`numlora.ops.unmerge_lora` (plain: subtracts the same delta)."""
    if record is not None:
        raise ConfigError("a MergeRecord (bit-exact unmerge) is CPU only; on the GPU unmerge with record=None")
    merge_lora(weight, lora_a, lora_b, scaling, fan_in_fan_out, _sign=-1.0)


def _backward(x, out_f, in_f, w_strides, t, weight_flat, lora_a, lora_b, r, s, grad_out, dropout, x_drop, u,
              grad_a, grad_b, need_grad_x):
    check_x_drop_alone(x_drop, dropout, need_grad_x)
    drop = DropoutState.from_arg(dropout)
    x, n = rows("x", x, in_f)
    g, ng = rows("grad_out", grad_out, out_f, "out_features")
    if len(g.shape) != len(x.shape) or ng != n:
        want = (out_f,) if len(x.shape) == 1 else (n, out_f)
        raise ShapeError(f"expected grad_out of shape {want} (one row per row of x), got {tuple(g.shape)}")
    if u is not None:
        uu = dev("u", u, (1, 2), allow_empty=True)
        validate.expect_shape("u", uu, (r,) if len(x.shape) == 1 else (n, r))  # recomputed on the GPU (cheap)
    cuda = numba_cuda()
    ga = _grad("grad_a", grad_a, (r, in_f))
    gb = _grad("grad_b", grad_b, (out_f, r))
    out_a = ga if ga is not None else cuda.device_array((r, in_f), np.float32)
    out_b = gb if gb is not None else cuda.device_array((out_f, r), np.float32)
    xf, gf, af, bf = flat(x), flat(g), flat(lora_a), flat(lora_b)
    if x_drop is not None:
        xdf = flat(same_rows("x_drop", x_drop, x))
    elif drop is not None and n:
        xdf = scratch("xd", (x.size,))
        _dropout_launch(xf, n, in_f, drop, xdf, add=False)
    else:
        xdf = xf
    us = scratch("us", (max(n, 1), r))
    hs = scratch("hs", (max(n, 1), r))
    if n:
        shrink(xdf, in_f, 1, in_f, af, in_f, 1, s, us)  # s x_drop A^T
        shrink(gf, out_f, 1, out_f, bf, 1, r, s, hs)  # s G B
    usf, hsf = flat(us), flat(hs)
    if n == 0:
        if ga is None:
            fill_zero(out_a)
        if gb is None:
            fill_zero(out_b)
    else:
        # grad_b (out, r) = G^T us ; grad_a (r, in) = hs^T x
        matmul(gf, 1, out_f, out_f, r, n, flat(out_b), r, W=usf, swo=1, swk=r, accumulate=gb is not None)
        matmul(hsf, 1, r, r, in_f, n, flat(out_a), in_f, W=xdf, swo=1, swk=in_f, accumulate=ga is not None)
    dx = None
    if need_grad_x:
        dx = cuda.device_array(x.shape, np.float32)
        if n and drop is None:
            # dx (n, in) = G W + hs A: W(o=j, k=o') from the weight's strides, A via the epilogue
            matmul(gf, out_f, 1, n, in_f, out_f, flat(dx), in_f, W=weight_flat, swo=w_strides[0],
                   swk=w_strides[1], t=t, U=hsf, sui=r, sut=1, Bm=af, sbo=1, sbt=in_f, R=r)
        elif n:
            # dx = G W + (hs A) * mask / (1 - p): the low-rank term through the dropout mask
            matmul(gf, out_f, 1, n, in_f, out_f, flat(dx), in_f, W=weight_flat, swo=w_strides[0],
                   swk=w_strides[1], t=t)
            ha = scratch("ha", (x.size,))
            matmul(hsf, r, 1, n, in_f, r, ha, in_f, W=af, swo=1, swk=in_f)
            _dropout_launch(ha, n, in_f, drop, flat(dx), add=True)
    return dx, out_a, out_b


# --- dropout ---------------------------------------------------------------------------------------

def _dropout_launch(src, n, m, drop, dst, *, add):
    """The dropout kernel over flat (n, m) arrays: dst = src * mask / (1 - p), or
    dst += that (``add``)."""
    if n * m == 0:
        return
    d = drop.mask(np.float32)  # the CPU kernels' threshold and scale
    c = kernels.DROP_CHUNK_LOG2
    if not 0 <= c <= 5:
        raise ConfigError(f"numlora.cuda.kernels.DROP_CHUNK_LOG2 must be in 0..5 (one uint32 of keep bits), got {c}")
    cpr = -(-m // (1 << c))
    if cpr >= 2**32 - kernels.THREADS:  # the kernel's 32-bit chunk arithmetic
        raise ShapeError(f"rows of {m} elements are too long for the GPU dropout kernel (at most "
                         f"{(2**32 - kernels.THREADS - 1) << c})")
    chunks = n * cpr
    kernels.make_dropout_apply()[grid(chunks, kernels.THREADS), kernels.THREADS](
        src, n, m, np.uint64(d.seed), d.thresh, d.scale, _jumps(c), dst, bool(add))


@register("cuda")
def lora_dropout(x, p, seed, out=None):
    """GPU :func:`numlora.dropout.lora_dropout`: the same masks, bit for bit (one xorshift64
    stream per row, seeded from (seed, row)); returns ``(x_drop, DropoutState(p, seed))``."""
    x = dev("x", x, (1, 2), allow_empty=True)
    state = DropoutState.checked(p, seed)
    if out is not None:
        out = dev("out", out, len(x.shape), allow_empty=True)
        validate.expect_shape("out", out, tuple(x.shape))
    if state.p == 0.0:
        if out is None:
            return x, state
        if x.size:
            out.copy_to_device(x)
        return out, state
    if out is None:
        out = numba_cuda().device_array(x.shape, np.float32)
    m = tuple(x.shape)[-1]
    n = x.size // m if m else 0
    _dropout_launch(flat(x), n, m, state, flat(out), add=False)
    return out, state


def _grad(name, g, shape):
    if g is None:
        return None
    g = dev(name, g, len(shape))
    validate.expect_shape(name, g, shape)
    return g


@register("cuda")
def lora_backward(x, weight, lora_a, lora_b, scaling, grad_out, *, fan_in_fan_out=False, dropout=None,
                  x_drop=None, u=None, grad_a=None, grad_b=None, need_grad_x=True):
    """GPU :func:`numlora.ops.lora_backward`: ``grad_b = s G^T U``, ``grad_a = s H^T x_d``,
    ``grad_x = G W + s (H A) * mask / (1 - p)`` with ``U = x_d A^T``, ``H = G B``."""
    weight, out_f, in_f, _ = _weight(weight, fan_in_fan_out)
    lora_a, lora_b, r = low_rank(lora_a, lora_b, out_f, in_f)
    s = validate.real_scalar("scaling", scaling)
    # dx = G W: W(o = j, k = o'): (out, in) -> flat o' * in + j ; (in, out) -> j * out + o'
    ws = (out_f, 1) if fan_in_fan_out else (1, in_f)
    return _backward(x, out_f, in_f, ws, None, flat(weight), lora_a, lora_b, r, s, grad_out, dropout, x_drop, u,
                     grad_a, grad_b, need_grad_x)


# --- NF4 -----------------------------------------------------------------------------------------

def _fused_ok(blocksize):
    half = blocksize // 2
    return (blocksize % 2 == 0 and half & (half - 1) == 0 and half <= kernels.THREADS
            and kernels.THREADS & (kernels.THREADS - 1) == 0)


def quantize_raw(xf, blocksize, packed, absmax, bad):
    """Launch the quantize kernels (no checks, no host transfer): what gpu_check times."""
    n = xf.size
    nfull = n // blocksize
    if _fused_ok(blocksize):
        kernels.make_nf4_quantize_fused()[grid(packed.size, kernels.THREADS), kernels.THREADS](
            xf, blocksize, int(blocksize).bit_length() - 1, nfull, packed, absmax, bad)
    else:
        kernels.make_nf4_absmax()[absmax.size, kernels.REDUCE_THREADS](xf, blocksize, nfull, absmax, bad)
        kernels.nf4_codes[grid(packed.size, kernels.THREADS), kernels.THREADS](
            xf, blocksize, block_shift(blocksize, n), nfull, absmax, packed)


@register("cuda")
def quantize_nf4(w, blocksize=64, double_quant=False, quant_type="nf4"):
    """GPU :func:`numlora.nf4.quantize_nf4`: bit-identical codes and scales, returned as a
    :class:`~numlora.device.DeviceNF4Tensor`. One 4-byte device-to-host copy checks for
    NaN / inf (then the input is copied to the host to name the first bad index). NF4
    only: ``quant_type="fp4"`` raises :class:`~numlora.errors.DeviceError`."""
    w = dev("w", w)
    bs = validate.check_blocksize(blocksize)
    if not isinstance(double_quant, (bool, np.bool_)):
        raise ConfigError(f"double_quant must be True or False, got {double_quant!r}")
    if quant_type != "nf4":
        raise DeviceError(f"expected quant_type 'nf4' on the GPU (the CUDA kernels quantize NF4 only), got "
                          f"{quant_type!r:.40}; quantize FP4 on the CPU")
    cuda = numba_cuda()
    xf = flat(w)
    n = xf.size
    packed = cuda.device_array((n + 1) // 2, np.uint8)
    absmax = cuda.device_array(-(-n // bs), np.float32)
    bad = cuda.to_device(np.zeros(1, np.int32))
    quantize_raw(xf, bs, packed, absmax, bad)
    if bad.copy_to_host()[0]:
        host = xf.copy_to_host()
        raise validate.first_nonfinite("w", host, tuple(w.shape))
    dq = None
    if double_quant:
        from ..kernels import nf4 as hk

        am = absmax.copy_to_host()
        offset = np.float32(np.mean(am, dtype=np.float64))
        q8 = np.empty(am.size, np.uint8)
        absmax2 = np.empty(-(-am.size // DQ_GROUP), np.float32)
        hk.code8_encode(am, offset, DQ_GROUP, CODE8, q8, absmax2)
        dec = np.empty(am.size, np.float32)
        hk.code8_decode(q8, absmax2, offset, DQ_GROUP, CODE8, dec)
        absmax = cuda.to_device(dec)
        dq = (q8, absmax2, offset, CODE8)
    return DeviceNF4Tensor(packed, absmax, tuple(int(d) for d in w.shape), bs, "float32", dq)


@register("cuda")
def dequantize_nf4(t, out=None):
    """GPU :func:`numlora.nf4.dequantize_nf4`: bit-identical float32."""
    if not isinstance(t, DeviceNF4Tensor):
        raise DeviceError(f"expected a DeviceNF4Tensor (numlora.to_device(t)), got {type(t).__name__}")
    if out is None:
        out = numba_cuda().device_array(t.shape, np.float32)
    else:
        out = dev("out", out, len(t.shape))
        validate.expect_shape("out", out, t.shape)
    n = t.numel
    if n:
        kernels.make_nf4_dequantize_range()[grid(n, kernels.THREADS), kernels.THREADS](t.packed, t.scales, t.blocksize,
                                                                 block_shift(t.blocksize, n), const("code"), 0, n,
                                                                 flat(out))
    return out


def float32_compute(compute_dtype):
    """The GPU kernels compute in float32 only: refuse a 16-bit ``compute_dtype``."""
    if products.compute_mode(compute_dtype):
        raise DeviceError(f"expected compute_dtype float32 (or None) on the GPU, got {compute_dtype!r:.40}: the "
                          "16-bit compute dtypes run on the CPU only")


def gemv_ok(t, n):
    out_f, in_f = t.shape
    bs = t.blocksize
    return n == 1 and in_f % 8 == 0 and bs % 8 == 0 and in_f % bs == 0


@register("cuda")
def nf4_matmul(x, t, out=None, *, bias=None, compute_dtype=None):
    """GPU :func:`numlora.nf4.nf4_matmul`: fused GEMV for one row, tiled for more; the
    weight is decoded in registers / shared memory, never materialised. float32 compute
    only."""
    float32_compute(compute_dtype)
    t = tensor(t)
    return _forward(x, t.shape[0], t.shape[1], None, 0.0, bias, out, t=t)


@register("cuda")
def qlora_forward(x, t, lora_a, lora_b, scaling, bias=None, out=None, *, x_lora=None, u_out=None,
                  compute_dtype=None):
    """GPU :func:`numlora.nf4.qlora_forward` (LoRA expand and bias fused; float32 compute)."""
    float32_compute(compute_dtype)
    s = validate.real_scalar("scaling", scaling)
    t = tensor(t)
    if lora_a is None or lora_b is None:
        raise ShapeError("expected lora_a and lora_b arrays, got None")
    lora = low_rank(lora_a, lora_b, *t.shape)
    return _forward(x, t.shape[0], t.shape[1], lora, s, bias, out, x_lora, u_out, t=t)


@register("cuda")
def nf4_matmul_t(g, t, out=None, *, compute_dtype=None):
    """GPU :func:`numlora.nf4.nf4_matmul_t`: ``g deq(W)``, fused (float32 compute)."""
    float32_compute(compute_dtype)
    t = tensor(t)
    out_f, in_f = t.shape
    g, n = rows("g", g, out_f, "out_features")
    out = output(out, g, in_f)
    if n:
        matmul(flat(g), out_f, 1, n, in_f, out_f, flat(out), in_f, t=t, swo=1, swk=in_f)
    return out


@register("cuda")
def qlora_backward(x, t, lora_a, lora_b, scaling, grad_out, *, dropout=None, x_drop=None, u=None, grad_a=None,
                   grad_b=None, need_grad_x=True, compute_dtype=None):
    """GPU :func:`numlora.nf4.qlora_backward`; ``G deq(W)`` fused (float32 compute)."""
    float32_compute(compute_dtype)
    t = tensor(t)
    out_f, in_f = t.shape
    lora_a, lora_b, r = low_rank(lora_a, lora_b, out_f, in_f)
    s = validate.real_scalar("scaling", scaling)
    return _backward(x, out_f, in_f, (1, in_f), t, None, lora_a, lora_b, r, s, grad_out, dropout, x_drop, u,
                     grad_a, grad_b, need_grad_x)


# --- RNG, AdamW and parameters -----------------------------------------------------------------------------

_MASK = (1 << 64) - 1
_POW: list = []


def _py_step(s):
    s ^= (s << 13) & _MASK
    s ^= s >> 7
    s ^= (s << 17) & _MASK
    return s


def _apply(mat, s):
    r = 0
    i = 0
    while s:
        if s & 1:
            r ^= mat[i]
        s >>= 1
        i += 1
    return r


def _powers():
    """[T^(2^i) for i < 64], T the xorshift64 step as a GF(2) matrix (64 columns)."""
    if not _POW:
        m = [_py_step(1 << i) for i in range(64)]
        for _ in range(64):
            _POW.append(m)
            m = [_apply(m, c) for c in m]
    return _POW


def xorshift_jump(state: int, steps: int) -> int:
    """The xorshift64 state ``steps`` steps after ``state`` (host, O(64 * log steps))."""
    pw = _powers()
    i = 0
    while steps:
        if steps & 1:
            state = _apply(pw[i], state)
        steps >>= 1
        i += 1
    return state


def xorshift64_fill(state: int, out) -> int:
    """Fill the flat float32 device array ``out`` with the stream after ``state``; return
    the new state. Bit-identical to :func:`numlora.kernels.rng.xorshift64_fill`."""
    n = out.size
    if n == 0:
        return state
    c = kernels.RNG_CHUNK_LOG2
    nthreads = -(-n // (1 << c))
    kernels.make_xorshift64_fill()[grid(nthreads, kernels.THREADS), kernels.THREADS](np.uint64(state), _jumps(c), out)
    return xorshift_jump(state, n)


_JUMPS: dict = {}


def _jumps(c):
    """The jump matrices for chunks of 2**c steps, ``[T^(2^(c + l)) for l < 64]`` (zero
    beyond 2^63), copied to the device once per c and kept there (no host-to-device copy,
    which would synchronise, per call)."""
    d = _JUMPS.get(c)
    if d is None:
        pw = _powers()
        jumps = np.array([pw[c + lvl] if c + lvl < 64 else [0] * 64 for lvl in range(64)], dtype=np.uint64)
        d = _JUMPS[c] = numba_cuda().to_device(jumps)
    return d


@register("cuda")
def uniform(rng, shape):
    """:meth:`numlora.XorShift64.uniform` into a new float32 device array (the stream and
    the generator's state advance exactly as on the host)."""
    shape = validate.shape_arg("shape", shape, 4)
    out = numba_cuda().device_array(shape, np.float32)
    if out.size:
        rng._state = xorshift64_fill(rng.state, flat(out))
    return out


@register("cuda")
def adamw_update(value, grad, m, v, *, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1):
    """GPU :func:`numlora.train.adamw_update`: one AdamW step on device arrays, in place
    (``value``, ``m``, ``v``)."""
    arrays = [dev(nm, a) for nm, a in (("value", value), ("grad", grad), ("m", m), ("v", v))]
    for nm, a in zip(("grad", "m", "v"), arrays[1:]):
        validate.expect_shape(nm, a, tuple(arrays[0].shape))
    scalars = adamw_scalars(lr, beta1, beta2, eps, weight_decay, step)
    n = arrays[0].size
    kernels.adamw_step[grid(n, kernels.THREADS), kernels.THREADS](*[flat(a) for a in arrays],
                                                                   *[float(c) for c in scalars])


@register("cuda")
def param_array(name, a):
    """A parameter's value on the GPU: a C-contiguous float32 device array."""
    a = as_cuda(a)
    if np.dtype(a.dtype) != np.float32:
        raise DTypeError(f"{name}: a Parameter on the GPU must be float32, got {np.dtype(a.dtype)}")
    if a.size and not a.is_c_contiguous():
        raise ShapeError(f"{name}: a Parameter's value must be C-contiguous (it is updated in place)")
    return a


@register("cuda")
def grad_array(label, g, value):
    """The gradient ``g`` of the GPU parameter ``value`` (named ``label``), checked."""
    g = as_cuda(g)
    if np.dtype(g.dtype) != np.dtype(value.dtype):
        raise DTypeError(f"expected the gradient of {label} to be a {np.dtype(value.dtype)} device array, got "
                         f"{np.dtype(g.dtype)}")
    validate.expect_shape(f"gradient of {label}", g, tuple(value.shape))
    return g


@register("cuda")
def zeros_like(a):
    return numba_cuda().to_device(np.zeros(tuple(a.shape), np.dtype(a.dtype)))


def _host_copy(g):
    return g.copy_to_host() if hasattr(g, "copy_to_host") else as_cuda(g).copy_to_host()


@register("cuda")
def sum_squares(g) -> float:
    """sum(g**2) in float64, computed on the host (a copy of the gradient: small for LoRA)."""
    h = _host_copy(g).reshape(-1).astype(np.float64)
    return float(np.dot(h, h))


@register("cuda")
def scale_(g, coef) -> None:
    """g *= coef, through the host (as :func:`sum_squares`)."""
    h = _host_copy(g)
    h *= h.dtype.type(coef)
    as_cuda(g).copy_to_device(h)


register("cuda", "fill_zero")(fill_zero)

