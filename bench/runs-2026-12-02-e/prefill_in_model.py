import fastattn, torch, time, statistics, sys
import fastattn.integrations.transformers as fh
from fastattn.bench.transformers_case import LLAMA_LIKE, _model, _prefill
from transformers import AttentionInterface
dtype=sys.argv[1]; L=int(sys.argv[2])
model=_model(LLAMA_LIKE,dtype)
acc={"sdpa":[], "fastattn":[]}
def timed(f,name):
    def g(*a,**k):
        t=time.perf_counter(); r=f(*a,**k); acc[name].append(time.perf_counter()-t); return r
    return g
for n in acc: AttentionInterface._global_mapping[n]=timed(AttentionInterface._global_mapping[n],n)
ids=torch.randint(0,32000,(1,L),generator=torch.Generator().manual_seed(1))
calls={impl:_prefill(model,impl,ids) for impl in ("sdpa","fastattn")}
for r in range(2):
    for impl,c in calls.items():
        acc[impl].clear()
        t=time.perf_counter(); c(); tt=time.perf_counter()-t
        print(impl, f"total {tt:.2f} s  attention {sum(acc[impl]):.2f} s  ({[round(x,3) for x in acc[impl]]})  rest {tt-sum(acc[impl]):.2f}")
