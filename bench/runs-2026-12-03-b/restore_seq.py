import os, time, statistics, ctypes
import fastattn, numpy as np
from fastattn import _blas
from fastattn.bench import impls
import fastattn.kvcache
cases = impls.pipeline_cases("float32")
pair = [c for c in cases if c.get("kind") == "pair"]
mm, att0 = pair[0]["steps"]["matmul"], pair[0]["steps"]["attention"]
rng = np.random.default_rng(0)
q = rng.standard_normal((1, 32, 1, 128), dtype=np.float32); kc = rng.standard_normal((1, 8, 2048, 128), dtype=np.float32)
small0 = lambda: fastattn.scaled_dot_product_attention(q, kc, kc, enable_gqa=True)
pools = _blas.openblas_pools()
np_path = [p for p, _, _ in pools if "64_" in p][0]
lib = ctypes.PyDLL(np_path); init = lib.blas_thread_init
flag = _blas._server_running[np_path]
from numba.np.ufunc import omppool
gomp = ctypes.CDLL(omppool.__file__); pause = gomp.omp_pause_resource_all; pause.argtypes = [ctypes.c_int]
MODE = os.environ.get("MODE", "A")
def wrap(f0):
    def f():
        was = flag.value
        r = f0()
        if was and MODE == "B":
            pause(1); init()
        return r
    return f
att, small = wrap(att0), wrap(small0)
for f in (mm, att, small): f(); f()
res = {}
for name, f in (("att", att), ("decode", small)):
    ts = [[] for _ in range(4)]
    for r in range(40):
        mm()
        for i in range(4):
            a = time.perf_counter(); f(); ts[i].append(time.perf_counter() - a)
    res[name] = [statistics.median(t) * 1e3 for t in ts]
print(f"MODE={MODE}", "  ".join(f"{k}: " + " ".join(f"{x:.3f}" for x in v) for k, v in res.items()), flush=True)
