"""Short names of a run's precision and model for titles and tables: the lp-train config names (``int8``,
``int4w``, ``fp16``, ``bf16_mixed``, ``fp8_rowwise``), not plugin class names."""

from __future__ import annotations

from typing import Any

# Lightning's precision strings -> the lp-train config names
LIGHTNING_NAMES = {"32-true": "fp32", "32": "fp32", "64-true": "fp64", "16-true": "fp16", "bf16-true": "bf16",
                   "16-mixed": "fp16_mixed", "bf16-mixed": "bf16_mixed", "transformer-engine": "fp8"}


def precision_label(plugin: Any) -> str:
    """The plugin's precision as lp-train names it, asked from what it exposes: a fake-quant spec
    (``int8``: int8 weights and activations, ``int4w``: int4 weights), an FP8 recipe (``fp8``,
    ``fp8_rowwise``), else its Lightning precision string mapped (``16-true`` -> ``fp16``) or kept."""
    spec = getattr(plugin, "spec", None)
    bits = getattr(spec, "weight_bits", None)
    if isinstance(bits, int) and not isinstance(bits, bool):
        return f"int{bits}" if getattr(spec, "act_bits", None) == bits else f"int{bits}w"
    recipe = getattr(plugin, "recipe", None)
    if isinstance(recipe, str):
        return "fp8" if recipe == "tensorwise" else f"fp8_{recipe}"
    name = str(getattr(plugin, "precision", "") or type(plugin).__name__)
    return LIGHTNING_NAMES.get(name, name)


def model_label(module: Any) -> str:
    """The built-in Classifier's net (``cnn``, ``vit``), else the module's class name."""
    hparams = getattr(module, "hparams", None) or {}
    net = hparams.get("net") if hasattr(hparams, "get") else None
    return net if isinstance(net, str) else type(module).__name__
