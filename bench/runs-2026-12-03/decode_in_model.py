import fastattn, torch, time, statistics, sys
import fastattn.integrations.transformers as fh
from fastattn.bench.transformers_case import LLAMA_LIKE, _model, _decode
from transformers import AttentionInterface
from fastattn.kernels.cpu import decode
fh.register()
model=_model(LLAMA_LIKE,"float32")
acc={"sdpa":[], "fastattn":[], "kernel":[]}
def timed(f,name):
    def g(*a,**k):
        t=time.perf_counter(); r=f(*a,**k); acc[name].append(time.perf_counter()-t); return r
    return g
for n in ("sdpa","fastattn"):
    AttentionInterface._global_mapping[n]=timed(AttentionInterface._global_mapping[n],n)
decode.sdpa=timed(decode.sdpa,"kernel")
ids=torch.randint(0,32000,(1,4096),generator=torch.Generator().manual_seed(1))
calls={impl:_decode(model,impl,ids,32) for impl in ("sdpa","fastattn")}
for r in range(4):
    for impl,c in calls.items():
        for x in acc.values(): x.clear()
        t=time.perf_counter(); c(); tot=time.perf_counter()-t
        print(impl, f"step {tot/32*1e3:.2f} ms  attention call median {statistics.median(acc[impl])*1e6:.0f} us, per step {sum(acc[impl])/32*1e3:.2f} ms",
              f"kernel {statistics.median(acc['kernel'])*1e6:.0f}" if acc["kernel"] else "")
