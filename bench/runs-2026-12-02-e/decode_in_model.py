import fastattn, torch, time, statistics, sys, transformers
import fastattn.integrations.transformers as fh
from fastattn.bench.transformers_case import LLAMA_LIKE, _model, _decode
from transformers import AttentionInterface
dtype=sys.argv[1] if len(sys.argv)>1 else "float32"
model=_model(LLAMA_LIKE,dtype)
acc={"sdpa":[], "fastattn":[]}
from transformers.integrations import sdpa_attention
orig_sdpa=AttentionInterface._global_mapping["sdpa"]; orig_fa=AttentionInterface._global_mapping["fastattn"]
def timed(f,name):
    def g(*a,**k):
        t=time.perf_counter(); r=f(*a,**k); acc[name].append(time.perf_counter()-t); return r
    return g
AttentionInterface._global_mapping["sdpa"]=timed(orig_sdpa,"sdpa")
AttentionInterface._global_mapping["fastattn"]=timed(orig_fa,"fastattn")
from fastattn.kernels.cpu import decode
from fastattn import kvcache
acc["kernel"]=[]; acc["merge"]=[]
_ar=decode.attend_rows; _mr=decode.merge_rows
def ar(*a):
    t=time.perf_counter(); r=_ar(*a); acc["kernel"].append(time.perf_counter()-t); return r
def mr(*a):
    t=time.perf_counter(); r=_mr(*a); acc["merge"].append(time.perf_counter()-t); return r
decode.attend_rows=ar; decode.merge_rows=mr
import fastattn.torch as ftm, fastattn._api as api, fastattn._prepare as prep
def w(mod,name):
    f=getattr(mod,name); acc[name]=[]
    def g(*a,**k):
        t=time.perf_counter(); r=f(*a,**k); acc[name].append(time.perf_counter()-t); return r
    setattr(mod,name,g)
for mod,n in [(ftm,"_forward"),(ftm,"_check_tensors"),(ftm,"_as_tensor"),(prep,"prepare_attention"),(prep,"check_attention"),(kvcache,"flat_view"),(kvcache,"run_rows"),(kvcache,"_numba_decode")]: w(mod,n)
names=["_forward","_check_tensors","_as_tensor","prepare_attention","check_attention","flat_view","run_rows","_numba_decode"]
seen=[0]
_fa=orig_fa
def fa2(module,q,k,v,*a,**kw):
    if seen[0]<1:
        print(q.shape,q.stride(),k.shape,k.stride(),k.is_contiguous(),v.is_contiguous(), kw.keys(), a[0] if a else None); seen[0]+=1
    return _fa(module,q,k,v,*a,**kw)
AttentionInterface._global_mapping["fastattn"]=timed(fa2,"fastattn")
ids=torch.randint(0,32000,(1,4096),generator=torch.Generator().manual_seed(1))
calls={impl:_decode(model,impl,ids,32) for impl in ("sdpa","fastattn")}
tot={i:[] for i in calls}
for r in range(4):
    for impl,c in calls.items():
        acc[impl].clear(); [acc[n].clear() for n in names]; acc["kernel"].clear(); acc["merge"].clear()
        t=time.perf_counter(); c(); tot[impl].append(time.perf_counter()-t)
        print(" ".join(f"{n}:{statistics.median(acc[n] or [0])*1e6:.0f}x{len(acc[n])/128:.0f}" for n in names)); print(impl, f"step {tot[impl][-1]/32*1e3:.2f} ms  attention per call median {statistics.median(acc[impl])*1e6:.0f} us, sum per step {sum(acc[impl])/32*1e3:.2f} ms", "kernel", statistics.median(acc["kernel"] or [0])*1e6, "merge", statistics.median(acc["merge"] or [0])*1e6)
