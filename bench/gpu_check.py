"""The cuda backend on a real GPU: correctness at real sizes, then speed against PyTorch.

    python bench/gpu_check.py              # an NVIDIA GPU, numba-cuda (and torch): < 10 minutes
    python bench/gpu_check.py --quick      # L=S in {1024, 4096} only, fewer semantic checks
    python bench/gpu_check.py --sim-smoke  # tiny sizes in Numba's CUDA simulator, no GPU needed
    python bench/gpu_check.py --tiles 64,32,4,8,64,64,4   # other float32 fused tiles (FusedTiles)
    python bench/gpu_check.py --mma-tiles 4,16,128,128,3  # other tensor-core tiles (MmaTiles)

1. Semantic checks at moderate sizes with the real tiles, against ``fastattn.reference`` in
   float64: masks (bool, float with -inf, broadcast, fully masked rows), causal with L != S, GQA,
   Ev != E, cosine, float64, float16, attention_weights, softmax, similarity, strided PyTorch
   tensors used in place, and the variants (bottom-right alignment, sliding windows on one and
   both sides, softcap on large logits, ALiBi) with masks and GQA, D = 64, 128 and 256 (the
   kernel that walks the features in panels). float32 may be at most twice as far from float64
   as NumPy's float32.
2. Speed: B=4, H=16, D in {64, 128}, L=S in {1024, 4096, 16384}, causal and not, float32, the
   cuda backend on PyTorch CUDA tensors against torch.nn.functional.scaled_dot_product_attention
   on the same tensors; GFLOP/s (4 * B * H * D * (query, key) pairs, causal pairs only) and the
   share of the GPU's FP32 FMA peak; then fastattn's tensor-core kernel (float16 and bfloat16
   inputs, kernels/cuda/fused_mma.py) against PyTorch's bfloat16 SDPA (flash). Each timed output
   is checked too: float32 on sampled rows of two heads against the float64 reference, and all of
   it against PyTorch; the 16-bit outputs against PyTorch's float32 result, at most twice as far
   from it as PyTorch's own bfloat16 result (FlashAttention's rule).

Prints Markdown for bench/RESULTS.md. Exit status: 0 all checks pass, 1 a check failed, 2 no GPU.
Stays under its time budget (--budget, default 600 s: the kernels compile on first use, a few
tens of seconds each) by skipping the largest remaining timings.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# FP32 cores per SM by compute capability (2 FLOPs per core per clock, as an FMA).
FP32_CORES_PER_SM = {(6, 0): 64, (6, 1): 128, (7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128,
                     (8, 7): 128, (8, 9): 128, (9, 0): 128, (10, 0): 128, (10, 3): 128,
                     (12, 0): 128}
DATASHEET_FP32_TFLOPS = [("H100 PCIe", 51.2), ("H100", 66.9), ("H200", 66.9), ("A100", 19.5)]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer checks")
    p.add_argument("--sim-smoke", action="store_true",
                   help="run end to end on tiny sizes in Numba's CUDA simulator")
    p.add_argument("--tiles", help="float32 fused-kernel tiles for E <= features: block_q,block_k,"
                                   "rows_per_thread,threads_per_row,features,block_v,min_blocks")
    p.add_argument("--mma-tiles", help="tensor-core kernel tiles for E <= features (MmaTiles): "
                                       "warps,block_k,features,block_v,min_blocks")
    p.add_argument("--budget", type=float, default=480.0, help="seconds before timings stop")
    p.add_argument("--peak-tflops", type=float, help="FP32 peak, if the table does not know it")
    return p.parse_args(argv)


class Checks:
    def __init__(self):
        self.failed = []
        self.lines = []

    def record(self, name, ok, detail, echo=True):
        self.lines.append(f"| {name} | {'ok' if ok else '**FAIL**'} | {detail} |")
        if not ok:
            self.failed.append(name)
        if echo:
            print(self.lines[-1], flush=True)

    def run(self, name, fn):
        try:
            fn(lambda ok, detail: self.record(name, ok, detail))
        except Exception as exc:  # a crash is a failed check; go on with the others
            traceback.print_exc()
            self.record(name, False, f"raised {type(exc).__name__}: {exc}"[:300])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sim_smoke:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # read when numba is first imported
        sys.setswitchinterval(2e-4)              # simulated threads wait for each other a lot
    sys.path.insert(0, ROOT)
    start = time.perf_counter()

    import fastattn
    from fastattn import _backends, _cuda, reference

    reason = _backends.cuda_unavailable_reason()
    if reason is not None:
        print(f"no usable GPU: {reason}")
        return 2
    from numba import cuda
    from fastattn.kernels import cuda as kernels

    if args.tiles:
        tiles = kernels.FusedTiles(*map(int, args.tiles.split(","))).check()
        _cuda.FUSED_TILES[np.dtype(np.float32)] = (
            tiles, *(t for t in _cuda.FUSED_TILES[np.dtype(np.float32)]
                     if t.features > tiles.features))
    if args.mma_tiles:
        tiles = kernels.MmaTiles(*map(int, args.mma_tiles.split(","))).check()
        _cuda.MMA_TILES = (tiles, *(t for t in _cuda.MMA_TILES if t.features > tiles.features))
    torch = None
    if not args.sim_smoke:
        try:
            import torch
            if not torch.cuda.is_available():
                torch = None
        except ImportError:
            torch = None

    device, peak = describe_device(cuda, args)
    print(f"# fastattn cuda backend on {device}\n")
    print(f"fastattn {fastattn.__version__}, numba-cuda {package_version('numba-cuda')}, torch "
          f"{torch.__version__ if torch else 'not used'}; float32 fused-kernel tiles "
          f"{_cuda.FUSED_TILES[np.dtype(np.float32)]}; tensor-core tiles {_cuda.MMA_TILES}; "
          f"FP32 peak "
          f"{f'{peak / 1e12:.1f} TFLOP/s' if peak else 'unknown'}\n")

    rng = np.random.default_rng(0)
    checks = Checks()
    print("## Checks against fastattn.reference (float64)\n")
    print("| check | result | detail |\n|---|---|---|")
    small = args.sim_smoke
    semantic_checks(checks, fastattn, reference, cuda, torch, rng, small, args.quick)

    print("\n## Speed, float32, against torch.nn.functional.scaled_dot_product_attention\n")
    if args.sim_smoke:
        B, H, Ds, Ls = 1, 2, (8, 16), (24,)
    else:
        B, H, Ds = 4, 16, (64, 128)
        Ls = (1024, 4096) if args.quick else (1024, 4096, 16384)
    print("| D | L=S | causal | fastattn ms | GFLOP/s | % FP32 peak | torch ms | torch GFLOP/s "
          "| fastattn / torch speed | torch bf16 ms | max err vs float64 (budget) "
          "| max diff vs torch | fastattn f16 TC ms | fastattn bf16 TC ms "
          "| bf16: fastattn / torch speed | 16-bit err vs torch f32 (budget) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    slowest_rate = None  # the lowest FLOP/s measured so far, to foresee the next config's time
    for L in Ls:
        for D in Ds:
            for causal in (False, True):
                flops = 4 * B * H * D * (L * (L + 1) // 2 if causal else L * L)
                # about 3 timed calls each of ours (float32, float16, bfloat16) and torch's
                # (float32, bfloat16), at our float32 kernel's slowest rate
                foreseen = 15 * flops / slowest_rate if slowest_rate else 0.0
                if time.perf_counter() - start + foreseen > args.budget:
                    print(f"| {D} | {L} | {causal} | skipped: would pass the {args.budget:.0f} s "
                          f"budget | | | | | | | | | | | | |")
                    continue
                rate = time_one(checks, fastattn, reference, cuda, torch, rng, B, H, L, D,
                                causal, flops, peak)
                if rate:
                    slowest_rate = rate if slowest_rate is None else min(slowest_rate, rate)
    elapsed = time.perf_counter() - start
    print(f"\n{len(checks.lines)} checks, {len(checks.failed)} failed; {elapsed:.0f} s in all.")
    if checks.failed:
        print("FAILED: " + ", ".join(checks.failed))
        return 1
    return 0


def package_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return "unknown"


def describe_device(cuda, args):
    """(description, FP32 FMA peak in FLOP/s or None): SMs x FP32 cores x 2 x boost clock, else
    the datasheet figure for a known name, else --peak-tflops."""
    dev = cuda.get_current_device()
    name = getattr(dev, "name", b"simulator")
    name = name.decode() if isinstance(name, bytes) else str(name)
    facts, peak = [], None
    try:
        cc = tuple(dev.compute_capability)
        sms = dev.MULTIPROCESSOR_COUNT
        facts += [f"compute capability {cc[0]}.{cc[1]}", f"{sms} SMs"]
        clock_hz = dev.CLOCK_RATE * 1e3  # kHz
        facts.append(f"{clock_hz / 1e9:.2f} GHz")
        if cc in FP32_CORES_PER_SM:
            peak = sms * FP32_CORES_PER_SM[cc] * 2 * clock_hz
    except Exception:
        pass
    if peak is None:
        for known, tflops in DATASHEET_FP32_TFLOPS:
            if known in name:
                peak = tflops * 1e12
                facts.append("peak from the datasheet")
                break
    if args.peak_tflops:
        peak = args.peak_tflops * 1e12
    return f"{name} ({', '.join(facts) or 'simulator'})", peak


def err32(got, exact, plain):
    """(ok, detail): float32 at most twice NumPy float32's error against float64, + 1e-6."""
    err = float(np.abs(np.asarray(got, np.float64) - exact).max()) if exact.size else 0.0
    budget = 2 * float(np.abs(np.asarray(plain, np.float64) - exact).max()) + 1e-6
    return err <= budget, f"max err {err:.2e} (budget {budget:.2e})"


def host(x):
    return x.copy_to_host() if hasattr(x, "copy_to_host") else x


def to_bf16_bits(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), as uint16 bit patterns."""
    b = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(h):
    return (np.asarray(h, np.uint16).astype(np.uint32) << 16).view(np.float32)


def round16(x, kind):
    x = np.asarray(x, np.float32)
    if kind == "float16":
        return x.astype(np.float16).astype(np.float32)
    return from_bf16_bits(to_bf16_bits(x))


def plain16(reference, q, k, v, kind, enable_gqa=False, **kw):
    """Attention in the tensor-core kernel's precision: float32 weights from the 16-bit values,
    rounded to 16 bits before they meet v; the output rounded to 16 bits."""
    w = reference.attention_weights(q, k, enable_gqa=enable_gqa, **kw).astype(np.float32)
    if enable_gqa:
        v = np.repeat(v, q.shape[-3] // v.shape[-3], axis=-3)
    return round16(round16(w, kind) @ v, kind)


def semantic_checks(checks, fastattn, reference, cuda, torch, rng, small, quick):
    f = fastattn
    r = reference

    def normal(*shape, dtype=np.float32):
        return rng.standard_normal(shape).astype(dtype)

    def dev(a):
        return cuda.to_device(np.ascontiguousarray(a))

    # A: float mask with -inf broadcast over batch and queries, causal, GQA, L != S, Ev != E
    B, Hq, Hkv, L, S, E, Ev = (1, 4, 2, 13, 17, 8, 12) if small else (2, 8, 2, 1000, 1030, 64, 80)

    def case_a(record):
        q, k, v = normal(B, Hq, L, E), normal(B, Hkv, S, E), normal(B, Hkv, S, Ev)
        mask = normal(Hq, 1, S)
        mask[rng.random(mask.shape) < 0.2] = -np.inf
        kw = dict(is_causal=True, enable_gqa=True)
        out, lse = f.scaled_dot_product_attention(dev(q), dev(k), dev(v), dev(mask),
                                                  return_lse=True, **kw)
        q64, k64, v64, m64 = (a.astype(np.float64) for a in (q, k, v, mask))
        exact, exact_lse = r.scaled_dot_product_attention(q64, k64, v64, m64, return_lse=True,
                                                          **kw)
        plain, plain_lse = r.scaled_dot_product_attention(q, k, v, mask, return_lse=True, **kw)
        ok1, d1 = err32(host(out), exact, plain)
        ok2, d2 = err32(host(lse), exact_lse, plain_lse)
        record(ok1 and ok2, f"out: {d1}; lse: {d2}")
    checks.run("sdpa float32: float mask (Hq,1,S) with -inf, causal, GQA 4:1, L!=S, Ev!=E",
               case_a)

    # B: bool mask with fully masked rows, D=128
    B2, H2, L2, S2, D2 = (1, 2, 9, 11, 16) if small else (2, 4, 777, 1030, 128)

    def case_b(record):
        q, k, v = normal(B2, H2, L2, D2), normal(B2, H2, S2, D2), normal(B2, H2, S2, D2)
        keep = rng.random((B2, 1, L2, S2)) > 0.5
        keep[0, 0, 3] = False
        keep[-1, 0, -1] = False
        out, lse = f.scaled_dot_product_attention(dev(q), dev(k), dev(v), dev(keep),
                                                  return_lse=True)
        out, lse = host(out), host(lse)
        exact, exact_lse = r.scaled_dot_product_attention(
            *(a.astype(np.float64) for a in (q, k, v)), keep, return_lse=True)
        plain = r.scaled_dot_product_attention(q, k, v, keep)
        ok, d = err32(out, exact, plain)
        zeros = bool(np.all(out[:, :, 3] == 0) and np.all(lse[:, :, 3] == -np.inf)
                     and np.all(out[:, :, -1] == 0))
        lse_ok = np.allclose(lse, exact_lse, rtol=1e-5, atol=1e-5)
        record(ok and zeros and lse_ok, f"{d}; masked rows zero, lse -inf: {zeros}; "
                                        f"lse ok: {lse_ok}")
    checks.run("sdpa float32: bool mask (B,1,L,S) with fully masked rows, D=128", case_b)

    variant_checks(checks, f, r, dev, normal, rng, small)

    if quick:
        return

    def case_float64(record):
        q, k, v = (normal(*((1, 2, 13, 8) if small else (2, 3, 300, 64)), dtype=np.float64)
                   for _ in range(3))
        k, v = k[:, :, :-3], v[:, :, :-3]
        out = host(f.scaled_dot_product_attention(dev(q), dev(k), dev(v), is_causal=True,
                                                  similarity="cosine", scale=5.0))
        exact = r.scaled_dot_product_attention(q, k, v, is_causal=True, similarity="cosine",
                                               scale=5.0)
        err = float(np.abs(out - exact).max())
        record(err <= 1e-10, f"max err {err:.2e} (budget 1e-10)")
    checks.run("sdpa float64: cosine, scale, causal, L!=S", case_float64)

    def case_16bit(record, kind, D, causal, gqa):
        Hq, Hkv = (4, 2) if gqa else (4, 4)
        L, S = (12, 19) if small else (1000, 1100)
        q32, k32, v32 = normal(1 if small else 2, Hq, L, D), normal(1 if small else 2, Hkv, S, D), \
            normal(1 if small else 2, Hkv, S, D)
        if kind == "float16":
            q, k, v = (a.astype(np.float16) for a in (q32, k32, v32))
            vals = [a.astype(np.float32) for a in (q, k, v)]
            out, lse = f.scaled_dot_product_attention(dev(q), dev(k), dev(v), is_causal=causal,
                                                      enable_gqa=gqa, return_lse=True)
            out = host(out).astype(np.float32)
        else:
            bits = [to_bf16_bits(a) for a in (q32, k32, v32)]
            vals = [from_bf16_bits(b) for b in bits]
            out, lse = fastattn._cuda.bfloat16_attention(
                *(dev(b.view(np.float16)) for b in bits), is_causal=causal, enable_gqa=gqa,
                return_lse=True)
            out = from_bf16_bits(host(out).view(np.uint16))
        lse = host(lse)
        kw = dict(is_causal=causal, enable_gqa=gqa)
        exact, exact_lse = r.scaled_dot_product_attention(
            *(a.astype(np.float64) for a in vals), return_lse=True, **kw)
        plain = plain16(r, *vals, kind, **kw)
        err = float(np.abs(out - exact).max())
        budget = 2 * float(np.abs(plain - exact).max()) + 1e-6
        lse_err = float(np.abs(lse - exact_lse).max())
        ok = err <= budget and lse.dtype == np.float32 and lse_err <= 1e-4
        record(ok, f"max err {err:.2e} (budget {budget:.2e}: twice the plain {kind} "
                   f"computation's); lse err {lse_err:.1e}")
    for kind, D, causal, gqa in (("float16", 64, False, False), ("float16", 128, True, True),
                                 ("bfloat16", 64, True, False), ("bfloat16", 128, False, True)):
        D = min(D, 16) if small else D
        checks.run(f"sdpa {kind} on tensor cores: D={D}, causal={causal}, GQA={gqa}, L!=S",
                   lambda record, a=(kind, D, causal, gqa): case_16bit(record, *a))

    def case_weights(record):
        q, k = ((normal(1, 4, 13, 8), normal(1, 4, 17, 8)) if small else
                (normal(2, 4, 512, 64), normal(2, 4, 700, 64)))
        keep = rng.random((4, 1, k.shape[2])) > 0.3
        w = host(f.attention_weights(dev(q), dev(k), dev(keep), is_causal=True))
        exact = r.attention_weights(q.astype(np.float64), k.astype(np.float64), keep, True)
        record(*err32(w, exact, r.attention_weights(q, k, keep, True)))
    checks.run("attention_weights float32: bool mask, causal, L!=S", case_weights)

    def case_softmax(record):
        x = normal(*((3, 20, 7) if small else (8, 1000, 333)))
        keep = rng.random((1, x.shape[1], 1)) > 0.2
        got = host(f.softmax(dev(x), axis=1, mask=dev(keep)))
        exact = r.softmax(x.astype(np.float64), 1, mask=keep)
        record(*err32(got, exact, r.softmax(x, 1, mask=keep)))
    checks.run("softmax float32: axis 1 of 3, broadcast bool mask", case_softmax)

    def case_similarity(record):
        a, b = ((normal(2, 10, 8), normal(1, 13, 8)) if small else
                (normal(4, 700, 64), normal(1, 900, 64)))
        got = host(f.similarity(dev(a), dev(b), "cosine"))
        bb = np.broadcast_to(b, (a.shape[0], *b.shape[1:]))
        exact = r.similarity(a.astype(np.float64), bb.astype(np.float64), "cosine")
        record(*err32(got, exact, r.similarity(a, bb, "cosine")))
    checks.run("similarity float32: cosine, broadcast leading dims", case_similarity)

    if torch is not None:
        def case_torch_strided(record):
            # (B, L, H, D) as a projection gives it, viewed as (B, H, L, D): strided, no copy
            q, k, v = (torch.randn(2, 1000, 8, 64, device="cuda").transpose(1, 2)
                       for _ in range(3))
            out = f.scaled_dot_product_attention(q, k, v, is_causal=True)
            ok_type = hasattr(out, "__cuda_array_interface__")
            got = torch.as_tensor(out, device="cuda")
            want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            diff = float((got - want).abs().max())
            record(ok_type and diff < 1e-4, f"device output: {ok_type}; max diff vs torch "
                                            f"{diff:.2e} (budget 1e-4)")
        checks.run("sdpa on strided PyTorch CUDA tensors, in place", case_torch_strided)


def variant_checks(checks, f, r, dev, normal, rng, small):
    """The variants at real sizes (float32), out and lse against the float64 reference."""
    B, Hq, Hkv = (1, 4, 2) if small else (1, 8, 2)
    sizes = [(13, 21, 8), (21, 13, 8)] if small else [(1000, 1500, 64), (1100, 700, 128),
                                                      (300, 400, 256)]
    slopes_hq = np.geomspace(0.5, 0.01, Hq)
    cases = [
        ("bottom-right causal", dict(is_causal=True, alignment="bottom_right")),
        ("window (W, 0) causal", dict(is_causal=True, window=(5 if small else 255, 0))),
        ("window (W, W') bottom-right", dict(window=(3 if small else 100, 2 if small else 40),
                                             alignment="bottom_right")),
        ("window (None, W)", dict(window=(None, 4 if small else 129))),
        ("softcap 30, q x 10, causal", dict(softcap=30.0, is_causal=True, q_times=10.0)),
        ("ALiBi (Hq,) causal bottom-right", dict(alibi_slopes=slopes_hq, is_causal=True,
                                                 alignment="bottom_right")),
        ("ALiBi (B, Hq) + softcap 50 + window", dict(
            alibi_slopes=rng.uniform(0.01, 0.5, (B, Hq)), softcap=50.0, window=(7, 7))),
    ]
    for L, S, D in sizes:
        for label, kw in cases:
            kw = dict(kw)
            q_times = kw.pop("q_times", 1.0)

            def case(record, L=L, S=S, D=D, kw=kw, q_times=q_times):
                q = normal(B, Hq, L, D) * np.float32(q_times)
                k, v = normal(B, Hkv, S, D), normal(B, Hkv, S, D)
                mask = normal(Hq, 1, S)
                mask[rng.random(mask.shape) < 0.1] = -np.inf
                out, lse = f.scaled_dot_product_attention(dev(q), dev(k), dev(v), dev(mask),
                                                          enable_gqa=True, return_lse=True, **kw)
                q64, k64, v64, m64 = (a.astype(np.float64) for a in (q, k, v, mask))
                exact, exact_lse = r.scaled_dot_product_attention(
                    q64, k64, v64, m64, enable_gqa=True, return_lse=True, **kw)
                plain, plain_lse = r.scaled_dot_product_attention(
                    q, k, v, mask, enable_gqa=True, return_lse=True, **kw)
                out, lse = host(out), host(lse)
                finite = np.isfinite(exact_lse)
                same_inf = bool(np.array_equal(np.isfinite(lse), finite))
                ok1, d1 = err32(out, exact, plain)
                ok2, d2 = err32(lse[finite], exact_lse[finite], plain_lse[finite])
                record(ok1 and ok2 and same_inf, f"out: {d1}; lse: {d2}; empty rows match: "
                                                 f"{same_inf}")
            checks.run(f"sdpa float32 L={L} S={S} D={D}: {label}, float mask, GQA", case)

    def case_weights(record):
        L, S, D = (9, 14, 8) if small else (500, 800, 64)
        q, k = normal(1, 4, L, D) * np.float32(10), normal(1, 4, S, D)
        kw = dict(window=(20, 3), alignment="bottom_right", softcap=30.0,
                  alibi_slopes=slopes_hq if Hq == 4 else np.geomspace(0.5, 0.01, 4))
        w = host(f.attention_weights(dev(q), dev(k), **kw))
        exact = r.attention_weights(q.astype(np.float64), k.astype(np.float64), **kw)
        record(*err32(w, exact, r.attention_weights(q, k, **kw)))
    checks.run("attention_weights float32: window, bottom-right, softcap, ALiBi", case_weights)


def time_one(checks, fastattn, reference, cuda, torch, rng, B, H, L, D, causal, flops, peak):
    """Time and check one configuration; return our FLOP/s (None if it failed)."""
    name = f"sdpa float32 B={B} H={H} L=S={L} D={D} causal={causal}"
    try:
        if torch is not None:
            q, k, v = (torch.randn(B, H, L, D, device="cuda") for _ in range(3))
        else:
            q, k, v = (cuda.to_device(rng.standard_normal((B, H, L, D)).astype(np.float32))
                       for _ in range(3))

        def ours():
            return fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                         return_lse=True)
        out, lse = ours()  # compiles on the first call
        t_ours = median_time(ours, cuda)
        row = [str(D), str(L), str(causal), f"{t_ours * 1e3:.2f}", f"{flops / t_ours / 1e9:.0f}",
               f"{100 * flops / t_ours / peak:.1f}" if peak else "n/a"]
        diff_torch = "n/a"
        if torch is not None:
            def theirs():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                                        is_causal=causal)
            want = theirs()
            t_torch = median_time(theirs, cuda)
            qb, kb, vb = (x.to(torch.bfloat16) for x in (q, k, v))
            t_bf16 = median_time(lambda: torch.nn.functional.scaled_dot_product_attention(
                qb, kb, vb, is_causal=causal), cuda)
            torch_bf16_err = float((torch.nn.functional.scaled_dot_product_attention(
                qb, kb, vb, is_causal=causal).float() - want).abs().max())
            diff_torch = f"{float((torch.as_tensor(out, device='cuda') - want).abs().max()):.1e}"
            row += [f"{t_torch * 1e3:.2f}", f"{flops / t_torch / 1e9:.0f}",
                    f"{t_torch / t_ours:.2f}x", f"{t_bf16 * 1e3:.2f}"]
        else:
            row += ["n/a", "n/a", "n/a", "n/a"]
        ok, detail = check_rows(reference, q, k, v, out, lse, causal, torch, rng)
        row += [("" if ok else "**FAIL** ") + detail, diff_torch]
        # the tensor-core kernel: float16, and bfloat16 through its float16 view
        if torch is not None:
            qh, kh, vh = (x.half() for x in (q, k, v))
            bf = [x.view(torch.float16) for x in (qb, kb, vb)]
        else:
            qh, kh, vh = (cuda.to_device(x.copy_to_host().astype(np.float16)) for x in (q, k, v))
            bf = [cuda.to_device(to_bf16_bits(x.copy_to_host()).view(np.float16))
                  for x in (q, k, v)]

        def ours16():
            return fastattn.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)

        def ours_bf16():
            return fastattn._cuda.bfloat16_attention(*bf, is_causal=causal)
        out16, outbf = ours16(), ours_bf16()  # (compile)
        t16, tbf = median_time(ours16, cuda), median_time(ours_bf16, cuda)
        row += [f"{t16 * 1e3:.2f}", f"{tbf * 1e3:.2f}"]
        if torch is not None:
            e16 = float((torch.as_tensor(out16, device="cuda").float() - want).abs().max())
            ebf = float((torch.as_tensor(outbf, device="cuda").view(torch.bfloat16).float()
                         - want).abs().max())
            budget = 2 * torch_bf16_err + 1e-6
            ok16 = e16 <= budget and ebf <= budget
            row += [f"{t_bf16 / tbf:.2f}x", ("" if ok16 else "**FAIL** ")
                    + f"f16 {e16:.1e}, bf16 {ebf:.1e} ({budget:.1e})"]
            ok &= ok16
            detail += f"; 16-bit: f16 {e16:.1e}, bf16 {ebf:.1e} (budget {budget:.1e})"
            del qb, kb, vb, bf
        else:
            row += ["n/a", "n/a"]
        print("| " + " | ".join(row) + " |", flush=True)
        checks.record(name, ok, detail, echo=False)
        return flops / t_ours
    except Exception as exc:
        traceback.print_exc()
        checks.record(name, False, f"raised {type(exc).__name__}: {exc}"[:300])
        return None


def median_time(fn, cuda, budget_s=1.5, max_reps=7):
    def once():
        cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        cuda.synchronize()
        return time.perf_counter() - t0
    once()  # warm-up
    first = once()
    reps = max(1, min(max_reps, int(budget_s / max(first, 1e-6))))
    return float(np.median([first] + [once() for _ in range(reps - 1)]))


def check_rows(reference, q, k, v, out, lse, causal, torch, rng):
    """Sampled query rows of the first and last head against the float64 reference."""
    def to_host(x):
        if torch is not None and isinstance(x, torch.Tensor):
            return x.cpu().numpy()
        return x.copy_to_host()
    B, H, L, D = q.shape
    rows = np.unique(np.concatenate([[0, L - 1], rng.choice(L, size=min(L, 62), replace=False)]))
    worst_ok, details = True, []
    for b, h in ((0, 0), (B - 1, H - 1)):
        qh, kh, vh = (to_host(x[b, h]) for x in (q, k, v))
        got, got_lse = to_host(out[b, h])[rows], to_host(lse[b, h])[rows]
        keep = np.arange(kh.shape[0])[None, :] <= rows[:, None] if causal else None
        q_rows = qh[rows]
        exact, exact_lse = reference.scaled_dot_product_attention(
            q_rows.astype(np.float64), kh.astype(np.float64), vh.astype(np.float64), keep,
            return_lse=True)
        plain, plain_lse = reference.scaled_dot_product_attention(q_rows, kh, vh, keep,
                                                                  return_lse=True)
        ok1, d1 = err32(got, exact, plain)
        ok2, _ = err32(got_lse, exact_lse, plain_lse)
        worst_ok &= ok1 and ok2
        details.append(d1.replace("max err ", ""))
    return worst_ok, "; ".join(details)


if __name__ == "__main__":
    sys.exit(main())
