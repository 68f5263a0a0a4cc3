"""MultiHeadAttention against torch.nn.MultiheadAttention: self-attention, B=8, L=512, E=512,
8 heads, float32, outputs only (need_weights=False for both), the same weights.

Not part of the test suite; run with ``pytest bench --benchmark-only``. Each implementation is
called once before timing (Numba's compile or cache load, BLAS and PyTorch thread-pool start-up),
then timed over a fixed number of rounds. Compare the medians of the one group.
"""
import numpy as np
import pytest

import fastattn

B, L, E, H = 8, 512, 512, 8
GROUP = f"mha self-attention B={B} L={L} E={E} H={H} float32"


@pytest.fixture(scope="module")
def layer():
    return fastattn.MultiHeadAttention(E, H, dtype=np.float32, seed=0)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((B, L, E), dtype=np.float32)


def fastattn_call(layer, x, backend):
    return lambda: layer(x, backend=backend)


def torch_call(layer, x):
    torch = pytest.importorskip("torch")
    module = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float32).eval()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    xt = torch.from_numpy(x)

    def call():
        with torch.inference_mode():
            return module(xt, xt, xt, need_weights=False)

    return call


@pytest.mark.parametrize("impl", ["fastattn-numba", "torch"])
def test_bench_mha_self_attention(benchmark, layer, x, impl):
    call = torch_call(layer, x) if impl == "torch" else fastattn_call(layer, x, "numba")
    call()  # explicit warm-up, outside the timing
    benchmark.group = GROUP
    benchmark.pedantic(call, rounds=10, iterations=1, warmup_rounds=1)
