"""Chunked linear cross-entropy (fastlora.train.chunked_ce) against F.cross_entropy on materialised logits: the
loss sum, the target count and every gradient (hidden states, head weight, bias), float64 and fp32, odd chunk
sizes, ignored targets; then a whole tiny Llama through the trainer's loss (loss.chunked_causal_loss_sum)."""

import pytest
import torch
import torch.nn.functional as F
from models import save_tiny_llama_dir, tiny_llama

from fastlora.train.chunked_ce import LinearCrossEntropy, default_chunk, linear_cross_entropy_sum, plain_head
from fastlora.train.data import IGNORE
from fastlora.train.loss import chunked_causal_loss_sum, forward_logits, loss_sum


def _reference(hidden, weight, bias, labels):
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    shifted, targets = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")  # fmt: skip
    return loss, int((targets != IGNORE).sum())


def _case(dtype, b=3, length=11, h=24, v=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, length, h, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g, dtype=dtype).div(h**0.5).requires_grad_()
    bias = torch.randn(v, generator=g, dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[0, :4] = IGNORE  # a prompt
    labels[1, 7:] = IGNORE  # padding
    labels[2, 5] = IGNORE
    return hidden, weight, bias, labels


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_equals_cross_entropy_on_logits(dtype, tol, chunk, with_bias):
    hidden, weight, bias, labels = _case(dtype)
    bias = bias if with_bias else None
    params = [hidden, weight] + ([bias] if with_bias else [])
    ref, ref_n = _reference(hidden, weight, bias, labels)
    ref_grads = torch.autograd.grad(ref * 1.7, params)
    got, n = linear_cross_entropy_sum(hidden, weight, bias, labels, chunk=chunk)
    assert got.dtype == ref.dtype and n == ref_n
    got_grads = torch.autograd.grad(got * 1.7, params)
    torch.testing.assert_close(got.double(), ref.double(), rtol=tol, atol=tol)
    for name, a, b in zip(("hidden", "weight", "bias")[: len(params)], got_grads, ref_grads, strict=True):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


def test_only_the_inputs_that_train_get_gradients():
    hidden, weight, bias, labels = _case(torch.float64)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    got, _ = linear_cross_entropy_sum(hidden, weight, bias, labels, chunk=5)
    got.backward()
    ref = hidden.grad.clone()
    hidden.grad = None
    _reference(hidden, weight, bias, labels)[0].backward()
    torch.testing.assert_close(ref, hidden.grad, rtol=1e-12, atol=1e-12)
    assert weight.grad is None and bias.grad is None


def test_no_targets_is_a_zero_loss_with_zero_gradients():
    hidden, weight, bias, labels = _case(torch.float64)
    got, n = linear_cross_entropy_sum(hidden, weight, bias, torch.full_like(labels, IGNORE), chunk=4)
    got.backward()
    assert n == 0 and got.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_saves_nothing_of_vocabulary_size():
    """The forward keeps h, W, b, t only: no tensor with a vocab-sized dimension per token is saved."""
    hidden, weight, bias, labels = _case(torch.float32, v=97)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        LinearCrossEntropy.apply(
            hidden.reshape(-1, 24), weight, bias, labels.reshape(-1).clamp_min(0), 8, torch.float32
        )
    assert sorted(saved) == sorted([(33, 24), (97, 24), (97,), (33,)])


def test_bad_shapes_are_named():
    hidden, weight, bias, labels = _case(torch.float32)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy_sum(hidden, weight, bias, labels[:, 1:])
    with pytest.raises(ValueError, match="head weight"):
        linear_cross_entropy_sum(hidden, weight[:, 1:], bias, labels)


def test_default_chunk_fits_the_budget():
    assert default_chunk(128_256) == 523 and default_chunk(32_000) == 2097 and default_chunk(10**9) == 16


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
def test_tiny_llama_loss_and_every_gradient(dtype, tol):
    """The trainer's chunked loss equals forward_logits + loss_sum on a tiny Llama: the loss, the count and the
    gradient of every parameter, the untied output head training too; the head is restored afterwards."""
    model = tiny_llama(dtype=dtype, train=True, tie_word_embeddings=False)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.clone()
    labels[:, :5] = IGNORE
    labels[mask == 0] = IGNORE
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    cpu = torch.device("cpu")
    logits = (
        forward_logits(model, batch, cpu, None, "causal")
        if dtype == torch.float32
        else model(input_ids=ids, attention_mask=mask).logits
    )  # forward_logits gives fp32 logits; the fp64 reference keeps fp64
    ref, ref_n = loss_sum(logits, labels, "causal")
    ref.backward()
    expected = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    head = model.lm_head
    assert plain_head(model) is head
    got, n = chunked_causal_loss_sum(model, model, batch, cpu, None, chunk=5)
    got.backward()
    assert model.lm_head is head and n == ref_n
    torch.testing.assert_close(got.double(), ref.double(), rtol=tol, atol=tol)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[k], rtol=tol, atol=tol, msg=k)


def test_scaled_logits_take_the_plain_path():
    model = tiny_llama(train=True)
    model.config.final_logit_softcapping = 30.0
    assert plain_head(model) is None
    assert chunked_causal_loss_sum(model, model, {}, torch.device("cpu"), None) is None


# -- in a run: --chunked-ce off gives the same training as on ---------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


def test_a_run_trains_the_same_with_and_without_chunks(tmp_path, llama_dir):
    import json

    from fastlora.train import TrainConfig, Trainer

    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"instruction": f"add one to {i}", "output": f"{i + 1}"}) + "\n")
    losses = {}
    for mode in ("on", "off"):
        cfg = TrainConfig(model=llama_dir, data=str(tmp_path / "d.jsonl"), output_dir=str(tmp_path / mode),
                          method="lora", chunked_ce=mode, ce_chunk_tokens=3, max_steps=3, batch_size=4, lr=1e-2,
                          log_every=1, progress=False, val_split=0.25)  # fmt: skip
        Trainer(cfg).run()
        with open(tmp_path / mode / "metrics.jsonl") as f:
            losses[mode] = [r.get("loss", r.get("val_loss")) for r in map(json.loads, f)]
    assert len(losses["on"]) >= 5
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-5)


def test_the_vocabulary_sized_activations_are_gone():
    """What the forward saves for backward, counted by the trainer's hook: the plain path keeps at least
    4·V bytes per target token (the fp32 log-softmax); the chunked path nothing of size V."""
    from fastlora.train.loss import batch_loss
    from fastlora.train.memory import SavedActivations

    vocab = 4099
    model = tiny_llama(train=True, vocab_size=vocab)
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :8] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    saved = {}
    for chunked in (False, True):
        acts = SavedActivations(model, offload=False, count=True)
        with acts.forward():
            s, n, _ = batch_loss(model, model, batch, torch.device("cpu"), None, "causal", chunked=chunked)
        s.backward()
        saved[chunked] = acts.peak
    assert n == 2 * 16
    assert saved[False] - saved[True] >= 4 * vocab * n
    assert saved[True] < 4 * vocab * n
