"""float16 and bfloat16 (ml_dtypes) inputs: read in place by the CPU kernels, widened exactly to
float32 as they are loaded, computed in float32 and returned in their own dtype.

The accuracy rule for a 16-bit result: against the float64 reference on the same (16-bit)
inputs, the max error is at most 2x that of the plain NumPy computation delivered in that dtype
(float32 on the widened inputs, rounded to the 16-bit dtype), plus 1e-6. Since widening is
exact, the kernels must also give their own float32 result on the widened inputs, rounded to the
16-bit dtype, to within one 16-bit step (and the lse to float32's rounding): not bit for bit,
because each specialisation's float32 sums are vectorised by LLVM as it was compiled
(reassociation allowed), see ``assert_within_one_step``.
"""
import tracemalloc

import numpy as np
import pytest

import fastattn
from fastattn import reference


def _bfloat16():
    return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)


@pytest.fixture(params=["float16", "bfloat16"])
def dtype(request):
    return np.dtype(np.float16) if request.param == "float16" else _bfloat16()


def bits(x):
    return np.ascontiguousarray(x).view(np.uint16)


def ordered(x):
    """16-bit values as integers in their order, adjacent values 1 apart (+0 and -0 both 0)."""
    b = bits(x).astype(np.int32)
    return np.where(b & 0x8000, -(b & 0x7FFF), b & 0x7FFF)


def assert_within_one_step(got, want):
    """A kernel's float32 sums may run in another order for 16-bit loads: LLVM vectorises each
    specialisation's loops its own way (reassociation allowed), and the way can follow what else
    was compiled in the same process (measured on a Zen 4 VM: the fused kernel's 16-bit results
    were bit for bit its float32 ones rounded when both came from Numba's cache, and one step
    apart in 1 of 22400 values, the lse in the last float32 bit in 0.2-3.6% of rows, when the
    16-bit kernel was compiled after the rest of the suite's kernels and the float32 one in an
    earlier process). So the 16-bit results agree with the float32 kernel's rounded to within
    one step of the 16-bit dtype."""
    assert np.max(np.abs(ordered(got) - ordered(want))) <= 1


def widened(*arrays, dtype=np.float32):
    """The arrays in ``dtype`` (bool masks as they are)."""
    return [a if a is None or a.dtype == np.bool_ else a.astype(dtype) for a in arrays]


def assert_sixteen_bit_matches(got, reference_fn, *inputs, **kwargs):
    """The accuracy rule for a 16-bit result (see the module's doc). ``got`` and the reference's
    result: an output (compared in the inputs' dtype) or (out, lse) (lse in float32)."""
    dtype = inputs[0].dtype
    exact = reference_fn(*widened(*inputs, dtype=np.float64), **kwargs)
    plain = reference_fn(*widened(*inputs), **kwargs)
    got, exact, plain = ((x,) if not isinstance(x, tuple) else x for x in (got, exact, plain))
    for i, (g, e, p) in enumerate(zip(got, exact, plain)):
        if i == 0:  # the output, delivered in the inputs' dtype
            assert g.dtype == dtype, (g.dtype, dtype)
            p = p.astype(dtype)
        else:
            assert g.dtype == np.float32
        g64, p64 = g.astype(np.float64), p.astype(np.float64)
        np.testing.assert_array_equal(np.isfinite(g64), np.isfinite(e))
        finite = np.isfinite(e)
        if not finite.any():
            continue
        err = np.max(np.abs(g64[finite] - e[finite]))
        plain_err = np.max(np.abs(p64[finite] - e[finite]))
        assert err <= 2 * plain_err + 1e-6, f"error {err:.3g} vs plain {plain_err:.3g}"


# --- the widening itself ---------------------------------------------------------------------------

def test_widen_is_exact_for_every_bit_pattern():
    """All 65536 float16 and bfloat16 patterns, subnormals, infinities and NaN payloads
    included, widen to the float32 bits NumPy (float16) and the bfloat16 definition (the upper
    half of a float32) give."""
    import numba

    from fastattn.kernels.cpu.widen import widen

    @numba.njit
    def widen_all(a, out):
        for i in range(a.shape[0]):
            out[i] = widen(a[i])

    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(1 << 16, np.float32)
    widen_all(patterns.view(np.int16), out)
    np.testing.assert_array_equal(out.view(np.uint32),
                                  patterns.view(np.float16).astype(np.float32).view(np.uint32))
    widen_all(patterns, out)
    np.testing.assert_array_equal(out.view(np.uint32), patterns.astype(np.uint32) << 16)


# --- scaled_dot_product_attention -----------------------------------------------------------------

def qkv(rng, dtype, shape_q, shape_k, Ev=None):
    Ev = shape_k[-1] if Ev is None else Ev
    return (rng.standard_normal(shape_q).astype(dtype), rng.standard_normal(shape_k).astype(dtype),
            rng.standard_normal((*shape_k[:-1], Ev)).astype(dtype))


CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "bool mask": dict(mask="bool"),
    "float mask, causal": dict(mask="float", is_causal=True),
    "gqa": dict(enable_gqa=True),
    "window, bottom right": dict(is_causal=True, window=(20, 0), alignment="bottom_right"),
    "softcap": dict(softcap=5.0),
    "alibi": dict(alibi_slopes="alibi", is_causal=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa(rng, dtype, backend, case):
    options = dict(CASES[case])
    L, S = 70, 90
    Hkv = 2 if options.get("enable_gqa") else 4
    q, k, v = qkv(rng, dtype, (2, 4, L, 24), (2, Hkv, S, 24), Ev=40)
    mask = options.pop("mask", None)
    if mask == "bool":
        mask = rng.random((2, 1, L, S)) > 0.3
    elif mask == "float":
        mask = rng.standard_normal((L, S)).astype(dtype)
    if options.get("alibi_slopes") is not None:
        options["alibi_slopes"] = np.linspace(0.05, 0.5, 4)
    before = [x.copy() for x in (q, k, v)]
    got = fastattn.scaled_dot_product_attention(q, k, v, mask, return_lse=True, backend=backend,
                                                **options)
    for x, b in zip((q, k, v), before):  # inputs are never written to
        np.testing.assert_array_equal(bits(x), bits(b))

    def ref(q, k, v, mask):
        if mask is not None and mask.dtype != np.bool_:
            mask = mask.astype(q.dtype)
        return reference.scaled_dot_product_attention(q, k, v, mask, return_lse=True, **options)

    assert_sixteen_bit_matches(got, ref, q, k, v, mask)
    # widening is exact: the float32 computation on the widened inputs, rounded
    want_out, want_lse = fastattn.scaled_dot_product_attention(
        *widened(q, k, v, mask), return_lse=True, backend=backend, **options)
    assert_within_one_step(got[0], want_out.astype(dtype))
    np.testing.assert_allclose(got[1], want_lse, rtol=1e-6, atol=1e-6)  # (an lse near 0)


def test_sdpa_strided_inputs(rng, dtype):
    q, k, v = qkv(rng, dtype, (2, 40, 4, 16), (2, 50, 4, 16))  # (B, L, H, E): heads strided
    q, k, v = (np.swapaxes(x, 1, 2) for x in (q, k, v))
    got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="numba")
    # the same kernel on contiguous copies, bit for bit; the float32 one within one step
    same = fastattn.scaled_dot_product_attention(*(np.ascontiguousarray(x) for x in (q, k, v)),
                                                 is_causal=True, backend="numba")
    np.testing.assert_array_equal(bits(got), bits(same))
    want = fastattn.scaled_dot_product_attention(*widened(q, k, v), is_causal=True,
                                                 backend="numba")
    assert_within_one_step(got, want.astype(dtype))


@pytest.fixture
def attention_kernel_inputs(monkeypatch):
    """The arrays the fused CPU attention kernel is called with."""
    from fastattn.kernels import cpu
    seen = {}
    attention = cpu.attention

    def spy(q, k, v, *args):
        seen.update(q=q, k=k, v=v)
        return attention(q, k, v, *args)

    monkeypatch.setattr(cpu, "attention", spy)
    return seen


def test_the_kernel_reads_q_k_v_in_place(rng, dtype, attention_kernel_inputs):
    """No float32 (nor any) copy of contiguous 16-bit q, k, v: the kernel gets views of the
    caller's memory, as the integer type that says what the bits are."""
    q, k, v = qkv(rng, dtype, (1, 4, 30, 16), (1, 2, 40, 16))
    fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="numba")
    view = np.int16 if dtype == np.float16 else np.uint16
    for name, x in (("q", q), ("k", k), ("v", v)):
        got = attention_kernel_inputs[name]
        assert got.dtype == view, (name, got.dtype)
        assert got.ctypes.data == x.ctypes.data and got.nbytes == x.nbytes, name


def test_cosine_similarity(rng, dtype, backend):
    q, k, v = qkv(rng, dtype, (2, 30, 16), (2, 40, 16))
    got = fastattn.scaled_dot_product_attention(q, k, v, similarity="cosine", scale=4.0,
                                                backend=backend)
    assert_sixteen_bit_matches(got, lambda q, k, v: reference.scaled_dot_product_attention(
        q, k, v, similarity="cosine", scale=4.0), q, k, v)


# --- decoding from a KV cache --------------------------------------------------------------------

def _cache_problem(rng, dtype, B=2, Hq=4, Hkv=2, Lq=1, E=32, S_max=64):
    q = rng.standard_normal((B, Hq, Lq, E)).astype(dtype)
    k_cache = rng.standard_normal((B, Hkv, S_max, E)).astype(dtype)
    v_cache = rng.standard_normal((B, Hkv, S_max, E)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Lq, E)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Lq, E)).astype(dtype)
    return q, k_cache, v_cache, k, v


@pytest.mark.parametrize("Lq", [1, 3])
def test_kvcache_writes_the_new_rows_and_attends(rng, dtype, backend, Lq):
    q, k_cache, v_cache, k, v = _cache_problem(rng, dtype, Lq=Lq)
    lengths = np.array([10, 37])
    old_k, old_v = k_cache.copy(), v_cache.copy()
    got = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths,
                                          softcap=20.0, return_lse=True, backend=backend)
    # the cache after the call: the old contents with the new rows in place, bit for bit
    want_k, want_v = old_k.copy(), old_v.copy()
    for b, n in enumerate(lengths):
        want_k[b, :, n:n + Lq] = k[b]
        want_v[b, :, n:n + Lq] = v[b]
    np.testing.assert_array_equal(bits(k_cache), bits(want_k))
    np.testing.assert_array_equal(bits(v_cache), bits(want_v))

    def ref(q, k_cache, v_cache):
        return reference.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths + Lq,
                                                softcap=20.0, return_lse=True)

    assert_sixteen_bit_matches(got, ref, q, k_cache, v_cache)
    want = fastattn.attention_with_kvcache(*widened(q, k_cache, v_cache),
                                           cache_seqlens=lengths + Lq, softcap=20.0,
                                           return_lse=True, backend=backend)
    assert_within_one_step(got[0], want[0].astype(dtype))
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


def test_kvcache_paged_and_split(rng, dtype):
    B, Hkv, block, E = 2, 2, 16, 16
    blocks = rng.permutation(12)
    table = blocks.reshape(B, 6)
    k_cache = rng.standard_normal((12, Hkv, block, E)).astype(dtype)
    v_cache = rng.standard_normal((12, Hkv, block, E)).astype(dtype)
    q = rng.standard_normal((B, 4, 1, E)).astype(dtype)
    lengths = np.array([70, 96])
    got = fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                          block_table=table, num_splits=3, backend="numba")
    want = fastattn.attention_with_kvcache(*widened(q, k_cache, v_cache), cache_seqlens=lengths,
                                           block_table=table, num_splits=3, backend="numba")
    assert_within_one_step(got, want.astype(dtype))
    assert_sixteen_bit_matches(got, lambda q, kc, vc: reference.attention_with_kvcache(
        q, kc, vc, cache_seqlens=lengths, block_table=table), q, k_cache, v_cache)


def test_kvcache_makes_no_float32_copy_of_the_cache(rng, dtype):
    """The decode kernel widens the cache as it loads it: the peak of the host's allocations is
    far below one float32 copy of the key cache (4 MiB here)."""
    B, Hkv, S_max, E = 1, 4, 4096, 64
    k_cache = np.ones((B, Hkv, S_max, E), dtype)
    v_cache = np.ones((B, Hkv, S_max, E), dtype)
    q = rng.standard_normal((B, 8, 1, E)).astype(dtype)
    k = rng.standard_normal((B, Hkv, 1, E)).astype(dtype)
    fastattn.attention_with_kvcache(q, k_cache, v_cache, k, k, cache_seqlens=100)  # compiled
    tracemalloc.start()
    try:
        out = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, k,
                                              cache_seqlens=S_max - 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    float32_copy = k_cache.size * 4
    assert peak < float32_copy / 8, (peak, float32_copy)
    assert out.dtype == dtype and np.all(np.isfinite(out.astype(np.float32)))


# --- varlen ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("lengths", [[5, 17, 30], [260, 9]], ids=["rows", "fused"])
def test_varlen(rng, dtype, backend, lengths):
    """Short sequences go to the row kernel, long ones (L * S >= 256 * 256) to the fused one."""
    cu = np.concatenate([[0], np.cumsum(lengths)])
    total = int(cu[-1])
    q = rng.standard_normal((total, 4, 16)).astype(dtype)
    k = rng.standard_normal((total, 2, 16)).astype(dtype)
    v = rng.standard_normal((total, 2, 16)).astype(dtype)
    got = fastattn.varlen_attention(q, k, v, cu, cu, is_causal=True, return_lse=True,
                                    backend=backend)
    assert_sixteen_bit_matches(got, lambda q, k, v: reference.varlen_attention(
        q, k, v, cu, cu, is_causal=True, return_lse=True), q, k, v)
    want = fastattn.varlen_attention(*widened(q, k, v), cu, cu, is_causal=True, return_lse=True,
                                     backend=backend)
    assert_within_one_step(got[0], want[0].astype(dtype))


# --- the backward (computed on float32 copies) -----------------------------------------------------

def test_backward(rng, dtype, backend):
    q, k, v = qkv(rng, dtype, (1, 2, 40, 16), (1, 2, 50, 16))
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True,
                                                     backend=backend)
    grad_out = rng.standard_normal(out.shape).astype(dtype)
    got = fastattn.scaled_dot_product_attention_backward(grad_out, q, k, v, out, lse,
                                                         is_causal=True, backend=backend)
    assert all(g.dtype == dtype for g in got)
    want = fastattn.scaled_dot_product_attention_backward(
        *widened(grad_out, q, k, v, out), lse, is_causal=True, backend=backend)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(bits(g), bits(w.astype(dtype)))


def test_bfloat16_has_no_cuda_kernels():
    bf16 = _bfloat16()
    q = np.zeros((1, 4, 8), bf16)
    if "cuda" not in fastattn.backends():
        pytest.skip("no cuda backend here (not even the simulator)")
    with pytest.raises(TypeError, match="no bfloat16 kernels"):
        fastattn.scaled_dot_product_attention(q, q, q, backend="cuda")


def test_the_other_functions_take_bfloat16(rng, backend):
    bf16 = _bfloat16()
    x = rng.standard_normal((2, 6, 8)).astype(bf16)
    w = fastattn.attention_weights(x, x, is_causal=True, backend=backend)
    assert w.dtype == bf16
    want = fastattn.attention_weights(x.astype(np.float32), x.astype(np.float32),
                                      is_causal=True, backend=backend)
    np.testing.assert_array_equal(bits(w), bits(want.astype(bf16)))
    assert fastattn.softmax(x, backend=backend).dtype == bf16
    assert fastattn.similarity(x, x, "cosine", backend=backend).dtype == bf16
