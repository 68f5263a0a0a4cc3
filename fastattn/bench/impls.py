"""What the benchmarks compare: one problem, computed by each implementation in turn.

Shared by ``python -m fastattn bench`` and the pytest-benchmark suite in ``bench/``, so both time
exactly the same calls. A :class:`Problem` describes the sizes; :func:`prepare` turns it and an
implementation name into a no-argument callable that computes the answer (inputs already made,
copied to the GPU or wrapped as tensors outside the timed part) and returns it.

Implementations:
    numba    fastattn, backend="numba" (the fused CPU kernels)
    numpy    fastattn, backend="numpy" (the reference, through the checked API)
    formula  the plain NumPy formula a user would write: softmax(q k^T * scale) v, in place
    scipy    scipy.special.softmax (softmax only)
    torch    PyTorch on CPU tensors sharing the NumPy arrays' memory (attention variants as an
             explicit mask or bias, as a user of SDPA would have to write them)
    flex     PyTorch's compiled ``flex_attention`` on the CPU (variants as mask_mod/score_mod)
    cuda     fastattn, backend="cuda", inputs already on the GPU (timed to the end of the kernel)
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

OPS = ("attention", "softmax", "similarity", "mha", "backward", "forward_backward", "flex")
IMPLS = {
    "attention": ("numba", "numpy", "formula", "torch", "flex", "cuda"),
    "softmax": ("numba", "numpy", "formula", "scipy", "torch", "cuda"),
    "similarity": ("numba", "numpy", "formula", "torch", "cuda"),
    "mha": ("numba", "numpy", "torch"),
    # the attention backward from the forward's out and lse, and a forward and backward together
    "backward": ("numba", "numpy", "torch"),
    "forward_backward": ("numba", "numpy", "torch"),
    "flex": ("numba", "sdpa", "torch"),
}
# The flex_attention cases (op "flex"): what each masks or modifies (see _flex_functions).
FLEX_CASES = ("causal", "window", "softcap", "document", "prefix")
FLEX_WINDOW = 1024      # keys per sliding window
FLEX_DOCUMENTS = 8      # documents of equal length, each attending within itself
FLEX_SOFTCAP = 20.0
DTYPES = ("float32", "float64", "float16")


class Unavailable(Exception):
    """This implementation cannot run this problem here; the message says why."""


@dataclass(frozen=True)
class Problem:
    """Sizes of one benchmark case, with PyTorch's names: (B, H, L, D) queries, (B, Hkv, S, D) keys.

    op: "attention" (scaled dot-product attention), "softmax" over the last axis of a (B, H, L, S)
    score array, "similarity" (B, H, L, D) x (B, H, S, D) -> (B, H, L, S), or "mha" (the multi-head
    layer on (B, L, H*D) embeddings, self-attention), "backward" (the attention's gradients
    from grad_out and the forward's out and lse) or "forward_backward" (both passes).
    mask: None, "float" (an additive (L, S) bias) or "bool" (an (L, S) keep mask), broadcast over
    batch and heads.
    The attention variants, as fastattn's arguments: alignment ("top_left"/"bottom_right"),
    window ((left, right), None for an unbounded side), softcap (a float) and alibi (the
    standard slopes 2^(-8 (h + 1) / H) per head).
    """
    op: str = "attention"
    batch: int = 1
    heads: int = 8
    kv_heads: int | None = None
    length: int = 1024
    kv_length: int | None = None
    dim: int = 64
    dtype: str = "float32"
    causal: bool = False
    mask: str | None = None
    alignment: str = "top_left"
    window: tuple | None = None
    softcap: float | None = None
    alibi: bool = False
    flex: str | None = None  # op "flex": one of FLEX_CASES

    def __post_init__(self):
        if self.window is not None:  # (a list once read back from JSON)
            object.__setattr__(self, "window", tuple(self.window))
        if self.alignment not in ("top_left", "bottom_right"):
            raise ValueError(f"alignment must be 'top_left' or 'bottom_right', got "
                             f"{self.alignment!r}")
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.mask not in (None, "float", "bool"):
            raise ValueError(f"mask must be None, 'float' or 'bool', got {self.mask!r}")
        if (self.op == "flex") != (self.flex in FLEX_CASES):
            raise ValueError(f"op 'flex' takes flex, one of {FLEX_CASES}; got op {self.op!r}, "
                             f"flex {self.flex!r}")
        if self.heads % self.hkv:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.hkv})")

    @property
    def hkv(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def S(self) -> int:
        return self.length if self.kv_length is None else self.kv_length

    @property
    def gqa(self) -> bool:
        return self.hkv != self.heads

    @property
    def variants(self) -> dict:
        """The variant arguments of fastattn's attention (those that are set)."""
        out = {}
        if self.alignment != "top_left":
            out["alignment"] = self.alignment
        if self.window is not None:
            out["window"] = self.window
        if self.softcap is not None:
            out["softcap"] = self.softcap
        if self.alibi:
            out["alibi_slopes"] = alibi_slopes(self.heads)
        return out

    def keys_seen(self) -> int:
        """Query-key pairs that take part under causal and the window (masks aside)."""
        offset = 0 if self.alignment == "top_left" else self.S - self.length
        left, right = self.window if self.window is not None else (None, None)
        p = np.arange(self.length, dtype=np.int64) + offset
        lo = np.zeros_like(p) if left is None else np.maximum(p - left, 0)
        hi = np.full_like(p, self.S - 1)
        if right is not None:
            hi = np.minimum(hi, p + right)
        if self.causal:
            hi = np.minimum(hi, p)
        return int(np.maximum(hi - lo + 1, 0).sum())

    def flops(self) -> float:
        """Floating-point operations, counted as PyTorch and FlashAttention do.

        Attention: 4*B*H*L*S*D (two matrix products), half that when causal (with a window or
        bottom-right alignment: 4*B*H*D per query-key pair that takes part). Similarity: half of
        that (one product). Backward: 2.5x the attention (FlashAttention's convention: five
        products, one of them the recomputed scores); forward and backward: 3.5x. MHA: the
        attention plus the four projections, 8*B*L*E^2. Softmax: 0
        (it is memory-bound; GFLOP/s is not shown for it).
        """
        B, H, L, S, D = self.batch, self.heads, self.length, self.S, self.dim
        attention = 4.0 * B * H * L * S * D * (0.5 if self.causal else 1.0)
        if self.op == "flex":
            return 4.0 * B * H * D * flex_pairs(self)
        if self.window is not None or self.alignment != "top_left":
            attention = 4.0 * B * H * D * self.keys_seen()  # the pairs a window keeps
        if self.op == "attention":
            return attention
        if self.op == "similarity":
            return attention / 2
        if self.op == "backward":
            return 2.5 * attention
        if self.op == "forward_backward":
            return 3.5 * attention
        if self.op == "mha":
            E = H * D
            return attention + 8.0 * B * L * E * E
        return 0.0

    def label(self) -> str:
        parts = [{"forward_backward": "forward+backward", "flex": f"flex {self.flex}"}.get(
            self.op, self.op)]
        if self.op == "mha":
            parts.append(f"B={self.batch} L={self.length} E={self.heads * self.dim} "
                         f"H={self.heads}")
        else:
            parts.append(f"B={self.batch} H={self.heads}")
            if self.gqa:
                parts[-1] += f"/{self.hkv}kv"
            parts.append(f"L={self.length}" if self.S == self.length
                         else f"L={self.length} S={self.S}")
            if self.op != "softmax":
                parts.append(f"D={self.dim}")
        if self.causal:
            parts.append("causal")
        if self.alignment != "top_left":
            parts.append(self.alignment)
        if self.window is not None:
            left, right = ("none" if w is None else w for w in self.window)
            parts.append(f"window=({left},{right})")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap:g}")
        if self.alibi:
            parts.append("alibi")
        if self.mask:
            parts.append(f"{self.mask} mask")
        if self.dtype != "float32":
            parts.append(self.dtype)
        return " ".join(parts)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(kv_heads=self.hkv, kv_length=self.S, flops=self.flops(), label=self.label())
        return d

    def with_(self, **changes) -> "Problem":
        return replace(self, **changes)


# --- inputs ------------------------------------------------------------------------------------

def alibi_slopes(heads: int) -> np.ndarray:
    """The ALiBi paper's slopes 2^(-8 (h + 1) / H) for heads h = 0 .. H - 1."""
    return 2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)


def make_inputs(p: Problem, seed: int = 0) -> dict:
    """The NumPy inputs of a problem (standard normal values, fixed seed)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(p.dtype)
    gen_dtype = np.float64 if dtype == np.float64 else np.float32

    def normal(*shape):
        return rng.standard_normal(shape, dtype=gen_dtype).astype(dtype, copy=False)

    B, H, Hkv, L, S, D = p.batch, p.heads, p.hkv, p.length, p.S, p.dim
    if p.op == "softmax":
        arrays = {"x": normal(B, H, L, S) * dtype.type(3)}
    elif p.op == "similarity":
        arrays = {"a": normal(B, H, L, D), "b": normal(B, H, S, D)}
    elif p.op == "mha":
        arrays = {"x": normal(B, L, H * D)}
    else:
        arrays = {"q": normal(B, H, L, D), "k": normal(B, Hkv, S, D), "v": normal(B, Hkv, S, D)}
        if p.op in ("backward", "forward_backward"):
            arrays["grad_out"] = normal(B, H, L, D)
    if p.mask == "float":
        # A relative-position bias (ALiBi-like): farther keys count less.
        i = np.arange(L)[:, None]
        j = np.arange(S)[None, :]
        arrays["mask"] = (-0.01 * np.abs(i - j)).astype(dtype)
    elif p.mask == "bool":
        keep = rng.random((L, S)) < 0.9
        np.fill_diagonal(keep, True)  # every query keeps at least one key
        arrays["mask"] = keep
    if p.op == "backward":  # the forward's out and lse, which the backward reads
        import fastattn
        from .._backends import numba_unavailable_reason

        arrays["out"], arrays["lse"] = fastattn.scaled_dot_product_attention(
            arrays["q"], arrays["k"], arrays["v"], arrays.get("mask"), is_causal=p.causal,
            enable_gqa=p.gqa, return_lse=True,
            backend="numba" if numba_unavailable_reason() is None else "numpy")
    return arrays


def nbytes(result) -> int:
    """Bytes held by a result (array, tensor, device array or a tuple of them)."""
    if result is None:
        return 0
    if isinstance(result, (tuple, list)):
        return sum(nbytes(r) for r in result)
    if hasattr(result, "nbytes"):
        return int(result.nbytes)
    if hasattr(result, "element_size"):  # torch tensor
        return int(result.element_size() * result.nelement())
    return 0


# --- implementations ---------------------------------------------------------------------------

def available(impl: str) -> str | None:
    """None if ``impl`` can run here at all, else why not (problem-specific checks come later)."""
    if impl == "numba":
        from .._backends import numba_unavailable_reason
        return numba_unavailable_reason()
    if impl in ("torch", "flex") and importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed (pip install torch)"
    if impl == "flex":
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError as exc:
            return f"this PyTorch has no flex_attention ({exc})"
    if impl == "scipy" and importlib.util.find_spec("scipy") is None:
        return "SciPy is not installed"
    if impl == "cuda":
        from .._backends import cuda_unavailable_reason
        return cuda_unavailable_reason()
    return None


def prepare(impl: str, p: Problem, arrays: dict):
    """A no-argument callable computing problem ``p`` with ``impl`` on ``arrays``.

    Raises :class:`Unavailable` when ``impl`` cannot run ``p`` here.
    """
    if impl not in IMPLS[p.op]:
        raise Unavailable(f"{impl} does not implement {p.op}")
    reason = available("numba" if impl == "sdpa" else impl)
    if reason is not None:
        raise Unavailable(reason)
    if p.op == "flex":
        return _flex(impl, p, arrays)
    return _PREPARE[impl](p, arrays)


def _scale(p: Problem) -> float:
    return 1.0 / math.sqrt(p.dim)


def _fastattn(backend: str):
    def build(p: Problem, a: dict):
        import fastattn

        if p.op == "attention":
            variants = p.variants
            return lambda: fastattn.scaled_dot_product_attention(
                a["q"], a["k"], a["v"], a.get("mask"), is_causal=p.causal, enable_gqa=p.gqa,
                backend=backend, **variants)
        if p.op == "softmax":
            if p.mask == "float":
                raise Unavailable("fastattn.softmax takes bool masks only")
            return lambda: fastattn.softmax(a["x"], mask=a.get("mask"), backend=backend)
        if p.op == "similarity":
            return lambda: fastattn.similarity(a["a"], a["b"], "dot", backend=backend)
        if p.op in ("backward", "forward_backward"):
            return _fastattn_backward(p, a, backend)
        return _fastattn_mha(p, a, backend)
    return build


def _fastattn_backward(p: Problem, a: dict, backend: str):
    import fastattn

    q, k, v, mask, grad_out = a["q"], a["k"], a["v"], a.get("mask"), a["grad_out"]
    options = dict(is_causal=p.causal, enable_gqa=p.gqa, backend=backend)
    backward = fastattn.scaled_dot_product_attention_backward
    if p.op == "backward":
        out, lse = a["out"], a["lse"]
        return lambda: backward(grad_out, q, k, v, out, lse, mask, **options)

    def forward_backward():
        out, lse = fastattn.scaled_dot_product_attention(q, k, v, mask, return_lse=True,
                                                         **options)
        return backward(grad_out, q, k, v, out, lse, mask, **options)
    return forward_backward


def _fastattn_mha(p: Problem, a: dict, backend: str):
    import fastattn

    if not hasattr(fastattn, "MultiHeadAttention"):
        raise Unavailable("fastattn.MultiHeadAttention does not exist in this version")
    try:
        layer = fastattn.MultiHeadAttention(p.heads * p.dim, p.heads, num_kv_heads=p.kv_heads,
                                            dtype=np.dtype(p.dtype), seed=0)
    except TypeError as exc:
        raise Unavailable(f"fastattn.MultiHeadAttention: {exc}") from None
    x, mask = a["x"], a.get("mask")
    variants = p.variants
    return lambda: layer(x, attn_mask=mask, is_causal=p.causal, backend=backend, **variants)


def _formula(p: Problem, a: dict):
    """The plain NumPy formula, written with care (in place, no needless temporaries)."""
    if p.op == "mha":
        raise Unavailable("no plain formula for the layer (the numpy implementation is one)")
    if p.variants:
        raise Unavailable("the plain formula has no variants (the numpy implementation has)")
    if p.op in ("backward", "forward_backward"):
        raise Unavailable("no plain formula for the backward (the numpy implementation is one)")
    if p.op == "similarity":
        x, y = a["a"], a["b"]
        return lambda: x @ np.swapaxes(y, -1, -2)
    if p.op == "softmax":
        x, mask = a["x"], a.get("mask")

        def softmax():
            s = x + mask if p.mask == "float" else x.copy()
            if p.mask == "bool":
                np.copyto(s, -np.inf, where=~mask)
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            return s
        return softmax

    q, k, v, mask = a["q"], a["k"], a["v"], a.get("mask")
    scale = np.asarray(_scale(p), q.dtype)
    group = p.heads // p.hkv

    def attention():
        kk, vv = k, v
        if group > 1:
            kk, vv = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        s = q @ np.swapaxes(kk, -1, -2)
        s *= scale
        if p.mask == "float":
            s += mask
        elif p.mask == "bool":
            np.copyto(s, -np.inf, where=~mask)
        if p.causal:
            np.copyto(s, -np.inf, where=~np.tri(p.length, p.S, dtype=bool))
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        return s @ vv
    return attention


def _scipy(p: Problem, a: dict):
    if p.op != "softmax":
        raise Unavailable("scipy implements softmax only")
    if p.mask:
        raise Unavailable("scipy.special.softmax takes no mask")
    from scipy.special import softmax

    x = a["x"]
    return lambda: softmax(x, axis=-1)


def _torch(p: Problem, a: dict):
    import torch

    t = {name: torch.from_numpy(arr) for name, arr in a.items()}  # shares the memory
    if p.op == "mha":
        return _torch_mha(p, t)
    if p.op in ("backward", "forward_backward"):
        return _torch_backward(p, t)

    def no_grad(fn):
        def call():
            with torch.inference_mode():
                return fn()
        return call

    if p.op == "similarity":
        return no_grad(lambda: torch.matmul(t["a"], t["b"].transpose(-1, -2)))
    if p.op == "softmax":
        x, mask = t["x"], t.get("mask")
        if p.mask == "bool":
            return no_grad(lambda: torch.softmax(x.masked_fill(~mask, -math.inf), dim=-1))
        if p.mask == "float":
            return no_grad(lambda: torch.softmax(x + mask, dim=-1))
        return no_grad(lambda: torch.softmax(x, dim=-1))
    kwargs = {"enable_gqa": True} if p.gqa else {}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v, mask = t["q"], t["k"], t["v"], t.get("mask")
    if p.variants:
        mask = _torch_pattern_mask(p, a)
        return no_grad(lambda: sdpa(q, k, v, attn_mask=mask, **kwargs))
    if p.causal and p.mask:
        raise Unavailable("torch's scaled_dot_product_attention takes a mask or is_causal, "
                          "not both")
    return no_grad(lambda: sdpa(q, k, v, attn_mask=mask, is_causal=p.causal, **kwargs))


# An explicit ALiBi bias is (H, L, S) floats: 2 GiB at H=8, L=S=8192.
MAX_BIAS_BYTES = 4 << 30


def _torch_pattern_mask(p: Problem, a: dict):
    """The variants as SDPA needs them: an explicit (L, S) bool mask for causal and the window,
    an (H, L, S) float bias when ALiBi is on (built here, outside the timed part)."""
    import torch

    from .. import reference

    if p.softcap is not None:
        raise Unavailable("torch's scaled_dot_product_attention has no softcap (see flex)")
    keep = reference.keys_seen(p.length, p.S, p.causal, p.alignment, p.window)
    user = a.get("mask")
    if not p.alibi:
        if p.mask == "float":
            return torch.from_numpy(np.where(keep, user, -np.inf).astype(user.dtype))
        return torch.from_numpy(keep & user if p.mask == "bool" else keep)
    nbytes = p.heads * p.length * p.S * np.dtype(p.dtype).itemsize
    if nbytes > MAX_BIAS_BYTES:
        raise Unavailable(f"the explicit ALiBi bias would take {nbytes / 2**30:.1f} GiB")
    if p.mask == "bool":
        keep = keep & user
    bias = reference.alibi_bias(alibi_slopes(p.heads), p.length, p.S, p.alignment,
                                np.dtype(p.dtype))
    bias[:, ~keep] = -np.inf
    if p.mask == "float":
        bias += user
    return torch.from_numpy(bias)


def _flex(p: Problem, a: dict):
    """PyTorch's flex_attention compiled for the CPU: causal, window and a bool mask as a
    block-sparse mask_mod, softcap, ALiBi and a float mask as a score_mod."""
    if p.op != "attention":
        raise Unavailable("flex_attention is attention only")
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    t = {name: torch.from_numpy(arr) for name, arr in a.items()}
    q, k, v = t["q"], t["k"], t["v"]
    offset = 0 if p.alignment == "top_left" else p.S - p.length
    left, right = p.window if p.window is not None else (None, None)
    if p.causal:
        right = 0 if right is None else min(right, 0)
    keep = t.get("mask") if p.mask == "bool" else None

    def mask_mod(b, h, q_idx, kv_idx):
        position = q_idx + offset
        ok = kv_idx >= 0
        if left is not None:
            ok = ok & (kv_idx >= position - left)
        if right is not None:
            ok = ok & (kv_idx <= position + right)
        if keep is not None:
            ok = ok & keep[q_idx, kv_idx]
        return ok

    softcap, add = p.softcap, t.get("mask") if p.mask == "float" else None
    slopes = torch.from_numpy(alibi_slopes(p.heads).astype(p.dtype)) if p.alibi else None

    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if add is not None:
            score = score + add[q_idx, kv_idx]
        if slopes is not None:
            score = score - slopes[h] * (q_idx + offset - kv_idx).abs()
        return score

    try:
        masked = left is not None or right is not None or keep is not None
        block_mask = create_block_mask(mask_mod, None, None, p.length, p.S, device="cpu") \
            if masked else None
        compiled = torch.compile(flex_attention, dynamic=False)
        plain = softcap is None and add is None and slopes is None

        def call():
            with torch.inference_mode():
                return compiled(q, k, v, score_mod=None if plain else score_mod,
                                block_mask=block_mask, enable_gqa=p.gqa)
        call()  # compiles; a failure here is reported as the reason, not a crash
    except Exception as exc:  # noqa: BLE001 - any failure of torch.compile means "cannot run"
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise Unavailable(f"flex_attention failed here: {type(exc).__name__}: "
                          f"{message[:200]}") from None
    return call


def _torch_backward(p: Problem, t: dict):
    """PyTorch's SDPA with requires_grad (its CPU flash kernel and flash backward)."""
    import torch

    if p.causal and p.mask:
        raise Unavailable("torch's scaled_dot_product_attention takes a mask or is_causal, "
                          "not both")
    kwargs = {"enable_gqa": True} if p.gqa else {}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = (t[name].requires_grad_() for name in ("q", "k", "v"))
    mask, grad_out = t.get("mask"), t["grad_out"]

    def forward():
        return sdpa(q, k, v, attn_mask=mask, is_causal=p.causal, **kwargs)
    if p.op == "backward":
        out = forward()  # outside the timed part, as fastattn's out and lse are
        return lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), (q, k, v), grad_out)


def _torch_mha(p: Problem, t: dict):
    import torch

    if p.gqa:
        raise Unavailable("torch.nn.MultiheadAttention has no grouped-query attention")
    if p.variants:
        raise Unavailable("torch.nn.MultiheadAttention has no window, softcap or ALiBi")
    E = p.heads * p.dim
    dtype = getattr(torch, p.dtype)
    layer = torch.nn.MultiheadAttention(E, p.heads, batch_first=True, dtype=dtype).eval()
    x = t["x"]
    mask = t.get("mask")
    if mask is not None and mask.dtype == torch.bool:
        mask = ~mask  # torch's layer: True = masked out
    if p.causal and mask is None:
        mask = torch.nn.Transformer.generate_square_subsequent_mask(p.length, dtype=dtype)

    def call():
        with torch.inference_mode():
            return layer(x, x, x, attn_mask=mask, need_weights=False, is_causal=p.causal)
    return call


def _cuda(p: Problem, a: dict):
    if p.op in ("mha", "backward", "forward_backward"):
        raise Unavailable(f"{p.op} is benchmarked on the CPU only")
    from numba import cuda

    import fastattn

    d = {name: cuda.to_device(arr) for name, arr in a.items()}  # outside the timed part

    def synced(fn):
        def call():
            out = fn()
            cuda.synchronize()
            return out
        return call

    if p.op == "attention":
        variants = p.variants
        return synced(lambda: fastattn.scaled_dot_product_attention(
            d["q"], d["k"], d["v"], d.get("mask"), is_causal=p.causal, enable_gqa=p.gqa,
            backend="cuda", **variants))
    if p.op == "softmax":
        if p.mask == "float":
            raise Unavailable("fastattn.softmax takes bool masks only")
        return synced(lambda: fastattn.softmax(d["x"], mask=d.get("mask"), backend="cuda"))
    return synced(lambda: fastattn.similarity(d["a"], d["b"], "dot", backend="cuda"))


# --- pipelines -----------------------------------------------------------------------------------

PIPELINE_MATMUL = (1024, 512, 512)   # h (1024, 512) @ W (512, 512): a projection before attention
PIPELINE_ATTENTION = Problem(batch=1, heads=8, length=1024, dim=64, causal=True)
PIPELINE_LAYERS = ((8, 512), (1, 4096))   # (B, L) at E=512, 8 heads


def pipeline_cases(dtype: str = "float32") -> list:
    """What ``bench --pipeline`` times back to back: each case is a dict with "name", "kind"
    ("pair": two steps alone and one after the other; "layers": fastattn's layer against
    PyTorch's) and its callables, or "skipped" with the reason."""
    import fastattn

    rng = np.random.default_rng(0)
    n, k, m = PIPELINE_MATMUL
    h = rng.standard_normal((n, k), dtype=np.float32).astype(dtype)
    w = rng.standard_normal((k, m), dtype=np.float32).astype(dtype)
    attention_problem = PIPELINE_ATTENTION.with_(dtype=dtype)
    a = make_inputs(attention_problem)

    def attention():
        return fastattn.scaled_dot_product_attention(a["q"], a["k"], a["v"], is_causal=True,
                                                     backend="numba")

    matmul_label = f"NumPy matmul ({n}x{k} @ {k}x{m})"
    attention_label = f"fastattn {attention_problem.label()}"
    cases = [{"name": f"{matmul_label}, then {attention_label}", "kind": "pair",
              "steps": {"matmul": lambda: h @ w, "attention": attention}}]
    torch_reason = available("torch")
    if torch_reason is not None:
        cases.append({"name": "PyTorch matmul, then fastattn attention", "skipped": torch_reason})
        return cases + [{"name": "fastattn.MultiHeadAttention against torch.nn.MultiheadAttention",
                         "skipped": torch_reason}]
    import torch

    th, tw = torch.from_numpy(h), torch.from_numpy(w)

    def torch_matmul():
        with torch.inference_mode():
            return th @ tw

    import fastattn.torch as fastattn_torch

    tq, tk, tv = (torch.from_numpy(a[name]) for name in ("q", "k", "v"))

    def torch_attention():  # a PyTorch user's call: fastattn's torch entry point
        with torch.inference_mode():
            return fastattn_torch.scaled_dot_product_attention(tq, tk, tv, is_causal=True,
                                                               backend="numba")

    cases.append({"name": f"PyTorch matmul ({n}x{k} @ {k}x{m}), then fastattn.torch "
                          f"{attention_problem.label()}",
                  "kind": "pair", "steps": {"matmul": torch_matmul,
                                            "attention": torch_attention}})
    for batch, length in PIPELINE_LAYERS:
        for causal in (False, True):
            p = Problem(op="mha", batch=batch, heads=8, length=length, dim=64, dtype=dtype,
                        causal=causal)
            x = make_inputs(p)
            try:
                layers = {"fastattn": prepare("numba", p, x), "torch": prepare("torch", p, x)}
            except Unavailable as exc:
                cases.append({"name": p.label(), "skipped": str(exc)})
                continue
            cases.append({"name": p.label(), "kind": "layers", "steps": layers})
    return cases


_PREPARE = {
    "numba": _fastattn("numba"),
    "numpy": _fastattn("numpy"),
    "formula": _formula,
    "scipy": _scipy,
    "torch": _torch,
    "flex": _flex,
    "cuda": _cuda,
}


# --- flex_attention -------------------------------------------------------------------------------

def flex_pairs(p: Problem) -> int:
    """(query, key) pairs a flex case keeps, per head."""
    L, S = p.length, p.S
    i = np.arange(L)[:, None]
    j = np.arange(S)[None, :]
    kept = 0
    for rows in range(0, L, 1024):  # a band at a time: (L, S) bools would be 64 MiB at 8192
        keep = _flex_keep(p.flex, i[rows:rows + 1024], j, L, S)
        kept += int(np.count_nonzero(keep))
    return kept


def _flex_keep(case, i, j, L, S):
    if case in ("causal", "softcap"):
        return j <= i
    if case == "window":
        return (j <= i) & (i - j < FLEX_WINDOW)
    if case == "document":
        return (i * FLEX_DOCUMENTS // L) == (j * FLEX_DOCUMENTS // S)
    return (j < L // 4) | (j <= i)  # prefix: the first quarter bidirectional


# The functions as a user would write them, at module level (so that Numba's cache keeps them).

def flex_causal(b, h, q_idx, kv_idx, *args):
    return q_idx >= kv_idx


def flex_sliding_window(b, h, q_idx, kv_idx, *args):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < FLEX_WINDOW)


def flex_softcap(score, b, h, q_idx, kv_idx, cap):
    return cap * math.tanh(score / cap)


def flex_same_document(b, h, q_idx, kv_idx, doc):
    return doc[q_idx] == doc[kv_idx]


def flex_prefix_lm(b, h, q_idx, kv_idx, prefix):
    return (kv_idx < prefix) | (q_idx >= kv_idx)


def _flex_functions(p: Problem):
    """(score_mod, mask_mod, args) of a case for fastattn."""
    doc = np.arange(p.length) * FLEX_DOCUMENTS // p.length
    return {"causal": (None, flex_causal, ()), "window": (None, flex_sliding_window, ()),
            "softcap": (flex_softcap, flex_causal, (FLEX_SOFTCAP,)),
            "document": (None, flex_same_document, (doc,)),
            "prefix": (None, flex_prefix_lm, (p.length // 4,))}[p.flex]


def _flex(impl: str, p: Problem, a: dict):
    q, k, v = a["q"], a["k"], a["v"]
    if impl == "numba":
        import fastattn

        score_mod, mask_mod, args = _flex_functions(p)
        block_mask = fastattn.create_block_mask(mask_mod, None, None, p.length, p.S, args=args)
        return lambda: fastattn.flex_attention(q, k, v, score_mod, block_mask=block_mask,
                                               args=args, enable_gqa=p.gqa, backend="numba")
    if impl == "sdpa":
        return _flex_builtin(p, q, k, v)
    return _flex_torch(p, a)


def _flex_builtin(p: Problem, q, k, v):
    """fastattn's built-in path for the case: is_causal, window, softcap, or a bool mask."""
    import fastattn

    options = {"causal": dict(is_causal=True),
               "window": dict(is_causal=True, window=(FLEX_WINDOW - 1, 0)),
               "softcap": dict(is_causal=True, softcap=FLEX_SOFTCAP)}.get(p.flex)
    if options is None:
        i = np.arange(p.length)[:, None]
        options = dict(attn_mask=_flex_keep(p.flex, i, np.arange(p.S)[None, :], p.length, p.S))
    try:  # (window and softcap come with the variants issue)
        small = np.zeros((1, 1, 4, 4), q.dtype)
        fastattn.scaled_dot_product_attention(small, small, small, backend="numba",
                                              **{key: (value[:4, :4] if key == "attn_mask"
                                                       else value)
                                                 for key, value in options.items()})
    except NotImplementedError as exc:
        raise Unavailable(f"fastattn's built-in path: {exc}") from None
    return lambda: fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=p.gqa,
                                                         backend="numba", **options)


def _flex_torch(p: Problem, a: dict):
    """PyTorch's flex_attention compiled (torch.compile; on the CPU it needs a C++ compiler).
    The compile happens in the first call, which the timings leave out (first_call_ms)."""
    import torch

    try:
        from torch.nn.attention import flex_attention as tf
    except ImportError:
        raise Unavailable("this PyTorch has no torch.nn.attention.flex_attention (2.5+)") \
            from None
    L, S = p.length, p.S
    doc = torch.arange(L) * FLEX_DOCUMENTS // L
    cap = FLEX_SOFTCAP
    masks = {
        "causal": lambda b, h, q_idx, kv_idx: q_idx >= kv_idx,
        "window": lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < FLEX_WINDOW),
        "document": lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx],
        "prefix": lambda b, h, q_idx, kv_idx: (kv_idx < L // 4) | (q_idx >= kv_idx),
    }
    masks["softcap"] = masks["causal"]
    score_mod = (lambda s, b, h, q_idx, kv_idx: cap * torch.tanh(s / cap)) \
        if p.flex == "softcap" else None
    block_mask = tf.create_block_mask(masks[p.flex], None, None, L, S, device="cpu")
    compiled = torch.compile(tf.flex_attention)
    t = {name: torch.from_numpy(a[name]) for name in ("q", "k", "v")}
    kwargs = {"enable_gqa": True} if p.gqa else {}

    def call():
        with torch.inference_mode():
            return compiled(t["q"], t["k"], t["v"], score_mod=score_mod, block_mask=block_mask,
                            **kwargs)
    return call


_FLEX_FIRST_CALL = """\
import json, sys, time
t0 = time.perf_counter()
import numpy as np, fastattn
t1 = time.perf_counter()
def mask_{tag}(b, h, q_idx, kv_idx, *args):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < {window})
q = np.random.default_rng(0).standard_normal((1, 8, 1024, 64), dtype=np.float32)
t2 = time.perf_counter()
block_mask = fastattn.create_block_mask(mask_{tag}, None, None, 1024, 1024)
fastattn.flex_attention(q, q, q, block_mask=block_mask)
print("RESULT " + json.dumps({{"import_s": t1 - t0, "first_call_s": time.perf_counter() - t2}}))
"""


def flex_first_calls() -> dict:
    """Seconds of fastattn's first flex_attention call (block mask included, B=1, H=8, L=1024)
    in a new process: with a function new to Numba's cache (its kernel compiles; the other
    kernels are cached), and the same function again in another new process (loaded from the
    cache). Run with a temporary NUMBA_CACHE_DIR, filled first by a run with another function."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from . import measure

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(tmp, "cache"))
        env["PYTHONPATH"] = measure.child_pythonpath(env)
        runs = [("warm-up", 512), ("new function", 256), ("new process", 256)]
        for name, window in runs:
            script = os.path.join(tmp, f"flex_{window}.py")
            with open(script, "w") as f:
                f.write(_FLEX_FIRST_CALL.format(tag=window, window=window))
            proc = subprocess.run([sys.executable, script], env=env, capture_output=True,
                                  text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                results[name] = {"skipped": f"failed: {tail[0]}"}
            else:
                results[name] = json.loads(line[len("RESULT "):])
    return results
