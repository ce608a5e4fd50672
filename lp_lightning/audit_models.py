"""The tolerance audit (Lemma 1) of any LightningModule: two trained modules, or one module in two precisions.

This is the Python API behind ``lp-audit``; it needs no checkpoint and no Hydra::

    report, comparison = audit_modules(model, loader, precision="fp16")        # one model, two precisions
    report, comparison = audit_modules(model_a, loader, reference=model_b)     # two trained models
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor, nn

from lp_lightning.audit.tolerance import Comparison, compare, summary
from lp_lightning.batches import BatchKeys, require_logits
from lp_lightning.callbacks.audit_support import parse_reference, reference_copy
from lp_lightning.data.samples import collect
from lp_lightning.logs import quiet_loggers

OWNER = "the Lemma-1 audit"


def check_max_samples(max_samples: Any) -> int | None:
    """``max_samples`` if it is None (every sample) or an integer >= 1, else ValueError naming it."""
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise ValueError(f"max_samples={max_samples!r} must be None (null: every sample) or an integer >= 1")
    return max_samples


def precision_plugin(precision: Precision | str | Mapping[str, Any] | None) -> Precision:
    """The plugin a Trainer builds for ``precision``: a plugin instance (returned as is), the name of a
    ``conf/precision`` entry (``"fp16"``, ``"bf16"``, ``"int8"``, ...), or such an entry's mapping
    (``_target_`` + arguments). None: Lightning's float32."""
    from lp_lightning.config import compose_config, precision_kwargs

    if isinstance(precision, Precision):
        return precision
    if precision is None:
        precision = {"_target_": "lp_lightning.config.lightning_precision", "precision": "32-true"}
    elif isinstance(precision, str):
        from hydra.errors import HydraException

        try:
            precision = compose_config("audit", [f"precision={precision}"]).precision
        except HydraException as exc:
            raise ValueError(f"precision={precision!r} is not an entry of conf/precision (e.g. fp16, bf16, "
                             "int8) nor a Precision plugin") from exc
    kwargs, plugins = precision_kwargs(precision)
    with quiet_loggers("lightning.pytorch"):
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, plugins=plugins, **kwargs)
    return trainer.precision_plugin


@torch.no_grad()
def forward_logits(model: nn.Module, inputs: Tensor, batch_size: int = 256, plugin: Precision | None = None,
                   dtype: torch.dtype | None = None) -> Tensor:
    """float64 ``(N, C)`` logits of ``inputs`` in batches: through ``plugin`` (forward_context, convert_input)
    or in ``dtype``; anything but classification logits is a ValueError naming the model."""
    outs = []
    for i in range(0, len(inputs), batch_size):
        x = inputs[i:i + batch_size]
        if plugin is not None:
            with plugin.forward_context():
                out = model(plugin.convert_input(x))
        else:
            out = model(x.to(dtype) if dtype is not None and x.is_floating_point() else x)
        outs.append(require_logits(out, OWNER, model).detach().to(torch.float64))
    return torch.cat(outs)


def _label(precision: Any, plugin: Precision, module: nn.Module) -> str:
    """How the audited model ran: the precision's name, the plugin's class, or the module as it is."""
    if isinstance(precision, str):
        return precision
    if precision is None:
        from lp_lightning.quant import fake_quant_layers

        return "as is (fake-quant)" if fake_quant_layers(module) else "as is (fp32)"
    if isinstance(precision, Precision):
        dtype = getattr(plugin, "compute_dtype", None)
        return type(plugin).__name__ + (f" ({str(dtype).removeprefix('torch.')})" if dtype is not None else "")
    return str(getattr(plugin, "precision", type(plugin).__name__))


def _accuracy(z: Tensor, y: Tensor | None) -> float | None:
    return None if y is None else float((z.argmax(1) == y).double().mean())


def audit_modules(module: nn.Module, data: Iterable[Any], *, reference: nn.Module | None = None,
                  precision: Precision | str | Mapping[str, Any] | None = None, reference_dtype: str = "float32",
                  keys: BatchKeys | None = None, max_samples: int | None = None, batch_size: int = 256
                  ) -> tuple[dict[str, Any], Comparison]:
    """Audit ``module`` run in ``precision`` against ``reference`` (another trained module) or, without one,
    against a copy of ``module`` itself in ``reference_dtype``; on the batches of ``data`` (a dataloader).

    ``keys`` says where the input (and labels, for the accuracies) are in a batch. ``precision`` None: the
    module as it is (fp32, or fake-quant as trained). Both models must return (N, C >= 2) classification
    logits. Returns the report (the audit keys, ``accuracy_low``/``accuracy_reference``, None without labels)
    and the per-sample comparison (for plots).
    """
    ref_dtype = parse_reference(reference_dtype)
    check_max_samples(max_samples)
    if reference is None and precision is None:
        raise ValueError("audit_modules needs precision=<plugin or name> (one model in two precisions) or "
                         "reference=<module> (two models)")
    inputs, labels = collect(data, keys or BatchKeys(), max_samples)
    plugin = precision_plugin(precision)
    if reference is not None:
        ref_model = copy.deepcopy(reference).to(ref_dtype).eval()
    else:
        ref_model = reference_copy(module, plugin, ref_dtype)
    low_model = plugin.convert_module(copy.deepcopy(module)).eval()
    low = forward_logits(low_model, inputs, batch_size, plugin=plugin)
    ref = forward_logits(ref_model, inputs, batch_size, dtype=ref_dtype)
    if low.shape[1] != ref.shape[1]:
        raise ValueError(f"the models are not comparable: {type(module).__name__} returns {low.shape[1]} classes, "
                         f"the reference {type(ref_model).__name__} {ref.shape[1]}")
    comparison = compare(low, ref)
    report = {**summary(comparison),
              "low_precision": _label(precision, plugin, module),
              "reference_precision": str(ref_dtype).removeprefix("torch."),
              "mode": "models" if reference is not None else "precisions",
              "accuracy_low": _accuracy(low, labels), "accuracy_reference": _accuracy(ref, labels)}
    return report, comparison
