"""``fastlora merge --to-4bit``: the merged model's LoRA layers re-quantised to NF4/FP4 and saved as a
transformers bitsandbytes 4-bit checkpoint.

Format: each merged layer becomes a 4-bit :class:`~fastlora.modules.FastLoRALinear` without an adapter, whose
state dict carries ``bnb.nn.Linear4bit``'s keys (``weight`` packed uint8 (N·K/2, 1), ``weight.absmax``,
``weight.quant_map``, ``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``), and ``config.json`` gets
the ``quantization_config`` transformers writes for such a model (``quant_method: bitsandbytes``, every other
linear layer in ``llm_int8_skip_modules``). ``AutoModelFor*.from_pretrained(out)`` (so ``fastlora generate
--model out``) loads it with bitsandbytes' ``Linear4bit`` layers, on a CPU too.

A refit residual (``--refit-rank k``: Q + L R ≈ the merged W, :func:`fastlora.modules.requant.requantize_merged`)
has no place in that format; it is written as a rank-k peft LoRA adapter (``lora_A`` = R (k, K), ``lora_B`` =
L (N, k), ``lora_alpha`` = r = k so the scaling is 1) in ``out/residual/``, which peft loads over the 4-bit
model (``PeftModel.from_pretrained(model, out + "/residual")``) to give x Qᵀ + (x Rᵀ) Lᵀ exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
from collections.abc import Iterator

import torch
from torch import nn

RESIDUAL_DIR = "residual"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def capture_inputs(layers: dict[str, nn.Module], rows: int = 512) -> tuple[dict[str, list], list]:
    """Forward pre-hooks that keep the first ``rows`` input rows (fp32, (rows, K)) of each layer of ``layers``
    (path -> module); returns (path -> list that receives the tensor, hook handles to remove)."""
    seen: dict[str, list] = {path: [] for path in layers}
    handles = []
    for path, module in layers.items():

        def hook(module, args, path=path):
            if not seen[path]:
                seen[path].append(args[0].detach().reshape(-1, args[0].shape[-1])[:rows].float().clone())

        handles.append(module.register_forward_pre_hook(hook))
    return seen, handles


@torch.no_grad()
def requantize_layers(
    model: nn.Module,
    paths: list[str],
    *,
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    refit_rank: int = 0,
    refit_iters: int = 1,
    samples: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Replace each merged ``nn.Linear`` at ``paths`` in ``model`` by a 4-bit FastLoRALinear (in place).

    Args:
        model: the merged model (``LoraModel.merge_and_unload()``); the layers at ``paths`` are ``nn.Linear``
            whose weight (N, K) is the merged W in the model's dtype (the dtype the 4-bit state records).
        quant_type, blocksize, double_quant: the 4-bit format.  refit_rank, refit_iters: a rank-k residual
            (0: the plain re-quantisation).  samples: path -> (M, K) layer inputs for the output error report.

    Returns:
        (path -> requantize_merged's report, path -> (R (k, K), L (N, k)) fp32 residual; empty without a refit).
    """
    from fastlora.methods.wrapper import set_module
    from fastlora.modules import FastLoRALinear
    from fastlora.modules.requant import requantize_merged

    reports, residuals = {}, {}
    for path in paths:
        linear = model.get_submodule(path)
        fmt = types.SimpleNamespace(quant_type=quant_type, blocksize=blocksize, dtype=linear.weight.dtype,
                                    nested=True if double_quant else None)  # fmt: skip
        sample = (samples or {}).get(path)
        packed, state, residual, report = requantize_merged(linear.weight.float(), fmt, refit_rank, refit_iters,
                                                            sample)  # fmt: skip
        # the code tables are shared module-wide tensors; a checkpoint needs each layer's own (safetensors refuses
        # one storage under several names)
        nested = state.nested and dataclasses.replace(state.nested, code=state.nested.code.clone())
        state = dataclasses.replace(state, code=state.code.clone(), nested=nested)
        layer = FastLoRALinear(packed, linear.bias, 1, 1.0, quant_state=state, adapter_name="unused", init="none")
        layer.delete_adapter("unused")
        set_module(model, path, layer)
        reports[path] = report
        if residual is not None:
            residuals[path] = residual
    return reports, residuals


def residual_hooks(model: nn.Module, residuals: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
    """Forward hooks adding ``(x Rᵀ) Lᵀ`` to each re-quantised layer (what the saved residual adapter adds)."""
    handles = []
    for path, (r, lo) in residuals.items():

        def hook(module, args, out, r=r, lo=lo):
            x = args[0]
            return out + ((x.float() @ r.T) @ lo.T).to(out.dtype)

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    return handles


def _linear_paths(model: nn.Module) -> Iterator[str]:
    from fastlora.modules import FastLoRALinear

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not isinstance(module, FastLoRALinear):
            yield name


def quantization_config(model: nn.Module, *, quant_type: str, double_quant: bool, dtype: torch.dtype) -> dict:
    """The ``quantization_config`` of config.json that makes transformers load the 4-bit layers with bitsandbytes
    and every remaining ``nn.Linear`` (the layers the adapter did not target, the heads) as it is."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": _DTYPE_NAMES[dtype],
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": sorted(_linear_paths(model)),
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def write_quantization_config(directory: str, config: dict) -> None:
    """Add ``config`` as ``quantization_config`` to ``directory/config.json`` (written by save_pretrained)."""
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as f:
        content = json.load(f)
    content["quantization_config"] = config
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=True)


def save_residual(directory: str, residuals: dict[str, tuple[torch.Tensor, torch.Tensor]], base: str) -> str:
    """Write the refit residuals as a peft LoRA adapter (scaling 1) in ``directory/residual``; returns its path."""
    from safetensors.torch import save_file

    rank = next(iter(residuals.values()))[0].shape[0]
    out = os.path.join(directory, RESIDUAL_DIR)
    os.makedirs(out)
    tensors = {}
    for path, (r, lo) in residuals.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = r.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = lo.contiguous()
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none",
              "target_modules": sorted(residuals), "base_model_name_or_path": base, "fan_in_fan_out": False,
              "init_lora_weights": True, "use_rslora": False, "use_dora": False, "task_type": None,
              "inference_mode": True, "modules_to_save": None}  # fmt: skip
    with open(os.path.join(out, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return out


def summarize(reports: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean and max over layers of each number in the per-layer reports."""
    out: dict[str, float] = {}
    for key in sorted({k for r in reports.values() for k in r}):
        values = [r[key] for r in reports.values() if key in r]
        out[f"{key}_mean"] = sum(values) / len(values)
        out[f"{key}_max"] = max(values)
    return out


def print_report(quant: dict, reports: dict, refit_rank: int, refit_difference: dict | None) -> None:
    """Print what --to-4bit did: the format, each layer's output error on the probe inputs before and after a refit."""
    double = "double quantisation" if quant["double_quant"] else "no double quantisation"
    print(f"fastlora: {len(reports)} merged layers re-quantised to {quant['quant_type']} (blocksize "
          f"{quant['blocksize']}, {double}); transformers loads the directory with bitsandbytes")  # fmt: skip
    for path, rep in reports.items():
        line = f"fastlora:   {path}: weight error {rep['requant_rel_error']:.4g}"
        if "sample_rel_error_before" in rep:
            line += f", output error on the probe inputs {rep['sample_rel_error_before']:.4g}"
            if refit_rank:
                line += f" -> {rep['sample_rel_error_after']:.4g} with the rank-{refit_rank} residual"
        print(line)
    if refit_difference is not None:
        print(f"fastlora: with the residual the logits differ from the trained model's by at most "
              f"{refit_difference['max_abs']:.3g} (relative {refit_difference['relative']:.3g}); it is saved as a "
              f"peft LoRA adapter in {RESIDUAL_DIR}/ (peft's PeftModel.from_pretrained loads it over the 4-bit "
              "model; transformers alone and fastlora generate --model use the 4-bit model without it)")  # fmt: skip
