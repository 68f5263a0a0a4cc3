"""varlen_attention: packed batches of sequences of different lengths against one
scaled_dot_product_attention per sequence, variants, strided input read in place, bad input."""
import numpy as np
import pytest

import fastattn
from fastattn import reference

from conftest import assert_matches_reference


def _packed(rng, lengths_q, lengths_k, Hq, Hkv, E, dtype, Ev=None):
    Ev = E if Ev is None else Ev
    cu_q = np.concatenate([[0], np.cumsum(lengths_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lengths_k)]).astype(np.int64)
    q = rng.standard_normal((cu_q[-1], Hq, E)).astype(dtype)
    k = rng.standard_normal((cu_k[-1], Hkv, E)).astype(dtype)
    v = rng.standard_normal((cu_k[-1], Hkv, Ev)).astype(dtype)
    return q, k, v, cu_q, cu_k


def _reference(cu_q, cu_k, **options):
    def fn(q, k, v):
        return reference.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, **options)
    return fn


LENGTHS = [1, 17, 500, 1030, 3, 64]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("is_causal", [False, True])
def test_varlen_equals_one_sdpa_per_sequence(backend, rng, dtype, is_causal):
    q, k, v, cu_q, cu_k = _packed(rng, LENGTHS, LENGTHS, 8, 2, 64, dtype)
    before = [a.copy() for a in (q, k, v)]
    out, lse = fastattn.varlen_attention(q, k, v, cu_q, cu_k, is_causal=is_causal,
                                         return_lse=True, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (8, q.shape[0])
    assert_matches_reference((out, lse), _reference(cu_q, cu_k, is_causal=is_causal), q, k, v)
    # The reference itself is one plain SDPA per sequence.
    for b in (0, 3):
        s = slice(cu_q[b], cu_q[b + 1])
        want = reference.scaled_dot_product_attention(
            *(np.swapaxes(a[s], 0, 1).astype(np.float64) for a in (q, k, v)),
            is_causal=is_causal, enable_gqa=True)
        np.testing.assert_allclose(np.swapaxes(out[s], 0, 1), want,
                                   atol=1e-10 if dtype == np.float64 else 1e-5)
    for now, then in zip((q, k, v), before):
        np.testing.assert_array_equal(now, then)


@pytest.mark.parametrize("options", [
    dict(is_causal=True, alignment="bottom_right"),
    dict(alignment="bottom_right", window=(30, 10)),
    dict(is_causal=True, window=(100, None), softcap=2.0),
    dict(softcap=1.0, alibi_slopes="heads"),
    dict(is_causal=True, alibi_slopes="rows", scale=0.2),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_varlen_cross_attention_and_variants(backend, rng, dtype, options):
    # Different query and key lengths per sequence (a query longer than its keys too, and an
    # empty sequence), 32/8 heads, Ev != E.
    lengths_q, lengths_k = [5, 300, 0, 40, 1], [700, 120, 9, 40, 33]
    q, k, v, cu_q, cu_k = _packed(rng, lengths_q, lengths_k, 32, 8, 32, dtype, Ev=16)
    options = dict(options)
    if options.get("alibi_slopes") == "heads":
        options["alibi_slopes"] = 2.0 ** -np.arange(1, 33) * 4
    elif options.get("alibi_slopes") == "rows":
        options["alibi_slopes"] = rng.uniform(0, 0.3, (5, 32))
    got = fastattn.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, backend=backend,
                                    **options)
    assert_matches_reference(got, _reference(cu_q, cu_k, **options), q, k, v)


def test_varlen_reads_strided_input_in_place(backend, rng):
    # q, k and v as views of one packed (total, 3, H, E) projection, as a fused QKV layer gives.
    cu = np.array([0, 7, 130, 131], np.int64)
    qkv = rng.standard_normal((131, 3, 4, 32)).astype(np.float32)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    got = fastattn.varlen_attention(q, k, v, cu, cu, is_causal=True, return_lse=True,
                                    backend=backend)
    assert_matches_reference(got, _reference(cu, cu, is_causal=True), q.copy(), k.copy(),
                             v.copy())


def test_varlen_long_sequence_among_short_ones_is_balanced_and_exact(rng):
    # One sequence much longer than the rest: its query blocks are separate work items.
    lengths = [2000, 3, 5, 1, 8]
    q, k, v, cu_q, cu_k = _packed(rng, lengths, lengths, 4, 4, 16, np.float64)
    got = fastattn.varlen_attention(q, k, v, cu_q, cu_k, is_causal=True, return_lse=True,
                                    backend="numba")
    assert_matches_reference(got, _reference(cu_q, cu_k, is_causal=True), q, k, v)


@pytest.mark.parametrize("cu_q, match, error", [
    (np.array([1, 5, 10]), "start at 0", ValueError),
    (np.array([0, 6, 5, 10]), "not decrease", ValueError),
    (np.array([0, 5, 9]), "end at total_q", ValueError),
    (np.array([0, 5, 11]), "end at total_q", ValueError),
    (np.array([0.0, 5.0, 10.0]), "int32 or int64", TypeError),
    (np.array([[0, 5, 10]]), "1-d", ValueError),
    (np.array([0, 10]), "same number of entries", ValueError),
])
def test_varlen_bad_cu_seqlens(rng, cu_q, match, error):
    q, k, v, _, cu_k = _packed(rng, [5, 5], [5, 5], 2, 1, 8, np.float32)
    with pytest.raises(error, match=match):
        fastattn.varlen_attention(q, k, v, cu_q, cu_k)


def test_varlen_bad_shapes(rng):
    q, k, v, cu_q, cu_k = _packed(rng, [5, 5], [5, 5], 3, 2, 8, np.float32)
    with pytest.raises(ValueError, match="multiple"):
        fastattn.varlen_attention(q, k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match="packed"):
        fastattn.varlen_attention(q[None], k, v, cu_q, cu_k)
    with pytest.raises(TypeError, match="same dtype"):
        fastattn.varlen_attention(q[:, :2], k.astype(np.float64), v, cu_q, cu_k)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        fastattn.varlen_attention(q[:, :2], k, v, cu_q, np.array([0, 5, 11]))
