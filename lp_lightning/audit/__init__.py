"""Pure numerics (no Lightning): tolerance audit (Lemma 1), epsilon safety, overflow statistics."""

from lp_lightning.audit.epsilon import EpsCheck, UnsafeEpsilonError, check_optimizer, fix_optimizer, safe_eps
from lp_lightning.audit.overflow import tensor_stats
from lp_lightning.audit.tolerance import certificate, compare, error, summarize, tolerance

__all__ = [
    "EpsCheck",
    "UnsafeEpsilonError",
    "certificate",
    "check_optimizer",
    "compare",
    "error",
    "fix_optimizer",
    "safe_eps",
    "summarize",
    "tensor_stats",
    "tolerance",
]
