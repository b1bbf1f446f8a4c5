"""Plain-PyTorch reference of the blockwise 4-bit and 8-bit formats: the spec the kernels follow.

Layout (bitsandbytes'): the tensor is flattened row-major and cut into blocks of ``blocksize``
consecutive values (the last block may be partial). Each block keeps its fp32 ``absmax``; each
value is replaced by the index of the nearest code to ``value / absmax``. Two 4-bit indices
share a byte, the first element in the high nibble; an odd count is padded with the index of 0.

Two arithmetic details matter for bit-exactness with bitsandbytes: a full block is scaled by
``value * (1 / absmax)`` while the partial last block is scaled by ``value / absmax``, and
``absmax`` is clamped to 1e-38 for the scaling only (an all-zero block stores absmax 0).
"""

from __future__ import annotations

import functools

import torch

from fastlora.quant.codes import get_bounds


def _scaled_blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale a flat fp32 tensor blockwise into [-1, 1]. Returns (scaled (n,), absmax (nblocks,))."""
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)
    if full < n:
        tail = x[full:]
        tail_max = tail.abs().amax()
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, tail / tail_max.clamp(min=1e-38)])
    return scaled.clamp(-1.0, 1.0), absmax


def quantize_4bit_ref(w: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantisation.

    Args:
        w: float tensor of any shape (fp32/fp16/bf16), n elements.
        quant_type: "nf4" or "fp4".
        blocksize: values per absmax block.

    Returns:
        packed: (ceil(n / 2),) uint8, two indices per byte, first in the high nibble.
        absmax: (ceil(n / blocksize),) fp32.
    """
    midpoints, order = get_bounds(quant_type, w.device)
    scaled, absmax = _scaled_blocks(w.reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    idx = order[torch.bucketize(scaled, midpoints)].to(torch.uint8)
    return (idx[0::2] << 4) | idx[1::2], absmax


_LUT_BINS = 65536


@functools.cache
def _blockwise_lut(code_key: tuple[float, ...]) -> torch.Tensor:
    code = torch.tensor(code_key, dtype=torch.float32)
    midpoints = (code[:-1] + code[1:]) / 2
    grid = -1.0 + (2.0 * torch.arange(_LUT_BINS, dtype=torch.float32)) / (_LUT_BINS - 1)
    return torch.bucketize(grid, midpoints).to(torch.uint8)


def quantize_blockwise_ref(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantisation against a sorted 256-entry ``code`` (used for absmax).

    Follows bitsandbytes' CPU quantiser exactly, so nested statistics are byte-identical to
    ``bnb.functional.quantize_4bit(..., compress_statistics=True)`` on CPU: the scaled value
    ``x * (1 / absmax)`` is snapped to a 65,536-point grid of [-1, 1] and takes the code nearest
    to that grid point (at most one grid step, 3e-5, from the exactly nearest code). An all-zero
    block stores index 0. bitsandbytes' CUDA and pure-PyTorch backends round differently
    (binary search, exact nearest); any of them dequantises the same way.

    Args:
        x: (n,) float tensor.
        code: (256,) fp32, sorted ascending.

    Returns:
        q: (n,) uint8 indices into ``code``.
        absmax: (ceil(n / blocksize),) fp32.
    """
    x = x.reshape(-1).float()
    n = x.numel()
    nblocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(x, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax == 0, 0.0, 1.0 / absmax)
    scaled = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    grid_index = ((scaled + 1.0) * 0.5 * float(_LUT_BINS - 1) + 0.5).long()  # fp32 steps, as bnb
    q = _blockwise_lut(tuple(code.tolist()))[grid_index]
    q[absmax == 0] = 0
    return q.reshape(-1)[:n].to(x.device), absmax


def dequantize_blockwise_ref(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_ref`: (n,) uint8 -> (n,) fp32 ``code[q] * absmax[i // blocksize]``."""
    n = q.numel()
    scale = absmax.repeat_interleave(blocksize)[:n]
    return code[q.reshape(-1).long()] * scale


def unpack_4bit_ref(packed: torch.Tensor, n: int) -> torch.Tensor:
    """(ceil(n / 2),) uint8 -> (n,) int64 indices, high nibble first."""
    b = packed.reshape(-1).view(torch.uint8).long()
    return torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n]


def dequantize_4bit_ref(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: tuple[int, ...],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Blockwise 4-bit dequantisation: ``code[index] * absmax[block]`` in fp32, then cast.

    Args:
        packed: (ceil(n / 2),) uint8 (or any storage dtype viewed as bytes).
        absmax: (ceil(n / blocksize),) fp32, already de-nested.
        code: (16,) fp32 code table.
        shape: the weight's shape, n = prod(shape).
        out_dtype: fp32, fp16 or bf16 (cast with round-to-nearest-even).

    Returns:
        Tensor of ``shape`` and ``out_dtype``.
    """
    n = 1
    for s in shape:
        n *= s
    values = code[unpack_4bit_ref(packed, n)] * absmax.repeat_interleave(blocksize)[:n]
    return values.to(out_dtype).reshape(shape)
