"""Errors a user can cause, each reported by the CLI as one line and an exit code.

Both import packages raise these; `hybrid_megatron.cli` turns them into ``error: <message>`` on stderr
and ``exit_code``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class for mistakes in input the user controls (configs, paths, data)."""

    exit_code = 1


class ConfigError(UserError, ValueError):
    """A config value, override or command-line argument is invalid (exit code 2)."""

    exit_code = 2


class DataError(UserError):
    """Data on disk is missing, truncated or corrupt (exit code 3). The message names file and member."""

    exit_code = 3
