"""The one user-facing error type.

Every error that means "your input cannot be used as given" (a recipe, a data file, a stage
hand-off, a run the guards stopped) derives from `RlhfError`; the CLI prints its message and
exits with code 2, and anything else is a bug that keeps its traceback. The subclasses also keep
the builtin base that callers caught before (ValueError, RuntimeError), so `except ValueError`
in user code still works.
"""

from __future__ import annotations


class RlhfError(Exception):
    """Base of every error whose message is meant for the user (exit code 2 in the CLI)."""


class ConfigError(RlhfError, ValueError):
    """A recipe that cannot be used as written; the message names the key."""


class DataError(RlhfError, ValueError):
    """Data that cannot be used; the message names the file (and row where there is one)."""


class HandoffError(RlhfError, RuntimeError):
    """A stage input that the next stage cannot use; the message names both sides."""


class TrainingAborted(RlhfError, RuntimeError):
    """A run the guards stopped (e.g. repeated NaN rewards); the message says where the last good state is."""


class StageFailed(RlhfError, RuntimeError):
    """A pipeline stage's process exited with an error; its log says why, and rerunning resumes it."""
