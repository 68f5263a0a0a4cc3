"""The decode and varlen cases of ``python -m fastattn bench`` (``--decode``, ``--varlen``).

Decode: one query row per batch row (B=1 and B=8, Hq=32, Hkv=8, D=128 by default) against a KV
cache of S keys, ``fastattn.attention_with_kvcache`` against PyTorch's SDPA on the same cache
slice (``enable_gqa=True``, tensors sharing the arrays' memory). The step is bound by memory
bandwidth: the figure is the GB/s of K and V read, against this machine's read bandwidth
measured in the same run (a read-only pass over 512 MiB, at the start and the end: the best).

Varlen: 16 sequences of random lengths 64..2048 packed, ``fastattn.varlen_attention`` against
the same batch padded to the longest through ``scaled_dot_product_attention`` (fastattn's and
PyTorch's) with a key padding mask.
"""
from __future__ import annotations

import math

import numpy as np

from . import measure

DECODE_LENGTHS = (4096, 32768, 131072)
DECODE_HEADS, DECODE_KV_HEADS, DECODE_DIM = 32, 8, 128
DECODE_BATCHES = (1, 8)
READ_MIB = 512  # the read-bandwidth pass: far larger than any cache
VARLEN_SEQUENCES = 16
VARLEN_RANGE = (64, 2048)


def _filled(shape, dtype, rng):
    # Random rows, tiled: filling GiBs with fresh random numbers would take minutes, and the
    # values do not change the time.
    out = np.empty(shape, dtype)
    block = rng.standard_normal((min(shape[-2], 1024), shape[-1])).astype(dtype)
    flat = out.reshape(-1, shape[-2], shape[-1])
    for i in range(flat.shape[0]):
        for s in range(0, shape[-2], block.shape[0]):
            n = min(block.shape[0], shape[-2] - s)
            flat[i, s:s + n] = block[:n]
    return out


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def decode_cases(args, on_call=None) -> dict:
    import fastattn
    torch = _torch()
    heads, kv_heads, dim = DECODE_HEADS, DECODE_KV_HEADS, DECODE_DIM
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    start_bw = measure.read_bandwidth(READ_MIB)
    cases = []
    for B in args.decode_batches:
        for S in args.decode_lengths:
            kv_bytes = 2 * B * kv_heads * S * dim * dtype.itemsize
            case = {"batch": B, "length": S, "kv_mib": kv_bytes / measure.MiB}
            if kv_bytes > 0.6 * _available_bytes():
                case["skipped"] = (f"K and V need {kv_bytes / 2**30:.1f} GiB, more than this "
                                   f"machine has free")
                cases.append(case)
                continue
            q = rng.standard_normal((B, heads, 1, dim)).astype(dtype)
            k_cache = _filled((B, kv_heads, S, dim), dtype, rng)
            v_cache = _filled((B, kv_heads, S, dim), dtype, rng)
            calls = {"numba": lambda: fastattn.attention_with_kvcache(
                q, k_cache, v_cache, cache_seqlens=S, backend="numba")}
            if torch is not None:
                tq, tk, tv = (torch.from_numpy(a) for a in (q, k_cache, v_cache))
                sdpa = torch.nn.functional.scaled_dot_product_attention
                calls["torch"] = lambda: sdpa(tq, tk, tv, enable_gqa=True)
            timing = measure.time_interleaved(calls, args.min_runs, args.min_time,
                                              max_runs=max(args.min_runs, 200),
                                              max_time=args.max_time, on_call=on_call)
            for name, t in timing.items():
                if "median_s" in t:
                    case[name] = {"ms": t["median_s"] * 1e3, "runs": t["runs"],
                                  "gbs": kv_bytes / t["median_s"] / 1e9}
            cases.append(case)
            del q, k_cache, v_cache, calls
    end_bw = measure.read_bandwidth(READ_MIB)
    bw = max(start_bw["gbs"], end_bw["gbs"])
    for case in cases:
        if "numba" in case:
            case["numba"]["share"] = case["numba"]["gbs"] / bw
            if "torch" in case:
                case["numba"]["x_torch"] = case["torch"]["ms"] / case["numba"]["ms"]
    return {"heads": heads, "kv_heads": kv_heads, "dim": dim, "dtype": str(dtype),
            "read_gbs": bw, "read_gbs_start": start_bw["gbs"], "read_gbs_end": end_bw["gbs"],
            "cases": cases}


def varlen_lengths(seed=0):
    low, high = VARLEN_RANGE
    return np.random.default_rng(seed).integers(low, high + 1, VARLEN_SEQUENCES)


def varlen_cases(args, on_call=None) -> dict:
    import fastattn
    torch = _torch()
    heads, kv_heads, dim = args.heads, args.kv_heads or args.heads, args.dim
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(1)
    lengths = varlen_lengths()
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total, longest, B = int(cu[-1]), int(lengths.max()), len(lengths)
    q = rng.standard_normal((total, heads, dim)).astype(dtype)
    k = rng.standard_normal((total, kv_heads, dim)).astype(dtype)
    v = rng.standard_normal((total, kv_heads, dim)).astype(dtype)
    padded = [np.zeros((B, h, longest, dim), dtype) for h in (heads, kv_heads, kv_heads)]
    for b in range(B):
        for x, p in zip((q, k, v), padded):
            p[b, :, :lengths[b]] = np.swapaxes(x[cu[b]:cu[b + 1]], 0, 1)
    keep = (np.arange(longest)[None, :] < lengths[:, None])[:, None, None, :]  # (B,1,1,S)
    gqa = heads != kv_heads
    causal_modes = [True] if args.causal else [False] if args.no_causal else [False, True]
    cases = []
    for causal in causal_modes:
        calls = {
            "numba varlen": lambda: fastattn.varlen_attention(q, k, v, cu, cu, is_causal=causal,
                                                              backend="numba"),
            # Padded, causal is top-left within each sequence: the padding sits after it.
            "numba padded": lambda: fastattn.scaled_dot_product_attention(
                *padded, attn_mask=keep, is_causal=causal, enable_gqa=gqa, backend="numba"),
        }
        if torch is not None:
            tp = [torch.from_numpy(p) for p in padded]
            tkeep = torch.from_numpy(keep)
            sdpa = torch.nn.functional.scaled_dot_product_attention
            if causal:  # PyTorch takes a mask or is_causal, not both: the two in one bool mask
                tri = torch.ones(longest, longest, dtype=torch.bool).tril()
                tmask = tkeep & tri
                calls["torch padded"] = lambda: sdpa(*tp, attn_mask=tmask, enable_gqa=gqa)
            else:
                calls["torch padded"] = lambda: sdpa(*tp, attn_mask=tkeep, enable_gqa=gqa)
        timing = measure.time_interleaved(calls, args.min_runs, args.min_time,
                                          max_runs=max(args.min_runs, 200),
                                          max_time=args.max_time, on_call=on_call)
        case = {"causal": causal}
        for name, t in timing.items():
            if "median_s" in t:
                case[name] = {"ms": t["median_s"] * 1e3, "runs": t["runs"]}
        if "numba varlen" in case:
            for other in ("numba padded", "torch padded"):
                if other in case:
                    case["numba varlen"][f"x {other}"] = case[other]["ms"] / \
                        case["numba varlen"]["ms"]
        cases.append(case)
    work = float(np.sum(lengths.astype(np.float64) ** 2))
    return {"heads": heads, "kv_heads": kv_heads, "dim": dim, "dtype": str(dtype),
            "lengths": lengths.tolist(), "longest": longest,
            "padded_work_ratio": B * longest ** 2 / work, "cases": cases}


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def render(results: dict) -> str:
    lines = []
    d = results.get("decode")
    if d:
        lines += [f"decode: one query row, Hq={d['heads']}, Hkv={d['kv_heads']}, D={d['dim']}, "
                  f"{d['dtype']}; read bandwidth {d['read_gbs']:.1f} GB/s (start "
                  f"{d['read_gbs_start']:.1f}, end {d['read_gbs_end']:.1f})",
                  f"{'B':>3} {'cache':>7} {'K+V MiB':>8} {'fastattn ms':>12} {'GB/s':>6} "
                  f"{'of read bw':>10} {'torch ms':>9} {'GB/s':>6} {'x torch':>8}"]
        for c in d["cases"]:
            head = f"{c['batch']:>3} {c['length']:>7} {c['kv_mib']:>8.0f}"
            if "skipped" in c:
                lines.append(f"{head}  skipped: {c['skipped']}")
                continue
            n, t = c.get("numba", {}), c.get("torch", {})
            lines.append(
                f"{head} {n.get('ms', math.nan):>12.2f} {n.get('gbs', math.nan):>6.1f} "
                f"{100 * n.get('share', math.nan):>9.0f}% {t.get('ms', math.nan):>9.2f} "
                f"{t.get('gbs', math.nan):>6.1f} {n.get('x_torch', math.nan):>7.2f}x")
    v = results.get("varlen")
    if v:
        if lines:
            lines.append("")
        lines += [f"varlen: {len(v['lengths'])} sequences of lengths {min(v['lengths'])}.."
                  f"{max(v['lengths'])} packed, H={v['heads']}, Hkv={v['kv_heads']}, "
                  f"D={v['dim']}, {v['dtype']}; padding to {v['longest']} costs "
                  f"{v['padded_work_ratio']:.2f}x the work",
                  f"{'causal':>6} {'varlen ms':>10} {'numba padded ms':>16} {'x':>6} "
                  f"{'torch padded ms':>16} {'x':>6}"]
        for c in v["cases"]:
            n = c.get("numba varlen", {})
            p, t = c.get("numba padded", {}), c.get("torch padded", {})
            lines.append(
                f"{str(c['causal']):>6} {n.get('ms', math.nan):>10.1f} "
                f"{p.get('ms', math.nan):>16.1f} {n.get('x numba padded', math.nan):>5.2f}x "
                f"{t.get('ms', math.nan):>16.1f} {n.get('x torch padded', math.nan):>5.2f}x")
    return "\n".join(lines)


def run(args) -> dict:
    results = {}
    _torch()  # imported before the threads are set, so that they apply to it
    with measure.threads_limited(args.threads):
        if args.decode:
            results["decode"] = decode_cases(args)
        if args.varlen:
            results["varlen"] = varlen_cases(args)
    return results
