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


# --- the backends against the reference ---------------------------------------------------------

BACKENDS = [b for b in ("numpy", "numba") if b in fastattn.backends()]


def _small_block_q() -> int:
    """The smallest query block the CPU kernel takes: whole register tiles of rows and columns
    (48 with AVX2's tile, 96 with AVX-512's)."""
    import math
    from fastattn.kernels.cpu.tile import ROWS, tile_cols
    return math.lcm(ROWS, tile_cols(4))


_SMALL_BLOCK_Q = _small_block_q()


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of the CPU kernel small enough that the tiny cases span several of them."""
    from fastattn import backward
    monkeypatch.setattr(backward, "BLOCK_Q", _SMALL_BLOCK_Q)
    monkeypatch.setattr(backward, "BLOCK_K", 12)


def grad_errors(got, q, k, v, grad_out, out, lse, kwargs, dtype):
    """Max error of each gradient against the float64 reference, and the plain float32 error."""
    as64 = lambda x: x.astype(np.float64) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x  # noqa: E731
    kw64 = {key: as64(val) for key, val in kwargs.items()}
    exact = reference.scaled_dot_product_attention_backward(
        as64(grad_out), as64(q), as64(k), as64(v), as64(out), as64(lse), **kw64)
    plain = None
    if dtype != np.float64:
        as32 = lambda x: x.astype(np.float32) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x  # noqa: E731
        kw32 = {key: as32(val) for key, val in kwargs.items()}
        plain = reference.scaled_dot_product_attention_backward(
            as32(grad_out), as32(q), as32(k), as32(v), as32(out), as32(lse), **kw32)
    return exact, plain


def assert_gradients_match(got, exact, plain, dtype):
    """FlashAttention's rule for gradients: float64 within 1e-9; otherwise at most 3x the error
    of the plain float32 reference, plus 1e-5."""
    for name, g, e, x in zip(("grad_query", "grad_key", "grad_value"), got, exact,
                             plain if plain is not None else exact):
        assert g.shape == e.shape, name
        assert np.isfinite(g).all(), name
        err = np.max(np.abs(g.astype(np.float64) - e), initial=0)
        if dtype == np.float64:
            assert err <= 1e-9, f"{name}: error {err:.3g}"
        else:
            plain_err = np.max(np.abs(x.astype(np.float64) - e), initial=0)
            assert err <= 3 * plain_err + 1e-5, f"{name}: error {err:.3g}, plain {plain_err:.3g}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_matches_reference(backend, case, dtype, small_blocks):
    rng = np.random.default_rng(11)
    _, (lead, L, S, E, Ev, hkv), options = case
    # longer than the tiny blocks, and not a multiple of them
    longer = (case[0], (lead, 3 * L + 5, 4 * S + 3, E, Ev, hkv), options)
    q, k, v, kwargs = make_case(rng, longer, dtype)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, backend="numpy", return_lse=True,
                                                     **kwargs)
    grad_out = rng.standard_normal(out.shape).astype(dtype)
    inputs = [x.copy() for x in (grad_out, q, k, v, out, lse)]
    got = fastattn.scaled_dot_product_attention_backward(grad_out, q, k, v, out, lse,
                                                         backend=backend, **kwargs)
    for x, before in zip((grad_out, q, k, v, out, lse), inputs):
        np.testing.assert_array_equal(x, before)  # inputs are never written to
    for g, x in zip(got, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape
    exact, plain = grad_errors(got, q, k, v, grad_out, out, lse, kwargs, dtype)
    assert_gradients_match(got, exact, plain, dtype)


def test_numba_backward_with_long_key_blocks(monkeypatch):
    if "numba" not in fastattn.backends():
        pytest.skip("numba is not installed")
    from fastattn import backward
    monkeypatch.setattr(backward, "LONG_KEYS", 20)
    monkeypatch.setattr(backward, "BLOCK_K_LONG", 18)
    monkeypatch.setattr(backward, "BLOCK_Q", _SMALL_BLOCK_Q)
    rng = np.random.default_rng(12)
    q, k, v, kwargs = make_case(rng, ("long", ((1, 4), 53, 61, 8, 8, 2),
                                      dict(is_causal=True, window=(30, None))), np.float64)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, backend="numpy", return_lse=True,
                                                     **kwargs)
    grad_out = rng.standard_normal(out.shape)
    got = fastattn.scaled_dot_product_attention_backward(grad_out, q, k, v, out, lse,
                                                         backend="numba", **kwargs)
    exact, plain = grad_errors(got, q, k, v, grad_out, out, lse, kwargs, np.float64)
    assert_gradients_match(got, exact, plain, np.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_float16_is_computed_in_float32(backend):
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 2, 40, 8)).astype(np.float16) for _ in range(3))
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="numpy",
                                                     return_lse=True)
    assert out.dtype == np.float16
    grad_out = rng.standard_normal(out.shape).astype(np.float16)
    got = fastattn.scaled_dot_product_attention_backward(grad_out, q, k, v, out, lse,
                                                         is_causal=True, backend=backend)
    assert all(g.dtype == np.float16 for g in got)
    f32 = [x.astype(np.float32) for x in (grad_out, q, k, v, out, lse)]
    want = reference.scaled_dot_product_attention_backward(*f32, is_causal=True)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.astype(np.float32), w, atol=2e-2, rtol=1e-2)


def test_numba_backward_bits_do_not_depend_on_the_thread_count():
    numba = pytest.importorskip("numba")
    if "numba" not in fastattn.backends() or numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs the numba backend and 2 threads")
    rng = np.random.default_rng(4)
    q, k, v, kwargs = make_case(rng, ("gqa", ((2, 4), 200, 230, 16, 16, 2),
                                      dict(is_causal=True, softcap=3.0)), np.float32)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, backend="numpy", return_lse=True,
                                                     **kwargs)
    grad_out = rng.standard_normal(out.shape).astype(np.float32)
    results = []
    for threads in (1, 2):
        numba.set_num_threads(threads)
        try:
            results.append(fastattn.scaled_dot_product_attention_backward(
                grad_out, q, k, v, out, lse, backend="numba", **kwargs))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_with_no_value_features_or_no_keys(backend):
    rng = np.random.default_rng(8)
    q, k = rng.standard_normal((2, 1, 5, 3)), rng.standard_normal((2, 1, 6, 3))
    v = np.zeros((2, 1, 6, 0))
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, backend="numpy", return_lse=True)
    got = fastattn.scaled_dot_product_attention_backward(np.zeros_like(out), q, k, v, out, lse,
                                                         backend=backend)
    assert [g.shape for g in got] == [q.shape, k.shape, v.shape]
    assert all((g == 0).all() for g in got)


# --- CUDA (Numba's CUDA simulator unless NUMBA_ENABLE_CUDASIM=0) ---------------------------------

def _cuda_or_skip():
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    from fastattn import _backends
    reason = _backends.cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cuda_backward_matches_reference(case, dtype):
    _cuda_or_skip()
    rng = np.random.default_rng(13)
    q, k, v, kwargs = make_case(rng, case, dtype)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, backend="numpy", return_lse=True,
                                                     **kwargs)
    grad_out = rng.standard_normal(out.shape).astype(dtype)
    inputs = [x.copy() for x in (grad_out, q, k, v, out, lse)]
    got = fastattn.scaled_dot_product_attention_backward(grad_out, q, k, v, out, lse,
                                                         backend="cuda", **kwargs)
    for x, before in zip((grad_out, q, k, v, out, lse), inputs):
        np.testing.assert_array_equal(x, before)
    for g, x in zip(got, (q, k, v)):
        assert isinstance(g, np.ndarray) and g.dtype == x.dtype and g.shape == x.shape
    exact, plain = grad_errors(got, q, k, v, grad_out, out, lse, kwargs, dtype)
    assert_gradients_match(got, exact, plain, dtype)


def test_cuda_backward_of_device_arrays_stays_on_the_device():
    _cuda_or_skip()
    from numba import cuda
    rng = np.random.default_rng(14)
    q, k, v, kwargs = make_case(rng, CASES[IDS.index("gqa_causal_softcap")], np.float32)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, backend="numpy", return_lse=True,
                                                     **kwargs)
    grad_out = rng.standard_normal(out.shape).astype(np.float32)
    # grad_out as a strided view of a wider device array, read in place
    wide = np.zeros((*grad_out.shape[:-1], 2 * grad_out.shape[-1]), np.float32)
    wide[..., ::2] = grad_out
    device = [cuda.to_device(x) for x in (wide, q, k, v, out, lse)]
    device[0] = device[0][..., ::2]
    got = fastattn.scaled_dot_product_attention_backward(*device, **kwargs)
    assert all(hasattr(g, "copy_to_host") for g in got)
    host = [g.copy_to_host() for g in got]
    exact, plain = grad_errors(host, q, k, v, grad_out, out, lse, kwargs, np.float32)
    assert_gradients_match(host, exact, plain, np.float32)


def test_cuda_backward_float16():
    _cuda_or_skip()
    rng = np.random.default_rng(15)
    q, k, v = (rng.standard_normal((1, 2, 6, 4)).astype(np.float16) for _ in range(3))
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, window=(2, 0), backend="numpy",
                                                     return_lse=True)
    grad_out = rng.standard_normal(out.shape).astype(np.float16)
    got = fastattn.scaled_dot_product_attention_backward(grad_out, q, k, v, out, lse,
                                                         window=(2, 0), backend="cuda")
    assert all(g.dtype == np.float16 for g in got)
    f32 = [x.astype(np.float32) for x in (grad_out, q, k, v, out, lse)]
    want = reference.scaled_dot_product_attention_backward(*f32, window=(2, 0))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.astype(np.float32), w, atol=2e-2, rtol=1e-2)


# --- PyTorch's autograd (float64) ----------------------------------------------------------------

def torch_forward(torch, q, k, v, kwargs):
    """The forward written in torch operations, for its autograd: the same semantics as the
    reference (scale, softcap, mask, causal+window, ALiBi, softmax)."""
    kwargs = dict(kwargs)
    L, S = q.shape[-2], k.shape[-2]
    if kwargs.pop("enable_gqa", False):
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    similarity = kwargs.pop("similarity", "dot")
    scale = kwargs.pop("scale", None)
    if scale is None:
        scale = 1.0 if similarity == "cosine" else q.shape[-1] ** -0.5
    if similarity == "cosine":
        q = q / q.norm(dim=-1, keepdim=True)
        k = k / k.norm(dim=-1, keepdim=True)
    scores = q @ k.transpose(-1, -2) * scale
    softcap = kwargs.pop("softcap", None)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    mask = kwargs.pop("attn_mask", None)
    if mask is not None:
        if mask.dtype == np.bool_:
            scores = scores.masked_fill(~torch.from_numpy(mask), float("-inf"))
        else:
            scores = scores + torch.from_numpy(mask)
    alignment = kwargs.pop("alignment", "top_left")
    seen = reference.keys_seen(L, S, kwargs.pop("is_causal", False), alignment,
                               kwargs.pop("window", None))
    scores = scores.masked_fill(~torch.from_numpy(seen), float("-inf"))
    slopes = kwargs.pop("alibi_slopes", None)
    if slopes is not None:
        scores = scores + torch.from_numpy(reference.alibi_bias(slopes, L, S, alignment))
    assert not kwargs, kwargs
    return torch.softmax(scores, dim=-1) @ v


# torch's softmax of a row of -inf is NaN, so the cases with such rows are left to the others
TORCH_CASES = [c for c in CASES if c[0] not in ("fully_masked_rows", "causal_bottom_right_L>S")]


@pytest.mark.parametrize("case", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_backward_matches_torch_autograd(case):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(21)
    q, k, v, kwargs = make_case(rng, case)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, backend="numpy", return_lse=True,
                                                     **kwargs)
    grad_out = rng.standard_normal(out.shape)
    tensors = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    torch_out = torch_forward(torch, *tensors, kwargs)
    np.testing.assert_allclose(torch_out.detach().numpy(), out, atol=1e-12)
    want = torch.autograd.grad(torch_out, tensors, torch.from_numpy(grad_out))
    for backend in BACKENDS:
        got = fastattn.scaled_dot_product_attention_backward(grad_out, q, k, v, out, lse,
                                                             backend=backend, **kwargs)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.numpy(), rtol=0, atol=1e-9, err_msg=backend)


@pytest.mark.parametrize("is_causal", [False, True])
def test_backward_matches_torch_sdpa_autograd(is_causal):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(22)
    q, k, v = (rng.standard_normal((2, 4, 37, 8)) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA
    mask = rng.random((37, 37)) < 0.9
    mask[:, 0] = True
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal,
                                                     enable_gqa=True, return_lse=True)
    grad_out = rng.standard_normal(out.shape)
    tensors = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    torch_out = torch.nn.functional.scaled_dot_product_attention(
        *tensors, attn_mask=torch.from_numpy(mask), is_causal=False, enable_gqa=True) \
        if not is_causal else torch.nn.functional.scaled_dot_product_attention(
            *tensors, attn_mask=torch.from_numpy(mask & np.tril(np.ones((37, 37), bool))),
            enable_gqa=True)
    want = torch.autograd.grad(torch_out, tensors, torch.from_numpy(grad_out))
    got = fastattn.scaled_dot_product_attention_backward(grad_out, q, k, v, out, lse, mask,
                                                         is_causal=is_causal, enable_gqa=True)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=0, atol=1e-9)


# --- bad input ----------------------------------------------------------------------------------

@pytest.fixture
def problem():
    rng = np.random.default_rng(30)
    q, k, v = (rng.standard_normal((1, 2, 5, 4)).astype(np.float32) for _ in range(3))
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, backend="numpy", return_lse=True)
    grad_out = np.ones_like(out)
    return grad_out, q, k, v, out, lse


ALL_BACKENDS = BACKENDS + ["cuda"]


def _call(backend, *args, **kwargs):
    if backend == "cuda":
        _cuda_or_skip()
    return fastattn.scaled_dot_product_attention_backward(*args, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_grad_out_and_out(backend, problem):
    grad_out, q, k, v, out, lse = problem
    with pytest.raises(ValueError, match=r"grad_out must have the forward's output shape .*"
                                         r"\(1, 2, 5, 4\).*got shape \(1, 2, 4, 4\)"):
        _call(backend, grad_out[:, :, :4], q, k, v, out, lse)
    with pytest.raises(ValueError, match=r"out must have the forward's output shape"):
        _call(backend, grad_out, q, k, v, out[..., :3], lse)
    with pytest.raises(TypeError, match=r"grad_out must have the dtype .*float32.*got dtype "
                                        r"float64"):
        _call(backend, grad_out.astype(np.float64), q, k, v, out, lse)
    with pytest.raises(TypeError, match=r"out must have the dtype"):
        _call(backend, grad_out, q, k, v, out.astype(np.float16), lse)
    with pytest.raises(TypeError, match=r"grad_out must be a float16, float32 or float64"):
        _call(backend, grad_out.astype(np.int32), q, k, v, out, lse)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_lse(backend, problem):
    grad_out, q, k, v, out, lse = problem
    with pytest.raises(ValueError, match=r"lse must be the forward's log-sum-exp of shape .*"
                                         r"\(1, 2, 5\).*got shape \(1, 2, 5, 1\)"):
        _call(backend, grad_out, q, k, v, out, lse[..., None])
    with pytest.raises(ValueError, match=r"lse must be the forward's log-sum-exp of shape"):
        _call(backend, grad_out, q, k, v, out, lse[:, :1])
    bad = lse.copy()
    bad[0, 1, 3] = np.nan
    with pytest.raises(ValueError, match=r"lse has 1 NaN or \+inf entries: it must be the "
                                         r"forward's log-sum-exp"):
        _call(backend, grad_out, q, k, v, out, bad)
    bad[0, 1, 3] = np.inf
    with pytest.raises(ValueError, match=r"NaN or \+inf"):
        _call(backend, grad_out, q, k, v, out, bad)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_forward_arguments_are_checked_as_in_the_forward(backend, problem):
    grad_out, q, k, v, out, lse = problem
    with pytest.raises(ValueError, match=r"window left side must be >= 0"):
        _call(backend, grad_out, q, k, v, out, lse, window=(-1, 0))
    with pytest.raises(ValueError, match=r"query and key must have the same feature size"):
        _call(backend, grad_out, q, k[..., :3], v, out, lse)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        fastattn.scaled_dot_product_attention_backward(grad_out, q, k, v, out, lse,
                                                       backend="bogus")


# --- the bench's backward cases --------------------------------------------------------------------

@pytest.mark.parametrize("op", ["backward", "forward_backward"])
def test_bench_backward_implementations_agree(op):
    from fastattn.bench import impls
    problem = impls.Problem(op=op, heads=2, kv_heads=1, length=40, dim=8, causal=True)
    assert problem.flops() == (2.5 if op == "backward" else 3.5) * 4 * 2 * 40 * 40 * 8 / 2
    arrays = impls.make_inputs(problem)
    results = {}
    for name in impls.IMPLS[op]:
        try:
            results[name] = impls.prepare(name, problem, arrays)()
        except impls.Unavailable:
            continue
    assert "numpy" in results and len(results) >= 2
    for name, grads in results.items():
        for got, want in zip(grads, results["numpy"]):
            got = got.detach().numpy() if hasattr(got, "detach") else got
            np.testing.assert_allclose(got, want, atol=2e-5, err_msg=name)
