import time, statistics
import fastattn, numpy as np
from fastattn.bench import impls, measure
cases = impls.pipeline_cases("float32")
pair = [c for c in cases if c.get("kind") == "pair"]
for c in pair:
    s = c["steps"]
    seqs = {"first": [s["matmul"]], "att": [s["attention"]], "pair": [s["matmul"], s["attention"]]}
    for calls, rounds in ((10, 3), (5, 6)):
        t = measure.time_back_to_back(seqs, calls=calls, rounds=rounds)
        m = {k: v["median_s"] * 1e3 for k, v in t.items()}
        mn = {k: v["min_s"] * 1e3 for k, v in t.items()}
        print(c["name"][:30], calls, rounds, " ".join(f"{k} {m[k]:.2f} (min {mn[k]:.2f})" for k in m), f"ratio {m['pair']/(m['first']+m['att']):.3f}", flush=True)
