"""The model suite: one training step (forward + backward + AdamW) of a Llama-style model, LoRA on every linear.

A ``transformers.LlamaForCausalLM`` is built from a config with random weights (no download) in the run
dtype; every implementation starts from a copy of the same weights and trains r = 16, alpha = 32 LoRA
factors on all linear layers but the output head, on the same random tokens (labels = inputs):

    fastlora-nf4   fastlora.inject(model, r=16, target_modules="all-linear", quantize="nf4", fuse_blocks=False)
                   (QLoRA, one op per projection)
    fastlora-nf4-fused-blocks  the same with fused blocks (inject's default): q/k/v one op, gate/up + SwiGLU one op
    peft+bnb-nf4   every linear replaced by bnb.nn.Linear4bit with the same NF4 bytes (blocksize 64, double
                   quantisation), then peft.get_peft_model: the usual QLoRA recipe (without gradient
                   checkpointing or prepare_model_for_kbit_training, which would change what is compared)
    fastlora       fastlora.inject without quantisation: bf16 LoRA, one op per projection
    fastlora-fused-blocks  the same with fused blocks
    peft           peft.get_peft_model on the bf16 model: bf16 LoRA (peft keeps its LoRA factors in fp32)

Guard, before timing: one forward + backward on a short sequence; the loss and the gradient of every
LoRA factor, layer by layer, against an fp32 plain-PyTorch LoRA on the same (dense or dequantised)
weights, within twice plain PyTorch's own error in the run dtype (see fastlora.bench.guard).
Timing: wall clock around whole synchronised steps (2 warm-up steps: the optimiser state exists before
timing). Peak memory (CUDA): the highest allocation during a step above what was allocated before the
implementation was built, i.e. its weights + LoRA + optimiser state + activations + gradients.

    FLOPs per step = T·(4·P_frozen + 6·P_lora) + 12·B·S²·d·L   (T = B·S tokens; frozen linears incl. the head
                     get no weight gradient; attention scores and values counted in full, not causal-halved)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from fastlora.bench import guard
from fastlora.bench.cases import ModelCase
from fastlora.bench.harness import Guarded, Skip
from fastlora.bench.layer import bnb_linear4bit
from fastlora.bench.records import FAILED, SKIPPED, Record
from fastlora.bench.timing import DTYPES, TimerConfig, measure

IMPLS = ("fastlora-nf4", "fastlora-nf4-fused-blocks", "peft+bnb-nf4", "fastlora", "fastlora-fused-blocks", "peft")
REFERENCES = ("peft+bnb-nf4", "peft")
STEP_TIMER = TimerConfig(warmup=2, min_reps=5, max_reps=20, rep_ms=3000.0)
QUICK_STEP_TIMER = TimerConfig(warmup=2, min_reps=5, max_reps=10, rep_ms=500.0)
ALPHA_PER_R = 2.0


def base_model(case: ModelCase, device: str) -> nn.Module:
    """The host model in the case's dtype, random weights from seed 0, no LoRA."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(case.llama_config(), dtype=DTYPES[case.dtype])
    return model.eval().requires_grad_(False)  # dropout-free; the configs have no dropout anyway


def target_paths(model: nn.Module) -> list[str]:
    """Every nn.Linear but the output head: the layers "all-linear" selects."""
    head = model.get_output_embeddings()
    return [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


class PlainLoRA(nn.Module):
    """The reference: ``linear(x) + s · (x Aᵀ) Bᵀ`` in plain PyTorch."""

    def __init__(self, linear: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.linear, self.scale = linear, scale
        self.lora_A, self.lora_B = nn.Parameter(a.clone()), nn.Parameter(b.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.scale * (x @ self.lora_A.T) @ self.lora_B.T


def lora_init(model: nn.Module, r: int, seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """path -> (A (r, in), B (out, r)) fp32, the same for every implementation; B non-zero so dA is too."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path in target_paths(model):
        lin = model.get_submodule(path)
        a = (torch.rand(r, lin.in_features, generator=gen) * 2 - 1) / math.sqrt(lin.in_features)
        b = (torch.rand(lin.out_features, r, generator=gen) * 2 - 1) * (0.1 / math.sqrt(r))
        out[path] = (a, b)
    return out


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _quantised(w: torch.Tensor):
    from fastlora.quant import quantize_4bit

    return quantize_4bit(w, "nf4", 64, double_quant=True)


def lora_factors(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, nn.Parameter]]:
    """(host path, A, B) of every LoRA layer of a fastlora LoraModel, a peft model or a reference model."""
    from fastlora.methods.lora import LoraModel

    if isinstance(model, LoraModel):
        for path, layer in model.lora_layers():
            yield path, layer.lora_A, layer.lora_B
        return
    host = model.base_model.model if hasattr(model, "peft_config") else model
    for path, module in host.named_modules():
        if isinstance(module, PlainLoRA):
            yield path, module.lora_A, module.lora_B
        elif hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict) and "default" in module.lora_A:
            yield path, module.lora_A["default"].weight, module.lora_B["default"].weight


def build(name: str, base: nn.Module, r: int) -> nn.Module:
    """A copy of ``base`` with LoRA as implementation ``name`` (one of :data:`IMPLS`); raises :class:`Skip`."""
    model = copy.deepcopy(base)
    if name.startswith("fastlora"):
        from fastlora.methods.lora import inject

        quant = "nf4" if "nf4" in name else None
        return inject(model, r=r, lora_alpha=ALPHA_PER_R * r, target_modules="all-linear", quantize=quant,
                      fuse_blocks=name.endswith("fused-blocks"))  # fmt: skip
    try:
        import peft
    except ImportError as e:
        raise Skip(f"peft is not installed ({e})") from e
    if name == "peft+bnb-nf4":
        dtype = next(base.parameters()).dtype
        for path in target_paths(model):
            packed, state = _quantised(model.get_submodule(path).weight.data)
            _set_module(model, path, bnb_linear4bit(packed, state, dtype))
        model.is_loaded_in_4bit = True  # what transformers sets with BitsAndBytesConfig; peft dispatches on it
    elif name != "peft":
        raise ValueError(f"fastlora bench: unknown model implementation {name!r}; expected one of {IMPLS}")
    config = peft.LoraConfig(r=r, lora_alpha=ALPHA_PER_R * r, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")  # fmt: skip
    return peft.get_peft_model(model, config)


def reference_model(base: nn.Module, init: dict, r: int, dtype: torch.dtype, quantised: bool) -> nn.Module:
    """``base`` in ``dtype`` (weights dequantised from NF4 with ``quantised``) with :class:`PlainLoRA` layers."""
    model = copy.deepcopy(base).to(dtype) if dtype != next(base.parameters()).dtype else copy.deepcopy(base)
    for path in target_paths(base):
        lin = model.get_submodule(path)
        if quantised:
            from fastlora.quant import dequantize_4bit

            packed, state = _quantised(base.get_submodule(path).weight.data)
            lin.weight.data = dequantize_4bit(packed, state, torch.float32).to(dtype)
        a, b = init[path]
        _set_module(model, path, PlainLoRA(lin, a.to(lin.weight), b.to(lin.weight), ALPHA_PER_R))
    return model


def load_init(model: nn.Module, init: dict) -> int:
    """Copy the shared LoRA initialisation into every LoRA layer of ``model``; returns how many were set."""
    count = 0
    with torch.no_grad():
        for path, a, b in lora_factors(model):
            a.copy_(init[path][0].to(a))
            b.copy_(init[path][1].to(b))
            count += 1
    return count


def loss_and_grads(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Loss, and the gradient of every LoRA factor ("dA <path>", "dB <path>", fp32) after one backward.

    Compared one layer at a time, so a single wrong layer cannot hide among the others.
    """
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    out: dict[str, torch.Tensor | None] = {"loss": loss.detach().float().reshape(1)}
    for path, a, b in lora_factors(model):
        out[f"dA {path}"] = None if a.grad is None else a.grad.float()
        out[f"dB {path}"] = None if b.grad is None else b.grad.float()
        a.grad = b.grad = None
    return out


def _linear_params(case: ModelCase) -> int:
    """Frozen matmul weights of the host (all projections + the head), from the config."""
    head_dim = case.hidden // case.heads
    attn = case.hidden * (2 * case.hidden + 2 * case.kv_heads * head_dim)
    return case.layers * (attn + 3 * case.hidden * case.intermediate) + case.vocab * case.hidden


def prepare(case: ModelCase, *, cuda: bool) -> dict:
    """What every implementation of a model case shares: the host, the LoRA init, the tokens, the fp32
    references (dense and NF4-dequantised) and plain PyTorch's own error in the run dtype."""
    device, dtype = ("cuda" if cuda else "cpu"), DTYPES[case.dtype]
    base = base_model(case, device)
    init = lora_init(base, case.r)
    ids = torch.randint(0, case.vocab, (case.batch, case.seq), device=device,
                        generator=torch.Generator(device).manual_seed(0))  # fmt: skip
    guard_ids = ids[:1, : min(case.seq, 128)]
    rd = guard.reference_dtype(dtype)
    with guard.no_tf32():
        refs = {q: loss_and_grads(reference_model(base, init, case.r, rd, q), guard_ids) for q in (False, True)}
    plain = loss_and_grads(reference_model(base, init, case.r, dtype, False), guard_ids)
    flops = case.tokens * (4 * _linear_params(case) + 6 * sum(a.numel() + b.numel() for a, b in init.values()))
    flops += 12 * case.batch * case.seq**2 * case.hidden * case.layers
    # Rounding through a deep bf16 model varies from layer to layer by chance; each gradient's bound uses the
    # largest error plain PyTorch makes on any LoRA gradient of this model, so an honest layer cannot fail
    # by luck while one wrong layer (errors far above the rounding) still does.
    baseline = guard.baseline(plain, refs[False])
    grads = [v for k, v in baseline.items() if k != "loss"]
    scale = (max(v[0] for v in grads), max(v[1] for v in grads))
    baseline = {k: (v if k == "loss" else scale) for k, v in baseline.items()}
    return {"base": base, "init": init, "ids": ids, "guard_ids": guard_ids, "refs": refs, "baseline": baseline,
            "flops": flops}  # fmt: skip


def guarded(case: ModelCase, name: str, *, cuda: bool, cache: dict | None = None) -> Guarded:
    """Build implementation ``name`` on the case's host, check loss and LoRA gradients, return the timed step.

    ``cache`` holds :func:`prepare`'s result across the implementations of one case (made when missing).
    The returned :class:`Guarded` has the training step under "step" and the model under ``cache["model"]``.

    Raises:
        Skip: it cannot run here.  WrongResult: loss or a gradient is wrong, or LoRA is on the wrong layers.
    """
    cache = {} if cache is None else cache
    if "base" not in cache:
        cache.update(prepare(case, cuda=cuda))
    init, ids = cache["init"], cache["ids"]
    model = build(name, cache["base"], case.r)
    cache["model"] = model
    placed = load_init(model, init)
    if placed != len(init):
        raise guard.WrongResult(f"{name}: LoRA was put on {placed} layers, expected {len(init)}")
    ref = cache["refs"]["nf4" in name]
    errors = guard.check(name, loss_and_grads(model, cache["guard_ids"]), ref, DTYPES[case.dtype], cache["baseline"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Guarded({"step": step}, [], {"step": (cache["flops"], None)}, errors)


def run(
    cases: Sequence[ModelCase],
    *,
    cuda: bool,
    timer: TimerConfig = STEP_TIMER,
    impls: Sequence[str] = IMPLS,
    on_record: Callable[[Record], None] = lambda r: None,
) -> list[Record]:
    """Run the model suite: per model, guard each implementation's loss and LoRA gradients, then time steps."""
    records: list[Record] = []
    for case in cases:
        try:
            cache = prepare(case, cuda=cuda)
        except torch.cuda.OutOfMemoryError as e:  # the host or its fp32 reference does not fit: say so, go on
            for name in impls:
                records.append(Record(suite="model", case=case.id, impl=name, pass_="step", shape=case.name,
                                      m=case.tokens, r=case.r, dtype=case.dtype, status=SKIPPED,
                                      note=f"out of memory building the model or its fp32 reference: {e}"))  # fmt: skip
                on_record(records[-1])
            torch.cuda.empty_cache()
            continue
        for name in impls:
            rec = Record(suite="model", case=case.id, impl=name, pass_="step", shape=case.name, m=case.tokens,
                         r=case.r, dtype=case.dtype)  # fmt: skip
            records.append(_run_impl(rec, case, name, cache, cuda, timer))
            cache.pop("model", None)
            on_record(records[-1])
            if cuda:
                torch.cuda.empty_cache()
        del cache
        if cuda:
            torch.cuda.empty_cache()
    return records


def _run_impl(rec: Record, case: ModelCase, name: str, cache: dict, cuda: bool, timer: TimerConfig) -> Record:
    before = torch.cuda.memory_allocated() if cuda else 0
    try:
        ready = guarded(case, name, cuda=cuda, cache=cache)
        step = ready.fns["step"]
        t = measure(step, cuda=cuda, config=timer, wallclock=True)
        rec.ms, rec.q20, rec.q80, rec.reps = t.ms, t.q20, t.q80, t.reps
        rec.flops = ready.counts["step"][0]
        rec.tokens_per_s = case.tokens / (t.ms / 1e3)
        rec.max_rel_err = max(e[0] for e in ready.errors.values())
        if cuda:  # the whole footprint of this implementation: weights, LoRA, optimiser state, activations
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            rec.peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
        params = list(cache["model"].parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        rec.note = f"trainable {trainable / 1e6:.2f}M of {sum(p.numel() for p in params) / 1e6:.1f}M parameter elements"
        return rec.finish()
    except Skip as e:
        rec.status, rec.note = SKIPPED, f"skipped: {e}"
    except torch.cuda.OutOfMemoryError as e:
        rec.status, rec.note = SKIPPED, f"out of memory on this device: {str(e).splitlines()[0]}"
    except Exception as e:
        rec.status = FAILED
        rec.note = str(e) if isinstance(e, guard.WrongResult) else f"raised {type(e).__name__}: {e}"
    return rec
