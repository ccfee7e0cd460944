"""Errors every layer may raise; the CLI turns them into exit codes."""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value; ``field`` is the dotted name of the offending field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
