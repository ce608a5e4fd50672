"""What lp-export and lp-audit share: the checkpoint's class, its DataModule node and the batch keys."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from lp_lightning.batches import BatchKeys


def model_and_data(cfg: DictConfig) -> tuple[BatchKeys, str | None, dict[str, Any] | None]:
    """``(batch keys, model_class, data node)`` of a composed lp-export/lp-audit config (validated here)."""
    model_class = cfg.get("model_class")
    if model_class is not None and (not isinstance(model_class, str) or not model_class):
        raise ValueError(f"model_class={model_class!r} must be a dotted class path, e.g. pkg.module.MyModule")
    data = cfg.get("data")
    if data is not None and not isinstance(data, DictConfig):
        raise ValueError(f"data={data!r} must be a DataModule node: data._target_=pkg.module.MyDataModule "
                         "data.<argument>=... (or data=<a group file of --config-dir>)")
    node = OmegaConf.to_container(data, resolve=True) if data is not None else None
    keys = BatchKeys(**{k: cfg.get(k, default) for k, default in (("input_key", "input"), ("target_key", "target"),
                                                                     ("input_index", 0), ("target_index", 1))})
    return keys, model_class, node  # type: ignore[return-value]
