import os, sys, time, statistics
sys.path.insert(0, "/tmp/p")
import numpy as np
MODE = os.environ.get("CB", "0")
import fastattn
if MODE == "1":
    import cbproto; cbproto.install(); time.sleep(0.3)
rng = np.random.default_rng(0)
def busy(s):
    t = time.perf_counter()
    while time.perf_counter() - t < s: pass
out = []
for n in (192, 384, 1024):
    a = rng.standard_normal((n, n), dtype=np.float32); b = rng.standard_normal((n, n), dtype=np.float32)
    for gap in (0, 0.0005, 0.003):
        ts = []
        for i in range(60 if n < 1024 else 30):
            busy(gap); t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
        out.append(f"n={n} gap={gap*1e3:.1f}ms {statistics.median(ts)*1e6:.0f}us")
print(f"CB={MODE} " + " | ".join(out), flush=True)
