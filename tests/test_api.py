"""Public API semantics that hold on every backend: shapes, dtypes, layouts, no mutation."""
import numpy as np
import pytest

import fastattn
from fastattn import reference

sdpa = fastattn.scaled_dot_product_attention


def qkv(rng, lead=(2, 3), L=9, S=11, E=8, Ev=8, dtype=np.float32):
    return (rng.standard_normal((*lead, L, E)).astype(dtype),
            rng.standard_normal((*lead, S, E)).astype(dtype),
            rng.standard_normal((*lead, S, Ev)).astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_in_is_dtype_out(rng, backend, dtype):
    q, k, v = qkv(rng, dtype=dtype)
    out, lse = sdpa(q, k, v, return_lse=True, backend=backend)
    assert out.dtype == dtype and lse.dtype == dtype
    assert fastattn.attention_weights(q, k, backend=backend).dtype == dtype
    assert fastattn.softmax(q, backend=backend).dtype == dtype
    assert fastattn.similarity(q, k, backend=backend).dtype == dtype


def test_float16_is_computed_in_float32_and_returned_as_float16(rng, backend):
    q, k, v = qkv(rng, dtype=np.float16)
    out = sdpa(q, k, v, backend=backend)
    assert out.dtype == np.float16
    in32 = sdpa(*(a.astype(np.float32) for a in (q, k, v)), backend=backend)
    # the float32 result rounded once to float16
    np.testing.assert_array_equal(out, in32.astype(np.float16))
    w = fastattn.attention_weights(q, k, backend=backend)
    assert w.dtype == np.float16
    assert fastattn.softmax(q, backend=backend).dtype == np.float16


@pytest.mark.parametrize("lead", [(), (3,), (2, 3), (2, 1, 3), (1, 2, 1, 2)])
def test_any_number_of_leading_dims(rng, backend, lead):
    q, k, v = qkv(rng, lead=lead, L=5, S=7, E=4, Ev=6)
    out, lse = sdpa(q, k, v, return_lse=True, backend=backend)
    assert out.shape == (*lead, 5, 6) and lse.shape == (*lead, 5)
    assert fastattn.attention_weights(q, k, backend=backend).shape == (*lead, 5, 7)
    exact = reference.scaled_dot_product_attention(*(a.astype(np.float64) for a in (q, k, v)))
    np.testing.assert_allclose(out, exact, atol=1e-5)


def test_inputs_are_never_written_to(rng, backend):
    q, k, v = qkv(rng)
    mask = rng.random((9, 11)) > 0.3
    float_mask = np.where(mask, 0.5, -np.inf).astype(np.float32)
    copies = [a.copy() for a in (q, k, v, mask, float_mask)]
    for m in (mask, float_mask):
        sdpa(q, k, v, m, is_causal=True, return_lse=True, backend=backend)
        sdpa(q, k, v, m, similarity="cosine", backend=backend)
        fastattn.attention_weights(q, k, m, backend=backend)
    fastattn.softmax(q, axis=1, mask=mask[0, :8], backend=backend)
    fastattn.similarity(q, k, "cosine", backend=backend)
    for before, after in zip(copies, (q, k, v, mask, float_mask)):
        np.testing.assert_array_equal(before, after)


def test_read_only_inputs_work(rng, backend):
    q, k, v = qkv(rng)
    expected = sdpa(q, k, v, backend=backend)
    for a in (q, k, v):
        a.flags.writeable = False
    np.testing.assert_array_equal(sdpa(q, k, v, backend=backend), expected)


def test_transposed_strided_and_fortran_inputs_equal_contiguous_copies(rng, backend):
    base = rng.standard_normal((3, 20, 2, 16)).astype(np.float32)
    q = base[:, ::2, 0, :8]                      # strided view
    k = np.swapaxes(base[:, :8, 1, :10], -1, -2)  # transposed: (3, 10, 8)
    v = np.asfortranarray(rng.standard_normal((3, 10, 5)).astype(np.float32))
    got = sdpa(q, k, v, is_causal=True, backend=backend)
    expected = sdpa(*(np.ascontiguousarray(a) for a in (q, k, v)), is_causal=True, backend=backend)
    np.testing.assert_array_equal(got, expected)


def test_empty_query_sequence_gives_empty_output(rng, backend):
    q, k, v = qkv(rng, L=0)
    out, lse = sdpa(q, k, v, return_lse=True, backend=backend)
    assert out.shape == (2, 3, 0, 8) and lse.shape == (2, 3, 0)
    assert fastattn.attention_weights(q, k, backend=backend).shape == (2, 3, 0, 11)


def test_empty_key_sequence_gives_zeros_and_minus_inf_lse(rng, backend):
    q, k, v = qkv(rng, S=0)
    out, lse = sdpa(q, k, v, return_lse=True, backend=backend)
    assert out.shape == (2, 3, 9, 8) and (out == 0).all() and (lse == -np.inf).all()


def test_array_likes_are_accepted(backend):
    out = sdpa([[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]], [[10.0], [20.0]], scale=1.0, backend=backend)
    w0 = np.e / (np.e + 1)
    np.testing.assert_allclose(out, [[10 * w0 + 20 * (1 - w0)]])


def test_softmax_axis_and_mask_broadcast(rng, backend):
    x = rng.standard_normal((3, 4, 5))
    mask = rng.random((4, 1)) > 0.4
    for axis in (0, 1, 2, -1):
        m = np.broadcast_to(mask, (4, 5)) if axis in (2, -1) else mask
        got = fastattn.softmax(x, axis=axis, mask=m, backend=backend)
        np.testing.assert_allclose(got, reference.softmax(x, axis, mask=m), atol=1e-14)


def test_softmax_nan_row_and_fully_masked_row(backend):
    x = np.array([[1.0, np.nan, 2.0], [1.0, 2.0, 3.0], [-np.inf, -np.inf, -np.inf]])
    w = fastattn.softmax(x, mask=np.array([[True], [False], [True]]), backend=backend)
    assert np.isnan(w[0]).all()
    assert (w[1] == 0).all() and (w[2] == 0).all()


def test_similarity_broadcasts_leading_dims(rng, backend):
    a = rng.standard_normal((2, 1, 4, 3))
    b = rng.standard_normal((5, 6, 3))
    got = fastattn.similarity(a, b, "scaled_dot", backend=backend)
    assert got.shape == (2, 5, 4, 6)
    np.testing.assert_allclose(got, (a @ np.swapaxes(b, -1, -2)) / np.sqrt(3), atol=1e-12)


def test_backends_lists_what_is_usable_here():
    usable = fastattn.backends()
    assert "numpy" in usable and "numba" in usable
    assert set(usable) <= {"numpy", "numba", "cuda"}
