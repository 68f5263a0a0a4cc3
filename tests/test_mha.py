"""MultiHeadAttention and multi_head_attention against the float64 NumPy reference and PyTorch.

Tolerances, as FlashAttention's tests judge a fast kernel: the error of the result against the
float64 reference may be at most twice the error of the plain NumPy reference computed in the
same dtype, plus a small absolute term (about an ulp of the largest output in float32) for
results where both errors are ~0. In float64 the plain reference *is* the oracle, so only the
absolute term is left. (Measured here: float32 errors are 0.6 to 1.5 times the plain ones.)
"""
from __future__ import annotations

import numpy as np
import pytest

import fastattn
from fastattn import mha as mha_module
from fastattn import reference

BACKENDS = ["numba", "numpy"]
DTYPES = [np.float32, np.float64]
# The absolute term, relative to the outputs' largest magnitude (at least 1): about one ulp in
# float32 and a few dozen in float64, where the plain reference is the oracle itself.
ATOL = {np.dtype(np.float32): 1e-7, np.dtype(np.float64): 1e-14}
# Two fast computations of the same thing by different routes (other matrix-product shapes):
# each within a few ulps of the truth.
ROUTE_ATOL = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-14}

B, L, S, E, H = 2, 13, 11, 24, 4  # lengths and sizes deliberately not powers of two


def rng(seed=0):
    return np.random.default_rng(seed)


def weights_of(layer):
    """The layer's weights as the reference takes them: q, k, v, out weights, then biases."""
    E_, kv = layer.embed_dim, layer.num_kv_heads * layer.head_dim
    b = layer.in_proj_bias
    qb, kb, vb = (None,) * 3 if b is None else (b[:E_], b[E_:E_ + kv], b[E_ + kv:])
    return (layer.q_proj_weight, layer.k_proj_weight, layer.v_proj_weight,
            layer.out_proj_weight, qb, kb, vb, layer.out_proj_bias)


def run_reference(layer, query, key, value, dtype, **kw):
    """reference.multi_head_attention in ``dtype`` on batch-first inputs."""
    cast = lambda a: None if a is None else np.asarray(a, dtype)  # noqa: E731
    mask = kw.pop("attn_mask", None)
    if mask is not None and mask.dtype != np.bool_:
        mask = cast(mask)
    pad = kw.pop("key_padding_mask", None)
    if pad is not None and pad.dtype != np.bool_:
        pad = cast(pad)
    return reference.multi_head_attention(
        cast(query), cast(key), cast(value), layer.num_heads,
        *[cast(w) for w in weights_of(layer)], num_kv_heads=layer.num_kv_heads,
        attn_mask=mask, key_padding_mask=pad, **kw)


def assert_close_to_oracle(got, oracle, plain, dtype):
    """|got - oracle| <= 2 |plain - oracle| + atol * max(1, |oracle|), errors taken as maxima."""
    assert got.dtype == np.dtype(dtype)
    assert got.shape == oracle.shape
    assert np.isfinite(got).all()
    err = np.max(np.abs(got.astype(np.float64) - oracle), initial=0.0)
    plain_err = np.max(np.abs(plain.astype(np.float64) - oracle), initial=0.0)
    scale = max(1.0, np.max(np.abs(oracle), initial=0.0))
    assert err <= 2 * plain_err + ATOL[np.dtype(dtype)] * scale, (err, plain_err)


def check_layer(layer, query, key=None, value=None, backend="numba", **kw):
    """Run the layer and compare out and weights (if asked) with the reference."""
    dtype = query.dtype
    out, w = layer(query, key, value, backend=backend, **kw)
    k = query if key is None else key
    v = k if value is None else value
    ref_kw = dict(kw)
    ref_kw.setdefault("need_weights", False)
    oracle = run_reference(layer, query, k, v, np.float64, **dict(ref_kw))
    plain = run_reference(layer, query, k, v, dtype, **dict(ref_kw))
    assert_close_to_oracle(out, oracle[0], plain[0], dtype)
    if kw.get("need_weights"):
        assert_close_to_oracle(w, oracle[1], plain[1], dtype)
    else:
        assert w is None
    return out, w


def inputs(dtype, *shapes, seed=0):
    g = rng(seed)
    return [g.standard_normal(shape).astype(dtype) for shape in shapes]


# --- against the reference -------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_self_attention_matches_reference(backend, dtype):
    layer = fastattn.MultiHeadAttention(E, H, dtype=dtype, seed=1)
    (x,) = inputs(dtype, (B, L, E))
    check_layer(layer, x, backend=backend)
    check_layer(layer, x, x, x, backend=backend, is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_attention_with_kdim_vdim_matches_reference(backend, dtype):
    layer = fastattn.MultiHeadAttention(E, H, kdim=10, vdim=6, dtype=dtype, seed=2)
    q, k, v = inputs(dtype, (B, L, E), (B, S, 10), (B, S, 6))
    check_layer(layer, q, k, v, backend=backend, need_weights=True)
    check_layer(layer, q, k, v, backend=backend, is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_attention_with_shared_key_value_matches_reference(backend, dtype):
    layer = fastattn.MultiHeadAttention(E, H, dtype=dtype, seed=3)
    q, mem = inputs(dtype, (B, L, E), (B, S, E))
    out, _ = check_layer(layer, q, mem, backend=backend)  # value defaults to key
    separate, _ = layer(q, mem, mem.copy(), backend=backend)
    np.testing.assert_allclose(out, separate, rtol=0, atol=ROUTE_ATOL[np.dtype(dtype)])


MASK_SHAPES = [(L, S), (B, 1, L, S), (H, L, S), (B, H, L, S), (1, S)]


def make_attn_mask(kind, shape, dtype, seed=5):
    g = rng(seed)
    if kind == "bool":
        return g.random(shape) < 0.7
    m = g.standard_normal(shape).astype(dtype)
    m[g.random(shape) < 0.2] = -np.inf
    return m


def make_padding(kind, dtype, seed=6):
    pad = np.zeros((B, S), bool)
    pad[1, S - 4:] = True
    pad[0, 3] = True
    if kind == "bool":
        return pad
    return np.where(pad, -np.inf, rng(seed).standard_normal((B, S))).astype(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("pad_kind", [None, "bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
def test_masks_padding_and_causal_combine_as_the_reference(backend, mask_kind, pad_kind, causal):
    dtype = np.float32
    layer = fastattn.MultiHeadAttention(E, H, dtype=dtype, seed=4)
    q, kv = inputs(dtype, (B, L, E), (B, S, E))
    for shape in MASK_SHAPES if mask_kind else [None]:
        mask = None if mask_kind is None else make_attn_mask(mask_kind, shape, dtype)
        pad = None if pad_kind is None else make_padding(pad_kind, dtype)
        check_layer(layer, q, kv, backend=backend, attn_mask=mask, key_padding_mask=pad,
                    is_causal=causal, need_weights=True, average_attn_weights=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_grouped_and_multi_query_attention_match_reference(backend, dtype, num_kv_heads):
    layer = fastattn.MultiHeadAttention(E, H, num_kv_heads=num_kv_heads, dtype=dtype, seed=7)
    assert layer.k_proj_weight.shape == (num_kv_heads * E // H, E)
    q, kv = inputs(dtype, (B, L, E), (B, S, E))
    check_layer(layer, q, backend=backend, is_causal=True, need_weights=True)
    check_layer(layer, q, kv, backend=backend, key_padding_mask=make_padding("bool", dtype),
                need_weights=True, average_attn_weights=False)
    cross = fastattn.MultiHeadAttention(E, H, num_kv_heads=num_kv_heads, kdim=10, vdim=6,
                                        dtype=dtype, seed=8)
    q, k, v = inputs(dtype, (B, L, E), (B, S, 10), (B, S, 6))
    check_layer(cross, q, k, v, backend=backend, attn_mask=make_attn_mask("float", (L, S), dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lengths_across_kernel_blocks_match_reference(backend):
    # 131 queries and 267 keys span several of the numba kernel's query and key blocks.
    layer = fastattn.MultiHeadAttention(16, 2, num_kv_heads=1, dtype=np.float32, seed=9)
    q, kv = inputs(np.float32, (1, 131, 16), (1, 267, 16))
    pad = np.zeros((1, 267), bool)
    pad[0, 200:] = True
    check_layer(layer, q, kv, backend=backend, key_padding_mask=pad, is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_need_weights_averaged_and_per_head(backend, dtype):
    layer = fastattn.MultiHeadAttention(E, H, dtype=dtype, seed=10)
    q, kv = inputs(dtype, (B, L, E), (B, S, E))
    _, avg = check_layer(layer, q, kv, backend=backend, need_weights=True)
    _, per_head = check_layer(layer, q, kv, backend=backend, need_weights=True,
                              average_attn_weights=False)
    assert avg.shape == (B, L, S) and per_head.shape == (B, H, L, S)
    np.testing.assert_allclose(per_head.mean(axis=1), avg, atol=ROUTE_ATOL[np.dtype(dtype)])
    np.testing.assert_allclose(avg.sum(-1), 1, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_input_is_a_batch_of_one(backend):
    layer = fastattn.MultiHeadAttention(E, H, num_kv_heads=2, kdim=10, dtype=np.float64, seed=11)
    q, k, v = inputs(np.float64, (L, E), (S, 10), (S, E))
    mask = make_attn_mask("bool", (H, L, S), np.float64)
    pad = np.zeros(S, bool)
    pad[-2:] = True
    out, w = layer(q, k, v, attn_mask=mask, key_padding_mask=pad, need_weights=True,
                   backend=backend)
    out1, w1 = check_layer(layer, q[None], k[None], v[None], backend=backend,
                           attn_mask=mask[None], key_padding_mask=pad[None], need_weights=True)
    assert out.shape == (L, E) and w.shape == (L, S)
    np.testing.assert_array_equal(out, out1[0])
    np.testing.assert_array_equal(w, w1[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_first_layout_matches_batch_first(backend, dtype):
    first = fastattn.MultiHeadAttention(E, H, kdim=10, vdim=6, dtype=dtype, seed=12)
    seq_first = fastattn.MultiHeadAttention(E, H, kdim=10, vdim=6, dtype=dtype,
                                            batch_first=False)
    seq_first.load_state_dict(first.state_dict())
    q, k, v = inputs(dtype, (B, L, E), (B, S, 10), (B, S, 6))
    pad = make_padding("bool", dtype)
    out, w = check_layer(first, q, k, v, backend=backend, key_padding_mask=pad, need_weights=True)
    t = lambda a: np.ascontiguousarray(a.transpose(1, 0, 2))  # noqa: E731
    out_t, w_t = seq_first(t(q), t(k), t(v), key_padding_mask=pad, need_weights=True,
                           backend=backend)
    assert out_t.shape == (L, B, E) and w_t.shape == (B, L, S)
    np.testing.assert_allclose(out_t.transpose(1, 0, 2), out, rtol=0,
                               atol=ROUTE_ATOL[np.dtype(dtype)])
    np.testing.assert_allclose(w_t, w, rtol=0, atol=ROUTE_ATOL[np.dtype(dtype)])
    (x,) = inputs(dtype, (L, B, E))  # self-attention in the (L, B, E) layout
    self_first = fastattn.MultiHeadAttention(E, H, dtype=dtype, batch_first=False, seed=13)
    out_x, _ = self_first(x, backend=backend)
    ref, _ = run_reference(self_first, t(x), t(x), t(x), np.float64)
    np.testing.assert_allclose(out_x, t(ref), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_with_every_key_padded_gives_out_bias_not_nan(backend):
    layer = fastattn.MultiHeadAttention(E, H, dtype=np.float64, seed=14)
    layer.load_state_dict({**layer.state_dict(), "out_proj.bias": np.arange(E, dtype=float)})
    q, kv = inputs(np.float64, (B, L, E), (B, S, E))
    pad = np.zeros((B, S), bool)
    pad[1] = True  # batch element 1 has nothing to attend to
    out, w = check_layer(layer, q, kv, backend=backend, key_padding_mask=pad, need_weights=True)
    np.testing.assert_array_equal(out[1], np.broadcast_to(np.arange(E), (L, E)))
    np.testing.assert_array_equal(w[1], 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_form_matches_layer(backend):
    layer = fastattn.MultiHeadAttention(E, H, num_kv_heads=2, dtype=np.float32, seed=15)
    q, kv = inputs(np.float32, (B, L, E), (B, S, E))
    pad = make_padding("bool", np.float32)
    out, w = layer(q, kv, key_padding_mask=pad, is_causal=True, need_weights=True,
                   backend=backend)
    out_f, w_f = fastattn.multi_head_attention(q, kv, kv, H, *weights_of(layer), num_kv_heads=2,
                                               key_padding_mask=pad, is_causal=True,
                                               need_weights=True, backend=backend)
    np.testing.assert_allclose(out_f, out, rtol=0, atol=1e-5)
    np.testing.assert_allclose(w_f, w, rtol=0, atol=1e-6)


def test_empty_batch_gives_empty_output():
    layer = fastattn.MultiHeadAttention(E, H, seed=16)
    out, w = layer(np.zeros((0, L, E), np.float32), need_weights=True, backend="numba")
    assert out.shape == (0, L, E) and w.shape == (0, L, L)


def test_float16_input_is_computed_in_float32_and_returned_in_float16():
    layer = fastattn.MultiHeadAttention(E, H, seed=16)
    (x,) = inputs(np.float16, (B, L, E))
    out, w = layer(x, need_weights=True)
    ref, ref_w = layer(x.astype(np.float32), need_weights=True)
    assert out.dtype == np.float16 and w.dtype == np.float16
    np.testing.assert_allclose(out, ref, atol=2e-3, rtol=2e-3)  # float16 rounding of x and out
    np.testing.assert_allclose(w, ref_w, atol=2e-3, rtol=2e-3)


# --- how the work is done --------------------------------------------------------------------

def test_all_heads_go_through_one_sdpa_call_and_self_attention_one_input_product(monkeypatch):
    calls, products = [], []
    sdpa, linear = mha_module.scaled_dot_product_attention, mha_module._linear
    monkeypatch.setattr(mha_module, "scaled_dot_product_attention",
                        lambda q, *a, **kw: calls.append(q.shape) or sdpa(q, *a, **kw))
    monkeypatch.setattr(mha_module, "_linear",
                        lambda x, w, b, *on: products.append(w.shape) or linear(x, w, b, *on))
    layer = fastattn.MultiHeadAttention(E, H, num_kv_heads=2)
    q, kv = inputs(np.float32, (B, L, E), (B, S, E))
    layer(q)
    assert calls == [(B, H, L, E // H)]
    assert products == [(E + 2 * 2 * (E // H), E), (E, E)]  # fused q, k, v; then out
    products.clear()
    layer(q, kv)
    assert products == [(E, E), (2 * 2 * (E // H), E), (E, E)]  # q; fused k, v; out


def test_inputs_are_not_mutated():
    layer = fastattn.MultiHeadAttention(E, H, dtype=np.float64, seed=17)
    q, kv = inputs(np.float64, (B, L, E), (B, S, E))
    mask = make_attn_mask("float", (L, S), np.float64)
    pad = make_padding("bool", np.float64)
    arrays = [q, kv, mask, pad]
    before = [a.copy() for a in arrays]
    for a in arrays:
        a.flags.writeable = False
    state = layer.state_dict()
    layer(q, kv, attn_mask=mask, key_padding_mask=pad, need_weights=True)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)
    for name, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, state[name])


# --- weights: init and state dicts ------------------------------------------------------------

def test_init_is_seeded_and_follows_pytorch():
    a = fastattn.MultiHeadAttention(64, 8, seed=0)
    b = fastattn.MultiHeadAttention(64, 8, seed=0)
    c = fastattn.MultiHeadAttention(64, 8, seed=np.random.default_rng(1))
    for name, value in a.state_dict().items():
        np.testing.assert_array_equal(value, b.state_dict()[name])
        assert value.dtype == np.float32
    assert not np.array_equal(a.in_proj_weight, c.in_proj_weight)
    # Xavier-uniform over the packed (3E, E) weight; Linear's ±1/sqrt(E) on out_proj; zero biases.
    bound = np.sqrt(6 / (64 + 3 * 64))
    assert bound * 0.95 < np.abs(a.in_proj_weight).max() <= bound
    assert 0.95 / 8 < np.abs(a.out_proj_weight).max() <= 1 / 8
    assert not a.in_proj_bias.any() and not a.out_proj_bias.any()
    sep = fastattn.MultiHeadAttention(64, 8, kdim=32, seed=0)  # Xavier on each weight
    k_bound = np.sqrt(6 / (64 + 32))
    assert k_bound * 0.95 < np.abs(sep.k_proj_weight).max() <= k_bound


@pytest.mark.parametrize("kwargs, expected", [
    ({}, {"in_proj_weight": (3 * E, E), "in_proj_bias": (3 * E,),
          "out_proj.weight": (E, E), "out_proj.bias": (E,)}),
    ({"bias": False}, {"in_proj_weight": (3 * E, E), "out_proj.weight": (E, E)}),
    ({"kdim": 10, "vdim": 6}, {"q_proj_weight": (E, E), "k_proj_weight": (E, 10),
                               "v_proj_weight": (E, 6), "in_proj_bias": (3 * E,),
                               "out_proj.weight": (E, E), "out_proj.bias": (E,)}),
    ({"num_kv_heads": 2}, {"q_proj_weight": (E, E), "k_proj_weight": (12, E),
                           "v_proj_weight": (12, E), "in_proj_bias": (E + 24,),
                           "out_proj.weight": (E, E), "out_proj.bias": (E,)}),
], ids=["packed", "no-bias", "kdim-vdim", "gqa"])
def test_state_dict_round_trip(kwargs, expected):
    a = fastattn.MultiHeadAttention(E, H, seed=18, **kwargs)
    a_state = a.state_dict()
    assert {k: v.shape for k, v in a_state.items()} == expected
    if "in_proj_bias" in a_state:  # non-zero biases so the round trip checks them too
        a_state["in_proj_bias"] = rng(1).standard_normal(a_state["in_proj_bias"].shape)
        a.load_state_dict(a_state)
    b = fastattn.MultiHeadAttention(E, H, seed=19, **kwargs)
    b.load_state_dict(a.state_dict())
    for name, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[name], value)
    q, k, v = inputs(np.float32, (B, L, E), (B, S, kwargs.get("kdim", E)),
                     (B, S, kwargs.get("vdim", E)))
    np.testing.assert_array_equal(a(q, k, v)[0], b(q, k, v)[0])
    # The state dict is a copy: writing into it leaves the layer alone.
    state = b.state_dict()
    next(iter(state.values()))[...] = 0
    np.testing.assert_array_equal(b(q, k, v)[0], a(q, k, v)[0])


def test_load_state_dict_rejects_wrong_names_shapes_and_dtypes():
    layer = fastattn.MultiHeadAttention(E, H)
    good = layer.state_dict()
    with pytest.raises(ValueError, match=r"missing out_proj\.bias.*Expected exactly: "
                                         r"in_proj_weight \(72, 24\)"):
        layer.load_state_dict({k: v for k, v in good.items() if k != "out_proj.bias"})
    with pytest.raises(ValueError, match=r"unexpected bias_k"):
        layer.load_state_dict({**good, "bias_k": np.zeros((1, 1, E))})
    with pytest.raises(ValueError, match=r"state_dict\['in_proj_weight'\] has shape \(24, 24\), "
                                         r"expected \(72, 24\)"):
        layer.load_state_dict({**good, "in_proj_weight": np.zeros((E, E))})
    with pytest.raises(TypeError, match=r"state_dict\['out_proj.bias'\] must be a float array"):
        layer.load_state_dict({**good, "out_proj.bias": np.zeros(E, int)})
    gqa = fastattn.MultiHeadAttention(E, H, num_kv_heads=2)
    with pytest.raises(ValueError, match="missing q_proj_weight, k_proj_weight, v_proj_weight"):
        gqa.load_state_dict(good)


# --- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, kwargs, error, match", [
    ((10, 4), {}, ValueError, "embed_dim=10 must be divisible by num_heads=4"),
    ((8, 4), {"num_kv_heads": 3}, ValueError, "num_heads=4 must be a multiple of num_kv_heads=3"),
    ((8, 0), {}, ValueError, "num_heads must be a positive int, got 0"),
    ((8.0, 2), {}, TypeError, "embed_dim must be a positive int, got float"),
    ((8, 2), {"kdim": -1}, ValueError, "kdim must be a positive int"),
    ((8, 2), {"dtype": np.int32}, TypeError, "dtype must be float32 or float64"),
    ((8, 2), {"seed": "x"}, TypeError, "seed must be None, an int or a numpy.random.Generator"),
    ((8, 2), {"batch_first": 1}, TypeError, "batch_first must be a bool"),
])
def test_constructor_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastattn.MultiHeadAttention(*args, **kwargs)


def _call(**kw):
    layer = fastattn.MultiHeadAttention(E, H, kdim=10)
    q, k, v = inputs(np.float32, (B, L, E), (B, S, 10), (B, S, E))
    args = {"query": q, "key": k, "value": v, **kw}
    return layer(args.pop("query"), args.pop("key"), args.pop("value"), **args)


@pytest.mark.parametrize("kw, error, match", [
    ({"query": np.zeros((1, 2, 3, E), np.float32)}, ValueError,
     r"query must be \(B, L, E\) \(batch_first=True\) or unbatched \(L, E\), got shape"),
    ({"query": np.zeros((B, L, 7), np.float32)}, ValueError,
     r"query has 7 features \(shape \(2, 13, 7\)\) but the query projection of shape \(24, 24\)"),
    ({"key": np.zeros((B, S, E), np.float32)}, ValueError,
     r"key has 24 features .* takes 10"),
    ({"key": np.zeros((3, S, 10), np.float32)}, ValueError, "the same batch size"),
    ({"value": np.zeros((B, S + 1, E), np.float32)}, ValueError, "the same sequence length S"),
    ({"value": np.zeros((B, S, E), np.float64)}, TypeError, "the same dtype"),
    ({"query": np.zeros((L, E), np.float32)}, ValueError, "all be batched or all unbatched"),
    ({"query": np.zeros((B, L, E), int)}, TypeError, "query must be a float16, float32"),
    ({"key": None}, ValueError, "value was given without key"),
    ({"attn_mask": np.ones((L + 1, S), bool)}, ValueError,
     r"attn_mask of shape \(14, 11\) does not broadcast to the attention weights "
     r"\(B, num_heads, L, S\) shape \(2, 4, 13, 11\)"),
    ({"attn_mask": np.ones((B * H, L, S), bool)}, ValueError,
     r"PyTorch's layout: pass attn_mask.reshape\(2, 4, 13, 11\)"),
    ({"attn_mask": np.ones((L, S), int)}, TypeError, "attn_mask must be a bool array"),
    ({"key_padding_mask": np.zeros((B, L), bool)}, ValueError,
     r"key_padding_mask must have shape \(B, S\) = \(2, 11\), got \(2, 13\)"),
    ({"key_padding_mask": np.zeros((B, S), int)}, TypeError,
     r"key_padding_mask must be a bool array \(True = padding"),
    ({"is_causal": 1}, TypeError, "is_causal must be a bool"),
    ({"need_weights": None}, TypeError, "need_weights must be a bool"),
    ({"backend": "gpu"}, ValueError, "backend must be one of"),
])
def test_call_errors_name_the_argument_and_shapes(kw, error, match):
    with pytest.raises(error, match=match):
        _call(**kw)


def test_functional_errors_name_the_weights():
    q = np.zeros((B, L, E), np.float32)
    w = np.zeros((E, E), np.float32)
    with pytest.raises(ValueError, match=r"k_weight \(12, 24\) must have num_kv_heads \* head_dim"
                                         r" = 4 \* 6 = 24 rows"):
        fastattn.multi_head_attention(q, q, q, H, w, w[:12], w, w)
    with pytest.raises(ValueError, match=r"q_bias must have shape \(24,\) to match q_weight"):
        fastattn.multi_head_attention(q, q, q, H, w, w, w, w, q_bias=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="q_weight .* not a multiple of num_heads=5"):
        fastattn.multi_head_attention(q, q, q, 5, w, w, w, w)
    with pytest.raises(ValueError, match=r"out_weight \(24, 12\) must take"):
        fastattn.multi_head_attention(q, q, q, H, w, w, w, w[:, :12])


# --- PyTorch interop -------------------------------------------------------------------------

def torch_layer(torch, ours, **kwargs):
    layer = torch.nn.MultiheadAttention(
        ours.embed_dim, ours.num_heads, bias=ours.bias, kdim=ours.kdim, vdim=ours.vdim,
        batch_first=ours.batch_first, dtype=getattr(torch, ours.dtype.name), **kwargs).eval()
    layer.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    return layer


def run_torch(torch, layer, *arrays, **kw):
    t = lambda a: a if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    kw = {k: t(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    with torch.no_grad():
        out, w = layer(*map(t, arrays), **kw)
    return out.numpy(), None if w is None else w.numpy()


@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch_self_attention_with_masks_and_padding(bias):
    torch = pytest.importorskip("torch")
    ours = fastattn.MultiHeadAttention(E, H, bias=bias, dtype=np.float64, seed=20)
    if bias:
        state = ours.state_dict()
        state["in_proj_bias"] = rng(2).standard_normal(3 * E)
        state["out_proj.bias"] = rng(3).standard_normal(E)
        ours.load_state_dict(state)
    theirs = torch_layer(torch, ours)
    (x,) = inputs(np.float64, (B, L, E))
    keep = rng(4).random((L, L)) < 0.7
    keep[:, 0] = True  # no row without keys: PyTorch makes those NaN
    pad = np.zeros((B, L), bool)
    pad[1, -3:] = True
    causal = np.tri(L, dtype=bool)
    for ours_kw, torch_kw in [
        ({}, {}),
        ({"attn_mask": keep, "key_padding_mask": pad},
         {"attn_mask": ~keep, "key_padding_mask": pad}),  # torch: bool True = masked out
        ({"attn_mask": np.where(keep, 0.5, -np.inf)}, {"attn_mask": np.where(keep, 0.5, -np.inf)}),
        ({"is_causal": True, "key_padding_mask": pad}, {"attn_mask": ~causal,
                                                        "key_padding_mask": pad}),
    ]:
        for average in (True, False):
            out, w = ours(x, **ours_kw, need_weights=True, average_attn_weights=average)
            t_out, t_w = run_torch(torch, theirs, x, x, x, **torch_kw, need_weights=True,
                                   average_attn_weights=average)
            np.testing.assert_allclose(out, t_out, rtol=0, atol=1e-12)
            np.testing.assert_allclose(w, t_w, rtol=0, atol=1e-12)
        out, _ = ours(x, **ours_kw)
        t_out, _ = run_torch(torch, theirs, x, x, x, **torch_kw, need_weights=False)
        np.testing.assert_allclose(out, t_out, rtol=0, atol=1e-12)


def test_matches_torch_cross_attention_kdim_vdim_sequence_first_and_unbatched():
    torch = pytest.importorskip("torch")
    ours = fastattn.MultiHeadAttention(E, H, kdim=10, vdim=6, batch_first=False,
                                       dtype=np.float64, seed=21)
    theirs = torch_layer(torch, ours)
    q, k, v = inputs(np.float64, (L, B, E), (S, B, 10), (S, B, 6))
    pad = make_padding("float", np.float64)  # float padding masks are added, as in PyTorch
    mask = make_attn_mask("float", (B, H, L, S), np.float64)
    mask[..., 0] = 0.0
    out, w = ours(q, k, v, attn_mask=mask, key_padding_mask=pad, need_weights=True,
                  average_attn_weights=False)
    t_out, t_w = run_torch(torch, theirs, q, k, v, attn_mask=mask.reshape(B * H, L, S),
                           key_padding_mask=pad, average_attn_weights=False)
    np.testing.assert_allclose(out, t_out, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w, t_w, rtol=0, atol=1e-12)
    out, w = ours(q[:, 0], k[:, 0], v[:, 0], need_weights=True)  # unbatched (L, E)
    t_out, t_w = run_torch(torch, theirs, q[:, 0], k[:, 0], v[:, 0])
    np.testing.assert_allclose(out, t_out, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w, t_w, rtol=0, atol=1e-12)


def test_loads_torch_weights_directly_and_matches_in_float32():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    with torch.no_grad():
        theirs.in_proj_bias.normal_()
    ours = fastattn.MultiHeadAttention(E, H)
    ours.load_state_dict(theirs.state_dict())  # tensors, read through duck typing
    (x,) = inputs(np.float32, (B, L, E))
    out, _ = ours(x, is_causal=True)
    t_out, _ = run_torch(torch, theirs, x, x, x, attn_mask=~np.tri(L, dtype=bool),
                         need_weights=False)
    # Two float32 computations of O(1) values through E=24-term sums: a few ulps each.
    np.testing.assert_allclose(out, t_out, rtol=0, atol=1e-5)


def test_torch_init_has_the_same_distribution():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(256, 4, kdim=128).state_dict()
    ours = fastattn.MultiHeadAttention(256, 4, kdim=128, seed=0).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for name, value in ours.items():
        t = theirs[name].numpy()
        # Uniform init: the same bound, so the same max and standard deviation to within 2%.
        np.testing.assert_allclose(np.abs(value).max(), np.abs(t).max(), rtol=0.02, atol=1e-12)
        np.testing.assert_allclose(value.std(), t.std(), rtol=0.02, atol=1e-12)
