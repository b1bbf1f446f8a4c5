"""The multi suite: many adapters on one 4-bit base, a mixed batch (every row its own adapter) against the
ways without one, inference (no grad). Row m of a batch of M uses adapter ``m % S`` of the S adapters.

Layer cases (pass "fwd", one NF4 (K, N) layer, x (M, K), r = 16 for every adapter), ``S`` in (1, 8, 64):

    fastlora-multi        FastLoRALinear with S adapters in a LoraModel, ``model(x, adapter_index=idx)``: the
                          grouped op over the layer's persistent pool (one call for base + every adapter)
    fastlora-one          the same layer, every row on ONE adapter (the plain forward): the speed to keep
    fastlora-per-adapter  one forward per adapter over its rows (set_adapter + row subset + scatter)
    peft-mixed            peft's LoRA over bnb.nn.Linear4bit with S adapters, ``forward(x, adapter_names=...)``

Decode cases (pass "decode", a Llama-style NF4 model, B sequences, greedy ``generate`` of T new tokens with the
KV cache; tokens/s = B·T / time): fastlora-multi (``generate(..., adapter_names=...)``), fastlora-one (one
adapter for all), fastlora-per-adapter (one generate per adapter on its sequences), peft-mixed (peft's
``generate(..., adapter_names=...)`` over bnb 4-bit layers).

Guard: layer outputs against a float64 reference (per-row W + s_i B_i A_i on the dequantised weight); decode:
the first step's logits of each implementation against fastlora-per-adapter's. On a CPU the op's dispatch
picks its CPU row (the native one where built); the record's note names it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fastlora.bench import guard
from fastlora.bench.harness import Guarded, Skip, time_guarded
from fastlora.bench.records import Record
from fastlora.bench.timing import DEFAULT_TIMER, DTYPES, TimerConfig

IMPLS = ("fastlora-multi", "fastlora-one", "fastlora-per-adapter", "peft-mixed")
REFERENCES = ("fastlora-one", "peft-mixed", "fastlora-per-adapter")
ADAPTERS = (1, 8, 64)
RANK = 16


@dataclasses.dataclass(frozen=True)
class MultiCase:
    """``kind`` "layer": one (k, n) layer, m rows; "decode": a model of width k, MLP n, m sequences."""

    kind: str
    k: int
    n: int
    m: int
    adapters: int
    dtype: str
    new_tokens: int = 8

    @property
    def shape(self) -> str:
        return f"{self.k}x{self.n}"

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.shape}-M{self.m}-S{self.adapters}-{self.dtype}"


def multi_cases(*, quick: bool, cuda: bool, dtypes: Sequence[str] | None = None) -> list[MultiCase]:
    """CPU / quick: small shapes (layer 1024x1024, M 16 (the native decode row) and 64; decode: width 128, MLP 256,
    64 sequences, 4 new tokens); GPU: 8B-shape layers (4096x4096, 4096x14336) at M = 64 and 16, a 1B-like decode
    model (width 2048, MLP 5632, 64 sequences, 16 new tokens)."""
    dtypes = list(dtypes or (["bf16"] if cuda else ["fp32"]))
    if cuda and not quick:
        layers = [(4096, 4096, 64), (4096, 14336, 64), (4096, 4096, 16)]
        decode = [(2048, 5632, 64)]
    else:
        layers = [(1024, 1024, 16), (1024, 1024, 64)]
        decode = [(128, 256, 64)]
    tokens = 16 if cuda else 4
    out = [MultiCase("layer", k, n, m, s, dt) for dt in dtypes for k, n, m in layers for s in ADAPTERS]
    out += [MultiCase("decode", k, n, m, s, dt, tokens) for dt in dtypes for k, n, m in decode for s in ADAPTERS]
    return out


def _slots(m: int, adapters: int) -> torch.Tensor:
    return torch.arange(m) % adapters


# -- layer cases --------------------------------------------------------------------------------


def _layer_model(case: MultiCase, device: str, dtype: torch.dtype):
    """A LoraModel around one NF4 layer ``proj`` with S adapters (A, B random, alpha varied per adapter)."""
    from fastlora.methods.lora import LoraConfig, inject

    torch.manual_seed(0)
    host = _Holder(nn.Linear(case.k, case.n, bias=False, device=device, dtype=dtype))
    model = None
    for i in range(case.adapters):
        config = LoraConfig(r=RANK, lora_alpha=8 + i % 5, target_modules=["proj"], init_lora_weights=False,
                            quantize="nf4")  # fmt: skip
        model = inject(model or host, config, adapter_name=f"a{i}")
    return model.eval()


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _layer_reference(model, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    from fastlora.quant import dequantize_4bit

    layer = model.model.proj
    rd = guard.reference_dtype(x.dtype)
    w = dequantize_4bit(layer.weight, layer.quant_state, torch.float32, backend="torch").to(rd)
    xr = x.to(rd)
    y = xr @ w.T
    for s, adapter in enumerate(layer.adapters.values()):
        rows = slots == s
        a, b = adapter.lora_A.to(rd), adapter.lora_B.to(rd)
        y[rows] += adapter.scaling * (xr[rows] @ a.T) @ b.T
    return y


def _peft_layer(model, dtype: torch.dtype):
    """peft's LoRA layer over a bnb Linear4bit holding the same packed weight, with the same S adapters."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise Skip(f"peft is not installed ({e})") from e
    from fastlora.bench.layer import bnb_linear4bit

    layer = model.model.proj
    holder = _Holder(bnb_linear4bit(layer.weight, layer.quant_state, dtype))
    holder.is_loaded_in_4bit = True
    for name, adapter in layer.adapters.items():
        config = LoraConfig(r=adapter.r, lora_alpha=adapter.lora_alpha, target_modules=["proj"], lora_dropout=0.0)
        inject_adapter_in_model(config, holder, adapter_name=name)
        with torch.no_grad():
            holder.proj.lora_A[name].weight.copy_(adapter.lora_A)
            holder.proj.lora_B[name].weight.copy_(adapter.lora_B)
    return holder.proj.eval()


def _per_adapter(model, slots: torch.Tensor, call: Callable, out_rows: Callable) -> Callable[[], torch.Tensor]:
    """One call per adapter over its rows, scattered back in batch order."""
    names = list(model.adapter_slots())
    groups = [(names[s], (slots == s).nonzero().flatten()) for s in range(len(names))]
    groups = [(n, rows) for n, rows in groups if rows.numel()]

    def fn():
        parts = []
        for name, rows in groups:
            model.set_adapter(name)
            parts.append((rows, call(rows)))
        return out_rows(parts)

    return fn


def _scatter(parts):
    first = parts[0][1]
    out = first.new_empty((sum(r.numel() for r, _ in parts), *first.shape[1:]))
    for rows, y in parts:
        out[rows] = y
    return out


def guarded_layer(case: MultiCase, name: str, *, cuda: bool, cache: dict) -> Guarded:
    device, dtype = ("cuda" if cuda else "cpu"), DTYPES[case.dtype]
    if "model" not in cache:
        cache["model"] = _layer_model(case, device, dtype)
        gen = torch.Generator(device).manual_seed(case.m)
        cache["x"] = torch.randn(case.m, case.k, device=device, generator=gen).to(dtype)
        cache["slots"] = _slots(case.m, case.adapters).to(device)
        cache["ref"] = _layer_reference(cache["model"], cache["x"], cache["slots"])
    model, x, slots = cache["model"], cache["x"], cache["slots"]
    ref, baseline = cache["ref"], None
    if name == "fastlora-multi":
        fn = functools.partial(model, x, adapter_index=slots)
    elif name == "fastlora-one":
        model.set_adapter("a0")
        fn, ref = functools.partial(model, x), _layer_reference(model, x, torch.zeros_like(slots))
    elif name == "fastlora-per-adapter":
        fn = _per_adapter(model, slots, lambda rows: model(x[rows]), _scatter)
    elif name == "peft-mixed":
        peft_layer = _peft_layer(model, dtype)
        names = [f"a{int(s)}" for s in slots]
        fn = functools.partial(peft_layer, x, adapter_names=names)
        with torch.no_grad():  # bitsandbytes' own rounding of the 4-bit base: the bound allows twice it
            base_ref = _layer_reference(model, x, torch.full_like(slots, -1))
            baseline = guard.baseline({"y": peft_layer.base_layer(x)}, {"y": base_ref})
    else:
        raise ValueError(f"fastlora bench: unknown multi implementation {name!r}; expected one of {IMPLS}")
    with torch.no_grad():
        errors = guard.check(name, {"y": fn()}, {"y": ref}, dtype, baseline)

    def timed():
        with torch.no_grad():
            return fn()

    flops = 2 * case.m * case.k * case.n + 2 * case.m * RANK * (case.k + case.n)
    return Guarded({"fwd": timed}, [], {"fwd": (flops, None)}, errors)


# -- decode cases -------------------------------------------------------------------------------


def _decode_models(case: MultiCase, device: str, dtype: torch.dtype):
    import transformers

    from fastlora.methods.lora import LoraConfig, inject

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=case.k, intermediate_size=case.n,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    host = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    model = None
    for i in range(case.adapters):
        lora = LoraConfig(r=RANK, lora_alpha=8 + i % 5, target_modules=["q_proj", "v_proj", "down_proj"],
                          init_lora_weights="gaussian", quantize="nf4")  # fmt: skip
        model = inject(model or host, lora, adapter_name=f"a{i}")
        with torch.no_grad():  # B non-zero: every adapter changes the model
            for _, layer in model.lora_layers():
                layer.adapters[f"a{i}"].lora_B.normal_(std=0.02)
    return model.eval()


def guarded_decode(case: MultiCase, name: str, *, cuda: bool, cache: dict) -> Guarded:
    device, dtype = ("cuda" if cuda else "cpu"), DTYPES[case.dtype]
    if "model" not in cache:
        cache["model"] = _decode_models(case, device, dtype)
        gen = torch.Generator(device).manual_seed(case.m)
        cache["ids"] = torch.randint(1, 512, (case.m, 8), device=device, generator=gen)
        cache["slots"] = _slots(case.m, case.adapters)
    model, ids, slots = cache["model"], cache["ids"], cache["slots"]
    names = [f"a{int(s)}" for s in slots]
    options = dict(max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens, do_sample=False, pad_token_id=0)
    per_adapter_logits = _per_adapter(model, slots, lambda rows: model(ids[rows]).logits[:, -1], _scatter)
    if "ref" not in cache:
        with torch.no_grad():
            cache["ref"] = per_adapter_logits().float()
    ref, baseline = cache["ref"], None
    if name == "fastlora-multi":
        logits = functools.partial(lambda: model(ids, adapter_names=names).logits[:, -1])
        fn = functools.partial(model.generate, ids, adapter_names=names, **options)
    elif name == "fastlora-one":
        model.set_adapter("a0")
        logits, fn = (lambda: model(ids).logits[:, -1]), functools.partial(model.generate, ids, **options)
        with torch.no_grad():
            ref = _per_adapter(model, torch.zeros_like(slots), lambda r: model(ids[r]).logits[:, -1], _scatter)()
    elif name == "fastlora-per-adapter":
        logits = per_adapter_logits
        fn = _per_adapter(model, slots, lambda rows: model.generate(ids[rows], **options), _scatter)
    elif name == "peft-mixed":
        peft_model = _peft_model(model, case, dtype)
        logits = functools.partial(lambda: peft_model(ids, adapter_names=names).logits[:, -1])
        fn = functools.partial(peft_model.generate, input_ids=ids, adapter_names=names, **options)
        with torch.no_grad(), peft_model.disable_adapter(), model.disable():  # bitsandbytes' rounding of the base
            baseline = guard.baseline({"logits": peft_model(ids).logits[:, -1]}, {"logits": model(ids).logits[:, -1]})
    else:
        raise ValueError(f"fastlora bench: unknown multi implementation {name!r}; expected one of {IMPLS}")
    with torch.no_grad():
        errors = guard.check(name, {"logits": logits()}, {"logits": ref.float()}, dtype, baseline)

    def timed():
        with torch.no_grad():
            return fn()

    return Guarded({"decode": timed}, [], {"decode": (0, None)}, errors)


def _peft_model(model, case: MultiCase, dtype: torch.dtype):
    """peft over bnb 4-bit layers holding the same packed weights, with the same adapters."""
    try:
        import peft
    except ImportError as e:
        raise Skip(f"peft is not installed ({e})") from e
    import copy

    from fastlora.bench.layer import bnb_linear4bit

    host = copy.deepcopy(model.model)
    for path, layer in list(model.lora_layers()):
        parent, _, child = path.rpartition(".")
        setattr(host.get_submodule(parent), child, bnb_linear4bit(layer.weight, layer.quant_state, dtype))
    host.is_loaded_in_4bit = True
    first = None
    for name in model.adapter_slots():
        config = peft.LoraConfig(r=RANK, lora_alpha=model.peft_config[name].lora_alpha, lora_dropout=0.0,
                                 target_modules=["q_proj", "v_proj", "down_proj"])  # fmt: skip
        if first is None:
            first = peft.get_peft_model(host, config, adapter_name=name)
        else:
            first.add_adapter(name, config)
    with torch.no_grad():
        for path, layer in model.lora_layers():
            theirs = first.base_model.model.get_submodule(path)
            for name, adapter in layer.adapters.items():
                theirs.lora_A[name].weight.copy_(adapter.lora_A)
                theirs.lora_B[name].weight.copy_(adapter.lora_B)
    return first.eval()


# -- the suite ----------------------------------------------------------------------------------


def run(
    cases: Sequence[MultiCase],
    *,
    cuda: bool,
    timer: TimerConfig = DEFAULT_TIMER,
    impls: Sequence[str] = IMPLS,
    on_record: Callable[[Record], None] = lambda r: None,
) -> list[Record]:
    """Run the multi suite; decode records carry tokens/s (B · new tokens per second)."""
    from fastlora import dispatch

    records = []
    for case in cases:
        cache: dict = {}
        pass_ = "fwd" if case.kind == "layer" else "decode"
        for name in impls:
            shape = f"{case.kind} {case.shape} S={case.adapters}"
            base = dict(suite="multi", case=case.id, impl=name, shape=shape, m=case.m, r=RANK, dtype=case.dtype)
            guarded = guarded_layer if case.kind == "layer" else guarded_decode
            make = functools.partial(guarded, case, name, cuda=cuda, cache=cache)
            case_timer = timer if case.kind == "layer" or cuda else dataclasses.replace(timer, warmup=0, min_reps=2)
            for rec in time_guarded(base, (pass_,), make, cuda=cuda, timer=case_timer):
                if rec.ms and case.kind == "decode":
                    rec.tokens_per_s = case.m * case.new_tokens / rec.ms * 1e3
                if name == "fastlora-multi" and rec.ms:
                    choice = dispatch.choose("lora_linear_multi", "cuda" if cuda else "cpu", None, m=case.m,
                                             quantized=True)  # fmt: skip
                    rec.note = f"S={case.adapters}; op backend {choice.backend}"
                elif rec.ms:
                    rec.note = f"S={case.adapters}"
                records.append(rec)
                on_record(rec)
        del cache
        if cuda:
            torch.cuda.empty_cache()
    return records
