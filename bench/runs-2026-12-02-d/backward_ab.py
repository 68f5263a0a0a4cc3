# Interleaved A/B, in one process and in a random order each round, of the backward before this session's change (old_host.py / old_bwd.py: fastattn/backward.py and kernels/cpu/backward.py of 9f80255 with absolute imports) against the new one and PyTorch's SDPA backward.
# python bwd_oldnew.py L full|causal ROUNDS
import sys, time, numpy as np
sys.path.insert(0, '/tmp/s')
import fastattn, old_host
L = int(sys.argv[1]); causal = sys.argv[2] == 'causal'; rounds = int(sys.argv[3])
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 8, L, 64), dtype=np.float32) for _ in range(3))
out, lse = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, return_lse=True)
g = rng.standard_normal(out.shape, dtype=np.float32)
import torch
tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v)); tg = torch.from_numpy(g)
def torch_bwd():
    o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    t = time.perf_counter(); o.backward(tg); return time.perf_counter() - t
calls = {'old': lambda: old_host.scaled_dot_product_attention_backward(g, q, k, v, out, lse, is_causal=causal),
         'new': lambda: fastattn.scaled_dot_product_attention_backward(g, q, k, v, out, lse, is_causal=causal)}
a, b = calls['old'](), calls['new']()
print('max diff old/new', max(float(np.abs(x - y).max()) for x, y in zip(a, b)))
torch_bwd()
ts = {n: [] for n in ['old', 'new', 'torch']}
perm = np.random.default_rng(1)
for r in range(rounds):
    for n in perm.permutation(list(ts)):
        if n == 'torch': ts[n].append(torch_bwd()); continue
        t = time.perf_counter(); calls[n](); ts[n].append(time.perf_counter() - t)
fl = 2.5 * 4 * L * L * 64 * 8 / (2 if causal else 1)
tt = np.median(ts['torch'])
for n, t in ts.items():
    m = np.median(t); print(f"L={L} {'causal' if causal else 'full':6s} {n:6s} {m*1e3:8.1f} ms {fl/m/1e9:6.1f} GFLOP/s  x torch {tt/m:.3f}")
