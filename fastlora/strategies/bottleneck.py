"""Backward-compatibility shim: bottleneck adapters live in :mod:`fastlora.methods.bottleneck`."""

from fastlora.methods.bottleneck import (
    ADAPTER_TYPE,
    AUTO_TARGETS,
    PLACEMENTS,
    AdapterConfig,
    AdapterLayer,
    AdapterModel,
    inject_adapters,
    load_adapters,
)

__all__ = [
    "ADAPTER_TYPE",
    "AUTO_TARGETS",
    "PLACEMENTS",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterModel",
    "inject_adapters",
    "load_adapters",
]
