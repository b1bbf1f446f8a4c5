"""LoraConfig: peft-compatible LoRA hyperparameters, read from and written to ``adapter_config.json``."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from fastlora.methods.files import write_json
from fastlora.methods.lora.init import changes_base, is_known_init
from fastlora.modules.lora_adapter import check_lora_hparams

# Fields peft's LoraConfig has that fastlora also honours; everything written to adapter_config.json.
_PEFT_FIELDS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "bias",
    "use_rslora",
    "modules_to_save",
    "task_type",
    "init_lora_weights",
    "base_model_name_or_path",
    "inference_mode",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "use_dora",
    "loftq_config",
)


@dataclasses.dataclass
class LoraConfig:
    """LoRA hyperparameters with peft's field names and meanings.

    Attributes:
        r: rank.  lora_alpha: scaling numerator (s = alpha / r, or alpha / sqrt(r) with use_rslora).
        lora_dropout: dropout on the LoRA path, in [0, 1).
        target_modules: module names to adapt: a list of names or name suffixes ("q_proj" matches
            "model.layers.0.self_attn.q_proj"), a regex matched against the full name, or
            "all-linear" (every linear layer except the output head).
        modules_to_save: modules trained in full beside the adapter (e.g. "classifier").
        rank_pattern / alpha_pattern: per-module r / alpha overrides, keyed like peft's.
        init_lora_weights: True (A Kaiming-uniform, B zero), "gaussian", or False (B random too); or a start that
            rewrites the base (see :mod:`fastlora.methods.lora.init`): "pissa", "pissa_niter_K", "olora",
            "loftq" (with ``loftq_config={"loftq_bits": 4, "loftq_iter": K}``, peft's LoftQConfig fields).
        use_dora: DoRA (weight-decomposed LoRA): a trained magnitude per output row,
            ``lora_magnitude_vector`` in the adapter files as peft saves it.
        quantize, blocksize, double_quant: fastlora only, not saved: turn float bases into 4-bit
            ("nf4"/"fp4") while injecting (QLoRA from a float model).
        fuse_blocks: fastlora only, not saved: run the projections that read one input as one op (q/k/v; gate/up
            with the MLP's SwiGLU/GeGLU) in detected blocks (True), not at all (False), or in the blocks a list of
            specs names (:mod:`fastlora.methods.lora.groups`).
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = "all-linear"
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    init_lora_weights: bool | str = True
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    use_dora: bool = False
    loftq_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    quantize: str | None = None
    blocksize: int = 64
    double_quant: bool = True
    fuse_blocks: bool | list[dict[str, Any]] = True

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if self.bias != "none":
            raise ValueError(
                f"LoraConfig: bias={self.bias!r} is not supported; fastlora keeps base biases frozen ('none')"
            )
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig: use_dora must be True or False, got {self.use_dora!r}")
        if self.fan_in_fan_out:
            raise ValueError("LoraConfig: fan_in_fan_out=True (GPT-2 Conv1D layers) is not supported")
        if not is_known_init(self.init_lora_weights):
            raise ValueError(
                "LoraConfig: init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_K', 'olora' or "
                f"'loftq', got {self.init_lora_weights!r}"
            )
        if not isinstance(self.loftq_config, dict):  # peft's LoftQConfig object: its fields
            self.loftq_config = dict(vars(self.loftq_config))
        if self.init_lora_weights == "loftq" and not self.loftq_config:
            raise ValueError("LoraConfig: init_lora_weights='loftq' needs loftq_config (e.g. {'loftq_iter': 1})")
        if self.quantize not in (None, "nf4", "fp4"):
            raise ValueError(f"LoraConfig: quantize must be None, 'nf4' or 'fp4', got {self.quantize!r}")
        # the layer checks r against its shape when the adapter is added; here what needs no model
        check_lora_hparams(None, None, self.r, self.lora_alpha, self.lora_dropout, where="LoraConfig")
        for field in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, field), dict):
                raise ValueError(f"LoraConfig: {field} must be a dict, got {getattr(self, field)!r}")
        for pattern, r in self.rank_pattern.items():
            check_lora_hparams(None, None, r, 1.0, 0.0, where=f"LoraConfig: rank_pattern[{pattern!r}]")
        for pattern, alpha in self.alpha_pattern.items():
            check_lora_hparams(None, None, 1, alpha, 0.0, where=f"LoraConfig: alpha_pattern[{pattern!r}]")

    @property
    def init(self) -> str:
        """The FastLoRALinear ``init`` name for ``init_lora_weights``."""
        if changes_base(self.init_lora_weights):
            return "kaiming"  # drawn, then overwritten by the base-changing start (methods/lora/init.py)
        return {True: "kaiming", False: "none", "gaussian": "gaussian"}[self.init_lora_weights]

    def r_and_alpha(self, name: str) -> tuple[int, float]:
        """Rank and alpha of module ``name``, after rank_pattern / alpha_pattern (peft's suffix-regex rule)."""
        return int(_pattern_value(self.rank_pattern, name, self.r)), float(
            _pattern_value(self.alpha_pattern, name, self.lora_alpha)
        )

    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json content peft reads (``peft_type`` LORA)."""
        out = {field: getattr(self, field) for field in _PEFT_FIELDS}
        out.update(peft_type="LORA", layers_to_transform=None, layers_pattern=None, revision=None)
        return out

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], *, where: str = "adapter_config.json") -> LoraConfig:
        """Read a peft LoRA config dict; features fastlora does not implement raise a ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, found {type(d).__name__}")
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{where}: peft_type must be 'LORA', found {d.get('peft_type')!r}")
        for flag in ("use_qalora", "lora_bias"):
            if d.get(flag):
                raise ValueError(f"{where}: {flag}=True is not supported by fastlora")
        for field in ("layers_to_transform", "layer_replication", "target_parameters"):
            if d.get(field):
                raise ValueError(f"{where}: {field} is not supported by fastlora (found {d[field]!r})")
        if "r" not in d or "target_modules" not in d:
            raise ValueError(f"{where}: missing 'r' or 'target_modules' (found keys {sorted(d)})")
        kwargs = {k: d[k] for k in _PEFT_FIELDS if k in d and d[k] is not None}
        kwargs.pop("inference_mode", None)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from e

    def save(self, path: str) -> None:
        """Write :meth:`to_peft_dict` to ``path`` (an adapter_config.json), atomically."""
        write_json(path, self.to_peft_dict())


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default
