# The NumPy pair with PyTorch imported before fastattn, after it, or not at all: python pair_order.py torchfirst|fastattnfirst|none
import time, os, sys
if sys.argv[1] == 'torchfirst': import torch
import numpy as np, fastattn
if sys.argv[1] == 'fastattnfirst': import torch
rng = np.random.default_rng(0)
h = rng.standard_normal((1024, 512), dtype=np.float32); W = rng.standard_normal((512, 512), dtype=np.float32)
q, k, v = (rng.standard_normal((1, 8, 1024, 64), dtype=np.float32) for _ in range(3))
att = lambda: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
mm = lambda: h @ W
for _ in range(5): mm(); att()
def alone(f):
    ts = []
    for _ in range(30):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return np.median(ts) * 1e3
a_mm, a_att = alone(mm), alone(att)
t_mm, t_att = [], []
for _ in range(30):
    t0 = time.perf_counter(); mm(); t1 = time.perf_counter(); att(); t2 = time.perf_counter()
    t_mm.append(t1 - t0); t_att.append(t2 - t1)
print(f"{sys.argv[1]:14s} alone: mm {a_mm:.2f} att {a_att:.2f}; pair: mm {np.median(t_mm)*1e3:.2f} att {np.median(t_att)*1e3:.2f} -> {(np.median(np.add(t_mm,t_att)))*1e3/(a_mm+a_att):.2f}x")
