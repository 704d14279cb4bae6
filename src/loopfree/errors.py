"""The one error type the CLI turns into a one-line message and exit code 2."""

import click


class LoopfreeError(click.ClickException):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""

    exit_code = 2


class Interrupted(click.ClickException):
    """Training stopped by SIGTERM/SIGINT after saving a checkpoint: exit code 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
