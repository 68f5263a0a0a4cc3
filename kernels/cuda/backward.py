"""The attention backward for NVIDIA GPUs (``numba.cuda``): FlashAttention-2's formulas, never
storing the L x S weights, operands read in place through row layouts as in ``attention``.

Three kernels, each thread owning what it writes (no atomics, so the bits do not depend on the
launch):

- ``row_stats``: per query row, D = rowsum(grad_out * out) and the forward's lse with -inf (no
  key) as +inf, so that exp(score - lse) is 0 there;
- ``grad_key_value``: a thread per key (of a key/value head) walks the query rows of its query
  heads (GQA, in order) that see it, recomputes weights = exp(score - lse) and grad_s = weights *
  (grad_out . v - D) * softcap', and accumulates grad_v += weights grad_out and grad_k +=
  scale grad_s q in its own row;
- ``grad_query``: a thread per query row walks its keys and accumulates grad_q += scale grad_s k.

This is the plain design (a row per thread, operands from global memory through the caches):
correct for every variant and tested in the simulator, not tuned; a tiled version would stage
blocks of q, k, v and grad_out through shared memory as ``attention`` does.
"""
import functools
import math
from types import SimpleNamespace

import numpy as np
from numba import cuda  # the name must stay `cuda`: the simulator swaps it in these globals

from ._common import _device


@functools.lru_cache(maxsize=None)
def backward_kernels(compute: np.dtype) -> SimpleNamespace:
    """``row_stats``, ``grad_key_value`` and ``grad_query`` computing in ``compute``.

    Layouts: element (n, i, d) of q is ``q[q_outer[n] + i * q_rs + d * q_cs]``; k and v are
    indexed by query head n (``k_outer[n]`` is its key/value head's offset), as in
    ``attention``; the mask's row (n, i) starts at ``m_outer[n] + i * m_rs``. Variants as in
    ``fastattn._prepare.Variants``: query i sits at i + offset, key j takes part only if
    p(i) - left <= j <= p(i) + right, softcap > 0 caps, ``alibi[n]`` is head n's slope.
    """
    ct = np.dtype(compute).type
    zero, one, neg_inf, pos_inf = ct(0), ct(1), ct(-np.inf), ct(np.inf)
    i64 = np.int64

    @_device
    def weight_and_slope(q, q_base, q_rs, q_cs, k, k_base, k_rs, k_cs, i, j, E, q_inv, k_inv,
                         scale, softcap, m, m_row, m_cs, mask_kind, alibi_slope, position, lse):
        """(weight exp(score - lse), softcap' = 1 - tanh^2) of query i and key j; the variants in
        the forward's order: scale, softcap, mask, window (the caller's), ALiBi."""
        s = zero
        for d in range(E):
            s += ct(q[q_base + i * q_rs + d * q_cs]) * ct(k[k_base + j * k_rs + d * k_cs])
        s = s * q_inv * k_inv * scale
        slope = one
        if softcap > zero:
            t = math.tanh(s / softcap)
            s = softcap * t
            slope = one - t * t
        if mask_kind == 1:
            if ct(m[m_row + j * m_cs]) == zero:
                s = neg_inf
        elif mask_kind == 2:
            s = s + ct(m[m_row + j * m_cs])
        s = s - alibi_slope * ct(abs(position - j))
        return math.exp(min(s - lse, zero)), slope

    @_device
    def inverse_norm(x, base, rs, cs, i, E, cosine):
        if not cosine:
            return one
        sq = zero
        for d in range(E):
            val = ct(x[base + i * rs + d * cs])
            sq += val * val
        return one / math.sqrt(sq) if sq > zero else zero

    @cuda.jit
    def row_stats(go, go_outer, go_rs, go_cs, o, o_outer, o_rs, o_cs, lse, N, L, Ev, delta,
                  row_lse):
        """delta[n, i] = grad_out[n, i] . out[n, i]; row_lse = lse with -inf as +inf."""
        t = i64(cuda.blockIdx.x) * i64(cuda.blockDim.x) + i64(cuda.threadIdx.x)
        if t >= N * L:
            return
        n = t // L
        i = t % L
        acc = zero
        for c in range(Ev):
            acc += (ct(go[go_outer[n] + i * go_rs + c * go_cs])
                    * ct(o[o_outer[n] + i * o_rs + c * o_cs]))
        delta[n, i] = acc
        x = ct(lse[n, i])
        row_lse[n, i] = pos_inf if x == neg_inf else x

    @cuda.jit
    def grad_key_value(q, q_outer, q_rs, q_cs, k, k_outer, k_rs, k_cs, v, v_outer, v_rs, v_cs,
                       go, go_outer, go_rs, go_cs, m, m_outer, m_rs, m_cs, mask_kind, delta,
                       row_lse, N, L, S, E, Ev, group, scale, cosine, offset, left, right,
                       softcap, alibi, has_alibi, acc_k, acc_v, grad_k, grad_v):
        """grad_k and grad_v of key j of key/value head m: a thread per (m, j)."""
        t = i64(cuda.blockIdx.x) * i64(cuda.blockDim.x) + i64(cuda.threadIdx.x)
        n_kv = N // group
        if t >= n_kv * S:
            return
        mh = t // S
        j = t % S
        for d in range(E):
            acc_k[mh, j, d] = zero
        for c in range(Ev):
            acc_v[mh, j, c] = zero
        head = mh * group  # k_outer and v_outer are per query head
        k_base = k_outer[head]
        v_base = v_outer[head]
        k_inv = inverse_norm(k, k_base, k_rs, k_cs, j, E, cosine)
        # the queries that see key j: j - right <= p(i) <= j + left
        i_first = max(j - right - offset, i64(0))
        i_last = min(j + left - offset, L - 1)
        for n in range(head, head + group):
            q_base = q_outer[n]
            slope_n = ct(alibi[n]) if has_alibi else zero
            for i in range(i_first, i_last + 1):
                m_row = m_outer[n] + i * m_rs if mask_kind != 0 else i64(0)
                q_inv = inverse_norm(q, q_base, q_rs, q_cs, i, E, cosine)
                w, cap_slope = weight_and_slope(q, q_base, q_rs, q_cs, k, k_base, k_rs, k_cs,
                                                i, j, E, q_inv, k_inv, scale, softcap, m, m_row,
                                                m_cs, mask_kind, slope_n, i + offset,
                                                row_lse[n, i])
                if w == zero:
                    continue
                go_base = go_outer[n] + i * go_rs
                dw = zero
                for c in range(Ev):
                    g = ct(go[go_base + c * go_cs])
                    dw += g * ct(v[v_base + j * v_rs + c * v_cs])
                    acc_v[mh, j, c] += w * g
                ds = w * (dw - delta[n, i]) * cap_slope * scale * q_inv
                for d in range(E):
                    acc_k[mh, j, d] += ds * ct(q[q_base + i * q_rs + d * q_cs])
        # cosine: through k / |k| (the sum above is the gradient of the unit row, over k_inv)
        along = zero
        if cosine:
            for d in range(E):
                along += acc_k[mh, j, d] * ct(k[k_base + j * k_rs + d * k_cs])
        for d in range(E):
            g = acc_k[mh, j, d]
            if cosine:
                g = (g - ct(k[k_base + j * k_rs + d * k_cs]) * along * k_inv * k_inv) * k_inv
            grad_k[mh, j, d] = g
        for c in range(Ev):
            grad_v[mh, j, c] = acc_v[mh, j, c]

    @cuda.jit
    def grad_query(q, q_outer, q_rs, q_cs, k, k_outer, k_rs, k_cs, v, v_outer, v_rs, v_cs,
                   go, go_outer, go_rs, go_cs, m, m_outer, m_rs, m_cs, mask_kind, delta, row_lse,
                   N, L, S, E, Ev, scale, cosine, offset, left, right, softcap, alibi, has_alibi,
                   acc_q, grad_q):
        """grad_q of query i of head n: a thread per (n, i)."""
        t = i64(cuda.blockIdx.x) * i64(cuda.blockDim.x) + i64(cuda.threadIdx.x)
        if t >= N * L:
            return
        n = t // L
        i = t % L
        for d in range(E):
            acc_q[n, i, d] = zero
        q_base = q_outer[n]
        k_base = k_outer[n]
        v_base = v_outer[n]
        q_inv = inverse_norm(q, q_base, q_rs, q_cs, i, E, cosine)
        slope_n = ct(alibi[n]) if has_alibi else zero
        m_row = m_outer[n] + i * m_rs if mask_kind != 0 else i64(0)
        lse_i = row_lse[n, i]
        delta_i = delta[n, i]
        go_base = go_outer[n] + i * go_rs
        position = i + offset
        j_first = max(position - left, i64(0))
        j_last = min(position + right, S - 1)
        for j in range(j_first, j_last + 1):
            k_inv = inverse_norm(k, k_base, k_rs, k_cs, j, E, cosine)
            w, cap_slope = weight_and_slope(q, q_base, q_rs, q_cs, k, k_base, k_rs, k_cs, i, j,
                                            E, q_inv, k_inv, scale, softcap, m, m_row, m_cs,
                                            mask_kind, slope_n, position, lse_i)
            if w == zero:
                continue
            dw = zero
            for c in range(Ev):
                dw += ct(go[go_base + c * go_cs]) * ct(v[v_base + j * v_rs + c * v_cs])
            ds = w * (dw - delta_i) * cap_slope * scale * k_inv
            for d in range(E):
                acc_q[n, i, d] += ds * ct(k[k_base + j * k_rs + d * k_cs])
        along = zero
        if cosine:
            for d in range(E):
                along += acc_q[n, i, d] * ct(q[q_base + i * q_rs + d * q_cs])
        for d in range(E):
            g = acc_q[n, i, d]
            if cosine:
                g = (g - ct(q[q_base + i * q_rs + d * q_cs]) * along * q_inv * q_inv) * q_inv
            grad_q[n, i, d] = g

    return SimpleNamespace(row_stats=row_stats, grad_key_value=grad_key_value,
                           grad_query=grad_query)
