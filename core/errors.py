"""Errors the user can fix, shared by every layer."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration or input problem the user must fix; printed as one line, exit code 2."""
