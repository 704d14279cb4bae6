"""The one error type the CLI turns into a one-line message and exit code 2."""

import click


class LoopfreeError(click.ClickException):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""

    exit_code = 2
