"""LoRA starts that change the base weight, with peft's names: PiSSA, OLoRA and LoftQ.

Each takes a float (N, K) weight and returns ``(lora_A (r, K), lora_B (N, r), base)`` in fp32, where ``base`` is
what the layer keeps frozen (the residual; for LoftQ the 4-bit weight). The layer's output at the start is
``base + s·B A`` ≈ W (exactly W up to rounding for PiSSA/OLoRA, up to the fitted quantisation error for LoftQ).

* PiSSA (Meng et al. 2024): the r principal singular triplets, as peft's ``pissa_init``: W = V S Uᵀ,
  A = diag(√(S_r/s)) Uᵀ_r, B = V_r diag(√(S_r/s)), base = W − s·B A. ``"pissa_niter_K"``: the
  randomised ``torch.svd_lowrank`` with K subspace iterations (peft's fast variant; same RNG, same result).
* OLoRA (Büyükakyüz 2024): W = Q R, A = R[:r], B = Q[:, :r], base = W − s·B A (peft's ``olora_init``).
* LoftQ (Li et al. 2023): alternate Q = NF4(W − s·B A) and s·B A = rank-r SVD of W − dequant(Q), ``iters`` times,
  on fastlora's bitsandbytes-exact NF4 (:func:`fastlora.quant.quantize_4bit`). peft's ``loftq_init`` fits B A
  without the scale (it assumes s = 1); here the fit is divided by s, so A and B equal peft's when lora_alpha = r
  and W ≈ dequant(Q) + s·B A holds for any alpha.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
from torch import nn

from fastlora.modules.dora import init_magnitude
from fastlora.modules.lora import FastLoRALinear
from fastlora.modules.requant import quantize_with_residual
from fastlora.quant import QuantState, dequantize_4bit, quantize_4bit

BASE_INITS = ("pissa", "olora", "loftq")  # the init_lora_weights values (besides pissa_niter_K) that change W
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)$")


def changes_base(init_lora_weights) -> bool:
    """True for the peft init names that rewrite the base weight (PiSSA, its niter form, OLoRA, LoftQ)."""
    return isinstance(init_lora_weights, str) and (
        init_lora_weights in BASE_INITS or _PISSA_NITER.match(init_lora_weights) is not None
    )


def is_known_init(init_lora_weights) -> bool:
    return init_lora_weights in (True, False, "gaussian") or changes_base(init_lora_weights)


@torch.no_grad()
def pissa(weight: torch.Tensor, r: int, scale: float, niter: int | None = None):
    """PiSSA: (A (r, K), B (N, r), residual (N, K)) fp32 from a float (N, K) weight; ``niter``: svd_lowrank."""
    w = weight.float()
    if niter is None:
        v, s, uh = torch.linalg.svd(w, full_matrices=False)
        v, s, uh = v[:, :r], s[:r], uh[:r]
    else:
        v, s, u = torch.svd_lowrank(w, r, niter=niter)
        uh = u.T
    root = (s / scale).sqrt()
    a = root[:, None] * uh
    b = v * root[None, :]
    return a.contiguous(), b.contiguous(), w - scale * (b @ a)


@torch.no_grad()
def olora(weight: torch.Tensor, r: int, scale: float):
    """OLoRA: (A = R[:r] (r, K), B = Q[:, :r] (N, r), residual (N, K)) fp32, from W = Q R."""
    w = weight.float()
    q, rr = torch.linalg.qr(w)
    a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    return a, b, w - scale * (b @ a)


@torch.no_grad()
def loftq(
    weight: torch.Tensor,
    r: int,
    scale: float,
    iters: int = 1,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, QuantState, list[float]]:
    """LoftQ: alternate 4-bit quantisation and a rank-r SVD fit of the residual, ``iters`` times
    (:func:`fastlora.modules.requant.quantize_with_residual`), the fit split as s·B A.

    Args:
        weight: (N, K) float.  r: rank.  scale: the LoRA scaling s.  iters: peft's ``loftq_iter`` (>= 1).
        quant_type, blocksize, double_quant: the 4-bit format of the returned base (peft: nf4, 64, False).

    Returns:
        (A (r, K) fp32, B (N, r) fp32, packed, state, errors): ``packed``/``state`` the 4-bit base Q in
        ``weight``'s dtype; ``errors[i]`` = ‖W − (dequant(Q_i) + s·B_i A_i)‖_F / ‖W‖_F after iteration i.
    """
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"fastlora LoftQ: loftq_iter must be an int >= 1, got {iters!r}")
    packed, state, lo, ro, errors = quantize_with_residual(weight, r, iters, quant_type=quant_type,
                                                           blocksize=blocksize, double_quant=double_quant)  # fmt: skip
    root = 1.0 / math.sqrt(scale)
    return (ro * root).contiguous(), (lo * root).contiguous(), packed, state, errors


def base_changing_init(init_lora_weights, loftq_config: dict, weight: torch.Tensor, r: int, scale: float,
                       quantize: str | None, blocksize: int, double_quant: bool):  # fmt: skip
    """Run the init ``init_lora_weights`` names on one layer's float weight.

    Returns:
        (A, B, base, state): fp32 factors; ``base`` the new frozen weight in ``weight``'s dtype (dense), or
        packed 4-bit with ``state`` when ``quantize`` is set (the residual quantised; for LoftQ its own Q).
        Without ``quantize``, LoftQ's base is dequant(Q) in the weight's dtype, as peft keeps it.
    """
    if init_lora_weights == "loftq":
        bits = loftq_config.get("loftq_bits", 4)
        if bits != 4:
            raise ValueError(f"fastlora LoftQ: loftq_bits must be 4 (NF4), got {bits!r}")
        iters, qt, dq = int(loftq_config.get("loftq_iter", 1)), quantize or "nf4", double_quant and bool(quantize)
        a, b, packed, state, _ = loftq(weight, r, scale, iters, quant_type=qt, blocksize=blocksize, double_quant=dq)
        if quantize:
            return a, b, packed, state
        return a, b, dequantize_4bit(packed, state, weight.dtype), None
    if init_lora_weights == "olora":
        a, b, base = olora(weight, r, scale)
    else:
        m = _PISSA_NITER.match(init_lora_weights)
        a, b, base = pissa(weight, r, scale, int(m.group(1)) if m else None)
    if quantize:
        packed, state = quantize_4bit(base.to(weight.dtype), quantize, blocksize, double_quant)
        return a, b, packed, state
    return a, b, base.to(weight.dtype), None


@torch.no_grad()
def init_layer(linear: nn.Linear, config, r: int, alpha: float, name: str) -> FastLoRALinear:
    """A FastLoRALinear over ``linear`` started by ``config.init_lora_weights`` (PiSSA, OLoRA, LoftQ): A and B
    set, the base replaced (quantised when ``config.quantize``), a DoRA magnitude taken from the new base."""
    if not isinstance(linear, nn.Linear) or linear.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"fastlora: init_lora_weights={config.init_lora_weights!r} needs a float nn.Linear base (it rewrites the "
            f"weight), got {type(linear).__name__}; apply it before quantising, or to a layer without adapters"
        )
    scale = alpha / (math.sqrt(r) if config.use_rslora else r)
    a, b, base, state = base_changing_init(config.init_lora_weights, config.loftq_config, linear.weight.detach(), r,
                                           scale, config.quantize, config.blocksize, config.double_quant)  # fmt: skip
    bias = linear.bias.detach() if linear.bias is not None else None
    layer = FastLoRALinear(base, bias, r, alpha, config.lora_dropout, quant_state=state, use_rslora=config.use_rslora,
                           lora_dtype=linear.weight.dtype, adapter_name=name, use_dora=config.use_dora)  # fmt: skip
    slot = layer.adapters[name]
    slot.lora_A.copy_(a)
    slot.lora_B.copy_(b)
    if config.use_dora:
        init_magnitude(layer, slot)
    return layer


@torch.no_grad()
def convert_to_plain_lora(config, tensors, initial, initial_dir: str):
    """peft's ``path_initial_model_for_weight_conversion``: a PiSSA/OLoRA adapter trained from (A₀, B₀) on the
    residual base W − s·B₀A₀ is the plain LoRA ``s·(B A − B₀ A₀)`` of the original W, written at rank 2r:
    A' = [A; A₀], B' = [B, −B₀], r and alpha doubled (alpha × √2 with rsLoRA), so the scale is unchanged.

    Args:
        config: the adapter's LoraConfig.  tensors: its peft-named tensors.
        initial: the peft-named tensors of the adapter saved right after the start, read from ``initial_dir``.

    Returns:
        (config, tensors) of the plain LoRA adapter (``init_lora_weights=True``).
    """
    if config.use_dora:
        raise ValueError("fastlora: a DoRA adapter cannot be converted to a plain LoRA (the magnitude does not add)")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("fastlora: the conversion does not support rank_pattern/alpha_pattern with use_rslora")
    out = {}
    for key, value in tensors.items():
        if key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight"):
            if key not in initial:
                raise ValueError(f"fastlora: {initial_dir} has no {key!r}: not this adapter's initial state")
            start = initial[key].to(value.device, value.dtype)
            value = torch.cat([value, start], 0) if key.endswith("A.weight") else torch.cat([value, -start], 1)
        out[key] = value.detach().contiguous()
    grow = math.sqrt(2.0) if config.use_rslora else 2.0
    converted = dataclasses.replace(
        config, r=2 * config.r, lora_alpha=grow * config.lora_alpha, init_lora_weights=True, loftq_config={},
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
    )  # fmt: skip
    return converted, out
