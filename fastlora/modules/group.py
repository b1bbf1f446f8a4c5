"""Fused projection groups over :class:`FastLoRALinear` layers: the layers that read one input run as one op.

Two shapes of block, both over :func:`fastlora.ops.lora_group.lora_group`:

- :class:`SharedInputGroup` (attention's q/k/v): the parent calls ``q_proj(x)``, ``k_proj(x)``,
  ``v_proj(x)`` one after the other. A forward pre-hook on the parent sets each member's
  ``_group_route``; the first member called computes every member's output for that x in one op and
  keeps the others', which return theirs when called with the same tensor (identity); the parent's
  forward hook (``always_call``: also when the forward raises) clears the routes and the kept outputs,
  so nothing outlives the parent's forward. Any other input, or a member called twice, computes again.
- :class:`GatedMLPGroup` (gate/up + SwiGLU/GeGLU + down): the MLP's own forward is replaced by an
  instance attribute (a plain callable, not a module: children and state-dict keys unchanged) computing
  ``down_proj(act(gate_proj(x)) · up_proj(x))`` with the gate/up pair and the activation as one op.

The members are looked up by name on every forward, so replacing a child (``merge_and_unload``) or
changing a layer's state is safe: the group runs only while every member is a FastLoRALinear that is
not merged, not disabled, has no DoRA adapter, no refit residual and no mixed-batch route; otherwise
(and while torch.compile traces the attention block: the routes are Python state) each member runs its
own forward, exactly as without the group. A member whose active adapter is None (a layer without the
current adapter) joins as a frozen linear.
"""

from __future__ import annotations

import torch
from torch import nn

from fastlora.modules.dora import is_dora
from fastlora.modules.lora import FastLoRALinear
from fastlora.ops.lora_group import GroupMember, lora_group

__all__ = ["GatedMLPGroup", "SharedInputGroup", "group_members", "groupable"]


def groupable(layer: nn.Module) -> bool:
    """True when ``layer`` can run inside a group: a FastLoRALinear in its plain LoRA state."""
    if not isinstance(layer, FastLoRALinear):
        return False
    if layer.merged or layer.disabled or layer._mixed_route is not None or layer._residual is not None:
        return False
    return layer.active_adapter is None or not is_dora(layer.adapter)


def _hooked(layer: nn.Module) -> bool:
    """A hook would run if ``layer`` were called: its own forward/backward hooks or nn.Module's global ones."""
    glob = nn.modules.module
    return bool(
        layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks or layer._backward_pre_hooks
        or glob._global_forward_hooks or glob._global_forward_pre_hooks or glob._global_backward_hooks
    )  # fmt: skip


def group_members(layers: list[FastLoRALinear], x: torch.Tensor) -> tuple[torch.Tensor, list[GroupMember]] | None:
    """(x in the compute dtype, the layers as :class:`GroupMember`), as each layer's own forward would call its op
    (autocast dtype, LoRA factors cast, one dropout seed a layer drawn in order); None when a layer's own forward
    must run instead (it raises the precise error for a wrong input)."""
    for layer in layers:
        try:
            layer._check_input(x)
        except (TypeError, ValueError):
            return None
    autocast = x.device.type in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(x.device.type)
    if autocast:
        x = x.to(torch.get_autocast_dtype(x.device.type))
    dtype, members = x.dtype, []
    for layer in layers:
        weight = layer.weight
        if layer.quant_state is None and weight.dtype != dtype:
            if not autocast:
                return None
            weight = weight.to(dtype)
        bias = layer.bias.to(dtype) if layer.bias is not None else None
        if layer.active_adapter is None:
            members.append(GroupMember(weight, bias, quant_state=layer.quant_state))
            continue
        adapter = layer.adapter
        p = adapter.lora_dropout if layer.training else 0.0
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        members.append(GroupMember(weight, bias, adapter.lora_A.to(dtype), adapter.lora_B.to(dtype), adapter.scaling,
                                   layer.quant_state, p, seed))  # fmt: skip
    return x, members


def _own_forward(layer: FastLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's own forward, its group route lifted for the call."""
    route = layer._group_route
    layer._group_route = None
    try:
        return layer(x)
    finally:
        layer._group_route = route


class SharedInputGroup:
    """The children ``names`` of ``parent`` (e.g. q_proj, k_proj, v_proj) as one op per input (see the module
    docstring). Plain object: hooks on the parent, nothing in its state dict. :meth:`remove` undoes it."""

    def __init__(self, parent: nn.Module, names: list[str]) -> None:
        self.parent, self.names = parent, list(names)
        self._x: torch.Tensor | None = None
        self._outs: dict[int, torch.Tensor] = {}
        self._layers: list[FastLoRALinear] = []
        self._handles = [
            parent.register_forward_pre_hook(self._enter),
            parent.register_forward_hook(self._exit, always_call=True),
        ]

    def layers(self) -> list[nn.Module]:
        return [getattr(self.parent, n, None) for n in self.names]

    def active(self) -> bool:
        """Whether the next forward of the parent runs the group (every member groupable)."""
        return all(groupable(layer) for layer in self.layers())

    def _enter(self, module, args) -> None:
        if torch.compiler.is_compiling() or not self.active():
            return  # per-member forwards
        self._layers = self.layers()
        for layer in self._layers:
            layer._group_route = self._route

    def _exit(self, module, args, output) -> None:
        for layer in self._layers:
            if layer._group_route == self._route:
                layer._group_route = None
        self._layers, self._x = [], None
        self._outs.clear()

    def _route(self, layer: FastLoRALinear, x: torch.Tensor) -> torch.Tensor:
        if x is self._x and id(layer) in self._outs:
            return self._outs.pop(id(layer))
        built = group_members(self._layers, x)
        if built is None:
            return _own_forward(layer, x)
        xc, members = built
        outs = lora_group(xc, members)
        self._x = x
        self._outs = {id(m): y for m, y in zip(self._layers, outs, strict=True) if m is not layer}
        return outs[self._layers.index(layer)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._exit(None, None, None)


class GatedMLPGroup:
    """``mlp.forward`` replaced by ``down(act(gate(x)) · up(x))`` with gate/up/act as one op (see the module
    docstring). ``gate``, ``up``, ``down``: the children's names; ``act``: "silu", "gelu" or "gelu_tanh"."""

    def __init__(self, mlp: nn.Module, gate: str, up: str, down: str, act: str) -> None:
        self.mlp, self.gate, self.up, self.down, self.act = mlp, gate, up, down, act
        mlp.forward = self  # an instance attribute: the class's forward is the fallback

    def active(self) -> bool:
        """Every member groupable and none hooked: the fused op never calls gate/up themselves, so a forward
        (pre-)hook or backward hook on them (a user's, or a probe's) would silently not run; they run unfused."""
        layers = [getattr(self.mlp, self.gate, None), getattr(self.mlp, self.up, None)]
        return all(groupable(layer) and not _hooked(layer) for layer in layers)

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mlp = self.mlp
        built = None
        if not args and not kwargs and self.active():
            built = group_members([getattr(mlp, self.gate), getattr(mlp, self.up)], x)
        if built is None:
            return type(mlp).forward(mlp, x, *args, **kwargs)
        xc, members = built
        return getattr(mlp, self.down)(lora_group(xc, members, act=self.act))

    def remove(self) -> None:
        if self.mlp.__dict__.get("forward") is self:
            del self.mlp.forward
