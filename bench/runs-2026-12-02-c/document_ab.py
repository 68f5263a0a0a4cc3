import time, numpy as np, fastattn
rng = np.random.default_rng(0)
def arr(*s): return rng.standard_normal(s, dtype=np.float32)
q, k, v = arr(1, 8, 8192, 64), arr(1, 8, 8192, 64), arr(1, 8, 8192, 64)
q8, k8, v8 = (x.reshape(8, 8, 1024, 64).copy() for x in (q, k, v))
doc = np.arange(8192) * 8 // 8192
def same_doc(b, h, qi, ki, doc): return doc[qi] == doc[ki]
calls = {}
for bs in [(128, 128), (128, 512), (256, 128), (256, 512)]:
    bm = fastattn.create_block_mask(same_doc, None, None, 8192, 8192, args=(doc,), block_size=bs)
    calls[f"flex doc {bs}"] = (lambda bm: lambda: fastattn.flex_attention(q, k, v, block_mask=bm, args=(doc,)))(bm)
calls["flex B8 L1024 nomask"] = lambda: fastattn.flex_attention(q8, k8, v8)
calls["sdpa B8 L1024"] = lambda: fastattn.scaled_dot_product_attention(q8, k8, v8)
for f in calls.values(): f(); f()
ts = {n: [] for n in calls}
for r in range(21):
    for n, f in calls.items():
        t = time.perf_counter(); f(); ts[n].append(time.perf_counter() - t)
fl = 4 * 8 * 8 * 1024 * 1024 * 64
for n, t in ts.items():
    m = np.median(t); print(f"{n:24s} {m*1e3:7.1f} ms {fl/m/1e9:6.1f} GFLOP/s")
