import fastattn, sys
from fastattn.bench import transformers_case as tc
dt=tuple(sys.argv[1].split(",")) if len(sys.argv)>1 else ("float32",)
rows=tc.run(tc.LLAMA_LIKE, lengths=(), context=4096, steps=128, dtypes=dt, min_runs=5, min_time=1.0, max_time=60)
print(tc.render(rows))
