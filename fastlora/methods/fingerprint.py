"""A fingerprint of the base an adapter was trained on, saved beside it (fastlora_integrity.json), checked on load.

An adapter trained on one base and loaded on another of the same shapes used to load silently (and compute
nonsense). The fingerprint is taken from the base weights *as loaded* (what the adapter was trained against):

- ``shapes_sha256``: a sha256 over the logical shape of every base weight the method names, in order
  (a 4-bit weight counts as its (out, in) shape, not its packed bytes);
- ``samples``: 128 values from each of up to four of those weights (the first, the last, two between), at
  positions that depend on the weight's size only, stored exactly (float32, base64).

The values are compared, not hashed, so the same base matches in any dtype, on any device and quantised to
4 bits: in the same float dtype the values must be equal, or one side the other rounded to bf16/fp16 (a base
cast down and back up); across float dtypes that, or a relative L2 difference below :data:`FLOAT_TOLERANCE`
(bf16 and fp16 casts of one fp32 base round by at most 2⁻⁹); with a 4-bit side (NF4/FP4 round by ~10-20 %)
below :data:`QUANT_TOLERANCE`. Another base of the same shapes differs by ~140 % (independent
weights). What this cannot tell apart is a base that differs from the recorded one by less than those
tolerances in every sampled value (e.g. a light fine-tune of it loaded through 4 bits).

Weights that this process cannot read alone (FSDP2 shards, the meta device) give no fingerprint (``None``),
and a directory without one (peft's files, or fastlora's before this) is accepted without a check.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy
import torch
from torch import nn

from fastlora.methods.files import verify_files
from fastlora.quant.state import QuantState

BaseWeight = tuple[str, torch.Tensor, QuantState | None]  # (name, tensor or packed 4-bit bytes, its 4-bit state)

SAMPLES = 128
FLOAT_TOLERANCE = 0.02
QUANT_TOLERANCE = 0.4
_FLOATS = {"float32", "float16", "bfloat16", "float64"}
_MIX = 0x9E3779B97F4A7C15  # Weyl-sequence step: positions spread over the tensor, fixed for all time


def base_fingerprint(weights: Sequence[BaseWeight] | None) -> dict[str, Any] | None:
    """The fingerprint of ``weights`` (see the module docstring), or None where it cannot be taken here
    (``weights`` None: the caller cannot tell what the base was, e.g. a merge that dropped the original)."""
    if not weights or any(_unreadable(t) for _, t, _ in weights):
        return None
    shapes = [list(_shape(t, state)) for _, t, state in weights]
    samples = []
    for index in _sampled(len(weights)):
        name, tensor, state = weights[index]
        kind, values = _sample(tensor, state)
        samples.append({"index": index, "name": name, "kind": kind, "values": _encode(values)})
    return {"count": len(weights), "shapes_sha256": _sha256_json(shapes), "samples": samples}


def check_integrity(
    directory: str,
    record: dict[str, Any] | None,
    weights: Sequence[BaseWeight] | None,
    *,
    allow_base_mismatch: bool = False,
) -> None:
    """What a loader runs once names and shapes passed, before it touches the model: the files against
    their recorded sha256 (an error naming the file), then the recorded base fingerprint against
    ``weights`` (:func:`check_base_fingerprint`). ``record`` None (peft's files): nothing to check."""
    if record is None:
        return
    verify_files(directory, record)
    check_base_fingerprint(record.get("base_fingerprint"), weights, where=directory, allow_mismatch=allow_base_mismatch)


def check_base_fingerprint(
    recorded: Any, weights: Sequence[BaseWeight] | None, *, where: str, allow_mismatch: bool = False
) -> None:
    """Compare a recorded fingerprint with the base ``weights`` about to receive the adapter.

    A mismatch is a ValueError naming ``where`` and the first weight that differs; with ``allow_mismatch``
    a warning instead (a deliberate load on another base). No recorded fingerprint: nothing to check.
    """
    if recorded is None or weights is None:
        return
    try:
        problem = _difference(recorded, weights)
    except ValueError as e:
        raise ValueError(f"fastlora: {where}: {e}") from e
    if problem is None:
        return
    message = f"fastlora: {where}: the adapter was saved on another base model: {problem}"
    if allow_mismatch:
        warnings.warn(f"{message}; loading it anyway (allow_base_mismatch=True)", stacklevel=3)
        return
    raise ValueError(
        f"{message}. Load it on the base it was trained on, or pass allow_base_mismatch=True "
        "(fastlora eval/generate/merge: --allow-base-mismatch) to load it on this one anyway"
    )


def _difference(recorded: Any, weights: Sequence[BaseWeight]) -> str | None:
    """What differs between the recorded fingerprint and ``weights`` (None: the same base)."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("samples"), list):
        raise ValueError(f"the base fingerprint is not a JSON object with samples (found {recorded!r:.80})")
    if any(_unreadable(t) for _, t, _ in weights):
        return None  # nothing to compare with on this process (see base_fingerprint)
    if recorded.get("count") != len(weights):
        return f"{recorded.get('count')} adapted base weights when saved, {len(weights)} here"
    if recorded.get("shapes_sha256") != _sha256_json([list(_shape(t, s)) for _, t, s in weights]):
        return "the shapes of the adapted base weights differ"
    for sample in recorded["samples"]:
        try:
            index, kind, saved = int(sample["index"]), str(sample["kind"]), _decode(sample["values"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"the base fingerprint has a malformed sample ({e})") from e
        if not 0 <= index < len(weights):
            raise ValueError(f"the base fingerprint samples weight {index} of {len(weights)}")
        name, tensor, state = weights[index]
        here_kind, here = _sample(tensor, state)
        if here.numel() != saved.numel():
            return f"{name} sampled {saved.numel()} values when saved, {here.numel()} here"
        floats = kind in _FLOATS and here_kind in _FLOATS
        if kind.startswith("raw:") or here_kind.startswith("raw:"):
            if kind == here_kind and not torch.equal(here, saved):
                return f"{name} ({kind}) has other values"
            continue  # integer weights of unknown meaning beside another kind: nothing comparable
        if floats and _rounded_alike(here, saved):
            continue
        diff = _relative_difference(here, saved)
        if floats and kind == here_kind:  # the same dtype: equal, up to a round trip through bf16/fp16
            return f"{name} ({kind}) has other values (they differ by {diff:.2%} over {saved.numel()} samples)"
        tolerance = FLOAT_TOLERANCE if floats else QUANT_TOLERANCE
        if not diff <= tolerance:
            return (
                f"{name} differs by {diff:.0%} (relative L2 over {saved.numel()} sampled values; saved from {kind}, "
                f"here {here_kind}; the same weights differ by at most {tolerance:.0%})"
            )
    return None


# -- sampling ---------------------------------------------------------------------------------------


def _unreadable(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor") or t.device.type == "meta"  # an FSDP2 DTensor needs a collective


def _shape(tensor: torch.Tensor, state: QuantState | None) -> tuple[int, ...]:
    return tuple(state.shape) if state is not None else tuple(tensor.shape)


def _sampled(n: int) -> list[int]:
    """Which weights are sampled: the first, the last and two between (each once)."""
    return sorted({0, n // 3, (2 * n) // 3, n - 1})


def _positions(numel: int) -> torch.Tensor:
    """SAMPLES flat positions in [0, numel): all of them for a small tensor."""
    if numel <= SAMPLES:
        return torch.arange(numel)
    return torch.tensor([((i + 1) * _MIX % 2**64) % numel for i in range(SAMPLES)], dtype=torch.int64)


@torch.no_grad()
def _sample(tensor: torch.Tensor, state: QuantState | None) -> tuple[str, torch.Tensor]:
    """(kind, float32 CPU values at the sampled positions) of a weight; a 4-bit weight's values are computed
    as dequantize_4bit computes them (code · absmax in fp32) at those positions only."""
    tensor = tensor.detach()
    numel = math.prod(_shape(tensor, state))
    flat = _positions(numel).to(tensor.device)
    if state is None:
        if not tensor.is_floating_point():
            return f"raw:{str(tensor.dtype).removeprefix('torch.')}", tensor.reshape(-1)[flat].float().cpu()
        values = tensor[torch.unravel_index(flat, tensor.shape)] if tensor.dim() else tensor.reshape(1)[flat]
        return str(tensor.dtype).removeprefix("torch."), values.float().cpu()
    packed = tensor.view(torch.uint8).reshape(-1)
    byte = packed[flat // 2].to(torch.int64)
    nibble = torch.where(flat % 2 == 0, byte >> 4, byte & 0xF)  # the first element in the high nibble
    block = flat // state.blocksize
    if state.nested is None:
        absmax = state.absmax[block].float()
    else:
        nested = state.nested
        absmax = nested.code[state.absmax[block].long()] * nested.absmax[block // nested.blocksize] + nested.offset
    return state.quant_type, (state.code[nibble] * absmax).float().cpu()


def _rounded_alike(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, or one is the other rounded to bf16/fp16 (a base cast down and back up: still the same base)."""
    if torch.equal(a, b):
        return True
    return any(torch.equal(a.to(dt).float(), b) or torch.equal(b.to(dt).float(), a)
               for dt in (torch.bfloat16, torch.float16))  # fmt: skip


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = max(a.norm().item(), b.norm().item())
    return 0.0 if scale == 0 else (a - b).norm().item() / scale


def _encode(values: torch.Tensor) -> str:
    return base64.b64encode(values.numpy().astype("<f4").tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    raw = base64.b64decode(text.encode(), validate=True)
    if len(raw) % 4:
        raise ValueError(f"{len(raw)} bytes of samples, not whole float32 values")
    return torch.from_numpy(numpy.frombuffer(raw, dtype="<f4").astype(numpy.float32))


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, separators=(",", ":")).encode()).hexdigest()


def host_weights(model: nn.Module, exclude: Iterable[nn.Module] = ()) -> list[BaseWeight]:
    """The host's parameters outside ``exclude`` (what a method added or trains: adapters, trained heads and
    their copies), in the host's order; a bitsandbytes 4-bit parameter with its quant state."""
    skip = {id(p) for module in exclude for p in module.parameters()}
    out: list[BaseWeight] = []
    for name, param in model.named_parameters():
        if id(param) in skip:
            continue
        state = None
        bnb_state = getattr(param, "quant_state", None)
        if bnb_state is not None:
            try:
                state = QuantState.from_bnb(bnb_state)
            except (AttributeError, TypeError, ValueError):
                state = None  # compared as raw bytes then
        out.append((name, param, state))
    return out
