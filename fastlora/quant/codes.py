"""Code tables of the 4-bit (NF4, FP4) and 8-bit dynamic formats, bit-identical to bitsandbytes.

A 4-bit value stores an *index* into a 16-entry table of fp32 codes in [-1, 1]; the weight is
``code[index] * absmax[block]``. Quantisation picks the nearest code: the scaled value is
compared with the midpoints between neighbouring codes in sorted order, a value exactly on a
midpoint going to the lower code (``torch.bucketize``'s left-closed convention, which is what
bitsandbytes' CPU path does). FP4's table is stored in bit-pattern order, not value order, so
its sorted position has to be mapped back to the stored index.
"""

from __future__ import annotations

import functools

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # blocksize of the 8-bit quantisation of absmax (double quantisation)

# NF4: quantiles of N(0, 1) with an exact zero (QLoRA, Dettmers et al. 2023), as fp32.
_NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 (e2m1, exponent bias 2) in bit-pattern order: index bit 3 is the sign, bits 0-2 encode
# 0, 0.0625, 8, 12, 4, 6, 2, 3; normalised by 12 below. Index 8 ("-0") is +0.0 in the table.
_FP4_UNNORMALISED = (
    0.0,
    0.0625,
    8.0,
    12.0,
    4.0,
    6.0,
    2.0,
    3.0,
    0.0,
    -0.0625,
    -8.0,
    -12.0,
    -4.0,
    -6.0,
    -2.0,
    -3.0,
)


@functools.cache
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        code = torch.tensor(_NF4, dtype=torch.float32)
    elif quant_type == "fp4":
        code = torch.tensor(_FP4_UNNORMALISED, dtype=torch.float32)
        code = code / code.abs().max()
    else:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return code


def get_code(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry fp32 code table of ``quant_type`` ("nf4" or "fp4"), indexed by the stored 4-bit value."""
    return _code_cpu(quant_type).to(device)


@functools.cache
def _bounds_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code_cpu(quant_type)
    # A stable sort: FP4 has two zero codes (indices 0 and 8) and the lower index comes first.
    order = torch.sort(code, stable=True).indices
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    return midpoints, order.to(torch.int32)


def get_bounds(quant_type: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantisation tables of a 4-bit type.

    Returns:
        midpoints: (15,) fp32, the decision boundaries between sorted codes.
        order: (16,) int32, ``order[i]`` is the stored index of the i-th smallest code.
    """
    midpoints, order = _bounds_cpu(quant_type)
    return midpoints.to(device), order.to(device)


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    # The signed 8-bit "dynamic" map (Dettmers 2016, as bitsandbytes builds it): a sign, a
    # unary exponent of up to 7 bits and the remaining bits as a linear fraction.
    # Generated here rather than stored; tests check it equals bitsandbytes' own table.
    max_exponent_bits, non_sign_bits = 7, 7
    values: list[float] = []
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        edges = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        values += (scale * means).tolist()  # the product is rounded to fp32, as in bitsandbytes
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def get_dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry fp32 signed dynamic map used for the 8-bit quantisation of absmax."""
    return _dynamic_map_cpu().to(device)
