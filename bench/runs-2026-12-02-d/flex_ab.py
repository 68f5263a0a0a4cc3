# Interleaved A/B of the flex kernel (kernels/cpu/flex.py) against variants of it and the
# built-in path, in one process. Variants: copies of kernels/cpu/flex.py as /tmp/s/NAME.py with
# absolute imports. python flex_ab.py ROUNDS causal|window|softcap L [NAME ...]
# interleaved A/B of flex kernel variants: python flex_ab.py ROUNDS CASE variant1 variant2 ...
import sys, time, importlib, numpy as np
sys.path.insert(0, '/tmp/s')
import fastattn
from fastattn.kernels.cpu import flex as F
from fastattn.bench import impls
rounds, case = int(sys.argv[1]), sys.argv[2]
L = int(sys.argv[3]); names = sys.argv[4:]
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 8, L, 64), dtype=np.float32) for _ in range(3))
mods = {'orig': F.attention_kernel}
for n in names: mods[n] = importlib.import_module(n).attention_kernel
if case == 'causal':
    bm = fastattn.create_block_mask(impls.flex_causal, None, None, L, L)
    builtin = lambda: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    flex = lambda: fastattn.flex_attention(q, k, v, block_mask=bm)
elif case == 'window':
    bm = fastattn.create_block_mask(impls.flex_sliding_window, None, None, L, L)
    builtin = lambda: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, window=(1023, 0))
    flex = lambda: fastattn.flex_attention(q, k, v, block_mask=bm)
elif case == 'softcap':
    bm = fastattn.create_block_mask(impls.flex_causal, None, None, L, L)
    builtin = lambda: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, softcap=impls.FLEX_SOFTCAP)
    flex = lambda: fastattn.flex_attention(q, k, v, impls.flex_softcap, block_mask=bm, args=(impls.FLEX_SOFTCAP,))
ref = builtin()
calls = {'builtin': builtin}
for n, ak in mods.items():
    def call(ak=ak):
        F.attention_kernel = ak
        return flex()
    calls[n] = call
for n, c in calls.items():
    c(); o = c()
    print(n, 'max diff vs builtin', float(np.abs(o - ref).max()), flush=True)
ts = {n: [] for n in calls}
for r in range(rounds):
    for n, c in calls.items():
        t = time.perf_counter(); c(); ts[n].append(time.perf_counter() - t)
b = np.median(ts['builtin'])
for n, t in ts.items():
    m = np.median(t); print(f"{n:12s} {m*1e3:8.1f} ms  x builtin {m/b:.3f}")
