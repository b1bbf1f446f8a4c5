"""Memory options of a run: the optimiser (torch AdamW or bitsandbytes' 8-bit and paged AdamW), activations saved
for backward kept in CPU memory, and exact readings of what each holds.

Per trainable parameter, torch's AdamW keeps two fp32 moments: 8 bytes. bitsandbytes' ``AdamW8bit`` keeps them
as uint8 with one fp32 absmax per 256 values: 2.03 bytes (tensors under 4,096 values stay 32-bit, as
bitsandbytes chooses: a small tensor quantises poorly and saves little). The paged variants put the state in
CUDA unified memory that the driver pages out to the host under pressure; on a CPU bitsandbytes runs them
unpaged (it warns once), so ``--optim`` is honoured on every device and a run's result never depends on a
silent substitution.

On a CPU the summary's memory column gives the optimiser state (:func:`optimizer_state_bytes`, every tensor
of ``optimizer.state`` once) and the activations one forward saved for backward (:class:`SavedActivations`,
counted by a saved-tensors hook as they are saved); on a GPU the allocator's peak says it all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fastlora.train.runtime import TrainingError

_BNB = {"adamw8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw8bit": "PagedAdamW8bit"}


def make_optimizer(groups: list[dict], name: str, lr: float) -> torch.optim.Optimizer:
    """``name`` ("adamw": torch's; "adamw8bit", "paged_adamw", "paged_adamw8bit": bitsandbytes') over the
    parameter ``groups`` (each with its own ``lr``/``weight_decay``) at base rate ``lr``."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name not in _BNB:
        raise TrainingError(f"fastlora: --optim {name!r} unknown (adamw, {', '.join(_BNB)})")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise TrainingError(f"fastlora: --optim {name} needs bitsandbytes ({e}); pip install bitsandbytes, or "
                            "use --optim adamw") from e  # fmt: skip
    return getattr(bnb.optim, _BNB[name])(groups, lr=lr)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, 8-bit codes, their scales), each storage once."""
    seen: dict[tuple[torch.device, int], int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.numel():
                local = value.to_local() if hasattr(value, "to_local") else value  # FSDP2: this rank's shard
                storage = local.untyped_storage()
                seen[(local.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def _storage_ptr(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage (a DTensor's local shard for FSDP2 parameters), or None where it has none
    (a tensor subclass without one)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    try:
        return local.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class SavedActivations:
    """Saved-tensors hooks for the forward of a micro-batch: count the bytes autograd saves for backward
    (each storage once, parameters and buffers excluded) and, when ``offload``, keep them in CPU memory
    (pinned when the model is on a GPU, copied back at the backward), as ``torch.autograd.graph.save_on_cpu``.

    ``peak`` is the most bytes one forward saved (its activations live until its backward frees them).
    With activation checkpointing only the checkpointed layers' inputs are saved, and so offloaded.
    """

    def __init__(self, model: nn.Module, *, offload: bool, count: bool) -> None:
        self.offload, self.count = offload, count
        self.peak = 0
        self._fixed = {_storage_ptr(t) for t in (*model.parameters(), *model.buffers())} - {None}
        self._seen: set[int] = set()
        self._bytes = 0

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """The block of one forward whose saved tensors are counted (and offloaded)."""
        if not (self.offload or self.count):
            yield
            return
        self._seen, self._bytes = set(), 0
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield
        self.peak = max(self.peak, self._bytes)

    def _pack(self, t: torch.Tensor):
        ptr = _storage_ptr(t)
        if ptr is None or ptr in self._fixed:
            return t
        if self.count and ptr not in self._seen:
            self._seen.add(ptr)
            self._bytes += (t.to_local() if hasattr(t, "to_local") else t).untyped_storage().nbytes()
        if not self.offload or t.device.type == "cpu":
            return t
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return t.device, host

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)


def memory_note(device: torch.device, kind: str, optimizer: torch.optim.Optimizer, acts: SavedActivations,
                offload: bool) -> str:  # fmt: skip
    """The summary's memory column beside the peak: on a CPU the optimiser state and the saved activations in
    MiB (exact, from the tensors), on a GPU the allocator's peak alone (``kind``)."""
    if device.type == "cuda":
        return kind
    where = "offloaded" if offload else "saved"
    return (f"{kind}; optimiser state {optimizer_state_bytes(optimizer) / 2**20:,.2f} MiB, "
            f"activations {where} {acts.peak / 2**20:,.2f} MiB")  # fmt: skip
