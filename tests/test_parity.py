"""Every backend against the float64 reference, over the cases the fused kernel must get right.

Lengths are chosen not to be multiples of the numba kernel's blocks (256 or 512 queries, 512 keys:
``fastattn._numba``) or tiles, so partial blocks, several key blocks and the causal diagonal block
are all exercised.
"""
import numpy as np
import pytest

import fastattn
from fastattn import reference

from conftest import assert_matches_reference

sdpa = fastattn.scaled_dot_product_attention


def make(rng, shape_q, shape_k, Ev=None, dtype=np.float32, scale=1.0):
    Ev = shape_k[-1] if Ev is None else Ev
    q = (scale * rng.standard_normal(shape_q)).astype(dtype)
    k = (scale * rng.standard_normal(shape_k)).astype(dtype)
    v = rng.standard_normal((*shape_k[:-1], Ev)).astype(dtype)
    return q, k, v


def check_sdpa(backend, q, k, v, mask=None, **kw):
    got = sdpa(q, k, v, mask, return_lse=True, backend=backend, **kw)
    assert_matches_reference(got, reference.scaled_dot_product_attention, q, k, v, mask,
                             return_lse=True, **kw)


@pytest.mark.parametrize("L, S", [(1, 1), (7, 7), (267, 267), (514, 267), (1, 1030), (1030, 514)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_that_are_not_block_multiples(rng, backend, L, S, causal):
    q, k, v = make(rng, (2, L, 32), (2, S, 32))
    check_sdpa(backend, q, k, v, is_causal=causal)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_float32_and_float64(rng, backend, dtype, causal):
    # more than one 512-key block, and with causal queries past the first one too
    q, k, v = make(rng, (2, 2, 560, 64), (2, 2, 530, 64), dtype=dtype)
    check_sdpa(backend, q, k, v, is_causal=causal)


MASK_SHAPES = [(300,), (1, 300), (130, 1), (130, 300), (3, 130, 300), (2, 1, 130, 300),
               (2, 3, 130, 300), (2, 1, 1, 300), (1, 3, 1, 1), (2, 3, 1, 300)]


@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_every_mask_broadcast_shape(rng, backend, mask_shape, kind):
    q, k, v = make(rng, (2, 3, 130, 16), (2, 3, 300, 16))
    keep = rng.random(mask_shape) > 0.3
    mask = keep if kind == "bool" else np.where(keep, rng.standard_normal(mask_shape), -np.inf).astype(np.float32)
    check_sdpa(backend, q, k, v, mask)
    check_sdpa(backend, q, k, v, mask, is_causal=True)


def test_float_mask_values_are_added(rng, backend):
    q, k, v = make(rng, (2, 40, 16), (2, 50, 16))
    mask = (3 * rng.standard_normal((40, 50))).astype(np.float32)
    check_sdpa(backend, q, k, v, mask)


def test_fully_masked_rows_give_zeros_and_minus_inf_lse(rng, backend):
    q, k, v = make(rng, (2, 270, 16), (2, 600, 16))
    mask = rng.random((270, 600)) > 0.5
    mask[[0, 5, 269]] = False
    out, lse = sdpa(q, k, v, mask, return_lse=True, backend=backend)
    assert (out[:, [0, 5, 269]] == 0).all() and (lse[:, [0, 5, 269]] == -np.inf).all()
    check_sdpa(backend, q, k, v, mask)
    float_mask = np.where(mask, 0, -np.inf).astype(np.float32)
    check_sdpa(backend, q, k, v, float_mask)


def test_masked_band_covering_whole_key_blocks(rng, backend):
    # Keys 0..599 masked for every query: the first key blocks are entirely masked, so the
    # running max is still -inf when they are folded in (the exp(-inf - -inf) trap).
    q, k, v = make(rng, (2, 200, 16), (2, 1030, 16))
    mask = np.ones(1030, bool)
    mask[:600] = False
    check_sdpa(backend, q, k, v, mask)
    check_sdpa(backend, q, k, v, np.where(mask, 0, -np.inf))
    mask[700:] = False  # and a masked block after the kept keys
    check_sdpa(backend, q, k, v, mask, is_causal=False)


@pytest.mark.parametrize("L, S", [(300, 700), (700, 300), (267, 267)])
def test_causal_with_mask(rng, backend, L, S):
    q, k, v = make(rng, (2, L, 16), (2, S, 16))
    mask = rng.random((L, S)) > 0.2
    check_sdpa(backend, q, k, v, mask, is_causal=True)


@pytest.mark.parametrize("hq, hkv", [(4, 2), (6, 1), (3, 3)])
def test_gqa(rng, backend, hq, hkv):
    q, k, v = make(rng, (2, hq, 140, 16), (2, hkv, 300, 16), Ev=24)
    mask = rng.random((hq, 140, 300)) > 0.2
    check_sdpa(backend, q, k, v, mask, enable_gqa=True)
    check_sdpa(backend, q, k, v, enable_gqa=True, is_causal=True)


def test_value_dim_differs_from_key_dim(rng, backend):
    q, k, v = make(rng, (3, 270, 16), (3, 300, 16), Ev=40)
    check_sdpa(backend, q, k, v, is_causal=True)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_cosine_similarity(rng, backend, scale):
    q, k, v = make(rng, (2, 270, 16), (2, 300, 16))
    q[0, 3] = 0.0  # zero vectors have similarity 0, never NaN
    k[1, 7] = 0.0
    check_sdpa(backend, q, k, v, similarity="cosine", scale=scale)


def test_custom_scale(rng, backend):
    q, k, v = make(rng, (2, 100, 16), (2, 300, 16))
    check_sdpa(backend, q, k, v, scale=0.05, is_causal=True)


@pytest.mark.parametrize("lead", [(), (2,), (2, 3), (2, 1, 3)])
def test_two_to_five_dims(rng, backend, lead):
    q, k, v = make(rng, (*lead, 130, 16), (*lead, 270, 16))
    check_sdpa(backend, q, k, v, is_causal=True)


def test_logits_of_1e4_stay_finite(rng, backend):
    q, k, v = make(rng, (2, 270, 16), (2, 300, 16), scale=1.0)
    q *= np.float32(1e4 / np.abs(q).max())
    out, lse = sdpa(q, k, v, scale=1.0, return_lse=True, backend=backend)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    check_sdpa(backend, q, k, v, scale=1.0)


def test_attention_weights(rng, backend):
    q, k, _ = make(rng, (2, 3, 140, 16), (2, 1, 300, 16))
    mask = rng.random((140, 300)) > 0.3
    mask[4] = False
    for kw in ({}, {"is_causal": True}, {"similarity": "cosine"}):
        got = fastattn.attention_weights(q, k, mask, enable_gqa=True, backend=backend, **kw)
        assert_matches_reference(got, reference.attention_weights, q, k, mask, enable_gqa=True, **kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax(rng, backend, dtype):
    x = (10 * rng.standard_normal((3, 70, 300))).astype(dtype)
    mask = rng.random((70, 300)) > 0.2
    mask[3] = False
    for axis in (-1, 1):
        got = fastattn.softmax(x, axis=axis, mask=mask, backend=backend)
        assert_matches_reference(got, reference.softmax, x, axis=axis, mask=mask)


@pytest.mark.parametrize("kind", ["dot", "scaled_dot", "cosine"])
def test_similarity(rng, backend, kind):
    a = rng.standard_normal((2, 270, 16)).astype(np.float32)
    b = rng.standard_normal((2, 300, 16)).astype(np.float32)
    a[0, 0] = 0
    got = fastattn.similarity(a, b, kind, backend=backend)
    assert_matches_reference(got, reference.similarity, a, b, kind=kind)
