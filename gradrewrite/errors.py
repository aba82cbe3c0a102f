"""User-facing errors.

Every problem a user can fix (bad file, bad option, unsupported op) is raised as a
``GradrewriteError`` carrying what went wrong and what to do about it. The CLI prints
it as one line and exits with code 2; library users catch the class.
"""
from __future__ import annotations


class GradrewriteError(Exception):
    """A problem with the user's input, with a hint on how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        if self.hint:
            text += f"; {self.hint}"
        return " ".join(text.split())


class InputError(GradrewriteError):
    """The model file, input spec or calibration data cannot be used."""


class ConfigError(GradrewriteError):
    """An unknown pass, option, selector or backend."""


class PassError(GradrewriteError):
    """A pass failed; the message names it and the passes that ran before it."""

    def __init__(self, message: str, hint: str | None = None, *, pass_name: str = "",
                 ran_before: tuple[str, ...] = ()):
        super().__init__(message, hint)
        self.pass_name = pass_name
        self.ran_before = ran_before


class BackendError(GradrewriteError):
    """The backend cannot lower or run the graph."""


class VerificationError(GradrewriteError):
    """The rewritten graph disagrees numerically with the original model."""
