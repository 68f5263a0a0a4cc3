import os, sys, time, statistics
sys.path.insert(0, "/tmp/p")
import fastattn, numpy as np
from fastattn.bench import impls
cases = impls.pipeline_cases("float32")
pair = [c for c in cases if c.get("kind") == "pair"]
mm, att = pair[0]["steps"]["matmul"], pair[0]["steps"]["attention"]
att()
rng = np.random.default_rng(0)
h = rng.standard_normal((1024, 512), dtype=np.float32); w = rng.standard_normal((512, 512), dtype=np.float32)
ref = h @ w
MODE = os.environ.get("CB", "0")
if MODE == "1":
    import cbproto; cbproto.install()
    from fastattn import _blas
    _blas._openblas_pools = [p for p in _blas.openblas_pools() if "64_" not in p[0]]
    time.sleep(0.3)
assert np.array_equal(h @ w, ref)
for f in (mm, att): f(); f()
def med(xs): return statistics.median(xs)*1e3
for r in range(3):
    t={"mm":[], "att":[], "pair":[], "pmm":[], "patt":[]}
    for _ in range(30):
        a=time.perf_counter(); mm(); t["mm"].append(time.perf_counter()-a)
    for _ in range(30):
        a=time.perf_counter(); att(); t["att"].append(time.perf_counter()-a)
    for _ in range(30):
        a=time.perf_counter(); mm(); b=time.perf_counter(); att(); c=time.perf_counter(); t["pair"].append(c-a); t["pmm"].append(b-a); t["patt"].append(c-b)
    m={k:med(v) for k,v in t.items()}
    print(f"CB={MODE}", " ".join(f"{k} {v:.3f}" for k,v in m.items()), f"ratio {m['pair']/(m['mm']+m['att']):.3f}", flush=True)
