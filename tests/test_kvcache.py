"""attention_with_kvcache: decoding and chunked prefill over contiguous and paged caches against
the NumPy reference, the in-place append (same bits, nothing else written), split-KV merging,
and bad input leaving the caches untouched."""
import importlib.util

import numpy as np
import pytest

import fastattn
from fastattn import reference

from conftest import appended_cache, assert_matches_reference, assert_same_bits

S_MAX = 1100


def _problem(rng, B, Hq, Hkv, Lq, E, dtype, S_max=S_MAX, Ev=None):
    Ev = E if Ev is None else Ev
    q = rng.standard_normal((B, Hq, Lq, E)).astype(dtype)
    k_cache = rng.standard_normal((B, Hkv, S_max, E)).astype(dtype)
    v_cache = rng.standard_normal((B, Hkv, S_max, Ev)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Lq, E)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Lq, Ev)).astype(dtype)
    return q, k_cache, v_cache, k, v


def _lengths(Lq, S_max=S_MAX):
    # Rows of different fill: empty, one token, long, and full once the new rows are in.
    return np.array([0, 1, 1000, S_max - Lq])


def _reference(seqlens, with_lse=True, **options):
    def fn(q, k_cache, v_cache, k, v):
        return reference.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                                return_lse=with_lse, **options)
    return fn


SHAPES = [(Lq, heads, E) for Lq in (1, 16) for heads in ((32, 8), (8, 1)) for E in (64, 128)]
# Chunks of 64 queries against 32 heads cost the reference the most: fewer of them.
SHAPES += [(64, (32, 8), 64), (64, (8, 1), 128)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("Lq, heads, E", SHAPES)
def test_decode_and_chunked_prefill_match_reference(backend, rng, dtype, E, heads, Lq):
    Hq, Hkv = heads
    q, k_cache, v_cache, k, v = _problem(rng, 4, Hq, Hkv, Lq, E, dtype)
    seqlens = _lengths(Lq)
    old_k, old_v = k_cache.copy(), v_cache.copy()
    inputs = [a.copy() for a in (q, k, v)]
    out, lse = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                               return_lse=True, backend=backend)
    assert out.shape == (4, Hq, Lq, E) and out.dtype == dtype and lse.shape == (4, Hq, Lq)
    assert_matches_reference((out, lse), _reference(seqlens), q, old_k, old_v, k, v)
    # The caches hold exactly the old contents plus the new rows; the other inputs are as given.
    assert_same_bits(k_cache, appended_cache(old_k, k, seqlens))
    assert_same_bits(v_cache, appended_cache(old_v, v, seqlens))
    for given, kept in zip((q, k, v), inputs):
        assert_same_bits(given, kept)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("Lq", [1, 16])
@pytest.mark.parametrize("options", [
    dict(window=(100, 0)),
    dict(window=(0, 0)),
    dict(window=(300, None), is_causal=False),
    dict(window=(None, 5), is_causal=False),
    dict(softcap=2.0),
    dict(softcap=1.5, window=(40, 0)),
    dict(is_causal=False),
    dict(alibi_slopes="heads"),
    dict(alibi_slopes="rows", window=(64, 0), scale=0.3),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_variants_match_reference(backend, rng, dtype, Lq, options):
    Hq, Hkv, E = 8, 2, 64
    q, k_cache, v_cache, k, v = _problem(rng, 4, Hq, Hkv, Lq, E, dtype)
    options = dict(options)
    if options.get("alibi_slopes") == "heads":
        options["alibi_slopes"] = 2.0 ** -np.arange(1, Hq + 1)
    elif options.get("alibi_slopes") == "rows":
        options["alibi_slopes"] = rng.uniform(0, 0.2, (4, Hq))
    seqlens = _lengths(Lq)
    old_k, old_v = k_cache.copy(), v_cache.copy()
    got = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                          return_lse=True, backend=backend, **options)
    assert_matches_reference(got, _reference(seqlens, **options), q, old_k, old_v, k, v)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_without_new_rows_attends_over_the_cache(backend, rng, dtype):
    # No k and v: row b sees its first cache_seqlens[b] keys, the queries bottom-right aligned
    # (an empty row, or one shorter than Lq under causal attention, has rows that see nothing).
    q, k_cache, v_cache, _, _ = _problem(rng, 4, 8, 2, 3, 64, dtype)
    seqlens = np.array([0, 2, 700, S_MAX])
    before = k_cache.copy(), v_cache.copy()
    got = fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                          return_lse=True, backend=backend)
    assert_matches_reference(got, _reference(seqlens), q, *before, None, None)
    assert np.all(got[0][0] == 0) and np.all(np.isneginf(got[1][0]))
    assert np.all(np.isneginf(got[1][1, :, 0])) and np.all(np.isfinite(got[1][1, :, 1:]))
    assert_same_bits(k_cache, before[0])
    assert_same_bits(v_cache, before[1])


def test_int_cache_seqlens_and_value_size(backend, rng):
    q, k_cache, v_cache, k, v = _problem(rng, 2, 4, 2, 2, 32, np.float32, S_max=300, Ev=48)
    old = k_cache.copy(), v_cache.copy()
    got = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=250,
                                          return_lse=True, backend=backend)
    assert got[0].shape == (2, 4, 2, 48)
    assert_matches_reference(got, _reference(250), q, *old, k, v)


def _paged(rng, k_cache, v_cache, block_size, spare_blocks=3):
    """The same caches paged: row b's blocks at shuffled places, unused blocks full of NaN."""
    B, Hkv, S_max, E = k_cache.shape
    per_row = -(-S_max // block_size)
    num_blocks = B * per_row + spare_blocks
    order = rng.permutation(num_blocks)[:B * per_row]
    table = order.reshape(B, per_row).astype(np.int32)
    kp = np.full((num_blocks, Hkv, block_size, E), np.nan, k_cache.dtype)
    vp = np.full((num_blocks, Hkv, block_size, v_cache.shape[3]), np.nan, v_cache.dtype)
    for b in range(B):
        for i in range(per_row):
            t = slice(i * block_size, min(S_max, (i + 1) * block_size))
            n = t.stop - t.start
            kp[table[b, i], :, :n] = k_cache[b, :, t]
            vp[table[b, i], :, :n] = v_cache[b, :, t]
    return kp, vp, table


def _unpaged(paged, table, S_max):
    B = table.shape[0]
    block_size = paged.shape[2]
    t = np.arange(S_max)
    return np.stack([np.swapaxes(paged[table[b, t // block_size], :, t % block_size], 0, 1)
                     for b in range(B)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("Lq", [1, 16])
def test_paged_cache_gives_what_the_contiguous_cache_gives(backend, rng, dtype, block_size, Lq):
    q, k_cache, v_cache, k, v = _problem(rng, 4, 8, 2, Lq, 64, dtype)
    # Slots past each row's fill are NaN: nothing there may be read.
    seqlens = _lengths(Lq)
    for b, n in enumerate(seqlens):
        k_cache[b, :, n:] = np.nan
        v_cache[b, :, n:] = np.nan
    kp, vp, table = _paged(rng, k_cache, v_cache, block_size)
    old_kp, old_vp = kp.copy(), vp.copy()
    old = k_cache.copy(), v_cache.copy()
    options = dict(cache_seqlens=seqlens, return_lse=True, backend=backend, window=(500, 0),
                   softcap=3.0)
    want = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, **options)
    got = fastattn.attention_with_kvcache(q, kp, vp, k, v, block_table=table, **options)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    assert_matches_reference(got, _reference(seqlens, window=(500, 0), softcap=3.0), q, *old,
                             k, v)
    # The paged caches, read through the table, hold what the contiguous ones hold; the blocks
    # outside the table and the slots past the new rows are untouched (NaN, same bits).
    np.testing.assert_array_equal(_unpaged(kp, table, S_MAX), k_cache)
    np.testing.assert_array_equal(_unpaged(vp, table, S_MAX), v_cache)
    written = np.zeros(kp.shape[:1] + kp.shape[2:3], bool)
    for b, n in enumerate(seqlens):
        t = np.arange(n, n + Lq)
        written[table[b, t // block_size], t % block_size] = True
    assert_same_bits(kp.transpose(0, 2, 1, 3)[~written], old_kp.transpose(0, 2, 1, 3)[~written])
    assert_same_bits(vp.transpose(0, 2, 1, 3)[~written], old_vp.transpose(0, 2, 1, 3)[~written])


def test_paged_table_with_padding_entries(backend, rng):
    # Entries past a row's keys are never read, so -1 padding there is allowed.
    q, k_cache, v_cache, k, v = _problem(rng, 2, 4, 2, 1, 32, np.float32, S_max=64)
    kp, vp, table = _paged(rng, k_cache, v_cache, 16)
    table = table.astype(np.int64)
    table[0, 2:] = -1
    got = fastattn.attention_with_kvcache(q, kp, vp, k, v, cache_seqlens=np.array([20, 50]),
                                          block_table=table, return_lse=True, backend=backend)
    want = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v,
                                           cache_seqlens=np.array([20, 50]), return_lse=True,
                                           backend=backend)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 64])
def test_split_keys_equal_the_unsplit_call(rng, num_splits):
    # Rows with 0 and 1 keys make empty splits: they count for nothing in the merge.
    q, k_cache, v_cache, k, v = _problem(rng, 4, 8, 2, 1, 64, np.float64)
    seqlens = _lengths(1)
    old = k_cache.copy(), v_cache.copy()
    got = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                          return_lse=True, num_splits=num_splits,
                                          backend="numba")
    assert_matches_reference(got, _reference(seqlens), q, *old, k, v)


def test_merge_attention_over_cache_parts_equals_the_whole(backend, rng):
    # Attention over the keys [0, a), [a, a) (empty) and [a, n) of a cache, each from its own
    # call, merged by merge_attention: the call over all n keys.
    q, k_cache, v_cache, _, _ = _problem(rng, 2, 8, 2, 1, 64, np.float64, S_max=900)
    n, a = 900, 350
    whole = fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=n,
                                            is_causal=False, return_lse=True, backend=backend)
    parts = [fastattn.attention_with_kvcache(q, k_cache[:, :, lo:hi], v_cache[:, :, lo:hi],
                                             cache_seqlens=hi - lo, is_causal=False,
                                             return_lse=True, backend=backend, num_splits=3)
             for lo, hi in ((0, a), (a, a), (a, n))]
    assert np.all(np.isneginf(parts[1][1]))
    out, lse = fastattn.merge_attention(*zip(*parts))
    np.testing.assert_allclose(out, whole[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(lse, whole[1], rtol=0, atol=1e-12)


def test_results_do_not_depend_on_the_thread_count(rng):
    numba = pytest.importorskip("numba")
    q, k_cache, v_cache, _, _ = _problem(rng, 1, 8, 2, 1, 64, np.float32, S_max=3000)
    threads = numba.get_num_threads()
    got = []
    try:
        for n in sorted({1, threads}):
            numba.set_num_threads(n)
            got.append(fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=3000,
                                                       return_lse=True, backend="numba"))
    finally:
        numba.set_num_threads(threads)
    for out, lse in got[1:]:
        assert_same_bits(out, got[0][0])
        assert_same_bits(lse, got[0][1])


@pytest.mark.parametrize("nsplit,threads", [(1, 1), (1, 3), (4, 2), (3, 5)])
def test_schedule_splits_every_block_and_deals_by_cost(nsplit, threads):
    pytest.importorskip("numba")
    from fastattn.kernels.cpu import decode
    # (sequence, key/value head, first and end query position, first and end key)
    blocks = np.array([(0, 0, 0, 4, 0, 1000), (0, 1, 0, 4, 0, 1000), (1, 0, 0, 2, 5, 300),
                       (1, 1, 2, 4, 0, 0), (2, 0, 0, 1, 10, 4000)], np.int64)
    group = 3
    items, slot_start, merges, parts = decode.schedule(blocks, group, nsplit, threads)
    assert items.shape == (len(blocks) * nsplit, 7)
    assert slot_start[0] == 0 and slot_start[-1] == len(items) and len(slot_start) == threads + 1
    assert np.all(np.diff(slot_start) >= 0)
    for b in blocks:  # each block's keys, split into nsplit consecutive ranges
        mine = items[np.all(items[:, :4] == b[:4], axis=1)]
        assert len(mine) == nsplit
        ranges = sorted(map(tuple, mine[:, 4:6]))
        assert ranges[0][0] == b[4] and ranges[-1][1] == b[5]
        assert all(x[1] == y[0] for x, y in zip(ranges, ranges[1:]))
    if nsplit == 1:
        assert np.all(items[:, 6] == -1) and len(merges) == 0 and parts == 0
    else:  # partial rows: each split of a block its own R rows, no two items sharing one
        rows = [set(range(it[6], it[6] + (it[3] - it[2]) * group)) for it in items]
        assert sum(map(len, rows)) == len(set().union(*rows)) == parts
        assert len(merges) == len(blocks) and np.all(merges[:, 5] == nsplit)
    cost = (items[:, 3] - items[:, 2]) * (items[:, 5] - items[:, 4] + 16)
    loads = [cost[slot_start[s]:slot_start[s + 1]].sum() for s in range(threads)]
    # longest first to the least loaded: no slot exceeds the best possible by more than one item
    assert max(loads) <= cost.sum() / threads + cost.max()
    for s in range(threads):  # each slot's items longest first
        mine = cost[slot_start[s]:slot_start[s + 1]]
        assert np.all(np.diff(mine) <= 0)


def test_strided_cache_and_float16(backend, rng):
    # A cache that is a view (every other head of a bigger one) is read and written in place;
    # float16 is computed in float32 and returned as float16.
    q, k_cache, v_cache, k, v = _problem(rng, 2, 4, 4, 2, 32, np.float16, S_max=200)
    big_k = np.zeros((2, 8, 200, 32), np.float16)
    big_k[:, ::2] = k_cache
    view = big_k[:, ::2]
    old = k_cache.copy(), v_cache.copy()
    got = fastattn.attention_with_kvcache(q, view, v_cache, k, v, cache_seqlens=100,
                                          return_lse=True, backend=backend)
    assert got[0].dtype == np.float16
    want = reference.attention_with_kvcache(*[a.astype(np.float64) for a in (q, *old, k, v)],
                                            cache_seqlens=100)
    np.testing.assert_allclose(got[0].astype(np.float64), want, atol=3e-3)
    assert_same_bits(big_k[:, 1::2], np.zeros_like(big_k[:, 1::2]))
    assert_same_bits(view, appended_cache(old[0], k, [100, 100]))


# --- bad input: a clear error, and the caches untouched -----------------------------------------

def _bad_calls(rng):
    q, k_cache, v_cache, k, v = _problem(rng, 2, 4, 2, 3, 16, np.float32, S_max=64)
    kp, vp, table = _paged(rng, k_cache, v_cache, 16, spare_blocks=0)
    big_table = table.copy()
    big_table[1, 0] = kp.shape[0]
    shared = table.copy()
    shared[1] = shared[0]
    return (q, k_cache, v_cache, k, v, kp, vp), [
        ("exceeds S_max", ValueError, dict(cache_seqlens=62)),
        ("exceeds S_max", ValueError, dict(cache_seqlens=np.array([0, 62]))),
        ("exceeds S_max", ValueError, dict(cache_seqlens=65, k=None, v=None)),
        (">= 0", ValueError, dict(cache_seqlens=np.array([3, -1]))),
        ("must be an int", TypeError, dict(cache_seqlens=3.0)),
        ("integer array", TypeError, dict(cache_seqlens=np.array([3.0, 4.0]))),
        (r"shape \(2,\)", ValueError, dict(cache_seqlens=np.array([3, 4, 5]))),
        ("k and v must be given together", ValueError, dict(cache_seqlens=3, v=None)),
        ("k and v must be given together", ValueError, dict(cache_seqlens=3, k=None)),
        ("same dtype", TypeError, dict(cache_seqlens=3, q=q.astype(np.float64))),
        ("dtype of q", TypeError, dict(cache_seqlens=3, k=k.astype(np.float64))),
        (r"\(B, Hkv, Lq, E\)", ValueError, dict(cache_seqlens=3, k=k[:, :, :2])),
        ("multiple", ValueError, dict(cache_seqlens=3, q=q[:, :3])),
        ("out of range", ValueError, dict(cache_seqlens=3, paged=True, block_table=big_table)),
        ("same cache slot", ValueError, dict(cache_seqlens=3, paged=True, block_table=shared)),
        ("capacity", ValueError, dict(cache_seqlens=62, paged=True, block_table=table)),
        ("integer array", TypeError, dict(cache_seqlens=3, paged=True,
                                          block_table=table.astype(float))),
        ("window", ValueError, dict(cache_seqlens=3, window=(-1, 0))),
        ("softcap", ValueError, dict(cache_seqlens=3, softcap=0.0)),
        ("alibi_slopes", ValueError, dict(cache_seqlens=3, alibi_slopes=np.ones(3))),
        ("num_splits", ValueError, dict(cache_seqlens=3, num_splits=0)),
        ("backend", ValueError, dict(cache_seqlens=3, backend="gpu")),
    ]


def test_bad_input_raises_and_leaves_the_caches_untouched(rng):
    (q, k_cache, v_cache, k, v, kp, vp), cases = _bad_calls(rng)
    originals = [a.copy() for a in (q, k_cache, v_cache, k, v, kp, vp)]
    for match, error, changes in cases:
        changes = dict(changes)
        args = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
        if changes.pop("paged", False):
            args.update(k_cache=kp, v_cache=vp)
        args.update(changes)
        with pytest.raises(error, match=match):
            fastattn.attention_with_kvcache(args.pop("q"), args.pop("k_cache"),
                                            args.pop("v_cache"), args.pop("k"), args.pop("v"),
                                            **args)
        for now, before in zip((q, k_cache, v_cache, k, v, kp, vp), originals):
            assert_same_bits(now, before)


def test_read_only_cache(rng):
    q, k_cache, v_cache, k, v = _problem(rng, 1, 2, 1, 1, 8, np.float32, S_max=8)
    k_cache.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=0)
    # Reading a read-only cache is fine.
    fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=4)
    with pytest.raises(TypeError, match="NumPy array"):
        fastattn.attention_with_kvcache(q, k_cache.tolist(), v_cache, cache_seqlens=4)


def test_bench_decode_and_varlen_cases_run(monkeypatch, capsys):
    # The bench CLI's decode and varlen cases on tiny sizes: they run and report every column.
    pytest.importorskip("numba")
    from fastattn.bench import cli, decode
    monkeypatch.setattr(decode, "READ_MIB", 8)
    monkeypatch.setattr(decode, "VARLEN_SEQUENCES", 3)
    monkeypatch.setattr(decode, "VARLEN_RANGE", (4, 40))
    assert cli.main(["--decode", "--decode-lengths", "64", "--decode-batches", "1", "--varlen",
                     "--heads", "4", "--kv-heads", "2", "--dim", "16", "--min-runs", "1",
                     "--min-time", "0", "--max-time", "0.1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "read bandwidth" in text and "of read bw" in text and "padded" in text
    lines = text.splitlines()
    decode_row = next(line for line in lines if line.split()[:2] == ["1", "64"])
    varlen_rows = [line for line in lines if line.split()[:1] in (["True"], ["False"])]
    assert len(varlen_rows) == 2
    if importlib.util.find_spec("torch") is not None:  # every figure there, none missing
        assert "nan" not in decode_row and not any("nan" in row for row in varlen_rows)


# --- few query rows through scaled_dot_product_attention ------------------------------------

ROW_KERNEL_CASES = [
    (1, 300, 8, 2, {}),
    (1, 300, 8, 2, dict(is_causal=True, alignment="bottom_right")),
    (4, 70, 4, 4, dict(is_causal=True, alignment="bottom_right")),
    (3, 70, 4, 2, dict(window=(10, 0), is_causal=True, alignment="bottom_right", softcap=5.0)),
    (16, 40, 2, 2, dict(softcap=3.0)),
    (2, 50, 4, 4, dict(alibi_slopes=np.array([0.1, 0.2, 0.3, 0.4]), is_causal=True,
                       alignment="bottom_right")),
    (3, 2, 2, 2, dict(is_causal=True, alignment="bottom_right")),  # rows that see no key
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", ROW_KERNEL_CASES, ids=lambda c: f"L{c[0]}-S{c[1]}-{sorted(c[4])}")
def test_sdpa_with_few_query_rows_runs_on_the_row_kernel(monkeypatch, case, dtype):
    """A decode step through plain SDPA (transformers' cache makes it) reads k and v in place on
    the row kernel instead of laying them out for the fused one, with the same results."""
    from fastattn import kvcache
    L, S, H, Hkv, opts = case
    rng = np.random.default_rng(L * 1000 + S)
    q = rng.standard_normal((2, H, L, 32)).astype(dtype)
    k = rng.standard_normal((2, Hkv, S, 32)).astype(dtype)
    v = rng.standard_normal((2, Hkv, S, 24)).astype(dtype)
    calls = []
    real = kvcache.sdpa_rows
    monkeypatch.setattr(kvcache, "sdpa_rows", lambda p: calls.append(p) or real(p))
    got = fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=H != Hkv, return_lse=True,
                                                backend="numba", **opts)
    assert len(calls) == 1
    assert_matches_reference(got, reference.scaled_dot_product_attention, q, k, v,
                             enable_gqa=H != Hkv, return_lse=True, **opts)


def test_sdpa_row_kernel_only_where_it_computes_the_same(monkeypatch):
    from fastattn import kvcache
    calls = []
    monkeypatch.setattr(kvcache, "sdpa_rows", lambda p: calls.append(p))
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, n, 8)) for n in (2, 9, 9))
    mask = rng.random((2, 9)) < 0.5
    # a mask, top-left causal with L < S, many rows: the fused kernel
    fastattn.scaled_dot_product_attention(q, k, v, mask, backend="numba")
    fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="numba")
    q_many = rng.standard_normal((1, 2, 17, 8))
    fastattn.scaled_dot_product_attention(q_many, k, v, backend="numba")
    assert not calls
