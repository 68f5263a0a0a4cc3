"""The fused attention kernel for float16 and bfloat16 inputs on tensor cores (``mma.sync``).

The same computation and variants as kernels/cuda/fused.py (whose per-score and online-softmax
steps it shares, ``fused.score_steps``), with both products on tensor cores the way
FlashAttention 2 does them: ``mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}`` takes 16-bit
operands and accumulates in float32; the weights are rounded to the input's 16-bit type before
they meet the values; everything else (scale, variants, softmax, sums) is float32.

How numba-cuda reaches the instruction: numba-cuda 0.30 has no tensor-core API (no wmma) and
``link=`` of CUDA C++ needs NVRTC at run time, but its ``numba.cuda.extending.intrinsic`` lowers
to LLVM IR, where an inline-PTX call (``llvmlite.ir.InlineAsm``, which numba-cuda itself uses for
``activemask`` and the cache-hinted loads) carries the ``mma.sync`` and the ``cvt`` that pack two
float32 into 16-bit pairs. NVVM passes them to ptxas: the kernel's SASS has HMMA.16816.F32
(bench/cuda_compile_check.py counts them). The CUDA simulator runs Python, not PTX: there the
same device functions are Python (``_mma_simulated``: the warp's fragments meet in shared memory).

Layout (per block of ``warps`` warps; warp w owns query rows 16 w .. 16 w + 15 of the block):
lane = 4 g + t holds, of every 16 x 8 float32 tile, rows g and g + 8 at columns 2 t and 2 t + 1
(the mma's C fragment). q's A fragments stay in registers for the whole key loop. k (keys x
feature pairs) and v (columns x key pairs, transposed so that a B fragment is one 32-bit word)
go through shared memory as packed 16-bit pairs, rows padded by 4 words (conflict-free fragment
loads). The score fragments of two adjacent 8-key tiles are, once rounded and packed, the A
fragment of the weights-times-values product: the weights never touch shared memory. A row's
max and sum are reduced over the 4 lanes of a quad with shuffles (through shared memory in the
simulator).
"""
import functools
from typing import NamedTuple

import numpy as np
from numba import cuda  # the name must stay `cuda`: the simulator swaps it in these globals

from ._common import _SIMULATOR, _device
from .fused import score_steps

PAD_WORDS = 4  # 32-bit words added to each shared row: fragment loads hit 32 distinct banks
KINDS = ("float16", "bfloat16")


class MmaTiles(NamedTuple):
    """Compile-time shapes of the tensor-core attention kernel."""
    warps: int            # warps per block; each owns 16 query rows
    block_k: int          # keys per tile of the key loop (a multiple of 16)
    features: int         # q and k features kept (a multiple of 16): E <= features
    block_v: int          # output columns per block (a multiple of 8); more blocks along grid y
    min_blocks: int = 1   # launch bound: blocks per SM that the registers must allow

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def block_q(self) -> int:
        return 16 * self.warps

    def shared_bytes(self) -> int:
        W, BK, FE, BV = self[:4]
        red = 16 * W * 4 if _SIMULATOR else 1
        scratch = 2 * W * 32 * 12 if _SIMULATOR else 1  # (float64)
        return 4 * (max(16 * W, BK) * (FE // 2 + PAD_WORDS) + BV * (BK // 2 + PAD_WORDS) + red
                    + scratch)

    def check(self) -> "MmaTiles":
        W, BK, FE, BV, MB = self
        if not (W > 0 and BK > 0 and BK % 16 == 0 and FE > 0 and FE % 16 == 0 and BV > 0
                and BV % 8 == 0 and MB > 0):
            raise ValueError(f"inconsistent tensor-core tiles {self}")
        if self.shared_bytes() > 48 * 1024:
            raise ValueError(f"tensor-core tiles {self} need {self.shared_bytes()} bytes of shared "
                             f"memory; static shared memory ends at 48 KiB")
        return self


# --- the 16-bit steps: PTX on the GPU, Python in the simulator ------------------------------------

def _f32_bits(x):
    return int(np.float32(x).view(np.uint32))


def _to_bits_simulated(x, kind):
    """The 16-bit pattern of float32 x rounded to nearest even (NaN stays a NaN)."""
    if kind == "float16":
        return int(np.float32(x).astype(np.float16).view(np.uint16))
    b = _f32_bits(x)
    if (b & 0x7FFFFFFF) > 0x7F800000:
        return (b >> 16) | 0x40
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF


def _from_bits_simulated(h, kind):
    if kind == "float16":
        return float(np.uint16(h).view(np.float16))
    return float(np.uint32(int(h) << 16).view(np.float32))


def _pack_simulated(kind):
    def pack(lo, hi):
        """The 32-bit word of float32 lo and hi as 16-bit values (lo in the low half)."""
        return np.uint32(_to_bits_simulated(lo, kind) | (_to_bits_simulated(hi, kind) << 16))
    return pack


def _mma_simulated(kind):
    def mma(scratch, tid, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """mma.sync m16n8k16 row.col, float32 accumulate, for one warp: each lane leaves its
        fragments' 12 values in shared memory, then computes its own four results from the
        warp's. A (16 x 16, row-major) element (row, k) is half k % 2 of register
        row // 8 + 2 (k // 8) of lane 4 (row % 8) + (k % 8) // 2; B (16 x 8, column-major)
        element (k, col) is half k % 2 of register k // 8 of lane 4 col + (k % 8) // 2."""
        lane, base = int(tid) % 32, (int(tid) // 32) * 32 * 12
        for r, word in enumerate((a0, a1, a2, a3, b0, b1)):
            for h in range(2):
                scratch[base + lane * 12 + 2 * r + h] = _from_bits_simulated(
                    (int(word) >> (16 * h)) & 0xFFFF, kind)
        cuda.syncthreads()
        g, t = lane // 4, lane % 4
        out = []
        for row, col, c in ((g, 2 * t, c0), (g, 2 * t + 1, c1), (g + 8, 2 * t, c2),
                            (g + 8, 2 * t + 1, c3)):
            total = float(c)
            for k in range(16):
                a = scratch[base + (4 * (row % 8) + (k % 8) // 2) * 12
                            + 2 * (row // 8 + 2 * (k // 8)) + k % 2]
                b = scratch[base + (4 * col + (k % 8) // 2) * 12 + 8 + 2 * (k // 8) + k % 2]
                total += a * b
            out.append(np.float32(total))
        cuda.syncthreads()  # the warp is done reading the fragments
        return out[0], out[1], out[2], out[3]
    return mma


def _ptx_steps(kind):
    """(mma, pack) as numba-cuda intrinsics lowered to inline PTX."""
    from llvmlite import ir
    from numba.cuda import types
    from numba.cuda.extending import intrinsic

    ptx_type = "f16" if kind == "float16" else "bf16"
    f32, u32 = types.float32, types.uint32

    @intrinsic
    def mma_intrinsic(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        sig = types.UniTuple(f32, 4)(u32, u32, u32, u32, u32, u32, f32, f32, f32, f32)

        def codegen(context, builder, signature, args):
            i32, f = ir.IntType(32), ir.FloatType()
            fnty = ir.FunctionType(ir.LiteralStructType([f] * 4), [i32] * 6 + [f] * 4)
            asm = ir.InlineAsm(
                fnty, f"mma.sync.aligned.m16n8k16.row.col.f32.{ptx_type}.{ptx_type}.f32 "
                      "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};",
                "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
            res = builder.call(asm, args)
            return context.make_tuple(builder, signature.return_type,
                                      [builder.extract_value(res, i) for i in range(4)])
        return sig, codegen

    @intrinsic
    def pack_intrinsic(typingctx, lo, hi):
        sig = u32(f32, f32)

        def codegen(context, builder, signature, args):
            fnty = ir.FunctionType(ir.IntType(32), [ir.FloatType()] * 2)
            # cvt.rn.{f16,bf16}x2.f32 d, a, b puts a in the upper half, b in the lower
            asm = ir.InlineAsm(fnty, f"cvt.rn.{ptx_type}x2.f32 $0, $2, $1;", "=r,f,f")
            return builder.call(asm, args)
        return sig, codegen

    def mma(scratch, tid, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return mma_intrinsic(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

    def pack(lo, hi):
        return pack_intrinsic(lo, hi)

    return _device(mma), _device(pack)


def _steps(kind):
    if _SIMULATOR:
        return _device(_mma_simulated(kind)), _device(_pack_simulated(kind))
    return _ptx_steps(kind)


def _kernel(threads: int, min_blocks: int):
    if _SIMULATOR:
        return cuda.jit
    return cuda.jit(launch_bounds=(threads, min_blocks))


@functools.lru_cache(maxsize=None)
def mma_attention_kernel(tiles: MmaTiles, kind: str):
    """The tensor-core attention kernel for ``tiles`` and 16-bit inputs of ``kind`` ("float16"
    or "bfloat16"). It takes the fused float32 kernel's arguments, with q, k, v as uint16 arrays
    of the 16-bit patterns and ``out`` a uint16 array that receives them (lse is float32);
    ``cosine`` must be False (the host sends cosine similarity to the float32 kernel)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    tiles.check()
    W, BK, FE, BV, MIN_BLOCKS = tiles
    BQ, NT = tiles.block_q, tiles.threads
    FW = FE // 2 + PAD_WORDS   # words per shared row of q or k (feature pairs)
    VW = BK // 2 + PAD_WORDS   # words per shared row of transposed v (key pairs)
    KS, NK, NV, KK = FE // 16, BK // 8, BV // 8, BK // 16
    SK, SV = max(BQ, BK) * FW, BV * VW
    RED = BQ * 4 if _SIMULATOR else 1
    SCRATCH = W * 32 * 12 if _SIMULATOR else 1
    SCRATCH_TYPE = np.float64 if _SIMULATOR else np.uint32  # (unused on the GPU)
    variant_score, rescale, weight, finish = score_steps(np.float32)
    mma, pack = _steps(kind)
    f32 = np.float32
    zero, neg_inf = f32(0), f32(-np.inf)
    u, u32, i64 = np.uint64, np.uint32, np.int64
    ALL = 0xFFFFFFFF

    @_device
    def stage_pairs(x, base, rs, cs, rows_left, cols_left, ROWS, sX, tid, salt):
        """sX[row * FW + c] = the pair x[row, 2c], x[row, 2c + 1] (16-bit patterns; 0 outside
        rows_left x cols_left) of ROWS rows of FE features. ``salt``: as in fused.py's
        load_tile, a 0 from the key loop's state that keeps the per-element offsets from being
        hoisted out of the loop (as 64-bit values that take more registers than they save)."""
        rs = rs + salt
        cs = cs + salt
        for t in range((ROWS * (FE // 2) + NT - 1) // NT):
            w = tid + u(t * NT)
            if w < u(ROWS * (FE // 2)):
                row = i64(w // u(FE // 2))
                f = i64(w % u(FE // 2)) * 2
                lo = u32(0)
                hi = u32(0)
                if row < rows_left:
                    at = base + row * rs + f * cs
                    if f < cols_left:
                        lo = u32(x[u(at)])
                    if f + 1 < cols_left:
                        hi = u32(x[u(at + cs)])
                sX[u(row) * u(FW) + w % u(FE // 2)] = lo | (hi << u32(16))

    @_device
    def stage_values(x, base, rs, cs, rows_left, cols_left, sX, tid, salt):
        """sX[col * VW + c] = the pair x[2c, col], x[2c + 1, col] of a BK x BV value tile:
        transposed, so that a B fragment (two consecutive keys of one column) is one word."""
        rs = rs + salt
        cs = cs + salt
        for t in range((BV * (BK // 2) + NT - 1) // NT):
            w = tid + u(t * NT)
            if w < u(BV * (BK // 2)):
                col = i64(w % u(BV))
                key = i64(w // u(BV)) * 2
                lo = u32(0)
                hi = u32(0)
                if col < cols_left:
                    at = base + key * rs + col * cs
                    if key < rows_left:
                        lo = u32(x[u(at)])
                    if key + 1 < rows_left:
                        hi = u32(x[u(at + rs)])
                sX[u(col) * u(VW) + w // u(BV)] = lo | (hi << u32(16))

    if _SIMULATOR:
        @_device
        def quad_max(vals, sRed, row0, tig):
            """vals[h] = the max over the quad's 4 lanes of rows row0 + 8 h."""
            cuda.syncthreads()
            for h in range(2):
                sRed[(row0 + u(8 * h)) * u(4) + tig] = vals[h]
            cuda.syncthreads()
            for h in range(2):
                m = vals[h]
                for t in range(4):
                    m = max(m, sRed[(row0 + u(8 * h)) * u(4) + u(t)])
                vals[h] = m

        @_device
        def quad_sum(vals, sRed, row0, tig):
            cuda.syncthreads()
            for h in range(2):
                sRed[(row0 + u(8 * h)) * u(4) + tig] = vals[h]
            cuda.syncthreads()
            for h in range(2):
                total = zero
                for t in range(4):
                    total += sRed[(row0 + u(8 * h)) * u(4) + u(t)]
                vals[h] = total
    else:
        @_device
        def quad_max(vals, sRed, row0, tig):
            for h in range(2):
                m = vals[h]
                m = max(m, cuda.shfl_xor_sync(ALL, m, 1))
                m = max(m, cuda.shfl_xor_sync(ALL, m, 2))
                vals[h] = m

        @_device
        def quad_sum(vals, sRed, row0, tig):
            for h in range(2):
                total = vals[h]
                total += cuda.shfl_xor_sync(ALL, total, 1)
                total += cuda.shfl_xor_sync(ALL, total, 2)
                vals[h] = total

    @_kernel(NT, MIN_BLOCKS)
    def attention(q, q_outer, q_rs, q_cs, k, k_outer, k_rs, k_cs, v, v_outer, v_rs, v_cs,
                  m, m_outer, m_rs, m_cs, mask_kind, N, L, S, E, Ev, scale, offset, left, right,
                  softcap, alibi, use_alibi, cosine, out, lse):
        """As kernels/cuda/fused.py's kernel (no cosine), on tensor cores."""
        sK = cuda.shared.array(SK, np.uint32)
        sV = cuda.shared.array(SV, np.uint32)
        sRed = cuda.shared.array(RED, f32)
        scratch = cuda.shared.array(SCRATCH, SCRATCH_TYPE)
        qf = cuda.local.array((KS, 4), np.uint32)
        s = cuda.local.array((NK, 4), f32)
        pf = cuda.local.array((KK, 4), np.uint32)
        acc = cuda.local.array((NV, 4), f32)
        row_max = cuda.local.array(2, f32)
        row_sum = cuda.local.array(2, f32)
        tile_max = cuda.local.array(2, f32)
        alpha = cuda.local.array(2, f32)
        tid = u(cuda.threadIdx.x)
        lane = tid % u(32)
        g = lane // u(4)
        tig = lane % u(4)
        row0 = (tid // u(32)) * u(16) + g  # the block's row of c0, c1 (c2, c3: row0 + 8)
        n_qtiles = (L + BQ - 1) // BQ
        n = i64(cuda.blockIdx.x) % N
        q0 = (n_qtiles - 1 - i64(cuda.blockIdx.x) // N) * BQ
        c0 = i64(cuda.blockIdx.y) * BV
        k_base = k_outer[n]
        v_base = v_outer[n] + c0 * v_cs
        slope = f32(alibi[n]) if use_alibi else zero
        rows_left = min(i64(BQ), L - q0)
        # q's A fragments, once for the whole key loop
        stage_pairs(q, q_outer[n] + q0 * q_rs, q_rs, q_cs, rows_left, E, BQ, sK, tid, i64(0))
        cuda.syncthreads()
        for ks in range(KS):
            qf[ks, 0] = sK[row0 * u(FW) + u(ks * 8) + tig]
            qf[ks, 1] = sK[(row0 + u(8)) * u(FW) + u(ks * 8) + tig]
            qf[ks, 2] = sK[row0 * u(FW) + u(ks * 8 + 4) + tig]
            qf[ks, 3] = sK[(row0 + u(8)) * u(FW) + u(ks * 8 + 4) + tig]
        for h in range(2):
            row_max[h] = neg_inf
            row_sum[h] = zero
        for c in range(NV):
            for e in range(4):
                acc[c, e] = zero
        p_first = q0 + offset
        p_last = min(q0 + BQ, L) - 1 + offset
        k_start = max(i64(0), p_first - left) // BK * BK
        k_end = min(S, p_last + right + 1)
        for j0 in range(k_start, k_end, BK):
            salt = (j0 ^ k_end) >> 62  # 0: both lie in [0, 2**62)
            cuda.syncthreads()  # the previous readers of sK and sV are done
            stage_pairs(k, k_base + j0 * k_rs, k_rs, k_cs, S - j0, E, BK, sK, tid, salt)
            stage_values(v, v_base + j0 * v_rs, v_rs, v_cs, S - j0, Ev - c0, sV, tid, salt)
            cuda.syncthreads()
            # scores: q (16 rows x 16 features) times k^T (16 features x 8 keys) per mma
            for nt in range(NK):
                c_0 = zero
                c_1 = zero
                c_2 = zero
                c_3 = zero
                at = (u(nt * 8) + g) * u(FW) + tig
                for ks in range(KS):
                    c_0, c_1, c_2, c_3 = mma(scratch, tid, qf[ks, 0], qf[ks, 1], qf[ks, 2],
                                             qf[ks, 3], sK[at + u(ks * 8)],
                                             sK[at + u(ks * 8 + 4)], c_0, c_1, c_2, c_3)
                s[nt, 0] = c_0 * scale
                s[nt, 1] = c_1 * scale
                s[nt, 2] = c_2 * scale
                s[nt, 3] = c_3 * scale
            inside = (j0 + BK <= S and j0 >= p_last - left and j0 + BK - 1 <= p_first + right)
            if not inside or mask_kind != 0 or softcap > zero or use_alibi:
                for h in range(2):
                    i = q0 + i64(row0) + 8 * h
                    p = i + offset
                    m_row = m_outer[n] + i * m_rs if mask_kind != 0 and i < L else i64(0)
                    for nt in range(NK):
                        for e in range(2):
                            j = j0 + nt * 8 + i64(tig) * 2 + e
                            s[nt, 2 * h + e] = variant_score(
                                s[nt, 2 * h + e], inside, i, p, j, L, S, left, right, softcap,
                                m, m_row, m_cs, mask_kind, slope, use_alibi)
            for h in range(2):
                tmax = neg_inf
                for nt in range(NK):
                    tmax = max(tmax, max(s[nt, 2 * h], s[nt, 2 * h + 1]))
                tile_max[h] = tmax
            quad_max(tile_max, sRed, row0, tig)
            for h in range(2):
                new_max, alpha[h] = rescale(row_max[h], tile_max[h])
                tile_sum = zero
                for nt in range(NK):
                    for e in range(2):
                        x = weight(s[nt, 2 * h + e], new_max)
                        s[nt, 2 * h + e] = x
                        tile_sum += x
                row_sum[h] = row_sum[h] * alpha[h] + tile_sum
                row_max[h] = new_max
            for c in range(NV):
                for e in range(4):
                    acc[c, e] *= alpha[e // 2]
            # the weights of two adjacent 8-key tiles are the A fragment of 16 keys
            for kk in range(KK):
                pf[kk, 0] = pack(s[2 * kk, 0], s[2 * kk, 1])
                pf[kk, 1] = pack(s[2 * kk, 2], s[2 * kk, 3])
                pf[kk, 2] = pack(s[2 * kk + 1, 0], s[2 * kk + 1, 1])
                pf[kk, 3] = pack(s[2 * kk + 1, 2], s[2 * kk + 1, 3])
            # weights (16 rows x 16 keys) times values (16 keys x 8 columns) per mma
            for c in range(NV):
                at = (u(c * 8) + g) * u(VW) + tig
                c_0 = acc[c, 0]
                c_1 = acc[c, 1]
                c_2 = acc[c, 2]
                c_3 = acc[c, 3]
                for kk in range(KK):
                    c_0, c_1, c_2, c_3 = mma(scratch, tid, pf[kk, 0], pf[kk, 1], pf[kk, 2],
                                             pf[kk, 3], sV[at + u(kk * 8)],
                                             sV[at + u(kk * 8 + 4)], c_0, c_1, c_2, c_3)
                acc[c, 0] = c_0
                acc[c, 1] = c_1
                acc[c, 2] = c_2
                acc[c, 3] = c_3
        quad_sum(row_sum, sRed, row0, tig)
        for h in range(2):
            i = q0 + i64(row0) + 8 * h
            if i < L:
                inv, row_lse = finish(row_sum[h], row_max[h])
                for c in range(NV):
                    col = c0 + c * 8 + i64(tig) * 2
                    word = pack(acc[c, 2 * h] * inv, acc[c, 2 * h + 1] * inv)
                    if col < Ev:
                        out[n, i, col] = np.uint16(word & u32(0xFFFF))
                    if col + 1 < Ev:
                        out[n, i, col + 1] = np.uint16(word >> u32(16))
                if tig == u(0) and c0 == 0:
                    lse[n, i] = row_lse

    return attention
