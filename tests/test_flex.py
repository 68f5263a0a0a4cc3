"""flex_attention, create_block_mask, and_masks/or_masks: the reference against plain formulas,
the CPU kernel against the reference (and against PyTorch's flex_attention where installed),
block masks against evaluating mask_mod everywhere, and bad input."""
import math

import numpy as np
import pytest

import fastattn
from fastattn import flex, reference

from conftest import assert_matches_reference

CPU = [b for b in ("numpy", "numba") if b in fastattn.backends()]


# The user functions of the tests, at module level so that Numba's cache keeps them between runs
# (each new pair of functions compiles the kernel once). Parameters come in through args.

def window(b, h, q_idx, kv_idx, left, right):
    """Keys from q_idx - left to q_idx + right (causal: right = 0)."""
    return (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)


def causal(b, h, q_idx, kv_idx, *args):
    return q_idx >= kv_idx


def prefix_lm(b, h, q_idx, kv_idx, prefix):
    """Bidirectional over the first ``prefix`` tokens, causal after."""
    return (kv_idx < prefix) | (q_idx >= kv_idx)


def same_document(b, h, q_idx, kv_idx, doc):
    return doc[b, q_idx] == doc[b, kv_idx]


def document_causal(b, h, q_idx, kv_idx, doc):
    return doc[b, q_idx] == doc[b, kv_idx] and kv_idx <= q_idx


def alibi(score, b, h, q_idx, kv_idx, slopes, *args):
    return score - slopes[h] * abs(q_idx - kv_idx)


def softcap(score, b, h, q_idx, kv_idx, cap, *args):
    return cap * math.tanh(score / cap)


def relative_bias(score, b, h, q_idx, kv_idx, table, *args):
    """A bias per head and distance, from a (H, L + S - 1) table."""
    return score + table[h, q_idx - kv_idx + table.shape[1] // 2]


def head_window(b, h, q_idx, kv_idx, widths):
    """A window per head: the mask depends on h."""
    return (kv_idx <= q_idx) & (q_idx - kv_idx < widths[h])


def late_keys(b, h, q_idx, kv_idx, first):
    """Keys from ``first`` on: rows before ``first`` see no key (causal)."""
    return (kv_idx >= first) & (kv_idx <= q_idx)


def inputs(rng, B=2, H=4, Hkv=None, L=37, S=None, E=16, Ev=8, dtype=np.float32):
    S = L if S is None else S
    Hkv = H if Hkv is None else Hkv
    q = rng.standard_normal((B, H, L, E)).astype(dtype)
    k = rng.standard_normal((B, Hkv, S, E)).astype(dtype)
    v = rng.standard_normal((B, Hkv, S, Ev)).astype(dtype)
    return q, k, v


def check(q, k, v, score_mod=None, mask_mod=None, backend="numba", **kwargs):
    """flex_attention on ``backend`` against the reference in float64 (accuracy rule)."""
    got = fastattn.flex_attention(q, k, v, score_mod, mask_mod, return_lse=True,
                                  backend=backend, **kwargs)
    ref_kwargs = dict(kwargs)
    block_mask = ref_kwargs.pop("block_mask", None)
    args = ref_kwargs.pop("args", ())
    if block_mask is not None:
        mask_mod = mask_mod or block_mask.mask_mod
        args = args or block_mask.args
        ref_kwargs.update(block_kinds=block_mask.kinds, block_size=block_mask.block_size)

    def ref(q, k, v):
        return reference.flex_attention(q, k, v, score_mod, mask_mod, args=args,
                                        return_lse=True, **ref_kwargs)

    assert_matches_reference(got, ref, q, k, v)
    return got


# --- the reference --------------------------------------------------------------------------------

def test_reference_is_sdpa_for_the_builtin_variants(rng):
    q, k, v = inputs(rng, L=20, S=26, dtype=np.float64)
    slopes = rng.random(4)
    got = reference.flex_attention(q, k, v, alibi, causal, args=(slopes,), return_lse=True)
    want = reference.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  alibi_slopes=slopes, return_lse=True)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)
    got = reference.flex_attention(q, k, v, None, window, args=(5, 0), return_lse=True)
    want = reference.scaled_dot_product_attention(q, k, v, window=(5, 0), is_causal=True,
                                                  return_lse=True)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)
    got = reference.flex_attention(q, k, v, softcap, args=(3.0,))
    want = reference.scaled_dot_product_attention(q, k, v, softcap=3.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_reference_grids_scalar_and_vector_agree():
    # document_causal uses `and` (scalars only): the element-by-element path
    doc = np.array([[0, 0, 1, 1, 1, 2]])
    grid = reference.flex_grid(document_causal, 6, 6, 0, 0, doc)
    want = (doc[0][:, None] == doc[0][None, :]) & np.tri(6, dtype=bool)
    np.testing.assert_array_equal(grid, want)
    np.testing.assert_array_equal(reference.flex_grid(same_document, 6, 6, 0, 0, doc),
                                  doc[0][:, None] == doc[0][None, :])


# --- the kernel against the reference -----------------------------------------------------------

@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("left,right", [(None, 0), (7, 0), (5, 3)])
def test_windows(rng, backend, left, right):
    q, k, v = inputs(rng, L=45, S=45)
    left = 10 ** 6 if left is None else left
    mask = fastattn.create_block_mask(window, None, None, 45, 45, args=(left, right),
                                      block_size=(8, 16))
    check(q, k, v, block_mask=mask, backend=backend)
    # without a block mask, mask_mod alone gives the same
    check(q, k, v, mask_mod=window, args=(left, right), backend=backend)


@pytest.mark.parametrize("backend", CPU)
def test_causal_matches_builtin_sdpa(rng, backend):
    q, k, v = inputs(rng, L=50, S=50)
    mask = fastattn.create_block_mask(causal, None, None, 50, 50, block_size=16)
    out, lse = fastattn.flex_attention(q, k, v, block_mask=mask, return_lse=True,
                                       backend=backend)
    want, want_lse = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                           return_lse=True, backend=backend)
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", CPU)
def test_prefix_lm_gqa(rng, backend):
    q, k, v = inputs(rng, H=4, Hkv=2, L=41, S=41)
    mask = fastattn.create_block_mask(prefix_lm, None, None, 41, 41, args=(13,),
                                      block_size=(8, 16))
    check(q, k, v, block_mask=mask, enable_gqa=True, backend=backend)


@pytest.mark.parametrize("backend", CPU)
def test_document_mask_changes_without_recompiling(rng, backend):
    B, L = 2, 53
    q, k, v = inputs(rng, B=B, L=L)
    kernels_before = None
    for seed in range(3):
        lengths = np.random.default_rng(seed).integers(1, 20, size=(B, 8))
        doc = np.stack([np.repeat(np.arange(8), row)[:L] for row in lengths])
        doc = np.pad(doc, ((0, 0), (0, L - doc.shape[1])), constant_values=99)
        mask = fastattn.create_block_mask(document_causal, B, None, L, L, args=(doc,),
                                          block_size=(16, 16))
        check(q, k, v, block_mask=mask, backend=backend)
        if backend == "numba":
            kernel = flex._last_kernel
            compiled = (len(flex._mods[document_causal].dispatcher.signatures),
                        flex_kernels().attention_kernel.cache_info().currsize,
                        len(kernel.signatures), sum(kernel.stats.cache_misses.values()))
            if kernels_before is not None:
                assert compiled == kernels_before, "new document ids recompiled something"
            kernels_before = compiled


def flex_kernels():
    from fastattn.kernels.cpu import flex as kernels
    return kernels


@pytest.mark.parametrize("backend", CPU)
def test_alibi_softcap_relative_bias_with_gqa(rng, backend):
    H, L, S = 4, 39, 47
    q, k, v = inputs(rng, H=H, Hkv=2, L=L, S=S)
    slopes = (2.0 ** -np.arange(1, H + 1)).astype(np.float32)
    mask = fastattn.create_block_mask(causal, None, None, L, S, block_size=(16, 32))
    check(q, k, v, alibi, block_mask=mask, args=(slopes,), enable_gqa=True, backend=backend)
    check(q * 4, k, v, softcap, block_mask=mask, args=(2.5,), enable_gqa=True, backend=backend)
    table = rng.standard_normal((H, L + S - 1)).astype(np.float32)
    check(q, k, v, relative_bias, args=(table,), enable_gqa=True, backend=backend)


@pytest.mark.parametrize("backend", CPU)
def test_rows_with_no_key(rng, backend):
    q, k, v = inputs(rng, L=30, S=30)
    mask = fastattn.create_block_mask(late_keys, None, None, 30, 30, args=(9,), block_size=16)
    out, lse = check(q, k, v, block_mask=mask, backend=backend)
    assert np.all(out[:, :, :9] == 0) and np.all(np.isneginf(lse[:, :, :9]))
    assert np.all(np.isfinite(lse[:, :, 9:]))


@pytest.mark.parametrize("backend", CPU)
def test_mask_per_head_and_combined_masks(rng, backend):
    H, L = 4, 40
    q, k, v = inputs(rng, H=H, L=L)
    widths = np.array([1, 5, 17, 40])
    mask = fastattn.create_block_mask(head_window, None, H, L, L, args=(widths,),
                                      block_size=(8, 16))
    assert mask.kinds.shape == (1, H, 5, 3)
    check(q, k, v, block_mask=mask, backend=backend)
    doc = np.repeat(np.arange(4), 10)[None].repeat(2, axis=0)
    both = fastattn.and_masks(same_document, causal)
    either = fastattn.or_masks(same_document, causal)
    for combined, want in ((both, document_causal), (either, None)):
        check(q, k, v, mask_mod=combined, args=(doc,), backend=backend)
    got = reference.flex_grid(either, L, L, 0, 0, doc)
    np.testing.assert_array_equal(got, (doc[0][:, None] == doc[0]) | np.tri(L, dtype=bool))


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_dtypes(rng, dtype):
    q, k, v = inputs(rng, L=33, S=29, dtype=dtype)
    mask = fastattn.create_block_mask(window, None, None, 33, 29, args=(6, 2), block_size=16)
    out = fastattn.flex_attention(q, k, v, block_mask=mask)
    assert out.dtype == dtype
    if dtype == np.float64:
        check(q, k, v, block_mask=mask)
    else:  # computed in float32, rounded to float16
        want = reference.flex_attention(*(x.astype(np.float64) for x in (q, k, v)),
                                        mask_mod=window, args=(6, 2))
        np.testing.assert_allclose(out.astype(np.float64), want, rtol=0, atol=2e-3)


def test_two_and_leading_dims(rng):
    q = rng.standard_normal((20, 8)).astype(np.float32)
    check(q, q, q, mask_mod=causal)
    q5 = rng.standard_normal((2, 3, 2, 20, 8)).astype(np.float32)
    check(q5, q5, q5, alibi, args=(np.arange(2.0, dtype=np.float32),))


def test_same_bits_with_one_and_two_threads(rng):
    import numba
    q, k, v = inputs(rng, L=70)
    mask = fastattn.create_block_mask(causal, None, None, 70, 70, block_size=16)
    results = []
    for threads in (1, 2):
        with_threads = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            results.append(fastattn.flex_attention(q, k, v, softcap, block_mask=mask,
                                                   args=(4.0,)))
        finally:
            numba.set_num_threads(with_threads)
    np.testing.assert_array_equal(results[0], results[1])


def test_inputs_not_written(rng):
    q, k, v = inputs(rng, L=20)
    table = rng.standard_normal((4, 39)).astype(np.float32)
    copies = [x.copy() for x in (q, k, v, table)]
    for x in (q, k, v, table):
        x.flags.writeable = False
    fastattn.flex_attention(q, k, v, relative_bias, causal, args=(table,))
    for x, c in zip((q, k, v, table), copies):
        np.testing.assert_array_equal(x, c)


# --- block masks --------------------------------------------------------------------------------

@pytest.mark.parametrize("mod,args,B,H", [
    (causal, (), None, None), (window, (5, 2), None, None), (prefix_lm, (11,), None, None),
    (head_window, (np.array([1, 9, 30]),), None, 3),
    (same_document, (np.repeat([[0, 1, 2], [3, 3, 4]], [10, 15, 12], axis=1),), 2, None)])
@pytest.mark.parametrize("block_size", [16, (7, 32)])
def test_block_mask_is_mask_mod_everywhere(mod, args, B, H, block_size):
    L, S = 37, 37
    mask = fastattn.create_block_mask(mod, B, H, L, S, args=args, block_size=block_size)
    dense = np.stack([np.stack([reference.flex_grid(mod, L, S, b, h, *args)
                                for h in range(H or 1)]) for b in range(B or 1)])
    bq, bk = mask.block_size
    assert mask.kinds.shape == (B or 1, H or 1, -(-L // bq), -(-S // bk))
    for qb in range(mask.kinds.shape[2]):
        for kb in range(mask.kinds.shape[3]):
            block = dense[:, :, qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
            want = np.where(block.all(axis=(2, 3)), 2, np.where(block.any(axis=(2, 3)), 1, 0))
            np.testing.assert_array_equal(mask.kinds[:, :, qb, kb], want)
    kept = mask.to_dense()
    assert kept.shape == (B or 1, H or 1, L, S)
    assert np.all(dense[kept == 2]) and not np.any(dense[kept == 0])
    assert 0 <= mask.sparsity <= 1 and "BlockMask(" in repr(mask)


def test_block_mask_skips_empty_blocks(rng):
    # A block mask that says a block is empty is obeyed (the kernel never reads it): with
    # block kinds from another mask the result follows the kinds, as the reference says.
    q, k, v = inputs(rng, L=32, S=32)
    narrow = fastattn.create_block_mask(window, None, None, 32, 32, args=(0, 0), block_size=16)
    assert narrow.kinds[0, 0, 0, 1] == 0
    got, _ = check(q, k, v, mask_mod=causal, block_mask=narrow)
    plain = fastattn.flex_attention(q, k, v, mask_mod=causal)
    np.testing.assert_allclose(got[:, :, :16], plain[:, :, :16], rtol=0, atol=1e-6)
    assert np.abs(got[:, :, 16:] - plain[:, :, 16:]).min() > 0


# --- PyTorch -----------------------------------------------------------------------------------------

def _torch_flex():
    torch = pytest.importorskip("torch")
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 6):
        pytest.skip("torch.nn.attention.flex_attention needs PyTorch >= 2.6")
    from torch.nn.attention import flex_attention as torch_flex
    return torch, torch_flex


@pytest.mark.filterwarnings("ignore")
def test_against_torch_flex_attention(rng):
    torch, tf = _torch_flex()
    B, H, Hkv, L, E = 2, 4, 2, 48, 16
    q, k, v = inputs(rng, B=B, H=H, Hkv=Hkv, L=L, E=E, Ev=E, dtype=np.float64)
    doc = np.repeat(np.arange(4), 12)[None].repeat(B, axis=0)
    doc[1] = np.repeat(np.arange(3), 16)
    slopes = 2.0 ** -np.arange(1, H + 1)
    table = rng.standard_normal((H, 2 * L - 1))
    tdoc, tslopes, ttable = (torch.from_numpy(x) for x in (doc, slopes, table))
    cases = [
        # (ours, our args, torch score_mod, torch mask_mod)
        (None, causal, (), None, lambda b, h, q_idx, kv_idx: q_idx >= kv_idx),
        (None, window, (6, 0), None,
         lambda b, h, q_idx, kv_idx: (kv_idx >= q_idx - 6) & (kv_idx <= q_idx)),
        (None, prefix_lm, (10,), None,
         lambda b, h, q_idx, kv_idx: (kv_idx < 10) | (q_idx >= kv_idx)),
        (None, same_document, (doc,), None,
         lambda b, h, q_idx, kv_idx: tdoc[b, q_idx] == tdoc[b, kv_idx]),
        (alibi, causal, (slopes,),
         lambda s, b, h, q_idx, kv_idx: s - tslopes[h] * (q_idx - kv_idx).abs(),
         lambda b, h, q_idx, kv_idx: q_idx >= kv_idx),
        (softcap, None, (2.0,), lambda s, b, h, q_idx, kv_idx: 2.0 * torch.tanh(s / 2.0), None),
        (relative_bias, None, (table,),
         lambda s, b, h, q_idx, kv_idx: s + ttable[h, q_idx - kv_idx + L - 1], None),
    ]
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    for ours, our_mask, args, theirs, their_mask in cases:
        block_mask = None if their_mask is None else tf.create_block_mask(
            their_mask, B, H, L, L, device="cpu")
        want, want_lse = tf.flex_attention(tq, tk, tv, score_mod=theirs, block_mask=block_mask,
                                           enable_gqa=True, return_lse=True)
        for backend in CPU:
            got, lse = fastattn.flex_attention(q, k, v, ours, our_mask, args=args,
                                               enable_gqa=True, return_lse=True,
                                               backend=backend)
            np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-10)
            np.testing.assert_allclose(lse, want_lse.numpy(), rtol=0, atol=1e-10)


# --- compiling, caching, the fast tanh -------------------------------------------------------------

def test_fast_tanh_accuracy():
    from numba import njit
    fast_tanh = flex_kernels().fast_tanh

    @njit
    def many(x, out):
        for i in range(x.shape[0]):
            out[i] = fast_tanh(x[i])

    x = np.concatenate([np.linspace(-12, 12, 200001), np.geomspace(1e-8, 1, 1000),
                        -np.geomspace(1e-8, 1, 1000)]).astype(np.float32)
    out = np.empty_like(x)
    many(x, out)
    exact = np.tanh(x.astype(np.float64))
    rel = np.abs(out - exact) / np.maximum(np.abs(exact), 1e-30)
    assert rel.max() < 5e-7, rel.max()
    nan = np.array([np.nan, np.inf, -np.inf], np.float32)
    out = np.empty_like(nan)
    many(nan, out)
    assert np.isnan(out[0]) and out[1] == 1 and out[2] == -1


def test_fingerprints_follow_code_constants_and_globals():
    def make(cap):
        def f(score, b, h, q_idx, kv_idx):
            return cap * math.tanh(score / cap)
        return f
    assert flex._fingerprint(make(2.0)) == flex._fingerprint(make(2.0))
    assert flex._fingerprint(make(2.0)) != flex._fingerprint(make(3.0))
    assert flex._fingerprint(window) != flex._fingerprint(causal)
    weird = object()

    def uses_an_object(b, h, q_idx, kv_idx):
        return weird is None
    assert flex._fingerprint(uses_an_object) is None  # not cached rather than cached wrongly


def test_jitted_functions_are_taken_as_they_are(rng):
    from numba import njit
    q, k, v = inputs(rng, L=24)
    got = fastattn.flex_attention(q, k, v, mask_mod=njit(causal))
    want = fastattn.flex_attention(q, k, v, mask_mod=causal)
    np.testing.assert_array_equal(got, want)


# --- bad input ------------------------------------------------------------------------------------

def test_wrong_number_of_arguments(rng):
    q, k, v = inputs(rng, L=16)
    with pytest.raises(TypeError, match=r"mask_mod 'prefix_lm' takes \(b, h, q_idx, kv_idx, "
                                        r"prefix\).*0 args from args"):
        fastattn.flex_attention(q, k, v, mask_mod=prefix_lm)
    with pytest.raises(TypeError, match="score_mod 'window' takes"):
        fastattn.flex_attention(q, k, v, window, args=(1, 2))
    with pytest.raises(TypeError, match="mask_mod must be a function"):
        fastattn.flex_attention(q, k, v, mask_mod=3)
    with pytest.raises(TypeError, match="mask_mod 'prefix_lm' takes"):
        fastattn.create_block_mask(prefix_lm, None, None, 16, 16)


def test_wrong_return_types(rng):
    q, k, v = inputs(rng, L=16)
    with pytest.raises(TypeError, match=r"score_mod 'causal' must return a float .*bool.*"
                                        r"mask_mod\?"):
        fastattn.flex_attention(q, k, v, causal, backend="numba")

    def not_a_bool(b, h, q_idx, kv_idx):
        return q_idx - kv_idx
    with pytest.raises(TypeError, match="mask_mod .*not_a_bool' must return a bool.*int64"):
        fastattn.flex_attention(q, k, v, mask_mod=not_a_bool, backend="numba")


def test_functions_numba_cannot_compile(rng):
    q, k, v = inputs(rng, L=16)
    table = {"a": 1}

    def uses_a_dict(b, h, q_idx, kv_idx):
        return table["a"] > 0

    with pytest.raises(TypeError, match="Numba cannot compile mask_mod .*uses_a_dict' for "
                                        r"arguments \(int64, int64, int64, int64\):\n"):
        fastattn.flex_attention(q, k, v, mask_mod=uses_a_dict, backend="numba")

    def writes_its_args(score, b, h, q_idx, kv_idx, bias):
        bias[0] = 1.0
        return score
    with pytest.raises(TypeError, match="Numba cannot compile score_mod .*writes_its_args"):
        fastattn.flex_attention(q, k, v, writes_its_args, args=(np.zeros(3),), backend="numba")


def test_args_that_do_not_match(rng):
    q, k, v = inputs(rng, L=16)
    with pytest.raises(TypeError, match=r"args\[0\] must be a NumPy array or a scalar.*got list"):
        fastattn.flex_attention(q, k, v, mask_mod=same_document, args=([0, 1],))
    with pytest.raises(TypeError, match="args must be a tuple"):
        fastattn.flex_attention(q, k, v, mask_mod=causal, args=np.zeros(3))
    with pytest.raises(TypeError, match=r"args\[0\] must be an array of bools, ints or floats"):
        fastattn.flex_attention(q, k, v, mask_mod=same_document, args=(np.array(["a"]),))
    # an array of the wrong dims: Numba says why, naming the function
    with pytest.raises(TypeError, match="Numba cannot compile mask_mod 'same_document'"):
        fastattn.flex_attention(q, k, v, mask_mod=same_document, args=(np.zeros(16),),
                                backend="numba")
    # an index out of range raises rather than reads past the array
    with pytest.raises(IndexError):
        fastattn.flex_attention(q, k, v, mask_mod=same_document, args=(np.zeros((2, 5)),),
                                backend="numba")


def test_block_mask_for_other_shapes(rng):
    q, k, v = inputs(rng, B=2, H=4, L=16)
    for B, H, L, S in ((None, None, 16, 20), (None, None, 12, 16), (3, None, 16, 16),
                       (None, 2, 16, 16)):
        mask = fastattn.create_block_mask(causal, B, H, L, S, block_size=16)
        with pytest.raises(ValueError, match=f"block_mask was made for B={B}, H={H}, L={L}, "
                                             f"S={S}, but"):
            fastattn.flex_attention(q, k, v, block_mask=mask)
    with pytest.raises(TypeError, match="block_mask must be a BlockMask"):
        fastattn.flex_attention(q, k, v, block_mask=np.ones((16, 16), bool))
    with pytest.raises(ValueError, match="block_size keys must be a multiple of 16"):
        fastattn.create_block_mask(causal, None, None, 16, 16, block_size=(16, 8))
    with pytest.raises(TypeError, match="H must be an int >= 1 or None"):
        fastattn.create_block_mask(causal, None, 2.0, 16, 16)
    with pytest.raises(ValueError, match="L must be >= 1"):
        fastattn.create_block_mask(causal, None, None, 0, 16)


# --- CUDA (in Numba's simulator, tiny tiles) --------------------------------------------------------

@pytest.fixture
def cuda_tiny(monkeypatch):
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    from fastattn import _backends
    if _backends.cuda_unavailable_reason() is not None:
        pytest.skip(_backends.cuda_unavailable_reason())
    from fastattn import _cuda
    from fastattn.kernels import cuda as kernels
    tiny = kernels.Tiles(block_q=4, block_k=4, rows_per_thread=2, threads_per_row=2, chunk=2,
                         block_v=4)
    monkeypatch.setattr(_cuda, "TILES", {np.dtype(np.float32): tiny, np.dtype(np.float64): tiny})


def test_cuda_block_mask_score_mod_gqa(rng, cuda_tiny):
    q, k, v = inputs(rng, B=1, H=2, Hkv=1, L=11, S=13, E=5, Ev=6, dtype=np.float64)
    mask = fastattn.create_block_mask(causal, None, None, 11, 13, block_size=(3, 16))
    slopes = np.array([0.5, 0.25])
    check(q, k, v, alibi, block_mask=mask, args=(slopes,), enable_gqa=True, backend="cuda")
    check(q * 3, k, v, softcap, mask_mod=causal, args=(1.5,), enable_gqa=True, backend="cuda")


def test_cuda_documents_rows_with_no_key_and_device_arrays(rng, cuda_tiny):
    from numba import cuda
    q, k, v = inputs(rng, B=2, H=1, L=10, S=10, E=4, Ev=4)
    doc = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1, 1, 3]])
    mask = fastattn.create_block_mask(document_causal, 2, None, 10, 10, args=(doc,),
                                      block_size=16)
    check(q, k, v, block_mask=mask, backend="cuda")
    out, lse = check(q, k, v, mask_mod=late_keys, args=(4,), backend="cuda")
    assert np.all(out[:, :, :4] == 0) and np.all(np.isneginf(lse[:, :, :4]))
    got = fastattn.flex_attention(*(cuda.to_device(x) for x in (q, k, v)), block_mask=mask,
                                  args=(cuda.to_device(doc),))
    assert hasattr(got, "copy_to_host")
    np.testing.assert_allclose(got.copy_to_host(),
                               fastattn.flex_attention(q, k, v, block_mask=mask), atol=1e-6)


# --- the benchmark's flex cases -------------------------------------------------------------------

@pytest.mark.parametrize("case", ["causal", "window", "softcap", "document", "prefix"])
def test_bench_flex_cases_agree_with_the_builtin_path(case):
    from fastattn.bench import impls
    p = impls.Problem(op="flex", flex=case, heads=2, length=64, dim=16)
    arrays = impls.make_inputs(p)
    got = impls.prepare("numba", p, arrays)()
    score_mod, mask_mod, args = impls._flex_functions(p)
    keep = impls._flex_keep(case, np.arange(64)[:, None], np.arange(64)[None, :], 64, 64)
    assert impls.flex_pairs(p) == keep.sum() and p.flops() == 4 * 2 * 16 * keep.sum()
    try:
        want = impls.prepare("sdpa", p, arrays)()
    except impls.Unavailable:  # (window and softcap: until the variants issue)
        want = fastattn.flex_attention(*(arrays[n] for n in "qkv"), score_mod, mask_mod,
                                       args=args, backend="numpy")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_tanh_in_float32_is_the_vectorised_one(rng):
    def make_softcap():
        import math as local_math

        def capped(score, b, h, q_idx, kv_idx, cap):
            return cap * local_math.tanh(score / cap)
        return capped

    def with_numpy(score, b, h, q_idx, kv_idx, cap):
        return cap * np.tanh(score / cap)

    fast = flex_kernels().fast_tanh
    closure_fn = make_softcap()
    rebound = flex._with_fast_tanh(closure_fn)
    assert rebound.__closure__[0].cell_contents.tanh is fast
    assert flex._with_fast_tanh(with_numpy).__globals__["np"].tanh is fast
    assert flex._with_fast_tanh(causal) is causal
    q, k, v = inputs(rng, L=30)
    for fn in (closure_fn, with_numpy, softcap):
        check(q * 3, k, v, fn, args=(1.5,))
