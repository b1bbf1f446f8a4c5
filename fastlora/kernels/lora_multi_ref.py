"""Plain-PyTorch reference of the mixed-adapter LoRA products: the spec :mod:`fastlora.kernels.lora_multi` follows.

Row m of x (M, K) belongs to slot i = idx[m] of a pool (i = -1: the bare base, no LoRA term):

    multi_down:   u[m]  = d_i(x[m])·A_iᵀ                        (M, R)     pool_a (S, R, K)
    multi_up:     C[m]  = s_i·u[m]·B_iᵀ + bias                  (M, N)     pool_b (S, N, R)
    multi_grads:  v[m]  = s_i·g[m]·B_i                          (M, R)
                  dB_i  = s_i·Σ_{m: idx=i} g[m]ᵀ u[m]           (S, N, R)
                  dA_i  = Σ_{m: idx=i} v[m]ᵀ d_i(x[m])          (S, R, K)
    multi_dx_term: d'_i(v[m]·A_i)                               (M, K)

d_i is inverted dropout with the counter-based mask of :func:`fastlora.functional.dropout_keep_mask` (row m,
column k of the (M, K) view; key ``seed32(seed)``) at the row's own probability p_i = dropout_p[i].

No host sync and no Python loop over slots: every product runs over all S slots at once on a "wide" operand
(row m's R values placed in columns i·R .. i·R + R of an (M, S·R) matrix, zero elsewhere), so the reference is
a handful of matmuls whatever S, float64-capable and traceable by torch.compile. It costs S times the FLOPs of
the grouped kernels: a reference, and the CPU row (S·R stays in the hundreds).
"""

from __future__ import annotations

import torch

from fastlora.functional import _mix32, seed32

__all__ = [
    "keep_rows",
    "lora_linear_multi_ref",
    "multi_down",
    "multi_dropout",
    "multi_dx_term",
    "multi_grads",
    "multi_up",
]


def keep_rows(shape: tuple[int, int], threshold: torch.Tensor, seed: int, device: torch.device) -> torch.Tensor:
    """The keep mask of an (M, C) tensor with a per-row integer threshold (M,): bit-equal, row by row, to
    :func:`fastlora.functional.dropout_keep_mask` at that row's probability."""
    m, c = shape
    r = torch.arange(m, device=device, dtype=torch.int64)[:, None]
    col = torch.arange(c, device=device, dtype=torch.int64)[None, :]
    h = _mix32(_mix32(r ^ seed32(seed)) ^ col)
    return (h >> 8) >= threshold.to(torch.int64)[:, None]


def thresholds(dropout_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(threshold int32 (S,), 1/(1-p) fp32 (S,)) of per-slot probabilities, on their device (no sync):
    ``threshold[i] == drop_threshold(float(dropout_p[i]))``."""
    p = dropout_p.double()
    return torch.round(p * (1 << 24)).to(torch.int32), (1.0 / (1.0 - p)).float()


def _slot(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot clamped to >= 0 (M,) int64, row has a LoRA term (M,) bool)."""
    idx = idx.long()
    return idx.clamp_min(0), idx >= 0


def multi_dropout(x: torch.Tensor, idx: torch.Tensor, dropout_p: torch.Tensor | None, seed: int) -> torch.Tensor:
    """d_i(x[m]) row by row: x (M, C); identity when dropout_p is None. Rows of slot -1 are returned as they are
    (they carry no LoRA term)."""
    if dropout_p is None:
        return x
    slot, live = _slot(idx)
    thr, inv = thresholds(dropout_p)
    thr = torch.where(live, thr[slot], 0)
    inv = torch.where(live, inv[slot], 1.0)
    keep = keep_rows(tuple(x.shape), thr, seed, x.device)
    return x * keep.to(x.dtype) * inv.to(x.dtype)[:, None]


def _wide(t: torch.Tensor, idx: torch.Tensor, s: int) -> torch.Tensor:
    """(M, R) -> (M, S·R): row m's values in slot idx[m]'s columns, zero elsewhere (and for idx -1)."""
    slot, live = _slot(idx)
    m, r = t.shape
    onehot = torch.nn.functional.one_hot(slot, s).to(t.dtype) * live.to(t.dtype)[:, None]
    return (onehot[:, :, None] * t[:, None, :]).reshape(m, s * r)


def _narrow(t: torch.Tensor, idx: torch.Tensor, r: int) -> torch.Tensor:
    """(M, S·R) -> (M, R): row m's columns of slot idx[m] (zero for idx -1)."""
    slot, live = _slot(idx)
    m = t.shape[0]
    got = t.view(m, t.shape[1] // max(r, 1), r).gather(1, slot[:, None, None].expand(m, 1, r))[:, 0]
    return got * live.to(t.dtype)[:, None]


def multi_down(x, pool_a, idx, dropout_p=None, seed=0) -> torch.Tensor:
    """u = d_i(x)·A_iᵀ: x (M, K), pool_a (S, R, K), idx (M,) -> (M, R) in x's dtype (zero rows for idx -1)."""
    s, r, k = pool_a.shape
    wide = multi_dropout(x, idx, dropout_p, seed) @ pool_a.reshape(s * r, k).T
    return _narrow(wide, idx, r)


def _row_scale(scales: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """s_i of each row (M,) fp32, 0 for idx -1."""
    slot, live = _slot(idx)
    return torch.where(live, scales.float()[slot], 0.0)


def multi_up(u, pool_b, scales, idx, bias=None) -> torch.Tensor:
    """C = s_i·u·B_iᵀ + bias: u (M, R), pool_b (S, N, R), scales (S,) -> (M, N) in u's dtype; s multiplies
    the product in fp32 (never an fp16/bf16 operand)."""
    s, n, r = pool_b.shape
    prod = _wide(u, idx, s) @ pool_b.permute(1, 0, 2).reshape(n, s * r).T
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    c = prod.to(acc) * _row_scale(scales, idx).to(acc)[:, None]
    if bias is not None:
        c = c + bias.to(acc)
    return c.to(u.dtype)


def multi_grads(g, x, pool_a, pool_b, u, scales, idx, dropout_p=None, seed=0):
    """(v, dA, dB): v (M, R) = s_i·g·B_i; dA (S, R, K) = Σ vᵀ·d_i(x) per slot; dB (S, N, R) = s_i·Σ gᵀ·u per
    slot. g (M, N), x (M, K), u (M, R). Slots without rows, and padding, get zeros."""
    s, n, r = pool_b.shape
    k = pool_a.shape[2]
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    row_s = _row_scale(scales, idx).to(acc)
    v = ((g @ pool_b.permute(1, 0, 2).reshape(n, s * r)).to(acc) * row_s[:, None]).to(g.dtype)
    v = _narrow(v, idx, r)
    grad_a = (_wide(v, idx, s).T @ multi_dropout(x, idx, dropout_p, seed)).view(s, r, k)
    grad_b = (g.T @ _wide(u, idx, s)).view(n, s, r).permute(1, 0, 2).to(acc) * scales.to(acc)[:, None, None]
    return v, grad_a, grad_b.to(g.dtype).contiguous()


def multi_dx_term(v, pool_a, idx, dropout_p=None, seed=0) -> torch.Tensor:
    """d'_i(v·A_i): v (M, R), pool_a (S, R, K) -> (M, K); the mask of x's positions (the forward's)."""
    s, r, k = pool_a.shape
    return multi_dropout(_wide(v, idx, s) @ pool_a.reshape(s * r, k), idx, dropout_p, seed)


def lora_linear_multi_ref(x, w, bias, pool_a, pool_b, scales, idx, dropout_p=None, seed=0) -> torch.Tensor:
    """The whole layer row by row (a Python loop: the tests' float64 spec, not for speed):
    y[m] = x[m]·Wᵀ + b + s_i·d_i(x[m])·A_iᵀ·B_iᵀ, i = idx[m], no LoRA term for i = -1. w (N, K) dense.
    Differentiable in every floating input."""
    y = torch.nn.functional.linear(x, w, bias)
    xd = multi_dropout(x, idx, dropout_p, seed)
    rows = []
    for m in range(x.shape[0]):
        i = int(idx[m])
        if i < 0:
            rows.append(y[m])
        else:
            rows.append(y[m] + scales[i].to(x.dtype) * ((xd[m] @ pool_a[i].T) @ pool_b[i].T))
    return torch.stack(rows) if rows else y
