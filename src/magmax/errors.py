"""User-facing errors: one clear line (what, where, what to do); the CLI turns them into exit code 2."""

from __future__ import annotations


class MagmaxError(Exception):
    """An error the user caused and can fix. Its message is a single line shown as is."""

    exit_code = 2


class MergeInputError(MagmaxError):
    """Inputs of a merge that do not fit together (keys, shapes, dtypes, values, files)."""


class ConfigError(MagmaxError):
    """A configuration key, value or option that is unknown or invalid."""


class DataError(MagmaxError):
    """A dataset that is missing or malformed."""


class TrainingError(MagmaxError):
    """Training that cannot go on (e.g. a NaN loss)."""
