"""Bottleneck adapters placed in a host model by module name: Houlsby, Pfeiffer and parallel.

    model = inject_adapters(model, AdapterConfig(r=16, placement="houlsby"))
    ...train (only the adapters, and any modules_to_save, have requires_grad)...
    model.save_adapter("out/")                    # adapter_config.json + adapter_model.safetensors
    model = load_adapters(fresh_host, "out/")

Placements (the modules wrapped are chosen per architecture unless ``target_modules`` is given):

- ``houlsby`` (Houlsby et al. 2019): "Attention → Adapter → FFN → Adapter". Llama: on the outputs
  of ``self_attn`` and ``mlp``, before the residual add. BERT: on the outputs of the attention
  output ``dense`` and the FFN output ``dense``, before the residual LayerNorm, as in the paper.
- ``pfeiffer`` (Pfeiffer et al. 2021): one adapter, after the FFN only (same modules as above).
- ``parallel`` (He et al. 2022): the adapter of the FFN's INPUT added to the FFN's output.
  Llama: ``mlp(x) + Δ(x)``. BERT has no module whose input is the FFN input and whose output is
  the FFN output before the LayerNorm; its ``BertOutput(h, x)`` computes ``LN(dense(h) + x)`` with x
  the FFN input, so passing it ``x + Δ(x)`` gives exactly ``LN(FFN(x) + x + Δ(x))``.

Each target is replaced by an :class:`AdapterLayer` holding the original as ``base_layer`` and a
:class:`~fastlora.modules.adapter.FastAdapter` as ``adapter`` (a tuple output, e.g. attention's
``(out, weights)``, has its element 0 adapted). The host is frozen; adapters start as the identity.

Adapters cannot be merged into the host's weights (``act`` sits between the two projections), so
there is no ``merge_and_unload``; :meth:`AdapterModel.unload` gives the host back without them.

config.py: :class:`AdapterConfig` and the per-architecture placements; layer.py: :class:`AdapterLayer`;
model.py: :class:`AdapterModel`, :func:`inject_adapters`, :func:`load_adapters`.
"""

from fastlora.methods.bottleneck.config import ADAPTER_TYPE, AUTO_TARGETS, PLACEMENTS, AdapterConfig
from fastlora.methods.bottleneck.layer import AdapterLayer
from fastlora.methods.bottleneck.model import AdapterModel, inject_adapters, load_adapters

__all__ = [
    "ADAPTER_TYPE",
    "AUTO_TARGETS",
    "PLACEMENTS",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterModel",
    "inject_adapters",
    "load_adapters",
]
