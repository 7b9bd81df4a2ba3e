"""Trainer plugins and strategies (none yet: every technique so far fits in a callback)."""
__all__: list[str] = []
