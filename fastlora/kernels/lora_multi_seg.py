"""The mixed-adapter LoRA products segment by segment in PyTorch: the CPU row of the grouped op.

The same math as :mod:`fastlora.kernels.lora_multi_ref` (whose docstring states it), computed per slot over that
slot's rows only: each product costs one adapter's FLOPs (M·R·(K + N)) instead of the reference's S times that
(it multiplies every row by every slot's columns, most of them zero). Finding the segments reads the row slots
on the host, free on a CPU; so this is the CPU row, and the reference stays the sync-free spec elsewhere. The
dropout mask is the reference's (:func:`~fastlora.kernels.lora_multi_ref.multi_dropout`), applied to whole
(M, ·) tensors, so the kept positions are bit-equal whatever the segments.
"""

from __future__ import annotations

import torch

from fastlora.kernels.lora_multi_ref import multi_dropout

__all__ = ["multi_down", "multi_dx_term", "multi_grads", "multi_up", "segments"]


def segments(idx: torch.Tensor, slots: int) -> list[tuple[int, torch.Tensor]]:
    """[(slot, row indices (int64))] of every slot in [0, ``slots``) that has rows; rows of -1 belong to none."""
    idx = idx.long()
    order = torch.argsort(idx, stable=True)
    counts = torch.bincount(idx + 1, minlength=slots + 1).tolist()
    out, start = [], counts[0]  # the -1 rows sort first
    for slot, count in enumerate(counts[1 : slots + 1]):
        if count:
            out.append((slot, order[start : start + count]))
            start += count
    return out


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def multi_down(x, pool_a, idx, dropout_p=None, seed=0) -> torch.Tensor:
    """u = d_i(x)·A_iᵀ: x (M, K), pool_a (S, R, K), idx (M,) -> (M, R) in x's dtype (zero rows for idx -1)."""
    xd = multi_dropout(x, idx, dropout_p, seed)
    u = x.new_zeros((x.shape[0], pool_a.shape[1]))
    for slot, rows in segments(idx, pool_a.shape[0]):
        u[rows] = xd[rows] @ pool_a[slot].T
    return u


def multi_up(u, pool_b, scales, idx, bias=None) -> torch.Tensor:
    """C = s_i·u·B_iᵀ + bias: u (M, R), pool_b (S, N, R), scales (S,) -> (M, N) in u's dtype, s on the fp32
    (fp64) product."""
    acc = _acc(u.dtype)
    c = torch.zeros((u.shape[0], pool_b.shape[1]), dtype=acc, device=u.device)
    s = scales.to(acc)
    for slot, rows in segments(idx, pool_b.shape[0]):
        c[rows] = (u[rows] @ pool_b[slot].T).to(acc) * s[slot]
    if bias is not None:
        c += bias.to(acc)
    return c.to(u.dtype)


def multi_grads(g, x, pool_a, pool_b, u, scales, idx, dropout_p=None, seed=0):
    """(v, dA, dB) as :func:`fastlora.kernels.lora_multi_ref.multi_grads`: v (M, R) = s_i·g·B_i; dA (S, R, K) and
    dB (S, N, R) per slot; slots without rows and padding are zero."""
    acc = _acc(g.dtype)
    s = scales.to(acc)
    xd = multi_dropout(x, idx, dropout_p, seed)
    v = g.new_zeros((g.shape[0], pool_b.shape[2]))
    grad_a, grad_b = torch.zeros_like(pool_a, dtype=g.dtype), torch.zeros_like(pool_b, dtype=g.dtype)
    for slot, rows in segments(idx, pool_b.shape[0]):
        gs = g[rows]
        v[rows] = ((gs @ pool_b[slot]).to(acc) * s[slot]).to(g.dtype)
        grad_a[slot] = v[rows].T @ xd[rows]
        grad_b[slot] = ((gs.T @ u[rows]).to(acc) * s[slot]).to(g.dtype)
    return v, grad_a, grad_b


def multi_dx_term(v, pool_a, idx, dropout_p=None, seed=0) -> torch.Tensor:
    """d'_i(v·A_i): v (M, R), pool_a (S, R, K) -> (M, K); the mask of x's positions (the forward's)."""
    out = v.new_zeros((v.shape[0], pool_a.shape[2]))
    for slot, rows in segments(idx, pool_a.shape[0]):
        out[rows] = v[rows] @ pool_a[slot]
    return multi_dropout(out, idx, dropout_p, seed)
