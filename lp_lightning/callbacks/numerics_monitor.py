"""NumericsMonitor: per-layer overflow/underflow statistics of activations and gradients while training."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lp_lightning.audit.overflow import STAT_KEYS, tensor_stats_raw
from lp_lightning.audit.update_report import UpdateTelemetry, plugin_loss_scale, plugin_update_rounding
from lp_lightning.audit.updates import RunningStatsProbe, UpdateProbe, buffer_dtype, running_stat_modules
from lp_lightning.callbacks.numerics_report import KINDS, format_table, write_heatmap
from lp_lightning.io import write_json
from lp_lightning.precision.labels import model_label, precision_label

HEATMAP_FILE = "numerics_heatmap.png"
SUMMARY_FILE = "numerics_summary.json"


def select_modules(model: nn.Module, filters: Sequence[str | type] | str | type | None) -> dict[str, nn.Module]:
    """Fully-qualified name -> module for ``filters``; each entry must match at least one module.

    An entry is a module type, or a string matched against the fully-qualified name (``fnmatch`` pattern,
    e.g. ``"net.stages.*"``) or the class name (``"Conv2d"``). ``None``: every leaf module with parameters.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    if filters is None:
        return {n: m for n, m in named if not list(m.children()) and any(True for _ in m.parameters(False))}
    if isinstance(filters, (str, type)):
        filters = [filters]
    selected: dict[str, nn.Module] = {}
    for f in filters:
        if isinstance(f, type):
            hits = {n: m for n, m in named if isinstance(m, f)}
        elif isinstance(f, str):
            hits = {n: m for n, m in named if fnmatch.fnmatchcase(n, f) or type(m).__name__ == f}
        else:
            raise ValueError(f"modules entry {f!r} must be a name pattern, a class name or a module type")
        if not hits:
            some = ", ".join(n for n, _ in named[:8])
            raise ValueError(f"NumericsMonitor modules filter {f!r} matches no module; names look like: {some}")
        selected.update(hits)
    return selected


class NumericsMonitor(Callback):
    """Forward/backward hooks on selected layers; range statistics of their outputs and output gradients.

    Every ``every_n_steps`` training batches, each selected layer's output (``act``) and the gradient
    flowing into it (``grad``, a hook on the output tensor) get ``nonfinite``, ``underflow_share``,
    ``overflow_share`` and ``amax`` (``lp_lightning.audit.overflow``) measured against ``dtype`` (default:
    the tensor's own dtype; ``"float16"`` asks how an fp32 run would fare in fp16). Logged as
    ``numerics/<layer>/<act|grad>_<stat>``. At fit end: a per-layer summary table is printed, and
    ``numerics_heatmap.png`` (layers x steps) and ``numerics_summary.json`` are written to the log dir.
    Hooks live only on sampled steps and are removed at teardown.

    Lost updates (the "why" before accuracy drops in pure 16-bit training): on the sampled steps, each
    selected layer's parameters are copied before the optimizer step and compared after it. ``update_lost_share``
    is the share of elements with a non-zero update that kept their value (``new == old``: the update was below
    half an ulp of the 16-bit weight); "non-zero update" is a proxy (``lp_lightning.audit.updates``: a non-zero
    finite gradient, or a non-zero ``exp_avg``/``momentum_buffer`` after the step, or weight decay on a non-zero
    weight). Steps a loss scaler skipped (a non-finite gradient) are listed in ``update_skipped_steps`` and not
    counted. A layer one of whose parameter tensors loses more than ``lost_update_threshold`` of its updates
    (over the sampled steps so far) is warned about once, unless the plugin compensates the rounding
    (``PureHalfPrecision(update="stochastic"|"kahan")``: then ``new == old`` is not a loss and the share is only
    reported). Logged as ``numerics/<layer>/update_lost_share``.

    Stalled running statistics: on the sampled steps, every BatchNorm/SyncBatchNorm/InstanceNorm with
    ``track_running_stats`` (in the whole model, whatever ``modules`` says) that ran in training mode is checked
    for ``running_mean``/``running_var`` entries that did not change; a module whose unchanged share is at least
    ``norm_stall_threshold`` on ``norm_stall_steps`` sampled steps in a row is warned about once (16-bit
    buffers: a ``momentum * (batch - running)`` update below half an ulp is rounded away). Logged as
    ``numerics/<module>/norm_stats_unchanged_share``; both go into ``numerics_summary.json``.
    """

    def __init__(self, every_n_steps: int = 50, modules: Sequence[str] | str | None = None,
                 dtype: str | None = None, heatmap: bool = True, lost_update_threshold: float = 0.5,
                 norm_stall_threshold: float = 0.1, norm_stall_steps: int = 3) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} must be an int >= 1")
        for name, value in (("lost_update_threshold", lost_update_threshold),
                            ("norm_stall_threshold", norm_stall_threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{name}={value!r} must be a number in (0, 1]")
        if isinstance(norm_stall_steps, bool) or not isinstance(norm_stall_steps, int) or norm_stall_steps < 1:
            raise ValueError(f"norm_stall_steps={norm_stall_steps!r} must be an int >= 1")
        if dtype is not None:
            resolved = getattr(torch, str(dtype), None)
            if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
                raise ValueError(f"dtype={dtype!r} must be null or a float dtype name like 'float16'")
        self.every_n_steps = every_n_steps
        self.modules = modules if modules is None or isinstance(modules, (str, type)) else list(modules)
        self.dtype = dtype
        self.heatmap = heatmap
        self.lost_update_threshold = float(lost_update_threshold)
        self.norm_stall_threshold = float(norm_stall_threshold)
        self.norm_stall_steps = norm_stall_steps
        self.layers: list[str] = []
        self.steps: list[int] = []
        self.records: list[Tensor] = []  # per sampled step: (layers, 2 kinds, 4 stats), nan where unseen
        self._targets: dict[str, nn.Module] = {}
        self._handles: list[RemovableHandle] = []
        self._current: Tensor | None = None
        self._step = 0
        self._update_probe = UpdateProbe({})
        self._norm_probe = RunningStatsProbe({})
        self._reset_updates()

    def _reset_updates(self) -> None:
        self.telemetry = UpdateTelemetry(self.lost_update_threshold, self.norm_stall_threshold,
                                         self.norm_stall_steps)
        self._sampling = False
        self._scale: float | None = None
        self._update_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._select(pl_module)
        if stage == "fit":  # a new fit starts a new record
            self.steps, self.records = [], []
            self._reset_updates()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # precision plugins swap layers in convert_module, which runs after callback setup: look again
        self._select(pl_module)
        self.telemetry.update_rounding = plugin_update_rounding(trainer.precision_plugin)

    def _select(self, pl_module: L.LightningModule) -> None:
        self._targets = select_modules(pl_module, self.modules)
        self.layers = list(self._targets)
        self._update_probe = UpdateProbe({layer: {n: p for n, p in m.named_parameters() if p.requires_grad}
                                          for layer, m in self._targets.items()})
        self._norm_probe = RunningStatsProbe(running_stat_modules(pl_module))

    # ---- sampling --------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps != 0 or self._sampling or (self.steps and self.steps[-1] == step):
            return
        self._step = step
        self._sampling = True
        self._norm_probe.before()
        self._current = torch.full((len(self.layers), len(KINDS), len(STAT_KEYS)), float("nan"))
        for i, module in enumerate(self._targets.values()):
            self._handles.append(module.register_forward_hook(self._forward_hook(i)))

    def _forward_hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(out, Tensor) or not out.is_floating_point() or self._current is None:
                return
            if torch.is_grad_enabled() and out.requires_grad:
                out.register_hook(self._grad_hook(i))
            self._record(i, 0, out)
        return hook

    def _grad_hook(self, i: int) -> Any:
        def hook(grad: Tensor) -> None:
            self._record(i, 1, grad)
        return hook

    def _record(self, i: int, kind: int, t: Tensor) -> None:
        if self._current is None:
            return
        stats = tensor_stats_raw(t, self.dtype).cpu()
        prev = self._current[i, kind]
        if torch.isnan(prev[3]):  # a layer called twice in one step: keep the worst
            self._current[i, kind] = stats
        else:
            self._current[i, kind] = torch.stack([prev[0] + stats[0], torch.maximum(prev[1], stats[1]),
                                                  torch.maximum(prev[2], stats[2]), torch.maximum(prev[3], stats[3])])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._update_probe.armed:
            self._end_update_sample(trainer)
        if not self._sampling:
            return
        current = self._current
        self._remove_hooks()
        self._end_norm_sample(trainer)
        if current is None:
            return
        self.records.append(current)
        self.steps.append(self._step)
        metrics = {f"numerics/{layer}/{kind}_{key}": float(current[i, k, s])
                   for i, layer in enumerate(self.layers) for k, kind in enumerate(KINDS)
                   for s, key in enumerate(STAT_KEYS) if not torch.isnan(current[i, k, s])}
        self._log(trainer, metrics, self._step)

    # ---- lost updates and stalled running statistics ----------------------------------------------
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_steps != 0 or (step == self._update_step and not self._update_probe.armed):
            return  # not sampled, or this step was compared already
        if not self._update_probe.armed:
            self._update_step, self._scale = step, plugin_loss_scale(trainer.precision_plugin)
        self._update_probe.before(optimizer)  # a second optimizer of the same step adds its parameters

    def _end_update_sample(self, trainer: L.Trainer) -> None:
        scale = plugin_loss_scale(trainer.precision_plugin)
        dropped = scale is not None and self._scale is not None and scale < self._scale
        counts = self._update_probe.after(scale_dropped=dropped)
        dtypes = {layer: str(next(iter(params.values())).dtype).removeprefix("torch.")
                  for layer, params in self._update_probe.layers.items() if params}
        shares, message = self.telemetry.add_updates(self._update_step, counts, dtypes)
        self._log(trainer, {f"numerics/{layer}/update_lost_share": v for layer, v in shares.items()},
                  self._update_step)
        if message:
            rank_zero_warn(message)

    def _end_norm_sample(self, trainer: L.Trainer) -> None:
        counts = self._norm_probe.after()
        if not counts:
            return
        modules = self._norm_probe.modules
        info = {n: (type(modules[n]).__name__, buffer_dtype(modules[n]), getattr(modules[n], "momentum", None))
                for n in counts}
        shares, message = self.telemetry.add_norm(counts, info)
        self._log(trainer, {f"numerics/{n}/norm_stats_unchanged_share": v for n, v in shares.items()}, self._step)
        if message:
            rank_zero_warn(message)

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        if metrics:
            for logger in trainer.loggers:  # rank-zero-only writers, no collective
                logger.log_metrics(metrics, step=step)

    # ---- fit end ---------------------------------------------------------------------------------
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()
        if not self.records and trainer.world_size == 1:
            return
        data = self._gathered(trainer)  # collective: every rank calls it
        log_dir = trainer.log_dir  # broadcasts: every rank calls it
        if not trainer.is_global_zero or data.numel() == 0:
            return
        summary = self.summary(data)
        print(format_table(summary))
        out = Path(log_dir or trainer.default_root_dir)
        # lost updates and norm statistics are rank 0's own (DDP keeps the weights identical on every rank)
        write_json(out / SUMMARY_FILE, {"steps": self.steps, "layers": summary, **self.telemetry.report()})
        if self.heatmap:
            epochs = trainer.current_epoch  # at fit end: the number of epochs trained
            title = (f"{model_label(pl_module)} {precision_label(trainer.precision_plugin)}, "
                     f"{epochs} epoch{'s' if epochs != 1 else ''}")
            write_heatmap(out / HEATMAP_FILE, data, self.layers, self.steps, title)

    def _gathered(self, trainer: L.Trainer) -> Tensor:
        """(steps, layers, kinds, stats) combined over ranks: nonfinite summed, shares averaged, amax max."""
        local = torch.stack(self.records) if self.records else torch.empty(0, len(self.layers), 2, 4)
        if trainer.world_size == 1:
            return local
        every = trainer.strategy.all_gather(local.to(trainer.strategy.root_device)).cpu()  # (ranks, ...)
        filled = torch.nan_to_num(every, nan=0.0)
        seen = (~torch.isnan(every)).float().sum(0).clamp(min=1)
        out = torch.stack([filled[..., 0].sum(0), filled[..., 1].sum(0) / seen[..., 1],
                           filled[..., 2].sum(0) / seen[..., 2], filled[..., 3].amax(0)], dim=-1)
        return torch.where(torch.isnan(every).all(0), torch.full_like(out, float("nan")), out)

    def summary(self, data: Tensor | None = None) -> dict[str, dict[str, Any]]:
        """Per layer, over sampled steps: total non-finite, worst shares and amax (``<kind>_<stat>``), and the
        lost updates (``update_lost_share``, ``update_lost``, ``update_moving``, ``update_lost_share_by_param``,
        ``update_flagged``; see ``UpdateTelemetry.layer_row``)."""
        data = torch.stack(self.records) if data is None else data
        out: dict[str, dict[str, Any]] = {}
        for i, layer in enumerate(self.layers):
            row: dict[str, Any] = self.telemetry.layer_row(layer)
            for k, kind in enumerate(KINDS):
                col = data[:, i, k]
                col = col[~torch.isnan(col[:, 3])]
                if len(col) == 0:
                    continue
                row[f"{kind}_nonfinite"] = int(col[:, 0].sum())
                row[f"{kind}_underflow_share"] = float(col[:, 1].max())
                row[f"{kind}_overflow_share"] = float(col[:, 2].max())
                row[f"{kind}_amax"] = float(col[:, 3].max())
            out[layer] = row
        return out

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._current = None
        self._sampling = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()  # Lightning skips teardown hooks when fit raises
