"""Chunked linear cross-entropy: the causal-LM loss from the final hidden states and the output head, without
ever holding the [tokens, vocab] logits.

The plain path keeps the fp32 log-softmax of the logits for backward (4·V bytes per token, measured in
tests/test_chunked_ce.py) and the backward makes their gradient (another 4·V): 2 × 4 × 128,256 B ≈ 1 MiB per
token for Llama-3's vocabulary (19.1 GiB of fp32 logits at 40k tokens, and as much again for the gradient).
Here the forward runs the model with its output head bypassed (``set_output_embeddings``: the model returns the
hidden states where the logits were), keeps only the positions that have a target (prompt tokens of
instruction data cost nothing), and :class:`LinearCrossEntropy` computes the loss sum chunk by chunk; its
backward recomputes each chunk's logits and softmax for dh and (when the head trains) dW, db.
What lives at once is one chunk's logits: ``chunk`` × V × 4 bytes (the default budget: 256 MiB).

The logits are computed exactly as the plain path computes them: in the autocast dtype when autocast is on
(``h·Wᵀ`` in bf16, then fp32), else in the promoted dtype of h and W; the softmax, the loss and every gradient
sum in fp32.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from fastlora.train.data import IGNORE

CHUNK_BYTES = 2**28  # one chunk's fp32 logits: 256 MiB (523 tokens at V = 128,256; 2,097 at V = 32,000)
# configurations whose logits are not h·Wᵀ + b: the plain path handles them
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def default_chunk(vocab: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take :data:`CHUNK_BYTES` (at least 16)."""
    return max(16, CHUNK_BYTES // (4 * vocab))


def logits_bytes_saved_per_token(vocab: int) -> int:
    """Bytes per token the plain path holds and this one does not: the fp32 logits and their fp32 gradient."""
    return 2 * 4 * vocab


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of ``cross_entropy(hidden · weightᵀ + bias, targets)``, chunk by chunk: ``hidden`` (N, H),
    ``weight`` (V, H), ``bias`` (V,) or None, ``targets`` (N,) int64 in [0, V) (rows without a target are
    dropped before, by :func:`linear_cross_entropy_sum`).

    Chain rule per chunk of rows c: p = softmax(z), z = h_c Wᵀ + b; dz = g · (p − onehot(t)); dh_c = dz W;
    dW += dzᵀ h_c; db += Σ dz. Forward saves h, W, b, t only (nothing of size V); backward recomputes z.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, compute_dtype: torch.dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            total = torch.zeros((), dtype=_acc(compute_dtype), device=hidden.device)
            for s in range(0, hidden.shape[0], chunk):
                z = _logits(hidden[s : s + chunk], w, bias, compute_dtype)
                t = targets[s : s + chunk, None]
                total += (torch.logsumexp(z, -1) - z.gather(1, t)[:, 0]).sum()
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk, ctx.compute_dtype = chunk, compute_dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets = ctx.saved_tensors
        chunk, cd = ctx.chunk, ctx.compute_dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty_like(hidden) if need_h else None
        acc = _acc(cd)
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        db = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cd)
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk]
                z = _logits(h, w, bias, cd)
                dz = z.sub_(torch.logsumexp(z, -1, keepdim=True)).exp_()  # softmax in place: one (c, V) buffer
                dz[torch.arange(len(dz), device=dz.device), targets[s : s + chunk]] -= 1
                dz *= grad.to(dz.dtype)
                dzc = dz.to(cd)
                if need_h:
                    dh[s : s + chunk] = (dzc @ w).to(hidden.dtype)
                if need_w:
                    dw += (dzc.t() @ h.to(cd)).to(acc)
                if need_b:
                    db += dz.sum(0)
        dw = dw.to(weight.dtype) if need_w else None
        db = db.to(bias.dtype) if need_b else None
        return dh, dw, db, None, None, None


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of logits computed in ``dtype``: fp32, or fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def _logits(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(c, V) logits of rows ``h`` (c, H) against ``w`` (V, H) already in ``dtype``, as F.linear in that dtype
    computes them (the plain path's lm_head under autocast), then in the accumulation dtype (fp32; fp64)."""
    z = torch.nn.functional.linear(h.to(dtype), w, None if bias is None else bias.to(dtype))
    return z.to(_acc(dtype))


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    chunk: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, int]:
    """(summed next-token cross-entropy, a 0-d fp32 tensor (fp64 for fp64 logits), number of target tokens) of a
    causal batch.

    ``hidden`` (B, L, H) final hidden states (any float dtype), ``weight`` (V, H) and ``bias`` (V,) or None the
    output head, ``labels`` (B, L) int64 with ``IGNORE`` where there is nothing to learn; position t predicts
    labels[t + 1]. ``chunk`` rows per chunk (default :func:`default_chunk`); ``compute_dtype`` the dtype of
    the logits GEMM (default: the autocast dtype when autocast is on, else h's and W's promoted dtype).
    Equal to ``F.cross_entropy(h Wᵀ + b, shifted labels, ignore_index=IGNORE, reduction="sum")`` and its
    gradients with respect to ``hidden``, ``weight`` and ``bias``.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"fastlora: hidden (B, L, H) and labels (B, L) expected, got {tuple(hidden.shape)} and "
                         f"{tuple(labels.shape)}")  # fmt: skip
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"fastlora: head weight (V, {hidden.shape[-1]}) expected, got {tuple(weight.shape)}")
    labels = labels.to(hidden.device)
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], 1).reshape(-1)
    keep = (targets != IGNORE).nonzero()[:, 0]  # rows without a target add nothing: skipped, not computed
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    if compute_dtype is None:
        device = hidden.device.type
        compute_dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                         else torch.promote_types(hidden.dtype, weight.dtype))  # fmt: skip
    chunk = chunk or default_chunk(weight.shape[0])
    if chunk < 1:
        raise ValueError(f"fastlora: chunk must be >= 1, got {chunk}")
    loss = LinearCrossEntropy.apply(rows, weight, bias, targets.index_select(0, keep), chunk, compute_dtype)
    return loss, len(keep)


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The output head of a causal LM ``model`` (transformers' ``get_output_embeddings``, through a method's
    wrapper) when its logits are plain ``h·Wᵀ + b`` of an ``nn.Linear`` (a head trained beside the method
    counts: its active copy); None otherwise (no head, an adapted or quantised head, soft-capped or scaled
    logits), where the caller uses the plain path."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    current = getattr(head, "current", head)  # a head trained beside the method: its active copy
    if type(current) is not nn.Linear or not hasattr(model, "set_output_embeddings"):
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, key, None) not in (None, 1.0) for key in _LOGIT_TRANSFORMS):
        return None
    return current


class _Passthrough(nn.Module):
    """Stands in for the output head: the model returns its final hidden states as ``logits``."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@contextlib.contextmanager
def head_bypassed(model: nn.Module):
    """Within the block ``model``'s output head returns its input (the final hidden states); restored after."""
    head = model.get_output_embeddings()
    model.set_output_embeddings(_Passthrough())
    try:
        yield head
    finally:
        model.set_output_embeddings(head)
