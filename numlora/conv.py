"""The functional API of LoRA on 1-D and 2-D convolutions, as PEFT's ``lora.Conv1d`` /
``lora.Conv2d`` compute it.

The base is a convolution ``weight`` (out_channels, in_channels, *kernel) with an
optional ``bias``; the adapter, in PEFT's layout, is ``lora_a`` (r, in_channels, *kernel)
(a convolution with the base's kernel size, stride, padding and dilation, to r channels)
and ``lora_b`` (out_channels, r, 1[, 1]) (a 1x1 convolution back). The flat shapes
``(r, in_channels * prod(kernel))`` and ``(out_channels, r)`` are accepted too::

    y = conv(x, weight) + bias + scaling * conv1x1(conv(dropout(x), lora_a), lora_b)

Since ``lora_b`` is 1x1, the LoRA path is ``conv(x, scaling * B @ A)``, so merging adds
``scaling * B @ A`` (A flattened) into the flattened weight: :func:`merge_conv` /
:func:`unmerge_conv` are :func:`numlora.ops.merge_lora` on that view, with the same
bit-exact :class:`~numlora.ops.MergeRecord`.

How it computes (im2col measured against a direct numba loop, see
docs/embedding-conv.md): images are unfolded into columns (``im2col``) and multiplied by
the kernel with BLAS. Without dropout the LoRA branch is folded into the kernel,
``conv(x, W + s B A)`` (B is 1x1, and the (out, in * K) kernel is tiny next to the
activations), and the images of a batch are unfolded side by side, in parallel, in
chunks of at most :data:`COLUMN_BYTES` of columns (at least one image), each chunk one
BLAS product, the column buffers reused from call to call. With a separate ``x_lora``
the branch runs as
``(s B) @ (A @ cols(x_lora))``, image by image.

Supported: ``groups=1``, ``padding_mode="zeros"``, any stride / dilation, padding as
integers, per-side pairs, ``"valid"`` or ``"same"``. Anything else is refused with
:class:`~numlora.errors.ConfigError`. Inputs are ``(N, C, L)`` / ``(N, C, H, W)`` as in
torch, or unbatched ``(C, L)`` / ``(C, H, W)``.

Dropout (training): pass ``x_lora = lora_dropout(x.reshape(n, -1), p, seed)[0]``
reshaped back (one dropout row per image; ``n = 1`` for an unbatched x), and give
:func:`conv_lora_backward` the same ``dropout=(p, seed)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _backward as bw
from . import _scratch
from . import _validate as validate
from ._dispatch import dispatch
from .dropout import DropoutState, lora_dropout
from .errors import ConfigError, ShapeError
from .ops import merge_lora, unmerge_lora

__all__ = ["conv_forward", "conv_lora_backward", "conv_lora_forward", "free_buffers", "merge_conv", "unmerge_conv"]


def _kernels():
    from .kernels import embed_conv

    return embed_conv


class Geometry(NamedTuple):
    """A convolution's shape arithmetic over 2-D spatial dims (a 1-D one has height 1):
    kernel, stride, dilation, padding before each dim, output size."""

    kh: int
    kw: int
    sh: int
    sw: int
    dh: int
    dw: int
    ph: int
    pw: int
    oh: int
    ow: int


def _tuple(name, value, nd):
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        vals = (int(value),) * nd
    elif isinstance(value, (tuple, list)) and len(value) == nd and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        vals = tuple(int(v) for v in value)
    else:
        raise ConfigError(f"{name} must be an integer or a tuple of {nd} integers, got {value!r}")
    return vals


def conv_options(nd, kernel, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """Validate a convolution's options; return ``(stride, dilation, pads)`` with ``pads``
    a tuple of ``(before, after)`` per spatial dim."""
    if not (isinstance(groups, (int, np.integer)) and not isinstance(groups, bool) and groups == 1):
        raise ConfigError(f"only groups=1 is supported (PEFT cannot merge grouped convolutions either), got "
                          f"groups={groups!r}")
    if padding_mode != "zeros":
        raise ConfigError(f"only padding_mode='zeros' is supported, got {padding_mode!r}")
    stride = _tuple("stride", stride, nd)
    dilation = _tuple("dilation", dilation, nd)
    if min(stride) < 1 or min(dilation) < 1:
        raise ConfigError(f"stride and dilation must be >= 1, got stride={stride}, dilation={dilation}")
    if isinstance(padding, str):
        if padding == "valid":
            pads = ((0, 0),) * nd
        elif padding == "same":
            if max(stride) != 1:
                raise ConfigError(f"padding='same' needs stride 1 (as in torch), got stride={stride}")
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pads = tuple((t // 2, t - t // 2) for t in total)
        else:
            raise ConfigError(f"padding must be an integer, a tuple, 'valid' or 'same', got {padding!r}")
    else:
        p = _tuple("padding", padding, nd)
        if min(p) < 0:
            raise ConfigError(f"padding must be >= 0, got {p}")
        pads = tuple((v, v) for v in p)
    return stride, dilation, pads


def geometry(spatial, kernel, stride, dilation, pads) -> Geometry:
    """The :class:`Geometry` of an input of ``spatial`` size (1 or 2 dims)."""
    outs = []
    for size, k, s, d, (lo, hi) in zip(spatial, kernel, stride, dilation, pads):
        span = d * (k - 1) + 1
        if size + lo + hi < span:
            raise ShapeError(f"the input's spatial size {tuple(spatial)} (padded by {pads}) is smaller than the "
                             f"kernel {tuple(kernel)} at dilation {dilation}")
        outs.append((size + lo + hi - span) // s + 1)
    if len(spatial) == 1:
        return Geometry(1, kernel[0], 1, stride[0], 1, dilation[0], 0, pads[0][0], 1, outs[0])
    return Geometry(kernel[0], kernel[1], stride[0], stride[1], dilation[0], dilation[1], pads[0][0], pads[1][0],
                    outs[0], outs[1])


def conv_weight(weight, name="weight"):
    """A convolution weight (out, in, k) or (out, in, kh, kw)."""
    w = validate.float_array(name, weight, None)
    if w.ndim not in (3, 4):
        raise ShapeError(f"expected {name} of a Conv1d (out_channels, in_channels, k) or a Conv2d (out_channels, "
                         f"in_channels, kh, kw), got shape {w.shape}")
    return w


def flat_factors(lora_a, lora_b, weight_shape):
    """A (r, in * K) and B (out, r) from PEFT's conv shapes (or the flat ones), checked
    against the base weight's shape; returns (A2, B2, rank)."""
    out_c, in_c, kernel = weight_shape[0], weight_shape[1], tuple(weight_shape[2:])
    a = validate.float_array("lora_a", lora_a, None)
    b = validate.float_array("lora_b", lora_b, None)
    nd = len(kernel)
    if a.ndim == nd + 2:
        if tuple(a.shape[1:]) != (in_c,) + kernel:
            raise ShapeError(f"expected lora_a of shape (r, {in_c}, {', '.join(map(str, kernel))}) (the base's "
                             f"in_channels and kernel size, PEFT's lora_A), got {a.shape}")
        a = a.reshape(a.shape[0], -1)
    if b.ndim == nd + 2:
        if tuple(b.shape[2:]) != (1,) * nd:
            raise ShapeError(f"expected lora_b to be a 1x1 convolution (out_channels, r{', 1' * nd}) (PEFT's "
                             f"lora_B), got {b.shape}")
        b = b.reshape(b.shape[0], b.shape[1])
    a, b, rank = validate.low_rank_arrays(a, b, out_c, in_c * int(np.prod(kernel)),
                                          validate.Base("the flattened conv weight", (out_c, in_c * int(
                                              np.prod(kernel))), None))
    return a, b, rank


def _input(x, in_c, nd, name="x"):
    x = validate.float_array(name, x, (nd + 1, nd + 2))
    batched = x.ndim == nd + 2
    if x.shape[-nd - 1] != in_c:
        raise ShapeError(f"expected {name} of shape ({'N, ' if batched else ''}{in_c}, "
                         f"{', '.join(['...'] * nd)}) (in_channels = {in_c}), got {x.shape}")
    return x, batched


def _as4(x, nd, batched, dtype):
    """x as a C-contiguous (N, C, H, W) array of dtype (a 1-D conv gets H = 1)."""
    if not batched:
        x = x[None]
    x = np.ascontiguousarray(x, dtype)
    return x[:, :, None, :] if nd == 1 else x


def _out_shape(x, out_c, g, nd, batched):
    sp = (g.ow,) if nd == 1 else (g.oh, g.ow)
    return ((x.shape[0],) if batched else ()) + (out_c,) + sp


def _setup(x, weight, stride, padding, dilation, groups, padding_mode):
    weight = conv_weight(weight)
    nd = weight.ndim - 2
    out_c, in_c, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    x, batched = _input(x, in_c, nd)
    stride, dilation, pads = conv_options(nd, kernel, stride, padding, dilation, groups, padding_mode)
    g = geometry(x.shape[-nd:], kernel, stride, dilation, pads)
    return weight, nd, out_c, x, batched, g


def _im2col(k, x3, g, cols):
    k.im2col_serial(x3, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.oh, g.ow, cols)


#: Bytes of unfolded columns a forward holds at once: the images of a batch are unfolded
#: in chunks of this size (at least one image), in parallel, before their BLAS products
#: (fewer, larger chunks hand the cores between numba's and OpenBLAS's threads fewer
#: times: next to torch's convolutions, 8 MiB chunks measured 12.5-15 ms in some phases but
#: 28-32 ms in others on the benchmark's Conv2d, 32 MiB chunks 17-20 ms throughout).
COLUMN_BYTES = 32 * 1024 * 1024

_BUFFERS = ("conv.cols", "conv.y", "conv.stack", "conv.dcols")


def free_buffers() -> None:
    """Drop the calling thread's reused column buffers (the forward keeps up to about
    2 x COLUMN_BYTES, the backward about 3 x; they are made again on the next call)."""
    _scratch.free(*_BUFFERS)


def _run(x4, w2, a2, b2, s, bias, out4, g, xl4):
    """The forward over (N, C, H, W) arrays of one dtype into ``out4`` (N, out, oh, ow);
    ``a2 is None``: the base alone.

    When the LoRA branch reads x itself (no dropout), it runs folded into the kernel:
    ``conv(x, W + s B A)``, since B is 1x1. The folded kernel is (out, in * K), tiny next
    to the activations, so the LoRA branch then costs nothing per output pixel (one
    product per image instead of three)."""
    k = _kernels()
    n, out_c = x4.shape[0], w2.shape[0]
    cols_n = g.oh * g.ow
    dtype = x4.dtype
    if a2 is not None and xl4 is not None:
        _run_unfolded(k, x4, w2, a2, b2, s, bias, out4, g, xl4)
        return
    if a2 is not None:
        w2 = w2 + np.dot(b2 * dtype.type(s), a2)
    per_image = w2.shape[1] * cols_n * dtype.itemsize
    chunk = max(1, min(n, COLUMN_BYTES // max(per_image, 1)))
    cols_buf = _scratch.scratch("conv.cols", w2.shape[1] * chunk * cols_n, dtype)
    y_buf = _scratch.scratch("conv.y", out_c * chunk * cols_n, dtype)
    for i0 in range(0, n, chunk):
        m = min(chunk, n - i0)
        cols = cols_buf[: w2.shape[1] * m * cols_n].reshape(w2.shape[1], m * cols_n)
        k.im2col_batch(x4, i0, m, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.oh, g.ow, cols)
        ym = y_buf[: out_c * m * cols_n].reshape(out_c, m * cols_n)
        np.dot(w2, cols, out=ym)
        # (out, m, pixels) -> the images' (m, out, pixels), the bias added in the same pass
        dst = out4[i0:i0 + m].reshape(m, out_c, cols_n)
        src = ym.reshape(out_c, m, cols_n).transpose(1, 0, 2)
        if bias is None:
            dst[...] = src
        else:
            np.add(src, bias[None, :, None], out=dst)


def _run_unfolded(k, x4, w2, a2, b2, s, bias, out4, g, xl4):
    """The forward with a LoRA input of its own (dropout): image by image, the base product
    on the columns of x, the LoRA branch on those of ``xl4``."""
    n, out_c = x4.shape[0], w2.shape[0]
    cols_n = g.oh * g.ow
    dtype = x4.dtype
    cols = np.empty((w2.shape[1], cols_n), dtype)
    cols_d = np.empty_like(cols)
    sb = b2 * dtype.type(s)
    tmp = np.empty((out_c, cols_n), dtype)
    for i in range(n):
        _im2col(k, x4[i], g, cols)
        o = out4[i].reshape(out_c, cols_n)
        np.dot(w2, cols, out=o)
        _im2col(k, xl4[i], g, cols_d)
        np.dot(sb, np.dot(a2, cols_d), out=tmp)
        o += tmp
        if bias is not None:
            o += bias[:, None]


def _forward(x, weight, lora, bias, out, stride, padding, dilation, groups, padding_mode, x_lora):
    weight, nd, out_c, x, batched, g = _setup(x, weight, stride, padding, dilation, groups, padding_mode)
    arrays = [x, weight] + [a for a in (bias, x_lora) if a is not None]
    a2 = b2 = None
    s = 0.0
    if lora is not None:
        lora_a, lora_b, scaling = lora
        a2, b2, _ = flat_factors(lora_a, lora_b, weight.shape)
        s = validate.real_scalar("scaling", scaling)
        arrays += [a2, b2]
    dtype = np.result_type(*[a.dtype for a in arrays])
    xl = None
    if x_lora is not None:
        xl, _ = _input(x_lora, weight.shape[1], nd, "x_lora")
        if xl.shape != x.shape:
            raise ShapeError(f"expected x_lora of shape {x.shape} (the shape of x), got {xl.shape}")
    b_arr, use_bias = validate.bias_array(bias, out_c, dtype)
    shape = _out_shape(x, out_c, g, nd, batched)
    dest = None
    if out is None:
        out = np.empty(shape, dtype)
    else:
        validate.out_array("out", out, shape, dtype)
        out, dest = validate.private_out(out, {"x": x, "weight": weight, "bias": bias, "x_lora": x_lora,
                                               "lora_a": None if lora is None else lora[0],
                                               "lora_b": None if lora is None else lora[1]})
    w2 = np.ascontiguousarray(weight.reshape(out_c, -1), dtype)
    if a2 is not None:
        a2, b2 = np.ascontiguousarray(a2, dtype), np.ascontiguousarray(b2, dtype)
    out4 = out if batched else out[None]
    if nd == 1:
        out4 = out4[:, :, None, :]
    _run(_as4(x, nd, batched, dtype), w2, a2, b2, s, b_arr if use_bias else None, out4, g,
         None if xl is None else _as4(xl, nd, batched, dtype))
    return validate.deliver(out, dest)


@dispatch(cpu_only=True)
def conv_lora_forward(x, weight, lora_a, lora_b, scaling, bias=None, out=None, *, stride=1, padding=0,
                      dilation=1, groups=1, padding_mode="zeros", x_lora=None):
    """``conv(x, W) + b + scaling * conv1x1(conv(x_lora, A), B)``: PEFT's ``lora.Conv1d`` /
    ``lora.Conv2d`` forward (``x_lora``: the LoRA branch's input when it differs from x,
    the dropped x in training; x when None).

    Parameters
    ----------
    x : (N, C_in, L) / (N, C_in, H, W) or unbatched (C_in, L) / (C_in, H, W), float
    weight : (C_out, C_in, k) or (C_out, C_in, kh, kw): a 3-D weight makes a Conv1d
    lora_a : (r, C_in, *kernel) or (r, C_in * prod(kernel)); lora_b : (C_out, r, 1[, 1]) or (C_out, r)
    scaling : ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); bias : (C_out,) or None
    stride, padding, dilation, groups, padding_mode : as torch's ``F.conv1d`` / ``F.conv2d``
        (``groups=1`` and ``padding_mode="zeros"`` only)
    out : optional C-contiguous output of the result's shape and the compute dtype
        (float64 if any array is, else float32); it may overlap the inputs.
    """
    return _forward(x, weight, (lora_a, lora_b, scaling), bias, out, stride, padding, dilation, groups,
                    padding_mode, x_lora)


@dispatch(cpu_only=True)
def conv_forward(x, weight, bias=None, out=None, *, stride=1, padding=0, dilation=1, groups=1,
                 padding_mode="zeros"):
    """``conv(x, W) + b``, the base convolution alone (what a disabled or merged layer
    runs); arguments as in :func:`conv_lora_forward`."""
    return _forward(x, weight, None, bias, out, stride, padding, dilation, groups, padding_mode, None)


@dispatch(cpu_only=True)
def conv_lora_backward(x, weight, lora_a, lora_b, scaling, grad_out, *, stride=1, padding=0, dilation=1,
                       groups=1, padding_mode="zeros", dropout=None, x_drop=None, grad_a=None, grad_b=None,
                       need_grad_x=True):
    """Gradients of :func:`conv_lora_forward` given ``grad_out = dL/dy``.

    Per image, with ``C`` the columns of the dropped input, ``G`` the output gradient
    (C_out, L), ``U = A C`` and ``H = s B^T G``: ``grad_b += s G U^T``,
    ``grad_a += H C^T`` and ``grad_x = col2im(W^T G) + col2im(A^T H) * mask / (1 - p)``.

    ``dropout`` : None or the ``(p, seed)`` of the forward's ``lora_dropout`` over
    ``x.reshape(n, -1)`` (see the module's notes); ``x_drop`` : the dropped x of the
    forward (recomputed from ``dropout`` when not given). ``grad_a`` / ``grad_b`` :
    optional buffers shaped like ``lora_a`` / ``lora_b`` in the compute dtype, the
    gradients **added** into them. ``need_grad_x=False`` skips ``grad_x``.

    Returns ``(grad_x, grad_a, grad_b)``, grad_a / grad_b in the shapes of lora_a / lora_b.
    """
    weight, nd, out_c, x, batched, g = _setup(x, weight, stride, padding, dilation, groups, padding_mode)
    a2, b2, rank = flat_factors(lora_a, lora_b, weight.shape)
    s = validate.real_scalar("scaling", scaling)
    need_grad_x = validate.flag("need_grad_x", need_grad_x)
    bw.check_x_drop_alone(x_drop, dropout, need_grad_x)
    gout = validate.float_array("grad_out", grad_out, None)
    shape = _out_shape(x, out_c, g, nd, batched)
    if tuple(gout.shape) != shape:
        raise ShapeError(f"expected grad_out of shape {shape} (the shape of the forward's output), got {gout.shape}")
    dtype = np.result_type(x.dtype, weight.dtype, a2.dtype, b2.dtype, gout.dtype)
    a_shape, b_shape = np.shape(lora_a), np.shape(lora_b)
    grad_a = bw.grad_buffer("grad_a", grad_a, a_shape, dtype)
    grad_b = bw.grad_buffer("grad_b", grad_b, b_shape, dtype)
    state = DropoutState.from_arg(dropout)
    x4 = _as4(x, nd, batched, dtype)
    n = x4.shape[0]
    if x_drop is not None:
        xd, _ = _input(x_drop, weight.shape[1], nd, "x_drop")
        if xd.shape != x.shape:
            raise ShapeError(f"expected x_drop of shape {x.shape} (the shape of x), got {xd.shape}")
        xd4 = _as4(xd, nd, batched, dtype)
    elif state is not None:
        xd4 = lora_dropout(x4.reshape(n, -1), state.p, state.seed)[0].reshape(x4.shape)
    else:
        xd4 = x4
    w2 = np.ascontiguousarray(weight.reshape(out_c, -1), dtype)
    a2, b2 = np.ascontiguousarray(a2, dtype), np.ascontiguousarray(b2, dtype)
    g4 = np.ascontiguousarray(gout if batched else gout[None], dtype).reshape(n, out_c, -1)
    x4, xd4, g4, a2, b2, w2 = bw.unalias_grads(grad_a, grad_b, (x4, xd4, g4, a2, b2, w2))
    k = _kernels()
    cols_n = g.oh * g.ow
    ck = w2.shape[1]
    chunk = max(1, min(n, COLUMN_BYTES // max(ck * cols_n * dtype.itemsize, 1)))
    cols_buf = _scratch.scratch("conv.cols", ck * chunk * cols_n, dtype)
    stack_buf = _scratch.scratch("conv.stack", (out_c + rank) * chunk * cols_n, dtype)
    dcols_buf = _scratch.scratch("conv.dcols", ck * chunk * cols_n, dtype) if need_grad_x else None
    ga = np.zeros(a2.shape, dtype)
    gb = np.zeros(b2.shape, dtype)
    st = dtype.type(s)
    dx4 = np.zeros(x4.shape, dtype) if need_grad_x else None
    dl4 = np.zeros(x4.shape, dtype) if need_grad_x and state is not None else None
    if need_grad_x and state is None:
        wcat_t = np.ascontiguousarray(np.concatenate([w2, a2]).T)
    geo = (g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.oh, g.ow)
    for i0 in range(0, n, chunk):
        m = min(chunk, n - i0)
        width = m * cols_n
        cols = cols_buf[: ck * width].reshape(ck, width)
        k.im2col_batch(xd4, i0, m, *geo, cols)
        # [G; H] for the chunk, G reordered from (m, out, pixels) to (out, m * pixels)
        stack = stack_buf[: (out_c + rank) * width].reshape(out_c + rank, width)
        gc, h = stack[:out_c], stack[out_c:]
        np.copyto(gc.reshape(out_c, m, cols_n), g4[i0:i0 + m].transpose(1, 0, 2))
        u = np.dot(a2, cols)
        np.dot(b2.T, gc, out=h)
        h *= st
        gb += np.dot(gc, u.T)
        ga += np.dot(h, cols.T)
        if not need_grad_x:
            continue
        dcols = dcols_buf[: ck * width].reshape(ck, width)
        if state is None:
            np.dot(wcat_t, stack, out=dcols)  # W^T G + A^T H
            k.col2im_batch(dcols, i0, m, *geo, dx4)
        else:
            np.dot(w2.T, gc, out=dcols)
            k.col2im_batch(dcols, i0, m, *geo, dx4)
            np.dot(a2.T, h, out=dcols)
            k.col2im_batch(dcols, i0, m, *geo, dl4)
    gb *= st
    if dl4 is not None:
        state.mask(dtype).mul_add(dl4.reshape(n, -1), dx4.reshape(n, -1))
    grad_a = _add_into(grad_a, ga, a_shape)
    grad_b = _add_into(grad_b, gb, b_shape)
    dx = None
    if dx4 is not None:
        dx = dx4.reshape(x.shape) if batched else dx4[0].reshape(x.shape)
    return dx, grad_a, grad_b


def _add_into(buf, value, shape):
    if buf is None:
        return value.reshape(shape)
    buf += value.reshape(shape)
    return buf


def _flat_weight(weight, what):
    """``(w2, writeback)``: the conv weight as a writable (out, in * K) array (a view when
    C-contiguous, else a copy to write back)."""
    weight = conv_weight(weight)
    if not weight.flags.writeable:
        raise ShapeError(f"weight is read-only; {what} updates it in place")
    if weight.flags.c_contiguous:
        return weight, weight.reshape(weight.shape[0], -1), None
    return weight, np.ascontiguousarray(weight).reshape(weight.shape[0], -1), weight


@dispatch(cpu_only=True)
def merge_conv(weight, lora_a, lora_b, scaling, *, record=False):
    """``weight += scaling * B @ A`` (A flattened, the result in the weight's shape) in
    place: PEFT's ``Conv.get_delta_weight``, for every kernel size. With ``record=True``
    returns the :class:`~numlora.ops.MergeRecord` that lets :func:`unmerge_conv` restore
    the weight bit for bit."""
    weight, w2, back = _flat_weight(weight, "merge_conv")
    a2, b2, _ = flat_factors(lora_a, lora_b, weight.shape)
    validate.refuse_overlap("weight", weight, {"lora_a": lora_a, "lora_b": lora_b}, "merge_conv")
    rec = merge_lora(w2, a2, b2, scaling, False, record=record)
    if back is not None:
        back[...] = w2.reshape(back.shape)
    return rec


@dispatch(cpu_only=True)
def unmerge_conv(weight, lora_a, lora_b, scaling, *, record=None):
    """Subtract ``scaling * B @ A`` from the conv ``weight`` in place; bit-exact with the
    record of :func:`merge_conv`."""
    weight, w2, back = _flat_weight(weight, "unmerge_conv")
    a2, b2, _ = flat_factors(lora_a, lora_b, weight.shape)
    validate.refuse_overlap("weight", weight, {"lora_a": lora_a, "lora_b": lora_b}, "unmerge_conv")
    unmerge_lora(w2, a2, b2, scaling, False, record=record)
    if back is not None:
        back[...] = w2.reshape(back.shape)
