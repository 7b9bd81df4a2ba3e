"""Benchmarks of lichtenberg: overhead and quality measured side by side with Lightning's peers."""

__all__: list[str] = []
