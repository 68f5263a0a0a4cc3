"""The ``cuda`` backend against the NumPy reference, in Numba's CUDA simulator.

tests/conftest.py turns the simulator on (NUMBA_ENABLE_CUDASIM=1) unless the caller set the
variable; with NUMBA_ENABLE_CUDASIM=0 on a machine with a GPU the same tests run on the GPU.
Tiles are made tiny (4 threads per block) so that tiny inputs span several blocks, partial tiles
and partial feature chunks. float64 results must match the float64 reference to 1e-10; float32
ones may be at most twice as far from it as the reference computed in float32, plus 1e-6.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (pip install fastattn[cuda])")

import fastattn  # noqa: E402
from fastattn import _backends, reference  # noqa: E402

if _backends.cuda_unavailable_reason() is not None:
    raise RuntimeError(
        f"the cuda backend is not usable ({_backends.cuda_unavailable_reason()}): run the tests "
        f"with NUMBA_ENABLE_CUDASIM=1 (tests/conftest.py sets it unless numba was imported first)")

from numba import cuda  # noqa: E402

from fastattn import _cuda  # noqa: E402
from fastattn.kernels import cuda as kernels  # noqa: E402

TINY = kernels.Tiles(block_q=4, block_k=4, rows_per_thread=2, threads_per_row=2, chunk=2,
                     block_v=4)
# 4 threads; E > 4 walks the features in panels, E <= 4 keeps the query tile resident
TINY_FUSED = (kernels.FusedTiles(block_q=4, block_k=4, rows_per_thread=2, threads_per_row=2,
                                 features=4, block_v=4),)
TINY_ROWS = kernels.RowTiles(rows_per_block=2, threads_per_row=2)
F64 = dict(rtol=1e-10, atol=1e-10)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def tiny_tiles(monkeypatch):
    monkeypatch.setattr(_cuda, "TILES", {np.dtype(np.float32): TINY, np.dtype(np.float64): TINY})
    monkeypatch.setattr(_cuda, "FUSED_TILES", {np.dtype(np.float32): TINY_FUSED,
                                               np.dtype(np.float64): TINY_FUSED})
    monkeypatch.setattr(_cuda, "SOFTMAX_TILES", TINY_ROWS)


@pytest.fixture(autouse=True, scope="module")
def _quick_thread_switches(quick_thread_switches):
    """(conftest.quick_thread_switches for every test here)"""


def normal(rng, *shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def qkv(rng, lead=(2, 2), L=7, S=6, E=5, Ev=5, lead_kv=None, dtype=np.float64):
    lead_kv = lead if lead_kv is None else lead_kv
    return (normal(rng, *lead, L, E, dtype=dtype), normal(rng, *lead_kv, S, E, dtype=dtype),
            normal(rng, *lead_kv, S, Ev, dtype=dtype))


def sdpa_both(q, k, v, mask=None, **kw):
    """(cuda out, cuda lse, reference out, reference lse); the reference in float64."""
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, mask, backend="cuda",
                                                     return_lse=True, **kw)
    as64 = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
    ref_mask = mask if mask is None or mask.dtype == np.bool_ else as64(mask)
    ref_out, ref_lse = reference.scaled_dot_product_attention(
        as64(q), as64(k), as64(v), ref_mask, 0.0, kw.get("is_causal", False), kw.get("scale"),
        kw.get("enable_gqa", False), similarity=kw.get("similarity", "dot"), return_lse=True)
    return out, lse, ref_out, ref_lse


def assert_close64(out, lse, ref_out, ref_lse):
    assert out.dtype == np.float64 and lse.dtype == np.float64
    np.testing.assert_allclose(out, ref_out, **F64)
    np.testing.assert_allclose(lse, ref_lse, **F64)


# --- scaled_dot_product_attention -----------------------------------------------------------------

@pytest.mark.parametrize("L,S", [(7, 6), (5, 9)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_reference_with_partial_tiles_and_causal_L_ne_S(L, S, causal):
    # E=5 and Ev=6 are not multiples of the chunk (2) or of the value block (4): two blocks
    # along Ev, the second partial.
    q, k, v = qkv(np.random.default_rng(0), L=L, S=S, E=5, Ev=6)
    assert_close64(*sdpa_both(q, k, v, is_causal=causal))


MASK_SHAPES = [(7, 6), (1, 6), (7, 1), (2, 1, 6), (2, 1, 7, 6), (2, 2, 7, 6), (1, 1, 1, 1)]


@pytest.mark.parametrize("shape", MASK_SHAPES)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_masks_of_every_broadcast_shape(shape, kind):
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng)
    if kind == "bool":
        mask = rng.random(shape) > 0.3
    else:
        mask = rng.standard_normal(shape)
        mask[rng.random(shape) < 0.3] = -np.inf
    assert_close64(*sdpa_both(q, k, v, mask))


def test_sdpa_mask_read_in_place_from_strided_and_broadcast_views():
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng)
    big = rng.random((7, 12)) > 0.3
    mask = np.broadcast_to(big[:, ::2], (2, 2, 7, 6))  # strided, and stride 0 on two dims
    assert_close64(*sdpa_both(q, k, v, mask))
    assert_close64(*sdpa_both(q, k, v, rng.standard_normal((6, 7)).T))  # transposed float mask


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_fully_masked_rows_give_zeros_and_lse_minus_inf(causal):
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng)
    keep = rng.random((2, 2, 7, 6)) > 0.3
    keep[0, 1, 2] = False      # a row in the first query tile
    keep[1, 0, 5:] = False     # rows in the second, partial query tile
    additive = np.where(keep, 0.5, -np.inf)
    for mask in (keep, additive):
        out, lse, ref_out, ref_lse = sdpa_both(q, k, v, mask, is_causal=causal)
        assert_close64(out, lse, ref_out, ref_lse)
        assert np.all(out[0, 1, 2] == 0) and lse[0, 1, 2] == -np.inf
        assert np.all(out[1, 0, 5:] == 0) and np.all(lse[1, 0, 5:] == -np.inf)


def test_sdpa_whole_masked_key_tile_before_any_kept_key():
    # The running max stays -inf through a first all-masked tile: no exp(-inf - -inf) = NaN.
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, S=9)
    mask = np.ones((7, 9), bool)
    mask[:, :5] = False
    out, lse, ref_out, ref_lse = sdpa_both(q, k, v, mask)
    assert not np.isnan(out).any()
    assert_close64(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_grouped_query_attention(causal):
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, lead=(2, 4), lead_kv=(2, 2), L=6, S=7)
    mask = rng.random((4, 6, 7)) > 0.2
    assert_close64(*sdpa_both(q, k, v, mask, is_causal=causal, enable_gqa=True))


def test_sdpa_cosine_similarity_and_scale():
    rng = np.random.default_rng(6)
    q, k, v = qkv(rng)
    q[0, 0, 3] = 0.0  # a zero query: cosine 0 with every key, never NaN
    assert_close64(*sdpa_both(q, k, v, similarity="cosine"))
    assert_close64(*sdpa_both(q, k, v, similarity="cosine", scale=4.0, is_causal=True))
    assert_close64(*sdpa_both(q, k, v, scale=0.3))


@pytest.mark.parametrize("lead", [(), (3,), (2, 1, 2)])
def test_sdpa_any_leading_dims(lead):
    q, k, v = qkv(np.random.default_rng(7), lead=lead, Ev=3)
    assert_close64(*sdpa_both(q, k, v, is_causal=True))


def test_sdpa_float32_error_at_most_twice_numpy_float32():
    rng = np.random.default_rng(8)
    q, k, v = qkv(rng, L=9, S=10, E=6, Ev=6, dtype=np.float32)
    mask = rng.standard_normal((9, 10)).astype(np.float32)
    out, lse, ref_out, ref_lse = sdpa_both(q, k, v, mask, is_causal=True)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    np_out, np_lse = reference.scaled_dot_product_attention(q, k, v, mask, is_causal=True,
                                                            return_lse=True)
    for got, plain, exact in ((out, np_out, ref_out), (lse, np_lse, ref_lse)):
        budget = 2 * np.abs(plain - exact).max() + 1e-6
        assert np.abs(got - exact).max() <= budget


def test_sdpa_float16_on_tensor_cores_returned_float16():
    # (the tensor-core kernel, kernels/cuda/fused_mma.py: tests/test_cuda_mma.py has its rule)
    rng = np.random.default_rng(9)
    q, k, v = qkv(rng, dtype=np.float16)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, backend="cuda", return_lse=True)
    assert out.dtype == np.float16 and lse.dtype == np.float32
    f32 = [a.astype(np.float32) for a in (q, k, v)]
    ref_out, ref_lse = reference.scaled_dot_product_attention(*f32, return_lse=True)
    np.testing.assert_allclose(out, ref_out.astype(np.float16), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_sdpa_empty_and_keyless_inputs():
    rng = np.random.default_rng(10)
    q, k, v = qkv(rng, L=0)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, backend="cuda", return_lse=True)
    assert out.shape == (2, 2, 0, 5) and lse.shape == (2, 2, 0)
    q, k, v = qkv(rng, S=0)  # no key at all: zeros, lse -inf (as the numba backend)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, backend="cuda", return_lse=True)
    assert np.all(out == 0) and np.all(lse == -np.inf)


def test_sdpa_nan_query_gives_nan_row():
    q, k, v = qkv(np.random.default_rng(11))
    q[1, 0, 4, 2] = np.nan
    out = fastattn.scaled_dot_product_attention(q, k, v, backend="cuda")
    assert np.isnan(out[1, 0, 4]).all()
    assert not np.isnan(np.delete(out[1, 0], 4, axis=0)).any()


# --- device arrays --------------------------------------------------------------------------------

def test_device_arrays_in_give_device_arrays_out_on_auto():
    rng = np.random.default_rng(12)
    q, k, v = qkv(rng)
    mask = rng.random((7, 6)) > 0.3
    dq, dk, dv, dmask = (cuda.to_device(a) for a in (q, k, v, mask))
    out, lse = fastattn.scaled_dot_product_attention(dq, dk, dv, dmask, is_causal=True,
                                                     return_lse=True)  # backend="auto"
    assert _backends.is_device_array(out) and _backends.is_device_array(lse)
    ref_out, ref_lse = reference.scaled_dot_product_attention(q, k, v, mask, is_causal=True,
                                                              return_lse=True)
    np.testing.assert_allclose(out.copy_to_host(), ref_out, **F64)
    np.testing.assert_allclose(lse.copy_to_host(), ref_lse, **F64)
    w = fastattn.attention_weights(dq, dk, dmask)
    assert _backends.is_device_array(w)
    np.testing.assert_allclose(w.copy_to_host(), reference.attention_weights(q, k, mask), **F64)


def test_device_arrays_read_in_place_whatever_their_strides():
    rng = np.random.default_rng(13)
    big_q, big_k, v = normal(rng, 2, 2, 9, 10), normal(rng, 2, 2, 6, 7), normal(rng, 2, 2, 6, 5)
    dq = cuda.to_device(big_q)[:, :, 1:8, ::2]  # strided views, no copy
    dk = cuda.to_device(big_k)[:, :, ::-1, 1:6]  # negative strides
    out = fastattn.scaled_dot_product_attention(dq, dk, v, is_causal=True)
    ref = reference.scaled_dot_product_attention(big_q[:, :, 1:8, ::2], big_k[:, :, ::-1, 1:6], v,
                                                 is_causal=True)
    np.testing.assert_allclose(out.copy_to_host(), ref, **F64)


def test_softmax_and_similarity_on_device_arrays():
    rng = np.random.default_rng(14)
    x = normal(rng, 3, 5)
    out = fastattn.softmax(cuda.to_device(x), axis=0)
    assert _backends.is_device_array(out)
    np.testing.assert_allclose(out.copy_to_host(), reference.softmax(x, 0), **F64)
    a, b = normal(rng, 4, 3), normal(rng, 5, 3)
    s = fastattn.similarity(cuda.to_device(a), b, "cosine")
    assert _backends.is_device_array(s)
    np.testing.assert_allclose(s.copy_to_host(), reference.similarity(a, b, "cosine"), **F64)


# --- attention_weights, softmax, similarity -------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_attention_weights_match_reference(causal):
    rng = np.random.default_rng(15)
    q, k, _ = qkv(rng, lead=(2, 4), lead_kv=(2, 2), L=7, S=9)
    mask = np.where(rng.random((4, 1, 9)) > 0.3, rng.standard_normal((4, 1, 9)), -np.inf)
    mask[1] = -np.inf  # every row of head 1 fully masked
    w = fastattn.attention_weights(q, k, mask, is_causal=causal, enable_gqa=True,
                                   backend="cuda")
    ref = reference.attention_weights(q, k, mask, causal, None, True)
    np.testing.assert_allclose(w, ref, **F64)
    assert np.all(w[:, 1] == 0)


def test_attention_weights_cosine_float32_and_float16():
    rng = np.random.default_rng(16)
    q, k, _ = qkv(rng, dtype=np.float32)
    w = fastattn.attention_weights(q, k, similarity="cosine", scale=3.0, backend="cuda")
    exact = reference.attention_weights(q.astype(np.float64), k.astype(np.float64),
                                        scale=3.0, similarity="cosine")
    plain = reference.attention_weights(q, k, scale=3.0, similarity="cosine")
    assert w.dtype == np.float32
    assert np.abs(w - exact).max() <= 2 * np.abs(plain - exact).max() + 1e-6
    w16 = fastattn.attention_weights(q.astype(np.float16), k.astype(np.float16), backend="cuda")
    assert w16.dtype == np.float16


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_matches_reference_with_masks_and_nan(axis):
    rng = np.random.default_rng(17)
    x = normal(rng, 3, 7, 5)
    x[0, 2, 1] = -np.inf
    mask_shape = [1, 1, 1]
    mask_shape[axis] = x.shape[axis]
    mask = rng.random((3, 7, 5)) > 0.3
    mask[1] = False  # fully masked rows: zeros
    for m in (None, mask, rng.random(mask_shape) > 0.5):
        got = fastattn.softmax(x, axis, mask=m, backend="cuda")
        np.testing.assert_allclose(got, reference.softmax(x, axis, mask=m), **F64)
    x[2, 3, 4] = np.nan  # a NaN makes its row NaN
    got = fastattn.softmax(x, axis, backend="cuda")
    np.testing.assert_allclose(got, reference.softmax(x, axis), **F64)


def test_softmax_float32_float16_and_1d():
    rng = np.random.default_rng(18)
    x = normal(rng, 4, 9, dtype=np.float32)
    got = fastattn.softmax(x, backend="cuda")
    assert got.dtype == np.float32
    exact, plain = reference.softmax(x.astype(np.float64)), reference.softmax(x)
    assert np.abs(got - exact).max() <= 2 * np.abs(plain - exact).max() + 1e-6
    assert fastattn.softmax(x.astype(np.float16), backend="cuda").dtype == np.float16
    v = normal(rng, 6)
    np.testing.assert_allclose(fastattn.softmax(v, backend="cuda"), reference.softmax(v), **F64)


@pytest.mark.parametrize("kind", ["dot", "scaled_dot", "cosine"])
def test_similarity_matches_reference_with_broadcast_leading_dims(kind):
    rng = np.random.default_rng(19)
    a, b = normal(rng, 2, 1, 7, 5), normal(rng, 3, 9, 5)
    a[1, 0, 2] = 0.0  # cosine of a zero vector is 0
    got = fastattn.similarity(a, b, kind, backend="cuda")
    ab = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    ref = reference.similarity(np.broadcast_to(a, (*ab, 7, 5)), np.broadcast_to(b, (*ab, 9, 5)),
                               kind)
    assert got.shape == (2, 3, 7, 9)
    np.testing.assert_allclose(got, ref, **F64)


# --- errors ---------------------------------------------------------------------------------------

def _bad_calls():
    rng = np.random.default_rng(20)
    q, k, v = qkv(rng)
    f = fastattn
    return [
        lambda b: f.scaled_dot_product_attention(q, k[..., :4], v, backend=b),
        lambda b: f.scaled_dot_product_attention(q, k, v[..., :5, :], backend=b),
        lambda b: f.scaled_dot_product_attention(q.astype(int), k, v, backend=b),
        lambda b: f.scaled_dot_product_attention(q, k.astype(np.float32), v, backend=b),
        lambda b: f.scaled_dot_product_attention(q, k, v, np.ones((3, 6), bool), backend=b),
        lambda b: f.scaled_dot_product_attention(q, k, v, np.ones((7, 6), int), backend=b),
        lambda b: f.scaled_dot_product_attention(q, k[:, :1], v[:, :1], backend=b),
        lambda b: f.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=1, backend=b),
        lambda b: f.scaled_dot_product_attention(q, k, v, scale=np.inf, backend=b),
        lambda b: f.scaled_dot_product_attention(q, k, v, dropout_p=0.1, backend=b),
        lambda b: f.scaled_dot_product_attention(q, k, v, similarity="l2", backend=b),
        lambda b: f.attention_weights(q, k[..., :4], backend=b),
        lambda b: f.softmax(q, axis=4, backend=b),
        lambda b: f.softmax(q, mask=np.ones(5), backend=b),
        lambda b: f.similarity(q, k, "l1", backend=b),
        lambda b: f.similarity(q[:1, :1, :, :3], k, backend=b),
    ]


@pytest.mark.parametrize("call", range(len(_bad_calls())))
def test_bad_input_gives_the_same_error_as_the_numpy_backend(call):
    bad = _bad_calls()[call]
    with pytest.raises((ValueError, TypeError, NotImplementedError)) as expected:
        bad("numpy")
    with pytest.raises(expected.type, match=None) as got:
        bad("cuda")
    assert str(got.value) == str(expected.value)


# --- the tiles the GPU runs, and laziness ---------------------------------------------------------

def test_sdpa_with_the_gpu_float32_tiles(monkeypatch):
    # The real tile shapes (128 threads per block), once: two query tiles, one partial.
    monkeypatch.setattr(_cuda, "FUSED_TILES", _cuda.GPU_FUSED_TILES)
    rng = np.random.default_rng(21)
    q, k, v = qkv(rng, lead=(), L=70, S=70, E=20, Ev=20, dtype=np.float32)
    out, lse, ref_out, ref_lse = sdpa_both(q, k, v, is_causal=True)
    np_out = reference.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert np.abs(out - ref_out).max() <= 2 * np.abs(np_out - ref_out).max() + 1e-6


@pytest.mark.skipif(not _cuda._SIMULATOR, reason="checks fastattn's fix to the simulator")
def test_simulator_shared_arrays_one_per_line_seen_by_every_thread():
    # fastattn._cuda fills the simulator's shared arrays under a lock; each line must still
    # give its own array, the same one to all of a block's threads.
    @cuda.jit
    def kernel(out):
        first = cuda.shared.array(32, np.float64)
        second = cuda.shared.array(32, np.float64)
        t = cuda.threadIdx.x
        first[t] = t
        second[t] = -t
        cuda.syncthreads()
        out[cuda.blockIdx.x, t, 0] = first[31 - t]
        out[cuda.blockIdx.x, t, 1] = second[31 - t]

    out = np.zeros((3, 32, 2))
    kernel[3, 32](out)
    expected = np.arange(31, -1, -1, dtype=np.float64)
    for block in range(3):
        np.testing.assert_array_equal(out[block, :, 0], expected)
        np.testing.assert_array_equal(out[block, :, 1], -expected)


def test_import_fastattn_neither_imports_numba_nor_compiles():
    code = ("import sys, fastattn; fastattn.scaled_dot_product_attention; "
            "assert 'numba' not in sys.modules and 'fastattn._cuda' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- the scripts for a real GPU -------------------------------------------------------------------

def test_gpu_check_script_runs_in_the_simulator():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"),
                          "--sim-smoke", "--quick"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "0 failed" in run.stdout


def test_kernels_compile_for_a_gpu_where_a_cuda_toolkit_is_installed():
    # The simulator never type-checks the kernels; NVVM does (no GPU needed, only a toolkit).
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "cuda_compile_check.py"),
                          "--quick"], capture_output=True, text=True, timeout=300)
    if run.returncode == 77:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
