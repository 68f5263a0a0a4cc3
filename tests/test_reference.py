"""The NumPy reference against cases worked by hand and against the properties of attention."""
import math

import numpy as np
import pytest

from fastattn import reference


def test_similarity_kinds_worked_by_hand():
    cherry, orange, phone = [1.0, 4.0], [0.0, 3.0], [3.0, 0.0]
    words = np.array([cherry, orange, phone])
    dot = reference.similarity(words, words, "dot")
    assert dot[0].tolist() == [17.0, 12.0, 3.0]
    np.testing.assert_allclose(reference.similarity(words, words, "scaled_dot"), dot / math.sqrt(2))
    cos = reference.similarity(words, words, "cosine")
    np.testing.assert_allclose(cos[0], [1.0, 12 / (math.sqrt(17) * 3), 3 / (math.sqrt(17) * 3)])
    assert cos[1, 2] == 0.0


def test_cosine_of_a_zero_vector_is_zero_not_nan():
    a = np.array([[0.0, 0.0], [1.0, 0.0]])
    cos = reference.similarity(a, a, "cosine")
    assert np.isfinite(cos).all()
    assert cos[0].tolist() == [0.0, 0.0]


def test_softmax_of_the_worked_coefficients():
    np.testing.assert_allclose(reference.softmax(np.array([1.0, -1.0])),
                               [math.e / (math.e + 1 / math.e), (1 / math.e) / (math.e + 1 / math.e)])
    w = reference.softmax(np.array([1.0, 0.71]))
    assert w.sum() == pytest.approx(1.0)
    assert w[0] == pytest.approx(1 / (1 + math.exp(-0.29)))


def test_softmax_rows_sum_to_one_and_shift_invariant(rng):
    x = rng.standard_normal((4, 5, 6))
    for axis in range(3):
        w = reference.softmax(x, axis)
        np.testing.assert_allclose(w.sum(axis=axis), 1.0)
        np.testing.assert_allclose(reference.softmax(x + 123.0, axis), w, atol=1e-12)


def test_softmax_of_huge_logits_stays_finite():
    w = reference.softmax(np.array([1e4, 1e4 - 1.0, -1e4]))
    assert np.isfinite(w).all()
    np.testing.assert_allclose(w[:2], [1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))])


def test_softmax_masks_and_fully_masked_rows():
    x = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [-np.inf, -np.inf, -np.inf]])
    mask = np.array([[True, False, True], [False, False, False], [True, True, True]])
    w = reference.softmax(x, mask=mask)
    assert w[0, 1] == 0.0
    np.testing.assert_allclose(w[0], [1 / (1 + math.e**2), 0, math.e**2 / (1 + math.e**2)])
    assert w[1].tolist() == [0.0, 0.0, 0.0]
    assert w[2].tolist() == [0.0, 0.0, 0.0]


def test_softmax_nan_poisons_only_its_row():
    x = np.array([[1.0, np.nan], [1.0, 2.0]])
    w = reference.softmax(x)
    assert np.isnan(w[0]).all()
    assert np.isfinite(w[1]).all()


def test_attention_of_one_key_returns_its_value():
    q = np.array([[1.0, 2.0]])
    k = np.array([[3.0, -1.0]])
    v = np.array([[5.0, 6.0, 7.0]])
    out, lse = reference.scaled_dot_product_attention(q, k, v, return_lse=True)
    np.testing.assert_allclose(out, v)
    np.testing.assert_allclose(lse, [(1 * 3 - 2) / math.sqrt(2)])


def test_attention_worked_by_hand():
    q = np.array([[1.0, 0.0]])
    k = np.array([[1.0, 0.0], [0.0, 1.0]])
    v = np.array([[10.0], [20.0]])
    out = reference.scaled_dot_product_attention(q, k, v, scale=1.0)
    w0 = math.e / (math.e + 1)
    np.testing.assert_allclose(out, [[10 * w0 + 20 * (1 - w0)]])


def test_masked_keys_get_exactly_zero_weight(rng):
    q, k = rng.standard_normal((2, 5, 4, 8))
    mask = rng.random((4, 4)) > 0.5
    mask[:, 0] = True
    w = reference.attention_weights(q, k, mask)
    assert (w[..., ~mask] == 0).all()
    np.testing.assert_allclose(w.sum(-1), 1.0)


def test_bool_mask_equals_minus_inf_float_mask(rng):
    q, k, v = rng.standard_normal((3, 2, 6, 4))
    mask = rng.random((6, 6)) > 0.3
    float_mask = np.where(mask, 0.0, -np.inf)
    np.testing.assert_allclose(reference.scaled_dot_product_attention(q, k, v, mask),
                               reference.scaled_dot_product_attention(q, k, v, float_mask))


def test_causal_prefix_does_not_depend_on_later_keys(rng):
    q, k, v = rng.standard_normal((3, 10, 4))
    full = reference.scaled_dot_product_attention(q, k, v, is_causal=True)
    prefix = reference.scaled_dot_product_attention(q[:6], k[:6], v[:6], is_causal=True)
    np.testing.assert_allclose(full[:6], prefix, atol=1e-14)


def test_causal_is_top_left_when_L_differs_from_S(rng):
    q, k = rng.standard_normal((2, 3, 5, 4))
    w = reference.attention_weights(q[:, :3], k, is_causal=True)
    assert (w[:, 0, 1:] == 0).all() and (w[:, 2, 3:] == 0).all() and (w[:, 2, :3] > 0).all()


def test_fully_masked_row_gives_zeros_and_minus_inf_lse(rng):
    q, k, v = rng.standard_normal((3, 4, 6))
    mask = np.ones((4, 4), bool)
    mask[2] = False
    out, lse = reference.scaled_dot_product_attention(q, k, v, mask, return_lse=True)
    assert out[2].tolist() == [0.0] * 6
    assert lse[2] == -np.inf
    assert np.isfinite(lse[[0, 1, 3]]).all()


def test_gqa_equals_repeating_keys_and_values(rng):
    q = rng.standard_normal((2, 6, 5, 4))
    k, v = rng.standard_normal((2, 2, 2, 7, 4))
    grouped = reference.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    repeated = reference.scaled_dot_product_attention(q, np.repeat(k, 3, axis=1),
                                                      np.repeat(v, 3, axis=1))
    np.testing.assert_allclose(grouped, repeated)


def test_lse_is_log_of_sum_of_exp_scores(rng):
    q, k, v = rng.standard_normal((3, 5, 4))
    _, lse = reference.scaled_dot_product_attention(q, k, v, return_lse=True)
    scores = q @ k.T / 2.0
    np.testing.assert_allclose(lse, np.log(np.exp(scores).sum(-1)))


def test_cosine_attention_uses_scale_one_by_default():
    x = np.array([[0.0, 3.0], [2.0, 2.0]])
    w = reference.attention_weights(x[1:], x, similarity="cosine")
    np.testing.assert_allclose(w, [[1 / (1 + math.exp(1 - math.sqrt(0.5))),
                                    1 / (1 + math.exp(math.sqrt(0.5) - 1))]])
