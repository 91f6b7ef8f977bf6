"""Property-based fuzz suite over numlora's public functions and classes (issue 12).

Every call must either raise a NumloraError subclass with a non-empty message, or
return a result equal to a float64 reference within float32 tolerance, and leave its
inputs as they were (documented out= / in-place buffers excepted). See
tests/fuzz_util.py for the machinery and the counters (``pytest -s`` prints them).

Arrays are tiny so that numba compilation dominates the first run and the on-disk cache
makes later runs fast; ``FUZZ_SCALE=3`` runs three times the examples.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import numlora
from numlora.errors import NumloraError

from fuzz_util import (  # noqa: F401
    F32_MAX,
    Example,
    Violation,
    as_f64,
    collecting,
    expect_close,
    fuzz_guard,
    fuzz_settings,
    fuzz_summary,
    scalar_must_refuse,
    scalar_value,
)
from reference import (
    lora_forward_ref,
    merge_ref,
    multi_lora_ref,
    nf4_dequantize_ref,
    nf4_quantize_ref,
    xorshift_stream,
)


def _run(name, prop, n):
    """Run the hypothesis property ``prop(ex)`` for ``n`` examples, collecting violations."""
    with collecting(name) as col:
        @fuzz_settings(n)
        @given(st.data())
        def inner(data):
            prop(Example(col, data))

        inner()


def _f64(a):
    return None if a is None else as_f64(a)


def _abs(a):
    return None if a is None else np.abs(a)


def _lora_bound(x, w, a, b, s, bias, fifo):
    return lora_forward_ref(_abs(x), _abs(w), _abs(a), _abs(b), abs(s), _abs(bias), fifo)


def _snapshot64(**arrays):
    """float64 copies of accepted-looking inputs, taken before the call (aliasing can
    change them); None where the value is not numeric."""
    out = {}
    warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
    for k, a in arrays.items():
        try:
            out[k] = None if a is None else np.array(np.asarray(a), dtype=np.float64, copy=True)
        except Exception:  # noqa: BLE001 - junk inputs: the call must refuse them
            out[k] = None
    return out


def _is_real_array(a):
    if a is None:
        return True
    try:
        arr = np.asarray(a)
    except Exception:  # noqa: BLE001
        return False
    return arr.dtype.kind in "fiub" or (arr.dtype == object and all(isinstance(v, float) for v in arr.reshape(-1)))


# --- dense LoRA: forward --------------------------------------------------------------------------
OUT_MODES = [None] * 10 + ["fresh", "fresh", "out=x", "out=weight-rows", "out=lora_a", "out=bias", "readonly",
                           "wrong-dtype", "F-order", "strided", "list"]


def _lora_case(ex, *, fifo_ok=True, want_out=True):
    out_mode = ex.choice("out", OUT_MODES, bad=OUT_MODES[12:]) if want_out else None
    n = ex.dim("n", 0, 4)
    out_f = ex.dim("out_f", 1, 5)
    in_f = ex.dim("in_f", 1, 5)
    r = ex.dim("r", 1, 3)
    fifo = fifo_ok and ex.flag("fan_in_fan_out", 0.2)
    one_d = ex.flag("x_1d", 0.15)
    if out_mode in ("out=x", "out=weight-rows", "out=lora_a"):
        in_f = out_f
        fifo = False
    if out_mode == "out=weight-rows":
        n = min(max(n, 1), out_f)
    if out_mode == "out=lora_a":
        n = r
        one_d = False
    if out_mode == "out=bias":
        one_d = True
    x = ex.array("x", (in_f,) if one_d else (n, in_f))
    w = ex.array("weight", (in_f, out_f) if fifo else (out_f, in_f))
    a = ex.array("lora_a", (r, in_f))
    b = ex.array("lora_b", (out_f, r))
    use_bias = ex.flag("bias", 0.5) or out_mode == "out=bias"
    bias = ex.array("bias", (out_f,)) if use_bias else None
    s = ex.scalar("scaling")
    return dict(out_mode=out_mode, n=n, out_f=out_f, in_f=in_f, r=r, fifo=fifo, one_d=one_d, x=x, w=w, a=a, b=b,
                bias=bias, s=s)


def _make_out(c, dtype):
    """The out= buffer of a case, possibly aliasing an input; returns (out, allowed)."""
    mode = c["out_mode"]
    shape = (c["out_f"],) if c["one_d"] else (c["n"], c["out_f"])
    if mode is None:
        return None, {}
    if mode == "fresh":
        o = np.full(shape, np.nan, dtype)
        return o, {}
    if mode == "out=x":
        return c["x"], {"x": c["x"]}
    if mode == "out=weight-rows":
        w = c["w"]
        o = w[: c["n"]] if not c["one_d"] else w[0]
        return o, {"weight": w}
    if mode == "out=lora_a":
        return c["a"], {"lora_a": c["a"]}
    if mode == "out=bias":
        return c["bias"], {"bias": c["bias"]}
    if mode == "readonly":
        o = np.zeros(shape, dtype)
        o.flags.writeable = False
        return o, {}
    if mode == "wrong-dtype":
        return np.zeros(shape, np.float64 if dtype == np.float32 else np.float32), {}
    if mode == "F-order":
        return np.asfortranarray(np.zeros(shape, dtype)), {}
    if mode == "strided":
        return np.zeros(shape + (2,), dtype)[..., 0], {}
    if mode == "list":
        return [0.0] * c["out_f"], {}
    raise AssertionError(mode)


def _compute_dtype(*arrays):
    try:
        return np.result_type(*[np.asarray(a).dtype for a in arrays if a is not None])
    except Exception:  # noqa: BLE001
        return np.dtype(np.float32)


def _expect_out(what, res, out, ref, bound):
    def check(res):
        if out is not None and isinstance(out, np.ndarray) and res is not out:
            raise Violation(f"{what}: out= given but a different array returned")
        expect_close(what, res, ref, bound)
    return check


def prop_lora_forward(ex):
    c = _lora_case(ex)
    dtype = _compute_dtype(c["x"], c["w"], c["a"], c["b"], c["bias"])
    out, allowed = _make_out(c, dtype if dtype.kind == "f" else np.float32)
    pre = _snapshot64(x=c["x"], w=c["w"], a=c["a"], b=c["b"], bias=c["bias"])
    inputs = {k: v for k, v in (("x", c["x"]), ("weight", c["w"]), ("lora_a", c["a"]), ("lora_b", c["b"]),
                                ("bias", c["bias"])) if k not in allowed}
    refuse = scalar_must_refuse("scaling", c["s"])

    def expect(res):
        s = scalar_value(c["s"])
        ref = lora_forward_ref(pre["x"], pre["w"], pre["a"], pre["b"], s, pre["bias"], c["fifo"])
        bound = _lora_bound(pre["x"], pre["w"], pre["a"], pre["b"], s, pre["bias"], c["fifo"])
        _expect_out("lora_forward", res, out, ref, bound)(res)

    ex.call(lambda: numlora.lora_forward(c["x"], c["w"], c["a"], c["b"], c["s"], c["bias"], out=out,
                                         fan_in_fan_out=c["fifo"]),
            inputs=inputs, allowed_modified=allowed, expect=expect, must_refuse=refuse)


def test_lora_forward():
    _run("lora_forward", prop_lora_forward, 260)


def prop_linear_forward(ex):
    c = _lora_case(ex)
    if c["out_mode"] in ("out=lora_a",):
        c["out_mode"] = "fresh"
    dtype = _compute_dtype(c["x"], c["w"], c["bias"])
    out, allowed = _make_out(c, dtype if dtype.kind == "f" else np.float32)
    pre = _snapshot64(x=c["x"], w=c["w"], bias=c["bias"])
    inputs = {k: v for k, v in (("x", c["x"]), ("weight", c["w"]), ("bias", c["bias"])) if k not in allowed}

    def expect(res):
        w = pre["w"].T if c["fifo"] else pre["w"]
        ref = pre["x"] @ w.T + (0 if pre["bias"] is None else pre["bias"])
        bound = np.abs(pre["x"]) @ np.abs(w).T + (0 if pre["bias"] is None else np.abs(pre["bias"]))
        _expect_out("linear_forward", res, out, ref, bound)(res)

    ex.call(lambda: numlora.linear_forward(c["x"], c["w"], c["bias"], out=out, fan_in_fan_out=c["fifo"]),
            inputs=inputs, allowed_modified=allowed, expect=expect)


def test_linear_forward():
    _run("linear_forward", prop_linear_forward, 120)


# --- merge / unmerge -------------------------------------------------------------------------------
def prop_merge_unmerge(ex):
    alias = ex.choice("alias", [None] * 8 + ["lora_a=view(weight)", "lora_b=view(weight)"],
                      bad=["lora_a=view(weight)", "lora_b=view(weight)"])
    out_f = ex.dim("out_f", 1, 5)
    in_f = ex.dim("in_f", 1, 5)
    r = ex.dim("r", 1, 3)
    fifo = alias is None and ex.flag("fan_in_fan_out", 0.2)
    record = ex.flag("record", 0.6)
    w = ex.array("weight", (in_f, out_f) if fifo else (out_f, in_f))
    if alias == "lora_a=view(weight)":
        r = min(r, out_f)
        if not isinstance(w, np.ndarray) or w.shape != (out_f, in_f):
            w = np.random.default_rng(0).uniform(-1, 1, (out_f, in_f)).astype(np.float32)
        a = w[out_f - r:]
        b = ex.array("lora_b", (out_f, r))
    elif alias == "lora_b=view(weight)":
        r = min(r, in_f)
        if not isinstance(w, np.ndarray) or w.shape != (out_f, in_f):
            w = np.random.default_rng(0).uniform(-1, 1, (out_f, in_f)).astype(np.float32)
        b = w[:, in_f - r:]
        a = ex.array("lora_a", (r, in_f))
    else:
        a = ex.array("lora_a", (r, in_f))
        b = ex.array("lora_b", (out_f, r))
    s = ex.scalar("scaling")
    pre = _snapshot64(w=w, a=a, b=b)
    w_bits = np.array(w, copy=True) if isinstance(w, np.ndarray) else None
    refuse = scalar_must_refuse("scaling", s)
    inputs = {} if alias else {"lora_a": a, "lora_b": b}

    def expect(rec):
        sv = scalar_value(s)
        ref = merge_ref(pre["w"], pre["a"], pre["b"], sv, fifo)
        bound = merge_ref(np.abs(pre["w"]), np.abs(pre["a"]), np.abs(pre["b"]), abs(sv), fifo)
        expect_close("merge_lora (weight after)", np.asarray(w), ref, bound)
        if record and not isinstance(rec, numlora.MergeRecord):
            raise Violation("merge_lora(record=True) returned no MergeRecord")

    st_, rec = ex.call(lambda: numlora.merge_lora(w, a, b, s, fifo, record=record), inputs=inputs,
                       allowed_modified={"weight": w}, expect=expect, must_refuse=refuse)
    if st_ != "ok" or alias:
        return
    # unmerge: with the record, the weight comes back bit for bit (finite case); a
    # second use of the record is refused (issue 12).
    finite = all(np.isfinite(v).all() for v in pre.values() if v is not None) and np.isfinite(np.asarray(w)).all()

    def expect_restored(_):
        if record and finite and np.asarray(w).tobytes() != w_bits.tobytes():
            raise Violation("unmerge_lora(record=...) did not restore the weight bit for bit")
        if not record:
            expect_close("unmerge_lora (weight after)", np.asarray(w), pre["w"],
                         merge_ref(np.abs(pre["w"]), np.abs(pre["a"]), np.abs(pre["b"]), 2 * abs(scalar_value(s)),
                                   fifo))

    st2, _ = ex.call(lambda: numlora.unmerge_lora(w, a, b, s, fifo, record=rec), inputs={"lora_a": a, "lora_b": b},
                     allowed_modified={"weight": w}, expect=expect_restored)
    if st2 == "ok" and record:
        ex.call(lambda: numlora.unmerge_lora(w, a, b, s, fifo, record=rec), inputs={"weight": w, "lora_a": a},
                must_refuse="a MergeRecord used a second time")


def test_merge_unmerge():
    _run("merge_lora/unmerge_lora", prop_merge_unmerge, 200)


# --- backward -----------------------------------------------------------------------------------------
def _keep_mask(shape, p, seed):
    from numlora.ops import dropout_keep_mask

    return dropout_keep_mask(shape, p, seed)


def prop_lora_backward(ex):
    grad_mode = ex.choice("grads", [None] * 6 + ["fresh", "fresh", "grad_a=lora_a", "grad_b=lora_b", "wrong-dtype",
                                                 "readonly", "list"],
                          bad=["grad_a=lora_a", "grad_b=lora_b", "wrong-dtype", "readonly", "list"])
    n = ex.dim("n", 0, 4)
    out_f = ex.dim("out_f", 1, 5)
    in_f = ex.dim("in_f", 1, 5)
    r = ex.dim("r", 1, 3)
    fifo = ex.flag("fan_in_fan_out", 0.2)
    one_d = ex.flag("x_1d", 0.15)
    xs = (in_f,) if one_d else (n, in_f)
    gs = (out_f,) if one_d else (n, out_f)
    x = ex.array("x", xs)
    w = ex.array("weight", (in_f, out_f) if fifo else (out_f, in_f))
    a = ex.array("lora_a", (r, in_f))
    b = ex.array("lora_b", (out_f, r))
    g = ex.array("grad_out", gs)
    s = ex.scalar("scaling")
    drop = ex.choice("dropout", [None] * 6 + ["state", "bad-p", "bad-seed", "junk"], bad=["bad-p", "bad-seed", "junk"])
    dropout = None
    if drop == "state":
        dropout = numlora.DropoutState(ex.draw(st.sampled_from([0.0, 0.25, 0.5])), ex.draw(st.integers(0, 2 ** 64 - 1)))
    elif drop == "bad-p":
        dropout = (ex.draw(st.sampled_from([1.0, -0.1, math.nan, 1e39, "0.5", None])), 1)
    elif drop == "bad-seed":
        dropout = (0.25, ex.draw(st.sampled_from([-1, 2 ** 64, 1.5, None, "7", np.uint64(2 ** 64 - 1)])))
    elif drop == "junk":
        dropout = ex.draw(st.sampled_from([0.5, [0.5, 1], (0.5,), "x", (0.5, 1, 2)]))
    dtype = _compute_dtype(x, w, a, b, g)
    dt = dtype if dtype.kind == "f" else np.float32
    ga = gb = None
    allowed = {}
    if grad_mode == "fresh":
        ga, gb = np.ones((r, in_f), dt), np.ones((out_f, r), dt)
        allowed = {"grad_a": ga, "grad_b": gb}
    elif grad_mode == "grad_a=lora_a":
        ga = a
        allowed = {"lora_a": a}
    elif grad_mode == "grad_b=lora_b":
        gb = b
        allowed = {"lora_b": b}
    elif grad_mode == "wrong-dtype":
        ga = np.zeros((r, in_f), np.float16)
    elif grad_mode == "readonly":
        ga = np.zeros((r, in_f), dt)
        ga.flags.writeable = False
    elif grad_mode == "list":
        gb = [[0.0] * r] * out_f
    pre = _snapshot64(x=x, w=w, a=a, b=b, g=g, ga=ga, gb=gb)
    refuse = scalar_must_refuse("scaling", s)
    inputs = {k: v for k, v in (("x", x), ("weight", w), ("lora_a", a), ("lora_b", b), ("grad_out", g))
              if k not in allowed}

    def expect(res):
        dx, gra, grb = res
        sv = scalar_value(s)
        X = pre["x"].reshape(-1, in_f)
        G = pre["g"].reshape(-1, out_f)
        A, B = pre["a"], pre["b"]
        W = pre["w"].T if fifo else pre["w"]
        p = 0.0 if dropout is None else float(dropout[0])
        if p > 0:
            mask = _keep_mask(X.shape, p, int(dropout[1]))
            Xd = np.where(mask, X / (1 - p), 0.0)
        else:
            mask = np.ones(X.shape, bool)
            Xd = X
        ref_b = sv * G.T @ (Xd @ A.T) + (0 if pre["gb"] is None else pre["gb"])
        bnd_b = abs(sv) * np.abs(G).T @ (np.abs(Xd) @ np.abs(A).T) + (0 if pre["gb"] is None else np.abs(pre["gb"]))
        ref_a = sv * (G @ B).T @ Xd + (0 if pre["ga"] is None else pre["ga"])
        bnd_a = abs(sv) * (np.abs(G) @ np.abs(B)).T @ np.abs(Xd) + (0 if pre["ga"] is None else np.abs(pre["ga"]))
        scale = 1 / (1 - p)
        ref_x = G @ W + sv * np.where(mask, (G @ B) @ A * scale, 0.0)
        bnd_x = np.abs(G) @ np.abs(W) + abs(sv) * scale * (np.abs(G) @ np.abs(B)) @ np.abs(A)
        expect_close("lora_backward grad_a", gra, ref_a, bnd_a)
        expect_close("lora_backward grad_b", grb, ref_b, bnd_b)
        expect_close("lora_backward grad_x", dx, ref_x.reshape(np.shape(pre["x"])), bnd_x.reshape(np.shape(pre["x"])))

    ex.call(lambda: numlora.lora_backward(x, w, a, b, s, g, fan_in_fan_out=fifo, dropout=dropout, grad_a=ga,
                                          grad_b=gb),
            inputs=inputs, allowed_modified=allowed, expect=expect, must_refuse=refuse)


def test_lora_backward():
    _run("lora_backward", prop_lora_backward, 220)


# --- dropout ---------------------------------------------------------------------------------------------
def prop_lora_dropout(ex):
    n = ex.dim("n", 0, 4)
    m = ex.dim("m", 1, 6)
    x = ex.array("x", (n, m) if not ex.flag("x_1d", 0.2) else (m,))
    p = ex.scalar("p", good=ex.draw(st.sampled_from([0.0, 0.1, 0.5, 0.9])))
    seed = ex.choice("seed", [0, 1, 12345, 2 ** 64 - 1] * 3 + [-1, 2 ** 64, 1.5, None, "3", True,
                                                              np.uint64(2 ** 64 - 1), np.int64(-5)],
                     bad=[-1, 2 ** 64, 1.5, None, "3", True])
    out_mode = ex.choice("out", [None] * 5 + ["fresh", "out=x", "wrong-dtype", "readonly"],
                         bad=["out=x", "wrong-dtype", "readonly"])
    out = None
    allowed = {}
    xa = x if isinstance(x, np.ndarray) else None
    if out_mode == "fresh" and xa is not None:
        out = np.full(xa.shape, np.nan, xa.dtype if xa.dtype.kind == "f" else np.float32)
    elif out_mode == "out=x":
        out = x
        allowed = {"x": x}
    elif out_mode == "wrong-dtype" and xa is not None:
        out = np.zeros(xa.shape, np.float16)
    elif out_mode == "readonly" and xa is not None:
        out = np.zeros(xa.shape, np.float32)
        out.flags.writeable = False
    pre = _snapshot64(x=x)
    refuse = None
    pv = scalar_value(p)
    if pv is not None and math.isfinite(pv) and not 0 <= pv < 1:
        refuse = f"p={pv} outside [0, 1)"
    refuse = scalar_must_refuse("p", p) or refuse
    if isinstance(seed, (bool, float, str)) or seed is None or not 0 <= int(seed) < 2 ** 64:
        refuse = refuse or f"seed={seed!r} is not an integer in [0, 2**64)"

    def expect(res):
        y, state = res
        if tuple(state) != (pv, int(seed)):
            raise Violation("lora_dropout: the returned state is not (p, seed)", f"{state!r}")
        X = pre["x"]
        Y = np.asarray(y, np.float64)
        if Y.shape != X.shape:
            raise Violation("lora_dropout: wrong shape")
        scale = float(np.asarray(y).dtype.type(1.0 / (1.0 - pv)))
        kept = np.isclose(Y, X * scale, rtol=1e-6, atol=0, equal_nan=True)
        dropped = Y == 0
        ok = kept | dropped
        if not ok.all():
            i = int(np.flatnonzero(~ok.reshape(-1))[0])
            raise Violation("lora_dropout: an element is neither dropped nor x / (1 - p)",
                            f"x={X.reshape(-1)[i]!r} y={Y.reshape(-1)[i]!r}")

    ex.call(lambda: numlora.lora_dropout(x, p, seed, out=out), inputs={k: v for k, v in {"x": x}.items()
                                                                        if k not in allowed},
            allowed_modified=allowed, expect=expect, must_refuse=refuse)


def test_lora_dropout():
    _run("lora_dropout", prop_lora_dropout, 120)


# --- NF4 ------------------------------------------------------------------------------------------------
GOOD_BS = [2, 4, 8, 16, 32, 64, 3, 5]
BAD_BS = [0, 1, -64, 2 ** 20 + 1, 2 ** 63, 2 ** 64, 64.0, True, "64", None, np.uint64(2 ** 64 - 1), np.int8(-4),
          np.float32(64)]


def _blocksize(ex):
    bs = ex.choice("blocksize", GOOD_BS * 3 + BAD_BS, bad=BAD_BS)
    return bs


def _bs_ok(bs):
    return isinstance(bs, (int, np.integer)) and not isinstance(bs, (bool, np.bool_)) and 2 <= int(bs) <= 2 ** 20


def _ref_scales(t):
    if t.absmax2 is None:
        return np.asarray(t.absmax, np.float32)
    q = np.asarray(t.absmax)
    g = np.arange(q.size) // 256
    return (np.asarray(t.code8, np.float32)[q] * np.asarray(t.absmax2, np.float32)[g]
            + np.float32(t.offset)).astype(np.float32)


def _ref_deq(t):
    n = int(np.prod(t.shape, dtype=object)) if len(t.shape) else 1
    return nf4_dequantize_ref(np.asarray(t.packed).reshape(-1), _ref_scales(t), int(t.blocksize), n).reshape(t.shape)


def prop_quantize(ex):
    shape = ex.choice("shape", [(1,), (7,), (3, 5), (4, 8), (2, 3, 4), (16,), (1, 1), (9, 2)])
    w = ex.array("w", shape, lo=-3, hi=3)
    bs = _blocksize(ex)
    dq = ex.choice("double_quant", [False] * 3 + [True, True, 1, "yes", None], bad=[1, "yes", None])
    pre = _snapshot64(w=w)
    refuse = None if _bs_ok(bs) else f"blocksize={bs!r}"
    if not isinstance(dq, (bool, np.bool_)):
        refuse = refuse or f"double_quant={dq!r}"

    def expect(t):
        if not isinstance(t, numlora.NF4Tensor):
            raise Violation("quantize_nf4 returned no NF4Tensor")
        W = pre["w"]
        if not np.isfinite(W).all():
            raise Violation("quantize_nf4 accepted a non-finite weight")
        f32 = W.astype(np.float32)
        if not np.isfinite(f32).all():
            raise Violation("quantize_nf4 accepted a weight not finite in float32 (it becomes inf)")
        packed, absmax = nf4_quantize_ref(f32, int(bs))
        if tuple(t.shape) != tuple(np.shape(w)):
            raise Violation("quantize_nf4: wrong shape")
        if np.asarray(t.packed).tobytes() != packed.tobytes():
            raise Violation("quantize_nf4: packed codes differ from the reference (bitsandbytes)")
        if not dq and np.asarray(t.absmax).tobytes() != absmax.tobytes():
            raise Violation("quantize_nf4: absmax differs from the reference")
        deq = numlora.dequantize_nf4(t)
        ref = _ref_deq(t)
        if np.asarray(deq, np.float32).tobytes() != ref.astype(np.float32).tobytes():
            expect_close("dequantize_nf4", deq, ref, np.abs(ref) + 1e-6)
        if not dq:
            # the round trip error is bounded by half the largest NF4 gap times absmax
            err = np.abs(deq.astype(np.float64) - f32)
            lim = np.repeat(absmax.astype(np.float64), int(bs))[: f32.size].reshape(f32.shape) * 0.16 + 1e-30
            if (err > lim).any():
                raise Violation("quantize/dequantize round trip error beyond the NF4 spacing")

    ex.call(lambda: numlora.quantize_nf4(w, bs, double_quant=dq), inputs={"w": w}, expect=expect, must_refuse=refuse)


def test_quantize_dequantize_nf4():
    _run("quantize_nf4/dequantize_nf4", prop_quantize, 200)


def prop_nf4_tensor(ex):
    """NF4Tensor(packed, absmax, shape, blocksize, ...) with mutated parts: refuse, or
    dequantize exactly as the reference does from the parts' logical values."""
    shape = ex.choice("shape", [(4, 8), (3, 5), (1, 16), (7,)])
    bs = ex.choice("bs", [4, 8, 16, 64])
    rng = np.random.default_rng(ex.seed())
    w = rng.uniform(-2, 2, shape).astype(np.float32)
    dq = ex.flag("double_quant", 0.25)
    t0 = numlora.quantize_nf4(w, bs, double_quant=dq)
    packed, absmax = t0.packed.copy(), t0.absmax.copy()
    kw = {}
    if dq:
        kw = dict(absmax2=t0.absmax2.copy(), offset=t0.offset, code8=np.array(t0.code8, copy=True))
    new_shape, new_bs = shape, bs
    mut = ex.choice("mutation", [None] * 4 + [
        "packed-reversed", "packed-strided", "absmax-reversed", "absmax-strided", "absmax-list", "packed-list",
        "shape-negative", "shape-overflow", "shape-huge", "shape-float", "shape-str", "bs-huge", "bs-bool",
        "absmax-nan", "absmax-f64", "packed-int8", "packed-2d", "absmax2-nan", "code8-short", "offset-nan",
        "offset-str", "dtype-junk", "shape-bool", "packed-readonly"], bad=[])
    if mut is not None:
        ex.bad.append(f"mutation={mut}")

    def rev(a):
        return np.ascontiguousarray(a[::-1])[::-1]

    def strided(a):
        big = np.zeros(2 * a.size, a.dtype)
        big[::2] = a
        return big[::2]

    dtype = "float32"
    if mut == "packed-reversed":
        packed = rev(packed)
    elif mut == "packed-strided":
        packed = strided(packed)
    elif mut == "absmax-reversed":
        absmax = rev(absmax)
    elif mut == "absmax-strided":
        absmax = strided(absmax)
    elif mut == "absmax-list":
        absmax = absmax.tolist()
    elif mut == "packed-list":
        packed = packed.tolist()
    elif mut == "shape-negative":
        new_shape = tuple(-d for d in shape) if len(shape) == 2 else (-1, -shape[0])
    elif mut == "shape-overflow":
        new_shape = (2 ** 62, 4, 4) if False else (2 ** 63, 2) if t0.numel % 2 == 0 else (2 ** 64 + shape[0],)
    elif mut == "shape-huge":
        new_shape = (2 ** 40, 2 ** 30)
    elif mut == "shape-float":
        new_shape = tuple(float(d) + 0.5 for d in shape)
    elif mut == "shape-str":
        new_shape = "48"
    elif mut == "shape-bool":
        new_shape = tuple(True for _ in shape)
    elif mut == "bs-huge":
        new_bs = 2 ** 63
    elif mut == "bs-bool":
        new_bs = True
    elif mut == "absmax-nan" and not dq:
        absmax[0] = np.nan
    elif mut == "absmax-f64" and not dq:
        absmax = absmax.astype(np.float64)
    elif mut == "packed-int8":
        packed = packed.view(np.int8)
    elif mut == "packed-2d":
        packed = packed.reshape(-1, 1)
    elif mut == "absmax2-nan" and dq:
        kw["absmax2"][0] = np.nan
    elif mut == "code8-short" and dq:
        kw["code8"] = kw["code8"][:100]
    elif mut == "offset-nan" and dq:
        kw["offset"] = np.float32(np.nan)
    elif mut == "offset-str" and dq:
        kw["offset"] = "0.1"
    elif mut == "dtype-junk":
        dtype = "int8"
    elif mut == "packed-readonly":
        packed.flags.writeable = False
    logical_packed = np.asarray(packed) if not isinstance(packed, list) else np.asarray(packed)
    logical_absmax = np.asarray(absmax)
    refuse = None
    # (NaN scales are not refused by this rule: they decode to NaN, which the check below accepts)
    if mut in ("shape-negative", "shape-overflow", "shape-huge", "shape-float", "shape-str", "bs-huge", "bs-bool",
               "shape-bool"):
        refuse = mut
    inputs = {"packed": packed, "absmax": absmax, **{k: v for k, v in kw.items() if isinstance(v, np.ndarray)}}

    def expect(t):
        # a tensor that was accepted must describe itself consistently and decode right
        try:
            dims = [int(d) for d in t.shape]
        except Exception:  # noqa: BLE001
            raise Violation("NF4Tensor accepted a shape that is not integers", repr(t.shape)) from None
        n = math.prod(dims)
        if any(d < 0 for d in dims) or n != t0.numel:
            raise Violation("NF4Tensor accepted a shape that does not fit its packed codes",
                            f"shape {t.shape} (numel {n}), packed has {logical_packed.size} bytes")
        ref = nf4_dequantize_ref(logical_packed.astype(np.uint8).reshape(-1), _ref_scales_parts(
            logical_absmax, kw), int(t.blocksize), n).reshape(dims)
        got = numlora.dequantize_nf4(t)
        if np.asarray(got).tobytes() != ref.tobytes():
            expect_close("NF4Tensor.dequantize", got, ref, np.abs(ref) + 1e-30)
        if len(dims) == 2:
            x = np.random.default_rng(1).uniform(-1, 1, (3, dims[1])).astype(np.float32)
            y = numlora.nf4_matmul(x, t)
            expect_close("nf4_matmul on the constructed tensor", y, x.astype(np.float64) @ ref.T.astype(np.float64),
                         np.abs(x) @ np.abs(ref).T)

    ex.call(lambda: numlora.NF4Tensor(packed, absmax, new_shape, new_bs, dtype=dtype, **kw), inputs=inputs,
            expect=expect, must_refuse=refuse)


def _ref_scales_parts(absmax, kw):
    if not kw:
        return absmax.astype(np.float32)
    q = absmax.astype(np.int64)
    g = np.arange(q.size) // 256
    return (np.asarray(kw["code8"], np.float32)[q] * np.asarray(kw["absmax2"], np.float32)[g]
            + np.float32(kw["offset"])).astype(np.float32)


def test_nf4_tensor_constructor():
    _run("NF4Tensor", prop_nf4_tensor, 150)


def _nf4_case(ex, *, square=False):
    out_f = ex.dim("out_f", 1, 5)
    in_mult = ex.dim("in_blocks", 1, 3)
    bs = ex.choice("bs", [2, 4, 8, 16, 3])
    in_f = in_mult * bs if ex.flag("in_multiple_of_bs", 0.8) else in_mult * bs + 1
    if square:  # (out, in) square, so that out= can alias x
        out_f = in_f
    rng = np.random.default_rng(ex.seed())
    w = rng.uniform(-2, 2, (out_f, in_f)).astype(np.float32)
    t = numlora.quantize_nf4(w, bs, double_quant=ex.flag("double_quant", 0.2))
    return out_f, in_f, t


def prop_nf4_matmul(ex):
    out_f, in_f, t = _nf4_case(ex, square=ex.flag("square", 0.3))
    n = ex.choice("n", [0, 1, 2, 3, 5, 17, 20])
    transposed = ex.flag("nf4_matmul_t", 0.4)
    width = out_f if transposed else in_f
    res_w = in_f if transposed else out_f
    x = ex.array("x", (n, width) if not ex.flag("x_1d", 0.15) else (width,))
    out_mode = ex.choice("out", [None] * 5 + ["fresh", "wrong-dtype", "out=x", "readonly"],
                         bad=["wrong-dtype", "out=x", "readonly"])
    xa = x if isinstance(x, np.ndarray) else None
    out = None
    allowed = {}
    if xa is not None:
        shape = (res_w,) if xa.ndim == 1 else (xa.shape[0], res_w)
        if out_mode == "fresh":
            out = np.full(shape, np.nan, np.float32)
        elif out_mode == "wrong-dtype":
            out = np.zeros(shape, np.float64)
        elif out_mode == "readonly":
            out = np.zeros(shape, np.float32)
            out.flags.writeable = False
        elif out_mode == "out=x" and xa.shape == shape:
            out = x
            allowed = {"x": x}
    tensor = t if not ex.flag("tensor-junk", 0.05) else ex.choice("tensor", [None, "t", np.zeros((2, 2))])
    pre = _snapshot64(x=x)
    deq = _ref_deq(t).astype(np.float64)

    def expect(res):
        X = pre["x"]
        if transposed:
            ref, bnd = X @ deq, np.abs(X) @ np.abs(deq)
        else:
            ref, bnd = X @ deq.T, np.abs(X) @ np.abs(deq).T
        _expect_out("nf4_matmul_t" if transposed else "nf4_matmul", res, out, ref, bnd)(res)

    fn = numlora.nf4_matmul_t if transposed else numlora.nf4_matmul
    ex.call(lambda: fn(x, tensor, out=out), inputs={k: v for k, v in {"x": x, "t": t}.items() if k not in allowed},
            allowed_modified=allowed, expect=expect)


def test_nf4_matmul():
    _run("nf4_matmul/nf4_matmul_t", prop_nf4_matmul, 150)


def prop_qlora_forward(ex):
    out_f, in_f, t = _nf4_case(ex, square=ex.flag("square", 0.3))
    n = ex.choice("n", [0, 1, 2, 3, 17, 18, 20])
    r = ex.dim("r", 1, 3)
    one_d = ex.flag("x_1d", 0.15)
    x = ex.array("x", (in_f,) if one_d else (n, in_f))
    a = ex.array("lora_a", (r, in_f))
    b = ex.array("lora_b", (out_f, r))
    bias = ex.array("bias", (out_f,)) if ex.flag("bias", 0.4) else None
    s = ex.scalar("scaling")
    out_mode = ex.choice("out", [None] * 5 + ["fresh", "out=x", "out=lora_a", "wrong-dtype"],
                         bad=["out=x", "out=lora_a", "wrong-dtype"])
    out = None
    allowed = {}
    shape = (out_f,) if one_d else (n, out_f)
    if out_mode == "fresh":
        out = np.full(shape, np.nan, np.float32)
    elif out_mode == "wrong-dtype":
        out = np.zeros(shape, np.float64)
    elif out_mode == "out=x" and isinstance(x, np.ndarray) and x.shape == shape:
        out, allowed = x, {"x": x}
    elif out_mode == "out=lora_a" and isinstance(a, np.ndarray) and a.shape == shape:
        out, allowed = a, {"lora_a": a}
    pre = _snapshot64(x=x, a=a, b=b, bias=bias)
    deq = _ref_deq(t).astype(np.float64)
    refuse = scalar_must_refuse("scaling", s)

    def expect(res):
        sv = scalar_value(s)
        ref = lora_forward_ref(pre["x"], deq, pre["a"], pre["b"], sv, pre["bias"])
        bnd = _lora_bound(pre["x"], deq, pre["a"], pre["b"], sv, pre["bias"], False)
        _expect_out("qlora_forward", res, out, ref, bnd)(res)

    inputs = {k: v for k, v in {"x": x, "lora_a": a, "lora_b": b, "bias": bias, "t": t}.items() if k not in allowed}
    ex.call(lambda: numlora.qlora_forward(x, t, a, b, s, bias, out=out), inputs=inputs, allowed_modified=allowed,
            expect=expect, must_refuse=refuse)


def test_qlora_forward():
    _run("qlora_forward", prop_qlora_forward, 200)


def prop_qlora_backward(ex):
    out_f, in_f, t = _nf4_case(ex)
    n = ex.choice("n", [0, 1, 2, 17, 18])
    r = ex.dim("r", 1, 3)
    x = ex.array("x", (n, in_f))
    a = ex.array("lora_a", (r, in_f))
    b = ex.array("lora_b", (out_f, r))
    g = ex.array("grad_out", (n, out_f))
    s = ex.scalar("scaling")
    alias = ex.choice("grads", [None] * 4 + ["fresh", "grad_a=lora_a", "grad_b=lora_b"],
                      bad=["grad_a=lora_a", "grad_b=lora_b"])
    ga = gb = None
    allowed = {}
    if alias == "fresh":
        ga, gb = np.ones((r, in_f), np.float32), np.ones((out_f, r), np.float32)
        allowed = {"grad_a": ga, "grad_b": gb}
    elif alias == "grad_a=lora_a":
        ga, allowed = a, {"lora_a": a}
    elif alias == "grad_b=lora_b":
        gb, allowed = b, {"lora_b": b}
    pre = _snapshot64(x=x, a=a, b=b, g=g, ga=ga, gb=gb)
    deq = _ref_deq(t).astype(np.float64)
    refuse = scalar_must_refuse("scaling", s)

    def expect(res):
        dx, gra, grb = res
        sv = scalar_value(s)
        X, G, A, B = pre["x"], pre["g"], pre["a"], pre["b"]
        add_a = 0 if pre["ga"] is None else pre["ga"]
        add_b = 0 if pre["gb"] is None else pre["gb"]
        expect_close("qlora_backward grad_a", gra, sv * (G @ B).T @ X + add_a,
                     abs(sv) * (np.abs(G) @ np.abs(B)).T @ np.abs(X) + np.abs(add_a))
        expect_close("qlora_backward grad_b", grb, sv * G.T @ (X @ A.T) + add_b,
                     abs(sv) * np.abs(G).T @ (np.abs(X) @ np.abs(A).T) + np.abs(add_b))
        expect_close("qlora_backward grad_x", dx, G @ deq + sv * (G @ B) @ A,
                     np.abs(G) @ np.abs(deq) + abs(sv) * (np.abs(G) @ np.abs(B)) @ np.abs(A))

    inputs = {k: v for k, v in {"x": x, "lora_a": a, "lora_b": b, "grad_out": g, "t": t}.items() if k not in allowed}
    ex.call(lambda: numlora.qlora_backward(x, t, a, b, s, g, grad_a=ga, grad_b=gb), inputs=inputs,
            allowed_modified=allowed, expect=expect, must_refuse=refuse)


def test_qlora_backward():
    _run("qlora_backward", prop_qlora_backward, 120)


# --- combine ------------------------------------------------------------------------------------------------
def prop_combine(ex):
    k = ex.dim("adapters", 1, 3)
    out_f = ex.dim("out_f", 1, 4)
    in_f = ex.dim("in_f", 1, 4)
    terms = []
    for i in range(k):
        r = ex.dim(f"r{i}", 1, 2)
        a = ex.array(f"a{i}", (r, in_f), p_bad=0.15)
        b = ex.array(f"b{i}", (out_f, r), p_bad=0.15)
        s = ex.scalar(f"s{i}", p_bad=0.1)
        terms.append((a, b, s))
    weights = [ex.scalar(f"w{i}", p_bad=0.15) for i in range(k)]
    if ex.flag("weights-junk", 0.05):
        weights = ex.choice("weights", ["ab", None, np.ones((k, 1)), [1.0] * (k + 1), 1.0])
    method = ex.choice("method", ["cat"] * 3 + ["svd", "svd", "SVD", None])
    rank = ex.choice("rank", [None] * 4 + [1, 2, 0, -1, 2.5, True, 2 ** 64]) if method == "svd" else None
    pre = [(_snapshot64(a=a, b=b), s) for a, b, s in terms]
    refuse = None
    if isinstance(weights, list) and len(weights) == k:
        for i, w in enumerate(weights):
            refuse = refuse or scalar_must_refuse(f"weights[{i}]", w)
    for i, (_, _, s) in enumerate(terms):
        refuse = refuse or scalar_must_refuse(f"scaling of adapter {i}", s)

    def expect(layer):
        if not isinstance(layer, numlora.LoraLinear):
            raise Violation("combine_adapters returned no LoraLinear")
        ref = np.zeros((out_f, in_f))
        bnd = np.zeros((out_f, in_f))
        for (p, s), w in zip(pre, weights):
            ref += scalar_value(w) * scalar_value(s) * (p["b"] @ p["a"])
            bnd += abs(scalar_value(w) * scalar_value(s)) * (np.abs(p["b"]) @ np.abs(p["a"]))
        got = layer.scaling * (np.asarray(layer.lora_b, np.float64) @ np.asarray(layer.lora_a, np.float64))
        if method == "svd" and rank is not None and rank < min(out_f, in_f, sum(np.shape(a)[0] for a, _, _ in terms)):
            return  # a truncation: not the exact sum
        expect_close("combine_adapters delta", got, ref, bnd + 1e-6 * np.abs(ref).max(initial=0))

    ex.call(lambda: numlora.combine_adapters(terms, weights, method=method, rank=rank),
            inputs={f"term{i}": (a, b) for i, (a, b, _) in enumerate(terms)}, expect=expect, must_refuse=refuse)


def test_combine_adapters():
    _run("combine_adapters", prop_combine, 150)


# --- DoRA -------------------------------------------------------------------------------------------------------
def prop_dora(ex):
    which = ex.choice("function", ["dora_weight_norm", "dora_forward", "merge_dora"])
    n = ex.dim("n", 0, 3)
    out_f = ex.dim("out_f", 1, 4)
    in_f = ex.dim("in_f", 1, 4)
    r = ex.dim("r", 1, 2)
    fifo = ex.flag("fan_in_fan_out", 0.2)
    w = ex.array("weight", (in_f, out_f) if fifo else (out_f, in_f))
    a = ex.array("lora_a", (r, in_f))
    b = ex.array("lora_b", (out_f, r))
    s = ex.scalar("scaling")
    m = ex.array("magnitude", (out_f,), lo=0.5, hi=2)
    x = ex.array("x", (n, in_f))
    bias = ex.array("bias", (out_f,)) if ex.flag("bias", 0.3) else None
    pre = _snapshot64(w=w, a=a, b=b, m=m, x=x, bias=bias)
    refuse = scalar_must_refuse("scaling", s)

    def V():
        W = pre["w"].T if fifo else pre["w"]
        sv = scalar_value(s)
        return W + sv * pre["b"] @ pre["a"], np.abs(W) + abs(sv) * np.abs(pre["b"]) @ np.abs(pre["a"])

    def expect_norm(res):
        v, vb = V()
        expect_close("dora_weight_norm", np.asarray(res), np.sqrt((v * v).sum(1)), np.sqrt((vb * vb).sum(1)))

    def expect_forward(res):
        v, vb = V()
        norm = np.sqrt((v * v).sum(1))
        f = pre["m"] / norm
        W = pre["w"].T if fifo else pre["w"]
        sv = scalar_value(s)
        base = pre["x"] @ W.T + sv * (pre["x"] @ pre["a"].T) @ pre["b"].T
        bb = np.abs(pre["x"]) @ np.abs(W).T + abs(sv) * (np.abs(pre["x"]) @ np.abs(pre["a"]).T) @ np.abs(pre["b"]).T
        ref = base * f + (0 if pre["bias"] is None else pre["bias"])
        bnd = bb * np.abs(f) + (0 if pre["bias"] is None else np.abs(pre["bias"]))
        if not (norm > 0).all():
            raise Violation("dora_forward accepted a zero row norm")
        expect_close("dora_forward", res, ref, bnd * 4)

    def expect_merge(_):
        v, vb = V()
        norm = np.sqrt((v * v).sum(1))
        ref = v * (pre["m"] / norm)[:, None]
        ref = ref.T if fifo else ref
        bnd = (vb * np.abs(pre["m"] / norm)[:, None])
        bnd = bnd.T if fifo else bnd
        expect_close("merge_dora (weight after)", np.asarray(w), ref, 4 * bnd)

    if which == "dora_weight_norm":
        ex.call(lambda: numlora.dora_weight_norm(w, a, b, s, fifo), inputs={"w": w, "a": a, "b": b},
                expect=expect_norm, must_refuse=refuse)
    elif which == "dora_forward":
        ex.call(lambda: numlora.dora_forward(x, w, a, b, s, m, bias, fan_in_fan_out=fifo),
                inputs={"x": x, "w": w, "a": a, "b": b, "m": m, "bias": bias}, expect=expect_forward,
                must_refuse=refuse)
    else:
        ex.call(lambda: numlora.merge_dora(w, a, b, s, m, fifo), inputs={"a": a, "b": b, "m": m},
                allowed_modified={"w": w}, expect=expect_merge, must_refuse=refuse)


def test_dora():
    _run("dora_*", prop_dora, 150)


# --- layers -------------------------------------------------------------------------------------------------------
def _scaling(alpha, r, rs):
    return alpha / math.sqrt(r) if rs else alpha / r


def prop_lora_linear(ex):
    out_f = ex.dim("out_f", 1, 5)
    in_f = ex.dim("in_f", 1, 5)
    fifo = ex.flag("fan_in_fan_out", 0.2)
    w = ex.array("weight", (in_f, out_f) if fifo else (out_f, in_f), p_bad=0.2)
    rank = ex.choice("rank", [1, 2, 3] * 4 + [0, -1, 10, 2.0, True, "2", None, 2 ** 64],
                     bad=[0, -1, 10, 2.0, True, "2", None, 2 ** 64])
    alpha = ex.scalar("alpha", good=ex.draw(st.sampled_from([1.0, 2, 8.0, 0.5])), p_bad=0.15)
    rs = ex.flag("use_rslora", 0.2)
    init = ex.choice("init", ["seed"] * 4 + ["kaiming", "gaussian", "bogus", None], bad=["bogus", None])
    seed = ex.choice("seed", [None] * 4 + [0, 7, -1, 2 ** 64, 2.5, "1"], bad=[-1, 2 ** 64, 2.5, "1"])
    dora = ex.flag("use_dora", 0.2)
    lbias = not dora and ex.flag("lora_bias", 0.15)
    bias = ex.array("bias", (out_f,), p_bad=0.2) if ex.flag("bias", 0.4) else None
    dropout = ex.choice("dropout", [0.0] * 4 + [0.25, 1.0, -0.5, math.nan, "0.1"], bad=[1.0, -0.5, math.nan, "0.1"])
    refuse = scalar_must_refuse("alpha", alpha, positive=True)
    st_, layer = ex.call(lambda: numlora.LoraLinear.from_weight(
        w, rank, alpha, init=init, seed=seed, bias=bias, use_rslora=rs, fan_in_fan_out=fifo, use_dora=dora,
        lora_bias=lbias, dropout=dropout), inputs={"weight": w, "bias": bias}, must_refuse=refuse)
    if st_ != "ok":
        return
    rng = np.random.default_rng(ex.seed())
    r = layer.rank
    try:
        layer.lora_b = rng.uniform(-1, 1, (out_f, r)).astype(layer.lora_a.dtype)
    except NumloraError:
        return
    W0 = np.array(layer.weight, copy=True)
    x = ex.array("x", (ex.dim("n", 0, 3), in_f))
    pre = _snapshot64(x=x)
    sv = _scaling(scalar_value(alpha), r, rs)

    def ref_forward():
        W = W0.astype(np.float64)
        Wm = W.T if fifo else W
        A, B = layer.lora_a.astype(np.float64), layer.lora_b.astype(np.float64)
        bb = None if layer.bias is None else np.asarray(layer.bias, np.float64)
        X = pre["x"]
        y = X @ Wm.T + sv * (X @ A.T) @ B.T
        bnd = np.abs(X) @ np.abs(Wm).T + abs(sv) * (np.abs(X) @ np.abs(A).T) @ np.abs(B).T
        if dora:
            V = Wm + sv * B @ A
            f = np.asarray(layer.magnitude, np.float64) / np.sqrt((V * V).sum(1))
            y, bnd = y * f, bnd * np.abs(f) * 4
        if bb is not None:
            y, bnd = y + bb, bnd + np.abs(bb)
        return y, bnd

    def expect_fwd(y):
        ref, bnd = ref_forward()
        expect_close("LoraLinear.forward", y, ref, bnd)

    ex.call(lambda: layer.forward(x), inputs={"x": x}, expect=expect_fwd)
    st_m, _ = ex.call(lambda: layer.merge(), inputs={"x": x})
    if st_m == "ok":
        ex.call(lambda: layer.forward(x), inputs={"x": x}, expect=expect_fwd)

        def restored(_):
            if np.asarray(layer.weight).tobytes() != W0.tobytes():
                raise Violation("LoraLinear.unmerge did not restore the weight bit for bit")

        ex.call(lambda: layer.unmerge(), expect=restored)
        ex.call(lambda: layer.unmerge(), must_refuse="unmerge of an unmerged layer")
    # a training step (plain LoRA layers without dropout: the reference has no mask)
    if dora or lbias or dropout != 0.0 or not isinstance(x, np.ndarray):
        return
    layer.train()
    st_f, y = ex.call(lambda: layer.forward(x), inputs={"x": x}, expect=expect_fwd)
    if st_f != "ok":
        return
    g = ex.array("grad_out", np.shape(y))
    pg = _snapshot64(g=g)

    def expect_bwd(dx):
        X, G = pre["x"], pg["g"]
        A, B = layer.lora_a.astype(np.float64), layer.lora_b.astype(np.float64)
        Wm = W0.astype(np.float64).T if fifo else W0.astype(np.float64)
        expect_close("LoraLinear.backward grad_a", layer.grad_a, sv * (G @ B).T @ X,
                     abs(sv) * (np.abs(G) @ np.abs(B)).T @ np.abs(X))
        expect_close("LoraLinear.backward grad_b", layer.grad_b, sv * G.T @ (X @ A.T),
                     abs(sv) * np.abs(G).T @ (np.abs(X) @ np.abs(A).T))
        expect_close("LoraLinear.backward grad_x", dx, G @ Wm + sv * (G @ B) @ A,
                     np.abs(G) @ np.abs(Wm) + abs(sv) * (np.abs(G) @ np.abs(B)) @ np.abs(A))

    st_b, _ = ex.call(lambda: layer.backward(g), inputs={"grad_out": g}, expect=expect_bwd)
    if st_b != "ok":
        return
    ex.call(lambda: layer.backward(g), must_refuse="a second backward for one forward")
    _adamw_step(ex, layer.parameters())


def _adamw_step(ex, params):
    lr = ex.scalar("lr", good=1e-2, p_bad=0.2)
    b1 = ex.scalar("beta1", good=0.9, p_bad=0.1)
    eps = ex.scalar("eps", good=1e-8, p_bad=0.1)
    wd = ex.scalar("weight_decay", good=0.01, p_bad=0.1)
    max_norm = ex.scalar("max_norm", good=1.0, p_bad=0.15)
    before = [(np.array(p.value, np.float64, copy=True), None if p.grad is None else np.array(p.grad, np.float64))
              for p in params]
    refuse = scalar_must_refuse("lr", lr) or scalar_must_refuse("beta1", b1) or scalar_must_refuse("eps", eps) or \
        scalar_must_refuse("weight_decay", wd)
    if refuse is None:
        lv, bv, ev, wv = (scalar_value(v) for v in (lr, b1, eps, wd))
        if lv < 0 or not 0 <= bv < 1 or ev < 0 or wv < 0:
            refuse = "an AdamW hyper-parameter out of range"
    st_o, opt = ex.call(lambda: numlora.AdamW(params, lr=lr, betas=(b1, 0.999), eps=eps, weight_decay=wd),
                        must_refuse=refuse)
    mn_refuse = scalar_must_refuse("max_norm", max_norm)
    if mn_refuse is None and scalar_value(max_norm) < 0:
        mn_refuse = "max_norm < 0"
    grads = [g for _, g in before if g is not None]
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))

    def expect_clip(res):
        if not math.isclose(float(res), total, rel_tol=1e-6, abs_tol=1e-30):
            raise Violation("clip_grad_norm returned a wrong norm", f"{res} vs {total}")
        coef = min(1.0, scalar_value(max_norm) / (total + 1e-6))
        for (_, g), p in zip(before, params):
            if g is not None:
                expect_close("clip_grad_norm (gradient after)", p.grad, g * coef, np.abs(g))

    st_c, _ = ex.call(lambda: numlora.clip_grad_norm(params, max_norm), expect=expect_clip, must_refuse=mn_refuse)
    if st_o != "ok":
        return
    gnow = [None if p.grad is None else np.array(p.grad, np.float64) for p in params]

    def expect_step(_):
        lv, bv, ev, wv = (scalar_value(v) for v in (lr, b1, eps, wd))
        for (v0, _), g, p in zip(before, gnow, params):
            if g is None:
                continue
            m = (1 - bv) * g
            vv = (1 - 0.999) * g * g
            ref = v0 * (1 - lv * wv) - (lv / (1 - bv)) * m / (np.sqrt(vv) / math.sqrt(1 - 0.999) + ev)
            bnd = np.abs(v0) + lv * (np.abs(m) / (np.sqrt(vv) / math.sqrt(1 - 0.999) + ev)) / (1 - bv) + 1e-6
            # the state v = (1 - b2) g^2 is kept in the parameter's dtype, as torch keeps it: where g^2
            # overflows that dtype the update is 0, as torch's is (not a numlora defect)
            bnd = np.where(g * g * 1e-3 > F32_MAX / 8, np.inf, bnd)
            expect_close("AdamW.step", p.value, ref, bnd * 10)

    ex.call(lambda: opt.step(), expect=expect_step)


def test_lora_linear():
    _run("LoraLinear (+AdamW, clip_grad_norm)", prop_lora_linear, 150)


def prop_lora_linear_ctor(ex):
    out_f = ex.dim("out_f", 1, 4)
    in_f = ex.dim("in_f", 1, 4)
    r = ex.dim("r", 1, 2)
    detached = ex.flag("detached", 0.3)
    w = None if detached else ex.array("weight", (out_f, in_f))
    a = ex.array("lora_a", (r, in_f))
    b = ex.array("lora_b", (out_f, r))
    alpha = ex.scalar("alpha", good=2.0, p_bad=0.3)
    mag = ex.array("magnitude", (out_f,), lo=0.5, hi=2) if ex.flag("magnitude", 0.2) else None
    seed = ex.choice("dropout_seed", [0] * 5 + [-1, 2 ** 64, 2 ** 64 - 1, "3", None], bad=[-1, 2 ** 64, "3", None])
    refuse = scalar_must_refuse("alpha", alpha, positive=True)
    ex.call(lambda: numlora.LoraLinear(w, a, b, alpha, magnitude=mag, dropout_seed=seed),
            inputs={"w": w, "a": a, "b": b, "m": mag}, must_refuse=refuse)


def test_lora_linear_constructor():
    _run("LoraLinear()", prop_lora_linear_ctor, 120)


def prop_qlora_linear(ex):
    out_f = ex.dim("out_f", 1, 4)
    bs = ex.choice("bs", [2, 4, 8] * 3 + [0, 2 ** 63, 2 ** 64, -8, "8"], bad=[0, 2 ** 63, 2 ** 64, -8, "8"])
    in_f = ex.dim("in_blocks", 1, 3) * (bs if isinstance(bs, int) and 0 < bs < 64 else 4)
    w = ex.array("weight", (out_f, in_f), p_bad=0.2)
    rank = ex.choice("rank", [1, 2] * 4 + [0, 99, -3, 1.5], bad=[0, 99, -3, 1.5])
    alpha = ex.scalar("alpha", good=4.0, p_bad=0.2)
    seed = ex.choice("seed", [None] * 4 + [3, -1, 2 ** 64, "x"], bad=[-1, 2 ** 64, "x"])
    refuse = scalar_must_refuse("alpha", alpha, positive=True)
    st_, layer = ex.call(lambda: numlora.QLoraLinear.from_weight(w, rank, alpha, blocksize=bs, seed=seed),
                         inputs={"w": w}, must_refuse=refuse)
    if st_ != "ok":
        return
    rng = np.random.default_rng(ex.seed())
    layer.lora_b = rng.uniform(-1, 1, (out_f, layer.rank)).astype(np.float32)
    deq = _ref_deq(layer.nf4).astype(np.float64)
    x = ex.array("x", (ex.choice("n", [0, 1, 3, 17]), in_f))
    pre = _snapshot64(x=x)
    sv = layer.scaling

    def expect(y):
        A, B = layer.lora_a.astype(np.float64), layer.lora_b.astype(np.float64)
        ref = lora_forward_ref(pre["x"], deq, A, B, sv)
        bnd = _lora_bound(pre["x"], deq, A, B, sv, None, False)
        expect_close("QLoraLinear.forward", y, ref, bnd)

    ex.call(lambda: layer.forward(x), inputs={"x": x}, expect=expect)
    # a training step: forward in training mode, backward, gradients against the reference
    layer.train()
    st_f, y = ex.call(lambda: layer.forward(x), inputs={"x": x}, expect=expect)
    if st_f == "ok":
        g = ex.array("grad_out", np.shape(y))
        pg = _snapshot64(g=g)

        def expect_bwd(dx):
            X, G = pre["x"], pg["g"]
            A, B = layer.lora_a.astype(np.float64), layer.lora_b.astype(np.float64)
            expect_close("QLoraLinear.backward grad_a", layer.grad_a, sv * (G @ B).T @ X,
                         abs(sv) * (np.abs(G) @ np.abs(B)).T @ np.abs(X))
            expect_close("QLoraLinear.backward grad_b", layer.grad_b, sv * G.T @ (X @ A.T),
                         abs(sv) * np.abs(G).T @ (np.abs(X) @ np.abs(A).T))
            expect_close("QLoraLinear.backward grad_x", dx, G @ deq + sv * (G @ B) @ A,
                         np.abs(G) @ np.abs(deq) + abs(sv) * (np.abs(G) @ np.abs(B)) @ np.abs(A))

        ex.call(lambda: layer.backward(g), inputs={"grad_out": g}, expect=expect_bwd)
    layer.eval()
    ex.call(lambda: layer.merged_weight(), expect=lambda mw: expect_close(
        "QLoraLinear.merged_weight", mw, deq + sv * layer.lora_b.astype(np.float64) @ layer.lora_a.astype(np.float64),
        np.abs(deq) + abs(sv) * np.abs(layer.lora_b) @ np.abs(layer.lora_a)))


def test_qlora_linear():
    _run("QLoraLinear", prop_qlora_linear, 100)


def prop_lora_adapter(ex):
    cfg_rank = ex.dim("cfg_rank", 1, 2)
    cfg = numlora.LoraConfig(rank=cfg_rank, alpha=2.0)
    ad = numlora.LoraAdapter(cfg)
    names = []
    weights = {}
    for i in range(ex.dim("layers", 1, 3)):
        name = ex.choice(f"name{i}", [f"layer{i}"] * 4 + ["", None, 3, "layer0", "a.b", "x" * 300],
                         bad=["", None, 3, "x" * 300])
        out_f, in_f = ex.dim(f"out{i}", 2, 4), ex.dim(f"in{i}", 2, 4)
        w = ex.array(f"w{i}", (out_f, in_f), p_bad=0.2)
        st_, layer = ex.call(lambda: ad.add_layer(name, w), inputs={"w": w})
        if st_ == "ok":
            names.append(name)
            weights[name] = np.array(layer.weight, copy=True)
            layer.lora_b = np.random.default_rng(i).uniform(-1, 1, layer.lora_b.shape).astype(layer.lora_b.dtype)
    ex.call(lambda: ad.get_layer(ex.choice("lookup", ["nope", None, 5, "layer0"])))
    st_m, _ = ex.call(lambda: ad.merge_all())
    if st_m == "ok":
        def restored(_):
            for n in names:
                if ad[n].weight.tobytes() != weights[n].tobytes():
                    raise Violation("LoraAdapter.unmerge_all did not restore a weight bit for bit")
        ex.call(lambda: ad.unmerge_all(), expect=restored)
    ex.call(lambda: ad.summary())


def test_lora_adapter():
    _run("LoraAdapter", prop_lora_adapter, 80)


# --- LoraBank ---------------------------------------------------------------------------------------------------
ID_JUNK = [-2, -1, 2 ** 64 - 1, np.uint64(2 ** 64 - 1), np.int64(-1), 2 ** 63, 10 ** 30, True, False, None, 1.0, 1.5,
           "missing", b"a0", np.float32(0), [0], np.int8(0)]


def prop_lora_bank(ex):
    out_f = ex.dim("out_f", 1, 4)
    in_f = ex.dim("in_f", 1, 4)
    nf4 = ex.flag("nf4_base", 0.2)
    rng = np.random.default_rng(ex.seed())
    if nf4:
        in_f = 4 * in_f
        base = numlora.quantize_nf4(rng.uniform(-1, 1, (out_f, in_f)).astype(np.float32), 4)
        wref = _ref_deq(base).astype(np.float64)
    else:
        base = ex.array("base", (out_f, in_f), p_bad=0.15)
        wref = None
    bias = ex.array("bias", (out_f,), p_bad=0.15) if ex.flag("bias", 0.3) else None
    row_stable = ex.choice("row_stable", [True, True, False, 1, None], bad=[1, None])
    pre_base = _snapshot64(base=base if not nf4 else None, bias=bias)
    st_, bank = ex.call(lambda: numlora.LoraBank(base, bias=bias, row_stable=row_stable),
                        inputs={"base": base, "bias": bias})
    if st_ != "ok":
        return
    if wref is None:
        wref = pre_base["base"]
    model = {}  # name -> (id, a64, b64, s32)
    for step in range(ex.dim("ops", 1, 6)):
        op = ex.choice(f"op{step}", ["add", "add", "forward", "forward", "forward", "remove"])
        if op == "add":
            name = ex.choice(f"name{step}", ["a0", "a1", "a2", "a0"] * 2 + ["", None, 7, b"a0"],
                             bad=["", None, 7, b"a0"])
            r = ex.dim(f"r{step}", 1, 3)
            a = ex.array(f"a{step}", (r, in_f), p_bad=0.2)
            b = ex.array(f"b{step}", (out_f, r), p_bad=0.2)
            s = ex.scalar(f"s{step}", p_bad=0.2)
            pa = _snapshot64(a=a, b=b)
            refuse = scalar_must_refuse("scaling", s)
            if isinstance(name, str) and name in model:
                refuse = refuse or "a duplicate name"

            def expect_add(k):
                if not isinstance(k, (int, np.integer)) or bank.index(name) != k:
                    raise Violation("LoraBank.add returned an id that index(name) does not give back")
                with np.errstate(over="ignore"):  # as the pool stores them: float32
                    stored = [pa[k].astype(np.float32) for k in ("a", "b")]
                if not all(np.isfinite(m).all() for m in stored):
                    raise Violation("LoraBank.add accepted non-finite adapter values")

            st_a, k = ex.call(lambda: bank.add(name, a, b, s), inputs={"a": a, "b": b}, expect=expect_add,
                              must_refuse=refuse)
            if st_a == "ok":
                model[name] = (int(k), pa["a"].astype(np.float32).astype(np.float64),
                               pa["b"].astype(np.float32).astype(np.float64), float(np.float32(scalar_value(s))))
        elif op == "remove":
            name = ex.choice(f"rm{step}", ["a0", "a1", "a2", "zz", None, 0])
            st_r, _ = ex.call(lambda: bank.remove(name),
                              must_refuse=None if name in model else f"removing unknown adapter {name!r}")
            if st_r == "ok":
                del model[name]
        else:
            _bank_forward(ex, bank, model, wref, pre_base["bias"], in_f, out_f, step)


def _bank_forward(ex, bank, model, wref, bias64, in_f, out_f, step):
    n = ex.dim(f"n{step}", 0, 4)
    one_d = ex.flag(f"x1d{step}", 0.1)
    x = ex.array(f"x{step}", (in_f,) if one_d else (n, in_f), p_bad=0.2)
    rows = 1 if one_d else n
    live = list(model)
    kind = ex.choice(f"ids{step}", ["names", "ints", "array", "mixed", "junk", "uint64-array", "wrong-length",
                                    "scalar"])
    entries = []
    if kind in ("names", "ints", "mixed", "junk"):
        for _ in range(rows):
            opts = live + [None, -1] + ([model[k][0] for k in live] if kind != "names" else [])
            if kind in ("junk", "mixed"):
                opts = opts + ID_JUNK
            entries.append(ex.draw(st.sampled_from(opts)) if opts else None)
        adapters = entries
    elif kind == "array":
        ids = [ex.draw(st.sampled_from([-1] + [model[k][0] for k in live])) for _ in range(rows)]
        adapters = np.array(ids, ex.choice(f"idt{step}", [np.int64, np.int32, np.int8, np.uint8, np.float64]))
        entries = ids
    elif kind == "uint64-array":
        adapters = np.array([2 ** 64 - 1] * rows, np.uint64)
        entries = [2 ** 64 - 1] * rows
    elif kind == "wrong-length":
        adapters = [None] * (rows + 1)
        entries = None
    else:
        adapters = ex.draw(st.sampled_from(live + [None, -1, 0, "zz", 2 ** 64 - 1]))
        entries = [adapters] if one_d else None
    if kind != "names":
        ex.bad.append(f"ids={kind}")
    scale = None
    if ex.flag(f"scale{step}", 0.3):
        scale = ex.array(f"scale{step}", (rows,) if not one_d else (1,), p_bad=0.3)
    out_mode = ex.choice(f"out{step}", [None] * 4 + ["fresh", "out=x"], bad=["out=x"])
    out = None
    allowed = {}
    shape = (out_f,) if one_d else (n, out_f)
    if out_mode == "fresh":
        out = np.full(shape, np.nan, np.float32)
    elif out_mode == "out=x" and isinstance(x, np.ndarray) and x.shape == shape:
        out, allowed = x, {"x": x}
    pre = _snapshot64(x=x, scale=scale)
    # what each row means, with Python ints: a name, None, exactly -1, a live id; else a refusal is due
    by_id = {v[0]: v for v in model.values()}
    meaning = []
    refuse = None
    if entries is None:
        refuse = "adapters do not match the rows"
    else:
        for e in entries:
            if isinstance(e, str):
                if e in model:
                    meaning.append(model[e][0])
                else:
                    refuse = f"unknown adapter name {e!r}"
            elif e is None:
                meaning.append(-1)
            elif isinstance(e, (bool, np.bool_)) or isinstance(e, (float, np.floating, bytes, list)):
                meaning.append(("soft", e))  # refusing is right; so is nothing else but reading it as an int
            else:
                k = int(e)
                if k == -1 or k in by_id:
                    meaning.append(k)
                else:
                    refuse = f"adapter id {k} is not live"
    sc = pre["scale"]
    if sc is not None and np.isfinite(sc).all() and (np.abs(sc) > F32_MAX).any():
        refuse = refuse or "a per-row scale not finite in float32"
    if any(isinstance(m, tuple) for m in meaning):
        soft = [m[1] for m in meaning if isinstance(m, tuple)]
        if any(isinstance(v, (bytes, list)) or (isinstance(v, (float, np.floating)) and not float(v).is_integer())
               for v in soft):
            refuse = refuse or f"adapter entries {soft!r} are not ids"
        if refuse is None:
            meaning = [int(m[1]) if isinstance(m, tuple) else m for m in meaning]
        if refuse is None and any(m != -1 and m not in by_id for m in meaning):
            refuse = refuse or "an entry read as an int names no live adapter"

    def expect(res):
        X = pre["x"].reshape(-1, in_f)
        adapters_ref = {k: (a, b, s) for k, a, b, s in model.values()}
        ids = np.array(meaning, np.int64)
        s_rows = None if sc is None else sc.astype(np.float32).astype(np.float64).reshape(-1)
        ref = multi_lora_ref(X, wref, adapters_ref, ids, s_rows, bias64)
        bnd = multi_lora_ref(np.abs(X), np.abs(wref), {k: (np.abs(a), np.abs(b), abs(s)) for k, (a, b, s) in
                                                       adapters_ref.items()}, ids,
                             None if s_rows is None else np.abs(s_rows), None if bias64 is None else np.abs(bias64))
        _expect_out("LoraBank.forward", res, out, ref.reshape(shape), bnd.reshape(shape))(res)

    functional = ex.flag(f"multi_lora_forward{step}", 0.3)
    ex.call(lambda: (numlora.multi_lora_forward(x, bank, adapters, scale=scale, out=out) if functional
                     else bank.forward(x, adapters, scale=scale, out=out)),
            inputs={k: v for k, v in {"x": x, "scale": scale, "adapters": adapters}.items() if k not in allowed},
            allowed_modified=allowed, expect=expect, must_refuse=refuse)


def test_lora_bank():
    _run("LoraBank", prop_lora_bank, 150)


# --- small classes and helpers --------------------------------------------------------------------------------------
def prop_xorshift(ex):
    seed = ex.choice("seed", [0, 1, 42, 2 ** 64 - 1, 2 ** 63] * 2 + [-1, 2 ** 64, 1.0, None, "5", True,
                                                                   np.uint64(2 ** 64 - 1), np.int8(-1)],
                     bad=[-1, 2 ** 64, 1.0, None, "5", True, np.int8(-1)])
    shape = ex.choice("shape", [(3,), 5, (2, 3), (0,), ()] * 2 + [(-1,), (2.5,), "3", None, (2 ** 62, 2 ** 62)],
                      bad=[(-1,), (2.5,), "3", None, (2 ** 62, 2 ** 62)])
    refuse = None
    if isinstance(seed, (bool, np.bool_, float, str)) or seed is None or not 0 <= int(seed) < 2 ** 64:
        refuse = f"seed={seed!r}"
    st_, rng = ex.call(lambda: numlora.XorShift64(seed), must_refuse=refuse)
    if st_ != "ok":
        return
    sh = (shape,) if isinstance(shape, int) else shape
    ok_shape = isinstance(sh, tuple) and all(isinstance(d, int) and d >= 0 for d in sh) and math.prod(sh) < 10 ** 6

    def expect(arr):
        n = int(np.prod(sh))
        vals, _ = xorshift_stream(int(seed), n)
        if np.asarray(arr).reshape(-1).tobytes() != np.array(vals, np.float32).tobytes():
            raise Violation("XorShift64.uniform differs from the seed's stream")

    ex.call(lambda: rng.uniform(shape), expect=expect, must_refuse=None if ok_shape else f"shape={shape!r}")


def test_xorshift64():
    _run("XorShift64", prop_xorshift, 80)


def prop_parameter(ex):
    v = ex.array("value", (ex.dim("m", 1, 3), 2))
    g = ex.array("grad", np.shape(v) if isinstance(v, np.ndarray) else (2, 2))
    st_, p = ex.call(lambda: numlora.Parameter(v, g, name="p"), inputs={"v": v, "g": g})
    if st_ != "ok":
        return
    _adamw_step(ex, [p])


def test_parameter_adamw_clip():
    _run("Parameter/AdamW/clip_grad_norm", prop_parameter, 100)


def prop_lora_config(ex):
    kw = dict(
        rank=ex.choice("rank", [1, 8] * 3 + [0, -1, 2.0, True, "8", None, 2 ** 64]),
        alpha=ex.scalar("alpha", good=16.0, p_bad=0.3),
        dropout=ex.choice("dropout", [0.0, 0.1] * 3 + [1.0, -0.1, math.nan, "0", None, True]),
        target_modules=ex.choice("target_modules", [(), ("q_proj",)] * 3 + ["q_proj", [1, 2], None, 5]),
        rank_pattern=ex.choice("rank_pattern", [{}] * 5 + [{"q": 4}, {"(": 2}, {"q": 0}, {3: 1}, [], "x"]),
        alpha_pattern=ex.choice("alpha_pattern", [{}] * 5 + [{"q": 4.0}, {"q": math.inf}, {"q": 1e39}, {"q": "a"}]),
    )
    refuse = scalar_must_refuse("alpha", kw["alpha"], positive=True)
    ex.call(lambda: numlora.LoraConfig(**kw), must_refuse=refuse)
    data = {"peft_type": ex.choice("peft_type", ["LORA"] * 4 + ["lora", None, 1]),
            "r": kw["rank"], "lora_alpha": kw["alpha"],
            "target_modules": kw["target_modules"] if not isinstance(kw["target_modules"], tuple) else
            list(kw["target_modules"])}
    ex.call(lambda: numlora.LoraConfig.from_peft(data))


def test_lora_config():
    _run("LoraConfig", prop_lora_config, 120)


def prop_device(ex):
    a = ex.choice("array", [np.zeros(3, np.float32), None, [1.0], "x", np.zeros((2, 2), np.float64)])
    which = ex.choice("fn", ["to_device", "to_host", "is_device_array"])
    fn = getattr(numlora, which)

    def expect(res):
        if which == "is_device_array" and res is not False:
            raise Violation("is_device_array of a host object is not False")
        if which == "to_host" and isinstance(a, np.ndarray) and not np.array_equal(res, a):
            raise Violation("to_host changed a host array")

    ex.call(lambda: fn(a), inputs={"a": a}, expect=expect)


def test_device_helpers():
    _run("to_device/to_host/is_device_array", prop_device, 30)
