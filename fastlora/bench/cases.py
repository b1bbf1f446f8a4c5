"""What is measured: the case lists of every suite, full (GPU) and quick (CPU, or a fast GPU check).

The same lists feed ``fastlora bench`` and the pytest-benchmark suites in ``benchmarks/``, so both
measure the same things. Layer shapes are (in_features K, out_features N) of Llama-3's projections.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

# (in, out) of each distinct projection shape; q/o and k/v and gate/up share shapes.
LLAMA_SHAPES: dict[str, dict[str, tuple[int, int]]] = {
    "llama3-8b": {"q,o": (4096, 4096), "k,v": (4096, 1024), "gate,up": (4096, 14336), "down": (14336, 4096)},
    "llama3-70b": {"q,o": (8192, 8192), "k,v": (8192, 1024), "gate,up": (8192, 28672), "down": (28672, 8192)},
}
TOKENS = (1, 16, 512, 4096, 16384)
RANKS = (8, 16, 64)
DTYPES = ("bf16", "fp16")
# A small Llama-like layer: 1376 = 21.5 blocks of 64, so the down projection's rows straddle 4-bit blocks.
QUICK_SHAPES = {"tiny": {"q,o": (512, 512), "gate,up": (512, 1376), "down": (1376, 512)}}
QUICK_TOKENS = (1, 16, 256)
QUICK_RANKS = (16,)
QUICK_DTYPES = ("bf16",)
PASSES = ("fwd", "bwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class LayerCase:
    """One LoRA linear layer: x (m, k) -> y (m, n), rank r, in ``dtype``; ``label`` names the projection."""

    k: int
    n: int
    m: int
    r: int
    dtype: str
    label: str = ""

    @property
    def shape(self) -> str:
        return f"{self.k}x{self.n}"

    @property
    def id(self) -> str:
        return f"{self.shape}-M{self.m}-r{self.r}-{self.dtype}"


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """A Llama-style ``LlamaForCausalLM`` built from this config with random weights, trained on
    ``batch`` x ``seq`` random tokens per step; ``r`` is the LoRA rank on every linear layer."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int
    seq: int
    r: int = 16
    dtype: str = "bf16"

    @property
    def id(self) -> str:
        return f"{self.name}-{self.batch}x{self.seq}-r{self.r}-{self.dtype}"

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(self.seq, 128),
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )


@dataclasses.dataclass(frozen=True)
class AdapterCase:
    """A bottleneck adapter ``y = x + act(x W_downᵀ + b_down) W_upᵀ + b_up``: x (m, d), bottleneck r."""

    d: int
    m: int
    r: int
    dtype: str
    activation: str = "gelu"

    @property
    def shape(self) -> str:
        return f"d{self.d}-r{self.r}"

    @property
    def id(self) -> str:
        return f"{self.shape}-M{self.m}-{self.dtype}"


MODELS = (
    ModelCase("llama-125m", 768, 12, 12, 12, 2048, 32000, batch=8, seq=512),
    ModelCase("llama-1b", 2048, 16, 32, 8, 8192, 128256, batch=4, seq=1024),
    ModelCase("llama-8b", 4096, 32, 32, 8, 14336, 128256, batch=2, seq=1024),
)
QUICK_MODELS = (ModelCase("llama-5m", 256, 4, 4, 2, 768, 4000, batch=2, seq=128),)


def _shapes(shapes: dict[str, dict[str, tuple[int, int]]]) -> list[tuple[int, int, str]]:
    return [(k, n, f"{model}.{proj}") for model, projs in shapes.items() for proj, (k, n) in projs.items()]


def parse_shapes(text: str) -> list[tuple[int, int, str]]:
    """``"4096x14336,14336x4096"`` (in x out) or preset names (``"llama3-8b"``, ``"llama3-70b"``, ``"tiny"``)
    -> [(in, out, label), ...]."""
    presets = {**LLAMA_SHAPES, **QUICK_SHAPES}
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in presets:
            out += _shapes({item: presets[item]})
            continue
        parts = item.split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(
                f"fastlora bench: a shape is IN x OUT in positive integers (like 4096x14336) or one of "
                f"{sorted(presets)}; got {item!r}"
            )
        out.append((int(parts[0]), int(parts[1]), ""))
    return out


def layer_cases(
    *,
    quick: bool,
    shapes: Sequence[tuple[int, int, str]] | None = None,
    tokens: Sequence[int] | None = None,
    ranks: Sequence[int] | None = None,
    dtypes: Sequence[str] | None = None,
) -> list[LayerCase]:
    """The layer suite.

    Full: every shape (default: all Llama-3-8B and 70B projections) x every M at r=16 in bf16 (the main
    grid), plus, on the shapes among them that are Llama-3-8B's, a rank sweep (r = 8, 64 at 4096x14336)
    and an fp16 pass, both at M = 16 and 4096. Quick: three small shapes, M in {1, 16, 256}, r=16, bf16.
    Overriding tokens, ranks or dtypes runs the plain cross product of the axes instead.
    """
    if quick or any(v is not None for v in (tokens, ranks, dtypes)):
        shapes = shapes or _shapes(QUICK_SHAPES if quick else LLAMA_SHAPES)
        tokens = tokens or (QUICK_TOKENS if quick else TOKENS)
        ranks = ranks or (QUICK_RANKS if quick else (16,))
        dtypes = dtypes or (QUICK_DTYPES if quick else ("bf16",))
        return _cross(shapes, tokens, ranks, dtypes)
    shapes = list(shapes or _shapes(LLAMA_SHAPES))
    eight_b = [(k, n, lab) for (k, n, lab) in shapes if (k, n) in LLAMA_SHAPES["llama3-8b"].values()]
    cases = _cross(shapes, TOKENS, (16,), ("bf16",))
    cases += _cross(
        [s for s in eight_b if s[:2] == (4096, 14336)], (16, 4096), [r for r in RANKS if r != 16], ("bf16",)
    )
    cases += _cross(eight_b, (16, 4096), (16,), ("fp16",))
    return cases


def _cross(shapes, tokens, ranks, dtypes) -> list[LayerCase]:
    return [LayerCase(k, n, m, r, dt, lab) for dt in dtypes for (k, n, lab) in shapes for r in ranks for m in tokens]


def decode_cases(
    *,
    quick: bool,
    shapes: Sequence[tuple[int, int, str]] | None = None,
    tokens: Sequence[int] | None = None,
    ranks: Sequence[int] | None = None,
    dtypes: Sequence[str] | None = None,
) -> list[LayerCase]:
    """The decode suite (inference, memory-bound): M <= 16 over the layer shapes, r = 16, bf16."""
    shapes = shapes or _shapes(QUICK_SHAPES if quick else LLAMA_SHAPES)
    tokens = [m for m in (tokens or (1, 16)) if m <= 16] or [1]
    ranks = ranks or (16,)
    dtypes = dtypes or ("bf16",)
    return _cross(shapes, tokens, ranks, dtypes)


def model_cases(
    *, quick: bool, names: Sequence[str] | None = None, dtypes: Sequence[str] | None = None
) -> list[ModelCase]:
    """The model suite: Llama-style models from ~100M to 8B parameters (quick: one of ~5M)."""
    pool = {c.name: c for c in (*MODELS, *QUICK_MODELS)}
    if names:
        unknown = [n for n in names if n not in pool]
        if unknown:
            raise ValueError(f"fastlora bench: unknown model {unknown}; expected some of {sorted(pool)}")
        chosen = [pool[n] for n in names]
    else:
        chosen = list(QUICK_MODELS if quick else MODELS)
    if dtypes:
        chosen = [dataclasses.replace(c, dtype=dt) for c in chosen for dt in dtypes]
    return chosen


def adapter_cases(
    *, quick: bool, tokens: Sequence[int] | None = None, dtypes: Sequence[str] | None = None
) -> list[AdapterCase]:
    """The adapter suite: d in {1024, 4096}, r in {16, 64}, M in {512, 4096, 16384} (quick: d=512, r=16)."""
    dims, rs = ((512,), (16,)) if quick else ((1024, 4096), (16, 64))
    tokens = tokens or ((16, 256) if quick else (512, 4096, 16384))
    dtypes = dtypes or (QUICK_DTYPES if quick else ("bf16",))
    return [AdapterCase(d, m, r, dt) for dt in dtypes for d in dims for r in rs for m in tokens]
