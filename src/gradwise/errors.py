"""User-facing errors.

Anything a user can cause (a bad config key, a missing column, a corrupt
checkpoint, a NaN loss) raises a subclass of :class:`GradwiseError`. The CLI
prints its message as one line and exits with status 2; no traceback is shown,
because the traceback would point at our code while the mistake is in theirs.
"""

from __future__ import annotations


class GradwiseError(Exception):
    """Base class of every error whose message is meant for the user."""


class ConfigError(GradwiseError):
    """A recipe or override is invalid; the message names the field path."""


class DataError(GradwiseError):
    """A data file or column is unusable; the message names the file and column/row."""


class CheckpointError(GradwiseError):
    """A run directory or checkpoint is missing, corrupt or does not match."""


class StorageError(GradwiseError):
    """The machine could not read or write a file (no space, permission, not a directory, not UTF-8).

    The message names the path and what the operating system said.
    """


class TrainingError(GradwiseError):
    """Training cannot go on (e.g. the loss became NaN); the message says where."""


class GradwiseWarning(UserWarning):
    """Something legal but probably unintended (a decay that never fires); shown as one line."""
