import sys; sys.path.insert(0,'/tmp/s/dk')
import fastattn, numpy as np, time, statistics, random
from fastattn.kernels.cpu import decode
import dec_old
S=int(sys.argv[1]); Hkv=4
res={}
for group in (1,2,4,8):
    rng=np.random.default_rng(0)
    qn=rng.standard_normal((1,Hkv*group,1,64),dtype=np.float32); kn=rng.standard_normal((1,Hkv,S,64),dtype=np.float32); vn=rng.standard_normal((1,Hkv,S,64),dtype=np.float32)
    cap={}; orig=decode.attend_rows
    def w(*a): cap["a"]=a; return orig(*a)
    decode.attend_rows=w
    fastattn.scaled_dot_product_attention(qn,kn,vn,enable_gqa=True)
    decode.attend_rows=orig
    a=cap["a"]
    fs={"old":dec_old.attend_rows,"new":orig}
    T={k:[] for k in fs}
    for f in fs.values():
        for _ in range(10): f(*a)
    for r in range(30):
        for k in random.sample(list(fs),2):
            for _ in range(10):
                x=time.perf_counter(); fs[k](*a); T[k].append(time.perf_counter()-x)
    m={k:statistics.median(v)*1e6 for k,v in T.items()}
    print(f"S={S} group={group} old {m['old']:.0f} us new {m['new']:.0f} us  new/old {m['new']/m['old']:.2f}")
