"""QuantState: everything needed to dequantise a 4-bit weight, in bitsandbytes' layout.

A frozen dataclass of our own (no bitsandbytes import needed), convertible to and from
``bitsandbytes.functional.QuantState`` and to and from the packed state-dict entries that
``bnb.nn.Linear4bit`` writes (``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, NamedTuple

import torch

from fastlora.quant.codes import BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES, get_code

_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass(frozen=True, eq=False)
class NestedState:
    """Second-level (double) quantisation of the per-block absmax.

    ``absmax_fp32 = code[q] * absmax[i // blocksize] + offset`` where ``q`` is the uint8
    ``QuantState.absmax``.

    Attributes:
        absmax: (ceil(nblocks / blocksize),) fp32.
        code: (256,) fp32 signed dynamic map.
        offset: the mean of the first-level absmax, subtracted before quantising (fp32 value).
        blocksize: always 256 in bitsandbytes' format.
    """

    absmax: torch.Tensor
    code: torch.Tensor
    offset: float
    blocksize: int = NESTED_BLOCKSIZE


class QuantArgs(NamedTuple):
    """A weight's quantisation as flat ``torch.library`` op arguments (schema types only).

    The one codec between :class:`QuantState` and the ops: :meth:`QuantState.op_args` encodes,
    :meth:`QuantState.from_op_args` decodes. A dense weight is ``quant_type=""`` with no tensors.
    The code table is not carried: the kernels use the standard NF4/FP4 tables, rebuilt on decode.
    """

    absmax: torch.Tensor | None
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    quant_type: str
    blocksize: int
    shape: list[int]
    dtype: torch.dtype
    nested_offset: float

    @classmethod
    def dense(cls, weight: torch.Tensor) -> QuantArgs:
        """The arguments of a dense (N, K) ``weight``."""
        return cls(None, None, None, "", 0, list(weight.shape), weight.dtype, 0.0)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantState:
    """How a blockwise 4-bit tensor is stored.

    Attributes:
        absmax: (nblocks,) fp32 per-block absmax, or uint8 when ``nested`` is set.
        shape: shape of the original weight, e.g. (out_features, in_features).
        dtype: dtype of the original weight (fp32/fp16/bf16); the default dequantised dtype.
        blocksize: values per block, one of 32 ... 4096.
        quant_type: "nf4" or "fp4".
        code: (16,) fp32 code table.
        nested: the double-quantisation state of ``absmax``, or None.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    nested: NestedState | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def packed_numel(self) -> int:
        """Bytes of packed 4-bit data: two values per byte."""
        return -(-self.numel // 2)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def to(self, device: torch.device | str) -> QuantState:
        nested = self.nested
        if nested is not None:
            nested = dataclasses.replace(nested, absmax=nested.absmax.to(device), code=nested.code.to(device))
        return dataclasses.replace(self, absmax=self.absmax.to(device), code=self.code.to(device), nested=nested)

    def nbytes(self) -> int:
        """Bytes of statistics (absmax, code tables), excluding the packed weight."""
        total = self.absmax.numel() * self.absmax.element_size() + self.code.numel() * 4
        if self.nested is not None:
            total += self.nested.absmax.numel() * 4 + self.nested.code.numel() * 4 + 4
        return total

    def op_args(self) -> QuantArgs:
        """This state as flat op arguments (the inverse of :meth:`from_op_args`)."""
        nested = self.nested
        return QuantArgs(
            absmax=self.absmax,
            nested_absmax=None if nested is None else nested.absmax,
            nested_code=None if nested is None else nested.code,
            quant_type=self.quant_type,
            blocksize=self.blocksize,
            shape=list(self.shape),
            dtype=self.dtype,
            nested_offset=0.0 if nested is None else float(nested.offset),
        )

    @classmethod
    def from_op_args(
        cls,
        absmax: torch.Tensor | None,
        nested_absmax: torch.Tensor | None,
        nested_code: torch.Tensor | None,
        quant_type: str,
        blocksize: int,
        shape: list[int],
        dtype: torch.dtype,
        nested_offset: float,
    ) -> QuantState | None:
        """The state that :meth:`op_args` encoded, or None for a dense weight (``quant_type=""``)."""
        if not quant_type:
            return None
        nested = None
        if nested_absmax is not None:
            nested = NestedState(absmax=nested_absmax, code=nested_code, offset=nested_offset)
        return cls(absmax, torch.Size(shape), dtype, blocksize, quant_type, get_code(quant_type, absmax.device), nested)

    def check_code_table(self, *, where: str = "QuantState") -> None:
        """The kernels use the standard NF4/FP4 tables in registers: reject any other ``quant_map``."""
        expected = get_code(self.quant_type, self.code.device)
        if not torch.equal(self.code, expected):
            raise ValueError(
                f"{where}: quant_map is not the standard {self.quant_type} table "
                f"(max difference {(self.code - expected).abs().max().item():.3g})"
            )

    def validate(self, packed: torch.Tensor | None = None, *, where: str = "QuantState") -> None:
        """Raise ``ValueError``/``TypeError`` naming the field that is inconsistent."""
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"{where}: quant_type must be one of {QUANT_TYPES}, found {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"{where}: blocksize must be one of {BLOCKSIZES}, found {self.blocksize!r}")
        if self.dtype not in _FLOAT_DTYPES.values():
            raise TypeError(f"{where}: dtype must be float32/float16/bfloat16, found {self.dtype}")
        if self.numel <= 0:
            raise ValueError(f"{where}: shape must have at least one element, found {tuple(self.shape)}")
        _check_tensor(where, "quant_map", self.code, (16,), torch.float32)
        if self.nested is None:
            _check_tensor(where, "absmax", self.absmax, (self.nblocks,), torch.float32)
        else:
            _check_tensor(where, "absmax", self.absmax, (self.nblocks,), torch.uint8)
            n2 = -(-self.nblocks // self.nested.blocksize)
            _check_tensor(where, "nested_absmax", self.nested.absmax, (n2,), torch.float32)
            _check_tensor(where, "nested_quant_map", self.nested.code, (256,), torch.float32)
            if self.nested.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"{where}: nested_blocksize must be {NESTED_BLOCKSIZE}, found {self.nested.blocksize}")
            if not math.isfinite(self.nested.offset):
                raise ValueError(f"{where}: nested_offset must be finite, found {self.nested.offset}")
        if packed is not None:
            nbytes = packed.numel() * packed.element_size()
            if nbytes != self.packed_numel:
                raise ValueError(
                    f"{where}: packed weight holds {nbytes} bytes (shape {tuple(packed.shape)}, {packed.dtype}) "
                    f"but shape {tuple(self.shape)} needs ceil({self.numel} / 2) = {self.packed_numel}"
                )
            if packed.device != self.device:
                raise ValueError(f"{where}: packed weight is on {packed.device}, statistics on {self.device}")

    # -- bitsandbytes interop -------------------------------------------------------------

    @classmethod
    def from_bnb(cls, qs: Any) -> QuantState:
        """From a ``bitsandbytes.functional.QuantState``."""
        nested = None
        if getattr(qs, "nested", False):
            nested = NestedState(
                absmax=qs.state2.absmax,
                code=qs.state2.code,
                offset=float(qs.offset),
                blocksize=int(qs.state2.blocksize),
            )
        state = cls(
            absmax=qs.absmax,
            shape=torch.Size(qs.shape),
            dtype=qs.dtype,
            blocksize=int(qs.blocksize),
            quant_type=qs.quant_type,
            code=qs.code,
            nested=nested,
        )
        state.validate(where="bitsandbytes QuantState")
        state.check_code_table(where="bitsandbytes QuantState")
        return state

    def to_bnb(self) -> Any:
        """To a ``bitsandbytes.functional.QuantState`` (needs bitsandbytes)."""
        from bitsandbytes.functional import QuantState as BnbQuantState

        state2 = offset = None
        if self.nested is not None:
            state2 = BnbQuantState(
                absmax=self.nested.absmax,
                code=self.nested.code,
                blocksize=self.nested.blocksize,
                dtype=torch.float32,
            )
            offset = torch.tensor(self.nested.offset, dtype=torch.float32, device=self.device)
        return BnbQuantState(
            absmax=self.absmax,
            shape=torch.Size(self.shape),
            code=self.code,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=self.dtype,
            offset=offset,
            state2=state2,
        )

    def state_dict(self, prefix: str = "weight.") -> dict[str, torch.Tensor]:
        """The packed state-dict entries bitsandbytes writes beside ``<prefix[:-1]>`` (the packed weight)."""
        meta: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        out = {prefix + "absmax": self.absmax, prefix + "quant_map": self.code}
        if self.nested is not None:
            out[prefix + "nested_absmax"] = self.nested.absmax
            out[prefix + "nested_quant_map"] = self.nested.code.clone()
            meta.update(
                nested_blocksize=self.nested.blocksize,
                nested_dtype="float32",
                nested_offset=self.nested.offset,
            )
        blob = json.dumps(meta).encode("utf-8")
        out[prefix + "quant_state.bitsandbytes__" + self.quant_type] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(
        cls, sd: dict[str, torch.Tensor], prefix: str = "weight.", packed: torch.Tensor | None = None
    ) -> QuantState:
        """Read the entries written by :meth:`state_dict` (or by ``bnb.nn.Linear4bit``).

        Raises ``ValueError`` naming the key when an entry is missing, corrupt or inconsistent,
        including with ``packed`` (the packed weight) when given.
        """
        where = f"4-bit state dict at {prefix!r}"
        qs_keys = [k for k in sd if k.startswith(prefix + "quant_state.bitsandbytes__")]
        if len(qs_keys) != 1:
            expected = [prefix + "quant_state.bitsandbytes__" + q for q in QUANT_TYPES]
            raise ValueError(f"{where}: expected exactly one of {expected}, found {qs_keys or 'none'}")
        qs_key = qs_keys[0]
        suffix = qs_key.rsplit("__", 1)[1]
        try:
            meta = json.loads(bytes(sd[qs_key].to("cpu", torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: {qs_key} is not the JSON blob bitsandbytes writes ({e})") from e
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: {qs_key} must decode to a JSON object, found {type(meta).__name__}")
        for field in ("quant_type", "blocksize", "dtype", "shape"):
            if field not in meta:
                raise ValueError(f"{where}: {qs_key} lacks the field {field!r} (found {sorted(meta)})")
        if meta["quant_type"] != suffix:
            raise ValueError(f"{where}: {qs_key} says quant_type {meta['quant_type']!r}, its key says {suffix!r}")
        if meta["dtype"] not in _FLOAT_DTYPES:
            raise ValueError(f"{where}: dtype must be one of {sorted(_FLOAT_DTYPES)}, found {meta['dtype']!r}")
        shape = meta["shape"]
        if not (isinstance(shape, list) and all(isinstance(s, int) and s > 0 for s in shape)):
            raise ValueError(f"{where}: shape must be a list of positive ints, found {shape!r}")
        for key in ("absmax", "quant_map"):
            if prefix + key not in sd:
                raise ValueError(f"{where}: missing {prefix + key}")
        nested = None
        if "nested_offset" in meta:
            for key in ("nested_absmax", "nested_quant_map"):
                if prefix + key not in sd:
                    raise ValueError(f"{where}: double-quantised state lacks {prefix + key}")
            for field in ("nested_blocksize", "nested_offset"):
                if field not in meta:
                    raise ValueError(f"{where}: {qs_key} lacks the field {field!r}")
            if meta.get("nested_dtype", "float32") != "float32":
                raise ValueError(f"{where}: nested_dtype must be 'float32', found {meta['nested_dtype']!r}")
            try:
                offset = float(meta["nested_offset"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: nested_offset must be a number, found {meta['nested_offset']!r}") from e
            nested = NestedState(
                absmax=sd[prefix + "nested_absmax"],
                code=sd[prefix + "nested_quant_map"],
                offset=offset,
                blocksize=meta["nested_blocksize"],
            )
        elif prefix + "nested_absmax" in sd:
            raise ValueError(f"{where}: {prefix}nested_absmax present but {qs_key} has no nested_offset")
        state = cls(
            absmax=sd[prefix + "absmax"],
            shape=torch.Size(shape),
            dtype=_FLOAT_DTYPES[meta["dtype"]],
            blocksize=meta["blocksize"],
            quant_type=meta["quant_type"],
            code=sd[prefix + "quant_map"],
            nested=nested,
        )
        state.validate(packed, where=where)
        state.check_code_table(where=where)
        return state


def _check_tensor(where: str, name: str, t: Any, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a tensor, found {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{where}: {name} must be {dtype}, found {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{where}: {name} must have shape {shape}, found {tuple(t.shape)}")
