"""The three prompt methods' configs: prompt tuning, P-tuning and prefix tuning (P-tuning v2)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

# peft's task names, by the suffix of the transformers class they belong to.
TASKS = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}
TASK_TYPES = (*TASKS.values(), "FEATURE_EXTRACTION")


@dataclasses.dataclass
class _PromptConfig:
    """Fields shared by the three methods. ``modules_to_save``: host modules trained in full beside the
    prompt (names or name suffixes); None means the host's ``classifier`` / ``score`` if it has one
    (peft's rule for sequence classification), [] means none. ``task_type``: peft's task name written
    to adapter_config.json; None infers it from the host's class."""

    num_virtual_tokens: int
    _: dataclasses.KW_ONLY
    modules_to_save: list[str] | None = None
    task_type: str | None = None

    peft_type = ""

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"fastlora: {type(self).__name__}: num_virtual_tokens must be a positive int, got {n!r}")
        if self.modules_to_save is not None and not isinstance(self.modules_to_save, (list, tuple)):
            raise ValueError(f"fastlora: {type(self).__name__}: modules_to_save must be a list of names or None")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(
                f"fastlora: {type(self).__name__}: task_type must be one of {TASK_TYPES}, got {self.task_type!r}"
            )


@dataclasses.dataclass
class PromptTuningConfig(_PromptConfig):
    """Prompt tuning (Lester et al. 2021): n trainable input embeddings.

    init: "random" (normal, with the standard deviation of the host's word embeddings), "vocab"
    (embeddings of n random vocabulary tokens) or "text" (embeddings of ``init_text`` tokenised by the
    tokenizer at ``tokenizer_path``, special tokens included as peft does, repeated / truncated to n).
    """

    init: str = "random"
    init_text: str | None = None
    tokenizer_path: str | None = None

    peft_type = "PROMPT_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tokenizer_path, os.PathLike):
            self.tokenizer_path = os.fspath(self.tokenizer_path)  # it is written to adapter_config.json
        if self.init not in ("random", "vocab", "text"):
            raise ValueError(
                f"fastlora: PromptTuningConfig: init must be 'random', 'vocab' or 'text', got {self.init!r}"
            )
        if self.init == "text" and not (self.init_text and self.tokenizer_path):
            raise ValueError(
                "fastlora: PromptTuningConfig: init='text' needs a non-empty init_text and a tokenizer_path"
            )


@dataclasses.dataclass
class PTuningConfig(_PromptConfig):
    """P-tuning (Liu et al. 2021): the n virtual-token embeddings come out of a trained prompt encoder,
    ``encoder="mlp"`` (3 linear layers) or ``"lstm"`` (bidirectional LSTM + 2-layer MLP), peft's
    PromptEncoder layout. ``encoder_hidden_size`` defaults to the host's hidden size; ``encoder_num_layers``
    and ``encoder_dropout`` apply to the LSTM. :meth:`PromptModel.fold` drops the encoder after training.
    """

    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    peft_type = "P_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder not in ("mlp", "lstm"):
            raise ValueError(f"fastlora: PTuningConfig: encoder must be 'mlp' or 'lstm', got {self.encoder!r}")
        _check_positive("PTuningConfig", "encoder_hidden_size", self.encoder_hidden_size, optional=True)
        _check_positive("PTuningConfig", "encoder_num_layers", self.encoder_num_layers)
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(
                f"fastlora: PTuningConfig: encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}"
            )


@dataclasses.dataclass
class PrefixTuningConfig(_PromptConfig):
    """Prefix tuning (Li & Liang 2021) / P-tuning v2: trainable keys and values prepended at every
    attention layer. With ``prefix_projection`` they come out of an MLP (embedding of size kv_dim ->
    ``encoder_hidden_size`` -> tanh -> num_layers * 2 * kv_dim) that :meth:`PromptModel.fold` drops.

    init: "vocab" (default without projection): the keys and values the host itself computes for n
    random vocabulary tokens (real-word activations, which Li & Liang found train better); "random":
    peft's init (standard normal values, or the MLP's default init with projection).
    Not usable with gradient checkpointing (transformers drops the cache inside checkpointed layers).
    """

    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init: str | None = None

    peft_type = "PREFIX_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("PrefixTuningConfig", "encoder_hidden_size", self.encoder_hidden_size, optional=True)
        if self.init is None:
            self.init = "random" if self.prefix_projection else "vocab"
        if self.init not in ("vocab", "random"):
            raise ValueError(f"fastlora: PrefixTuningConfig: init must be 'vocab' or 'random', got {self.init!r}")
        if self.init == "vocab" and self.prefix_projection:
            raise ValueError(
                "fastlora: PrefixTuningConfig: init='vocab' sets the prefix itself; with prefix_projection use 'random'"
            )


def _check_positive(owner: str, name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"fastlora: {owner}: {name} must be a positive int, got {value!r}")


PromptConfig = PromptTuningConfig | PTuningConfig | PrefixTuningConfig
