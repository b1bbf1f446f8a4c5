"""A run's artefact on the base it was trained on: what ``fastlora eval``, ``generate`` and ``merge`` load.

A QLoRA run trains its adapter against a 4-bit base: the float checkpoint quantised while injecting. The run's
manifest (``fastlora_run.json``) records how (:func:`quantization_record`: quant type, blocksize, double
quantisation, the dtype the base was loaded in and quantised from, the compute dtype), and :func:`load_trained`
rebuilds that base exactly (the same float weights through the same quantiser give the same bytes) before the
adapter goes on, so ``eval`` on the run's validation data reproduces the validation loss ``finetune`` reported.
A manifest written before the record existed loads on the full-precision base, as fastlora did then, with a note.

:func:`probe_batch` and :func:`output_difference` measure how far a merged model's outputs are from the trained
model's (``fastlora merge`` prints it).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fastlora.methods.lora import read_lora_files
from fastlora.methods.lora.targets import lora_targets
from fastlora.methods.targets import classifier_heads
from fastlora.methods.wrapper import set_module
from fastlora.modules.lora import FastLoRALinear
from fastlora.quant import BLOCKSIZES
from fastlora.train import methods as M
from fastlora.train.data import PROMPT_TEMPLATE
from fastlora.train.guards import OutputError
from fastlora.train.runtime import load_model

QUANT_KEY = "base_quantization"  # in fastlora_run.json: how the base was quantised (null: a float base)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quantization_record(model: nn.Module, compute_dtype: torch.dtype | None) -> dict[str, Any] | None:
    """How the 4-bit bases of ``model`` were quantised, for the run's manifest; None when no base is 4-bit.

    ``{"quant_type": "nf4"|"fp4", "blocksize": int, "double_quant": bool, "dtype": the float dtype the base
    was loaded in (what was quantised, and what it dequantises to), "compute_dtype": the autocast dtype of the
    run (``dtype`` without autocast), "layers": how many linear layers are 4-bit}``.
    """
    states = [m.quant_state for m in model.modules() if isinstance(m, FastLoRALinear) and m.quant_state is not None]
    if not states:
        return None
    kinds = {(s.quant_type, s.blocksize, s.nested is not None, s.dtype) for s in states}
    if len(kinds) > 1:  # finetune quantises every target alike; a mix could not be rebuilt from one record
        raise ValueError(f"fastlora: the 4-bit layers of this model were quantised in {len(kinds)} ways: {kinds}")
    quant_type, blocksize, double_quant, dtype = kinds.pop()
    return {
        "quant_type": quant_type,
        "blocksize": int(blocksize),
        "double_quant": bool(double_quant),
        "dtype": _dtype_name(dtype),
        "compute_dtype": _dtype_name(compute_dtype or dtype),
        "layers": len(states),
    }


def read_quantization(manifest: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The manifest's quantisation record, checked (an :class:`OutputError` naming ``where`` when damaged);
    None for a float base. Raises ``KeyError`` when the manifest predates the record."""
    record = manifest[QUANT_KEY]  # KeyError: an older manifest (the caller's note)
    if record is None:
        return None
    damaged = f"{where}: {QUANT_KEY!r} is {record!r:.200}; the file is damaged or not fastlora's (rerun finetune)"
    if not isinstance(record, dict):
        raise OutputError(f"fastlora: {damaged}")
    checks = {
        "quant_type": lambda v: v in ("nf4", "fp4"),
        "blocksize": lambda v: isinstance(v, int) and not isinstance(v, bool) and v in BLOCKSIZES,
        "double_quant": lambda v: isinstance(v, bool),
        "dtype": lambda v: v in _DTYPES,
        "layers": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    }
    if any(key not in record or not ok(record[key]) for key, ok in checks.items()):
        raise OutputError(f"fastlora: {damaged}")
    return record


def describe(record: dict[str, Any]) -> str:
    """``nf4, blocksize 64, double quantisation, from float32`` (for messages)."""
    double = "double quantisation" if record["double_quant"] else "no double quantisation"
    return f"{record['quant_type']}, blocksize {record['blocksize']}, {double}, from {record['dtype']}"


@torch.no_grad()
def quantize_base(base: nn.Module, adapter_dir: str, record: dict[str, Any]) -> int:
    """Quantise the linear layers the adapter in ``adapter_dir`` targets as ``finetune`` did (in place): each
    becomes a :class:`FastLoRALinear` with the 4-bit base and no adapter yet (its LoRA factors, loaded next,
    kept in fp32 as the run's master weights were). Returns how many layers were quantised."""
    config, _ = read_lora_files(adapter_dir)
    count = 0
    with torch.random.fork_rng(devices=[]):  # the throw-away factors' initialisation leaves no trace
        for path, module in lora_targets(base, config):
            if isinstance(module, FastLoRALinear) or not isinstance(module, nn.Linear):
                continue
            layer = FastLoRALinear.from_linear(module, 1, 1.0, quant=record["quant_type"],
                                               blocksize=record["blocksize"], double_quant=record["double_quant"],
                                               lora_dtype=torch.float32, adapter_name="unused")  # fmt: skip
            layer.delete_adapter("unused")
            set_module(base, path, layer)
            count += 1
    return count


def note(message: str) -> None:
    print(f"fastlora: note: {message}", file=sys.stderr, flush=True)


def load_trained(
    adapter_dir: str,
    manifest: dict[str, Any],
    path: str,
    *,
    merge_into: str = "dequantized",
    allow_base_mismatch: bool = False,
    log: Callable[[str], None] = note,
) -> tuple[nn.Module, dict[str, Any] | None]:
    """(the model of ``adapter_dir`` on the base at ``path``, the quantisation record it was rebuilt with).

    A 4-bit run's base is rebuilt as recorded (``merge_into="original"``: the float base instead, which is
    what a merge into the original weights starts from); a float run's base is loaded in fp32 as before.
    A qlora manifest without a record (an older fastlora) loads the fp32 base, with a note through ``log``.
    """
    where = f"{adapter_dir}/fastlora_run.json"
    try:
        record = read_quantization(manifest, where)
    except KeyError:
        record = None
        if manifest["method"] == "qlora":
            log(f"{adapter_dir} was written before fastlora recorded how a QLoRA base was quantised: it is used "
                "on the full-precision base, as before (results can differ from training's; a new finetune "
                "records it)")  # fmt: skip
    quantized = record is not None and merge_into != "original"
    dtype = _DTYPES[record["dtype"]] if record is not None else torch.float32
    base = load_model(path, manifest["task"], manifest["labels"], dtype)
    if record is not None and dtype != torch.float32:  # the trained head copies were fp32 (master weights)
        for name in classifier_heads(base):
            base.get_submodule(name).float()
    if quantized:
        count = quantize_base(base, adapter_dir, record)
        if count != record["layers"]:
            raise OutputError(
                f"fastlora: {where} records {record['layers']} 4-bit layers, but the adapter targets {count} "
                f"linear layers of {path}: not the base this run was trained on"
            )
    model = M.load_artifact(base, adapter_dir, allow_base_mismatch=allow_base_mismatch)
    return model, (record if quantized else None)


# -- measuring a merge ------------------------------------------------------------------------------

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    PROMPT_TEMPLATE.format(instruction="Summarise the plot of Hamlet in one sentence."),
    "Stock markets rallied on Tuesday after the central bank held interest rates steady.",
    "def add(a, b):\n    return a + b",
)


def probe_batch(tokenizer, max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A fixed batch of :data:`PROBE_TEXTS`: right-padded ``input_ids`` and ``attention_mask`` (B, L) int64."""
    rows = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in PROBE_TEXTS]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logits(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """``model``'s fp32 logits for ``batch`` in eval mode: (B, C), or for a causal LM the (T, V) rows of the
    batch's real (unpadded) positions."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        out = model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        model.train(was)
    values = (out.logits if hasattr(out, "logits") else out[0]).float().cpu()
    if task == "causal":
        values = values[:, -batch["input_ids"].shape[1] :][batch["attention_mask"].bool()]
    return values


def output_difference(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """{"max_abs": max |other - reference|, "relative": ‖other - reference‖ / ‖reference‖} of two logit tensors."""
    diff = (other.double() - reference.double()).abs()
    scale = reference.double().norm().item()
    return {"max_abs": diff.max().item(), "relative": (diff.norm().item() / scale) if scale else math.inf}
