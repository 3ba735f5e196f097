"""Graph analysis (no rewriting): the op support tables and, later, channel-coupling groups."""

from __future__ import annotations

__all__: list[str] = []
