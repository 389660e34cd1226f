"""The project's own errors: problems a user can fix, reported as one clear line.

Anything raised as a ``ProjectError`` is the user's to fix (bad parameters, missing or mixed-up
data, a model that cannot be used), so the run, the CLI and notebooks print its message alone,
plus ``hint`` (where to look) when it has one. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class ProjectError(Exception):
    """Base of every error the project raises on purpose; ``hint`` says what to do next."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        """The message the user sees: the problem, then what to do, on one line."""
        text = " ".join(str(self).split())
        return f"{text} ({self.hint})" if self.hint else text


class ParameterError(ProjectError, ValueError):
    """A parameter is unknown, of the wrong type or out of range."""


class DataError(ProjectError, ValueError):
    """Input data is missing, unusable, or from another lineage than the rest of the run."""


class ModelError(ProjectError, ValueError):
    """A model cannot be found, loaded or used as asked."""
