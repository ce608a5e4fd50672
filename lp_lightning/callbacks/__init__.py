"""Thin Lightning callbacks over lp_lightning.audit."""

__all__: list[str] = []
