"""The one exception type a user ever sees: a problem with their input, and how to fix it.

Every package raises `UserError` for bad input; the CLI prints it as one line and exits with
its code (2 for usage, 1 for a failure), never with a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix. `problem` says what is wrong, `fix` what to do about it."""

    exit_code = 1

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.problem}; {self.fix}" if self.fix else self.problem


class UsageError(UserError):
    """Bad arguments: a missing file, an unknown name, options that do not fit together."""

    exit_code = 2
