import numpy as np
import pytest

import numlora as nl

from reference import xorshift_stream


@pytest.mark.parametrize("seed", [0, 1, 42, 42 + 32 + 64, 137 + 16 + 32, 2**63 + 12345, 2**64 - 1])
def test_next_f32_matches_pure_python_integers(seed):
    expected, state = xorshift_stream(seed, 300)
    r = nl.XorShift64(seed)
    got = [r.next_f32() for _ in range(300)]
    assert np.array_equal(np.array(got, np.float32).view(np.uint32), np.array(expected, np.float32).view(np.uint32))
    assert r.state == state


@pytest.mark.parametrize("seed", [0, 7, 2**64 - 1])
def test_uniform_kernel_matches_stream_in_row_major_order(seed):
    expected, state = xorshift_stream(seed, 5 * 7 + 11)
    r = nl.XorShift64(seed)
    a = r.uniform((5, 7))
    b = r.uniform(11)
    assert a.shape == (5, 7) and a.dtype == np.float32
    assert np.array_equal(a.reshape(-1).view(np.uint32), np.array(expected[:35], np.float32).view(np.uint32))
    assert np.array_equal(b.view(np.uint32), np.array(expected[35:], np.float32).view(np.uint32))
    assert r.state == state


def test_seed_zero_is_seed_one():
    assert nl.XorShift64(0).uniform(10).tobytes() == nl.XorShift64(1).uniform(10).tobytes()


def test_values_in_range_and_spread():
    v = nl.XorShift64(3).uniform(100_000)
    assert v.min() >= -1.0 and v.max() <= 1.0
    assert abs(float(v.mean())) < 0.01
    assert abs(float(v.std()) - 1 / np.sqrt(3)) < 0.01


def test_mixing_scalar_and_array_draws_continues_one_stream():
    expected, _ = xorshift_stream(99, 6)
    r = nl.XorShift64(99)
    got = [r.next_f32(), *r.uniform(4), r.next_f32()]
    assert np.array_equal(np.array(got, np.float32), np.array(expected, np.float32))


def test_empty_shape():
    r = nl.XorShift64(5)
    assert r.uniform((0, 3)).shape == (0, 3)
    assert r.state == 5


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, "3", None])
def test_bad_seed(bad):
    with pytest.raises(nl.NumloraError):
        nl.XorShift64(bad)
