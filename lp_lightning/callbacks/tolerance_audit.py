"""ToleranceAudit: after validation, certify which predictions the low precision cannot flip (Lemma 1)."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from lp_lightning.audit.tolerance import Comparison, compare, summary
from lp_lightning.batches import BatchKeys
from lp_lightning.callbacks.audit_support import (
    SCOPE,
    ValidationCapture,
    check_forward,
    check_logits,
    eval_mode,
    parse_reference,
    reference_copy,
    rng_preserved,
)
from lp_lightning.io import write_json
from lp_lightning.precision.labels import model_label, precision_label

__all__ = ["ToleranceAudit", "reference_copy", "rng_preserved"]

LOGGED = ("certified_fraction", "agreement", "violations", "err_mean", "tol_mean", "nonfinite")


class ToleranceAudit(Callback):
    """Compare the trained model with a higher-precision reference of the same weights on validation data.

    The model must be a classifier: ``model(x)`` returns (N, C) logits with C >= 2 (the Lemma-1 certificate
    is about the top-1 class). The input ``x`` is read from each batch like :class:`lp_lightning.batches.BatchKeys`
    does: a bare tensor, ``batch[input_index]`` of a tuple/list (``(x, y)``, ``(x, y, index)``, ...) or
    ``batch[input_key]`` of a dict; targets are not needed. Before the first training step (at the first
    sanity-check or training batch of a fit) a no-grad eval-mode forward of 2 samples checks both, and a
    batch or output the audit cannot use (a wrong key, a non-tensor input, a regression output (N, 1) or (N,))
    is refused there with a ValueError naming the setting to change, not after an epoch.

    Per audited epoch it logs ``audit/{certified_fraction, agreement, violations, err_mean, tol_mean,
    nonfinite}`` and writes ``audit/epoch_XXX.json`` (the report keys of
    :func:`lp_lightning.audit.tolerance.summarize`) and ``audit/epoch_XXX.png`` into ``trainer.log_dir``.
    Weights, optimizer state, train modes and random streams are left exactly as they were.

    Args:
        reference: dtype of the reference forward, ``"float32"`` or ``"float64"``.
        every_n_epochs: audit after the validation of every n-th epoch.
        max_samples: audit at most this many validation samples (all ranks together); None: all.
        plot: also write the tolerance-vs-error PNG.
        input_key: the key of the input tensor in dict batches.
        input_index: the position of the input tensor in tuple/list batches.
    """

    def __init__(self, reference: str = "float32", every_n_epochs: int = 1, max_samples: int | None = None,
                 plot: bool = True, input_key: str = "input", input_index: int = 0) -> None:
        self.keys = BatchKeys(input_key=input_key, target_key=None, input_index=input_index, target_index=None)
        self.reference_dtype = parse_reference(reference)
        self.reference = str(self.reference_dtype).removeprefix("torch.")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs!r} must be an integer >= 1")
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                        or max_samples < 1):
            raise ValueError(f"max_samples={max_samples!r} must be None (all) or an integer >= 1")
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.plot = bool(plot)
        self.last_report: dict[str, Any] | None = None
        self._capture: ValidationCapture | None = None
        self._plotter: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._plots: list[Future[None]] = []
        self._ref: nn.Module | None = None  # cached reference copy (no reference_module), refreshed per audit
        self.last_source = ""  # "captured" (validation loop's own logits) or "recomputed"
        self._epochs_written: set[int] = set()  # epochs of this fit with an audit file already
        self._probed = False  # this fit's model output was checked on one batch
        self._val_checked = False  # this fit's validation batches were checked for the input

    # -- hooks ------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epochs_written.clear()
        self._probed = self._val_checked = False
        low = self._low_dtype(trainer, pl_module)
        if low is not None and torch.finfo(low).bits > torch.finfo(self.reference_dtype).bits:
            raise ValueError(f"reference={self.reference!r} is not higher than the model's precision {low}; "
                             "use reference='float64'")

    def _audits(self, trainer: L.Trainer) -> bool:
        return (not trainer.sanity_checking and trainer.state.fn == "fit"
                and (trainer.current_epoch + 1) % self.every_n_epochs == 0)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_capture()
        if self._audits(trainer):
            self._capture = ValidationCapture(pl_module, self.keys)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._probed:
            self._probe(trainer, pl_module, batch, "training")

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.state.fn == "fit" and dataloader_idx == 0 and not self._val_checked:
            if trainer.sanity_checking and not self._probed:  # here the probe stays out of every training step
                self._probe(trainer, pl_module, batch, "validation")
            self._input(batch, pl_module, "validation")
            self._val_checked = True
        if self._capture is not None:
            self._capture.start(batch, dataloader_idx)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._capture is not None:
            self._capture.end()

    def _close_capture(self) -> ValidationCapture | None:
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.close()
        return capture

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close_capture()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close_capture()
        self._ref = None  # release the reference copy's memory
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # errors were raised in on_fit_end (or the fit failed anyway)
            self._pool, self._plots = None, []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        capture = self._close_capture()
        if not self._audits(trainer):
            return
        start = time.perf_counter()
        comparison = self.audit(trainer, pl_module, capture)
        report = {**summary(comparison), "low_precision": self._low_name(trainer, pl_module),
                  "reference_precision": self.reference, "split": "val",
                  "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                  "audit_seconds": time.perf_counter() - start}
        self.last_report = report
        for key in (*LOGGED, "audit_seconds"):
            pl_module.log(f"audit/{key.removeprefix('audit_')}", float(report[key]), on_step=False,
                          on_epoch=True, sync_dist=True)  # equal on every rank; syncing only silences a warning
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: every rank calls it
        if trainer.is_global_zero:
            stem = log_dir / "audit" / f"epoch_{trainer.current_epoch:03d}"
            if trainer.current_epoch in self._epochs_written:  # val_check_interval < 1: several per epoch
                stem = stem.with_name(f"{stem.name}_step_{trainer.global_step:06d}")
            self._epochs_written.add(trainer.current_epoch)
            write_json(stem.with_suffix(".json"), report)
            if self.plot:  # rendered on one background thread; all PNGs are written when fit returns
                title = (f"{model_label(pl_module)} {precision_label(trainer.precision_plugin)}, epoch "
                         f"{trainer.current_epoch}: vs {self.reference}")
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tolerance-audit-plot")
                self._plots.append(self._pool.submit(self._render, comparison, stem.with_suffix(".png"), title))

    def _render(self, comparison: Comparison, path: Path, title: str) -> None:  # on the plot thread only
        if self._plotter is None:
            from lp_lightning.audit.plot import TolerancePlot

            self._plotter = TolerancePlot()  # one figure for all epochs: only the data changes
        self._plotter.render(comparison, path, title=title)

    def wait_for_plots(self) -> None:
        """Block until every pending PNG is written; re-raise the first rendering error."""
        plots, self._plots = self._plots, []
        for plot in plots:
            plot.result()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.wait_for_plots()

    # -- the checks before training ---------------------------------------------------------------------
    def _settings(self) -> str:
        return f"ToleranceAudit(input_key={self.keys.input_key!r}, input_index={self.keys.input_index})"

    def _input(self, batch: Any, pl_module: L.LightningModule, split: str) -> Tensor:
        """The input tensor of ``batch``; a one-line ValueError naming the model and the setting otherwise."""
        try:
            return self.keys.inputs(batch)
        except ValueError as err:
            raise ValueError(f"{self._settings()} cannot read the input of {type(pl_module).__name__}'s {split} "
                             f"batch: {err}; {SCOPE}") from err

    def _probe(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, split: str) -> None:
        """Refuse a batch layout or a model output the audit cannot use, before any optimizer step."""
        x = self._input(batch, pl_module, split)[:2]
        check_forward(pl_module, trainer.precision_plugin, x, self._settings(), split)
        self._probed = True

    # -- the audit itself -------------------------------------------------------------------------------
    @torch.no_grad()
    def audit(self, trainer: L.Trainer, pl_module: L.LightningModule,
              capture: ValidationCapture | None = None) -> Comparison:
        """Low-precision and reference logits on this rank's validation data, gathered over all ranks.

        The low-precision logits are ``with plugin.forward_context(): module(plugin.convert_input(x))``
        in eval mode. When ``capture`` recorded exactly that during the validation loop (one forward per
        batch whose input is ``convert_input`` of the data), those are reused instead of recomputed.
        """
        loader = self._loader(trainer)
        n_batches = trainer.num_val_batches[0] if trainer.num_val_batches else float("inf")  # limit_val_batches
        plugin = trainer.precision_plugin
        world = trainer.world_size
        cap = None if self.max_samples is None else -(-self.max_samples // world)
        with rng_preserved(), eval_mode(pl_module):
            xs, n = [], 0
            for i, batch in enumerate(loader):
                if i >= n_batches or (cap is not None and n >= cap):
                    break
                x = self._input(batch, pl_module, "validation").to(pl_module.device)
                xs.append(x if cap is None else x[: cap - n])
                n += len(xs[-1])
            if not xs:
                raise ValueError("ToleranceAudit found no validation samples to audit")
            lows = capture.outputs_for(xs, plugin) if capture is not None else None
            self.last_source = "captured" if lows is not None else "recomputed"
            if lows is None:
                lows = []
                for x in xs:
                    with plugin.forward_context():
                        lows.append(pl_module(plugin.convert_input(x)))
            name = type(pl_module).__name__
            low = torch.cat([check_logits(o, name).detach().to(torch.float64) for o in lows])
            reference = self._reference(pl_module, plugin)
            ref = torch.cat([check_logits(reference(x.to(self.reference_dtype) if x.is_floating_point() else x),
                                          f"the reference copy of {name}").to(torch.float64) for x in xs])
            del reference
        return compare(self._gather(pl_module, low, loader, world), self._gather(pl_module, ref, loader, world))

    def _reference(self, pl_module: L.LightningModule, plugin: Any) -> nn.Module:
        """The plugin's reference module, or a cached plain copy refreshed in place with the current weights."""
        if callable(getattr(plugin, "reference_module", None)):
            return reference_copy(pl_module, plugin, self.reference_dtype)
        if self._ref is not None:
            src, dst = pl_module.state_dict(), self._ref.state_dict()
            if src.keys() == dst.keys() and all(src[k].shape == dst[k].shape for k in src):
                for key, value in src.items():
                    dst[key].copy_(value)
                return self._ref
        self._ref = reference_copy(pl_module, plugin, self.reference_dtype)
        return self._ref

    def _gather(self, pl_module: L.LightningModule, t: Tensor, loader: DataLoader, world: int) -> Tensor:
        """All-gather (every rank) and undo DistributedSampler's interleaving and padding."""
        if world > 1:
            g = pl_module.all_gather(t)  # (world, n, C), identical on every rank
            t = g.transpose(0, 1).reshape(-1, t.shape[-1])  # sample i of rank r was dataset item i*world + r
            sampler = getattr(loader, "sampler", None)
            if isinstance(sampler, DistributedSampler) and not sampler.shuffle:
                t = t[: len(sampler.dataset)]  # type: ignore[arg-type]
        if self.max_samples is not None:
            t = t[: self.max_samples]
        return t.cpu()

    @staticmethod
    def _loader(trainer: L.Trainer) -> DataLoader:
        loaders = trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        elif isinstance(loaders, dict):
            loaders = next(iter(loaders.values()), None)
        if loaders is None:
            raise ValueError("ToleranceAudit needs validation data: pass a datamodule with a val split")
        return loaders

    @staticmethod
    def _low_dtype(trainer: L.Trainer, pl_module: L.LightningModule) -> torch.dtype | None:
        dtype = getattr(trainer.precision_plugin, "compute_dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
        return next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), None)

    def _low_name(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """``PluginClass (compute dtype)``, or Lightning's precision string (with the weights' dtype if "-true")."""
        plugin = trainer.precision_plugin
        name = str(getattr(plugin, "precision", type(plugin).__name__))
        if isinstance(getattr(plugin, "compute_dtype", None), torch.dtype):
            return f"{type(plugin).__name__} ({str(plugin.compute_dtype).removeprefix('torch.')})"
        dtype = self._low_dtype(trainer, pl_module)
        return f"{name} ({str(dtype).removeprefix('torch.')})" if name.endswith("-true") and dtype else name
