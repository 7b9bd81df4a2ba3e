"""End-of-fit summary tables: Rich when it is installed, plain text otherwise."""

from __future__ import annotations

import io

__all__ = ["format_table"]


def format_table(title: str, rows: list[tuple[str, str]]) -> str:
    """Render ``(what, value)`` rows as a two-column table."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        width = max((len(k) for k, _ in rows), default=0)
        return "\n".join([title] + [f"  {k:<{width}}  {v}" for k, v in rows])
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    buffer = io.StringIO()
    Console(file=buffer, width=100, force_terminal=False).print(table)
    return buffer.getvalue().rstrip()
