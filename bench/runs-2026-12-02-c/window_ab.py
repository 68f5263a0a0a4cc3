import time, sys, numpy as np, fastattn
from fastattn.bench.impls import flex_sliding_window, flex_causal
rng = np.random.default_rng(0)
def arr(*s): return rng.standard_normal(s, dtype=np.float32)
q, k, v = arr(1, 8, 8192, 64), arr(1, 8, 8192, 64), arr(1, 8, 8192, 64)
calls = {}
for bs in [(128, 128), (256, 128), (128, 256), (64, 128)]:
    bm = fastattn.create_block_mask(flex_sliding_window, None, None, 8192, 8192, block_size=bs)
    calls[f"flex window {bs}"] = (lambda bm: lambda: fastattn.flex_attention(q, k, v, block_mask=bm))(bm)
calls["builtin window"] = lambda: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, window=(1023, 0))
for f in calls.values(): f(); f()
ts = {n: [] for n in calls}
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 21):
    for n, f in calls.items():
        t = time.perf_counter(); f(); ts[n].append(time.perf_counter() - t)
b = np.median(ts["builtin window"])
for n, t in ts.items():
    m = np.median(t); print(f"{n:24s} {m*1e3:7.1f} ms  x builtin {m/b:.3f}")
