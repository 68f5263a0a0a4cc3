"""The backward pass: the NumPy reference against central finite differences (and PyTorch's
autograd where installed), every backend against the reference, and the checks of bad input."""
import numpy as np
import pytest

import fastattn
from fastattn import reference

# (name, shapes, options): shapes are (lead, L, S, E, Ev, Hkv or None); masks are built below.
CASES = [
    ("plain", ((2, 2), 5, 7, 4, 4, None), {}),
    ("causal", ((1, 2), 6, 6, 3, 3, None), dict(is_causal=True)),
    ("causal_L<S_top_left", ((1, 2), 4, 7, 3, 3, None), dict(is_causal=True)),
    ("causal_bottom_right", ((1, 2), 4, 7, 3, 3, None),
     dict(is_causal=True, alignment="bottom_right")),
    ("causal_bottom_right_L>S", ((1, 2), 7, 4, 3, 3, None),  # rows 0..2 see no key
     dict(is_causal=True, alignment="bottom_right")),
    ("window", ((1, 2), 7, 9, 3, 3, None), dict(window=(2, 1))),
    ("sliding_window_causal", ((1, 2), 7, 7, 3, 3, None), dict(window=(2, None), is_causal=True)),
    ("window_bottom_right", ((1, 1), 5, 8, 3, 3, None),
     dict(window=(1, 0), alignment="bottom_right")),
    ("softcap", ((1, 2), 5, 6, 4, 4, None), dict(softcap=1.5)),
    ("alibi", ((1, 3), 5, 6, 3, 3, None), dict(alibi="heads")),
    ("alibi_bottom_right_causal", ((2, 2), 4, 6, 3, 3, None),
     dict(alibi="batch_heads", alignment="bottom_right", is_causal=True)),
    ("bool_mask", ((1, 2), 5, 6, 3, 3, None), dict(mask="bool")),
    ("float_mask", ((1, 2), 5, 6, 3, 3, None), dict(mask="float")),
    ("broadcast_mask_causal", ((2, 2), 5, 6, 3, 3, None), dict(mask="broadcast", is_causal=True)),
    ("fully_masked_rows", ((1, 2), 5, 6, 3, 3, None), dict(mask="empty_rows")),
    ("gqa", ((1, 4), 5, 6, 3, 3, 2), {}),
    ("gqa_causal_softcap", ((2, 6), 5, 6, 3, 3, 2), dict(is_causal=True, softcap=2.0)),
    ("ev_ne_e", ((1, 2), 5, 6, 3, 5, None), {}),
    ("cosine", ((1, 2), 5, 6, 4, 4, None), dict(similarity="cosine", scale=2.0)),
    ("cosine_default_scale", ((1, 2), 4, 5, 3, 3, None), dict(similarity="cosine")),
    ("everything", ((1, 4), 6, 8, 3, 5, 2),
     dict(window=(3, 1), softcap=1.0, alibi="heads", mask="float", alignment="bottom_right",
          scale=0.7)),
    ("no_lead_dims", ((), 4, 5, 3, 2, None), dict(is_causal=True)),
]
IDS = [c[0] for c in CASES]


def make_case(rng, case, dtype=np.float64, scale_inputs=1.0):
    """(query, key, value, keyword arguments of both passes) for one of CASES."""
    _, (lead, L, S, E, Ev, hkv), options = case
    options = dict(options)
    kv_lead = lead if hkv is None else (*lead[:-1], hkv)
    q = (scale_inputs * rng.standard_normal((*lead, L, E))).astype(dtype)
    k = (scale_inputs * rng.standard_normal((*kv_lead, S, E))).astype(dtype)
    v = rng.standard_normal((*kv_lead, S, Ev)).astype(dtype)
    kwargs = {}
    if hkv is not None:
        kwargs["enable_gqa"] = True
    mask = options.pop("mask", None)
    if mask == "bool":
        kwargs["attn_mask"] = rng.random((*lead, L, S)) < 0.7
        kwargs["attn_mask"][..., 0] = True
    elif mask == "float":
        m = rng.standard_normal((*lead, L, S))
        m[rng.random(m.shape) < 0.2] = -np.inf
        m[..., 1] = 0.5
        kwargs["attn_mask"] = m.astype(dtype)
    elif mask == "broadcast":  # (L, S): the same for every batch and head
        kwargs["attn_mask"] = rng.random((L, S)) < 0.8
    elif mask == "empty_rows":
        m = rng.random((*lead, L, S)) < 0.7
        m[..., 1, :] = False
        m[..., -1, :] = False
        kwargs["attn_mask"] = m
    alibi = options.pop("alibi", None)
    if alibi == "heads":
        kwargs["alibi_slopes"] = (0.5 ** np.arange(1, lead[-1] + 1)).astype(dtype)
    elif alibi == "batch_heads":
        kwargs["alibi_slopes"] = rng.random(lead).astype(dtype)
    kwargs.update(options)
    return q, k, v, kwargs


def forward(q, k, v, kwargs):
    return reference.scaled_dot_product_attention(q, k, v, return_lse=True, **kwargs)


def numeric_gradients(q, k, v, grad_out, kwargs, eps=1e-6):
    """Central finite differences of sum(grad_out * out) in every element of q, k and v."""
    grads = []
    for which in range(3):
        inputs = [q.copy(), k.copy(), v.copy()]
        x = inputs[which]
        grad = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            x0 = x[idx]
            x[idx] = x0 + eps
            up = np.sum(grad_out * forward(*inputs, kwargs)[0])
            x[idx] = x0 - eps
            down = np.sum(grad_out * forward(*inputs, kwargs)[0])
            x[idx] = x0
            grad[idx] = (up - down) / (2 * eps)
        grads.append(grad)
    return grads


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_backward_matches_finite_differences(case):
    rng = np.random.default_rng(7)
    q, k, v, kwargs = make_case(rng, case)
    out, lse = forward(q, k, v, kwargs)
    grad_out = rng.standard_normal(out.shape)
    exact = reference.scaled_dot_product_attention_backward(grad_out, q, k, v, out, lse, **kwargs)
    numeric = numeric_gradients(q, k, v, grad_out, kwargs)
    for name, got, want, x in zip(("query", "key", "value"), exact, numeric, (q, k, v)):
        assert got.shape == x.shape and got.dtype == x.dtype, name
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)
    assert any(np.abs(g).max() > 1e-3 for g in exact)


def test_reference_backward_of_fully_masked_rows_is_zero_not_nan():
    rng = np.random.default_rng(3)
    q, k, v, kwargs = make_case(rng, CASES[IDS.index("fully_masked_rows")])
    out, lse = forward(q, k, v, kwargs)
    assert np.isneginf(lse[..., 1]).all()
    grad_out = rng.standard_normal(out.shape)
    grad_q, grad_k, grad_v = reference.scaled_dot_product_attention_backward(
        grad_out, q, k, v, out, lse, **kwargs)
    assert all(np.isfinite(g).all() for g in (grad_q, grad_k, grad_v))
    assert (grad_q[..., 1, :] == 0).all() and (grad_q[..., -1, :] == 0).all()
    # keys seen only by the empty rows get nothing from them: grad_v = weights^T grad_out
    grad_out_without = grad_out.copy()
    grad_out_without[..., [1, -1], :] = 123.0
    again = reference.scaled_dot_product_attention_backward(grad_out_without, q, k, v, out, lse,
                                                            **kwargs)
    np.testing.assert_allclose(again[2], grad_v, atol=1e-12)


def test_reference_backward_of_a_zero_query_with_cosine_is_zero():
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((3, 4, 3))
    q[1] = 0.0
    kwargs = dict(similarity="cosine")
    out, lse = forward(q, k, v, kwargs)
    grads = reference.scaled_dot_product_attention_backward(np.ones_like(out), q, k, v, out, lse,
                                                            **kwargs)
    assert np.isfinite(grads[0]).all() and (grads[0][1] == 0).all()
