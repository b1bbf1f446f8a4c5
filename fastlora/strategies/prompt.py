"""Backward-compatibility shim: prompt, P- and prefix tuning live in :mod:`fastlora.methods.prompt`."""

from fastlora.methods.prompt import (
    ENCODER_PREFIX,
    HEAD_PREFIX,
    PROMPT_KEY,
    PrefixEncoder,
    PrefixTuningConfig,
    PromptConfig,
    PromptEmbedding,
    PromptEncoder,
    PromptModel,
    PromptTuningConfig,
    PTuningConfig,
    inject_prompt,
    load_prompt,
    prefix_from_tokens,
)

__all__ = [
    "ENCODER_PREFIX",
    "HEAD_PREFIX",
    "PROMPT_KEY",
    "PTuningConfig",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptModel",
    "PromptTuningConfig",
    "inject_prompt",
    "load_prompt",
    "prefix_from_tokens",
]
