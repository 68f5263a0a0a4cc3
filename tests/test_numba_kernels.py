"""Properties of the numba backend beyond parity: layouts, threads, concurrency, memory."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastattn

pytestmark = pytest.mark.skipif("numba" not in fastattn.backends(), reason="numba not installed")

sdpa = fastattn.scaled_dot_product_attention


def test_strided_inputs_never_read_the_gaps(rng):
    # Views into arrays whose unused entries are NaN: a kernel reading outside the view
    # would turn the output NaN.
    def nan_padded_view(shape):
        big = np.full((shape[0], shape[1] * 2, shape[2] + 3), np.nan, np.float32)
        big[:, ::2, :shape[2]] = rng.standard_normal(shape)
        return big[:, ::2, :shape[2]]
    q, k, v = nan_padded_view((2, 270, 16)), nan_padded_view((2, 300, 16)), nan_padded_view((2, 300, 16))
    mask_big = np.full((270, 600), np.nan, np.float32)
    mask_big[:, ::2] = 0.0
    mask = mask_big[:, ::2]
    for kw in ({}, {"is_causal": True}, {"attn_mask": mask}, {"similarity": "cosine"}):
        got = sdpa(q, k, v, backend="numba", **kw)
        expected = sdpa(*(np.ascontiguousarray(a) for a in (q, k, v)), backend="numba",
                        **{key: (np.ascontiguousarray(val) if key == "attn_mask" else val)
                           for key, val in kw.items()})
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got, expected)


def test_kept_scratch_is_safe_across_sizes_and_dtypes(rng):
    # The numba backend keeps its scratch for k and v in tiles between calls: a call after a
    # larger one reads a buffer full of the old call's keys and values (of another dtype and head
    # size), which must not leak in, in particular into the zero columns that pad v to whole tiles.
    from conftest import assert_matches_reference
    from fastattn import reference
    cases = [((2, 4, 700, 64), 64, np.float32), ((1, 3, 37, 20), 13, np.float64),
             ((2, 2, 130, 8), 24, np.float32), ((1, 1, 5, 3), 1, np.float64),
             ((3, 2, 300, 40), 17, np.float32), ((1, 2, 64, 16), 30, np.float32)]
    for shape, value_dim, dtype in cases:
        q, k = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
        v = rng.standard_normal(shape[:-1] + (value_dim,)).astype(dtype)
        for causal in (False, True):
            got = sdpa(q, k, v, is_causal=causal, backend="numba")
            assert_matches_reference(got, reference.scaled_dot_product_attention, q, k, v,
                                     is_causal=causal)


def test_scratch_arrays_start_on_cache_lines_and_do_not_overlap():
    from fastattn import _numba
    for shapes, dtype in (([(3, 5, 7), (2, 9)], np.float32), ([(1,), (4, 4), (3,)], np.float64),
                          ([(1000, 33)], np.float32)):
        arrays = _numba._scratch_arrays(shapes, dtype)
        spans = []
        for a, shape in zip(arrays, shapes):
            assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
            assert a.ctypes.data % _numba.ALIGN == 0
            spans.append((a.ctypes.data, a.ctypes.data + a.nbytes))
        spans.sort()
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


def test_one_and_two_threads_give_identical_bits(rng):
    import numba
    q, k, v = (rng.standard_normal((2, 3, 300, 32)).astype(np.float32) for _ in range(3))
    mask = rng.random((300, 300)) > 0.2
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            results.append([sdpa(q, k, v, mask, is_causal=True, return_lse=True, backend="numba"),
                            fastattn.attention_weights(q, k, mask, backend="numba"),
                            fastattn.softmax(q, backend="numba")])
    finally:
        numba.set_num_threads(before)
    (out1, lse1), w1, s1 = results[0]
    (out2, lse2), w2, s2 = results[1]
    for a, b in ((out1, out2), (lse1, lse2), (w1, w2), (s1, s2)):
        np.testing.assert_array_equal(a, b)


def test_calls_from_several_python_threads_match_calls_one_by_one(rng):
    cases = []
    for i in range(6):
        q, k, v = (rng.standard_normal((2, 2, 150 + 10 * i, 16)).astype(np.float32) for _ in range(3))
        cases.append((q, k, v, i % 2 == 0))
    expected = [sdpa(q, k, v, is_causal=c, backend="numba") for q, k, v, c in cases]
    got = [None] * len(cases)
    errors = []

    def work(i):
        try:
            q, k, v, c = cases[i]
            for _ in range(3):
                got[i] = sdpa(q, k, v, is_causal=c, backend="numba")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


MEMORY_CHECK = r"""
import resource, sys, numpy as np, fastattn
rng = np.random.default_rng(0)
L, D, mask_kind = int(sys.argv[1]), 64, sys.argv[2]
warm = [rng.standard_normal((1, 1, 300, D), dtype=np.float32) for _ in range(3)]
masks = {"none": None, "bool": rng.random((L, L)) > 0.5,
         "float": rng.standard_normal((L, L), dtype=np.float32)}
fastattn.scaled_dot_product_attention(*warm, attn_mask=None if masks[mask_kind] is None else masks[mask_kind][:300, :300])
q, k, v = (rng.standard_normal((1, 1, L, D), dtype=np.float32) for _ in range(3))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fastattn.scaled_dot_product_attention(q, k, v, masks[mask_kind])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024)
"""


@pytest.mark.parametrize("L, mask_kind", [(8192, "none"), (4096, "bool"), (4096, "float")])
def test_extra_memory_grows_with_L_not_L_squared(L, mask_kind):
    # One head's score matrix would be 256 MiB at L = 8192 and 64 MiB at L = 4096; a (L, L)
    # mask is read in place, never converted to a float copy (64 MiB) or expanded.
    # Peak RSS growth of one call (after a warm-up call on other data) must stay far below.
    out = subprocess.run([sys.executable, "-c", MEMORY_CHECK, str(L), mask_kind],
                         capture_output=True, text=True, check=True)
    extra_mib = float(out.stdout.split()[-1])
    # the output (2 MiB at most) plus per-item blocks
    assert extra_mib < 12, f"one call grew the peak RSS by {extra_mib:.1f} MiB"


def test_values_with_no_features_still_give_the_lse(rng):
    # Ev = 0: no value tiles at all, yet every key still counts towards the log-sum-exp.
    from fastattn import reference
    q, k = (rng.standard_normal((2, 3, 40, 8)).astype(np.float32) for _ in range(2))
    v = np.zeros((2, 3, 40, 0), np.float32)
    for causal in (False, True):
        out, lse = sdpa(q, k, v, is_causal=causal, return_lse=True, backend="numba")
        _, expected = reference.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                             return_lse=True)
        assert out.shape == (2, 3, 40, 0)
        np.testing.assert_allclose(lse, expected, rtol=1e-6, atol=1e-6)
