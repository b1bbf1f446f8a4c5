"""Loading saved tensors into a model: every name, shape and kind of dtype is checked before anything is copied,
so a file that does not fit leaves the model exactly as it was."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Expected = Mapping[str, torch.Tensor | Sequence[int]]


def check_tensors(
    expected: Expected,
    tensors: Mapping[str, torch.Tensor],
    where: str,
    *,
    owner: str = "the model",
    partial: bool = False,
    unknown: str = "key {key!r} has no place in {owner}",
    note: str = "",
) -> None:
    """Raise a ValueError (``fastlora: <where>: ...``) unless ``tensors`` fit ``expected``.

    expected: name -> the tensor to fill (its shape and dtype kind are checked) or just a shape.
    owner: who needs the tensors, in the messages ("the model", "LlamaForCausalLM").
    partial: ``tensors`` may leave out names of ``expected`` (a file of the trainable parameters only).
    unknown: the message for a name ``expected`` lacks (``{key}`` and ``{owner}`` are filled in).
    note: appended to the key-count summary of a name mismatch.
    Names are reported in sorted order, shapes in the order of ``expected``.
    A floating-point target takes any floating-point tensor (copy_ casts, e.g. an fp32 file into bf16
    factors); an integer or bool target needs the same kind.
    """
    unexpected = sorted(k for k in tensors if k not in expected)
    missing = [] if partial else sorted(k for k in expected if k not in tensors)
    counts = f" ({len(unexpected)} unexpected, {len(missing)} missing keys{note})"
    if unexpected:
        raise ValueError(f"fastlora: {where}: {unknown.format(key=unexpected[0], owner=owner)}{counts}")
    if missing:
        raise ValueError(f"fastlora: {where}: missing {missing[0]!r}, which {owner} needs{counts}")
    for key, want in expected.items():  # in the model's order: the first layer's mismatch is named first
        if key not in tensors:
            continue
        value = tensors[key]
        shape = tuple(want.shape) if isinstance(want, torch.Tensor) else tuple(want)
        if tuple(value.shape) != shape:
            raise ValueError(f"fastlora: {where}: {key} has shape {tuple(value.shape)}, {owner} needs {shape}")
        if isinstance(want, torch.Tensor) and want.is_floating_point() != value.is_floating_point():
            raise ValueError(f"fastlora: {where}: {key} is {value.dtype}, {owner} needs {want.dtype}")


@torch.no_grad()
def copy_checked(targets: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], where: str,
                 **options) -> None:  # fmt: skip
    """Copy ``tensors`` into ``targets`` (parameters, or state-dict views of them) by name after
    :func:`check_tensors` (same ``options``) passed for all of them: all or nothing."""
    check_tensors(targets, tensors, where, **options)
    for key, value in tensors.items():
        targets[key].copy_(value)
