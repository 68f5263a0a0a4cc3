import os, time, statistics
import fastattn, numpy as np
from fastattn import _blas
from fastattn.bench import impls
if os.environ.get("MODE", "B") == "A":
    _blas.HAND_BACK_MIN_SECONDS = 1e9   # never: as before the change
cases = impls.pipeline_cases("float32")
pair = [c for c in cases if c.get("kind") == "pair"]
mm, att = pair[0]["steps"]["matmul"], pair[0]["steps"]["attention"]
rng = np.random.default_rng(0)
q = rng.standard_normal((1, 32, 1, 128), dtype=np.float32); kc = rng.standard_normal((1, 8, 2048, 128), dtype=np.float32)
dec = lambda: fastattn.scaled_dot_product_attention(q, kc, kc, enable_gqa=True)
for f in (mm, att, dec): f(); f()
def med(xs): return statistics.median(xs)*1e3
out = []
for r in range(3):
    t={"mm":[], "att":[], "pair":[], "pmm":[], "patt":[], "att4":[], "dec4":[], "decpair":[]}
    for _ in range(30):
        a=time.perf_counter(); mm(); t["mm"].append(time.perf_counter()-a)
    for _ in range(30):
        a=time.perf_counter(); att(); t["att"].append(time.perf_counter()-a)
    for _ in range(30):
        a=time.perf_counter(); mm(); b=time.perf_counter(); att(); c=time.perf_counter(); t["pair"].append(c-a); t["pmm"].append(b-a); t["patt"].append(c-b)
    for _ in range(10):
        mm(); a=time.perf_counter(); att(); att(); att(); att(); t["att4"].append((time.perf_counter()-a)/4)
    for _ in range(10):
        mm(); a=time.perf_counter(); dec(); dec(); dec(); dec(); t["dec4"].append((time.perf_counter()-a)/4)
    for _ in range(30):
        a=time.perf_counter(); mm(); dec(); t["decpair"].append(time.perf_counter()-a)
    m={k:med(v) for k,v in t.items()}
    print(f"MODE={os.environ.get('MODE','B')}", " ".join(f"{k} {v:.3f}" for k,v in m.items()), f"ratio {m['pair']/(m['mm']+m['att']):.3f} handed back {_blas._aside['times']}", flush=True)
