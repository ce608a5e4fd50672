"""Pure numerics (no Lightning): tolerance audit (Lemma 1), epsilon safety, overflow statistics."""

from lp_lightning.audit.tolerance import certificate, compare, error, summarize, tolerance

__all__: list[str] = []
__all__ += ["certificate", "compare", "error", "summarize", "tolerance"]
