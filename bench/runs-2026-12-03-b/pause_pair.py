import os, time, statistics, ctypes, sys
import fastattn, numpy as np
from fastattn.bench import impls
cases = impls.pipeline_cases("float32")
pair = [c for c in cases if c.get("kind") == "pair"]
mm, att0 = pair[0]["steps"]["matmul"], pair[0]["steps"]["attention"]
from numba.np.ufunc import omppool
lib = ctypes.CDLL(omppool.__file__)
pause = lib.omp_pause_resource_all; pause.argtypes=[ctypes.c_int]; pause.restype=ctypes.c_int
MODE = os.environ.get("PAUSE", "0")
if MODE == "1":
    def att():
        r = att0(); pause(1); return r
else:
    att = att0
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
    print(f"PAUSE={MODE}", " ".join(f"{k} {v:.3f}" for k,v in m.items()), f"ratio {m['pair']/(m['mm']+m['att']):.3f}", flush=True)
