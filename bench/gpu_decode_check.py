"""attention_with_kvcache and varlen_attention on a real GPU: correctness at real sizes, then the
decode step's time and the bandwidth it reaches.

    python bench/gpu_decode_check.py              # an NVIDIA GPU and numba-cuda (torch optional)
    python bench/gpu_decode_check.py --sim-smoke  # tiny sizes in Numba's CUDA simulator

1. Checks against ``fastattn.reference`` (float64), float32 on device caches: decoding and a
   chunk of prefill (Lq 1, 16) over rows of different fills (0 to full), GQA 32/8, D = 128; the
   caches afterwards hold the old contents plus the new rows (the same bits); paged caches
   (block sizes 16, 256, a shuffled block table) give what the contiguous cache gives; split keys
   give what the unsplit call gives; varlen over 16 sequences of random lengths 64..2048 (causal)
   against the reference. float32 may be at most twice as far from float64 as NumPy's float32.
2. Speed: one decode step, B = 1 and 8, Hq = 32, Hkv = 8, D = 128, float32, device caches of
   4096, 32768 and 131072 keys: ms per step, GB/s of K and V read, against the device-to-device
   copy bandwidth measured in the same run (read + write), and PyTorch's SDPA on the same cache
   slice when torch with CUDA is there.

Prints Markdown. Exit status: 0 all checks pass, 1 a check failed, 2 no GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sim-smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.sim_smoke:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        sys.setswitchinterval(2e-4)
    sys.path.insert(0, ROOT)
    import fastattn
    from fastattn import _backends, reference
    reason = _backends.cuda_unavailable_reason()
    if reason is not None:
        print(f"no usable GPU: {reason}")
        return 2
    from numba import cuda

    small = args.sim_smoke
    rng = np.random.default_rng(0)
    failed = []

    def record(name, ok, detail):
        print(f"| {name} | {'ok' if ok else 'FAILED'} | {detail} |", flush=True)
        if not ok:
            failed.append(name)

    def within_rule(got, exact, plain):
        finite = np.isfinite(exact)
        same_inf = np.array_equal(np.isfinite(got), finite)
        err = float(np.max(np.abs(got[finite] - exact[finite]), initial=0))
        budget = 2 * float(np.max(np.abs(plain[finite] - exact[finite]), initial=0)) + 1e-6
        return same_inf and err <= budget, f"max err {err:.2e} (budget {budget:.2e})"

    B, Hq, Hkv, D, S_max = (2, 4, 2, 8, 40) if small else (4, 32, 8, 128, 4096)
    print("## attention_with_kvcache and varlen_attention against fastattn.reference\n")
    print("| check | result | detail |\n|---|---|---|")
    for Lq in (1, 16):
        q = rng.standard_normal((B, Hq, Lq, D), dtype=np.float32)
        k_cache = rng.standard_normal((B, Hkv, S_max, D), dtype=np.float32)
        v_cache = rng.standard_normal((B, Hkv, S_max, D), dtype=np.float32)
        k = rng.standard_normal((B, Hkv, Lq, D), dtype=np.float32)
        v = rng.standard_normal((B, Hkv, Lq, D), dtype=np.float32)
        seqlens = np.linspace(0, S_max - Lq, B).astype(np.int64)
        d_k, d_v = cuda.to_device(k_cache), cuda.to_device(v_cache)
        out, lse = fastattn.attention_with_kvcache(cuda.to_device(q), d_k, d_v, cuda.to_device(k),
                                                   cuda.to_device(v), cache_seqlens=seqlens,
                                                   return_lse=True)
        out, lse = out.copy_to_host(), lse.copy_to_host()

        def ref(dtype):
            return reference.attention_with_kvcache(
                *(a.astype(dtype) for a in (q, k_cache, v_cache, k, v)), cache_seqlens=seqlens,
                return_lse=True)
        exact, plain = ref(np.float64), ref(np.float32)
        ok_out, detail = within_rule(out, exact[0], plain[0])
        ok_lse, _ = within_rule(lse, exact[1], plain[1])
        record(f"decode Lq={Lq} B={B} Hq/Hkv={Hq}/{Hkv} D={D} fills {seqlens.tolist()}",
               ok_out and ok_lse, detail)
        want_k, want_v = k_cache.copy(), v_cache.copy()
        for b, n in enumerate(seqlens):
            want_k[b, :, n:n + Lq], want_v[b, :, n:n + Lq] = k[b], v[b]
        record(f"caches after Lq={Lq}: old contents + new rows",
               np.array_equal(d_k.copy_to_host().view(np.uint32), want_k.view(np.uint32))
               and np.array_equal(d_v.copy_to_host().view(np.uint32), want_v.view(np.uint32)),
               "same bits")
        split = fastattn.attention_with_kvcache(q, want_k, want_v, cache_seqlens=seqlens + Lq,
                                                num_splits=1, backend="cuda")
        record(f"num_splits=1 equals the default split Lq={Lq}",
               np.allclose(split, out, rtol=2e-6, atol=2e-6),
               f"max diff {np.max(np.abs(split - out)):.2e}")
        for block_size in (16, 256) if not small else (4, 16):
            per_row = -(-S_max // block_size)
            table = rng.permutation(B * per_row + 3)[:B * per_row].reshape(B, per_row)
            kp = np.full((B * per_row + 3, Hkv, block_size, D), np.nan, np.float32)
            vp = kp.copy()
            for b in range(B):
                for i in range(per_row):
                    t = slice(i * block_size, min(S_max, (i + 1) * block_size))
                    kp[table[b, i], :, :t.stop - t.start] = want_k[b, :, t]
                    vp[table[b, i], :, :t.stop - t.start] = want_v[b, :, t]
            paged = fastattn.attention_with_kvcache(
                cuda.to_device(q), cuda.to_device(kp), cuda.to_device(vp),
                cache_seqlens=seqlens + Lq, block_table=table).copy_to_host()
            record(f"paged block_size={block_size} equals contiguous Lq={Lq}",
                   np.allclose(paged, out, rtol=2e-6, atol=2e-6),
                   f"max diff {np.max(np.abs(paged - out)):.2e}")

    lengths = rng.integers(3, 20, 4) if small else rng.integers(64, 2049, 16)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    H = 4 if small else 8
    q, k, v = (rng.standard_normal((cu[-1], H, D), dtype=np.float32) for _ in range(3))
    got = fastattn.varlen_attention(*(cuda.to_device(a) for a in (q, k, v)), cu, cu,
                                    is_causal=True).copy_to_host()
    exact = reference.varlen_attention(*(a.astype(np.float64) for a in (q, k, v)), cu, cu,
                                       is_causal=True)
    plain = reference.varlen_attention(q, k, v, cu, cu, is_causal=True)
    record(f"varlen {len(lengths)} sequences of {lengths.min()}..{lengths.max()}, causal",
           *within_rule(got, exact, plain))

    Hq, Hkv, D = (4, 2, 8) if small else (32, 8, 128)
    print(f"\n## One decode step, float32, Hq={Hq}, Hkv={Hkv}, D={D}, device caches\n")
    n_bytes = (1 << 20) if small else (1 << 30)
    src = cuda.to_device(np.ones(n_bytes // 4, np.float32))
    dst = cuda.device_array_like(src)
    copy_s = median_time(lambda: dst.copy_to_device(src), cuda)
    copy_bw = 2 * n_bytes / copy_s
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)\n")
    torch = None
    if not small:
        try:
            import torch
            torch = torch if torch.cuda.is_available() else None
        except ImportError:
            torch = None
    print("| B | cache length | ms per step | GB/s of K+V | % of copy bandwidth | torch ms |")
    print("|---|---|---|---|---|---|")
    for B in (1,) if small else (1, 8):
        for n in (64,) if small else (4096, 32768, 131072):
            k_cache = cuda.device_array((B, Hkv, n, D), np.float32)
            v_cache = cuda.device_array((B, Hkv, n, D), np.float32)
            fill = cuda.to_device(rng.standard_normal((Hkv, n, D), dtype=np.float32))
            for b in range(B):
                k_cache[b].copy_to_device(fill)
                v_cache[b].copy_to_device(fill)
            q = cuda.to_device(rng.standard_normal((B, Hq, 1, D), dtype=np.float32))
            step = median_time(lambda: fastattn.attention_with_kvcache(
                q, k_cache, v_cache, cache_seqlens=n), cuda)
            read = 2 * B * Hkv * n * D * 4
            torch_ms = ""
            if torch is not None:
                tq, tk, tv = (torch.as_tensor(x, device="cuda") for x in (q, k_cache, v_cache))
                torch_ms = f"{1e3 * median_time(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True), cuda, torch.cuda.synchronize):.3f}"  # noqa: E501
            print(f"| {B} | {n} | {1e3 * step:.3f} | {read / step / 1e9:.0f} | "
                  f"{100 * read / step / copy_bw:.0f}% | {torch_ms} |", flush=True)
            del k_cache, v_cache, fill
    print(f"\n{len(failed)} checks failed" + (": " + ", ".join(failed) if failed else ""))
    return 1 if failed else 0


def median_time(fn, cuda, sync=None, reps=7):
    sync = sync or cuda.synchronize
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


if __name__ == "__main__":
    sys.exit(main())
