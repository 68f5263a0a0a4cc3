import os, sys, time, statistics, json
import fastattn, fastattn.integrations.transformers as fh
import torch, numpy as np
from fastattn.bench.transformers_case import LLAMA_LIKE, _model, _decode
from fastattn.bench import impls
fh.register()
res = {}
med = lambda xs: statistics.median(xs) * 1e3
cases = impls.pipeline_cases("float32")
pair = [c for c in cases if c.get("kind") == "pair"][0]["steps"]
mm, att = pair["matmul"], pair["attention"]
for f in (mm, att): f(); f()
for r in range(3):
    t = {"mm": [], "att": [], "pair": []}
    for _ in range(30):
        a = time.perf_counter(); mm(); t["mm"].append(time.perf_counter() - a)
    for _ in range(30):
        a = time.perf_counter(); att(); t["att"].append(time.perf_counter() - a)
    for _ in range(30):
        a = time.perf_counter(); mm(); att(); t["pair"].append(time.perf_counter() - a)
    res.setdefault("np pair ratio", []).append(med(t["pair"]) / (med(t["mm"]) + med(t["att"])))
    res.setdefault("fastattn att alone ms", []).append(med(t["att"]))
mha = torch.nn.MultiheadAttention(512, 8, batch_first=True).eval()
x = torch.randn(8, 512, 512)
def layer():
    with torch.inference_mode(): mha(x, x, x, need_weights=False)
layer()
for r in range(3):
    ts = []
    for _ in range(10):
        a = time.perf_counter(); layer(); ts.append(time.perf_counter() - a)
    res.setdefault("torch mha ms", []).append(med(ts))
model = _model(LLAMA_LIKE, "float32")
ids = torch.randint(0, 32000, (1, 4096), generator=torch.Generator().manual_seed(1))
c = _decode(model, "sdpa", ids, 32); c()
for r in range(3):
    a = time.perf_counter(); c(); res.setdefault("torch sdpa decode step ms", []).append((time.perf_counter() - a) / 32 * 1e3)
print("RESULT", json.dumps({"spin": os.environ.get("GOMP_SPINCOUNT", "10000"), **{k: statistics.median(v) for k, v in res.items()}}))
