"""Backward-compatibility shim: the wrapped-model base lives in :mod:`fastlora.methods.wrapper`, the parameter
counts in :mod:`fastlora.methods.report`."""

from fastlora.methods.report import count_parameters
from fastlora.methods.wrapper import ModulesToSave, WrappedModel, set_module

__all__ = ["ModulesToSave", "WrappedModel", "count_parameters", "set_module"]
