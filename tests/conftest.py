import os

# The CUDA tests run in Numba's CUDA simulator unless the caller chose otherwise. Numba reads
# the variable when it is first imported, so it is set here, before any test module imports it.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import sys

import numpy as np
import pytest

import fastattn
from fastattn import reference

# Every backend usable here meets the same reference. (CUDA has its own simulator tests.)
CPU_BACKENDS = [b for b in ("numpy", "numba") if b in fastattn.backends()]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def quick_thread_switches():
    """For the CUDA simulator's modules: simulated threads wait for each other at every
    syncthreads while the simulator's block manager polls them; with Python's default 5 ms
    switch interval most of the time is spent idle."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    yield
    sys.setswitchinterval(old)


def appended_cache(cache, new, seqlens):
    """The KV cache (B, H, S_max, D) expected after writing ``new`` at each batch's length."""
    expected = cache.copy()
    for b, start in enumerate(seqlens):
        expected[b, :, start:start + new.shape[2]] = new[b]
    return expected


def assert_same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def as64(*arrays):
    return [None if a is None else (a.astype(np.float64) if a.dtype.kind == "f" else a)
            for a in arrays]


def assert_matches_reference(got, reference_fn, *inputs, **kwargs):
    """Judge a result the way FlashAttention's tests do.

    float64: within 1e-10 of the reference. float32/float16: the max error against the float64
    reference is at most 2x the error of the plain NumPy computation in float32, plus 1e-6.
    ``reference_fn(*inputs, **kwargs)`` must return the array compared (or a tuple; each part is
    compared).
    """
    exact = reference_fn(*as64(*inputs), **kwargs)
    got_parts = got if isinstance(got, tuple) else (got,)
    exact_parts = exact if isinstance(exact, tuple) else (exact,)
    dtype = next(a.dtype for a in inputs if a is not None and a.dtype.kind == "f")
    if dtype == np.float64:
        for g, e in zip(got_parts, exact_parts):
            np.testing.assert_allclose(g, e, rtol=0, atol=1e-10, equal_nan=True)
        return
    plain = reference_fn(*[None if a is None else (a.astype(np.float32) if a.dtype.kind == "f" else a)
                           for a in inputs], **kwargs)
    plain_parts = plain if isinstance(plain, tuple) else (plain,)
    for g, e, p in zip(got_parts, exact_parts, plain_parts):
        assert g.shape == e.shape
        g64 = g.astype(np.float64)
        # Same non-finite entries (NaN rows, -inf lse of fully masked rows) in the same places.
        np.testing.assert_array_equal(np.isfinite(g64), np.isfinite(e))
        np.testing.assert_array_equal(g64[~np.isfinite(e)], e[~np.isfinite(e)])
        finite = np.isfinite(e)
        if not finite.any():
            continue
        err = np.max(np.abs(g64[finite] - e[finite]))
        plain_err = np.max(np.abs(p.astype(np.float64)[finite] - e[finite]))
        assert err <= 2 * plain_err + 1e-6, f"error {err:.3g} vs plain float32 error {plain_err:.3g}"
