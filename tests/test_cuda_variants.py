"""The variants (alignment, window, softcap, ALiBi) in the ``cuda`` backend, in Numba's CUDA
simulator, against the NumPy reference under the accuracy rule.

Tiles are tiny (4 query rows x 4 keys per block, 4 threads) so that the short inputs here span
several query and key tiles: windows narrower than a tile and spanning several, key tiles
skipped on either side of the window, rows that see no key at all.
"""
import numpy as np
import pytest

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (pip install fastattn[cuda])")

import fastattn  # noqa: E402
from fastattn import _backends, reference  # noqa: E402

if _backends.cuda_unavailable_reason() is not None:
    raise RuntimeError(f"the cuda backend is not usable ({_backends.cuda_unavailable_reason()}): "
                       f"run the tests with NUMBA_ENABLE_CUDASIM=1")

from fastattn import _cuda  # noqa: E402
from fastattn.kernels import cuda as kernels  # noqa: E402

from conftest import assert_matches_reference  # noqa: E402

TINY = kernels.Tiles(block_q=4, block_k=4, rows_per_thread=2, threads_per_row=2, chunk=2,
                     block_v=4)
# 4 threads; E > 4 walks the features in panels, E <= 4 keeps the query tile resident
TINY_FUSED = (kernels.FusedTiles(block_q=4, block_k=4, rows_per_thread=2, threads_per_row=2,
                                 features=4, block_v=4),)


@pytest.fixture(autouse=True)
def tiny_tiles(monkeypatch):
    monkeypatch.setattr(_cuda, "TILES", {np.dtype(np.float32): TINY, np.dtype(np.float64): TINY})
    monkeypatch.setattr(_cuda, "FUSED_TILES", {np.dtype(np.float32): TINY_FUSED,
                                               np.dtype(np.float64): TINY_FUSED})


@pytest.fixture(autouse=True, scope="module")
def _quick_thread_switches(quick_thread_switches):
    """(conftest.quick_thread_switches for every test here)"""


def qkv(rng, lead=(2,), L=7, S=6, E=3, Ev=3, lead_kv=None, dtype=np.float64):
    lead_kv = lead if lead_kv is None else lead_kv
    return tuple(rng.standard_normal(shape).astype(dtype)
                 for shape in ((*lead, L, E), (*lead_kv, S, E), (*lead_kv, S, Ev)))


def check_sdpa(q, k, v, mask=None, **kw):
    """out and lse of the cuda backend against the reference; returns them."""
    inputs = [x.copy() for x in (q, k, v)] + [None if mask is None else mask.copy()]
    got = fastattn.scaled_dot_product_attention(q, k, v, mask, backend="cuda", return_lse=True,
                                                **kw)

    def ref(q, k, v, mask):
        return reference.scaled_dot_product_attention(q, k, v, mask, return_lse=True, **kw)
    assert_matches_reference(got, ref, q, k, v, mask)
    for before, after in zip(inputs, (q, k, v, mask)):  # nothing written to
        if before is not None:
            np.testing.assert_array_equal(before, after)
    return got


def check_weights(q, k, mask=None, **kw):
    got = fastattn.attention_weights(q, k, mask, backend="cuda", **kw)

    def ref(q, k, mask):
        return reference.attention_weights(q, k, mask, **kw)
    assert_matches_reference(got, ref, q, k, mask)
    return got


WINDOWS = [None, (0, 0), (1, 0), (5, 0), (2, 3), (None, 2), (3, None), (20, 20)]


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("L,S", [(5, 10), (9, 9), (11, 6)])
@pytest.mark.parametrize("causal", [False, True])
def test_windows_and_alignments_match_reference(alignment, L, S, causal):
    # (0, 0) and (1, 0) are narrower than a key tile, (5, 0) and (2, 3) span several, (20, 20)
    # covers every key; L=11 > S=6 bottom-right causal leaves the first rows with no key.
    rng = np.random.default_rng(0)
    q, k, v = qkv(rng, L=L, S=S)
    for window in WINDOWS:
        out, lse = check_sdpa(q, k, v, is_causal=causal, alignment=alignment, window=window)
        seen = reference.keys_seen(L, S, causal, alignment, window)
        empty = ~seen.any(axis=1)
        assert np.all(out[:, empty] == 0) and np.all(lse[:, empty] == -np.inf)


def test_bottom_right_causal_with_more_queries_than_keys_gives_empty_rows():
    q, k, v = qkv(np.random.default_rng(1), L=10, S=3)
    out, lse = check_sdpa(q, k, v, is_causal=True, alignment="bottom_right")
    assert np.all(out[:, :7] == 0) and np.all(lse[:, :7] == -np.inf)
    assert np.all(np.isfinite(lse[:, 7:]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cap", [30.0, 50.0])
def test_softcap_with_large_logits(dtype, cap):
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, L=9, S=7, E=4, dtype=dtype)
    q = q * dtype(10)  # scores of tens: the cap bends them
    keep = rng.random((9, 7)) > 0.3
    check_sdpa(q, k, v, softcap=cap)
    check_sdpa(q, k, v, keep, softcap=cap, is_causal=True)
    check_sdpa(q, k, v, softcap=cap, window=(2, 1), alignment="bottom_right")


@pytest.mark.parametrize("slopes_shape", [(4,), (2, 4)])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_alibi_with_causal_gqa_and_masks(slopes_shape, alignment):
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, lead=(2, 4), lead_kv=(2, 2), L=6, S=9)
    slopes = rng.uniform(0.05, 1.0, slopes_shape)
    keep = rng.random((4, 6, 9)) > 0.25
    additive = np.where(rng.random((2, 1, 1, 9)) > 0.2, rng.standard_normal((2, 1, 1, 9)),
                        -np.inf)
    kw = dict(alibi_slopes=slopes, alignment=alignment, enable_gqa=True)
    check_sdpa(q, k, v, is_causal=True, **kw)
    check_sdpa(q, k, v, keep, **kw)
    check_sdpa(q, k, v, additive, is_causal=True, window=(3, None), **kw)


def test_float32_everything_at_once_with_lse():
    # window + bottom-right + causal + softcap + ALiBi + float mask + GQA, lengths that are not
    # tile multiples, Ev != E.
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, lead=(1, 4), lead_kv=(1, 2), L=7, S=13, E=5, Ev=6, dtype=np.float32)
    mask = rng.standard_normal((7, 13)).astype(np.float32)
    mask[rng.random((7, 13)) < 0.2] = -np.inf
    check_sdpa(q * np.float32(10), k, v, mask, is_causal=True, enable_gqa=True,
               alignment="bottom_right", window=(4, 0), softcap=30.0,
               alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625], np.float32))


@pytest.mark.parametrize("window", [(0, 0), (2, 3), (None, 1)])
def test_cosine_similarity_with_a_window(window):
    q, k, v = qkv(np.random.default_rng(5), L=8, S=8)
    check_sdpa(q, k, v, similarity="cosine", scale=3.0, window=window)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("L,S", [(5, 10), (10, 6)])
def test_attention_weights_with_variants(alignment, L, S):
    rng = np.random.default_rng(6)
    q, k, _ = qkv(rng, lead=(2, 2), lead_kv=(2, 1), L=L, S=S)
    keep = rng.random((L, S)) > 0.2
    for kw in (dict(is_causal=True), dict(window=(1, 2)), dict(window=(3, 0), is_causal=True),
               dict(softcap=30.0, alibi_slopes=np.array([0.3, 0.7])),
               dict(window=(None, 0), alibi_slopes=np.array([[0.1, 0.2], [0.3, 0.4]]))):
        w = check_weights(q * 10, k, keep, alignment=alignment, enable_gqa=True, **kw)
        seen = reference.keys_seen(L, S, kw.get("is_causal", False), alignment, kw.get("window"))
        assert np.all(w[..., ~(seen & keep)] == 0)


def test_attention_weights_float32_softcap_and_window():
    rng = np.random.default_rng(7)
    q, k, _ = qkv(rng, L=9, S=11, E=4, dtype=np.float32)
    check_weights(q * np.float32(10), k, softcap=50.0, window=(2, 5), alignment="bottom_right")


def test_variants_on_the_gpu_float32_tiles(monkeypatch):
    # The real float32 tile shapes once: a window narrower than the 64-key tile, bottom-right,
    # over two query tiles, one partial.
    monkeypatch.setattr(_cuda, "FUSED_TILES", _cuda.GPU_FUSED_TILES)
    rng = np.random.default_rng(8)
    q, k, v = qkv(rng, lead=(), L=70, S=90, E=8, Ev=8, dtype=np.float32)
    check_sdpa(q, k, v, is_causal=True, alignment="bottom_right", window=(20, 0), softcap=30.0)


BAD_VARIANTS = [dict(window=(-1, 0)), dict(window=(1.5, 0)), dict(window=(True, 0)),
                dict(window=3), dict(alignment="middle"), dict(softcap=0.0),
                dict(softcap=np.nan), dict(alibi_slopes=np.ones(3)),
                dict(alibi_slopes=np.ones(2, int)), dict(alibi_slopes=np.array([1.0, np.inf]))]


@pytest.mark.parametrize("kw", BAD_VARIANTS)
def test_bad_variants_give_the_numpy_backend_error(kw):
    q, k, v = qkv(np.random.default_rng(9))
    with pytest.raises((ValueError, TypeError)) as expected:
        fastattn.scaled_dot_product_attention(q, k, v, backend="numpy", **kw)
    with pytest.raises(expected.type) as got:
        fastattn.scaled_dot_product_attention(q, k, v, backend="cuda", **kw)
    assert str(got.value) == str(expected.value)
