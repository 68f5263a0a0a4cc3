"""fastattn.torch against torch.nn.functional.scaled_dot_product_attention and torch's autograd.

Every case of test_parity.py, in float32 and bfloat16: the output and the gradients of query, key
and value. The accuracy rule is the package's, with PyTorch in the input dtype as the plain
computation: against PyTorch in float64 on the same (rounded) inputs, the max error is at most 2x
PyTorch's own (3x for gradients) plus 1e-6.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastattn  # noqa: E402
import fastattn.torch as ft  # noqa: E402
from fastattn import reference  # noqa: E402

from test_parity import MASK_SHAPES  # noqa: E402

F = torch.nn.functional
DTYPES = [torch.float32, torch.bfloat16]


def make(rng, shape_q, shape_k, Ev=None, scale=1.0):
    Ev = shape_k[-1] if Ev is None else Ev
    q = scale * rng.standard_normal(shape_q)
    k = scale * rng.standard_normal(shape_k)
    v = rng.standard_normal((*shape_k[:-1], Ev))
    return q, k, v


def _unit(x):
    # A zero row stays zero and gets no gradient (its direction is undefined), as in fastattn.
    norm = x.norm(dim=-1, keepdim=True)
    return torch.where(norm == 0, torch.zeros_like(x), x / torch.where(norm == 0, 1, norm))


def torch_sdpa(q, k, v, mask=None, *, similarity="dot", is_causal=False, scale=None, **kw):
    """PyTorch's SDPA (cosine: on unit rows, with fastattn's default scale of 1). PyTorch refuses
    a mask with is_causal, which fastattn combines: here the causal pattern joins the mask."""
    if similarity == "cosine":
        q, k = _unit(q), _unit(k)
        scale = 1.0 if scale is None else scale
    if is_causal and mask is not None:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, -torch.inf)
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, scale=scale, **kw)


def run(fn, q, k, v, mask, grad_out, **kw):
    """fn's output and its gradients of q, k, v (tensors that need grad)."""
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v, mask, **kw)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
    return [out.detach(), *grads]


def max_err(a, b):
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite)
    return (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0


def check(dtype, q, k, v, mask=None, fastattn_options=None, torch_fn=torch_sdpa, **kw):
    """Output and gradients of fastattn.torch against PyTorch (``torch_fn``, its autograd)."""
    tq, tk, tv = (torch.from_numpy(np.asarray(x)).to(dtype) for x in (q, k, v))
    tmask = None if mask is None else torch.from_numpy(np.asarray(mask))
    if tmask is not None and tmask.dtype != torch.bool:
        tmask = tmask.to(dtype)
    grad_out = torch.from_numpy(np.random.default_rng(7).standard_normal(
        (*q.shape[:-1], v.shape[-1])))
    # PyTorch wants a mask of at least 2 dims; fastattn gets the mask as it is
    torch_mask = None if tmask is None else tmask.reshape((1,) * (2 - tmask.ndim) + tmask.shape)
    exact = run(torch_fn, tq.double(), tk.double(), tv.double(),
                None if tmask is None else (torch_mask if tmask.dtype == torch.bool else
                                            torch_mask.double()), grad_out.double(), **kw)
    plain = run(torch_fn, tq, tk, tv, torch_mask, grad_out, **kw)
    got = run(lambda *a, **k_: ft.scaled_dot_product_attention(*a, **k_, **(fastattn_options or {})),
              tq, tk, tv, tmask, grad_out, **kw)
    # The accuracy rule's plain computation is NumPy's in the same dtype (fastattn's numpy
    # backend); PyTorch's own error in that dtype is the baseline where it is the larger.
    numpy_options = dict(fastattn_options or {}, backend="numpy")
    numpy_plain = run(lambda *a, **k_: ft.scaled_dot_product_attention(*a, **k_, **numpy_options),
                      tq, tk, tv, tmask, grad_out, **kw)
    for what, g, e, p, n, factor in zip(("out", "grad query", "grad key", "grad value"),
                                        got, exact, plain, numpy_plain, (2, 3, 3, 3)):
        assert g.dtype == dtype and g.shape == e.shape, (what, g.dtype, g.shape, e.shape)
        err, plain_err = max_err(g, e), max(max_err(p, e), max_err(n, e))
        assert err <= factor * plain_err + 1e-6, f"{what}: error {err:.3g} vs plain {plain_err:.3g}"


# --- every case of the parity suite, float32 and bfloat16 -----------------------------------------

@pytest.fixture(params=DTYPES, ids=str)
def dtype(request):
    return request.param


@pytest.mark.parametrize("L, S", [(1, 1), (7, 7), (267, 267), (514, 267), (1, 1030), (1030, 514)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_that_are_not_block_multiples(rng, dtype, L, S, causal):
    check(dtype, *make(rng, (2, L, 32), (2, S, 32)), is_causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_two_key_blocks(rng, dtype, causal):
    check(dtype, *make(rng, (2, 2, 560, 64), (2, 2, 530, 64)), is_causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_float64(rng, causal):
    q, k, v = (torch.from_numpy(x) for x in make(rng, (2, 2, 300, 16), (2, 2, 270, 16)))
    got = ft.scaled_dot_product_attention(q, k, v, is_causal=causal)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_every_mask_broadcast_shape(rng, dtype, mask_shape, kind):
    q, k, v = make(rng, (2, 3, 130, 16), (2, 3, 300, 16))
    keep = rng.random(mask_shape) > 0.3
    mask = keep if kind == "bool" else np.where(keep, rng.standard_normal(mask_shape), -np.inf)
    check(dtype, q, k, v, mask)
    check(dtype, q, k, v, mask, is_causal=True)


def test_float_mask_values_are_added(rng, dtype):
    q, k, v = make(rng, (2, 40, 16), (2, 50, 16))
    check(dtype, q, k, v, 3 * rng.standard_normal((40, 50)))


def test_fully_masked_rows_give_zeros(rng, dtype):
    q, k, v = make(rng, (2, 270, 16), (2, 600, 16))
    mask = rng.random((270, 600)) > 0.5
    mask[[0, 5, 269]] = False
    out = ft.scaled_dot_product_attention(*(torch.from_numpy(x).to(dtype) for x in (q, k, v)),
                                          torch.from_numpy(mask))
    assert (out[:, [0, 5, 269]] == 0).all()
    check(dtype, q, k, v, mask)
    check(dtype, q, k, v, np.where(mask, 0, -np.inf))


def test_masked_band_covering_whole_key_blocks(rng, dtype):
    q, k, v = make(rng, (2, 200, 16), (2, 1030, 16))
    mask = np.ones(1030, bool)
    mask[:600] = False
    check(dtype, q, k, v, mask)
    check(dtype, q, k, v, np.where(mask, 0, -np.inf))
    mask[700:] = False
    check(dtype, q, k, v, mask)


@pytest.mark.parametrize("L, S", [(300, 700), (700, 300), (267, 267)])
def test_causal_with_mask(rng, dtype, L, S):
    q, k, v = make(rng, (2, L, 16), (2, S, 16))
    check(dtype, q, k, v, rng.random((L, S)) > 0.2, is_causal=True)


@pytest.mark.parametrize("hq, hkv", [(4, 2), (6, 1), (3, 3)])
def test_gqa(rng, dtype, hq, hkv):
    q, k, v = make(rng, (2, hq, 140, 16), (2, hkv, 300, 16), Ev=24)
    check(dtype, q, k, v, rng.random((hq, 140, 300)) > 0.2, enable_gqa=True)
    check(dtype, q, k, v, enable_gqa=True, is_causal=True)


def test_value_dim_differs_from_key_dim(rng, dtype):
    check(dtype, *make(rng, (3, 270, 16), (3, 300, 16), Ev=40), is_causal=True)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_cosine_similarity(rng, dtype, scale):
    q, k, v = make(rng, (2, 270, 16), (2, 300, 16))
    q[0, 3] = 0.0
    k[1, 7] = 0.0
    check(dtype, q, k, v, fastattn_options={"similarity": "cosine"},
          torch_fn=lambda *a, **kw: torch_sdpa(*a, similarity="cosine", **kw), scale=scale)


def test_custom_scale(rng, dtype):
    check(dtype, *make(rng, (2, 100, 16), (2, 300, 16)), scale=0.05, is_causal=True)


@pytest.mark.parametrize("lead", [(), (2,), (2, 3), (2, 1, 3)])
def test_two_to_five_dims(rng, dtype, lead):
    check(dtype, *make(rng, (*lead, 130, 16), (*lead, 270, 16)), is_causal=True)


def test_logits_of_1e4_stay_finite(rng, dtype):
    q, k, v = make(rng, (2, 270, 16), (2, 300, 16))
    q *= 1e4 / np.abs(q).max()
    check(dtype, q, k, v, scale=1.0)


def test_float16(rng):
    q, k, v = make(rng, (2, 2, 70, 16), (2, 2, 90, 16))
    check(torch.float16, q, k, v, is_causal=True)


# --- the variants (window, softcap, ALiBi, bottom-right) against a PyTorch formula ---------------

def torch_variants(q, k, v, mask=None, *, is_causal=False, scale=None, enable_gqa=False,
                   alignment="top_left", window=None, softcap=None, alibi_slopes=None):
    """The variants written out in PyTorch, differentiable by its autograd."""
    if enable_gqa:
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    L, S = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask
    keep = torch.from_numpy(reference.keys_seen(L, S, is_causal, alignment, window))
    scores = scores.masked_fill(~keep, -torch.inf)
    if alibi_slopes is not None:
        scores = scores + torch.from_numpy(reference.alibi_bias(alibi_slopes, L, S, alignment)).to(
            scores.dtype)
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    return weights @ v


VARIANTS = [
    dict(window=(5, 0), is_causal=True),
    dict(window=(7, 3)),
    dict(softcap=2.0),
    dict(softcap=2.0, window=(9, 0), is_causal=True),
    dict(alignment="bottom_right", is_causal=True),
    dict(alignment="bottom_right", window=(4, 0), is_causal=True),
    dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625])),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda d: ",".join(d))
def test_variants_and_their_gradients(rng, variant):
    q, k, v = make(rng, (2, 4, 40, 16), (2, 2, 70, 16))
    mask = rng.random((40, 70)) > 0.1
    variant = dict(variant)
    causal = variant.pop("is_causal", False)
    options = dict(variant)
    check(torch.float32, q, k, v, mask, fastattn_options=options,
          torch_fn=lambda *a, **kw: torch_variants(*a, **kw, **variant),
          is_causal=causal, enable_gqa=True)


# --- no copies, inputs untouched -------------------------------------------------------------------

@pytest.fixture
def kernel_inputs(monkeypatch):
    """Record the arrays the numba backend's kernel gets and the output it hands back."""
    from fastattn import _numba
    seen = {}
    attention = _numba.attention

    def spy(p, want_lse):
        out, lse = attention(p, want_lse)
        seen.update(q=p.q.ctypes.data, k=p.k.ctypes.data, v=p.v.ctypes.data,
                    mask=None if p.mask is None else p.mask.values.ctypes.data,
                    out=out.ctypes.data)
        return out, lse

    monkeypatch.setattr(_numba, "attention", spy)
    return seen


def test_contiguous_cpu_inputs_and_the_output_are_not_copied(rng, kernel_inputs):
    q, k, v = (torch.from_numpy(x.astype(np.float32)) for x in make(rng, (2, 4, 50, 16),
                                                                     (2, 2, 60, 16)))
    mask = torch.from_numpy(rng.random((2, 1, 50, 60)) > 0.2)
    before = [t.clone() for t in (q, k, v, mask)]
    out = ft.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, backend="numba")
    assert kernel_inputs["q"] == q.data_ptr()
    assert kernel_inputs["k"] == k.data_ptr()
    assert kernel_inputs["v"] == v.data_ptr()
    assert kernel_inputs["mask"] == mask.data_ptr()
    assert kernel_inputs["out"] == out.data_ptr()
    for t, b in zip((q, k, v, mask), before):
        assert torch.equal(t, b)  # inputs are never written to


def test_inputs_that_need_grad_are_not_copied(rng, kernel_inputs):
    q, k, v = (torch.from_numpy(x.astype(np.float32)).requires_grad_() for x in
               make(rng, (2, 30, 16), (2, 40, 16)))
    out = ft.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (kernel_inputs["q"], kernel_inputs["k"], kernel_inputs["v"], kernel_inputs["out"]) == \
        (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr())
    assert out.grad_fn is not None


DECODE_STEPS = [((2, 8, 1, 16), (2, 2, 300, 16), True), ((1, 4, 2, 8), (1, 4, 33, 8), False),
                ((3, 16, 1, 32), (3, 1, 9, 32), True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shapes", DECODE_STEPS, ids=lambda c: f"{c[0]}-{c[1]}")
def test_a_decode_step_skips_the_general_checks_with_the_same_bits(rng, monkeypatch, dtype,
                                                                    shapes):
    """A plain call with few query rows per key/value head (a decode step in transformers)
    goes straight to the row kernel, without the general path (patched to fail here), and
    gives the bits the general path gives (``backend="numba"`` takes it), in place."""
    from fastattn import _prepare
    shape_q, shape_k, gqa = shapes
    q, k, v = (torch.from_numpy(x).to(dtype) for x in make(rng, shape_q, shape_k))
    general = ft.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=gqa,
                                              backend="numba")
    before = [t.clone() for t in (q, k, v)]

    def no_general_path(*args, **kwargs):
        raise AssertionError("the decode step took the general path")

    monkeypatch.setattr(_prepare, "prepare_attention", no_general_path)
    out = ft.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=gqa)
    assert out.dtype == dtype and out.shape == general.shape
    assert torch.equal(out.view(torch.uint8), general.view(torch.uint8))
    exact = reference.scaled_dot_product_attention(*(t.double().numpy() for t in (q, k, v)),
                                                   scale=0.3, enable_gqa=gqa)
    plain = reference.scaled_dot_product_attention(*(t.numpy() for t in (q, k, v)), scale=0.3,
                                                   enable_gqa=gqa)
    err, plain_err = np.abs(out.double().numpy() - exact).max(), np.abs(plain - exact).max()
    assert err <= (1e-12 if dtype == torch.float64 else 2 * plain_err + 1e-6)
    for t, b in zip((q, k, v), before):
        assert torch.equal(t, b)


def _decode_step_taken(monkeypatch):
    """(whether each _decode_step call computed the output, the general path's prepare calls)"""
    from fastattn import _prepare
    taken, general = [], []
    step, prepare = ft._decode_step, _prepare.prepare_attention
    monkeypatch.setattr(ft, "_decode_step",
                        lambda *a: taken.append(step(*a) is not None) or step(*a))
    monkeypatch.setattr(_prepare, "prepare_attention",
                        lambda *a, **k: general.append(1) or prepare(*a, **k))
    return taken, general


@pytest.mark.parametrize("case", ["grad", "mask", "causal", "strided", "bfloat16", "option",
                                  "many rows", "no gqa flag"])
def test_other_calls_keep_the_general_path(rng, monkeypatch, case):
    q, k, v = (torch.from_numpy(x.astype(np.float32)) for x in make(rng, (2, 4, 1, 16),
                                                                     (2, 2, 40, 16)))
    kwargs = dict(enable_gqa=True)
    if case == "grad":
        q.requires_grad_()
    elif case == "mask":
        kwargs["attn_mask"] = torch.ones(40, dtype=torch.bool)
    elif case == "causal":
        kwargs["is_causal"] = True
    elif case == "strided":
        k = torch.from_numpy(rng.standard_normal((2, 2, 16, 40)).astype(np.float32))
        k = k.transpose(2, 3)
    elif case == "bfloat16":
        pytest.importorskip("ml_dtypes")
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    elif case == "option":
        kwargs["softcap"] = 5.0
    elif case == "many rows":
        q = torch.from_numpy(rng.standard_normal((2, 4, 9, 16)).astype(np.float32))
    elif case == "no gqa flag":
        kwargs["enable_gqa"] = False
    taken, general = _decode_step_taken(monkeypatch)
    if case == "no gqa flag":
        with pytest.raises(ValueError, match="enable_gqa"):
            ft.scaled_dot_product_attention(q, k, v, **kwargs)
        assert not any(taken) and general
        return
    out = ft.scaled_dot_product_attention(q, k, v, **kwargs)
    assert not any(taken) and general
    mask = kwargs.pop("attn_mask", None)
    expected = reference.scaled_dot_product_attention(
        *(t.detach().float().double().numpy() for t in (q, k, v)),
        None if mask is None else mask.numpy(), **kwargs)
    np.testing.assert_allclose(out.detach().float().numpy(), expected,
                               atol=2e-2 if case == "bfloat16" else 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sixteen_bit_inputs_are_read_in_place(rng, kernel_inputs, dtype):
    """No float32 copy: the kernel reads the tensors' own 16-bit memory (bfloat16 through
    ml_dtypes), and the result is fastattn's float32 computation on the widened inputs, rounded
    to the tensors' dtype."""
    if dtype == torch.bfloat16:
        pytest.importorskip("ml_dtypes")
    q, k, v = (torch.from_numpy(x).to(dtype) for x in make(rng, (2, 4, 50, 16), (2, 2, 60, 16)))
    before = [t.clone() for t in (q, k, v)]
    out, lse = ft.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True,
                                               return_lse=True)
    assert (kernel_inputs["q"], kernel_inputs["k"], kernel_inputs["v"]) == \
        (q.data_ptr(), k.data_ptr(), v.data_ptr())
    assert out.dtype == dtype and lse.dtype == torch.float32
    want, want_lse = ft.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                     enable_gqa=True, is_causal=True,
                                                     return_lse=True)
    assert torch.equal(out.view(torch.int16), want.to(dtype).view(torch.int16))
    assert torch.equal(lse, want_lse)
    for t, b in zip((q, k, v), before):
        assert torch.equal(t.view(torch.int16), b.view(torch.int16))  # never written to


def test_bfloat16_gradients(rng):
    """bfloat16 tensors through autograd: the fused backward (on float32 copies), the gradients
    in bfloat16, under the accuracy rule against PyTorch."""
    pytest.importorskip("ml_dtypes")
    check(torch.bfloat16, *make(rng, (2, 2, 40, 16), (2, 1, 50, 16)), is_causal=True,
          enable_gqa=True)


def test_no_grad_and_return_lse(rng):
    q, k, v = (torch.from_numpy(x.astype(np.float32)).requires_grad_() for x in
               make(rng, (2, 30, 16), (2, 40, 16)))
    with torch.no_grad():
        out, lse = ft.scaled_dot_product_attention(q, k, v, return_lse=True)
    assert out.grad_fn is None and lse.shape == (2, 30)
    want_out, want_lse = fastattn.scaled_dot_product_attention(
        *(t.detach().numpy() for t in (q, k, v)), return_lse=True)
    np.testing.assert_array_equal(out.numpy(), want_out)
    np.testing.assert_array_equal(lse.numpy(), want_lse)


def test_loss_backward_fills_grad(rng):
    q, k, v = (torch.from_numpy(x.astype(np.float32)).requires_grad_() for x in
               make(rng, (2, 30, 16), (2, 40, 16)))
    ft.scaled_dot_product_attention(q, k, v).sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(q2, k2, v2).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-5)


def test_a_second_derivative_is_refused(rng):
    q, k, v = (torch.from_numpy(x.astype(np.float32)).requires_grad_() for x in
               make(rng, (2, 30, 16), (2, 40, 16)))
    out = ft.scaled_dot_product_attention(q, k, v)
    grad_q, = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad_q.sum().backward()


def test_only_the_tensors_that_need_grad_get_one(rng):
    q, k, v = (torch.from_numpy(x.astype(np.float32)) for x in make(rng, (2, 30, 16), (2, 40, 16)))
    k.requires_grad_()
    ft.scaled_dot_product_attention(q, k, v).sum().backward()
    assert q.grad is None and v.grad is None and k.grad is not None


# --- bad input ---------------------------------------------------------------------------------------

@pytest.fixture
def qkv(rng):
    return [torch.from_numpy(x.astype(np.float32)) for x in make(rng, (2, 30, 16), (2, 40, 16))]


def test_mixed_devices_are_refused(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"same device.*key on meta"):
        ft.scaled_dot_product_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match=r"same device.*attn_mask on meta"):
        ft.scaled_dot_product_attention(q, k, v, torch.ones(30, 40, dtype=torch.bool,
                                                            device="meta"))


def test_mixed_dtypes_are_refused(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"same dtype.*key torch.float64"):
        ft.scaled_dot_product_attention(q, k.double(), v)
    with pytest.raises(TypeError, match=r"same dtype.*value torch.bfloat16"):
        ft.scaled_dot_product_attention(q, k, v.bfloat16())


def test_grad_through_an_unsupported_option_is_refused(qkv):
    q, k, v = qkv
    mask = torch.zeros(30, 40, requires_grad=True)
    with pytest.raises(ValueError, match="attn_mask needs grad"):
        ft.scaled_dot_product_attention(q, k, v, mask)
    slopes = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="alibi_slopes needs grad"):
        ft.scaled_dot_product_attention(q, k, v, alibi_slopes=slopes)
    with pytest.raises(ValueError, match="return_lse"):
        ft.scaled_dot_product_attention(q.requires_grad_(), k, v, return_lse=True)
    with torch.no_grad():  # without grad the same calls run
        ft.scaled_dot_product_attention(q, k, v, mask)
        ft.scaled_dot_product_attention(q, k, v, return_lse=True)


def test_other_bad_input(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        ft.scaled_dot_product_attention(q.numpy(), k, v)
    with pytest.raises(TypeError, match="unknown option"):
        ft.scaled_dot_product_attention(q, k, v, windw=(1, 0))
    with pytest.raises(TypeError, match="attn_mask must be a bool tensor"):
        ft.scaled_dot_product_attention(q, k, v, torch.ones(30, 40, dtype=torch.int64))
    with pytest.raises(NotImplementedError, match="dropout"):
        ft.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    with pytest.raises(TypeError, match="floating-point"):
        ft.scaled_dot_product_attention(q.int(), k.int(), v.int())


def test_import_fastattn_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, fastattn; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
