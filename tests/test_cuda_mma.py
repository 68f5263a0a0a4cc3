"""The tensor-core attention kernel (kernels/cuda/fused_mma.py) for float16 and bfloat16 inputs,
in Numba's CUDA simulator, where its ``mma.sync`` and ``cvt`` steps are Python.

The accuracy rule for 16-bit inputs is FlashAttention's: the kernel's max error against the float64
reference is at most twice that of the plain computation in the same precision (float32 scores
and softmax from the 16-bit inputs, the weights rounded to the 16-bit type before they meet the
values, the output rounded to it), plus 1e-6; the lse (float32) follows the float32 rule.
Tiles are tiny (one warp, 16 keys, 16 or 32 features), so that tiny inputs span several query
and key tiles, partial ones and several output column blocks.
"""

import numpy as np
import pytest

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (pip install fastattn[cuda])")

import fastattn  # noqa: E402
from fastattn import _backends, reference  # noqa: E402

if _backends.cuda_unavailable_reason() is not None:
    raise RuntimeError(
        f"the cuda backend is not usable ({_backends.cuda_unavailable_reason()}): run the tests "
        f"with NUMBA_ENABLE_CUDASIM=1 (tests/conftest.py sets it unless numba was imported first)")

from numba import cuda  # noqa: E402  (the simulator swaps this module global in kernels)

from fastattn import _cuda  # noqa: E402
from fastattn.kernels import cuda as kernels  # noqa: E402
from fastattn.kernels.cuda import fused_mma  # noqa: E402

TINY_MMA = (kernels.MmaTiles(warps=1, block_k=16, features=16, block_v=8),
            kernels.MmaTiles(warps=1, block_k=16, features=32, block_v=8))


@pytest.fixture(autouse=True)
def tiny_tiles(monkeypatch):
    monkeypatch.setattr(_cuda, "MMA_TILES", TINY_MMA)


@pytest.fixture(autouse=True, scope="module")
def _quick_thread_switches(quick_thread_switches):
    """(conftest.quick_thread_switches for every test here)"""


def to_bf16_bits(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), as uint16 bit patterns."""
    b = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(h):
    return (np.asarray(h, np.uint16).astype(np.uint32) << 16).view(np.float32)


def round16(x, kind):
    x = np.asarray(x, np.float32)
    return x.astype(np.float16).astype(np.float32) if kind == "float16" else \
        from_bf16_bits(to_bf16_bits(x))


def plain16(q, k, v, kind, mask=None, enable_gqa=False, **kw):
    """The plain computation in the kernel's precision (see the module docstring)."""
    w = reference.attention_weights(q.astype(np.float32), k.astype(np.float32), mask,
                                    enable_gqa=enable_gqa, **kw).astype(np.float32)
    v = v.astype(np.float32)
    if enable_gqa:
        v = np.repeat(v, q.shape[-3] // v.shape[-3], axis=-3)
    return round16(round16(w, kind) @ v, kind)


def assert_16bit_rule(out, q, k, v, kind, mask=None, **kw):
    mask64 = mask if mask is None or mask.dtype == np.bool_ else mask.astype(np.float64)
    exact = reference.scaled_dot_product_attention(
        q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), mask64, **kw)
    plain = plain16(q, k, v, kind, mask, **kw)
    finite = np.isfinite(exact)
    assert np.array_equal(np.isfinite(out), finite)
    err = np.max(np.abs(out.astype(np.float64) - exact)[finite])
    plain_err = np.max(np.abs(plain.astype(np.float64) - exact)[finite])
    assert err <= 2 * plain_err + 1e-6, f"error {err:.3g} vs plain {kind} error {plain_err:.3g}"
    # and far from the float32 computation's own rounding: the weights were rounded on the way
    assert plain_err > 1e-5


def qkv(rng, B=1, H=2, L=21, S=35, E=16, Ev=12, Hkv=None):
    f = lambda *shape: rng.standard_normal(shape).astype(np.float16)  # noqa: E731
    return f(B, H, L, E), f(B, Hkv or H, S, E), f(B, Hkv or H, S, Ev)


def test_float16_takes_the_tensor_core_kernel_and_matches_the_rule(monkeypatch):
    rng = np.random.default_rng(0)
    q, k, v = qkv(rng)
    made = []
    factory = kernels.mma_attention_kernel
    monkeypatch.setattr(_cuda.kernels, "mma_attention_kernel",
                        lambda tiles, kind: made.append((tiles, kind)) or factory(tiles, kind))
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cuda",
                                                     return_lse=True)
    assert [kind for _, kind in made] == ["float16"] and made[0][0].block_v == 8
    assert out.dtype == np.float16 and lse.dtype == np.float32
    assert_16bit_rule(out, q, k, v, "float16", is_causal=True)
    ref_lse = reference.scaled_dot_product_attention(
        *(x.astype(np.float64) for x in (q, k, v)), is_causal=True, return_lse=True)[1]
    plain_lse = reference.scaled_dot_product_attention(
        *(x.astype(np.float32) for x in (q, k, v)), is_causal=True, return_lse=True)[1]
    assert np.max(np.abs(lse - ref_lse)) <= 2 * np.max(np.abs(plain_lse - ref_lse)) + 1e-6


def test_float16_variants_masks_gqa_and_wider_features():
    rng = np.random.default_rng(1)
    # 32 features (the second tiles), GQA, a bool mask with a fully masked row, a window, ALiBi
    q, k, v = qkv(rng, H=4, Hkv=2, L=18, S=30, E=24, Ev=16)
    mask = rng.random((18, 30)) > 0.3
    mask[5] = False
    slopes = np.array([0.5, 0.25, 0.125, 0.0625])
    kw = dict(enable_gqa=True, alignment="bottom_right", window=(9, 3), softcap=5.0,
              alibi_slopes=slopes)
    out = fastattn.scaled_dot_product_attention(q, k, v, mask, backend="cuda", **kw)
    assert np.all(out[:, :, 5] == 0)  # no key left: zeros
    assert_16bit_rule(out, q, k, v, "float16", mask, **kw)
    # a float mask (float16, as the inputs)
    fmask = rng.standard_normal((18, 30)).astype(np.float16)
    out = fastattn.scaled_dot_product_attention(q, k, v, fmask, backend="cuda", enable_gqa=True)
    assert_16bit_rule(out, q, k, v, "float16", fmask, enable_gqa=True)


def test_bfloat16_bits_on_the_tensor_core_kernel():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal(s).astype(np.float32)
               for s in ((1, 2, 20, 16), (1, 2, 26, 16), (1, 2, 26, 16)))
    bits = [to_bf16_bits(x) for x in (q, k, v)]
    before = [b.copy() for b in bits]
    out_bits, lse = _cuda.bfloat16_attention(*(b.view(np.float16) for b in bits),
                                             is_causal=True, return_lse=True)
    assert all(np.array_equal(b, c) for b, c in zip(bits, before))  # inputs untouched
    q16, k16, v16 = (from_bf16_bits(b) for b in bits)  # the values the kernel saw
    out = from_bf16_bits(out_bits.view(np.uint16))
    assert_16bit_rule(out, q16, k16, v16, "bfloat16", is_causal=True)
    ref_lse = reference.scaled_dot_product_attention(
        *(x.astype(np.float64) for x in (q16, k16, v16)), is_causal=True, return_lse=True)[1]
    assert np.max(np.abs(lse - ref_lse)) < 1e-5


def test_bfloat16_refuses_what_the_tensor_core_kernel_cannot_do():
    x = np.zeros((1, 1, 4, 40), np.float16)  # 40 features: more than the tiles keep
    with pytest.raises(ValueError, match="tensor-core kernel only"):
        _cuda.bfloat16_attention(x, x, x)
    y = np.zeros((1, 1, 4, 8), np.float16)
    with pytest.raises(TypeError, match="attn_mask"):
        _cuda.bfloat16_attention(y, y, y, np.zeros((4, 4), np.float16))


def test_simulated_steps_round_like_the_hardware():
    pack16, packbf = fused_mma._pack_simulated("float16"), fused_mma._pack_simulated("bfloat16")
    x = np.float32(1 + 2 ** -9 + 2 ** -12)  # between float16 values; bfloat16 rounds it to 1
    w = int(pack16(x, np.float32(-2)))
    assert w & 0xFFFF == int(np.float16(x).view(np.uint16)) and w >> 16 == 0xC000
    assert int(packbf(x, np.float32(3))) == 0x3F80 | (0x4040 << 16)
    assert fused_mma._to_bits_simulated(np.float32(np.nan), "bfloat16") & 0x7F80 == 0x7F80
    with pytest.raises(ValueError, match="kind"):
        kernels.mma_attention_kernel(TINY_MMA[0], "float32")
    with pytest.raises(ValueError, match="inconsistent"):
        kernels.MmaTiles(warps=1, block_k=12, features=16, block_v=8).check()


@pytest.mark.parametrize("kind", ["float16", "bfloat16"])
def test_simulated_mma_is_the_ptx_isa_fragment_layout(kind):
    """The simulator's mma.sync against A @ B + C with the fragments laid out as the PTX ISA's
    "Matrix Fragments for mma.m16n8k16 with floating point type" says (written out here
    independently of fused_mma), so that the kernel that passes in the simulator lays out its
    fragments as the GPU reads them."""
    rng = np.random.default_rng(3)
    A, B = rng.standard_normal((16, 16)), rng.standard_normal((16, 8))
    if kind == "float16":
        A, B = A.astype(np.float16), B.astype(np.float16)
        bits = lambda x: x.view(np.uint16).astype(np.uint32)  # noqa: E731
        A64, B64 = A.astype(np.float64), B.astype(np.float64)
    else:
        A, B = to_bf16_bits(A), to_bf16_bits(B)
        bits = lambda x: x.astype(np.uint32)  # noqa: E731
        A64, B64 = (from_bf16_bits(x).astype(np.float64) for x in (A, B))
    a_regs = np.zeros((32, 4), np.uint32)
    b_regs = np.zeros((32, 2), np.uint32)
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i in range(8):
            row = g if i < 2 or 4 <= i < 6 else g + 8
            col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
            a_regs[lane, i // 2] |= bits(A[row:row + 1, col])[0] << (16 * (i % 2))
        for i in range(4):
            row = t * 2 + (i & 1) + (8 if i >= 2 else 0)
            b_regs[lane, i // 2] |= bits(B[row:row + 1, g])[0] << (16 * (i % 2))
    C = rng.standard_normal((16, 8)).astype(np.float32)
    c_regs = np.zeros((32, 4), np.float32)
    where = [[((g if i < 2 else g + 8), t * 2 + (i & 1)) for i in range(4)]
             for g, t in ((lane >> 2, lane % 4) for lane in range(32))]
    for lane in range(32):
        for i, (r, c) in enumerate(where[lane]):
            c_regs[lane, i] = C[r, c]
    mma = cuda.jit(device=True)(fused_mma._mma_simulated(kind))

    @cuda.jit
    def run(a, b, c, out):
        scratch = cuda.shared.array(32 * 12, np.float64)
        t = cuda.threadIdx.x
        d = mma(scratch, t, a[t, 0], a[t, 1], a[t, 2], a[t, 3], b[t, 0], b[t, 1], c[t, 0],
                c[t, 1], c[t, 2], c[t, 3])
        for i in range(4):
            out[t, i] = d[i]

    out = np.zeros((32, 4), np.float32)
    run[1, 32](a_regs, b_regs, c_regs, out)
    want = A64 @ B64 + C
    for lane in range(32):
        for i, (r, c) in enumerate(where[lane]):
            assert abs(out[lane, i] - want[r, c]) <= 1e-5 * (1 + abs(want[r, c]))
