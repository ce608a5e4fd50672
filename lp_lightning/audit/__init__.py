"""Pure numerics (no Lightning): tolerance audit (Lemma 1), epsilon safety, overflow statistics."""

__all__: list[str] = []
