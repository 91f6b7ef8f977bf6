"""Slow, obvious reference implementations, written from the format and math specs
(not from numlora's kernels). Tests and benchmarks compare numlora against these."""

from __future__ import annotations

import struct

import numpy as np

MASK64 = (1 << 64) - 1

# NF4 codebook and midpoints exactly as the format reference lists them (hex bit
# patterns and shortest float32 reprs), independent of numlora's own tables.
NF4_HEX = [
    "bf800000", "bf3239b1", "bf066b30", "beca32a0", "be91a24d", "be3d353f", "bdba7871", "00000000",
    "3da2faff", "3e24cae3", "3e7c04dd", "3ead033a", "3ee1a4b8", "3f1007ab", "3f3913b3", "3f800000",
]
NF4_MIDPOINTS_DOC = [
    -0.8480963706970215, -0.6106328964233398, -0.4599952697753906, -0.33967941999435425,
    -0.23460739850997925, -0.13791173696517944, -0.045525018125772476,
    0.03979014977812767, 0.120255246758461, 0.2035212516784668, 0.2920137643814087,
    0.3893125355243683, 0.5016634464263916, 0.6427869200706482, 0.8614784479141235,
]


def f32_from_hex(h: str) -> np.float32:
    return np.frombuffer(struct.pack("<I", int(h, 16)), dtype=np.float32)[0]


NF4_REF = np.array([f32_from_hex(h) for h in NF4_HEX], dtype=np.float32)
MID_REF = np.array(NF4_MIDPOINTS_DOC, dtype=np.float32)


# --- xorshift64 ---------------------------------------------------------------------

def xorshift_stream(seed: int, n: int) -> tuple[list, int]:
    """The seed's SeededRng in pure Python integers: (float32 values, final state)."""
    s = max(seed, 1)
    out = []
    for _ in range(n):
        s ^= (s << 13) & MASK64
        s ^= s >> 7
        s ^= (s << 17) & MASK64
        out.append(np.float32(float(s) / float(MASK64) * 2.0 - 1.0))
    return out, s


# --- NF4 ------------------------------------------------------------------------------

def nf4_code_of(y: np.float32) -> int:
    """Index of the interval of y between the midpoints, strict '>' moving up."""
    q = 0
    for m in MID_REF:
        if y > m:
            q += 1
    return q


def nf4_quantize_ref(w, blocksize: int):
    """bitsandbytes' CPU quantize_4bit, element by element (returns packed, absmax)."""
    x = np.asarray(w, dtype=np.float32).reshape(-1)
    n = x.size
    nfull = n // blocksize
    nblocks = -(-n // blocksize)
    absmax = np.zeros(nblocks, np.float32)
    codes = np.zeros(n + (n % 2), np.int64)
    codes[n:] = 7
    tiny = np.float32(1e-38)
    for b in range(nblocks):
        blk = x[b * blocksize:(b + 1) * blocksize]
        am = np.float32(np.max(np.abs(blk)))
        if b < nfull:
            absmax[b] = am
            inv = np.float32(np.float32(1.0) / max(am, tiny))
            ys = [np.float32(np.clip(np.float32(v * inv), -1, 1)) for v in blk]
        else:
            am = max(am, tiny)
            absmax[b] = am
            ys = [np.float32(np.clip(np.float32(v / am), -1, 1)) for v in blk]
        for k, y in enumerate(ys):
            codes[b * blocksize + k] = nf4_code_of(y)
    packed = ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)
    return packed, absmax


def nf4_dequantize_ref(packed, absmax, blocksize: int, n: int) -> np.ndarray:
    out = np.empty(n, np.float32)
    for k in range(n):
        byte = int(packed[k // 2])
        nib = (byte >> 4) if k % 2 == 0 else (byte & 15)
        out[k] = NF4_REF[nib] * absmax[k // blocksize]
    return out


def code8_nearest_ref(code8: np.ndarray, v: float) -> int:
    """Exactly nearest entry (ties to the lower index), by brute force in float64."""
    d = np.abs(code8.astype(np.float64) - float(v))
    return int(np.flatnonzero(d == d.min())[0])


# --- LoRA -------------------------------------------------------------------------------

def lora_forward_ref(x, weight, lora_a, lora_b, scaling, bias=None, fan_in_fan_out=False):
    x = np.asarray(x, np.float64)
    w = np.asarray(weight, np.float64)
    if fan_in_fan_out:
        w = w.T
    y = x @ w.T + scaling * (x @ np.asarray(lora_a, np.float64).T) @ np.asarray(lora_b, np.float64).T
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def merge_ref(weight, lora_a, lora_b, scaling, fan_in_fan_out=False):
    delta = scaling * (np.asarray(lora_b, np.float64) @ np.asarray(lora_a, np.float64))
    if fan_in_fan_out:
        delta = delta.T
    return np.asarray(weight, np.float64) + delta


def multi_lora_ref(x, weight, adapters, ids, scale=None, bias=None):
    """Many adapters in one batch, row by row in float64: ``y[i] = x[i] W^T (+ bias) +
    scale[i] * s_k (x[i] A_k^T) B_k^T`` with ``(A_k, B_k, s_k) = adapters[ids[i]]``;
    ``ids[i] == -1``: the base alone. ``weight``: the dense (out, in) base (dequantize an
    NF4 base first)."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(weight)[1])
    w = np.asarray(weight, np.float64)
    y = np.empty((x.shape[0], w.shape[0]))
    for i in range(x.shape[0]):
        y[i] = w @ x[i]
        k = int(ids[i])
        if k >= 0:
            a, b, s = adapters[k]
            m = 1.0 if scale is None else float(scale[i])
            y[i] += m * s * (np.asarray(b, np.float64) @ (np.asarray(a, np.float64) @ x[i]))
        if bias is not None:
            y[i] += np.asarray(bias, np.float64)
    return y


# --- LoRA on embeddings and convolutions (PEFT's lora.Embedding / lora.Conv1d / lora.Conv2d) ---

def embedding_lora_ref(ids, weight, lora_a, lora_b, scaling):
    """Token by token in float64: ``weight[v] + scaling * B @ A[:, v]`` (A (r, vocab), B (dim, r))."""
    ids = np.asarray(ids)
    w, a, b = (np.asarray(t, np.float64) for t in (weight, lora_a, lora_b))
    out = np.empty(ids.shape + (w.shape[1],))
    for idx in np.ndindex(ids.shape):
        v = int(ids[idx])
        out[idx] = w[v] + scaling * (b @ a[:, v])
    return out


def conv_ref(x, weight, bias=None, stride=1, pads=0, dilation=1):
    """A direct N-d (1-D or 2-D) convolution in float64 by explicit windows over a
    zero-padded input: ``y[n, o, p] = sum_{c, k} W[o, c, k] x_pad[n, c, p * stride + k *
    dilation] + bias[o]``. ``pads``: an int or per-dim ``(before, after)`` pairs. ``x``
    is batched (N, C, *spatial)."""
    x = np.asarray(x, np.float64)
    w = np.asarray(weight, np.float64)
    nd = w.ndim - 2
    stride = (stride,) * nd if np.isscalar(stride) else tuple(stride)
    dilation = (dilation,) * nd if np.isscalar(dilation) else tuple(dilation)
    pads = ((pads, pads),) * nd if np.isscalar(pads) else tuple(pads)
    xp = np.pad(x, ((0, 0), (0, 0)) + tuple(pads))
    kernel = w.shape[2:]
    outs = [(xp.shape[2 + d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(nd)]
    y = np.zeros((x.shape[0], w.shape[0]) + tuple(outs))
    for pos in np.ndindex(*outs):
        for k in np.ndindex(*kernel):
            idx = tuple(pos[d] * stride[d] + k[d] * dilation[d] for d in range(nd))
            patch = xp[(slice(None), slice(None)) + idx]  # (N, C)
            y[(slice(None), slice(None)) + pos] += patch @ w[(slice(None), slice(None)) + k].T
    if bias is not None:
        y += np.asarray(bias, np.float64).reshape((1, -1) + (1,) * nd)
    return y


def conv_lora_ref(x, weight, lora_a, lora_b, scaling, bias=None, stride=1, pads=0, dilation=1, x_lora=None):
    """PEFT's conv LoRA: ``conv(x, W) + b + scaling * conv1x1(conv(x_lora, A), B)``, with A
    run at the base's stride, padding and dilation, B a 1x1 convolution."""
    base = conv_ref(x, weight, bias, stride, pads, dilation)
    u = conv_ref(x if x_lora is None else x_lora, lora_a, None, stride, pads, dilation)
    b = np.asarray(lora_b, np.float64).reshape(np.shape(lora_b)[0], np.shape(lora_b)[1])
    return base + scaling * np.einsum("or,nr...->no...", b, u)


def bf16_layout(xr, chunk=128):
    """A float32 (n, in) array of bfloat16 values (already rounded) as the bf16 bits the
    dot-product kernels read: uint16, each chunk of ``chunk`` elements reordered so that
    position ``32 k + q`` holds element ``4 q + (1, 0, 3, 2)[k]``."""
    n, in_f = xr.shape
    bits = (np.ascontiguousarray(xr).view(np.uint32) >> 16).astype(np.uint16)
    c = bits.reshape(n, in_f // chunk, 32, 4)[:, :, :, [1, 0, 3, 2]]
    return np.ascontiguousarray(c.transpose(0, 1, 3, 2)).reshape(n, in_f)


def lora_shrink_f32_ref(x, a, scale):
    """u[i, t] = scale * (x[i] . a[t]) in the canonical 8-lane order, in numpy float32 (the
    LoRA shrink of numlora's small-batch kernels, ``kernels.nf4.shrink``):
    lane l sums x[j] a[j] over j = l mod 8 in order, the tail into lanes 0.., then
    ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))."""
    n, k = x.shape
    u = np.empty((n, a.shape[0]), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for i in range(n):
            for t in range(a.shape[0]):
                lanes = np.zeros(8, np.float32)
                for j in range(k):
                    lanes[j % 8] = np.float32(lanes[j % 8] + np.float32(x[i, j] * a[t, j]))
                s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
                v = np.float32(scale * s)
                u[i, t] = 0.0 if scale == 0 and v != v else v
    return u


def lora_expand_f32_ref(c, bt, y):
    """y + c bt in numpy float32, each output's rank terms summed in order from zero
    (multiply, then add), then added to y: the order of the LoRA expand kernels."""
    out = y.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        for i in range(c.shape[0]):
            lo = np.zeros(bt.shape[1], np.float32)
            for t in range(c.shape[1]):
                lo = lo + np.float32(c[i, t]) * bt[t]
            out[i] = out[i] + lo
    return out


def abs_err_stats_ref(a, b, chunk):
    """Per chunk of ``chunk`` elements: the float64 sum and the float32 maximum of
    ``|a - b|`` in the order numlora's quantize reports them (``kernels.convert.
    abs_err_stats``): eight float64 sums, element i of the chunk's whole groups of eight
    into sum i % 8, group after group; the chunk's last elements past them into sum 0, one
    by one; then the eight sums added in order. Returns (sums float64, maxima float32)."""
    a = np.asarray(a, np.float32).reshape(-1)
    b = np.asarray(b, np.float32).reshape(-1)
    sums, maxima = [], []
    for lo in range(0, a.size, chunk):
        v = np.abs(a[lo:lo + chunk] - b[lo:lo + chunk])
        m8 = v.size // 8 * 8
        acc = np.zeros(8, np.float64)
        for i in range(0, m8, 8):
            acc += v[i:i + 8].astype(np.float64)
        for x in v[m8:]:
            acc[0] += np.float64(x)
        total = np.float64(0.0)
        for s in acc:
            total += s
        sums.append(total)
        maxima.append(v.max() if v.size else np.float32(0))
    return np.array(sums, np.float64), np.array(maxima, np.float32)
