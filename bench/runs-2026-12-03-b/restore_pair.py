import os, time, statistics, ctypes
import fastattn, numpy as np
from fastattn import _blas
from fastattn.bench import impls
cases = impls.pipeline_cases("float32")
pair = [c for c in cases if c.get("kind") == "pair"]
mm, att0 = pair[0]["steps"]["matmul"], pair[0]["steps"]["attention"]
pools = _blas.openblas_pools()
np_path = [p for p, _, _ in pools if "64_" in p][0]
lib = ctypes.PyDLL(np_path); init = lib.blas_thread_init
flag = _blas._server_running[np_path]
from numba.np.ufunc import omppool
gomp = ctypes.CDLL(omppool.__file__); pause = gomp.omp_pause_resource_all; pause.argtypes = [ctypes.c_int]
MODE = os.environ.get("MODE", "A")
def att():
    was = flag.value
    r = att0()
    if was and MODE in "BC":
        if MODE == "B": pause(1)
        init()
    return r
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
    print(f"MODE={MODE}", " ".join(f"{k} {v:.3f}" for k,v in m.items()), f"ratio {m['pair']/(m['mm']+m['att']):.3f}", flush=True)
