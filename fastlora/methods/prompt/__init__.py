"""Prompt tuning, P-tuning and prefix tuning (P-tuning v2) on a frozen Hugging Face model.

model = inject_prompt(host, PromptTuningConfig(20, init="text", init_text="Classify:", tokenizer_path=path))
...train: only the prompt (and the head of a *ForSequenceClassification host, as peft does) trains...
model.save_adapter("out/")          # peft's layout: adapter_config.json + adapter_model.safetensors
model = load_prompt(host, "out/")   # or peft.PeftModel.from_pretrained(host, "out/")

How each method reaches the host (which is never modified, only frozen):
- Prompt tuning and P-tuning prepend n virtual-token embeddings (batch, n, hidden) to the input
  embeddings. The attention mask gets n leading ones, token-level labels n leading -100, token_type_ids
  n leading zeros; the virtual tokens sit at positions 0..n-1 and explicit position_ids move up by n.
- Prefix tuning hands per-layer key/value prefixes (batch, num_kv_heads, n, head_dim) to the host as
  an already filled transformers ``DynamicCache`` and extends the attention mask by n ones. The host's
  positions continue after the cache, so the real tokens sit at positions n.. (Llama's rotary
  positions; BERT's learned positions, as in P-tuning v2 and peft). BERT (transformers 5.24) takes the
  cache through ``BertModel.forward(cache=...)`` and writes its own keys after the prefix; a KV cache is
  the one interface every transformers attention layer shares, so no attention module is patched.

Prompt values are kept in float32 and cast to the host's dtype where they enter it. The saved file
always holds ``prompt_embeddings`` (the prompt as the host sees it, peft's key), plus the encoder's
own parameters while a P-tuning / projected-prefix encoder is not folded, plus trained heads.

config.py: the three configs; host.py: what is read off the host (dimensions, KV-cache argument, task,
heads); encoders.py: the modules that produce the prompt; inputs.py: the KV cache, mask and positions
handed to the host; files.py: peft's file layout and reading a saved prompt; model.py: :class:`PromptModel`
(forward, generate, fold, save, load), :func:`inject_prompt`, :func:`load_prompt`.
"""

from fastlora.methods.prompt.config import PrefixTuningConfig, PromptConfig, PromptTuningConfig, PTuningConfig
from fastlora.methods.prompt.encoders import PrefixEncoder, PromptEmbedding, PromptEncoder, prefix_from_tokens
from fastlora.methods.prompt.files import ENCODER_PREFIX, HEAD_PREFIX, PROMPT_KEY
from fastlora.methods.prompt.model import PromptModel, inject_prompt, load_prompt

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
