"""attention_with_kvcache and varlen_attention on the ``cuda`` backend, in Numba's CUDA simulator,
against the NumPy reference under the accuracy rule: decoding and chunked prefill over caches of
different fills (0 included), GQA, paged caches through a shuffled block table, the append (same
bits, nothing else written) into NumPy and device caches, split keys merged exactly, the
variants; varlen against one attention per sequence.

Tiles are tiny (4 query rows x 4 keys per block, 4 threads, 2 features and value rows staged at a
time, 4 output columns) so that the tiny inputs here span several key tiles, feature chunks,
row blocks (a GQA group of 4 heads, or several query positions, fill more than one) and value
column blocks, and key tiles that stop at page boundaries.
"""
import numpy as np
import pytest

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (pip install fastattn[cuda])")

import fastattn  # noqa: E402
from fastattn import _backends, reference  # noqa: E402

if _backends.cuda_unavailable_reason() is not None:
    raise RuntimeError(f"the cuda backend is not usable ({_backends.cuda_unavailable_reason()}): "
                       f"run the tests with NUMBA_ENABLE_CUDASIM=1")

from numba import cuda  # noqa: E402

from fastattn import _cuda_decode  # noqa: E402
from fastattn.kernels import cuda as kernels  # noqa: E402

from conftest import appended_cache, assert_matches_reference, assert_same_bits  # noqa: E402

TINY = kernels.Tiles(block_q=4, block_k=4, rows_per_thread=2, threads_per_row=2, chunk=2,
                     block_v=4)
S_MAX = 12
E, EV = 5, 6  # E: three feature chunks, the last partial; Ev: two value column blocks


@pytest.fixture(autouse=True)
def tiny_tiles(monkeypatch):
    monkeypatch.setattr(_cuda_decode, "TILES", {np.dtype(np.float32): TINY,
                                                np.dtype(np.float64): TINY})


@pytest.fixture(autouse=True, scope="module")
def _quick_thread_switches(quick_thread_switches):
    """(conftest.quick_thread_switches for every test here)"""


def _problem(rng, B, Hq, Hkv, Lq, dtype, S_max=S_MAX):
    q = rng.standard_normal((B, Hq, Lq, E)).astype(dtype)
    k_cache = rng.standard_normal((B, Hkv, S_max, E)).astype(dtype)
    v_cache = rng.standard_normal((B, Hkv, S_max, EV)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Lq, E)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Lq, EV)).astype(dtype)
    return q, k_cache, v_cache, k, v


def _lengths(Lq):
    return np.array([0, 1, 7, S_MAX - Lq])  # empty, one token, several tiles, full after


def _reference(seqlens, **options):
    def fn(q, k_cache, v_cache, k, v):
        return reference.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                                return_lse=True, **options)
    return fn


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("Lq, Hq, Hkv", [(1, 4, 1), (3, 2, 2)])
def test_decode_and_chunked_prefill_match_reference(rng, dtype, Lq, Hq, Hkv):
    # (1, 4, 1): one query row, a GQA group of 4 heads in one row block; (3, 2, 2): a chunk of
    # 3 queries, 2 heads of their own, the rows in two row blocks.
    q, k_cache, v_cache, k, v = _problem(rng, 4, Hq, Hkv, Lq, dtype)
    seqlens = _lengths(Lq)
    old_k, old_v = k_cache.copy(), v_cache.copy()
    inputs = [a.copy() for a in (q, k, v)]
    out, lse = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                               return_lse=True, backend="cuda")
    assert out.shape == (4, Hq, Lq, EV) and out.dtype == dtype and lse.shape == (4, Hq, Lq)
    assert_matches_reference((out, lse), _reference(seqlens), q, old_k, old_v, k, v)
    assert_same_bits(k_cache, appended_cache(old_k, k, seqlens))
    assert_same_bits(v_cache, appended_cache(old_v, v, seqlens))
    for given, kept in zip((q, k, v), inputs):
        assert_same_bits(given, kept)


def test_empty_cache_without_new_rows_gives_zeros_and_minus_inf(rng):
    q, k_cache, v_cache, _, _ = _problem(rng, 2, 2, 1, 1, np.float64)
    out, lse = fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=np.array([0, 3]),
                                               return_lse=True, backend="cuda")
    assert np.all(out[0] == 0) and np.all(lse[0] == -np.inf)
    assert_matches_reference((out, lse), _reference(np.array([0, 3])), q, k_cache, v_cache,
                             None, None)


def _paged(rng, k_cache, v_cache, block_size):
    """The contiguous caches as pages of ``block_size`` slots in a shuffled pool (NaN pages
    beside), and the block table."""
    B, Hkv, S_max = k_cache.shape[:3]
    per_row = -(-S_max // block_size)
    pool = B * per_row + 2
    order = rng.permutation(pool)[:B * per_row]
    table = order.reshape(B, per_row).astype(np.int32)
    kp = np.full((pool, Hkv, block_size, k_cache.shape[3]), np.nan, k_cache.dtype)
    vp = np.full((pool, Hkv, block_size, v_cache.shape[3]), np.nan, v_cache.dtype)
    for b in range(B):
        for i in range(per_row):
            t = slice(i * block_size, min(S_max, (i + 1) * block_size))
            n = t.stop - t.start
            kp[table[b, i], :, :n] = k_cache[b, :, t]
            vp[table[b, i], :, :n] = v_cache[b, :, t]
    return kp, vp, table


def _unpaged(paged, table, S_max):
    block_size = paged.shape[2]
    t = np.arange(S_max)
    return np.stack([np.swapaxes(paged[table[b, t // block_size], :, t % block_size], 0, 1)
                     for b in range(table.shape[0])])


@pytest.mark.parametrize("dtype, block_size, Lq", [(np.float32, 3, 1), (np.float64, 4, 2)])
def test_paged_cache_gives_what_the_contiguous_cache_gives(rng, dtype, block_size, Lq):
    # Pages of 3 slots cut the key tiles of 4 short; pages of 4 are one tile each.
    q, k_cache, v_cache, k, v = _problem(rng, 4, 4, 2, Lq, dtype)
    seqlens = _lengths(Lq)
    for b, n in enumerate(seqlens):  # slots past each row's fill are NaN: never read
        k_cache[b, :, n:] = np.nan
        v_cache[b, :, n:] = np.nan
    kp, vp, table = _paged(rng, k_cache, v_cache, block_size)
    old_kp, old_vp = kp.copy(), vp.copy()
    old = k_cache.copy(), v_cache.copy()
    options = dict(cache_seqlens=seqlens, return_lse=True, backend="cuda", softcap=3.0)
    want = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, **options)
    got = fastattn.attention_with_kvcache(q, kp, vp, k, v, block_table=table, **options)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    for g, w in zip(got, want):  # (pages of 3 cut the tiles elsewhere: not the same bits)
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    assert_matches_reference(got, _reference(seqlens, softcap=3.0), q, *old, k, v)
    np.testing.assert_array_equal(_unpaged(kp, table, S_MAX), k_cache)
    np.testing.assert_array_equal(_unpaged(vp, table, S_MAX), v_cache)
    written = np.zeros(kp.shape[:1] + kp.shape[2:3], bool)
    for b, n in enumerate(seqlens):
        t = np.arange(n, n + Lq)
        written[table[b, t // block_size], t % block_size] = True
    assert_same_bits(kp.transpose(0, 2, 1, 3)[~written], old_kp.transpose(0, 2, 1, 3)[~written])
    assert_same_bits(vp.transpose(0, 2, 1, 3)[~written], old_vp.transpose(0, 2, 1, 3)[~written])


def test_device_caches_are_read_and_written_on_the_device(rng):
    # Device arrays in, device arrays out (backend "auto"); the new rows are written into the
    # device caches by the copy kernel, paged through the table, and nothing else.
    dtype = np.float32
    q, k_cache, v_cache, k, v = _problem(rng, 3, 4, 2, 2, dtype)
    seqlens = np.array([0, 5, S_MAX - 2])
    kp, vp, table = _paged(rng, k_cache, v_cache, 4)
    d_kp, d_vp = cuda.to_device(kp), cuda.to_device(vp)
    out, lse = fastattn.attention_with_kvcache(cuda.to_device(q), d_kp, d_vp, cuda.to_device(k),
                                               cuda.to_device(v), cache_seqlens=seqlens,
                                               block_table=table, return_lse=True)
    assert _backends.is_device_array(out) and _backends.is_device_array(lse)
    assert_matches_reference((out.copy_to_host(), lse.copy_to_host()), _reference(seqlens), q,
                             k_cache, v_cache, k, v)
    want_k, want_v = appended_cache(k_cache, k, seqlens), appended_cache(v_cache, v, seqlens)
    new_kp, new_vp = d_kp.copy_to_host(), d_vp.copy_to_host()
    np.testing.assert_array_equal(_unpaged(new_kp, table, S_MAX), want_k)
    np.testing.assert_array_equal(_unpaged(new_vp, table, S_MAX), want_v)
    written = np.zeros(kp.shape[:1] + kp.shape[2:3], bool)
    for b, n in enumerate(seqlens):
        t = np.arange(n, n + 2)
        written[table[b, t // 4], t % 4] = True
    assert_same_bits(new_kp.transpose(0, 2, 1, 3)[~written], kp.transpose(0, 2, 1, 3)[~written])
    assert_same_bits(new_vp.transpose(0, 2, 1, 3)[~written], vp.transpose(0, 2, 1, 3)[~written])


@pytest.mark.parametrize("num_splits", [3, 8])
def test_split_keys_equal_the_unsplit_call(rng, num_splits):
    # Rows of 1 and 2 keys split 3 or 8 ways make empty splits: they count for nothing.
    q, k_cache, v_cache, k, v = _problem(rng, 4, 2, 1, 1, np.float64)
    seqlens = _lengths(1)
    old = k_cache.copy(), v_cache.copy()
    whole = fastattn.attention_with_kvcache(q, k_cache.copy(), v_cache.copy(), k, v,
                                            cache_seqlens=seqlens, return_lse=True,
                                            num_splits=1, backend="cuda")
    got = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                          return_lse=True, num_splits=num_splits, backend="cuda")
    for g, w in zip(got, whole):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)
    assert_matches_reference(got, _reference(seqlens), q, *old, k, v)


@pytest.mark.parametrize("dtype, options", [
    (np.float32, dict(window=(3, 0), softcap=2.0)),
    (np.float64, dict(window=(4, None), is_causal=False, alibi_slopes="rows")),
    (np.float64, dict(window=(0, 0), num_splits=2)),
], ids=["window-softcap", "noncausal-window-alibi", "diagonal-split"])
def test_variants_match_reference(rng, dtype, options):
    Lq = 2
    q, k_cache, v_cache, k, v = _problem(rng, 4, 2, 1, Lq, dtype)
    seqlens = _lengths(Lq)
    options = dict(options)
    if options.get("alibi_slopes") == "rows":
        options["alibi_slopes"] = rng.uniform(0.1, 1.0, (4, 2))
    splits = options.pop("num_splits", None)
    old = k_cache.copy(), v_cache.copy()
    got = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                          return_lse=True, num_splits=splits, backend="cuda",
                                          **options)
    assert_matches_reference(got, _reference(seqlens, **options), q, *old, k, v)


def test_bad_input_leaves_device_caches_untouched(rng):
    q, k_cache, v_cache, k, v = _problem(rng, 2, 2, 1, 2, np.float32)
    d_k, d_v = cuda.to_device(k_cache), cuda.to_device(v_cache)
    with pytest.raises(ValueError, match="exceeds S_max"):
        fastattn.attention_with_kvcache(q, d_k, d_v, k, v, cache_seqlens=np.array([0, S_MAX - 1]),
                                        backend="cuda")
    with pytest.raises(TypeError, match="same dtype"):
        fastattn.attention_with_kvcache(q.astype(np.float64), d_k, d_v, cache_seqlens=1,
                                        backend="cuda")
    assert_same_bits(d_k.copy_to_host(), k_cache)
    assert_same_bits(d_v.copy_to_host(), v_cache)
    with pytest.raises(TypeError, match="takes NumPy arrays"):
        fastattn.attention_with_kvcache(q, d_k, d_v, cache_seqlens=1, backend="numba")


# --- varlen -------------------------------------------------------------------------------------

def _packed(rng, lengths_q, lengths_k, Hq, Hkv, dtype):
    cu_q = np.concatenate([[0], np.cumsum(lengths_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lengths_k)]).astype(np.int64)
    q = rng.standard_normal((cu_q[-1], Hq, E)).astype(dtype)
    k = rng.standard_normal((cu_k[-1], Hkv, E)).astype(dtype)
    v = rng.standard_normal((cu_k[-1], Hkv, EV)).astype(dtype)
    return q, k, v, cu_q, cu_k


def _varlen_reference(cu_q, cu_k, **options):
    def fn(q, k, v):
        return reference.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, **options)
    return fn


@pytest.mark.parametrize("dtype, is_causal", [(np.float32, True), (np.float64, False)])
def test_varlen_equals_one_sdpa_per_sequence(rng, dtype, is_causal):
    lengths = [1, 6, 0, 9]
    q, k, v, cu_q, cu_k = _packed(rng, lengths, lengths, 4, 2, dtype)
    before = [a.copy() for a in (q, k, v)]
    out, lse = fastattn.varlen_attention(q, k, v, cu_q, cu_k, is_causal=is_causal,
                                         return_lse=True, backend="cuda")
    assert out.shape == (q.shape[0], 4, EV) and out.dtype == dtype and lse.shape == (4, 16)
    assert_matches_reference((out, lse), _varlen_reference(cu_q, cu_k, is_causal=is_causal),
                             q, k, v)
    for b in (1, 3):
        s = slice(cu_q[b], cu_q[b + 1])
        want = reference.scaled_dot_product_attention(
            *(np.swapaxes(a[s], 0, 1).astype(np.float64) for a in (q, k, v)),
            is_causal=is_causal, enable_gqa=True)
        np.testing.assert_allclose(np.swapaxes(out[s], 0, 1), want,
                                   atol=1e-10 if dtype == np.float64 else 1e-5)
    for now, then in zip((q, k, v), before):
        np.testing.assert_array_equal(now, then)


def test_varlen_cross_attention_variants_on_device(rng):
    # Queries and keys of different lengths, bottom-right aligned, window, softcap and ALiBi;
    # device arrays in, device arrays out.
    dtype = np.float64
    q, k, v, cu_q, cu_k = _packed(rng, [3, 2], [7, 1], 2, 1, dtype)
    slopes = np.array([0.5, 0.25])
    options = dict(is_causal=True, alignment="bottom_right", window=(4, None), softcap=1.5,
                   alibi_slopes=slopes)
    out, lse = fastattn.varlen_attention(*(cuda.to_device(a) for a in (q, k, v)), cu_q, cu_k,
                                         return_lse=True, **options)
    assert _backends.is_device_array(out)
    assert_matches_reference((out.copy_to_host(), lse.copy_to_host()),
                             _varlen_reference(cu_q, cu_k, **options), q, k, v)


def test_the_gpu_tiles(rng, monkeypatch):
    # The tiles the GPU runs (one row per thread in float32, 16 threads per row, 64-key tiles),
    # on one work item: a GQA group of 4 heads over 70 keys, two key tiles, the second partial.
    monkeypatch.setattr(_cuda_decode, "TILES", _cuda_decode.GPU_TILES)
    dtype = np.float32
    q = rng.standard_normal((1, 4, 1, 16)).astype(dtype)
    k_cache = rng.standard_normal((1, 1, 80, 16)).astype(dtype)
    v_cache = rng.standard_normal((1, 1, 80, 16)).astype(dtype)
    got = fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=70, return_lse=True,
                                          softcap=4.0, backend="cuda")
    assert_matches_reference(got, _reference(70, softcap=4.0), q, k_cache, v_cache, None, None)
