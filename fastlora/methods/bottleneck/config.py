"""AdapterConfig: bottleneck-adapter hyperparameters and placement, and where each placement goes per architecture."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastlora.functional import check_activation
from fastlora.methods.files import CONFIG_NAME

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
ADAPTER_TYPE = "BOTTLENECK"  # adapter_config.json's peft_type: peft and fastlora.load reject it clearly

# Per architecture and placement: (regex over the full module path, wrapper mode).
# Modes: "output" adapts the module's output; "parallel" adds the adapter of the module's first
# input to its output; "skip_input" passes the module's residual input (2nd argument) through a
# serial adapter, i.e. a parallel adapter to the sublayer the module adds to that residual.
_LLAMA = {
    "houlsby": ((r"(.*\.)?layers\.\d+\.self_attn", "output"), (r"(.*\.)?layers\.\d+\.mlp", "output")),
    "pfeiffer": ((r"(.*\.)?layers\.\d+\.mlp", "output"),),
    "parallel": ((r"(.*\.)?layers\.\d+\.mlp", "parallel"),),
}
_BERT = {
    "houlsby": (
        (r"(.*\.)?layer\.\d+\.attention\.output\.dense", "output"),
        (r"(.*\.)?layer\.\d+\.output\.dense", "output"),
    ),
    "pfeiffer": ((r"(.*\.)?layer\.\d+\.output\.dense", "output"),),
    "parallel": ((r"(.*\.)?layer\.\d+\.output", "skip_input"),),
}
AUTO_TARGETS: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "bert": _BERT,
    "roberta": _BERT,
}


@dataclasses.dataclass
class AdapterConfig:
    """Bottleneck-adapter hyperparameters and placement.

    Attributes:
        r: bottleneck size, 1 <= r < d_model of every adapted module.
        activation: "relu", "gelu" (exact), "gelu_tanh" or "silu".
        dropout: dropout on the bottleneck activation while training, in [0, 1).
        placement: "houlsby", "pfeiffer" or "parallel" (see :mod:`fastlora.methods.bottleneck`).
        target_modules: None to choose by architecture (model_type llama, mistral, qwen2, bert,
            roberta); else module names or name suffixes ("mlp" matches "model.layers.0.mlp"), or one
            regex matched against the full name. Houlsby/Pfeiffer adapt the targets' outputs;
            "parallel" adds the adapter of a target's first input to its output.
        modules_to_save: modules trained in full beside the adapters (e.g. "classifier").
    """

    r: int = 16
    activation: str = "gelu"
    dropout: float = 0.0
    placement: str = "houlsby"
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"AdapterConfig: r must be an int >= 1, got {self.r!r}")
        check_activation(self.activation, where="AdapterConfig")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig: dropout must be in [0, 1), got {self.dropout!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"AdapterConfig: unknown placement {self.placement!r}; known: {', '.join(PLACEMENTS)}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        t = self.target_modules
        if not (t is None or isinstance(t, str) or (isinstance(t, list) and t and all(isinstance(n, str) for n in t))):
            raise ValueError(f"AdapterConfig: target_modules must be None, a regex or a list of names, got {t!r}")
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = sorted(self.modules_to_save)
        m = self.modules_to_save
        if not (m is None or (isinstance(m, list) and all(isinstance(n, str) and n for n in m))):
            raise ValueError(f"AdapterConfig: modules_to_save must be None or a list of names, got {m!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": ADAPTER_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Any, *, where: str = CONFIG_NAME) -> AdapterConfig:
        """Read :meth:`to_dict`'s output; anything else is a ``ValueError`` naming ``where``."""
        if not isinstance(d, dict):
            raise ValueError(f"fastlora: {where}: expected a JSON object, found {type(d).__name__}")
        kind = d.get("peft_type")
        if kind != ADAPTER_TYPE:
            hint = " (a LoRA adapter: load it with fastlora.load)" if kind == "LORA" else ""
            raise ValueError(f"fastlora: {where}: peft_type must be {ADAPTER_TYPE!r}, found {kind!r}{hint}")
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in fields})
        except (TypeError, ValueError) as e:
            raise ValueError(f"fastlora: {where}: {e}") from e
