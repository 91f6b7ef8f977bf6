"""numlora's NF4 against bitsandbytes itself (skipped when torch / bitsandbytes are absent)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[test,peers]'")
bnbf = pytest.importorskip("bitsandbytes.functional", reason="needs bitsandbytes: pip install -e '.[test,peers]'")

import numlora as nl  # noqa: E402

from reference import MID_REF  # noqa: E402


def _bnb(w, bs, dq=False):
    q, st = bnbf.quantize_4bit(torch.from_numpy(np.ascontiguousarray(w)), blocksize=bs, quant_type="nf4",
                               compress_statistics=dq)
    return q, st


def _adversarial(rng, n):
    w = (rng.standard_normal(n) * 0.05).astype(np.float32)
    w[: n // 8] = 0.0  # zero blocks
    w[n // 4: n // 4 + 64] = 1e-40  # subnormals
    w[n // 2: n // 2 + 15] = MID_REF * np.float32(0.7)
    w[n // 2 + 15] = 0.7  # the block's absmax: scaled values land on midpoints
    w[-3:] = [1e30, -1e30, 3.0]
    return w


@pytest.mark.parametrize("bs", [32, 64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("kind", ["normal", "adversarial", "odd"])
def test_packed_and_absmax_equal_bitsandbytes(rng, bs, kind):
    n = {"normal": 4096 * 9, "adversarial": 4096 * 3 + 70, "odd": 4096 + 91}[kind]
    w = _adversarial(rng, n) if kind == "adversarial" else rng.standard_normal(n).astype(np.float32)
    t = nl.quantize_nf4(w, bs)
    q, st = _bnb(w, bs)
    assert q.shape == ((n + 1) // 2, 1)
    assert np.array_equal(t.packed, q.numpy().reshape(-1))
    assert np.array_equal(t.absmax.view(np.uint32), st.absmax.numpy().view(np.uint32))
    ours = nl.dequantize_nf4(t)
    theirs = bnbf.dequantize_4bit(q, st).numpy().reshape(-1)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_codebook_and_code8_equal_bitsandbytes():
    code = bnbf.get_4bit_type("nf4", device="cpu").numpy()
    assert np.array_equal(nl.NF4_CODE.view(np.uint32), code.astype(np.float32).view(np.uint32))
    dyn = bnbf.create_dynamic_map(signed=True).numpy().astype(np.float32)
    assert np.array_equal(nl.CODE8.view(np.uint32), dyn.view(np.uint32))


def test_double_quant_decodes_like_bitsandbytes(rng):
    w = (rng.standard_normal((512, 1024)) * 0.02).astype(np.float32)
    t = nl.quantize_nf4(w, 64, double_quant=True)
    q, st = _bnb(w, 64, dq=True)
    assert np.array_equal(t.packed, q.numpy().reshape(-1))
    # 8-bit codes: ours are exactly nearest, theirs go through a lookup table, so a few
    # in a thousand differ by one step, and ours are never further from the true absmax
    true_absmax = nl.quantize_nf4(w, 64).absmax
    theirs_q8 = st.absmax.numpy()
    diff = np.abs(t.absmax.astype(int) - theirs_q8.astype(int))
    assert diff.max() <= 1 and np.mean(diff) < 0.01
    theirs_scales = bnbf.dequantize_blockwise(st.absmax, st.state2).numpy() + st.offset.item()
    assert np.all(np.abs(t.scales - true_absmax) <= np.abs(theirs_scales - true_absmax) + 1e-6 * true_absmax)
    ours = t.dequantize()
    # each side decodes the other's 8-bit codes to the same values
    st.absmax = torch.from_numpy(t.absmax.copy())
    st.state2.absmax = torch.from_numpy(t.absmax2.copy())
    st.offset = torch.tensor(float(t.offset), dtype=torch.float32)
    cross = bnbf.dequantize_4bit(q, st).numpy()
    assert np.allclose(cross, ours, rtol=1e-6, atol=1e-9)
