import sys, time, statistics
sys.path.insert(0, sys.argv[1])
import fastattn, torch, numpy as np
assert fastattn.__file__.startswith(sys.argv[1]), fastattn.__file__
import fastattn.integrations.transformers as fh
B,Hq,Hkv,S,D=1,16,4,int(sys.argv[2]),64
qp = torch.randn(B,1,Hq,D).transpose(1,2)
k = torch.randn(B,Hkv,S,D); v = torch.randn(B,Hkv,S,D)
class M: is_causal=True
junk = np.ones(64<<20 >> 2, np.float32)
def call():
    with torch.inference_mode():
        return fh.attention_forward(M, qp, k, v, None, scaling=0.125)
def sd():
    with torch.inference_mode():
        return torch.nn.functional.scaled_dot_product_attention(qp, k, v, scale=0.125, enable_gqa=True)
for _ in range(5): call(); sd()
res = {}
for name, f in (("fastattn", call), ("sdpa", sd)):
    for thrash in (False, True):
        ts=[]
        for _ in range(300):
            if thrash: junk.sum()
            a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
        res[(name, thrash)] = statistics.median(ts)*1e6
print(sys.argv[1][-4:], S, " ".join(f"{n}{'/thrash' if t else ''} {x:.0f}" for (n,t),x in res.items()))
