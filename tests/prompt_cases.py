"""What the prompt tests share: the tiny hosts, the five prompt configurations beside peft's, batches, a few
training steps and state snapshots. Used by test_prompt_config.py, test_prompt_model.py and test_prompt_files.py."""

import os

import pytest
import torch
from helpers import loss_before_after
from models import tiny_bert, tiny_llama

from fastlora.methods.prompt import PrefixTuningConfig, PromptTuningConfig, PTuningConfig

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

N = 5  # virtual tokens


def llama(seed=0, **overrides):
    """tests/models.py's tiny Llama, with pad token 0 and larger initial weights (a prompt can steer it)."""
    return tiny_llama(seed, **{"pad_token_id": 0, "initializer_range": 0.1, **overrides})


def bert(seed=0, **overrides):
    """tests/models.py's tiny BERT sequence classifier (3 labels)."""
    return tiny_bert(seed, **overrides)


BUILD = {"llama": llama, "bert": bert}
TASK = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS"}
METHODS = {
    "prompt": (
        lambda: PromptTuningConfig(N, init="vocab"),
        lambda t: peft.PromptTuningConfig(task_type=t, num_virtual_tokens=N),
    ),
    "ptuning-mlp": (
        lambda: PTuningConfig(N, encoder_hidden_size=24),
        lambda t: peft.PromptEncoderConfig(task_type=t, num_virtual_tokens=N, encoder_hidden_size=24),
    ),
    "ptuning-lstm": (
        lambda: PTuningConfig(N, encoder="lstm", encoder_hidden_size=12),
        lambda t: peft.PromptEncoderConfig(
            task_type=t, num_virtual_tokens=N, encoder_hidden_size=12, encoder_reparameterization_type="LSTM"
        ),
    ),
    "prefix": (lambda: PrefixTuningConfig(N), lambda t: peft.PrefixTuningConfig(task_type=t, num_virtual_tokens=N)),
    "prefix-proj": (
        lambda: PrefixTuningConfig(N, prefix_projection=True, encoder_hidden_size=24),
        lambda t: peft.PrefixTuningConfig(
            task_type=t, num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=24
        ),
    ),
}


def make_batch(arch, seed=1, batch=4, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # a right-padded sequence
    if arch == "llama":  # a task a frozen host can learn through its prompt: always continue with token 7
        labels = torch.full_like(ids, 7).masked_fill(mask == 0, -100)
    else:
        labels = torch.randint(0, 3, (batch,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def logits_of(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def train_steps(model, batch, steps=12, lr=2e-2):
    """Adam on the trainable parameters; returns the loss before and after (hosts are built in eval mode)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return loss_before_after(model, batch, torch.optim.Adam(params, lr=lr), steps)


def assert_only_changed(before, after, trained):
    """Every tensor of ``trained`` changed; every other one is bit-for-bit what it was."""
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(trained), f"changed {sorted(changed ^ set(trained))} unexpectedly"


def saved_tensors(directory):
    return safetensors_torch.load_file(os.path.join(directory, "adapter_model.safetensors"))
