import os, time, statistics, ctypes
import fastattn, numpy as np
from fastattn import _blas
from fastattn.bench import impls
cases = impls.pipeline_cases("float32")
pair = [c for c in cases if c.get("kind") == "pair"]
mm, att = pair[0]["steps"]["matmul"], pair[0]["steps"]["attention"]
from numba.np.ufunc import omppool
lib = ctypes.CDLL(omppool.__file__)
pause = lib.omp_pause_resource_all; pause.argtypes=[ctypes.c_int]
pools = _blas.openblas_pools()
def shutdown():
    for _, _, s in pools: s()
def sleep_short(): 
    t=time.perf_counter()
    while time.perf_counter()-t < 0.0005: pass
for f in (mm, att): f(); f()
before = {"nothing": lambda: None, "busy 0.5ms": sleep_short, "openblas shutdown": shutdown,
          "attention": att, "attention+pause": lambda: (att(), pause(1)), "pause": lambda: pause(1),
          "shutdown+busy": lambda: (shutdown(), sleep_short())}
res = {k: [] for k in before}
for r in range(40):
    for k, f in before.items():
        f(); a = time.perf_counter(); mm(); res[k].append(time.perf_counter() - a)
for k, v in res.items():
    print(f"{k:20s} mm {statistics.median(v)*1e3:.3f} ms")
