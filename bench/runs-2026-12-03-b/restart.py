import os, time, statistics, ctypes
import fastattn, numpy as np
from fastattn import _blas
from fastattn.bench import impls
cases = impls.pipeline_cases("float32")
pair = [c for c in cases if c.get("kind") == "pair"]
mm, att = pair[0]["steps"]["matmul"], pair[0]["steps"]["attention"]
pools = _blas.openblas_pools()
np_path = [p for p, _, _ in pools if "64_" in p][0]
lib = ctypes.PyDLL(np_path)
init = lib.blas_thread_init
flag = _blas._server_running[np_path]
def shutdown():
    for _, _, s in pools: s()
for f in (mm, att): f(); f()
res = {k: [] for k in ("shutdown running", "init", "mm after att", "mm after att+init", "att after mm", "att after mm(no pool)", "att after att")}
for r in range(40):
    mm(); a = time.perf_counter(); shutdown(); res["shutdown running"].append(time.perf_counter()-a)
    a = time.perf_counter(); init(); res["init"].append(time.perf_counter()-a)
    att(); a = time.perf_counter(); mm(); res["mm after att"].append(time.perf_counter()-a)
    att(); init(); a = time.perf_counter(); mm(); res["mm after att+init"].append(time.perf_counter()-a)
    mm(); a = time.perf_counter(); att(); res["att after mm"].append(time.perf_counter()-a)
    mm(); shutdown(); a = time.perf_counter(); att(); res["att after mm(no pool)"].append(time.perf_counter()-a)
    att(); a = time.perf_counter(); att(); res["att after att"].append(time.perf_counter()-a)
for k, v in res.items():
    print(f"{k:24s} {statistics.median(v)*1e3:.3f} ms  (min {min(v)*1e3:.3f})")
