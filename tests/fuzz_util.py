"""Shared machinery of the property-based fuzz suite (tests/test_fuzz_api.py,
tests/test_fuzz_files.py).

The property every call is held to: it raises a :class:`numlora.errors.NumloraError`
subclass with a non-empty message, or it returns a result equal to a float64 reference
within float32 tolerance; either way the inputs are not modified (documented ``out=`` /
in-place buffers excepted). Anything else - another exception type, a NaN or inf from
finite inputs, a wrong number, a modified input - is a *violation*.

Violations do not stop a run: each test collects them (grouped by kind, keeping the
shortest example of each) and fails at the end with the list, so one run shows every
kind of failure a test finds, not only the first. Counters of what was tried are
module globals here, shared by both test files, written as JSON and printed at the end
of each test module (``pytest -s`` shows the summary).
"""

from __future__ import annotations

import copy
import faulthandler
import json
import math
import os
import resource
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from numlora.errors import NumloraError

F32_MAX = float(np.finfo(np.float32).max)

#: What each test tried: every example (tried), those refused with a clear numlora error
#: (refused), those answered and checked against the reference (correct), and the
#: examples that had at least one bad ingredient (bad, counted by distinct description).
COUNTS = {"tried": 0, "refused": 0, "correct": 0, "violations": 0}
BAD_KEYS: set = set()
PER_TEST: dict = {}

#: Hypothesis settings of the suite: fixed seed, no example database, no deadline (the
#: first example of a test compiles kernels), no shrinking unless FUZZ_SHRINK=1 (the
#: suite collects violations itself and stays within its time budget).
_PHASES = [Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("FUZZ_SHRINK") == "1" else [])
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))


def fuzz_settings(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), derandomize=True, deadline=None, database=None,
                    phases=_PHASES, print_blob=False,
                    suppress_health_check=list(HealthCheck))


class Violation(Exception):
    """A broken property (raised inside a check, collected by :class:`Collector`)."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


class Collector:
    """The violations of one test, by kind, with the shortest example of each."""

    def __init__(self, test: str):
        self.test = test
        self.kinds: dict[str, tuple[int, str]] = {}
        PER_TEST.setdefault(test, {"tried": 0, "refused": 0, "correct": 0, "violations": 0})

    def add(self, kind: str, example: str):
        COUNTS["violations"] += 1
        PER_TEST[self.test]["violations"] += 1
        n, old = self.kinds.get(kind, (0, None))
        if old is None or len(example) < len(old):
            old = example
        self.kinds[kind] = (n + 1, old)

    def count(self, what: str):
        COUNTS[what] += 1
        PER_TEST[self.test][what] += 1

    def check(self):
        if self.kinds:
            lines = [f"{len(self.kinds)} kinds of violation in {self.test}:"]
            for kind, (n, ex) in sorted(self.kinds.items()):
                lines.append(f"- [{n}x] {kind}\n    shortest example: {ex}")
            pytest.fail("\n".join(lines), pytrace=False)


# --- the example: draws with a record of what is unusual -----------------------------------
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 1e-45, -1e-45, 1e-40, 5e-324, 1e30, -1e30, 3.4e38, 6.5e4]


class Example:
    """One fuzz example: draws from hypothesis ``data`` and remembers, for the report,
    a compact description of every ingredient and which ingredients are bad."""

    def __init__(self, col: Collector, data):
        self.col = col
        self.data = data
        self.desc: list[str] = []
        self.bad: list[str] = []
        # about half the examples have clean arrays and scalars (so that the answers,
        # not only the refusals, get checked); the rest mix in bad ingredients
        self.clean = data.draw(st.integers(0, 99)) < 45

    # plain draws -------------------------------------------------------------------
    def draw(self, strategy, label=None):
        v = self.data.draw(strategy)
        if label is not None:
            self.desc.append(f"{label}={v!r}")
        return v

    def choice(self, label, options, bad=()):
        """One of ``options`` (duplicates weight the draw); a value in ``bad`` is a bad
        ingredient."""
        v = self.data.draw(st.sampled_from(options))
        isbad = any(v is b or (type(v) is type(b) and _eq(v, b)) for b in bad)
        if (v is not None and v is not False) or isbad:
            self.desc.append(f"{label}={_short(v)}")
        if isbad:
            self.bad.append(f"{label}={v!r}")
        return v

    def flag(self, label, p_true=0.2):
        v = self.data.draw(st.integers(0, 99)) < p_true * 100
        if v:
            self.desc.append(label)
        return v

    def dim(self, label, lo=1, hi=5):
        v = self.data.draw(st.integers(lo, hi))
        self.desc.append(f"{label}={v}")
        return v

    def seed(self):
        return self.data.draw(st.integers(0, 2 ** 32 - 1))

    # scalars --------------------------------------------------------------------------
    def scalar(self, label, good=None, p_bad=0.3, lo=-3.0, hi=3.0):
        """A real scalar: mostly a plain float (or ``good``), sometimes a hostile value."""
        if self.clean or self.data.draw(st.integers(0, 99)) >= p_bad * 100:
            v = good if good is not None else self.data.draw(
                st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=32))
            self.desc.append(f"{label}={v!r}")
            return v
        v = self.data.draw(st.sampled_from(BAD_SCALARS))
        v = v() if callable(v) and not isinstance(v, type) else v
        self.desc.append(f"{label}={_short(v)}")
        self.bad.append(f"{label}={_short(v)}")
        return v

    # arrays -----------------------------------------------------------------------------
    def array(self, label, shape, *, p_bad=0.35, kinds=None, lo=-2.0, hi=2.0, special_ok=True):
        """An array of ``shape``, usually float32 C-contiguous; with probability ``p_bad``
        one or more of: another dtype, another shape, a non-contiguous / reversed /
        transposed / read-only layout, special values, a list, a non-array."""
        d = self.data
        rng = np.random.default_rng(self.seed())
        aspects = []
        dtype = np.float32
        layout = "C"
        specials = []
        bad = not self.clean and d.draw(st.integers(0, 99)) < p_bad * 100
        if bad:
            which = d.draw(st.sets(st.sampled_from(kinds or ARRAY_ASPECTS), min_size=1, max_size=2))
        else:
            which = set()
        if d.draw(st.integers(0, 3)) == 0:
            dtype = np.float64
        if "dtype" in which:
            dtype = d.draw(st.sampled_from(BAD_DTYPES))
            aspects.append(f"dtype={np.dtype(dtype).name}")
        if "shape" in which:
            shape = d.draw(st.sampled_from(_shape_mutations(shape)))
            aspects.append(f"shape={shape}")
        if "layout" in which:
            layout = d.draw(st.sampled_from(["F", "reversed", "strided", "readonly", "transposed-view"]))
            aspects.append(layout)
        vals = rng.uniform(lo, hi, size=shape)
        if "special" in which and special_ok and vals.size:
            k = d.draw(st.integers(1, min(3, vals.size)))
            for _ in range(k):
                i = d.draw(st.integers(0, vals.size - 1))
                s = d.draw(st.sampled_from(SPECIAL_FLOATS))
                vals.reshape(-1)[i] = s
                specials.append((i, s))
            aspects.append(f"specials={specials}")
        if "container" in which:
            kind = d.draw(st.sampled_from(["list", "None", "str", "scalar", "0-d", "ragged", "dict"]))
            aspects.append(kind)
            self.desc.append(f"{label}:{kind}")
            self.bad.append(f"{label}:{kind}")
            return {"list": lambda: vals.astype(np.float32).tolist(), "None": lambda: None,
                    "str": lambda: "1.0", "scalar": lambda: 1.5, "0-d": lambda: np.float32(1.5),
                    "ragged": lambda: [[1.0, 2.0], [3.0]], "dict": lambda: {"a": 1}}[kind]()
        a = _cast(vals, dtype)
        a = _layout(a, layout)
        text = f"{label}:{np.dtype(a.dtype).name}{tuple(a.shape)}" + (f"[{','.join(aspects)}]" if aspects else "")
        self.desc.append(text)
        if aspects:
            self.bad.append(text)
        return a

    def describe(self) -> str:
        return "; ".join(self.desc)

    # the property --------------------------------------------------------------------------
    def call(self, fn, *, inputs=(), allowed_modified=(), expect=None, must_refuse=None):
        """Run ``fn()`` under the property.

        inputs : {name: object} passed in (arrays, lists, NF4Tensors...) that must
            not change, except ``allowed_modified`` (out= buffers, in-place targets),
            which are compared only when the call is refused.
        expect : called with the result of a call that was not refused; raises
            :class:`Violation` if it is wrong.
        must_refuse : a reason string when the inputs are such that only a refusal is
            right (then an answer is a violation).
        Returns ("refused", exc) or ("ok", result), or ("violation", None).
        """
        col = self.col
        col.count("tried")
        if self.bad:
            BAD_KEYS.add(self.col.test + "|" + self.describe())
        inputs = dict(inputs)
        allowed_modified = dict(allowed_modified)
        snap = snapshot(inputs)
        snap_mod = snapshot(allowed_modified)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with np.errstate(all="ignore"):
                    res = fn()
        except NumloraError as e:
            if not str(e).strip():
                self._violation(f"{type(e).__name__} with an empty message")
                return "violation", None
            changed = compare(snap, inputs) or compare(snap_mod, allowed_modified)
            if changed:
                self._violation(f"refused ({type(e).__name__}) but modified an input: {changed}")
                return "violation", None
            col.count("refused")
            return "refused", e
        except (MemoryError, RecursionError) as e:
            self._violation(f"{type(e).__name__} leaked", str(e)[:120])
            return "violation", None
        except Violation as e:
            self._violation(e.kind, e.detail)
            return "violation", None
        except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
            self._violation(f"{type(e).__module__}.{type(e).__name__} leaked (not a NumloraError)", str(e)[:160])
            return "violation", None
        changed = compare(snap, inputs)
        if changed:
            self._violation(f"modified an input: {changed}")
            return "violation", None
        if must_refuse:
            self._violation(f"accepted, should refuse: {must_refuse}")
            return "violation", None
        if expect is not None:
            try:
                with np.errstate(all="ignore"):
                    expect(res)
            except Violation as e:
                self._violation(e.kind, e.detail)
                return "violation", None
        col.count("correct")
        return "ok", res

    def _violation(self, kind, detail=""):
        ex = self.describe()
        if detail:
            ex = f"{ex} || {detail}"
        self.col.add(kind, ex)


ARRAY_ASPECTS = ["dtype", "shape", "layout", "special", "special", "layout", "container"]
BAD_DTYPES = [np.float16, np.int64, np.int32, np.uint8, np.bool_, object, np.complex64, np.complex128,
              np.uint64]


def _huge_int():
    return 10 ** 400


BAD_SCALARS = [math.nan, math.inf, -math.inf, 1e39, -1e39, 3.4e38, 1e308, 1e-45, 5e-324, -0.0, 0.0, 0,
               2 ** 64 - 1, -(2 ** 63), 10 ** 400, np.uint64(2 ** 64 - 1), np.float32("nan"), np.float64(1e39),
               np.float16(2.0), np.int8(-3), True, False, None, "1.0", [1.0], (1.0,), 1 + 2j, np.complex64(1),
               np.array(1.0), np.array([1.0]), object()]


def _eq(a, b):
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False


def _short(v):
    r = repr(v)
    return r if len(r) < 40 else r[:37] + "..."


def _cast(vals, dtype):
    if dtype is object:
        out = np.empty(vals.shape, object)
        for i, x in enumerate(vals.reshape(-1)):
            out.reshape(-1)[i] = float(x)
        return out
    dt = np.dtype(dtype)
    if dt.kind in "iu":
        with np.errstate(invalid="ignore"):
            return np.nan_to_num(np.round(vals * 3), nan=0, posinf=0, neginf=0).clip(
                np.iinfo(dt).min, np.iinfo(dt).max).astype(dt)
    if dt.kind == "b":
        return vals > 0
    if dt.kind == "c":
        return (vals + 0.5j).astype(dt)
    with np.errstate(over="ignore", invalid="ignore"):
        return vals.astype(dt)


def _layout(a, layout):
    if layout == "C" or a.ndim == 0:
        return np.ascontiguousarray(a)
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "reversed":
        big = np.ascontiguousarray(a[(slice(None, None, -1),) * a.ndim])
        return big[(slice(None, None, -1),) * a.ndim]
    if layout == "strided":
        big = np.zeros(tuple(2 * s + 1 for s in a.shape), a.dtype)
        view = big[(slice(1, None, 2),) * a.ndim]
        view[...] = a
        return view
    if layout == "readonly":
        b = np.array(a, copy=True)
        b.flags.writeable = False
        return b
    if layout == "transposed-view":
        return np.ascontiguousarray(a.T).T
    raise AssertionError(layout)


def _shape_mutations(shape):
    shape = tuple(shape)
    out = [shape + (1,), (2,) + shape, tuple(s + 1 for s in shape), ()]
    if len(shape) == 2:
        out += [shape[::-1], (shape[0],), (shape[0], 0), (0, shape[1])]
    if len(shape) == 1:
        out += [(shape[0], 1), (0,)]
    return [s for s in out if s != shape] or [shape + (1,)]


# --- snapshots: inputs before and after -------------------------------------------------------------
def snapshot(objs: dict):
    return {k: _snap(o) for k, o in objs.items()}


def _snap(o):
    if isinstance(o, np.ndarray):
        if o.dtype == object:
            return ("obj", o.shape, [repr(x) for x in o.reshape(-1).tolist()])
        return ("arr", o.shape, o.dtype.str, np.array(o, copy=True).tobytes())
    if hasattr(o, "packed") and hasattr(o, "absmax"):  # NF4Tensor
        return ("nf4", tuple(_snap(getattr(o, k)) for k in ("packed", "absmax", "absmax2", "code8")),
                repr(getattr(o, "shape", None)), repr(getattr(o, "blocksize", None)))
    if isinstance(o, (list, tuple, dict)):
        try:
            return ("py", repr(copy.deepcopy(o)))
        except Exception:  # noqa: BLE001
            return ("py", repr(o))
    return ("id", repr(o)[:200])


def compare(before, objs):
    """A description of the first object that differs from its snapshot, or ''."""
    for name, o in objs.items():
        if _snap(o) != before[name]:
            return f"{name} changed"
    return ""


# --- comparing with the reference ----------------------------------------------------------------
def as_f64(a):
    """An accepted input as float64 for the reference (complex or text cannot be one)."""
    arr = np.asarray(a)
    if arr.dtype.kind in "cSUV" or arr.dtype == object and any(isinstance(x, complex) for x in arr.reshape(-1)):
        raise Violation("accepted a non-real input", f"dtype {arr.dtype}")
    return arr.astype(np.float64)


def expect_close(what, got, ref, bound, *, f32=True, rtol=3e-5):
    """``got`` (an array) equals ``ref`` (float64) within float32 tolerance, scaled by
    ``bound`` (the same sum over absolute values); where ``ref`` is not finite, ``got``
    must not be finite either; where ``bound`` exceeds the compute type's range nothing
    can be asserted."""
    if not isinstance(got, np.ndarray):
        raise Violation(f"{what}: returned {type(got).__name__}, not an ndarray")
    ref = np.asarray(ref, np.float64)
    bound = np.broadcast_to(np.asarray(bound, np.float64), ref.shape)
    if got.shape != ref.shape:
        raise Violation(f"{what}: wrong shape", f"got {got.shape}, expected {ref.shape}")
    if got.dtype.kind != "f":
        raise Violation(f"{what}: non-float result", f"dtype {got.dtype}")
    g = got.astype(np.float64)
    lim = F32_MAX / 8 if f32 else 1e300
    checkable = np.isfinite(ref) & (bound <= lim)
    tol = rtol * bound + (1e-30 if f32 else 1e-300)
    bad = checkable & ~(np.abs(g - ref) <= tol)
    if bad.any():
        i = np.unravel_index(int(np.flatnonzero(bad)[0]), ref.shape)
        kind = "non-finite result from finite inputs" if not np.isfinite(g[i]) else "wrong numbers"
        raise Violation(f"{what}: {kind}", f"at {tuple(int(j) for j in i)}: got {g[i]!r}, reference {ref[i]!r} "
                                           f"(tolerance {tol[i]:.3g}); {int(bad.sum())} of {ref.size} elements")
    nonfin = ~np.isfinite(ref) & np.isfinite(g)
    if nonfin.any():
        i = np.unravel_index(int(np.flatnonzero(nonfin)[0]), ref.shape)
        raise Violation(f"{what}: finite result where the reference is not",
                        f"at {tuple(int(j) for j in i)}: got {g[i]!r}, reference {ref[i]!r}")


def scalar_value(v):
    """The real value of an accepted scalar as a Python float, or None when it is not a
    real scalar (then accepting it is a violation)."""
    import numbers

    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, numbers.Real):
        try:
            return float(v)
        except (OverflowError, ValueError):
            return math.inf
    if isinstance(v, np.ndarray) and v.size == 1 and v.dtype.kind in "fiu":
        return float(v.reshape(-1)[0])
    return None


def scalar_must_refuse(name, v, *, positive=False, f32=True):
    """Why scalar ``v`` must be refused under the one rule (a real number, not a bool,
    finite in float32), or None."""
    import numbers

    if isinstance(v, (bool, np.bool_)):
        return f"{name} is a bool"
    if isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype.kind in "fiu":
        v = v[()]
    if not isinstance(v, numbers.Real):
        return f"{name} is a {type(v).__name__}"
    x = scalar_value(v)
    if x is None or not math.isfinite(x):
        return f"{name}={_short(v)} is not finite"
    if f32 and abs(x) > F32_MAX:
        return f"{name}={_short(v)} is not finite in float32"
    if positive and not x > 0:
        return f"{name}={_short(v)} is not > 0"
    return None


# --- session summary ----------------------------------------------------------------------------------
def summary_text() -> str:
    lines = [f"fuzz suite: tried {COUNTS['tried']}, refused clearly {COUNTS['refused']}, answered correctly "
             f"{COUNTS['correct']}, violations {COUNTS['violations']}; distinct bad inputs {len(BAD_KEYS)}"]
    for name, c in PER_TEST.items():
        lines.append(f"  {name:42s} tried {c['tried']:5d} refused {c['refused']:5d} correct {c['correct']:5d} "
                     f"violations {c['violations']:4d}")
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def fuzz_summary(tmp_path_factory):
    """Print the running totals after each fuzz module and write them to
    ``<pytest basetemp>/fuzz_counts.json``."""
    yield
    path = tmp_path_factory.getbasetemp() / "fuzz_counts.json"
    path.write_text(json.dumps({"totals": COUNTS, "distinct_bad_inputs": len(BAD_KEYS), "per_test": PER_TEST},
                               indent=1))
    print("\n" + summary_text() + f"\n(counts written to {path})")


@pytest.fixture(autouse=True)
def fuzz_guard():
    """A hang in a kernel cannot be interrupted from Python: dump the stacks and exit
    after 300 s of one test instead of blocking forever; bound the address space so
    a size read from a hostile input becomes a MemoryError, not an OOM kill."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = 24 << 30
    if soft == resource.RLIM_INFINITY or soft > limit:
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        except (ValueError, OSError):
            pass
    faulthandler.dump_traceback_later(300, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        try:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        except (ValueError, OSError):
            pass


@contextmanager
def collecting(name):
    col = Collector(name)
    yield col
    col.check()
