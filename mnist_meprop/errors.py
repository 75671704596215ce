"""Errors caused by the user's input: the CLI prints their one-line message and exits 2."""


class MePropError(Exception):
    """Base of the errors the CLI reports as one line (exit code 2) instead of a traceback."""


class ConfigError(MePropError, ValueError):
    """A bad configuration value; the message names the key and what is allowed."""


class DatasetError(MePropError):
    """Missing, unreadable or malformed data; the message names the file or folder."""


class WorkerLost(Exception):
    """A run's worker died more often than the executor retries it (the CLI: one line, exit code 1)."""
