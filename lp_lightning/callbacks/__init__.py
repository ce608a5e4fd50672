"""Thin Lightning callbacks over lp_lightning.audit."""

from lp_lightning.callbacks.batchnorm_recalibration import BatchNormRecalibration
from lp_lightning.callbacks.epsilon_guard import EpsilonGuard
from lp_lightning.callbacks.numerics_monitor import NumericsMonitor
from lp_lightning.callbacks.tolerance_audit import ToleranceAudit

__all__ = ["BatchNormRecalibration", "EpsilonGuard", "NumericsMonitor", "ToleranceAudit"]
