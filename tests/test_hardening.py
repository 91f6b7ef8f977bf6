"""Regression tests for issue 12 (never lose data, never answer wrong) on the functional
API and the layers: overlapping ``out=`` buffers, NF4 tensors from strided arrays, bad
shapes and sizes, single-use merge records, scalars finite in float32, and errors that
name the argument, what was expected and what arrived (with a hint for the common
mistakes of issue 16). Every numeric check is against float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest

import numlora as nl
from numlora.errors import NumloraError

from reference import lora_forward_ref, merge_ref, nf4_dequantize_ref


def _f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


# --- NF4Tensor from strided, reversed and list arrays ------------------------------------------


def _strided_copy(a, how):
    """A view holding a's values: reversed (negative stride) or every other element of a
    buffer twice as long."""
    if how == "reversed":
        return np.ascontiguousarray(a[::-1])[::-1]
    buf = np.zeros(2 * a.size, a.dtype)
    buf[::2] = a
    return buf[::2]


@pytest.mark.parametrize("how", ["reversed", "strided"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_tensor_from_strided_arrays(kernel_path, rng, how, double_quant):
    w = rng.standard_normal((24, 128)).astype(np.float32)
    t = nl.quantize_nf4(w, 64, double_quant=double_quant)
    kw = {}
    if double_quant:
        kw = dict(absmax2=_strided_copy(t.absmax2, how), offset=t.offset, code8=_strided_copy(t.code8, how))
    s = nl.NF4Tensor(_strided_copy(t.packed, how), _strided_copy(t.absmax, how), t.shape, 64, **kw)
    assert s.packed.flags.c_contiguous and s.absmax.flags.c_contiguous
    ref = nf4_dequantize_ref(t.packed, t.scales(), 64, w.size).reshape(w.shape)
    np.testing.assert_array_equal(nl.dequantize_nf4(s), ref)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    np.testing.assert_allclose(nl.nf4_matmul(x, s), x.astype(np.float64) @ ref.T.astype(np.float64),
                               rtol=1e-5, atol=1e-4)


def test_nf4_tensor_list_absmax_is_a_clear_error():
    t = nl.quantize_nf4(np.ones(128, np.float32), 64)
    with pytest.raises(nl.DTypeError, match=r"absmax must be a numpy array of float32, got list"):
        nl.NF4Tensor(t.packed, t.absmax.tolist(), t.shape, 64)
    with pytest.raises(nl.DTypeError, match=r"packed must be a numpy array of uint8, got list"):
        nl.NF4Tensor(t.packed.tolist(), t.absmax, t.shape, 64)
    with pytest.raises(nl.DTypeError, match=r"expected absmax with dtype float32, got float64"):
        nl.NF4Tensor(t.packed, t.absmax.astype(np.float64), t.shape, 64)


@pytest.mark.parametrize("shape", [(-2, -64), (-1, 128), (2**40, 2**40), (2**62, 4), (True, 128), (2.0, 64)])
def test_nf4_tensor_refuses_bad_shapes(shape):
    t = nl.quantize_nf4(np.ones(128, np.float32), 64)
    with pytest.raises(NumloraError, match="shape") as info:
        nl.NF4Tensor(t.packed, t.absmax, shape, 64)
    assert isinstance(info.value, (nl.ShapeError, nl.DTypeError))


def test_nf4_tensor_sizes_must_agree_with_shape_and_blocksize():
    t = nl.quantize_nf4(np.ones((4, 64), np.float32), 64)
    with pytest.raises(nl.ShapeError, match=r"expected packed of shape \(128,\).*got \(64,\)"):
        nl.NF4Tensor(np.zeros(64, np.uint8), t.absmax, (4, 64), 64)
    with pytest.raises(nl.ShapeError, match=r"expected absmax of shape \(8,\).*blocksize 32.*got \(4,\)"):
        nl.NF4Tensor(t.packed, t.absmax, (4, 64), 32)
    with pytest.raises(nl.ConfigError, match="offset"):
        nl.NF4Tensor(t.packed, t.absmax, (4, 64), 64, offset=np.float32(0))
