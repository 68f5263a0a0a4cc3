"""The two hand-written pieces under the numba kernels: the register tile and the float32 exp.

Parity tests already cover them through the public API; these pin each one down on its own,
including the inputs the API rarely produces (offsets, strides, depth 0, the whole exp range).
"""
import os
import subprocess
import sys

import numba
import numpy as np
import pytest

from fastattn.kernels.cpu._jit import exp_flushed, exp_nonpositive
from fastattn.kernels.cpu.tile import (ROWS, VECTOR_BYTES, tile_cols, tile_product, tile_product_add,
                                      tile_product_add_strided, tile_width, vector_bytes)


@numba.njit
def _tile(a, a_start, a_row_stride, b, b_start, b_row_stride, c, c_start, c_row_stride, depth,
          accumulate):
    if accumulate:
        tile_product_add(a, a_start, a_row_stride, b, b_start, b_row_stride, c, c_start,
                         c_row_stride, depth)
    else:
        tile_product(a, a_start, a_row_stride, b, b_start, b_row_stride, c, c_start,
                     c_row_stride, depth)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("depth", [0, 1, 7, 64, 259])
def test_tile_product_matches_numpy_and_writes_only_its_tile(rng, dtype, accumulate, depth):
    cols = tile_cols(np.dtype(dtype).itemsize)
    # Offsets and row strides wider than the tile, as the kernel uses them.
    a_start, a_row_stride = 5, depth + 3
    b_start, b_row_stride = 3, cols + 9
    c_start, c_row_stride = 11, cols + 4
    a = rng.standard_normal(a_start + ROWS * a_row_stride).astype(dtype)
    b = rng.standard_normal(b_start + max(depth, 1) * b_row_stride).astype(dtype)
    c = rng.standard_normal(c_start + ROWS * c_row_stride + 7).astype(dtype)
    a_tile = np.lib.stride_tricks.as_strided(
        a[a_start:], (ROWS, depth), (a_row_stride * a.itemsize, a.itemsize))
    b_tile = np.lib.stride_tricks.as_strided(
        b[b_start:], (depth, cols), (b_row_stride * b.itemsize, b.itemsize))
    before = c.copy()
    c_view = np.lib.stride_tricks.as_strided(
        c[c_start:], (ROWS, cols), (c_row_stride * c.itemsize, c.itemsize))
    expected = a_tile.astype(np.float64) @ b_tile.astype(np.float64)
    if accumulate:
        expected += c_view.astype(np.float64)
    a_before, b_before = a.copy(), b.copy()

    _tile(a, a_start, a_row_stride, b, b_start, b_row_stride, c, c_start, c_row_stride, depth,
          accumulate)

    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(c_view, expected, rtol=tol, atol=tol * max(depth, 1))
    touched = np.zeros(c.shape, bool)
    for r in range(ROWS):
        touched[c_start + r * c_row_stride:c_start + r * c_row_stride + cols] = True
    np.testing.assert_array_equal(c[~touched], before[~touched])
    np.testing.assert_array_equal(a, a_before)
    np.testing.assert_array_equal(b, b_before)


@numba.njit
def _tile_strided(a, a_start, a_row_stride, a_depth_stride, b, b_start, b_row_stride, c, c_start,
                  c_row_stride, depth):
    tile_product_add_strided(a, a_start, a_row_stride, a_depth_stride, b, b_start, b_row_stride,
                             c, c_start, c_row_stride, depth)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("depth", [0, 1, 7, 96])
def test_strided_tile_reads_a_transposed_in_place(rng, dtype, depth):
    """a[r, d] at a_start + r * a_row_stride + d * a_depth_stride: with row stride 1 the tile reads
    a block stored transposed (as the backward's grad_q product reads grad_s), and gives the bits
    of the plain tile on the transposed copy."""
    cols = tile_cols(np.dtype(dtype).itemsize)
    a_start, a_depth_stride = 2, ROWS + 5
    b_start, b_row_stride = 1, cols + 3
    c_start, c_row_stride = 4, cols + 2
    stored = rng.standard_normal(a_start + max(depth, 1) * a_depth_stride).astype(dtype)
    b = rng.standard_normal(b_start + max(depth, 1) * b_row_stride).astype(dtype)
    c = rng.standard_normal(c_start + ROWS * c_row_stride + 5).astype(dtype)
    a_tile = np.lib.stride_tricks.as_strided(
        stored[a_start:], (ROWS, depth), (stored.itemsize, a_depth_stride * stored.itemsize))
    b_tile = np.lib.stride_tricks.as_strided(
        b[b_start:], (depth, cols), (b_row_stride * b.itemsize, b.itemsize))
    c_view = np.lib.stride_tricks.as_strided(
        c[c_start:], (ROWS, cols), (c_row_stride * c.itemsize, c.itemsize))
    before, stored_before = c.copy(), stored.copy()
    expected = a_tile.astype(np.float64) @ b_tile.astype(np.float64) + c_view.astype(np.float64)
    plain = c.copy()
    a_copy = np.ascontiguousarray(a_tile).reshape(-1)

    _tile_strided(stored, a_start, 1, a_depth_stride, b, b_start, b_row_stride, c, c_start,
                  c_row_stride, depth)
    _tile(a_copy, 0, depth, b, b_start, b_row_stride, plain, c_start, c_row_stride, depth, True)

    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(c_view, expected, rtol=tol, atol=tol * max(depth, 1))
    np.testing.assert_array_equal(c, plain)
    touched = np.zeros(c.shape, bool)
    for r in range(ROWS):
        touched[c_start + r * c_row_stride:c_start + r * c_row_stride + cols] = True
    np.testing.assert_array_equal(c[~touched], before[~touched])
    np.testing.assert_array_equal(stored, stored_before)


@numba.njit
def _exp_all(x):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = exp_nonpositive(x[i])
    return out


def test_float32_exp_is_within_one_ulp_down_to_the_denormals():
    x = np.linspace(-87.3, 0.0, 2_000_001, dtype=np.float32)
    got = _exp_all(x).astype(np.float64)
    exact = np.exp(x.astype(np.float64))
    # 1.2e-7 is one float32 ulp at the bottom of a binade; NumPy's own float32 exp has about
    # twice that.
    assert np.max(np.abs(got / exact - 1)) < 1.2e-7


def test_float32_exp_special_values():
    x = np.array([-np.inf, -1e30, -90.0, -88.0, -87.8, 0.0, -0.0, np.nan], np.float32)
    got = _exp_all(x)
    # a masked score (-inf) and anything that underflows give exactly 0, never NaN
    assert np.all(got[:5] == 0) and not np.signbit(got[:5]).any()
    assert got[5] == 1 and got[6] == 1
    assert np.isnan(got[7])


@numba.njit
def _exp_flushed_all(x, negligible):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = exp_flushed(x[i], negligible)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_flushed_is_exp_above_the_threshold_and_zero_below(dtype):
    x = np.concatenate([np.linspace(-80.0, 0.0, 200_001), [-np.inf, -1e30, -64.0001, -64.0,
                                                           np.nan]]).astype(dtype)
    got = _exp_flushed_all(x, dtype(-64.0))
    below = x < -64
    assert np.all(got[below] == 0) and not np.signbit(got[below]).any()
    np.testing.assert_array_equal(got[~below], _exp_all(x[~below]))  # NaN stays NaN
    assert np.isnan(got[-1])


def test_float64_exp_is_the_library_exp():
    x = np.linspace(-700, 0, 10001)
    np.testing.assert_allclose(_exp_all(x), np.exp(x), rtol=4e-16, atol=0)


@numba.njit
def _tile_width(a):
    return tile_width(a)


@pytest.mark.parametrize("dtype, lanes", [(np.float32, 16), (np.float64, 8)])
def test_tile_width_is_the_tile_columns_of_the_dtype(dtype, lanes):
    # two vectors of the target's width: 16 float32 with AVX2's 32 bytes, 32 with AVX-512's 64
    cols = lanes * VECTOR_BYTES // 32
    a = np.zeros(3, dtype)
    assert tile_cols(a.itemsize) == cols
    assert _tile_width(a) == cols  # in compiled code, as a constant


def _vector_bytes_for(env: dict) -> int:
    code = "from fastattn.kernels.cpu.tile import VECTOR_BYTES; print(VECTOR_BYTES)"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_the_tile_width_follows_numbas_target():
    """64-byte vectors only where Numba compiles for AVX-512, so a kernel never runs wider vectors
    than its CPU has (and Numba's cache, keyed by the target, keeps the two apart)."""
    import llvmlite.binding as llvm
    host = 64 if llvm.get_host_cpu_features().get("avx512f", False) else 32
    assert vector_bytes() == VECTOR_BYTES
    if "NUMBA_CPU_NAME" not in os.environ and "NUMBA_CPU_FEATURES" not in os.environ:
        assert VECTOR_BYTES == host
    assert _vector_bytes_for({"NUMBA_CPU_NAME": "haswell"}) == 32
    assert _vector_bytes_for({"NUMBA_CPU_NAME": "znver3"}) == 32
    if host == 64:  # (a target the CPU lacks could not run)
        assert _vector_bytes_for({"NUMBA_CPU_NAME": "skylake-avx512"}) == 64


_AVX2_RUN = """
import numpy as np, fastattn
from fastattn import reference
from fastattn.kernels.cpu.tile import VECTOR_BYTES
assert VECTOR_BYTES == 32, VECTOR_BYTES
rng = np.random.default_rng(0)
for dtype, tol in ((np.float32, 2e-5), (np.float64, 1e-12)):
    q, k, v = (rng.standard_normal((1, 2, n, 24)).astype(dtype) for n in (45, 70, 70))
    for opts in ({"is_causal": True}, {"window": (20, 3), "softcap": 5.0}):
        out, lse = fastattn.scaled_dot_product_attention(q, k, v, return_lse=True, **opts)
        ref, ref_lse = reference.scaled_dot_product_attention(
            *(x.astype(np.float64) for x in (q, k, v)), return_lse=True, **opts)
        assert np.abs(out - ref).max() < tol, (dtype, opts, np.abs(out - ref).max())
        assert np.abs(lse - ref_lse).max() < tol, (dtype, opts)
print("ok")
"""


def test_the_avx2_tile_on_any_machine(tmp_path):
    """The 32-byte tile is what AVX2 machines (and the AMD CI kind) run: test it here too, compiled
    for Haswell in a fresh process with its own cache."""
    done = subprocess.run([sys.executable, "-c", _AVX2_RUN], capture_output=True, text=True,
                          env={**os.environ, "NUMBA_CPU_NAME": "haswell",
                               "NUMBA_CACHE_DIR": str(tmp_path)}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
